"""NUTS engine (Pyro): several chains, optional JIT, draws grouped by chain for ArviZ."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_uniform, init_to_value

from .fit import Fit

__all__ = ["NUTSEngine", "NUTSResult"]

log = logging.getLogger(__name__)


@dataclass
class NUTSResult:
    samples: dict[str, torch.Tensor]  # site -> (chains, draws, *site_shape)
    diverging: np.ndarray  # (chains, draws) bool
    wall_time: float = 0.0
    stats: dict = field(default_factory=dict)


class NUTSEngine:
    """Sample a model's latent sites with the No-U-Turn sampler.

    Parameters
    ----------
    num_samples, warmup_steps, num_chains : int
        Kept draws per chain, adaptation steps per chain, number of chains (run one after another on CPU).
    jit_compile : bool
        Trace the potential with the PyTorch JIT (faster for small fixed-shape models; measure).
    target_accept_prob, max_tree_depth : float, int
        NUTS adaptation target and tree depth limit.
    full_mass : bool
        Adapt a dense mass matrix (strongly correlated latents, up to a few hundred dimensions) instead of a diagonal.
    """

    needs_guide = False

    def __init__(
        self,
        num_samples: int = 500,
        warmup_steps: int = 500,
        num_chains: int = 2,
        jit_compile: bool = False,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        progress: bool = True,
        full_mass: bool = False,
    ):
        self.num_samples = int(num_samples)
        self.warmup_steps = int(warmup_steps)
        self.num_chains = int(num_chains)
        self.jit_compile = bool(jit_compile)
        self.target_accept_prob = float(target_accept_prob)
        self.max_tree_depth = int(max_tree_depth)
        self.progress = bool(progress)
        self.full_mass = bool(full_mass)

    def run(self, model: Callable, init_values: dict | None = None, **model_kwargs) -> NUTSResult:
        """Sample ``model(**model_kwargs)``; ``init_values`` (site -> value, e.g. a MAP fit) starts every chain
        there instead of at random points of the prior's support, which multimodal posteriors need."""
        strategy = init_to_value(values=init_values) if init_values else init_to_uniform
        kernel = NUTS(
            model,
            init_strategy=strategy,
            jit_compile=self.jit_compile,
            ignore_jit_warnings=True,
            target_accept_prob=self.target_accept_prob,
            max_tree_depth=self.max_tree_depth,
            full_mass=self.full_mass,
        )
        mcmc = MCMC(
            kernel,
            num_samples=self.num_samples,
            warmup_steps=self.warmup_steps,
            num_chains=self.num_chains,
            disable_progbar=not self.progress,
            mp_context=None,
        )
        t0 = time.perf_counter()
        mcmc.run(**model_kwargs)
        wall = time.perf_counter() - t0
        samples = mcmc.get_samples(group_by_chain=True)
        diverging = np.zeros((self.num_chains, self.num_samples), dtype=bool)
        diags = mcmc.diagnostics()
        for c, idx in diags.get("divergences", {}).items():
            chain = int(str(c).split()[-1]) if not isinstance(c, int) else c
            diverging[chain, np.asarray(idx, dtype=int)] = True
        log.info("NUTS: %d chains x %d draws in %.1f s, %d divergences", self.num_chains, self.num_samples, wall, diverging.sum())
        return NUTSResult(samples=samples, diverging=diverging, wall_time=wall, stats={"divergences": int(diverging.sum())})

    def fit(self, model, guide, data: dict, *, n_draws: int | None = None, n_data: int | None = None,
            sites: list[str] | None = None, workdir=None, callback=None, init: dict | None = None) -> Fit:
        """:meth:`run` as an engine: draws (chains, num_samples, *shape) of every latent site. The sampler keeps
        its own ``num_samples`` per chain (``n_draws`` is not used); ``init`` starts every chain there."""
        result = self.run(model, init_values=init, **data)
        draws = {k: v.detach().cpu() for k, v in result.samples.items() if sites is None or k in sites}
        info = {"engine": "nuts", "train_time": result.wall_time, "divergences": result.stats["divergences"],
                "num_chains": self.num_chains, "num_samples": self.num_samples}
        return Fit(model=model, guide=None, data=data, draws=draws, info=info,
                   sample_stats={"diverging": result.diverging})
