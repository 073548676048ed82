"""One converter from Pyro draws (NUTS or a guide) to ArviZ InferenceData with named dims.

Dims come from the model's plates (``pyro.plate("refl", ...)`` -> dim ``"refl"``), so ``az.summary``,
``az.plot_posterior`` and ``az.loo`` work the same on every engine's output.
"""
from __future__ import annotations

import logging
from typing import Callable

import arviz as az
import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample

__all__ = ["site_dims", "draw_from_guide", "to_inference_data", "draws_to_inference_data", "summarize",
           "joint_log_likelihood", "loo_summary"]


def _trace(model: Callable, model_kwargs: dict):
    with torch.no_grad():
        return poutine.trace(model).get_trace(**model_kwargs)


def site_dims(trace) -> dict[str, list[str]]:
    """Dim names of every sample site: plate names for batch dims, ``<site>_dim_k`` otherwise."""
    dims: dict[str, list[str]] = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
            continue  # plates record their subsample indices as sample sites
        value = site["value"]
        event_dim = site["fn"].event_dim if hasattr(site["fn"], "event_dim") else 0
        batch_ndim = value.dim() - event_dim
        by_dim = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
        names = [by_dim.get(d, f"{name}_dim_{k}") for k, d in enumerate(range(-batch_ndim, 0))]
        names += [f"{name}_event_{k}" for k in range(event_dim)]
        dims[name] = names
    return dims


def draw_from_guide(guide: Callable, model_kwargs: dict, num_draws: int, sites: list[str]) -> dict[str, torch.Tensor]:
    """``num_draws`` joint draws of ``sites`` from the guide, shaped (1, num_draws, *site_shape)."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    with torch.no_grad():
        for _ in range(num_draws):
            tr = poutine.trace(guide).get_trace(**model_kwargs)
            for s in sites:
                out[s].append(tr.nodes[s]["value"].detach())
    return {s: torch.stack(v)[None] for s, v in out.items()}


def _pointwise_log_lik(model: Callable, model_kwargs: dict, draws: dict[str, torch.Tensor], observed: list[str]):
    chains, n = next(iter(draws.values())).shape[:2]
    result = {o: [] for o in observed}
    with torch.no_grad():
        for c in range(chains):
            rows = {o: [] for o in observed}
            for d in range(n):
                cond = poutine.condition(model, data={k: v[c, d] for k, v in draws.items()})
                tr = poutine.trace(cond).get_trace(**model_kwargs)
                for o in observed:
                    rows[o].append(tr.nodes[o]["fn"].log_prob(tr.nodes[o]["value"]))
            for o in observed:
                result[o].append(torch.stack(rows[o]))
    return {o: torch.stack(v).cpu().numpy() for o, v in result.items()}


def to_inference_data(
    model: Callable,
    model_kwargs: dict,
    draws: dict[str, torch.Tensor],
    log_likelihood: bool = True,
    sample_stats: dict[str, np.ndarray] | None = None,
    coords: dict[str, np.ndarray] | None = None,
    dim_coords: dict[str, dict[str, np.ndarray]] | None = None,
) -> az.InferenceData:
    """Build InferenceData from draws shaped (chains, draws, *site_shape).

    Parameters
    ----------
    model, model_kwargs
        The model and its full-data keyword arguments (no subsampling): traced once for dims and observed
        values, and once per draw for pointwise log-likelihoods.
    draws : dict
        Latent site -> Tensor (chains, draws, *shape), from NUTS or :func:`draw_from_guide`.
    sample_stats : dict, optional
        e.g. ``{"diverging": (chains, draws) bool}`` from NUTS.
    coords, dim_coords : dict, optional
        Index values per dim, and extra (non-index) coordinates per dim, e.g. ``{"refl": {"H": h, ...}}``.
    """
    kwargs = {k: v for k, v in model_kwargs.items() if k != "subsample"}
    tr = _trace(model, kwargs)
    dims = site_dims(tr)
    # observed data sites; pyro.factor sites (Unit distributions) are priors/penalties, not data
    observed = [n for n, s in tr.nodes.items() if s["type"] == "sample" and s["is_observed"]
                and not isinstance(s["fn"], pyro.distributions.Unit)]
    obs_data = {o: tr.nodes[o]["value"].detach().cpu().numpy() for o in observed}
    loglik = _pointwise_log_lik(model, kwargs, draws, observed) if (log_likelihood and observed) else None
    dims = {k: v for k, v in dims.items() if k in draws or k in obs_data}
    return draws_to_inference_data(draws, dims, obs_data or None, loglik, sample_stats, coords, dim_coords)


def draws_to_inference_data(
    draws: dict[str, torch.Tensor | np.ndarray],
    dims: dict[str, list[str]],
    observed_data: dict[str, np.ndarray] | None = None,
    log_likelihood: dict[str, np.ndarray] | None = None,
    sample_stats: dict[str, np.ndarray] | None = None,
    coords: dict[str, np.ndarray] | None = None,
    dim_coords: dict[str, dict[str, np.ndarray]] | None = None,
) -> az.InferenceData:
    """InferenceData from draws (chains, draws, *shape) with named dims; also for estimators without a model."""
    posterior = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in draws.items()}
    idata = az.from_dict(posterior=posterior, observed_data=observed_data, log_likelihood=log_likelihood,
                         sample_stats=sample_stats, coords=coords, dims=dims)
    for dim, extra in (dim_coords or {}).items():
        for group in idata.groups():
            ds = idata[group]
            if dim in ds.dims:
                idata[group] = ds.assign_coords({k: (dim, np.asarray(v)) for k, v in extra.items()})
    return idata


def summarize(idata: az.InferenceData, var_names: list[str] | None = None, max_vars: int | None = None):
    """``az.summary`` (mean, sd, HDI, ESS, R-hat) as a DataFrame; ``max_vars`` caps very wide posteriors."""
    if max_vars is not None:
        post = idata.posterior
        sel = {d: slice(0, max_vars) for d in post.dims if d not in ("chain", "draw")}
        idata = az.InferenceData(posterior=post.isel(sel))
    # Draws from a guide come as one chain: R-hat is then undefined (NaN) and ArviZ logs a shape warning per call.
    quiet = idata.posterior.sizes.get("chain", 1) == 1
    # arviz 0.23 logs through its own Logger("arviz") instance, not the registry's logging.getLogger("arviz")
    logger = getattr(az, "_log", None) or logging.getLogger("arviz")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        return az.summary(idata, var_names=var_names, hdi_prob=0.9)
    finally:
        logger.setLevel(level)


def joint_log_likelihood(idata: az.InferenceData):
    """The ``log_likelihood`` group in float64, with observed sites that share their points (e.g. diffuse and Bragg
    intensity per voxel) summed into one variable named ``"a+b"``, so PSIS-LOO leaves out a point, not a site.

    Float64 because ArviZ's PSIS in float32 turned a heavy-tailed point into NaN on 34k merging observations.
    Sites on different points are returned as they are (LOO then takes one site by name).
    """
    ll = idata.log_likelihood.astype("float64")
    names = list(ll.data_vars)
    if len(names) > 1 and len({ll[n].dims for n in names}) == 1:
        joint = "+".join(names)
        ll = ll.assign({joint: sum(ll[n] for n in names)})[[joint]]
    return ll


def loo_summary(idata: az.InferenceData) -> dict:
    """PSIS-LOO of the (joint) pointwise log-likelihood: a held-out figure for sweeps, with its Pareto-k check."""
    import warnings

    if "log_likelihood" not in idata.groups():
        return {}
    ll = joint_log_likelihood(idata)
    copy = az.InferenceData(posterior=idata.posterior, log_likelihood=ll)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Pareto k figures below say what the warning would
        est = az.loo(copy, var_name=list(ll.data_vars)[0], pointwise=True)
    k = np.asarray(est.pareto_k)
    return {"elpd_loo": float(est.elpd_loo), "elpd_loo_se": float(est.se), "p_loo": float(est.p_loo),
            "loo_pareto_k_max": float(np.nanmax(k)), "loo_pareto_k_above_0.7": float(np.mean(k > 0.7))}
