"""Annealed importance sampling of an energy model's log partition function (Neal 2001; for RBMs Salakhutdinov &
Murray 2008, "On the quantitative analysis of deep belief networks").

From a base distribution with a known ``log Z_0`` to the target through ``p_k(x) ∝ p_0*(x)^(1 - beta_k)
p*(x)^beta_k``, each of ``n_chains`` chains moves by a transition that leaves ``p_k`` invariant and accumulates
``log w += log p_k*(x) - log p_{k-1}*(x)``; ``log Z = log Z_0 + log mean(w)``. The estimate is unbiased in ``Z``
(so biased low in ``log Z`` by Jensen) and its error bar is the delta-method standard error of ``log mean(w)``.

The model supplies ``log_unnormalised(x, beta)`` (the log of ``p_beta*``, with the base's share), ``sample_base(n)``,
``log_z_base()`` and ``transition(x, beta)``; nothing here knows which model that is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["AnnealedModel", "AISResult", "annealed_log_z"]


class AnnealedModel(Protocol):
    def log_unnormalised(self, x: torch.Tensor, beta: float) -> torch.Tensor: ...
    def sample_base(self, n: int, generator: torch.Generator) -> torch.Tensor: ...
    def log_z_base(self) -> torch.Tensor: ...
    def transition(self, x: torch.Tensor, beta: float, generator: torch.Generator) -> torch.Tensor: ...


@dataclass
class AISResult:
    log_z: float
    log_z_se: float  # delta-method standard error of log mean(w)
    ess: float  # effective number of chains, (sum w)^2 / sum w^2
    n_chains: int
    n_betas: int


@torch.no_grad()
def annealed_log_z(model: AnnealedModel, n_chains: int = 100, n_betas: int = 10000,
                   seed: int = 0) -> AISResult:
    """AIS with ``n_betas`` inverse temperatures spaced as Salakhutdinov & Murray (denser near 1)."""
    if n_chains < 2 or n_betas < 2:
        raise ValueError(f"annealed_log_z: need n_chains >= 2 and n_betas >= 2, got {n_chains}, {n_betas}")
    gen = torch.Generator().manual_seed(int(seed))
    # a quarter of the steps to 0.5, a quarter to 0.9, half to 1 (their schedule, scaled to n_betas)
    q = n_betas // 4
    betas = torch.cat([torch.linspace(0, 0.5, q + 1)[:-1], torch.linspace(0.5, 0.9, q + 1)[:-1],
                       torch.linspace(0.9, 1.0, n_betas - 2 * q)]).tolist()
    x = model.sample_base(n_chains, gen)
    log_w = torch.zeros(n_chains, dtype=torch.float64)
    for prev, beta in zip(betas[:-1], betas[1:]):
        log_w += model.log_unnormalised(x, beta) - model.log_unnormalised(x, prev)
        x = model.transition(x, beta, gen)
    log_mean = torch.logsumexp(log_w, 0) - math.log(n_chains)
    w = torch.exp(log_w - log_w.max())
    ess = float(w.sum() ** 2 / (w ** 2).sum())
    # se of log(mean w) = sd(w) / (sqrt(n) mean(w)), on the scaled weights
    se = float(w.std(unbiased=True) / (math.sqrt(n_chains) * w.mean()))
    return AISResult(log_z=float(model.log_z_base() + log_mean), log_z_se=se, ess=ess, n_chains=n_chains,
                     n_betas=n_betas)
