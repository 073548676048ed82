"""One draw-and-convert path from Pyro to ArviZ InferenceData, for every engine and every problem.

* :func:`guide_draws`: joint draws of a guide's sites in one vectorised call.
* :func:`pointwise_log_likelihood`: ``log p(y_i | draw)`` of every observed point, a chunk of draws per
  vectorised model call.
* :func:`to_inference_data`: a :class:`~physppl.inference.fit.Fit` as InferenceData whose dims are the model's
  plate names (``pyro.plate("refl", ...)`` -> dim ``"refl"``), with ``observed_data`` and ``log_likelihood``, and
  every value in the units of the user's input: a problem that works in normalised units says how to undo that
  (:class:`Rescale` per site), and the converter does it here, once, and records it in the groups' attrs.
* :func:`summarize`: ``az.summary`` with each row's coordinates (Miller index, frame, ...) as columns.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import arviz as az
import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.util import site_is_factor, site_is_subsample

from .fit import Fit, observed_sites

__all__ = ["Rescale", "site_dims", "guide_draws", "pointwise_log_likelihood", "to_inference_data",
           "draws_to_inference_data", "summarize", "joint_log_likelihood", "loo_summary", "UNITS_ATTR"]

log = logging.getLogger(__name__)

UNITS_ATTR = "physppl_rescaled"  # group attribute: JSON {site: {"scale": a, "shift": b}}, user = shift + scale * internal
# pointwise log-likelihood values computed per vectorised model call (draws x observations)
CHUNK_VALUES = 4_000_000


@dataclass(frozen=True)
class Rescale:
    """``value in the user's units = shift + scale * value in the model's units``."""

    scale: float = 1.0
    shift: float = 0.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.shift + self.scale * np.asarray(x)


def _trace(model: Callable, data: dict):
    with torch.no_grad():
        return poutine.trace(model).get_trace(**data)


def _event_dim(site) -> int:
    return int(getattr(site["fn"], "event_dim", 0))


def site_dims(trace) -> dict[str, list[str]]:
    """Dim names of every sample site: plate names for batch dims, ``<site>_dim_k`` otherwise."""
    dims: dict[str, list[str]] = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site_is_factor(site):
            continue
        value = site["value"]
        event_dim = _event_dim(site)
        batch_ndim = value.dim() - event_dim
        by_dim = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
        names = [by_dim.get(d, f"{name}_dim_{k}") for k, d in enumerate(range(-batch_ndim, 0))]
        names += [f"{name}_event_{k}" for k in range(event_dim)]
        dims[name] = names
    return dims


def _max_plate_nesting(trace) -> int:
    dims = [-f.dim for s in trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]
            if f.vectorized and f.dim is not None]
    return max(dims, default=0)


@torch.no_grad()
def guide_draws(guide: Callable, data: dict, n: int, sites: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``n`` joint draws of ``sites`` (default: all of the guide's sample sites) in one vectorised call, each shaped
    (1, n, *site_shape) on the CPU. A guide that cannot run under an extra plate of draws is drawn from one draw at
    a time (logged)."""
    tr = _trace(guide, data)
    shapes = {k: tuple(s["value"].shape) for k, s in tr.nodes.items()
              if s["type"] == "sample" and not site_is_subsample(s)}
    sites = list(sites) if sites else [k for k in shapes if not tr.nodes[k]["infer"].get("is_auxiliary")]
    missing = [s for s in sites if s not in shapes]
    if missing:
        raise ValueError(f"the guide {type(guide).__name__} has no sample site(s) {missing}; its sites: {sorted(shapes)}")
    try:
        samples = Predictive(guide, num_samples=n, parallel=True, return_sites=sites)(**data)
        return {k: samples[k].reshape((1, n) + shapes[k]).detach().cpu() for k in sites}
    except (RuntimeError, ValueError) as err:  # shapes that do not broadcast against a plate of draws
        log.info("guide %s does not vectorise over draws (%s); drawing one at a time", type(guide).__name__, err)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for _ in range(n):
        t = poutine.trace(guide).get_trace(**data)
        for s in sites:
            out[s].append(t.nodes[s]["value"].detach().cpu())
    return {s: torch.stack(v)[None] for s, v in out.items()}


def _device(data: dict) -> torch.device:
    for v in data.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _scored(site, log_prob: torch.Tensor) -> torch.Tensor:
    """A site's log-density as the model counts it: times its scale (``poutine.scale``, e.g. a resolution
    weighting) and zero where it is masked (``poutine.mask``, e.g. a missing measurement)."""
    scale = site.get("scale", 1.0)
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        log_prob = log_prob * scale
    mask = site.get("mask")
    if isinstance(mask, torch.Tensor):
        log_prob = torch.where(mask, log_prob, torch.zeros_like(log_prob))
    elif mask is False:
        log_prob = torch.zeros_like(log_prob)
    return log_prob


def _observed_mask(site) -> np.ndarray | None:
    """Where an observed site is really observed (its mask, broadcast to its batch shape), or None if everywhere."""
    mask = site.get("mask")
    if not isinstance(mask, torch.Tensor):
        return None
    batch = site["fn"].log_prob(site["value"]).shape
    return torch.broadcast_to(mask, batch).cpu().numpy()


@torch.no_grad()
def pointwise_log_likelihood(model: Callable, data: dict, draws: dict[str, torch.Tensor],
                             observed: list[str] | None = None, chunk_values: int = CHUNK_VALUES) -> dict[str, np.ndarray]:
    """``log p(y_i | draw)`` for every observed site and point: arrays (chains, draws, *site_batch_shape).

    The model is conditioned on a chunk of draws at a time inside a plate of draws left of its own plates, so
    one model call scores many draws; the chunk holds at most ``chunk_values`` values. Each term is counted as the
    model counts it: scaled by ``poutine.scale`` and 0 where ``poutine.mask`` hides it.
    """
    tr = _trace(model, data)
    observed = observed or observed_sites(model, data, tr)
    if not observed:
        return {}
    nesting = _max_plate_nesting(tr)
    chains, n = next(iter(draws.values())).shape[:2]
    batch_ndim = {k: tr.nodes[k]["value"].dim() - _event_dim(tr.nodes[k]) for k in draws}
    per_draw = sum(tr.nodes[o]["fn"].log_prob(tr.nodes[o]["value"]).numel() for o in observed)
    chunk = max(1, int(chunk_values // max(per_draw, 1)))
    device = _device(data)
    flat = {k: v.reshape((chains * n,) + tuple(v.shape[2:])) for k, v in draws.items()}
    out: dict[str, list[np.ndarray]] = {o: [] for o in observed}
    for start in range(0, chains * n, chunk):
        part = {k: v[start:start + chunk].to(device) for k, v in flat.items()}
        m = next(iter(part.values())).shape[0]
        cond = {k: v.reshape((m,) + (1,) * (nesting - batch_ndim[k]) + tuple(v.shape[1:])) for k, v in part.items()}
        with pyro.plate("_draws", m, dim=-(nesting + 1)):
            t = poutine.trace(poutine.condition(model, data=cond)).get_trace(**data)
        for o in observed:
            site = t.nodes[o]
            lp = _scored(site, site["fn"].log_prob(site["value"]))
            shape = tuple(tr.nodes[o]["fn"].log_prob(tr.nodes[o]["value"]).shape)
            full = (m,) + (1,) * max(0, nesting - len(shape)) + shape  # the site's shape under the plate of draws
            out[o].append(torch.broadcast_to(lp, full).reshape((m,) + shape).double().cpu().numpy())
    return {o: np.concatenate(v).reshape((chains, n) + v[0].shape[1:]) for o, v in out.items()}


def _units_attr(rescale: dict[str, Rescale], sites) -> str:
    return json.dumps({k: {"scale": float(r.scale), "shift": float(r.shift)} for k, r in rescale.items() if k in sites})


def to_inference_data(
    fit: Fit,
    log_likelihood: bool = True,
    rescale: dict[str, Rescale] | None = None,
    coords: dict[str, np.ndarray] | None = None,
    dim_coords: dict[str, dict[str, np.ndarray]] | None = None,
    dims: dict[str, list[str]] | None = None,
    max_log_likelihood_values: int | None = 50_000_000,
    attrs: dict | None = None,
) -> az.InferenceData:
    """The fit as InferenceData in the user's units.

    Parameters
    ----------
    fit : Fit
        Draws (chains, draws, *shape); its model and full data are traced for dims and observed values, and
        scored per draw for the pointwise log-likelihood (skipped, and logged, beyond
        ``max_log_likelihood_values`` values).
    rescale : dict, optional
        Site -> :class:`Rescale` from the model's units to the user's, for latent and observed sites; the
        log-likelihood of a rescaled observed site gets its Jacobian (``- log|scale|`` per value). Recorded in
        each group's ``attrs["physppl_rescaled"]``.
    coords, dim_coords : dict, optional
        Index values per dim, and extra coordinates per dim, e.g. ``{"refl": {"H": h, ...}}``.
    dims : dict, optional
        Dim names by site, overriding those from the plates.
    """
    rescale = dict(rescale or {})
    data = {k: v for k, v in fit.data.items() if k != "subsample"}
    draws = {k: v.detach().cpu().double().numpy() for k, v in fit.draws.items()}
    obs_data, loglik, site_dim_names, masks = None, None, {}, {}
    if fit.model is not None:
        tr = _trace(fit.model, data)
        site_dim_names = site_dims(tr)
        observed = observed_sites(fit.model, data, tr)
        obs_data = {o: tr.nodes[o]["value"].detach().double().cpu().numpy() for o in observed} or None
        masks = {o: _observed_mask(tr.nodes[o]) for o in observed}
        n_values = fit.n_chains * fit.n_draws * sum(v.size for v in (obs_data or {}).values())
        if log_likelihood and observed:
            if max_log_likelihood_values is None or n_values <= max_log_likelihood_values:
                loglik = pointwise_log_likelihood(fit.model, data, fit.draws, observed)
                for o in observed:
                    if o in rescale:
                        per_point = obs_data[o][0].size if _event_dim(tr.nodes[o]) else 1
                        jacobian = per_point * math.log(abs(rescale[o].scale))
                        loglik[o] = loglik[o] - (jacobian if masks[o] is None else jacobian * masks[o])
            else:
                log.info("posterior.nc without the pointwise log-likelihood: %d values (draws x observations) exceed "
                         "%d", n_values, max_log_likelihood_values)
    for k, r in rescale.items():
        if k in draws:
            draws[k] = r.apply(draws[k])
        if obs_data and k in obs_data:
            obs_data[k] = r.apply(obs_data[k])
    for o, mask in (masks.items() if obs_data else ()):
        if mask is not None:  # a masked point holds a placeholder, not a measurement
            value = obs_data[o]
            obs_data[o] = np.where(mask.reshape(mask.shape + (1,) * (value.ndim - mask.ndim)), value, np.nan)
    all_dims = {**site_dim_names, **(dims or {})}
    all_dims = {k: v for k, v in all_dims.items() if k in draws or (obs_data and k in obs_data)}
    idata = draws_to_inference_data(draws, all_dims, obs_data, loglik, fit.sample_stats, coords, dim_coords)
    note = _units_attr(rescale, set(draws) | set(obs_data or {}))
    for group in idata.groups():
        idata[group].attrs[UNITS_ATTR] = note
        idata[group].attrs.update(attrs or {})
    return idata


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # arviz warns about one-chain shapes for guide draws
        idata = az.from_dict(posterior=posterior, observed_data=observed_data, log_likelihood=log_likelihood,
                             sample_stats=sample_stats, coords=coords, dims=dims)
    for dim, extra in (dim_coords or {}).items():
        groups = [g for g in idata.groups() if dim in idata[g].dims]
        if groups:
            idata.assign_coords({k: (dim, np.asarray(v)) for k, v in extra.items()}, groups=groups, inplace=True)
    return idata


def _labels(var) -> list[str]:
    """ArviZ's row labels: ``name`` for a scalar, ``name[c1, c2]`` by the index values of the site's dims."""
    dims = [d for d in var.dims if d not in ("chain", "draw")]
    if not dims:
        return [var.name]
    index = [np.asarray(var[d].values) for d in dims]
    grids = np.meshgrid(*index, indexing="ij")
    flat = [g.reshape(-1) for g in grids]
    return [f"{var.name}[{', '.join(str(v[i]) for v in flat)}]" for i in range(flat[0].size)]


def _iid_summary(post, hdi_prob: float) -> pd.DataFrame:
    """Mean, sd and HDI of independent draws (one chain from a guide), vectorised over every element.

    For such draws ESS is the number of draws and R-hat is undefined; az.summary would still run its per-element
    diagnostics, ~3 ms an element (25 s for the 8,418 reflections of the built-in merge, measured), so they are
    left out here.
    """
    hdi = az.hdi(post, hdi_prob=hdi_prob)
    low, high = f"hdi_{100 * (1 - hdi_prob) / 2:g}%", f"hdi_{100 * (1 + hdi_prob) / 2:g}%"
    parts = []
    for name in post.data_vars:
        var = post[name]
        values = var.values.reshape(var.shape[0] * var.shape[1], -1)
        bounds = hdi[name].values.reshape(-1, 2)
        parts.append(pd.DataFrame({"mean": values.mean(0), "sd": values.std(0, ddof=1), low: bounds[:, 0],
                                   high: bounds[:, 1]}, index=_labels(var)))
    return pd.concat(parts).round(3)


def summarize(idata: az.InferenceData, var_names: list[str] | None = None, max_vars: int | None = None,
              diagnostics: bool | None = None) -> pd.DataFrame:
    """Posterior summary with each row's coordinates as columns: mean, sd and 90% HDI, and for a sampler's draws
    ``az.summary``'s ESS, MCSE and R-hat (``diagnostics``; by default when the draws come from MCMC, i.e. there is a
    ``sample_stats`` group or more than one chain; a guide's draws are independent).

    Rows are labelled as ArviZ labels them, from the dims' index values (``F[0 0 8]`` for a reflection indexed by its
    Miller index); the non-index coordinates of the row's dims (H, K, L, dHKL, state, ...) follow as columns.
    ``max_vars`` caps very wide posteriors (the first ``max_vars`` entries of each dim).
    """
    post = idata.posterior if var_names is None else idata.posterior[list(var_names)]
    if max_vars is not None:
        post = post.isel({d: slice(0, max_vars) for d in post.dims if d not in ("chain", "draw")})
    if diagnostics is None:
        diagnostics = "sample_stats" in idata.groups() or post.sizes.get("chain", 1) > 1
    if not diagnostics:
        table = _iid_summary(post, 0.9)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            table = az.summary(az.InferenceData(posterior=post), hdi_prob=0.9)
    frames = []
    for name in post.data_vars:
        var = post[name].isel(chain=0, draw=0, drop=True)
        if var.ndim == 0:
            frames.append(pd.DataFrame(index=[0]))
            continue
        frame = var.to_dataframe(name="_v")  # non-index coordinates come along as columns
        frames.append(frame.reset_index().drop(columns=["_v"], errors="ignore"))
    coords = pd.concat(frames, ignore_index=True)
    coords = coords.loc[:, [c for c in coords.columns if c not in ("chain", "draw")]]
    coords.index = table.index
    out = pd.concat([table, coords], axis=1)
    out.index.name = "variable"
    return out


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
