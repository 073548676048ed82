"""``physppl.weigh_frames``: MD frames + observed diffuse (and Bragg) intensities in; frame weights with uncertainty out.

The command line (``physppl +experiment=md_weights``) calls :func:`task`, which calls :func:`weigh_frames` with
the configuration's values.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.inference.convert import Rescale, loo_summary, summarize, to_inference_data
from physppl.inference.fit import Fit, fit as fit_model
from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.io.frames import intensity_dataset, read_weights
from physppl.io.mtz import mtz_writer
from physppl.models.md_weights import FrameWeightsModel, diffuse_intensity

from . import analysis
from .cc_fit import fit_pearson_cc
from .data import MDData, MDWeightsDataSource
from .parts import build_guide, initial_values, resolve_engine, resolve_guide

__all__ = ["weigh_frames", "FrameWeightsResult", "task", "build_model", "inference_data_units", "OUTPUT_FILES"]

log = logging.getLogger(__name__)

# what the runner's reliability warnings should advise, in this problem's options
RELIABILITY_HINTS = {"not_converged": "raise the engine's max_steps (inference.max_steps on the command line)"}

OUTPUT_FILES = ("weights.csv", "states.csv", "diffuse_fit.mtz", "cc_shells.csv", "posterior.nc", "summary.csv",
                "metrics.json", "checkpoint.pt", "losses.csv")
# pointwise log-likelihoods cost draws x voxels; beyond this many values posterior.nc goes without them
MAX_LOG_LIKELIHOOD_VALUES = 20_000_000


@dataclass(repr=False)
class FrameWeightsResult(Result):
    """:class:`~physppl.inference.runner.Result` of frame weighting, with

    Attributes
    ----------
    weights : DataFrame
        ``weights.csv``: per frame the posterior mean, sd and 90% interval of its weight, its state (and the truth
        and the CC objective's weights when known).
    states : DataFrame
        ``states.csv``: per state the mass's posterior and prior, and its contraction (how much the data inform it).
    diffuse_fit : rs.DataSet
        ``diffuse_fit.mtz``: observed and predicted intensities per voxel, in the data's units.
    data : MDData
        The frames and observations as the model saw them (normalised).
    fit : Fit
    """

    weights: pd.DataFrame | None = None
    states: pd.DataFrame | None = None
    diffuse_fit: Any = None
    data: MDData | None = None
    fit: Fit | None = None


def build_model(model: Callable, data: MDData, voxel_weight=None, prior_weights=None) -> torch.nn.Module:
    """The model (a class or factory, e.g. :class:`FrameWeightsModel`) on prepared data."""
    return model(frames=data.frames, shell=data.shell, prior_weights=prior_weights, groups=data.labels,
                 has_sigma=data.sigma is not None, bragg=data.y_bragg is not None,
                 bragg_has_sigma=data.sigma_bragg is not None, voxel_weight=voxel_weight)


def inference_data_units(model, data: MDData) -> dict[str, Rescale]:
    """How each site's normalised value maps to the data's units: ``y = y_shift + y_scale * y_norm``, so the scale
    ``a`` (intensity per unit of the relative prediction) is ``y_scale * a``, the offset ``y_shift + y_scale * b``;
    noise factors on sigmas are unitless, an absolute noise sd is in ``y_scale`` units; Bragg terms likewise with
    ``bragg_scale``."""
    units = {"y": Rescale(data.y_scale, data.y_shift), "scale": Rescale(data.y_scale),
             "offset": Rescale(data.y_scale, data.y_shift), "y_bragg": Rescale(data.bragg_scale),
             "bragg_scale": Rescale(data.bragg_scale)}
    if not getattr(model, "has_sigma", True):
        units["noise"] = Rescale(data.y_scale)
    if not getattr(model, "bragg_has_sigma", True):
        units["bragg_noise"] = Rescale(data.bragg_scale)
    return units


def _state_coordinate(idata, data: MDData):
    state = np.asarray([data.label_names[k] for k in data.labels])
    groups = [g for g in idata.groups() if "frame" in idata[g].dims]
    idata.assign_coords({"state": ("frame", state)}, groups=groups, inplace=True)
    return idata


# streamed frames: voxels of the MAP start (a random sample: stored voxels are shuffled), and of a minibatch when
# the engine has none (about 160 MB of float32 each at 5,000 frames)
WARM_START_VOXELS = 4096
STREAM_BATCH_VOXELS = 4096


def stream_engine(engine, data: MDData):
    """The engine for frames streamed from disk: minibatches of contiguous voxel ranges (one read each); a copy
    when its settings must change."""
    import copy

    if not hasattr(engine, "batch_size"):
        return engine  # an engine that does not minibatch (NUTS) reads through the store at every evaluation
    if engine.batch_size is not None and engine.batch_order == "blocks":
        return engine
    engine = copy.copy(engine)
    if engine.batch_size is None:
        engine.batch_size = min(data.n_voxels, STREAM_BATCH_VOXELS)
        log.info("frames streamed from disk: SVI in minibatches of %d voxels (set inference.batch_size to change)",
                 engine.batch_size)
    engine.batch_order = "blocks"  # a contiguous range of voxels is one read, and a random sample (shuffled store)
    return engine


def weigh_frames(
    frames: str | os.PathLike | MDWeightsDataSource | None = None,
    observed: str | os.PathLike | None = None,
    *,
    model: Callable[..., torch.nn.Module] = FrameWeightsModel,
    guide: Any = "dirichlet",
    engine: Any = "svi",
    warm_start_steps: int = 300,
    warm_start_lr: float = 0.05,
    cc_baseline: bool = True,
    cc_steps: int = 2000,
    cc_lr: float = 0.05,
    n_draws: int = 200,
    log_likelihood: bool = True,
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
    **data_options: Any,
) -> FrameWeightsResult:
    """Posterior over frame weights ``w ~ Dirichlet`` from the diffuse intensity
    ``x'(h) = sum_t w_t |F(h,t)|^2 - |sum_t w_t F(h,t)|^2`` (and the Bragg intensity when given).

    Parameters
    ----------
    frames, observed : path, optional
        The frames (folder of per-frame MTZ, or a stacked .npz/.npy/.h5) and the observed diffuse intensities (MTZ);
        both ``None`` for the built-in simulated example. ``frames`` may also be an :class:`MDWeightsDataSource`.
    model : class or factory
        Called with ``frames, shell, prior_weights, groups, has_sigma, bragg, bragg_has_sigma, voxel_weight``
        (:class:`~physppl.models.md_weights.FrameWeightsModel`, or ``functools.partial`` of it with other options).
    guide : str or factory
        ``"dirichlet"`` (nested by state) or ``"logistic_normal"``, or a factory ``guide(model, **kw)``.
    engine : str or engine
        ``"svi"`` (default), ``"nuts"`` (exact, small problems) or an engine object.
    warm_start_steps, warm_start_lr
        MAP fit that starts the guide (and the NUTS chains); 0 skips it for the guide.
    cc_baseline, cc_steps, cc_lr
        Also fit the original prototype's objective (-CC with softmax weights, Adam) for comparison.
    n_draws, log_likelihood
        Posterior draws kept, and the pointwise log-likelihood per voxel in ``posterior.nc``.
    **data_options
        Options of :class:`~physppl.md_weights.data.MDWeightsDataSource` (``bragg``, ``labels``, ``prior_weights``,
        ``dmin``, ``n_shells``, ``simulate``, ...).
    """
    if isinstance(frames, MDWeightsDataSource):
        if observed is not None or data_options:
            raise TypeError("weigh_frames: frames is a MDWeightsDataSource; set its options on it")
        source = frames
    else:
        source = MDWeightsDataSource(frames=None if frames is None else str(frames),
                                     observed=None if observed is None else str(observed), **data_options)
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    with Job("md_weights", settings, inputs=[*source.inputs, source.prior_weights], workdir=workdir,
             outputs=OUTPUT_FILES, hints=RELIABILITY_HINTS) as job:
        loaded = source.load()
        truth = loaded[-1]
        data = source.prepare(*loaded)
        data.to(job.device)
        prior_w = read_weights(source.prior_weights, data.n_frames) if source.prior_weights else None
        log.info("data: %d frames, %d voxels (%d P1 rows), %d states/clusters, Bragg %s; %s", data.n_frames,
                 data.n_voxels, data.info["n_frame_rows_used"], len(data.label_names), data.y_bragg is not None,
                 source.frames or "simulated example")
        net = build_model(model, data, source.voxel_weight(data), prior_w).to(job.device)
        engine = resolve_engine(engine)
        streamed = callable(getattr(data.frames, "prefetch", None))
        if streamed:
            engine = stream_engine(engine, data)
            if cc_baseline or log_likelihood:
                log.info("frames streamed from %s: the prototype's CC fit and the pointwise log-likelihood (each a "
                         "full pass per step or per draw) are skipped", source.frames)
            cc_baseline = log_likelihood = False
        kwargs = data.model_kwargs()
        needs_guide = bool(getattr(engine, "needs_guide", True))
        # a MAP start for the guide, and for a sampler's chains (the noise factors make modes); with streamed
        # frames on a fixed sample of voxels, read once
        warm = torch.arange(min(data.n_voxels, WARM_START_VOXELS)) if streamed else None
        init = initial_values(net, kwargs, warm_start_steps, warm_start_lr, warm) if warm_start_steps > 0 else None
        guide = build_guide(resolve_guide(guide), net, data.labels, init) if needs_guide else None
        n_data = data.n_voxels if getattr(engine, "batch_size", None) is not None else None
        fit = fit_model(net, guide, kwargs, engine, n_draws=n_draws, n_data=n_data, workdir=workdir, init=init)
        return _finish(job, source, data, net, fit, truth, cc_baseline, cc_steps, cc_lr, log_likelihood)


def _finish(job: Job, source, data: MDData, model, fit: Fit, truth, cc_baseline, cc_steps, cc_lr,
            log_likelihood) -> FrameWeightsResult:
    w = fit.flat("w").double().numpy()
    prior = model.state_mass_prior(data.labels, len(data.label_names))
    cc = fit_pearson_cc(data.frames, data.y, steps=cc_steps, lr=cc_lr, weight=model.voxel_weight) if cc_baseline else None
    true_w = truth.get("weights") if truth else None
    true_m = np.asarray(truth["state_masses"]) if truth and len(truth["state_masses"]) == len(data.label_names) else None
    frames_tab = analysis.frame_table(w, data.labels, data.label_names, true_w, None if cc is None else cc.weights)
    states_tab = analysis.state_table(w, data.labels, data.label_names, prior, true_m, None if cc is None else cc.weights)
    print(states_tab.to_string(index=False))

    draws_flat = {k: fit.flat(k).numpy() for k in fit.draws}
    pred = analysis.predicted_intensities(data, model, draws_flat)
    y = analysis.observed(data)
    quality, shells = analysis.fit_quality(data, pred["pred_mean"])
    shell_tables = {"likelihood (posterior mean)": shells}
    metrics: dict = {"n_frames": data.n_frames, "n_voxels": data.n_voxels, "n_states": len(data.label_names),
                     "bragg": data.y_bragg is not None, **{k: v for k, v in data.info.items() if k != "normalisation"},
                     **fit.info, **quality, **analysis.effective_frames_summary(w),
                     **{f"norm_{k}": v for k, v in data.info["normalisation"].items()}}
    metrics.update(_compression_error(data, w.mean(0)))
    stats = getattr(data.frames, "stats", None)
    if stats is not None:  # frames streamed from disk: what the whole job read, and how long it waited for it
        metrics.update({f"stream_{k}": v for k, v in stats.as_dict().items()})
    metrics["state_mass_mean"] = dict(zip(data.label_names, states_tab["mean"]))
    metrics["state_mass_sd"] = dict(zip(data.label_names, states_tab["sd"]))
    metrics["min_contraction"] = float(states_tab["contraction"].min())
    unidentified = states_tab.loc[states_tab["contraction"] < 0.5, "state"].tolist()
    metrics["unidentified_states"] = unidentified
    # the job runner warns about them (posterior variance > half the prior's: see states.csv, contraction)
    metrics.update(analysis.weight_errors(w.mean(0), data.labels, truth))
    if truth:
        metrics["true_state_mass"] = dict(zip(truth["state_names"], truth["state_masses"]))
    sigma_obs = (data.sigma.double().cpu().numpy() * data.y_scale) if data.sigma is not None else np.full_like(y, np.nan)
    columns = {"IOBS": (y, "Intensity"), "SIGIOBS": (sigma_obs, "Stddev"), "IPRED": (pred["pred_mean"], "Intensity"),
               "SIGIPRED": (pred["pred_sd"], "Stddev"), "XPRED": (pred["x_mean"], "Intensity")}
    if cc is not None:
        with torch.no_grad():
            x_cc = diffuse_intensity(torch.as_tensor(cc.weights, dtype=data.y.dtype, device=job.device),
                                     data.frames.block()).double().cpu().numpy()
        cc_quality, cc_shells = analysis.fit_quality(data, x_cc)
        shell_tables["CC objective (prototype)"] = cc_shells
        metrics.update({"cc_fit_cc": cc_quality["cc"], "cc_fit_steps": cc.steps, "cc_fit_time": cc.wall_time,
                        "cc_fit_n_eff": float(1.0 / np.square(cc.weights).sum())})
        metrics.update(analysis.weight_errors(cc.weights, data.labels, truth, prefix="cc_fit_"))
        columns["XCCFIT"] = (x_cc * data.x_scale, "Intensity")
    if "bragg_mean" in pred:
        columns["IBRAGGPRED"] = (pred["bragg_mean"], "Intensity")
    diffuse_fit = intensity_dataset(data.hkl, columns, data.cell, data.spacegroup)
    shell_csv = pd.concat([t.assign(method=k) for k, t in shell_tables.items()])

    coords = {"frame": np.arange(data.n_frames), "shell": np.arange(data.n_shells), "voxel": np.arange(data.n_voxels)}
    extra = {"voxel": {"H": data.hkl[:, 0], "K": data.hkl[:, 1], "L": data.hkl[:, 2], "dHKL": data.dhkl}}
    idata = to_inference_data(fit, log_likelihood=log_likelihood, rescale=inference_data_units(model, data),
                              coords=coords, dim_coords=extra, dims={"w": ["frame"], "noise": ["shell"]},
                              max_log_likelihood_values=MAX_LOG_LIKELIHOOD_VALUES,
                              attrs={"units": "scale, offset, noise sd and y in the observed data's intensity units"})
    idata = _state_coordinate(idata, data)
    summary = summarize(idata)
    metrics.update(loo_summary(idata))  # held-out fit per voxel: the objective for tuning by a sweeper
    if fit.info.get("engine") == "nuts":
        ws = summary.loc[summary.index.str.startswith("w[")]
        metrics.update({"max_rhat_w": float(ws["r_hat"].max()), "min_ess_bulk_w": float(ws["ess_bulk"].min())})

    files = {"weights.csv": lambda p: frames_tab.to_csv(p, index=False),
             "states.csv": lambda p: states_tab.to_csv(p, index=False),
             "diffuse_fit.mtz": mtz_writer(diffuse_fit),
             "cc_shells.csv": lambda p: shell_csv.to_csv(p, index=False)}

    def figures(out: Path) -> None:
        from . import plots  # matplotlib only when figures are drawn

        plots.plot_weights(frames_tab, out / "weights.png")
        plots.plot_states(states_tab, out / "states.png")
        edges_d = 1.0 / np.sqrt(data.shell_edges)
        plots.plot_fit_by_shell(y, pred["pred_mean"], data.shell.cpu().numpy(), edges_d, out / "fit_by_shell.png")
        plots.plot_cc_shells(shell_tables, out / "cc_shells.png")

    return job.result(FrameWeightsResult, idata=idata, metrics=metrics, losses=fit.losses, summary=summary,
                      files=files, figures=figures, weights=frames_tab, states=states_tab, diffuse_fit=diffuse_fit,
                      data=data, fit=fit)


# a mean x' error of the compressed frames above this fraction of the mean x' is flagged as unreliable
LOW_RANK_ERROR_WARN = 0.05


def _compression_error(data: MDData, w_mean: np.ndarray) -> dict:
    """For frames compressed over frames, at the posterior mean weights: the exact x' error (one pass over the
    store) and the bound that holds for any weights, each relative to the mean x'."""
    if not callable(getattr(data.frames, "error_bound", None)):
        return {}
    with torch.no_grad():
        w = torch.as_tensor(w_mean, dtype=data.y.dtype)
        bound = data.frames.error_bound(w).double()
        x = torch.cat([diffuse_intensity(w, data.frames.block(idx)).double()
                       for idx in torch.arange(data.n_voxels).split(65536)])
        measured = data.frames.measured_error(w)
    scale = float(x.abs().mean())
    out = {"low_rank_x_error_bound_mean_rel": float(bound.mean()) / scale,
           "low_rank_x_error_bound_max_rel": float(bound.max()) / scale}
    if measured is not None:
        out.update({"low_rank_x_error_mean_rel": float(measured.mean()) / scale,
                    "low_rank_x_error_max_rel": float(measured.max()) / scale})
    error = out.get("low_rank_x_error_mean_rel", out["low_rank_x_error_bound_mean_rel"])
    if error > LOW_RANK_ERROR_WARN:  # the job runner warns about failed checks
        out["failed_checks"] = [
            f"low_rank_error: the rank-{data.frames.rank} compression of the frames changes x' by {100 * error:.1f}% "
            "of its mean on average (at the posterior mean weights); raise data.low_rank, or fit exactly "
            "(data.low_rank=null)"]
    return out


def task(cfg: DictConfig, workdir: str | os.PathLike) -> FrameWeightsResult:
    """The command line's frame-weighting job: :func:`weigh_frames` with the configuration's values."""
    return weigh_frames(instantiate(cfg.data), model=instantiate(cfg.model), guide=instantiate(cfg.guide),
                        engine=instantiate(cfg.inference), workdir=workdir,
                        **config_options(cfg, weigh_frames, exclude=("model", "guide", "engine")))
