"""Likelihood-based refinement of an approximate posterior for one observation, with diagnostics that decide.

When ``log p(x_o | theta)`` is tractable, any approximate posterior ``q`` (the amortized flow at ``x_o``, a
per-observation variational fit, ...) is a proposal for importance sampling of the exact posterior:

1. draw ``n_proposal`` parameters from a *defensive* mixture ``(1 - a) q + a p(theta)`` (the prior part keeps
   the weights bounded where ``q`` has too light tails; Hesterberg 1995);
2. weights ``w = p(x_o | theta) p(theta) / q_mix(theta)``; Pareto-smoothed importance sampling's k-hat and the
   effective sample size say whether ``q`` covers the posterior (k-hat < 0.7: reliable; Vehtari et al.);
3. sampling-importance-resampling picks ``n_draws`` starting points, and independence Metropolis-Hastings moves
   with the same proposal (accept with ``min(1, w' / w)``) remove the duplicates; the chains' target is the
   exact posterior, whatever ``q`` is.

:func:`refine` runs this for every candidate proposal and keeps the best diagnosed one; when none passes, it
returns the least bad with a WARNING and ``reliable=False``. A reverse-KL variational fit, which can collapse
onto one of several modes, is then never returned on trust: its own k-hat decides.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import torch

from .npe import importance_diagnostics
from .priors import Prior, as_prior

__all__ = ["Proposal", "ConditionedEstimator", "ImportanceRefinement", "RefinementResult", "refine"]

log = logging.getLogger(__name__)


class Proposal(Protocol):
    """A normalised density one can draw from: what :func:`refine` takes as a candidate."""

    def sample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor: ...


class ConditionedEstimator:
    """An amortized estimator ``q(theta | x)`` at one observation, as a :class:`Proposal`."""

    def __init__(self, estimator, x_obs: torch.Tensor):
        self.estimator, self.x_obs = estimator, x_obs
        # a rejection-sampled (truncated) estimator draws from log_prob - log(mass inside): the density the
        # importance weights need
        norm = getattr(estimator, "log_normalizer", None)
        self.log_norm = float(norm(x_obs)) if norm is not None else 0.0

    def sample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        theta, log_q = self.estimator.sample_and_log_prob(self.x_obs, int(n))
        return theta, log_q - self.log_norm

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.estimator.log_prob(theta, self.x_obs) - self.log_norm


class _FlowProposal:
    """:class:`~physppl.inference.flows.BoxFlow` (a variational fit) as a :class:`Proposal`."""

    def __init__(self, flow):
        self.flow = flow

    def sample_and_log_prob(self, n: int):
        with torch.no_grad():
            return self.flow.rsample_and_log_prob(int(n))

    def log_prob(self, theta):
        with torch.no_grad():
            return self.flow.log_prob(theta)


def as_proposal(q) -> Proposal:
    if hasattr(q, "sample_and_log_prob") and hasattr(q, "log_prob"):
        return q
    if hasattr(q, "rsample_and_log_prob") and hasattr(q, "log_prob"):
        return _FlowProposal(q)
    raise TypeError(f"refine: a proposal needs sample_and_log_prob(n) and log_prob(theta); got {type(q).__name__}")


@dataclass
class RefinementResult:
    """What :func:`refine` returns.

    draws : Tensor (n_draws, D), from the chosen proposal's importance-resampled Metropolis-Hastings chains
    method : name of the chosen proposal
    pareto_k, ess : its k-hat and importance ESS (effective draws out of ``n_proposal``)
    accept_rate : acceptance of the independence Metropolis-Hastings moves
    reliable : k-hat below the threshold
    candidates : per candidate: ``pareto_k``, ``ess``
    warning : why the result is unreliable, or None
    """

    draws: torch.Tensor
    method: str
    pareto_k: float
    ess: float
    accept_rate: float
    reliable: bool
    candidates: dict = field(default_factory=dict)
    warning: str | None = None


class ImportanceRefinement:
    """Options of the refinement (see the module docstring).

    Parameters
    ----------
    n_proposal : int
        Proposal draws for the weights and diagnostics.
    defensive : float
        Prior fraction ``a`` of the defensive mixture (0 turns it off).
    mcmc_steps, max_mcmc_steps : int
        Independence Metropolis-Hastings steps per chain after resampling: at least ``mcmc_steps``, and more (up
        to ``max_mcmc_steps``) until 95% of the chains have moved at least once, so duplicates of a poorly
        covered posterior are moved on rather than returned.
    k_threshold : float
        k-hat above which a proposal is not trusted (0.7, Vehtari et al. 2024).
    batch_size : int
        Likelihood evaluations per call.
    seed : int
    """

    def __init__(self, n_proposal: int = 20_000, defensive: float = 0.05, mcmc_steps: int = 20,
                 max_mcmc_steps: int = 200, k_threshold: float = 0.7, batch_size: int = 20_000, seed: int = 0):
        if not 0 <= defensive < 1:
            raise ValueError(f"ImportanceRefinement: defensive must be in [0, 1), got {defensive}")
        self.n_proposal, self.defensive, self.mcmc_steps = int(n_proposal), float(defensive), int(mcmc_steps)
        self.max_mcmc_steps = max(int(max_mcmc_steps), self.mcmc_steps)
        self.k_threshold, self.batch_size, self.seed = float(k_threshold), int(batch_size), int(seed)

    # -- one proposal ---------------------------------------------------------------------------------
    def _mixture_draws(self, q: Proposal, prior: Prior, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws of ``(1 - a) q + a prior`` and the mixture's log density."""
        n_prior = int(round(self.defensive * n))
        theta_q, log_q = q.sample_and_log_prob(n - n_prior)
        if n_prior:
            theta_p = prior.sample(n_prior)
            theta = torch.cat([theta_q, theta_p])
            log_q_all = torch.cat([log_q, q.log_prob(theta_p)])
        else:
            theta, log_q_all = theta_q, log_q
        return theta, self._mix_log_prob(log_q_all, prior.log_prob(theta))

    def _mix_log_prob(self, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        if self.defensive == 0:
            return log_q
        return torch.logaddexp(log_q + math.log1p(-self.defensive), log_p + math.log(self.defensive))

    def _log_weights(self, theta: torch.Tensor, log_mix: torch.Tensor, prior: Prior,
                     log_likelihood: Callable) -> torch.Tensor:
        parts = []
        with torch.no_grad():
            for s in range(0, len(theta), self.batch_size):
                parts.append(log_likelihood(theta[s:s + self.batch_size]))
        lw = torch.cat(parts).double() + prior.log_prob(theta).double() - log_mix.double()
        return torch.where(torch.isnan(lw), torch.full_like(lw, -float("inf")), lw)

    def diagnose(self, q: Proposal, prior: Prior, log_likelihood: Callable) -> dict:
        theta, log_mix = self._mixture_draws(q, prior, self.n_proposal)
        lw = self._log_weights(theta, log_mix, prior, log_likelihood)
        if not torch.isfinite(lw).any():
            return {"pareto_k": float("inf"), "ess": 0.0, "theta": theta, "log_w": lw}
        finite = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, lw[torch.isfinite(lw)].min() - 1e3))
        k, ess_frac = importance_diagnostics(finite.numpy())
        return {"pareto_k": k, "ess": ess_frac * len(lw), "theta": theta, "log_w": lw}

    def resample_and_move(self, q: Proposal, prior: Prior, log_likelihood: Callable, diag: dict,
                          n_draws: int) -> tuple[torch.Tensor, float]:
        """SIR from the diagnosed draws, then independence Metropolis-Hastings moves with ``q``'s mixture."""
        gen = torch.Generator().manual_seed(self.seed)
        lw = diag["log_w"]
        w = torch.exp(lw - lw.max())
        idx = torch.multinomial(w.float(), int(n_draws), replacement=True, generator=gen)
        theta, cur = diag["theta"][idx].clone(), lw[idx].clone()
        accepted, steps = 0, 0
        moved = torch.zeros(int(n_draws), dtype=torch.bool)
        while steps < self.max_mcmc_steps and (steps < self.mcmc_steps or float(moved.float().mean()) < 0.95):
            prop, log_mix = self._mixture_draws(q, prior, int(n_draws))
            lw_new = self._log_weights(prop, log_mix, prior, log_likelihood)
            u = torch.rand(int(n_draws), generator=gen, dtype=torch.float64)
            accept = torch.log(u) < (lw_new - cur)
            theta[accept], cur[accept] = prop[accept], lw_new[accept]
            accepted, steps, moved = accepted + int(accept.sum()), steps + 1, moved | accept
        self.last_steps, self.last_moved = steps, float(moved.float().mean())
        rate = accepted / max(1, steps * int(n_draws))
        return theta, rate


def refine(proposals: Mapping[str, object], log_likelihood: Callable[[torch.Tensor], torch.Tensor], prior,
           n_draws: int, options: ImportanceRefinement | None = None) -> RefinementResult:
    """Refine against the likelihood with each candidate ``proposals[name]`` and keep the best diagnosed.

    Candidates are tried in order; the first whose k-hat passes wins ties in reliability, and among reliable
    ones the largest ESS wins. ``log_likelihood(theta)``: (n, D) -> (n,). Returns a :class:`RefinementResult`.
    """
    if not proposals:
        raise ValueError("refine: give at least one proposal")
    opts = options or ImportanceRefinement()
    prior = as_prior(prior)
    # the proposals draw from torch's global generator: seed it here, and give the caller's state back after
    with torch.random.fork_rng():
        torch.manual_seed(opts.seed)
        diags = {}
        for name, q in proposals.items():
            diags[name] = (as_proposal(q), opts.diagnose(as_proposal(q), prior, log_likelihood))
            log.info("refinement proposal %s: Pareto k %.3f, ESS %.0f of %d", name, diags[name][1]["pareto_k"],
                     diags[name][1]["ess"], opts.n_proposal)
        reliable = [n for n, (_, d) in diags.items() if d["pareto_k"] <= opts.k_threshold]
        if reliable:
            best = max(reliable, key=lambda n: diags[n][1]["ess"])
        else:
            best = min(diags, key=lambda n: (diags[n][1]["pareto_k"], -diags[n][1]["ess"]))
        q, d = diags[best]
        draws, rate = opts.resample_and_move(q, prior, log_likelihood, d, n_draws)
    warning = None
    if not reliable:
        warning = (f"no proposal covers the posterior well enough for importance sampling (best: {best}, Pareto k "
                   f"{d['pareto_k']:.2f} > {opts.k_threshold:g}, ESS {d['ess']:.0f}); the draws come from "
                   f"{opts.last_steps} independence Metropolis-Hastings steps per chain with acceptance {rate:.3f}, "
                   f"{100 * opts.last_moved:.0f}% of the chains moved, and may not have mixed")
        log.warning("refinement: %s", warning)
    return RefinementResult(draws=draws, method=best, pareto_k=float(d["pareto_k"]), ess=float(d["ess"]),
                            accept_rate=rate, reliable=bool(reliable),
                            candidates={n: {"pareto_k": float(dd["pareto_k"]), "ess": float(dd["ess"])}
                                        for n, (_, dd) in diags.items()}, warning=warning)
