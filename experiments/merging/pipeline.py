"""The merging job: data in, inference (variational, NUTS or the conventional weighted mean), merged MTZ out.

Called by the ``physppl`` app as ``run(cfg, output_dir)``; returns the headline metrics.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import reciprocalspaceship as rs
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.inference.convert import draw_from_guide, draws_to_inference_data, summarize, to_inference_data
from physppl.inference.device import resolve_device
from physppl.inference.io.mtz import read_merged_mtz, write_mtz_atomic
from physppl.inference.nuts import NUTSEngine
from physppl.inference.outputs import atomic_write, protect_inputs, write_losses
from physppl.inference.svi import SVIEngine
from physppl.inference.weighted_mean import ScaledWeightedMean
from physppl.models.components.scale import initialize_scale

from . import plots
from .data import MergingData, initial_estimates
from .quality import half_dataset_cc, merged_table, reference_cc, true_amplitudes, truth_metrics

__all__ = ["run", "fit", "FitResult", "to_merged_mtz", "OUTPUT_FILES"]

OUTPUT_FILES = ("merged.mtz", "posterior.nc", "summary.csv", "metrics.json", "cc_half.csv", "checkpoint.pt",
                "losses.csv")

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    moments: dict[str, np.ndarray]  # F_mean, F_sd, I_mean, I_sd per reflection (normalised units)
    draws: torch.Tensor  # (chains, draws, n_refl) posterior draws of F
    idata: object | None = None
    losses: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    obs_log_scale: np.ndarray | None = None


def _draw_moments(draws: torch.Tensor) -> dict[str, np.ndarray]:
    f = draws.reshape(-1, draws.shape[-1]).double().cpu()
    i = f.square()
    return {"F_mean": f.mean(0).numpy(), "F_sd": f.std(0).numpy(), "I_mean": i.mean(0).numpy(), "I_sd": i.std(0).numpy()}


def _coords(data: MergingData) -> tuple[dict, dict]:
    coords = {"refl": np.arange(data.n_refl), "obs": np.arange(data.n_obs)}
    extra = {"refl": {"H": data.hkl[:, 0], "K": data.hkl[:, 1], "L": data.hkl[:, 2], "friedel": data.friedel,
                      "dHKL": data.dhkl}}
    return coords, extra


def fit(
    data: MergingData,
    estimator,
    guide_factory=None,
    engine=None,
    workdir: Path = Path("."),
    n_draws: int = 200,
    inference_data: bool = True,
    log_likelihood: bool = True,
    device: torch.device | str = "cpu",
) -> FitResult:
    """Merge ``data`` with a Pyro model factory + guide + engine, or with a conventional estimator (``.fit``).

    The Pyro fit runs on ``device`` (model, guide and the observation tensors move there); results come back
    to the CPU as NumPy arrays.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    if isinstance(estimator, ScaledWeightedMean):
        init = initial_estimates(data, estimator)
        moments = {"F_mean": init["F"].to_numpy(), "F_sd": init["SIGF"].to_numpy(),
                   "I_mean": init["I_WM"].to_numpy(), "I_sd": init["SIGI_WM"].to_numpy()}
        # French-Wilson posterior approximated by a folded normal with its mean and sd, for posterior.nc
        gen = torch.Generator().manual_seed(0)
        loc, sd = torch.as_tensor(moments["F_mean"]), torch.as_tensor(moments["F_sd"])
        draws = (loc + sd * torch.randn((1, n_draws, data.n_refl), generator=gen, dtype=loc.dtype)).abs().float()
        idata = None
        if inference_data:
            coords, extra = _coords(data)
            idata = draws_to_inference_data({"F": draws}, {"F": ["refl"]}, coords=coords, dim_coords=extra)
        info = {"engine": "weighted_mean", "wall_time": time.perf_counter() - t0, "outliers": init.attrs["n_outliers"]}
        return FitResult(moments, draws, idata, [], info, init.attrs["obs_log_scale"])

    # the guide and the scale model both start from the conventional merge, so they start consistent
    init = initial_estimates(data)
    model = estimator(**data.model_init())
    initialize_scale(model.scale, data.image, torch.as_tensor(init.attrs["obs_log_scale"]))
    model.to(device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.model_kwargs().items()}
    info: dict = {}
    losses: list[float] = []
    if isinstance(engine, SVIEngine):
        guide = guide_factory(init_mean=init["F"].to_numpy(), init_sd=init["SIGF"].to_numpy())
        if isinstance(guide, torch.nn.Module):
            guide.to(device)
        result = engine.run(model, guide, n_data=data.n_obs, workdir=workdir, **kwargs)
        losses = result.losses
        moments = {k: v.detach().double().cpu().numpy() for k, v in guide.moments().items()}
        draws = draw_from_guide(guide, kwargs, n_draws, ["F"])["F"]
        info.update(engine="svi", steps=result.steps, final_loss=result.final_loss, converged=result.converged,
                    stop_reason=result.stop_reason, train_time=result.wall_time, resumed_from=result.resumed_from)
        sample_stats = None
    elif isinstance(engine, NUTSEngine):
        result = engine.run(model, **kwargs)
        draws = result.samples["F"]
        moments = _draw_moments(draws)
        info.update(engine="nuts", train_time=result.wall_time, divergences=result.stats["divergences"])
        sample_stats = {"diverging": result.diverging}
    else:
        raise TypeError(f"inference must be an SVIEngine or NUTSEngine, got {type(engine).__name__}")
    with torch.no_grad(), pyro.poutine.block():  # block: the scale's smoothness factor is not an observation here
        obs_log_scale = model.scale(kwargs["image"], kwargs["metadata"], kwargs["inv_d2"]).cpu().numpy()
    idata = None
    if inference_data:
        coords, extra = _coords(data)
        idata = to_inference_data(model, kwargs, {"F": draws}, log_likelihood=log_likelihood,
                                  sample_stats=sample_stats, coords=coords, dim_coords=extra)
    info["wall_time"] = time.perf_counter() - t0
    info["device"] = str(device)
    return FitResult(moments, draws.cpu(), idata, losses, info, obs_log_scale)


def to_merged_mtz(table: pd.DataFrame, data: MergingData) -> rs.DataSet:
    """Merged DataSet: F, SIGF, I, SIGI, N (Friedel-averaged) and, in anomalous mode, the (+)/(-) columns."""
    key = ["H", "K", "L"]
    cols = ["F", "SIGF", "I", "SIGI", "N"]
    if data.anomalous:
        plus = table[table["friedel"] >= 0].set_index(key)[cols + ["dHKL"]]
        minus = table[table["friedel"] <= 0].set_index(key)[cols]
        wide = plus.join(minus, how="outer", lsuffix="(+)", rsuffix="(-)")
        both = wide["F(+)"].notna() & wide["F(-)"].notna()
        out = pd.DataFrame(index=wide.index)
        for v, s in (("F", "SIGF"), ("I", "SIGI")):
            mean = wide[[f"{v}(+)", f"{v}(-)"]].mean(axis=1)
            sd_both = 0.5 * np.sqrt(wide[f"{s}(+)"] ** 2 + wide[f"{s}(-)"] ** 2)
            sd_one = wide[f"{s}(+)"].fillna(wide[f"{s}(-)"])
            out[v], out[s] = mean, np.where(both, sd_both, sd_one)
        out["N"] = wide["N(+)"].fillna(0) + wide["N(-)"].fillna(0)
        centric_rows = table[table["friedel"] == 0].set_index(key).index
        out.loc[out.index.isin(centric_rows), "N"] = wide.loc[wide.index.isin(centric_rows), "N(+)"]
        for c in ("F", "SIGF", "I", "SIGI", "N"):
            out[f"{c}(+)"] = wide[f"{c}(+)"]
            out[f"{c}(-)"] = wide[f"{c}(-)"]
    else:
        out = table.set_index(key)[cols]
    ds = rs.DataSet(out.reset_index(), spacegroup=data.spacegroup, cell=data.cell, merged=True)
    types = {"H": "HKL", "K": "HKL", "L": "HKL", "F": "SFAmplitude", "SIGF": "Stddev", "I": "Intensity",
             "SIGI": "Stddev", "N": "MTZInt"}
    if data.anomalous:
        types.update({"F(+)": "FriedelSFAmplitude", "F(-)": "FriedelSFAmplitude", "SIGF(+)": "StddevFriedelSF",
                      "SIGF(-)": "StddevFriedelSF", "I(+)": "FriedelIntensity", "I(-)": "FriedelIntensity",
                      "SIGI(+)": "StddevFriedelI", "SIGI(-)": "StddevFriedelI", "N(+)": "MTZInt", "N(-)": "MTZInt"})
        for c in ("N(+)", "N(-)"):
            ds[c] = ds[c].fillna(0)
    ds["N"] = ds["N"].fillna(0)
    ds = ds.astype(types).set_index(key)
    return ds


def _halves_engine(engine, out: Path):
    """The engine for the half-dataset fit: its own checkpoint (its parameters have other shapes), resumed only
    if an earlier run got that far (a run interrupted in the main fit has no half-dataset checkpoint yet)."""
    if not isinstance(engine, SVIEngine):
        return engine
    halves = copy.copy(engine)
    main = engine.checkpoint_path
    halves.checkpoint_path = out / "halves" / "checkpoint.pt" if main is None else main.with_name(main.stem + "_halves.pt")
    halves.resume = engine.resume and halves.checkpoint_path.exists()
    return halves


def _sigfig(d: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()}


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    """The merging job; writes merged.mtz, posterior.nc, summary.csv, cc_half.csv and plots into output_dir."""
    out = Path(output_dir)
    source = instantiate(cfg.data)
    ds, truth = source.load()
    data = source.prepare(ds)
    protect = protect_inputs(source.path, source.reference)
    for name in OUTPUT_FILES:  # fail before any long run, not at the end
        if (out / name).resolve() in protect:
            raise ValueError(f"refusing to overwrite the input file {out / name}: choose another hydra.run.dir")
    estimator = instantiate(cfg.model)
    needs_pyro = not isinstance(estimator, ScaledWeightedMean)
    guide_factory = instantiate(cfg.guide) if needs_pyro else None
    engine = instantiate(cfg.inference) if needs_pyro else None
    reference = read_merged_mtz(source.reference, anomalous=data.anomalous) if source.reference else None
    n_draws = int(cfg.get("n_draws", 200))
    device = resolve_device(cfg.get("device", "auto")) if needs_pyro else torch.device("cpu")
    log.info("data: %d observations of %d reflections on %d images (%s)", data.n_obs, data.n_refl, data.n_images,
             source.path or "simulated")

    result = fit(data, estimator, guide_factory, engine, workdir=out, n_draws=n_draws, device=device,
                 log_likelihood=bool(cfg.get("log_likelihood", True)))
    table = merged_table(data, result.moments)
    merged = to_merged_mtz(table, data)
    write_mtz_atomic(merged, out / "merged.mtz", protect=protect)
    atomic_write(out / "posterior.nc", lambda p: result.idata.to_netcdf(str(p), engine="h5netcdf"), protect=protect)
    summary = summarize(result.idata, var_names=["F"])
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p))
    print(summary.head(12).to_string())

    metrics: dict = {"n_obs": data.n_obs, "n_refl": data.n_refl, "n_images": data.n_images, **result.info}
    if result.losses:
        write_losses(out, result.losses)
        plots.plot_loss(result.losses, out / "loss.png")
    if result.obs_log_scale is not None:
        k = np.exp(result.obs_log_scale)
        img = data.image.numpy()
        per_image = np.bincount(img, weights=k, minlength=data.n_images) / np.maximum(np.bincount(img, minlength=data.n_images), 1)
        plots.plot_scales(data.batch_values, per_image, data.inv_d2.numpy(), k, out / "scale.png")
    plots.plot_wilson(data.dhkl, result.moments["I_mean"], data.epsilon.numpy(), data.sigma_n.numpy(), out / "wilson.png")

    if source.half_datasets:
        pyro.clear_param_store()  # the half-dataset model has its own parameters of other shapes
        halves = data.split_halves(seed=int(cfg.get("seed", 0)))
        hres = fit(halves, estimator, guide_factory, _halves_engine(engine, out), workdir=out / "halves", n_draws=2,
                   inference_data=False, device=device)
        htable = merged_table(halves, hres.moments)
        cc, shells = half_dataset_cc(htable)
        metrics.update(cc)
        metrics["half_wall_time"] = hres.info["wall_time"]
        atomic_write(out / "cc_half.csv", lambda p: shells.to_csv(p, index=False))
        plots.plot_cc_shells(shells, out / "cc_half.png")
        print(shells.to_string(index=False))
    if reference is not None:
        metrics.update(reference_cc(merged, reference))
        j = merged[["I"]].join(reference[["I"]], rsuffix="_ref", how="inner")
        plots.plot_comparison(j["I_ref"].to_numpy(float), j["I"].to_numpy(float), "reference I", "merged I",
                              out / "reference.png")
    if truth is not None:
        f_draws = result.draws.reshape(-1, data.n_refl).double().numpy() * np.sqrt(data.norm)
        lower, upper = np.quantile(f_draws, [0.05, 0.95], axis=0)
        j = table.assign(lower=lower, upper=upper, F_TRUE=true_amplitudes(truth, data.hkl, data.friedel))
        metrics.update(truth_metrics(j["F"].to_numpy(float), j["lower"].to_numpy(float), j["upper"].to_numpy(float),
                                     j["F_TRUE"].to_numpy(float), j["dHKL"].to_numpy(float)))
        plots.plot_comparison(j["F_TRUE"].to_numpy(float), j["F"].to_numpy(float), "true F", "merged F", out / "truth.png")
    metrics = _sigfig(metrics)
    log.info("metrics: %s", metrics)
    return metrics
