"""``physppl.merge``: unmerged intensities in, merged amplitudes with posteriors out.

The command line (``physppl +experiment=merging``) calls :func:`task`, which calls :func:`merge` with the
configuration's values, so Python and the command line run the same code with the same defaults.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyro
import reciprocalspaceship as rs
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from physppl.inference.convert import Rescale, summarize, to_inference_data
from physppl.inference.fit import Fit, ProtocolError, fit as fit_model
from physppl.inference.presets import call_accepting
from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.io.mtz import add_free_r, check_free_r_file, history_lines, mtz_writer, read_merged_mtz
from physppl.models.merging import LaueMergingModel, MergingModel
from physppl.models.components.scale import initialize_scale

from .data import MergingData, MergingDataSource, initial_estimates
from .weighted_mean import ScaledWeightedMean
from .parts import (check_parts, resolve_engine, resolve_error_model, resolve_guide, resolve_likelihood, resolve_prior,
                    resolve_scale)
from .quality import half_dataset_cc, merged_table, reference_cc, true_amplitudes, truth_metrics

__all__ = ["merge", "MergeResult", "task", "to_merged_mtz", "OUTPUT_FILES", "refl_coordinates"]

log = logging.getLogger(__name__)

# what the runner's reliability warnings should advise, in this problem's options
RELIABILITY_HINTS = {"not_converged": "raise the engine's max_steps (inference.max_steps on the command line)"}

# batch_size="auto": full-batch SVI up to this many observations (every data set the tests and the built-in
# simulation use: their results do not change), minibatches of AUTO_BATCH_SIZE observations above, so a step costs
# the same for 10^6 or 10^7 observations (measured: experiments/benchmarks/scale_merging.py)
AUTO_FULL_BATCH = 250_000
AUTO_BATCH_SIZE = 32_768
# the pointwise log-likelihood in posterior.nc is skipped (with a logged note) beyond this many values
# (draws x observations; 50M float64 values = 400 MB in memory and on disk)
MAX_LOG_LIKELIHOOD_VALUES = 50_000_000
# observations per call when the learned scale of every observation is computed after the fit
_SCALE_CHUNK = 1 << 20
# points drawn in the per-observation scale figure (a random subset beyond)
_MAX_PLOT_POINTS = 200_000

OUTPUT_FILES = ("merged.mtz", "posterior.nc", "summary.csv", "metrics.json", "cc_half.csv", "losses.csv",
                "wavelength_curve.csv",
                "checkpoint.pt", "checkpoint_halves.pt")


@dataclass(repr=False)
class MergeResult(Result):
    """:class:`~physppl.inference.runner.Result` of a merge, with

    Attributes
    ----------
    mtz : rs.DataSet
        What ``merged.mtz`` holds: F, SIGF, I, SIGI, N per unique reflection (and the (+)/(-) columns in
        anomalous mode), in the file's units.
    table : DataFrame
        One row per reflection of the model (Friedel mates apart in anomalous mode): H, K, L, friedel, dHKL, F,
        SIGF, I, SIGI, N.
    cc_half : DataFrame or None
        CC1/2 (and CCanom) by resolution shell, from merging random halves of the images.
    data : MergingData
        The observations as the model saw them (normalised by ``data.norm``).
    fit : Fit
        The engine's fit (draws in the model's units, losses, diagnostics).
    model : nn.Module
        The fitted model: its learned scale, the Laue wavelength curve (``model.lambda_curve.curve()``), the prior
        (a learned double-Wilson ``model.prior.r_set``).
    """

    mtz: Any = None
    table: pd.DataFrame | None = None
    cc_half: pd.DataFrame | None = None
    data: MergingData | None = None
    fit: Fit | None = None
    model: Any = None


def refl_coordinates(data: MergingData) -> tuple[dict, dict]:
    """Coordinates of dim ``refl``: its index is the Miller index as text (``"0 0 8"``, ``"1 2 3 (+)"`` for a
    Friedel mate), so ``az.summary`` rows and ``idata.posterior.F.sel(refl="0 0 8")`` name reflections; H, K, L,
    friedel and dHKL are coordinates beside it. Dim ``obs``: the observation's row."""
    sign = {1: " (+)", -1: " (-)", 0: ""}
    names = np.array([f"{h} {k} {l}{sign[int(f)]}" for (h, k, l), f in zip(data.hkl, data.friedel)])
    extra = {"refl": {"H": data.hkl[:, 0], "K": data.hkl[:, 1], "L": data.hkl[:, 2], "friedel": data.friedel,
                      "dHKL": data.dhkl}}
    if data.dataset is not None and data.n_datasets > 1:  # "2ms: 0 0 8": the same index in two data sets
        set_names = np.asarray(data.dataset_names, dtype=object)[data.dataset]
        names = np.array([f"{d}: {n}" for d, n in zip(set_names, names)])
        extra["refl"]["dataset"] = set_names.astype(str)
    coords = {"refl": names, "obs": np.arange(data.n_obs)}
    return coords, extra


def merged_by_dataset(table: pd.DataFrame, data: MergingData) -> dict[str, rs.DataSet] | None:
    """One merged DataSet per data set (by name) when several were merged apart; None for one data set."""
    if data.dataset is None or data.n_datasets < 2:
        return None
    return {name: to_merged_mtz(table[table["dataset"] == k], data) for k, name in enumerate(data.dataset_names)}


def combined_mtz(per_set: dict[str, rs.DataSet]) -> rs.DataSet:
    """One DataSet with a column set per data set (``F_off``, ``SIGF_off``, ..., ``F_2ms``, ...)."""
    parts = [ds.rename(columns={c: f"{c}_{name}" for c in ds.columns}) for name, ds in per_set.items()]
    out = parts[0]
    for p in parts[1:]:
        out = out.join(p, how="outer")
    for c in out.columns:
        if c.startswith("N_") or c.startswith("N(+)_") or c.startswith("N(-)_"):
            out[c] = out[c].fillna(0).astype("MTZInt")
    return out


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
    return ds.astype(types).set_index(key)


def _moments_from_draws(draws: torch.Tensor) -> dict[str, np.ndarray]:
    f = draws.reshape(-1, draws.shape[-1]).double().cpu()
    i = f.square()
    return {"F_mean": f.mean(0).numpy(), "F_sd": f.std(0).numpy(), "I_mean": i.mean(0).numpy(),
            "I_sd": i.std(0).numpy()}


def _source(data, options: dict) -> tuple[MergingDataSource, rs.DataSet | None]:
    """Where the data come from, and the DataSet itself when the caller passed one."""
    if isinstance(data, MergingDataSource):
        if options:
            raise TypeError(f"merge: data is a MergingDataSource; set {sorted(options)} on it, not as keywords")
        return data, None
    if data is not None and not isinstance(data, (str, os.PathLike, rs.DataSet)):
        raise TypeError(f"merge: data must be an MTZ path, an unmerged rs.DataSet, a MergingDataSource or None "
                        f"(the built-in simulated data set); got {type(data).__name__}")
    try:
        source = MergingDataSource(path=None if isinstance(data, rs.DataSet) else data, **options)
    except TypeError as err:
        raise TypeError(f"merge: {err}") from None
    return source, (data if isinstance(data, rs.DataSet) else None)


class _Merger:
    """One fit of the merging model on one MergingData (the full data, or the half datasets)."""

    def __init__(self, model: Callable, scale, likelihood, error_model, guide, engine, device: torch.device,
                 prior=None, initial: ScaledWeightedMean | None = None):
        self.model_factory, self.scale, self.likelihood, self.error_model = model, scale, likelihood, error_model
        self.guide_factory, self.engine, self.device, self.prior = guide, engine, device, prior
        self.initial = initial
        self.model: torch.nn.Module | None = None  # the last model fitted (its learned scale, curve, prior)

    def build(self, data: MergingData, init: pd.DataFrame) -> tuple[torch.nn.Module, torch.nn.Module | None, dict]:
        scale = copy.deepcopy(self.scale) if isinstance(self.scale, torch.nn.Module) else self.scale
        # a user's model that knows nothing of priors is only given one when a non-default prior was asked for
        prior = {} if self.prior is None else {"prior": self.prior}
        model = self.model_factory(**data.model_init(), scale=scale, likelihood=self.likelihood,
                                   error_model=copy.deepcopy(self.error_model), **prior)
        if not isinstance(model, torch.nn.Module):
            raise ProtocolError(f"merge: model {type(model).__name__} is not an nn.Module (see "
                            "physppl.models.merging.MergingModelProtocol)")
        if getattr(model, "scale", None) is not None:  # start from the conventional scaling, as the guide does
            initialize_scale(model.scale, data.image, torch.as_tensor(init.attrs["obs_log_scale"]))
        model.to(self.device)
        kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in data.model_kwargs().items()}
        check_parts(model, kwargs)
        guide = None
        if getattr(self.engine, "needs_guide", True):
            guide = self.guide_factory
            if not isinstance(guide, torch.nn.Module):
                # a guide that pairs data sets gets the prior's parent of each reflection
                parent = getattr(getattr(model, "prior", None), "parent", None)
                guide = call_accepting(guide, init_mean=init["F"].to_numpy(), init_sd=init["SIGF"].to_numpy(),
                                       parent=None if parent is None else parent.cpu())
            guide.to(self.device)
        return model, guide, kwargs

    def run(self, data: MergingData, n_draws: int, workdir, engine=None) -> tuple[Fit, dict, np.ndarray | None]:
        """(fit, moments per reflection in the model's units, per-observation log-scale or None)."""
        engine = engine or self.engine
        init = initial_estimates(data, self.initial)
        model, guide, kwargs = self.build(data, init)
        self.model = model
        fit = fit_model(model, guide, kwargs, engine, n_draws=n_draws, n_data=data.n_obs, sites=["F"], workdir=workdir)
        if "moments" in fit.extras:
            moments = fit.extras["moments"]
        elif guide is not None and callable(getattr(guide, "moments", None)):
            moments = {k: v.detach().double().cpu().numpy() for k, v in guide.moments().items()}
        else:
            moments = _moments_from_draws(fit.draws["F"])
        log_scale = fit.extras.get("obs_log_scale")
        if log_scale is None and getattr(model, "scale", None) is not None:
            # in chunks: the scale network's activations for 10^7 observations at once would take gigabytes
            n = data.n_obs
            parts = []
            with torch.no_grad(), pyro.poutine.block():  # block: the scale's smoothness factor is no observation
                for start in range(0, n, _SCALE_CHUNK):
                    sl = slice(start, min(start + _SCALE_CHUNK, n))
                    parts.append(model.scale(kwargs["image"][sl], kwargs["metadata"][sl], kwargs["inv_d2"][sl]).cpu())
            log_scale = torch.cat(parts).numpy() if parts else np.zeros(0)
        return fit, moments, log_scale


def _halves_engine(engine, workdir):
    """The engine for the half-dataset fit: its own checkpoint (its parameters have other shapes), resumed only if
    an earlier run got that far (a run interrupted in the main fit has no half-dataset checkpoint yet)."""
    if not hasattr(engine, "checkpoint_path"):
        return engine
    halves = copy.copy(engine)
    main = engine.checkpoint_path
    if main is not None:
        halves.checkpoint_path = main.with_name(main.stem + "_halves.pt")
    elif workdir is not None:
        halves.checkpoint_path = Path(workdir) / "checkpoint_halves.pt"
    halves.resume = bool(getattr(engine, "resume", False)) and halves.checkpoint_path is not None \
        and halves.checkpoint_path.exists()
    return halves


def _minibatched(engine, n_obs: int, batch_size: int | str | None):
    """The engine with ``batch_size`` observations per step when asked for (or, with ``"auto"``, when the data
    are larger than :data:`AUTO_FULL_BATCH` and the engine was given none); engines without minibatches as
    they are."""
    if not hasattr(engine, "batch_size") or batch_size is None:
        return engine
    if batch_size == "auto":
        if engine.batch_size is not None or n_obs <= AUTO_FULL_BATCH:
            return engine
        size = AUTO_BATCH_SIZE
    elif isinstance(batch_size, str) or int(batch_size) < 1:
        raise ValueError(f"merge: batch_size must be 'auto', None or a positive integer, got {batch_size!r}")
    else:
        size = int(batch_size)
    if size >= n_obs:
        return engine
    out = copy.copy(engine)
    out.batch_size = size
    log.info("SVI on minibatches of %d of the %d observations (%.3g%% a step)", size, n_obs, 100.0 * size / n_obs)
    return out


def _log_likelihood_fits(n_draws: int, n_obs: int, limit: int | None) -> bool:
    """Whether the pointwise log-likelihood (draws x observations) is within ``limit`` values; logs a note if not."""
    n_values = int(n_draws) * int(n_obs)
    if limit is None or n_values <= limit:
        return True
    log.warning("posterior.nc is written without the pointwise log-likelihood: %d draws x %d observations = %.3g "
                "values (%.1f GB as float64) exceed max_log_likelihood_values=%d; az.loo needs it: lower n_draws "
                "or raise max_log_likelihood_values", n_draws, n_obs, n_values, 8e-9 * n_values, limit)
    return False


def merge(
    data: str | os.PathLike | rs.DataSet | MergingDataSource | None = None,
    *,
    model: Callable[..., torch.nn.Module] = MergingModel,
    scale: Any = "mlp_image",
    likelihood: Any = "student_t",
    error_model: Any = "sdfac_sdadd",
    prior: Any = "wilson",
    guide: Any = "folded_normal",
    engine: Any = "svi",
    n_draws: int = 200,
    log_likelihood: bool = True,
    batch_size: int | str | None = "auto",
    max_log_likelihood_values: int | None = MAX_LOG_LIKELIHOOD_VALUES,
    initial_merge: ScaledWeightedMean | dict | None = None,
    free_r: float | str | None = None,
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
    **data_options: Any,
) -> MergeResult:
    """Scale and merge unmerged intensities with the Bayesian model (Wilson prior x scale x noise model).

    Parameters
    ----------
    data : path, rs.DataSet, MergingDataSource or None
        An unmerged MTZ file (DIALS, AIMLESS/MOSFLM, XDS via pointless), an unmerged DataSet with I, SIGI and
        BATCH, or ``None`` for the built-in simulated data set (with known truth).
    model : class or factory
        Called with ``centric, epsilon, sigma_n, n_images, n_features`` from the data and the parts below; see
        :class:`~physppl.models.merging.MergingModelProtocol`.
    scale, likelihood, error_model : str or object
        By name (:data:`~physppl.merging.parts.SCALES`, ``LIKELIHOODS``, ``ERROR_MODELS``) or your own (a scale
        module or its class/factory taking ``n_images`` and ``n_features``; a callable ``(loc, sigma) ->
        Distribution``; a module ``(sigma, predicted) -> sigma'`` or ``None``).
    prior : str or object
        ``"wilson"`` or ``"double_wilson"`` (between data sets: ``DoubleWilsonPrior(parents=[None, 0], r=[0.0, 0.99])``
        for your own parents and r), or a prior module (:class:`~physppl.models.merging.MergingModel`).
    guide : str or object
        A family of :class:`~physppl.guides.merging.MergingGuide` by name, or a factory called with ``init_mean``
        and ``init_sd`` (the conventional merge, in the model's units), or a guide module.
    engine : str or engine
        ``"svi"`` (default), ``"nuts"`` (exact, small problems), ``"weighted_mean"`` (the conventional merge), or an
        engine object (:class:`~physppl.inference.svi.SVIEngine` with your settings, or any object with ``fit``).
    n_draws : int
        Posterior draws kept in ``posterior.nc``.
    log_likelihood : bool
        Pointwise log-likelihood of every observation in ``posterior.nc`` (for ``az.loo``); left out, with a
        logged warning and ``metrics["log_likelihood"] = "skipped"``, when ``n_draws`` x observations exceed
        ``max_log_likelihood_values`` (``None``: no limit).
    batch_size : int, "auto" or None
        Observations per SVI step. ``"auto"``: all of them up to :data:`AUTO_FULL_BATCH` observations (or the
        engine's own ``batch_size``), random minibatches of :data:`AUTO_BATCH_SIZE` above, so the cost of a step
        does not grow with the data (serial / XFEL data sets of 10^6-10^7 observations). ``None``: the engine's.
    max_log_likelihood_values : int or None
        See ``log_likelihood``.
    initial_merge : ScaledWeightedMean or dict, optional
        The conventional merge the guide and the scale start from (or its keyword arguments, e.g.
        ``{"block_size": 1}`` for stills whose scales are independent image to image); default
        ``ScaledWeightedMean()``.
    free_r : float, path or None
        Free-R flags in ``merged.mtz``: a fraction of new ones (``0.05``; Phenix convention, ``R-free-flags``),
        or an MTZ file whose flags are copied by Miller index (keep a data set's test set across merges).
    seed, threads, device, validate
        As :class:`~physppl.inference.runner.JobSettings`.
    workdir : path, optional
        Where checkpoints go while the fit runs (needed to resume); nothing is written without it.
    **data_options
        Options of :class:`~physppl.merging.data.MergingDataSource`: ``anomalous``, ``metadata``, ``dmin``,
        ``columns``, ``partials``, ``drop_bad_sigma``, ``half_datasets``, ``reference``, ``simulate``; for several
        data sets ``paths`` and ``separate``; for Laue data ``wavelength`` (the column), ``band`` and ``harmonics``.
        Laue data take :class:`~physppl.models.merging.LaueMergingModel` (chosen for you when ``model`` is the
        default).
    """
    source, given = _source(data, data_options)
    free_r_file = free_r if isinstance(free_r, (str, os.PathLike)) else None
    if free_r_file is not None:
        check_free_r_file(free_r_file)  # before any work, not after the fit
    if isinstance(initial_merge, dict):
        initial_merge = ScaledWeightedMean(**initial_merge)
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    names = source.names or []
    outputs = OUTPUT_FILES + tuple(f"merged_{n}.mtz" for n in names)
    with Job("merging", settings, inputs=[*source.inputs, source.reference, free_r_file], workdir=workdir,
             outputs=outputs, hints=RELIABILITY_HINTS) as job:
        ds, truth = (given, None) if given is not None else source.load()
        data_ = source.prepare(ds)
        del ds  # the observations live on in data_ (a 10^7-row DataSet is ~1 GB)
        reference = read_merged_mtz(source.reference, anomalous=data_.anomalous) if source.reference else None
        if data_.wavelength is not None and model is MergingModel:
            model = LaueMergingModel  # the Laue likelihood (wavelength curve, harmonics) for Laue data
        merger = _Merger(model, resolve_scale(scale), resolve_likelihood(likelihood), resolve_error_model(error_model),
                         resolve_guide(guide), _minibatched(resolve_engine(engine), data_.n_obs, batch_size),
                         job.device, prior=resolve_prior(prior), initial=initial_merge)
        log.info("data: %d observations of %d reflections on %d images (%s)", data_.n_obs, data_.n_refl,
                 data_.n_images, ", ".join(source.inputs) or "simulated")
        fit, moments, log_scale = merger.run(data_, n_draws, workdir)
        fitted = merger.model
        table = merged_table(data_, moments)
        per_set = merged_by_dataset(table, data_)
        mtz = to_merged_mtz(table, data_) if per_set is None else combined_mtz(per_set)

        coords, extra = refl_coordinates(data_)
        f_units = float(np.sqrt(data_.norm))
        with_loglik = bool(log_likelihood) and fit.model is not None and \
            _log_likelihood_fits(fit.n_chains * fit.n_draws, data_.n_obs, max_log_likelihood_values)
        idata = to_inference_data(
            fit, log_likelihood=with_loglik, coords=coords, dim_coords=extra, max_log_likelihood_values=None,
            rescale={"F": Rescale(f_units), "I": Rescale(data_.norm)},
            attrs={"units": "F in the file's amplitude units (sqrt of its intensity units), I in its intensity units"})
        summary = summarize(idata, var_names=["F"])

        metrics: dict = {"n_obs": data_.n_obs, "n_refl": data_.n_refl, "n_images": data_.n_images,
                         "intensity_norm": data_.norm, **fit.info}
        if getattr(merger.engine, "batch_size", None) is not None:
            metrics["batch_size"] = int(merger.engine.batch_size)
        if log_likelihood and fit.model is not None and not with_loglik:
            metrics["log_likelihood"] = "skipped"
        shells = None
        if source.half_datasets:
            pyro.set_rng_seed(job.seed + 1)  # the half-dataset fit's draws do not depend on how long the main fit ran
            halves = data_.split_halves(seed=job.seed)
            hfit, hmoments, _ = merger.run(halves, 2, workdir, engine=_halves_engine(merger.engine, workdir))
            half_table = merged_table(halves, hmoments)
            cc, shells = half_dataset_cc(half_table)
            metrics.update(cc)
            if per_set is not None:  # CC1/2 of each data set: the figure a time-resolved user compares
                for k, name in enumerate(data_.dataset_names):
                    cc_k, shells_k = half_dataset_cc(half_table[half_table["dataset"] == k])
                    metrics.update({f"{key}_{name}": v for key, v in cc_k.items()})
                    shells[f"cc_half_{name}"] = shells_k["cc_half"]
            metrics["half_train_time"] = hfit.info.get("train_time")
        if reference is not None:
            metrics.update(reference_cc(mtz, reference))
        truth_table = None
        if truth is not None:
            f_draws = fit.flat("F").double().numpy() * f_units
            lower, upper = np.quantile(f_draws, [0.05, 0.95], axis=0)
            truth_table = table.assign(lower=lower, upper=upper,
                                       F_TRUE=true_amplitudes(truth, data_.hkl, data_.friedel, data_.dataset))
            metrics.update(truth_metrics(*(truth_table[c].to_numpy(float) for c in
                                           ("F", "lower", "upper", "F_TRUE", "dHKL"))))

        if free_r is not None:
            mtz = add_free_r(mtz, free_r, seed=job.seed)
        files = {"merged.mtz": mtz_writer(mtz, history=history_lines("merge"))}
        for name, ds_k in (per_set or {}).items():
            if free_r is not None:
                ds_k = add_free_r(ds_k, free_r, seed=job.seed)
            files[f"merged_{name}.mtz"] = mtz_writer(ds_k, history=history_lines(f"merge ({name})"))
        curve = getattr(fitted, "lambda_curve", None)
        if curve is not None:  # the learned wavelength normalisation, as a table beside its plot
            lam, rel = curve.curve()
            files["wavelength_curve.csv"] = lambda p, t=pd.DataFrame({"wavelength": lam.numpy(),
                                                                   "relative_scale": rel.numpy()}): t.to_csv(p, index=False)
        if data_.wavelength is not None:
            metrics["n_harmonic_multiplets"] = 0 if data_.harmonic_refl is None else \
                int(((data_.harmonic_refl >= 0).sum(1) > 1).sum())
        if shells is not None:
            files["cc_half.csv"] = lambda p, s=shells: s.to_csv(p, index=False)

        def figures(out: Path) -> None:
            from . import plots  # matplotlib only when figures are drawn

            if log_scale is not None:
                k = np.exp(log_scale)
                img = data_.image.numpy()
                counts = np.maximum(np.bincount(img, minlength=data_.n_images), 1)
                per_image = np.bincount(img, weights=k, minlength=data_.n_images) / counts
                images = data_.batch_values if data_.n_datasets == 1 else np.arange(data_.n_images)
                inv_d2 = data_.inv_d2.numpy()
                if len(k) > _MAX_PLOT_POINTS:  # a random subset of the points: the figure looks the same
                    pick = np.random.default_rng(0).choice(len(k), _MAX_PLOT_POINTS, replace=False)
                    inv_d2, k = inv_d2[pick], k[pick]
                plots.plot_scales(images, per_image, inv_d2, k, out / "scale.png")
            curve = getattr(fitted, "lambda_curve", None)
            if curve is not None:
                lam, rel = curve.curve()
                plots.plot_wavelength_curve(lam.numpy(), rel.numpy(), data_.wavelength.numpy(),
                                            out / "wavelength_curve.png")
            plots.plot_wilson(data_.dhkl, moments["I_mean"] * data_.norm, data_.epsilon.numpy(),
                              data_.sigma_n.numpy() * data_.norm, out / "wilson.png")
            if shells is not None and np.isfinite(shells["cc_half"].to_numpy(float)).any():
                plots.plot_cc_shells(shells, out / "cc_half.png")
            if reference is not None:
                j = mtz[["I"]].join(reference[["I"]], rsuffix="_ref", how="inner")
                plots.plot_comparison(j["I_ref"].to_numpy(float), j["I"].to_numpy(float), "reference I", "merged I",
                                      out / "reference.png")
            if truth_table is not None:
                plots.plot_comparison(truth_table["F_TRUE"].to_numpy(float), truth_table["F"].to_numpy(float),
                                      "true F", "merged F", out / "truth.png")

        log.info("merged %d reflections; %s", data_.n_refl, fit.info.get("stop_reason", fit.info.get("engine")))
        return job.result(MergeResult, idata=idata, metrics=metrics, losses=fit.losses, summary=summary, files=files,
                          figures=figures, mtz=mtz, table=table, cc_half=shells, data=data_, fit=fit,
                          model=fitted)


def _model_factory(node) -> tuple[Callable, dict]:
    """The model class (``model._target_``, swappable on the command line) with any extra keys of the node bound,
    and the part nodes (scale, likelihood, error_model) instantiated."""
    conf = OmegaConf.to_container(node, resolve=True)
    cls = get_class(conf.pop("_target_"))
    conf.pop("_partial_", None)
    conf.pop("_convert_", None)
    parts = {k: instantiate(node[k]) if OmegaConf.is_dict(node[k]) else node[k]
             for k in ("scale", "likelihood", "error_model", "prior") if k in node}
    for k in parts:
        conf.pop(k, None)
    factory = (lambda **kw: cls(**conf, **kw)) if conf else cls
    return factory, parts


def task(cfg: DictConfig, workdir: str | os.PathLike) -> MergeResult:
    """The command line's merging job: :func:`merge` with the configuration's values."""
    factory, parts = _model_factory(cfg.model)
    return merge(instantiate(cfg.data), model=factory, guide=instantiate(cfg.guide), engine=instantiate(cfg.inference),
                 workdir=workdir, **parts, **config_options(cfg, merge, exclude=("model", "guide", "engine", *parts)))
