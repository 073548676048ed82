"""Tempered sequential Monte Carlo from a proposal to the exact posterior, for when importance sampling fails.

When a proposal ``g`` (an amortized posterior mixed with the prior) is too far from the posterior for one
importance step (Pareto k > 0.7), the bridge

    pi_b(theta)  propto  g(theta)^(1 - b) * [p(theta) p(x_o | theta)]^b,      b: 0 -> 1,

goes there in steps that importance sampling can take (Del Moral, Doucet & Jasra 2006). Each step picks the next
``b`` by bisection so that the effective sample size of the incremental weights is ``ess_fraction`` of the
particles (Jasra et al. 2011), resamples, and moves every particle with Metropolis-Hastings kernels that leave
``pi_b`` invariant: a Gaussian random walk whose covariance is the particles' own (scaled to keep the acceptance
near 0.3, so it stays local when the posterior has several modes) alternated with independence proposals from
``g`` (which jump between the modes ``g`` knows). A stage makes as many moves as it takes for 99% of the particles
to have moved at the measured acceptance rate (Drovandi & Pettitt 2011), up to ``max_moves``.

Written here rather than taken from a library: Pyro's SMCFilter is for state-space models, and BlackJAX/pyMC's
tempered SMC are not torch; this one is a few dozen lines over the proposal protocol of :mod:`.refine`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["TemperedSMC", "SMCResult", "nan_to_neg_inf"]


def nan_to_neg_inf(t: torch.Tensor) -> torch.Tensor:
    """NaN (e.g. ``-inf - -inf`` outside a support) read as zero density; infinities kept as they are, which
    ``torch.nan_to_num`` would turn into the largest floats."""
    return torch.where(torch.isnan(t), torch.full_like(t, -math.inf), t)


@dataclass
class SMCResult:
    """What :meth:`TemperedSMC.run` returns.

    particles : Tensor (n_particles, D), equally weighted draws of the posterior
    betas : the temperatures of the stages (the last is 1)
    accept_rates : Metropolis-Hastings acceptance per stage (both kernels together)
    moves : Metropolis-Hastings moves per stage
    capped : stages whose moves stopped at ``max_moves`` before 99% of the particles had moved
    log_evidence : estimate of ``log p(x_o)`` relative to the proposal's normalisation
    """

    particles: torch.Tensor
    betas: list[float]
    accept_rates: list[float]
    moves: list[int]
    capped: int
    log_evidence: float

    @property
    def stages(self) -> int:
        return len(self.betas)

    @property
    def min_accept(self) -> float:
        return min(self.accept_rates) if self.accept_rates else 0.0


def _ess_fraction(log_w: torch.Tensor) -> float:
    w = torch.softmax(log_w, 0)
    return float(1.0 / (w.square().sum() * len(w)))


class TemperedSMC:
    """Adaptive likelihood-tempered SMC from a proposal ``g`` (see the module docstring).

    Parameters
    ----------
    n_particles : int
    ess_fraction : float
        Target effective sample size of each stage's incremental weights, as a fraction of the particles.
    max_stages : int
        Stages before giving up (the result then ends below ``b = 1`` and says so through ``betas``).
    min_moves, max_moves : int
        Metropolis-Hastings moves per stage: at least ``min_moves``, at most ``max_moves``.
    seed : int
    """

    def __init__(self, n_particles: int = 10_000, ess_fraction: float = 0.5, max_stages: int = 100,
                 min_moves: int = 4, max_moves: int = 60, seed: int = 0):
        if not 0 < ess_fraction < 1:
            raise ValueError(f"TemperedSMC: ess_fraction must be in (0, 1), got {ess_fraction}")
        self.n_particles, self.ess_fraction = int(n_particles), float(ess_fraction)
        self.max_stages, self.min_moves = int(max_stages), int(min_moves)
        self.max_moves = max(int(max_moves), self.min_moves)
        self.seed = int(seed)

    def _next_beta(self, beta: float, r: torch.Tensor) -> float:
        """The largest ``b' <= 1`` whose incremental weights ``(b' - b) r`` keep the target ESS."""
        if _ess_fraction((1.0 - beta) * r) >= self.ess_fraction:
            return 1.0
        lo, hi = beta, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if _ess_fraction((mid - beta) * r) >= self.ess_fraction:
                lo = mid
            else:
                hi = mid
        return max(lo, beta + 1e-6)

    def run(self, sample_g: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
            log_g: Callable[[torch.Tensor], torch.Tensor],
            log_target: Callable[[torch.Tensor], torch.Tensor]) -> SMCResult:
        """Run from ``g`` to the target.

        ``sample_g(n) -> (theta (n, D), log g(theta) (n,))``; ``log_g(theta) -> (n,)``; ``log_target(theta) -> (n,)``
        is the unnormalised log posterior ``log p(theta) + log p(x_o | theta)`` (``-inf`` outside the support).
        """
        gen = torch.Generator().manual_seed(self.seed)
        n = self.n_particles
        theta, lg = sample_g(n)
        lg = lg.double()
        lt = log_target(theta).double()
        r = nan_to_neg_inf(lt - lg)
        beta, log_z = 0.0, 0.0
        betas, rates, moves_done = [], [], []
        capped = 0
        d = theta.shape[-1]
        scale = 2.38 / math.sqrt(d)
        for _ in range(self.max_stages):
            if beta >= 1.0:
                break
            new_beta = self._next_beta(beta, r)
            inc = (new_beta - beta) * r
            log_z += float(torch.logsumexp(inc, 0) - math.log(n))
            beta = new_beta
            idx = torch.multinomial(torch.softmax(inc, 0).float(), n, replacement=True, generator=gen)
            theta, lg, lt, r = theta[idx], lg[idx], lt[idx], r[idx]

            def log_pi(lg_, lt_):
                return nan_to_neg_inf((1.0 - beta) * lg_ + beta * lt_)

            accepted, steps, target_steps = 0, 0, self.min_moves
            while steps < target_steps:
                if steps % 2 == 0:
                    # random walk with the particles' covariance (regularised), scaled towards acceptance ~0.3
                    cov = torch.cov(theta.double().T).reshape(d, d) + 1e-9 * torch.eye(d, dtype=torch.float64)
                    chol = torch.linalg.cholesky(cov)
                    step = torch.randn(n, d, generator=gen, dtype=torch.float64) @ chol.T
                    prop = (theta.double() + scale * step).to(theta.dtype)
                    lg_p, lt_p = log_g(prop).double(), log_target(prop).double()
                    log_a = log_pi(lg_p, lt_p) - log_pi(lg, lt)
                else:
                    # independence proposal from g: the ratio is b (r' - r)
                    prop, lg_p = sample_g(n)
                    lg_p = lg_p.double()
                    lt_p = log_target(prop).double()
                    log_a = log_pi(lg_p, lt_p) - log_pi(lg, lt) - (lg_p - lg)
                u = torch.rand(n, generator=gen, dtype=torch.float64)
                acc = torch.log(u) < nan_to_neg_inf(log_a)
                theta = torch.where(acc[:, None], prop, theta)
                lg, lt = torch.where(acc, lg_p, lg), torch.where(acc, lt_p, lt)
                accepted, steps = accepted + int(acc.sum()), steps + 1
                if steps % 2 == 1:
                    rw_rate = float(acc.float().mean())
                    scale *= math.exp(rw_rate - 0.3)  # Robbins-Monro-like nudge towards 0.3
                if steps == 2:
                    # Drovandi & Pettitt: moves for 99% of the particles to move at the measured acceptance
                    a = max(accepted / (2 * n), 1e-6)
                    target_steps = max(self.min_moves, math.ceil(math.log(0.01) / math.log1p(-min(a, 1 - 1e-9))))
                    if target_steps > self.max_moves:
                        capped += 1
                    target_steps = min(target_steps, self.max_moves)
            r = nan_to_neg_inf(lt - lg)
            betas.append(beta)
            rates.append(accepted / (steps * n))
            moves_done.append(steps)
        return SMCResult(particles=theta, betas=betas, accept_rates=rates, moves=moves_done, capped=capped,
                         log_evidence=log_z)
