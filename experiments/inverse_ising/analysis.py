"""What the inferred couplings say against the truth: errors, interval coverage, the recovered interaction graph,
and the exact-likelihood comparison (what the pseudo-likelihood costs)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from physppl.inference.map import minimize_lbfgs
from physppl.models.inverse_ising import (coupling_matrix, is_lattice_bond, log_likelihood_exact, log_partition,
                                          pairs_labels)

__all__ = ["EXACT_CHECK_MAX_SITES", "COVERAGE_FLOOR", "pair_values", "coupling_table", "interval_metrics",
           "exact_likelihood_map", "exact_check"]

EXACT_CHECK_MAX_SITES = 16  # 2^16 states per evaluation of Z: an exact MAP in seconds
# 90% intervals covering fewer of the true couplings than this are flagged (the binomial sd of the coverage of
# 100 independent pairs is 0.03; the pairs of one data set are correlated, so the floor is lenient)
COVERAGE_FLOOR = 0.75
LEVEL = 0.90


def pair_values(matrix: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Entries ``matrix[i, j]`` of each pair (n_pairs,)."""
    p = np.asarray(pairs)
    return np.asarray(matrix)[p[:, 0], p[:, 1]]


def _quantiles(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
    return lo, hi


def coupling_table(pairs: np.ndarray, draws: np.ndarray, mode: np.ndarray, draws_unadjusted: np.ndarray | None,
                   truth: np.ndarray | None, lattice_side: int | None) -> pd.DataFrame:
    """``couplings.csv``: per pair its label, i, j, posterior mean, sd, 5% and 95% quantiles, the pseudo-likelihood
    MAP, the unadjusted sd, whether the 90% interval excludes 0, whether it is a lattice bond, and the truth."""
    p = np.asarray(pairs)
    lo, hi = _quantiles(draws)
    table = pd.DataFrame({"pair": pairs_labels(p), "i": p[:, 0], "j": p[:, 1], "mean": draws.mean(0),
                          "sd": draws.std(0, ddof=1), "q05": lo, "q95": hi, "map": mode})
    if draws_unadjusted is not None:
        table["sd_unadjusted"] = draws_unadjusted.std(0, ddof=1)
    table["nonzero"] = (lo > 0) | (hi < 0)
    table["is_lattice_bond"] = is_lattice_bond(p, lattice_side)
    if truth is not None:
        table["true"] = truth
    return table


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2))) if a.size else float("nan")


def _coverage(draws: np.ndarray, truth: np.ndarray) -> float:
    if truth.size == 0:
        return float("nan")
    lo, hi = _quantiles(draws)
    return float(np.mean((truth >= lo) & (truth <= hi)))


def interval_metrics(draws_J: np.ndarray, true_J: np.ndarray, nn: np.ndarray, draws_J_unadjusted: np.ndarray | None,
                     draws_h: np.ndarray | None = None, true_h: np.ndarray | None = None) -> dict:
    """Posterior-mean errors, 90% coverage (all pairs, lattice bonds, the rest; adjusted and unadjusted) and the
    interaction graph's precision and recall, where a pair is called non-zero when its 90% interval excludes 0."""
    mean = draws_J.mean(0)
    out = {"coupling_rmse": _rmse(mean, true_J), "coupling_max_error": float(np.max(np.abs(mean - true_J))),
           "coverage_90": _coverage(draws_J, true_J), "interval_width_90": float(np.mean(np.subtract(
               *_quantiles(draws_J)[::-1])))}
    if nn.any():
        out.update(coupling_rmse_nn=_rmse(mean[nn], true_J[nn]), coupling_rmse_other=_rmse(mean[~nn], true_J[~nn]),
                   coupling_mean_nn=float(mean[nn].mean()), coverage_90_nn=_coverage(draws_J[:, nn], true_J[nn]),
                   coverage_90_other=_coverage(draws_J[:, ~nn], true_J[~nn]))
    if draws_J_unadjusted is not None:
        out["coverage_90_unadjusted"] = _coverage(draws_J_unadjusted, true_J)
        if nn.any():
            out["coverage_90_nn_unadjusted"] = _coverage(draws_J_unadjusted[:, nn], true_J[nn])
    lo, hi = _quantiles(draws_J)
    called = (lo > 0) | (hi < 0)
    real = np.abs(true_J) > 1e-12
    tp = int(np.sum(called & real))
    out.update(graph_called=int(called.sum()), graph_true=int(real.sum()),
               graph_precision=tp / int(called.sum()) if called.any() else float("nan"),
               graph_recall=tp / int(real.sum()) if real.any() else float("nan"))
    if draws_h is not None and true_h is not None:
        out.update(field_rmse=_rmse(draws_h.mean(0), true_h), coverage_90_field=_coverage(draws_h, true_h))
    return out


def exact_likelihood_map(model, s: torch.Tensor, start: dict[str, torch.Tensor] | None = None,
                         max_iter: int = 200) -> tuple[dict[str, torch.Tensor], dict]:
    """The mode of the exact posterior, ``argmax log p(s | J, h) + log p(J, h)``, with Z by enumeration (N <= 16
    here): the log-likelihood needs only the sufficient statistics ``sum_n s_i s_j`` and ``sum_n s_i``."""
    s = s.double()
    n, N = s.shape
    P = model.n_pairs
    pairs = model.pairs
    second = pair_values((s.T @ s).numpy(), pairs.numpy())
    second, first = torch.as_tensor(second), s.sum(0)
    laplace = model.prior == "laplace"

    def objective(theta):
        J, h = theta[:P], theta[P:]
        log_lik = J @ second + h @ first - n * log_partition(J, h, pairs)
        log_prior_j = (-torch.sqrt(J * J + 1e-8).sum() / model.coupling_scale if laplace
                       else -0.5 * (J * J).sum() / model.coupling_scale**2)
        return -(log_lik + log_prior_j - 0.5 * (h * h).sum() / model.field_scale**2)

    x0 = s.new_zeros(P + N) if start is None else torch.cat([start["J"], start["h"]]).double()
    theta, info = minimize_lbfgs(objective, x0, max_iter=max_iter)
    return {"J": theta[:P], "h": theta[P:]}, info


def exact_check(model, s: torch.Tensor, pl_map: dict[str, torch.Tensor], posterior_mean: dict[str, np.ndarray],
                true_J: np.ndarray | None, true_h: np.ndarray | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The exact-likelihood MAP against the pseudo-likelihood's: their coupling errors (against the truth when
    known), how far apart they are, and the exact mean log-likelihood per sample at each (nats)."""
    exact, info = exact_likelihood_map(model, s, start=pl_map)
    pairs = model.pairs

    def mean_ll(J, h) -> float:
        return float(log_likelihood_exact(s, torch.as_tensor(J).double(), torch.as_tensor(h).double(), pairs).mean())

    ll_exact = mean_ll(exact["J"], exact["h"])
    ll_pl = mean_ll(pl_map["J"], pl_map["h"])
    out = {"exact_map_converged": info["converged"],
           "exact_vs_pl_map_coupling_rmse": _rmse(exact["J"].numpy(), pl_map["J"].numpy()),
           "exact_loglik_at_exact_map": ll_exact, "exact_loglik_at_pl_map": ll_pl,
           "exact_loglik_at_posterior_mean": mean_ll(posterior_mean["J"], posterior_mean["h"]),
           # nats per sample the pseudo-likelihood's estimate gives up on the data's exact likelihood
           "pl_cost_nats_per_sample": ll_exact - ll_pl}
    if true_J is not None:
        out.update(exact_map_coupling_rmse=_rmse(exact["J"].numpy(), true_J),
                   pl_map_coupling_rmse=_rmse(pl_map["J"].numpy(), true_J))
        if true_h is not None:
            out["exact_loglik_at_truth"] = mean_ll(true_J, true_h)
    return out, exact


def posterior_matrix(draws_J: np.ndarray, pairs: np.ndarray, n_sites: int) -> np.ndarray:
    """Posterior-mean coupling matrix (N, N)."""
    return coupling_matrix(torch.as_tensor(draws_J.mean(0)), torch.as_tensor(pairs), n_sites).numpy()
