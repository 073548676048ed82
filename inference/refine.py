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

:func:`refine` runs this for every candidate proposal and keeps the best diagnosed one. When none passes, one
importance step cannot reach the posterior from any of them: it says so with a WARNING and falls back to
tempered sequential Monte Carlo (:mod:`.smc`) from the least bad proposal's defensive mixture, which reaches the
posterior in several importance steps with Metropolis-Hastings moves between them. ``reliable`` is then the
SMC's own check (it reached the posterior, and every stage moved 99% of its particles); when that fails too, a
second WARNING says so. A reverse-KL variational fit, which can collapse onto one of several modes, is never
returned on trust: its own k-hat decides.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import torch

from .npe import importance_diagnostics
from .priors import Prior, as_prior
from .smc import TemperedSMC, nan_to_neg_inf

__all__ = ["Proposal", "ConditionedEstimator", "ImportanceRefinement", "RefinementResult", "refine",
           "refinement_metrics"]

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


class GaussianMixtureProposal:
    """A Gaussian mixture fitted to draws (scikit-learn's EM, components chosen by BIC), as a :class:`Proposal`.

    After the SMC fallback its particles locate every mode, but the share of particles in each mode carries the
    noise of the few particles that found it; importance sampling with a mixture fitted to them re-estimates the
    modes' masses from the weights, and its Pareto k checks the whole answer. The components' scales are widened
    by ``inflate`` so the proposal's tails are heavier than the posterior's.
    """

    def __init__(self, draws: torch.Tensor, max_components: int = 8, inflate: float = 1.3, seed: int = 0):
        from sklearn.mixture import GaussianMixture

        # fitted on z-scored draws (parameters in different units), mapped back afterwards
        d = draws.double()
        loc, scale = d.mean(0), d.std(0).clamp_min(1e-12)
        z = ((d - loc) / scale).numpy()
        best, best_bic = None, float("inf")
        for k in range(1, int(max_components) + 1):
            gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(z)
            bic = gm.bic(z)
            if bic < best_bic:
                best, best_bic = gm, bic
        self.n_components = int(best.n_components)
        means = loc + scale * torch.as_tensor(best.means_)
        cov = torch.as_tensor(best.covariances_) * (scale[:, None] * scale[None, :]) * float(inflate) ** 2
        self.dist = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=torch.as_tensor(best.weights_)),
            torch.distributions.MultivariateNormal(means, covariance_matrix=cov))
        self.dtype = draws.dtype

    def sample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.dist.sample((int(n),))
        return theta.to(self.dtype), self.dist.log_prob(theta)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        return self.dist.log_prob(theta.double())


def as_proposal(q) -> Proposal:
    if hasattr(q, "sample_and_log_prob") and hasattr(q, "log_prob"):
        return q
    if hasattr(q, "rsample_and_log_prob") and hasattr(q, "log_prob"):
        return _FlowProposal(q)
    raise TypeError(f"refine: a proposal needs sample_and_log_prob(n) and log_prob(theta); got {type(q).__name__}")


@dataclass
class RefinementResult:
    """What :func:`refine` returns.

    draws : Tensor (n_draws, D), from the chosen proposal's importance-resampled Metropolis-Hastings chains, or
        from the tempered SMC when no proposal passed
    method : name of the chosen proposal; ``"<name>+smc"`` when the SMC fallback ran from it, and
        ``"<name>+smc+mixture"`` when importance sampling with a mixture fitted to its particles then passed
    pareto_k, ess : the k-hat and importance ESS (effective draws out of ``n_proposal``) of the proposal whose
        draws are returned (the chosen one's, or the mixture's after the SMC)
    accept_rate : acceptance of the Metropolis-Hastings moves (the SMC's lowest stage when it ran)
    reliable : k-hat below the threshold, or the SMC fallback's own check passed
    candidates : per candidate: ``pareto_k``, ``ess``
    warning : why the result is unreliable, or None
    smc : the fallback's diagnostics (stages, temperatures, acceptance, moves, capped stages, log evidence), or None
    """

    draws: torch.Tensor
    method: str
    pareto_k: float
    ess: float
    accept_rate: float
    reliable: bool
    candidates: dict = field(default_factory=dict)
    warning: str | None = None
    smc: dict | None = None

    def info(self) -> dict:
        """The per-observation record a job keeps (``calibration.json``)."""
        out = dict(refined_with=self.method, refine_pareto_k=self.pareto_k, refine_ess=self.ess,
                   refine_accept_rate=self.accept_rate, refine_reliable=self.reliable,
                   refine_candidates=self.candidates)
        if self.warning:
            out["refine_warning"] = self.warning
        if self.smc is not None:
            out["refine_smc"] = self.smc
        return out


def refinement_metrics(infos: list[dict]) -> dict:
    """A job's metrics from the per-observation :meth:`RefinementResult.info` records.

    ``refine_pareto_k_max`` (which the reliability check reads) covers the observations whose draws came from
    importance sampling (with a candidate, or with the mixture fitted after the SMC fallback); those whose draws
    are the SMC's particles are judged by its own check. ``refine_smc_observations`` lists where the fallback
    ran, ``refine_proposal_pareto_k_worst`` is the worst candidate's k-hat anywhere, and every unreliable
    observation is a ``failed_checks`` entry.
    """
    by_is = [i for i in infos if not i["refined_with"].endswith("+smc")]
    worst = max(c["pareto_k"] for i in infos for c in i["refine_candidates"].values())
    out: dict = {"refine_proposal_pareto_k_worst": float(worst),
                 "refine_smc_observations": [k for k, i in enumerate(infos) if "refine_smc" in i]}
    # NaN where every observation's draws are the SMC's own (no importance step to report)
    out["refine_pareto_k_max"] = float(max(i["refine_pareto_k"] for i in by_is)) if by_is else float("nan")
    out["refine_ess_min"] = float(min(i["refine_ess"] for i in by_is)) if by_is else float("nan")
    failed = [f"refinement_unreliable: observation {k}: {i.get('refine_warning', '')}"
              for k, i in enumerate(infos) if not i["refine_reliable"]]
    if failed:
        out["failed_checks"] = failed
    return out


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
    smc_particles : int
        Particles of the tempered SMC fallback when no proposal passes (0 turns the fallback off: the least bad
        proposal's independence chains are returned, flagged).
    smc_max_moves : int
        Metropolis-Hastings moves per SMC stage at most.
    smc_defensive : float
        Prior fraction of the SMC's start and independence proposal: larger than ``defensive``, since the fallback
        runs where the proposal has missed part of the posterior (half the particles start from the prior, so a
        mode the proposal missed is found as likelihood tempering from the prior would find it).
    seed : int
    """

    def __init__(self, n_proposal: int = 20_000, defensive: float = 0.05, mcmc_steps: int = 20,
                 max_mcmc_steps: int = 200, k_threshold: float = 0.7, batch_size: int = 20_000,
                 smc_particles: int = 10_000, smc_max_moves: int = 60, smc_defensive: float = 0.5,
                 seed: int = 0):
        if not 0 <= defensive < 1:
            raise ValueError(f"ImportanceRefinement: defensive must be in [0, 1), got {defensive}")
        self.n_proposal, self.defensive, self.mcmc_steps = int(n_proposal), float(defensive), int(mcmc_steps)
        self.max_mcmc_steps = max(int(max_mcmc_steps), self.mcmc_steps)
        self.k_threshold, self.batch_size, self.seed = float(k_threshold), int(batch_size), int(seed)
        self.smc_particles, self.smc_max_moves = int(smc_particles), int(smc_max_moves)
        if not 0 < smc_defensive < 1:
            raise ValueError(f"ImportanceRefinement: smc_defensive must be in (0, 1), got {smc_defensive}")
        self.smc_defensive = float(smc_defensive)

    # -- one proposal ---------------------------------------------------------------------------------
    def _mixture_draws(self, q: Proposal, prior: Prior, n: int,
                       a: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws of ``(1 - a) q + a prior`` (``a``: ``defensive`` unless given) and the mixture's log density."""
        a = self.defensive if a is None else float(a)
        n_prior = int(round(a * n))
        theta_q, log_q = q.sample_and_log_prob(n - n_prior)
        if n_prior:
            theta_p = prior.sample(n_prior)
            theta = torch.cat([theta_q, theta_p])
            log_q_all = torch.cat([log_q, q.log_prob(theta_p)])
        else:
            theta, log_q_all = theta_q, log_q
        return theta, self._mix_log_prob(log_q_all, prior.log_prob(theta), a)

    def _mix_log_prob(self, log_q: torch.Tensor, log_p: torch.Tensor, a: float | None = None) -> torch.Tensor:
        a = self.defensive if a is None else float(a)
        if a == 0:
            return log_q
        return torch.logaddexp(log_q + math.log1p(-a), log_p + math.log(a))

    def _log_weights(self, theta: torch.Tensor, log_mix: torch.Tensor, prior: Prior,
                     log_likelihood: Callable) -> torch.Tensor:
        return nan_to_neg_inf(self._log_target(theta, prior, log_likelihood) - log_mix.double())

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

    def _log_target(self, theta: torch.Tensor, prior: Prior, log_likelihood: Callable) -> torch.Tensor:
        """``log p(theta) + log p(x_o | theta)``, the likelihood only evaluated inside the prior's support."""
        lp = prior.log_prob(theta).double()
        inside = torch.isfinite(lp)
        out = torch.full_like(lp, -float("inf"))
        if inside.any():
            th = theta[inside]
            with torch.no_grad():
                ll = torch.cat([log_likelihood(th[s:s + self.batch_size]).double()
                                for s in range(0, len(th), self.batch_size)])
            out[inside] = nan_to_neg_inf(ll) + lp[inside]
        return out

    def tempered_smc(self, q: Proposal, prior: Prior, log_likelihood: Callable, n_draws: int):
        """The fallback: tempered SMC from ``q``'s defensive mixture; ``n_draws`` of its particles and its result."""
        def sample_g(n):
            return self._mixture_draws(q, prior, n, self.smc_defensive)

        def log_g(theta):
            return self._mix_log_prob(q.log_prob(theta), prior.log_prob(theta), self.smc_defensive)

        smc = TemperedSMC(n_particles=max(self.smc_particles, int(n_draws)), max_moves=self.smc_max_moves,
                          seed=self.seed)
        res = smc.run(sample_g, log_g, lambda th: self._log_target(th, prior, log_likelihood))
        gen = torch.Generator().manual_seed(self.seed + 1)
        pick = torch.randperm(len(res.particles), generator=gen)[: int(n_draws)]
        return res.particles[pick], res


def _smc_fallback(opts: ImportanceRefinement, q: Proposal, prior: Prior, log_likelihood: Callable, n_draws: int,
                  method: str, diag: dict, candidates: dict, failed: str) -> RefinementResult:
    """Tempered SMC from ``q``, then importance sampling with a mixture fitted to its particles (see the module
    docstring); ``diag`` is ``q``'s failed importance check, ``failed`` the sentence that says so."""
    draws, res = opts.tempered_smc(q, prior, log_likelihood, n_draws)
    ok = res.betas[-1] >= 1.0 and res.capped == 0
    summary = {"stages": res.stages, "betas": res.betas, "accept_rates": res.accept_rates, "moves": res.moves,
               "capped_stages": res.capped, "log_evidence": res.log_evidence, "particles": len(res.particles)}

    def particles(reliable: bool, warning: str | None = None) -> RefinementResult:
        """The SMC's own particles as the answer (``q``'s failed check kept as the record's k-hat and ESS)."""
        return RefinementResult(draws=draws, method=method, pareto_k=float(diag["pareto_k"]), ess=float(diag["ess"]),
                                accept_rate=res.min_accept, reliable=reliable, candidates=candidates,
                                warning=warning, smc=summary)

    if not ok:
        warning = (f"{failed}; the tempered SMC fallback did not pass its own check (reached temperature "
                   f"{res.betas[-1]:.3f} in {res.stages} stages; {res.capped} stages stopped at "
                   f"{opts.smc_max_moves} moves before 99% of the particles had moved, lowest acceptance "
                   f"{res.min_accept:.3f})")
        log.warning("refinement: %s", warning)
        return particles(reliable=False, warning=warning)
    log.info("refinement: tempered SMC reached the posterior in %d stages, lowest acceptance %.3f", res.stages,
             res.min_accept)
    # the particles' shares of the modes are noisy: a mixture fitted to them, checked by its own Pareto k,
    # re-weights them, and its draws are returned when the check passes (else the particles themselves)
    try:
        gmm = GaussianMixtureProposal(res.particles, seed=opts.seed)
        dg = opts.diagnose(gmm, prior, log_likelihood)
    except (ValueError, RuntimeError) as err:  # a degenerate fit (e.g. a singular covariance)
        log.warning("refinement: no Gaussian mixture could be fitted to the SMC particles (%s); their own draws "
                    "are returned", err)
        return particles(reliable=True)
    summary.update(mixture_components=gmm.n_components, mixture_pareto_k=float(dg["pareto_k"]),
                   mixture_ess=float(dg["ess"]))
    log.info("refinement: mixture of %d Gaussians on the SMC particles: Pareto k %.3f, ESS %.0f",
             gmm.n_components, dg["pareto_k"], dg["ess"])
    if dg["pareto_k"] > opts.k_threshold:
        return particles(reliable=True)
    mixed, rate = opts.resample_and_move(gmm, prior, log_likelihood, dg, n_draws)
    return RefinementResult(draws=mixed, method=f"{method}+mixture", pareto_k=float(dg["pareto_k"]),
                            ess=float(dg["ess"]), accept_rate=rate, reliable=True, candidates=candidates, smc=summary)


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
        candidates = {n: {"pareto_k": float(dd["pareto_k"]), "ess": float(dd["ess"])} for n, (_, dd) in diags.items()}
        failed = (f"no proposal covers the posterior well enough for importance sampling (best: {best}, Pareto k "
                  f"{d['pareto_k']:.2f} > {opts.k_threshold:g}, ESS {d['ess']:.0f})")
        if not reliable and opts.smc_particles > 0:
            log.warning("refinement: %s; falling back to tempered SMC from it", failed)
            return _smc_fallback(opts, q, prior, log_likelihood, n_draws, f"{best}+smc", d, candidates, failed)
        draws, rate = opts.resample_and_move(q, prior, log_likelihood, d, n_draws)
    warning = None
    if not reliable:
        warning = (f"{failed}; the draws come from {opts.last_steps} independence Metropolis-Hastings steps per "
                   f"chain with acceptance {rate:.3f}, {100 * opts.last_moved:.0f}% of the chains moved, and may "
                   "not have mixed")
        log.warning("refinement: %s", warning)
    return RefinementResult(draws=draws, method=best, pareto_k=float(d["pareto_k"]), ess=float(d["ess"]),
                            accept_rate=rate, reliable=bool(reliable), candidates=candidates, warning=warning)
