"""Reliability checks on a job's metrics: each diagnostic that says a result should not be trusted becomes a
WARNING in the log and an entry of ``metrics["warnings"]`` (``metrics["reliable"]`` is False when there is any).

The rules read only generic metric names, so they apply to every problem that reports them:

- ``divergences`` > 0 (NUTS divergent transitions)
- ``r_hat_max`` or ``max_rhat*`` > 1.01 (chains disagree)
- ``converged`` False while ``stop_reason`` says a step or epoch budget ended the fit
- ``loo_pareto_k_above_0.7`` > 0 (PSIS-LOO: some points' importance weights have infinite variance)
- any ``*pareto_k_max`` other than LOO's above 0.7 (an importance-sampling check failed)
- ``unidentified_*`` a non-empty list (quantities the data do not inform)
- ``failed_checks`` a non-empty list of ``"name: sentence"`` (a problem's own checks, e.g. coverage of a known truth)
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

__all__ = ["PARETO_K_LIMIT", "R_HAT_LIMIT", "reliability_warnings", "flag_unreliable"]

log = logging.getLogger(__name__)

PARETO_K_LIMIT = 0.7  # Vehtari et al. (2024): above it the importance estimate is unreliable
R_HAT_LIMIT = 1.01


def reliability_warnings(metrics: dict[str, Any]) -> list[str]:
    """One sentence per failed diagnostic in ``metrics`` (empty when every reported diagnostic passes)."""
    out: list[str] = []
    div = metrics.get("divergences")
    if isinstance(div, (int, float)) and div > 0:
        out.append(f"divergences: NUTS had {int(div)} divergent transitions; the draws may be biased")
    for key in [k for k in metrics if k in ("r_hat_max", "max_rhat") or k.startswith("max_rhat_")]:
        rhat = metrics[key]
        if isinstance(rhat, (int, float)) and rhat > R_HAT_LIMIT:
            out.append(f"{key}: {rhat:.3f} > {R_HAT_LIMIT} (the chains disagree; run longer)")
    reason = str(metrics.get("stop_reason", ""))
    if metrics.get("converged") is False and "budget" in reason:
        out.append(f"not_converged: {reason} before the loss met the convergence test")
    share = metrics.get("loo_pareto_k_above_0.7")
    if isinstance(share, (int, float)) and share > 0:
        out.append(f"loo_pareto_k: {100 * share:.2g}% of points have Pareto k > {PARETO_K_LIMIT} "
                   f"(max {metrics.get('loo_pareto_k_max', float('nan')):.2f}); elpd_loo is approximate for them")
    for key, value in metrics.items():
        if (key.endswith("pareto_k_max") and not key.startswith("loo_") and isinstance(value, (int, float))
                and value > PARETO_K_LIMIT):
            out.append(f"{key}: {value:.2f} > {PARETO_K_LIMIT} (the importance check failed; do not trust that fit)")
        if key.startswith("unidentified") and isinstance(value, (list, tuple)) and value:
            out.append(f"{key}: {', '.join(map(str, value))} (the data barely inform them: their "
                       "posterior stays near the prior)")
    checks = metrics.get("failed_checks")
    if isinstance(checks, (list, tuple)):
        out.extend(str(c) for c in checks)
    return out


def flag_unreliable(metrics: dict[str, Any], hints: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``metrics`` with ``warnings`` and ``reliable`` set from :func:`reliability_warnings`; each warning logged.
    ``hints`` adds advice to the warnings it names by their first word (e.g. ``{"not_converged": "raise
    training.epochs"}``: the problem knows which option sets its budget)."""
    found = reliability_warnings(metrics)
    hints = dict(hints or {})
    found = [f"{w}; {hints[w.split(':')[0]]}" if w.split(":")[0] in hints else w for w in found]
    for message in found:
        log.warning("unreliable result: %s", message)
    return {**metrics, "reliable": not found, "warnings": found}
