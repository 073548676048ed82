"""Variational posteriors for :class:`~physppl.models.inverse_ising.InverseIsing`, started at the pseudo-likelihood
optimum.

The negative log pseudo-posterior is convex in (J, h) (a sum of logistic losses plus a Gaussian or Laplace prior),
so its mode is a cheap L-BFGS fit (:func:`pseudo_likelihood_map`), and its Hessian there gives the starting spread:
a guide that starts at the answer only polishes it, instead of spending most of its steps walking there.

* :func:`mean_field_guide`: ``AutoNormal``, independent Gaussians for every J_ij and h_i; each sd starts at
  ``1 / sqrt(H_kk)`` (the mean-field optimum of a Gaussian posterior with precision H).
* :func:`low_rank_guide`: ``AutoLowRankMultivariateNormal``, a joint Gaussian with low-rank plus diagonal
  covariance; marginal sds start at ``sqrt((H^-1)_kk)``.

Both have the model's sites: ``J`` (n_pairs,) in plate "pairs" and ``h`` (N,) in plate "sites".
"""
from __future__ import annotations

import math

import torch
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_median, init_to_value
from pyro.nn import PyroParam

from physppl.inference.map import minimize_lbfgs
from physppl.models.inverse_ising import pseudo_log_likelihood

__all__ = ["pseudo_likelihood_map", "mean_field_guide", "low_rank_guide", "guide_covariance"]

LAPLACE_SMOOTHING = 1e-4  # |J| ~ sqrt(J^2 + eps^2) for L-BFGS: the Laplace prior's kink at 0 is not differentiable


def pseudo_likelihood_map(model, s: torch.Tensor, max_iter: int = 500) -> tuple[dict[str, torch.Tensor], dict]:
    """The mode of the pseudo-posterior, ``argmax log PL(J, h) + log p(J) + log p(h)``, by L-BFGS from J = h = 0
    (float64); returns ``{"J": (n_pairs,), "h": (N,)}`` and the optimiser's info."""
    s = s.double()
    P, N = model.n_pairs, model.n_sites
    pairs = model.pairs

    def objective(theta):
        J, h = theta[:P], theta[P:]
        if model.prior == "laplace":
            log_prior_j = -torch.sqrt(J * J + LAPLACE_SMOOTHING**2).sum() / model.coupling_scale
        else:
            log_prior_j = -0.5 * (J * J).sum() / model.coupling_scale**2
        log_prior_h = -0.5 * (h * h).sum() / model.field_scale**2
        return -(pseudo_log_likelihood(s, J, h, pairs).sum() + log_prior_j + log_prior_h)

    theta, info = minimize_lbfgs(objective, s.new_zeros(P + N), max_iter=max_iter)
    return {"J": theta[:P], "h": theta[P:]}, info


def _flat_init(init_values: dict | None, dtype: torch.dtype) -> dict:
    return {k: torch.as_tensor(v).to(dtype) for k, v in (init_values or {}).items()}


class _InitAutoNormal(AutoNormal):
    """``AutoNormal`` whose per-element scales start at given values."""

    def __init__(self, model, init_sds: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self._init_sds = dict(init_sds or {})

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        for name, sd in self._init_sds.items():
            current = getattr(self.scales, name)
            setattr(self.scales, name, PyroParam(sd.to(current).reshape(current.shape).clamp_min(1e-6),
                                                 self.scale_constraint, self._event_dims[name]))


class _InitAutoLowRank(AutoLowRankMultivariateNormal):
    """``AutoLowRankMultivariateNormal`` whose marginal sds start at given values (site by site, in the model's
    order)."""

    def __init__(self, model, init_sds: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self._init_sds = dict(init_sds or {})

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        if not self._init_sds:
            return
        parts = []
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            n = site["value"].numel()
            sd = self._init_sds.get(name)
            parts.append(sd.reshape(-1).to(self.loc) if sd is not None else self.loc.new_full((n,), self._init_scale))
        marginal = torch.cat(parts).clamp_min(1e-6)
        with torch.no_grad():
            # marginal sd = scale * sqrt(1 + |cov_factor row|^2)
            scale = marginal / (1.0 + self.cov_factor.pow(2).sum(-1)).sqrt()
        self.scale = PyroParam(scale, self.scale_constraint)


def _split(vector: torch.Tensor, model) -> dict[str, torch.Tensor]:
    return {"J": vector[: model.n_pairs], "h": vector[model.n_pairs:]}


def mean_field_guide(model, init_values: dict | None = None, init_hessian: torch.Tensor | None = None,
                     init_scale: float = 0.05) -> AutoNormal:
    """Independent Gaussians for J (plate "pairs") and h (plate "sites").

    ``init_values`` (``{"J", "h"}``, e.g. :func:`pseudo_likelihood_map`) sets the starting means (default the prior
    median, 0); ``init_hessian`` (D, D) in the order ``theta = (J, h)`` sets each starting sd to ``1/sqrt(H_kk)``,
    else ``init_scale``.
    """
    dtype = model._zero.dtype
    values = _flat_init(init_values, dtype)
    sds = {}
    if init_hessian is not None:
        diag = torch.diagonal(torch.as_tensor(init_hessian)).clamp_min(1e-12)
        sds = {k: v.to(dtype) for k, v in _split(diag.rsqrt(), model).items()}
    loc_fn = init_to_value(values=values, fallback=init_to_median) if values else init_to_median
    return _InitAutoNormal(model, init_sds=sds, init_loc_fn=loc_fn, init_scale=float(init_scale))


def low_rank_guide(model, rank: int = 10, init_values: dict | None = None, init_hessian: torch.Tensor | None = None,
                   init_scale: float = 0.05) -> AutoLowRankMultivariateNormal:
    """A joint Gaussian over (J, h) with covariance ``diag(s) (F F^T + I) diag(s)``, F of ``rank`` columns (capped
    at the number of parameters). Starting means from ``init_values``; starting marginal sds ``sqrt((H^-1)_kk)``
    from ``init_hessian`` (order ``theta = (J, h)``), else ``init_scale``."""
    dtype = model._zero.dtype
    values = _flat_init(init_values, dtype)
    sds = {}
    if init_hessian is not None:
        H = torch.as_tensor(init_hessian).double()
        L, info = torch.linalg.cholesky_ex(0.5 * (H + H.T))
        if int(info) == 0:
            var = torch.diagonal(torch.cholesky_solve(torch.eye(H.shape[0], dtype=H.dtype), L))
        else:  # not positive definite: the diagonal's inverse
            var = 1.0 / torch.diagonal(H).clamp_min(1e-12)
        sds = {k: v.sqrt().to(dtype) for k, v in _split(var, model).items()}
    d = model.n_pairs + model.n_sites
    rank = max(1, min(int(rank), d))
    loc_fn = init_to_value(values=values, fallback=init_to_median) if values else init_to_median
    if not math.isfinite(float(init_scale)) or float(init_scale) <= 0:
        raise ValueError(f"low_rank_guide: init_scale must be > 0, got {init_scale}")
    return _InitAutoLowRank(model, init_sds=sds, init_loc_fn=loc_fn, init_scale=float(init_scale), rank=rank)


@torch.no_grad()
def guide_covariance(guide, model) -> torch.Tensor | None:
    """The covariance (D, D) of a Gaussian guide's q(J, h) in the order ``theta = (J, h)`` (float64), for the
    guides of this module (``AutoNormal``, ``AutoLowRankMultivariateNormal``); None for any other guide."""
    if isinstance(guide, AutoNormal):
        sd = torch.cat([getattr(guide.scales, "J").reshape(-1), getattr(guide.scales, "h").reshape(-1)])
        return torch.diag(sd.double().square())
    if isinstance(guide, AutoLowRankMultivariateNormal):
        names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
        if names != ["J", "h"]:
            return None
        return guide.get_posterior().covariance_matrix.double()
    return None
