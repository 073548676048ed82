"""Reference posteriors for the beam model: exact rejection sampling (fast) and Pyro NUTS (the yardstick).

The likelihood is tractable, so the posterior of any scan can be sampled exactly. NUTS (Pyro) is the generic
reference but costs minutes per scan; the rejection sampler of
:func:`~physppl.inference.calibration.box_posterior_rejection_sample` (Student-t proposal around the Laplace
approximation in logit coordinates, bounded density ratio) gives exact draws in seconds and is validated
against NUTS (C2ST ~0.5, see the tests and the README). Reference draws are cached by scan.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from physppl.inference.calibration import box_posterior_rejection_sample
from physppl.inference.outputs import atomic_write
from physppl.models.beam import PARAM_NAMES, KnifeEdgeBeamModel

from .data import simulator_key

__all__ = ["reference_draws", "nuts_draws"]

log = logging.getLogger(__name__)


def _scan_key(model: KnifeEdgeBeamModel, x: torch.Tensor, n: int) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(x.detach().cpu().double().numpy()).tobytes()).hexdigest()[:16]
    return f"{simulator_key(model)}/reference_{digest}_{n}.npy"


def reference_draws(model: KnifeEdgeBeamModel, x: torch.Tensor, n: int = 10_000, cache_dir: Path | None = None,
                    seed: int = 0) -> tuple[np.ndarray, dict]:
    """``n`` exact posterior draws (n, 7) for one scan ``x`` (x_dim,), cached under ``cache_dir`` if given."""
    path = None if cache_dir is None else Path(cache_dir) / _scan_key(model, x, n)
    if path is not None and path.is_file():
        return np.load(path), {"cached": True}
    m64 = KnifeEdgeBeamModel(model.positions.double(), model.background, model.read_noise)
    m64.low, m64.high = model.low.double(), model.high.double()
    x64 = x.double()
    with pyro.util.optional(torch.random.fork_rng(), True):
        torch.manual_seed(seed)
        draws, info = box_posterior_rejection_sample(lambda th: m64.log_likelihood(th, x64), m64.low, m64.high, n)
    out = draws.numpy()
    if path is not None:
        atomic_write(path, lambda p: np.save(open(p, "wb"), out))
    return out, {"cached": False, "acceptance": info["acceptance"], "bound_restarts": info["bound_restarts"]}


def nuts_draws(model: KnifeEdgeBeamModel, x: torch.Tensor, num_samples: int = 2500, warmup_steps: int = 500,
               num_chains: int = 2, init: np.ndarray | None = None, progress: bool = False, seed: int = 0) -> tuple[np.ndarray, dict]:
    """NUTS draws (num_chains * num_samples, 7) of the model's posterior for one scan (float64, JIT).

    ``init``: starting parameters (7,), e.g. the posterior mode; the prior's median otherwise.
    """
    m64 = KnifeEdgeBeamModel(model.positions.double(), model.background, model.read_noise)
    m64.low, m64.high = model.low.double(), model.high.double()
    values = None if init is None else {k: torch.tensor([float(v)], dtype=torch.float64) for k, v in zip(PARAM_NAMES, init)}
    kernel = NUTS(m64, jit_compile=True, ignore_jit_warnings=True,
                  init_strategy=init_to_value(values=values) if values else pyro.infer.autoguide.init_to_median)
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                disable_progbar=not progress, mp_context=None)
    mcmc.run(x=x.double().reshape(1, -1))
    samples = mcmc.get_samples(group_by_chain=True)
    draws = np.stack([samples[k].reshape(-1).numpy() for k in PARAM_NAMES], axis=1)
    diverging = sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return draws, {"divergences": int(diverging)}
