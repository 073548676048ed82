"""Importance-weighted estimates of the marginal log-likelihood, per data point, for any model/guide pair.

For each data point ``x_i`` and ``K`` draws ``z_k ~ q(z | x_i)`` from the guide, the log weights
``log w_k = log p(x_i, z_k) - log q(z_k | x_i)`` give

* the ELBO estimate ``mean_k log w_k`` (a lower bound on ``log p(x_i)`` in expectation), and
* the importance-weighted bound ``IWAE_K = logsumexp_k log w_k - log K`` (Burda et al. 2016), which rises
  towards ``log p(x_i)`` as ``K`` grows and is the standard held-out log-likelihood estimate for VAEs.

Pyro's ``RenyiELBO``/``TraceIWAE``-style losses return one summed training objective; this module keeps the
weights per data point (for held-out tables and per-configuration plots) and evaluates ``K`` in chunks, so
``K = 1000`` on large images fits in memory. It knows nothing about the model beyond the protocol of
:class:`~physppl.inference.svi.SVIEngine`: ``model(**model_kwargs, subsample=idx)`` and the same for the
guide, with every sample site inside the data plate (local latents only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

__all__ = ["ImportanceEstimate", "importance_log_weights", "importance_estimate"]


@dataclass
class ImportanceEstimate:
    """Per-data-point estimates from ``K`` importance samples (nats)."""

    log_weights: torch.Tensor  # (K, n), float64

    @property
    def num_particles(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def elbo(self) -> torch.Tensor:
        """``mean_k log w_k`` per data point, shape (n,)."""
        return self.log_weights.mean(0)

    @property
    def iwae(self) -> torch.Tensor:
        """``logsumexp_k log w_k - log K`` per data point, shape (n,)."""
        return torch.logsumexp(self.log_weights, 0) - math.log(self.num_particles)

    @property
    def ess(self) -> torch.Tensor:
        """Effective sample size of the normalised weights per data point, in [1, K]."""
        w = torch.softmax(self.log_weights, 0)
        return 1.0 / w.square().sum(0)


def _site_log_prob(site: dict, name: str, data_dim: int, particle_dim: int, data_plate: str) -> torch.Tensor:
    """``log_prob`` of one site reduced to (particles, batch): sums every other batch dim (nested plates)."""
    frames = {f.name: f.dim for f in site["cond_indep_stack"] if f.vectorized}
    if data_plate not in frames:
        raise ValueError(f"sample site {name!r} is outside the data plate {data_plate!r}: the per-data-point "
                         "importance weights need every latent and observation inside it (no global latents)")
    lp = site["fn"].log_prob(site["value"])
    mask = site.get("mask")
    if isinstance(mask, torch.Tensor):
        lp = torch.where(mask, lp, torch.zeros_like(lp))
    elif mask is False:
        lp = torch.zeros_like(lp)
    ndim = max(-particle_dim, -data_dim, lp.dim())
    lp = lp.reshape((1,) * (ndim - lp.dim()) + tuple(lp.shape))
    others = [d for d in range(-ndim, 0) if d not in (particle_dim, data_dim)]
    if others:
        lp = lp.sum(others, keepdim=True)
    lp = lp.movedim((particle_dim, data_dim), (0, 1))
    return lp.reshape(lp.shape[0], lp.shape[1])


def _inspect(model: Callable, guide: Callable, model_kwargs: dict, data_plate: str, one: torch.Tensor):
    """From one trace on a single data point: the data plate's dim, the deepest plate dim, and the number of
    tensor elements per data point (to size particle chunks)."""
    rng = pyro.util.get_rng_state()  # the probe must not shift the random stream of the estimate
    try:
        tr = poutine.trace(guide).get_trace(**model_kwargs, subsample=one)
        mt = poutine.trace(poutine.replay(model, trace=tr)).get_trace(**model_kwargs, subsample=one)
    finally:
        pyro.util.set_rng_state(rng)
    data_dim, deepest, per_point = None, -1, 0
    for t in (tr, mt):
        for site in t.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            per_point += site["value"].numel() + site["fn"].batch_shape.numel()
            for f in site["cond_indep_stack"]:
                if f.vectorized:
                    deepest = min(deepest, f.dim)
                    if f.name == data_plate:
                        data_dim = f.dim
    if data_dim is None:
        raise ValueError(f"no sample site of the model or guide is inside a plate named {data_plate!r}")
    return data_dim, deepest, per_point


@torch.no_grad()
def importance_log_weights(
    model: Callable,
    guide: Callable,
    n_data: int,
    num_particles: int = 1000,
    model_kwargs: dict | None = None,
    data_plate: str = "data",
    batch_size: int = 256,
    max_elements: int = 2**24,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log importance weights ``log p(x_i, z_k) - log q(z_k | x_i)``, shape (num_particles, n), float64.

    Parameters
    ----------
    model, guide
        Called as ``fn(**model_kwargs, subsample=idx)``; all sample sites inside plate ``data_plate``.
    n_data : int
        Size of the data plate (``indices`` default to ``range(n_data)``).
    num_particles : int
        ``K``; particles are vectorised by an outer plate and evaluated in chunks.
    batch_size : int
        Data points per chunk.
    max_elements : int
        Rough cap on ``particles x batch x event size`` per chunk (memory).
    """
    kwargs = dict(model_kwargs or {})
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    idx_all = torch.arange(n_data) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    data_dim, deepest, per_point = _inspect(model, guide, kwargs, data_plate, idx_all[:1])
    particle_dim = deepest - 1  # left of every plate of the model
    rows = []
    for start in range(0, idx_all.numel(), batch_size):
        idx = idx_all[start:start + batch_size]
        chunk = max(1, min(num_particles, max_elements // max(1, per_point * idx.numel())))
        parts = []
        for k0 in range(0, num_particles, chunk):
            k = min(chunk, num_particles - k0)
            with pyro.plate("_importance_particles", k, dim=particle_dim):
                gt = poutine.trace(guide).get_trace(**kwargs, subsample=idx)
                mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(**kwargs, subsample=idx)
            logw = torch.zeros(k, idx.numel(), dtype=torch.float64, device=_device(gt, mt))
            for sign, tr in ((1.0, mt), (-1.0, gt)):
                for name, site in tr.nodes.items():
                    if site["type"] != "sample" or site_is_subsample(site):
                        continue
                    # model pass: prior of latents + likelihood of observations; guide pass: log q of latents
                    lp = _site_log_prob(site, name, data_dim, particle_dim, data_plate)
                    logw = logw + sign * lp.to(torch.float64).expand(k, idx.numel())
            parts.append(logw)
        rows.append(torch.cat(parts, 0))
    out = torch.cat(rows, 1)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).any(0).nonzero()[0])
        raise ValueError(f"non-finite importance weight for data point {int(idx_all[bad])}: check the data lie in "
                         "the support of the likelihood and the guide's scales are positive")
    return out.cpu()


def _device(*traces) -> torch.device:
    for tr in traces:
        for site in tr.nodes.values():
            if site["type"] == "sample" and isinstance(site.get("value"), torch.Tensor):
                return site["value"].device
    return torch.device("cpu")


def importance_estimate(model: Callable, guide: Callable, n_data: int, num_particles: int = 1000,
                        **kwargs) -> ImportanceEstimate:
    """:func:`importance_log_weights` wrapped with the ELBO, IWAE and ESS per data point."""
    return ImportanceEstimate(importance_log_weights(model, guide, n_data, num_particles, **kwargs))
