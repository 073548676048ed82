"""The frame-weighting job: frames + observed diffuse (and Bragg) intensities in; weights with uncertainty out.

Called by the ``physppl`` app as ``run(cfg, output_dir)`` (``physppl +experiment=md_weights``); returns the
headline metrics. Writes ``weights.csv``, ``states.csv``, ``diffuse_fit.mtz``, ``cc_shells.csv``,
``posterior.nc``, ``summary.csv`` and plots into the run directory.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pyro import poutine
from pyro.infer import Predictive

from physppl.experiments.merging.plots import plot_loss
from physppl.guides.md_weights import map_initial_values
from physppl.inference.convert import draws_to_inference_data, loo_summary, summarize
from physppl.inference.device import resolve_device
from physppl.inference.io.frames import read_weights, write_intensity_mtz
from physppl.inference.nuts import NUTSEngine
from physppl.inference.outputs import atomic_write, protect_inputs, write_losses
from physppl.inference.svi import SVIEngine

from . import analysis, plots
from .cc_fit import fit_pearson_cc
from .data import MDData

__all__ = ["run", "fit", "WeightsFit", "OUTPUT_FILES", "LATENTS"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("weights.csv", "states.csv", "diffuse_fit.mtz", "cc_shells.csv", "posterior.nc", "summary.csv",
                "metrics.json", "checkpoint.pt", "losses.csv")
LATENTS = ("w", "scale", "offset", "noise", "bragg_scale", "bragg_noise")
# pointwise log-likelihoods cost draws x voxels; beyond this many values posterior.nc goes without them
MAX_LOG_LIKELIHOOD_VALUES = 20_000_000


@dataclass
class WeightsFit:
    draws: dict[str, np.ndarray]  # site -> (chains, draws, *shape)
    model: object
    losses: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    sample_stats: dict | None = None

    def flat(self, site: str) -> np.ndarray:
        v = self.draws[site]
        return v.reshape((-1,) + v.shape[2:])


def build_model(model_factory, data: MDData, voxel_weight=None, prior_weights=None):
    """Instantiate the configured model on prepared data."""
    return model_factory(frames=data.frames, shell=data.shell, prior_weights=prior_weights, groups=data.labels,
                         has_sigma=data.sigma is not None, bragg=data.y_bragg is not None,
                         bragg_has_sigma=data.sigma_bragg is not None, voxel_weight=voxel_weight)


def build_guide(guide_factory, model, data: MDData, warm_start_steps: int = 300, lr: float = 0.05):
    """The configured guide on this model, grouped by the frames' states when it takes groups, and started
    from a MAP fit (``warm_start_steps`` > 0)."""
    accepts = inspect.signature(guide_factory).parameters
    kwargs = {"groups": data.labels} if "groups" in accepts else {}
    if warm_start_steps > 0 and "init_values" in accepts:
        kwargs["init_values"] = map_initial_values(model, steps=warm_start_steps, lr=lr, **data.model_kwargs())
    return guide_factory(model, **kwargs)


def fit(model, data: MDData, engine, guide=None, workdir: Path | None = None, n_draws: int = 200) -> WeightsFit:
    """Fit by SVI (``engine`` an SVIEngine, with ``guide``) or NUTS; draws of every latent, grouped by chain."""
    kwargs = data.model_kwargs()
    if isinstance(engine, SVIEngine):
        if guide is None:
            raise ValueError("SVI needs a guide")
        n_data = data.n_voxels if engine.batch_size is not None else None
        result = engine.run(model, guide, n_data=n_data, workdir=workdir, **kwargs)
        draws = guide_draws(guide, kwargs, n_draws, [s for s in LATENTS if s in _latent_sites(model, kwargs)])
        info = {"engine": "svi", "steps": result.steps, "final_loss": result.final_loss, "converged": result.converged,
                "stop_reason": result.stop_reason, "train_time": result.wall_time, "resumed_from": result.resumed_from}
        return WeightsFit(draws, model, result.losses, info)
    if isinstance(engine, NUTSEngine):
        init = map_initial_values(model, **kwargs)  # chains start at the MAP: the noise factors make modes
        result = engine.run(model, init_values=init, **kwargs)
        draws = {k: v.cpu().numpy() for k, v in result.samples.items()}
        info = {"engine": "nuts", "train_time": result.wall_time, "divergences": result.stats["divergences"]}
        return WeightsFit(draws, model, [], info, {"diverging": result.diverging})
    raise TypeError(f"inference must be an SVIEngine or NUTSEngine, got {type(engine).__name__}")


@torch.no_grad()
def guide_draws(guide, kwargs: dict, n: int, sites: list[str]) -> dict[str, np.ndarray]:
    """``n`` joint draws of ``sites`` from the guide in one vectorised call, shaped (1, n, *site_shape)."""
    shapes = {k: v["value"].shape for k, v in poutine.trace(guide).get_trace(**kwargs).nodes.items() if k in sites}
    samples = Predictive(guide, num_samples=n, parallel=True)(**kwargs)
    return {k: samples[k].reshape((1, n) + tuple(shapes[k])).cpu().numpy() for k in sites}


@torch.no_grad()
def pointwise_log_likelihood(model, kwargs: dict, draws: dict[str, np.ndarray], chunk: int = 50) -> dict[str, np.ndarray]:
    """log p(y_h | draw) for every voxel and draw, a chunk of draws per vectorised model call: (chains, draws, N)."""
    chains, n = next(iter(draws.values())).shape[:2]
    flat = {k: torch.as_tensor(v.reshape((chains * n,) + v.shape[2:])) for k, v in draws.items()}
    out: dict[str, list] = {}
    for start in range(0, chains * n, chunk):
        part = {k: v[start:start + chunk] for k, v in flat.items()}
        m = next(iter(part.values())).shape[0]
        # a plate of draws left of the model's voxel plate; global sites get their plate slot (m, 1, ...)
        cond = {k: v.reshape((m, 1) + v.shape[1:]) if k != "noise" else v for k, v in part.items()}
        with pyro.plate("_draws", m, dim=-2):
            tr = poutine.trace(poutine.condition(model, data=cond)).get_trace(**kwargs)
        tr.compute_log_prob()
        for site in ("y", "y_bragg"):
            if site in tr.nodes:
                out.setdefault(site, []).append(tr.nodes[site]["log_prob"].cpu().numpy())
    return {k: np.concatenate(v).reshape(chains, n, -1) for k, v in out.items()}


def _latent_sites(model, kwargs) -> list[str]:
    with torch.no_grad():
        tr = pyro.poutine.trace(model).get_trace(**kwargs)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
            and not n.startswith("_") and n not in ("voxel", "shell")]


def inference_data(result: WeightsFit, data: MDData, log_likelihood: bool = True):
    """ArviZ InferenceData: weights with dim ``frame`` (coordinate ``state``), noise with dim ``shell``, the observed
    intensities and their pointwise log-likelihood with dim ``voxel`` (coordinates H, K, L, dHKL)."""
    coords = {"frame": np.arange(data.n_frames), "shell": np.arange(data.n_shells), "voxel": np.arange(data.n_voxels)}
    extra = {"voxel": {"H": data.hkl[:, 0], "K": data.hkl[:, 1], "L": data.hkl[:, 2], "dHKL": data.dhkl}}
    dims = {"w": ["frame"], "noise": ["shell"], "y": ["voxel"], "y_bragg": ["voxel"]}
    kwargs = data.model_kwargs()
    observed = {k: kwargs[k].cpu().numpy() for k in ("y", "y_bragg") if kwargs[k] is not None}
    chains, n = next(iter(result.draws.values())).shape[:2]
    loglik = None
    if log_likelihood and chains * n * data.n_voxels <= MAX_LOG_LIKELIHOOD_VALUES:
        loglik = pointwise_log_likelihood(result.model, kwargs, result.draws)
    elif log_likelihood:
        log.info("posterior.nc without pointwise log-likelihood: %d draws x %d voxels is too many", chains * n, data.n_voxels)
    present = set(result.draws) | set(observed)
    return draws_to_inference_data(result.draws, {k: v for k, v in dims.items() if k in present}, observed, loglik,
                                   result.sample_stats, coords=coords, dim_coords=extra)


def _state_coordinate(idata, data: MDData):
    state = np.asarray([data.label_names[k] for k in data.labels])
    for group in idata.groups():
        if "frame" in idata[group].dims:
            idata[group] = idata[group].assign_coords(state=("frame", state))
    return idata


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    out = Path(output_dir)
    source = instantiate(cfg.data)
    protect = protect_inputs(*source.inputs, source.prior_weights)
    for name in OUTPUT_FILES:  # fail before any long run, not at the end
        if (out / name).resolve() in protect:
            raise ValueError(f"refusing to overwrite the input file {out / name}: choose another hydra.run.dir")
    frames, kind, diffuse, bragg, truth = source.load()
    data = source.prepare(frames, kind, diffuse, bragg, truth)
    device = resolve_device(cfg.get("device", "auto"))
    data.to(device)
    prior_w = read_weights(source.prior_weights, data.n_frames) if source.prior_weights else None
    log.info("data: %d frames, %d voxels (%d P1 rows), %d states/clusters, Bragg %s; %s", data.n_frames,
             data.n_voxels, data.info["n_frame_rows_used"], len(data.label_names), data.y_bragg is not None,
             source.frames or "simulated example")
    model = build_model(instantiate(cfg.model), data, source.voxel_weight(data), prior_w).to(device)
    engine = instantiate(cfg.inference)
    warm = cfg.get("warm_start") or {}
    guide = (build_guide(instantiate(cfg.guide), model, data, int(warm.get("steps", 300)), float(warm.get("lr", 0.05)))
             if isinstance(engine, SVIEngine) else None)
    n_draws = int(cfg.get("n_draws", 200))
    result = fit(model, data, engine, guide, workdir=out, n_draws=n_draws)

    w = result.flat("w")
    prior = model.state_mass_prior(data.labels, len(data.label_names))
    cc_cfg = cfg.get("cc_baseline") or {}
    cc = None
    if cc_cfg.get("enabled", True):
        cc = fit_pearson_cc(data.frames, data.y, steps=int(cc_cfg.get("steps", 2000)), lr=float(cc_cfg.get("lr", 0.05)),
                            weight=model.voxel_weight)
    true_w = truth.get("weights") if truth else None
    true_m = np.asarray(truth["state_masses"]) if truth and len(truth["state_masses"]) == len(data.label_names) else None
    frames_tab = analysis.frame_table(w, data.labels, data.label_names, true_w, None if cc is None else cc.weights)
    states_tab = analysis.state_table(w, data.labels, data.label_names, prior, true_m, None if cc is None else cc.weights)
    atomic_write(out / "weights.csv", lambda p: frames_tab.to_csv(p, index=False))
    atomic_write(out / "states.csv", lambda p: states_tab.to_csv(p, index=False))
    print(states_tab.to_string(index=False))

    draws_flat = {k: result.flat(k) for k in result.draws}
    pred = analysis.predicted_intensities(data, model, draws_flat)
    y = analysis.observed(data)
    quality, shells = analysis.fit_quality(data, pred["pred_mean"])
    shell_tables = {"likelihood (posterior mean)": shells}
    metrics: dict = {"n_frames": data.n_frames, "n_voxels": data.n_voxels, "n_states": len(data.label_names),
                     "bragg": data.y_bragg is not None, **data.info, **result.info, **quality,
                     **analysis.effective_frames_summary(w), "device": str(device)}
    metrics.pop("normalisation", None)
    metrics["state_mass_mean"] = dict(zip(data.label_names, states_tab["mean"].round(5)))
    metrics["state_mass_sd"] = dict(zip(data.label_names, states_tab["sd"].round(5)))
    metrics["min_contraction"] = float(states_tab["contraction"].min())
    unidentified = states_tab.loc[states_tab["contraction"] < 0.5, "state"].tolist()
    metrics["unidentified_states"] = unidentified
    if unidentified:
        log.warning("the data barely inform the mass of state(s) %s (posterior variance > half the prior's): "
                    "their weights are not identified; see states.csv (contraction)", unidentified)
    metrics.update(analysis.weight_errors(w.mean(0), data.labels, truth))
    if truth:
        metrics["true_state_mass"] = dict(zip(truth["state_names"], np.round(truth["state_masses"], 5)))
    columns = {"IOBS": (y, "Intensity"), "SIGIOBS": ((data.sigma.double().cpu().numpy() * data.y_scale)
                                                   if data.sigma is not None else np.full_like(y, np.nan), "Stddev"),
               "IPRED": (pred["pred_mean"], "Intensity"), "SIGIPRED": (pred["pred_sd"], "Stddev"),
               "XPRED": (pred["x_mean"], "Intensity")}
    if cc is not None:
        from physppl.models.md_weights import diffuse_intensity

        with torch.no_grad():
            x_cc = diffuse_intensity(torch.as_tensor(cc.weights, dtype=data.frames.re.dtype, device=device),
                                     data.frames.block()).double().cpu().numpy()
        cc_quality, cc_shells = analysis.fit_quality(data, x_cc)
        shell_tables["CC objective (prototype)"] = cc_shells
        metrics.update({"cc_fit_cc": cc_quality["cc"], "cc_fit_steps": cc.steps, "cc_fit_time": cc.wall_time,
                        "cc_fit_n_eff": float(1.0 / np.square(cc.weights).sum())})
        metrics.update(analysis.weight_errors(cc.weights, data.labels, truth, prefix="cc_fit_"))
        columns["XCCFIT"] = (x_cc * data.x_scale, "Intensity")
    if "bragg_mean" in pred:
        columns["IBRAGGPRED"] = (pred["bragg_mean"], "Intensity")
    write_intensity_mtz(out / "diffuse_fit.mtz", data.hkl, columns, data.cell, data.spacegroup, protect=protect)
    shell_csv = pd.concat([t.assign(method=k) for k, t in shell_tables.items()])
    atomic_write(out / "cc_shells.csv", lambda p: shell_csv.to_csv(p, index=False))

    idata = _state_coordinate(inference_data(result, data, bool(cfg.get("log_likelihood", True))), data)
    atomic_write(out / "posterior.nc", lambda p: idata.to_netcdf(str(p), engine="h5netcdf"), protect=protect)
    summary = summarize(idata, var_names=[k for k in LATENTS if k in idata.posterior])
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p))
    metrics.update(loo_summary(idata))  # held-out fit per voxel: the objective for tuning by a sweeper
    if result.info["engine"] == "nuts":
        ws = summary.loc[summary.index.str.startswith("w[")]
        metrics.update({"max_rhat_w": float(ws["r_hat"].max()), "min_ess_bulk_w": float(ws["ess_bulk"].min())})

    plots.plot_weights(frames_tab, out / "weights.png")
    plots.plot_states(states_tab, out / "states.png")
    edges_d = 1.0 / np.sqrt(data.shell_edges)
    plots.plot_fit_by_shell(y, pred["pred_mean"], data.shell.cpu().numpy(), edges_d, out / "fit_by_shell.png")
    plots.plot_cc_shells(shell_tables, out / "cc_shells.png")
    if result.losses:
        write_losses(out, result.losses)
        plot_loss(result.losses, out / "loss.png")
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    log.info("metrics: %s", metrics)
    return metrics
