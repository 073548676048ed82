"""The job runner: what every job does, whatever the problem, and the :class:`Result` it hands back.

A problem's function (``physppl.merge``, ``physppl.weigh_frames``, ...) runs its work inside a :class:`Job`:

    with Job("merging", settings, inputs=[path], workdir=workdir, outputs=MergeResult.FILES) as job:
        ...                                   # data, model, guide, engine, domain outputs
        return job.result(MergeResult, idata=idata, metrics=metrics, losses=fit.losses, files=..., figures=...)

The job sets torch's thread count, seeds Python, NumPy and torch, switches Pyro's validation, gives the work an
empty Pyro parameter store (restoring the caller's afterwards), resolves the device, refuses before any work to
write over an input file, and times the run. :meth:`Result.save` writes ``posterior.nc``, ``summary.csv``,
``losses.csv``, ``metrics.json``, the problem's own files and figures, each atomically: exactly what the command
line leaves in its run directory.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyro
import torch

from .device import resolve_device
from .interrupt import watch_signals
from .outputs import LOSSES_FILE, atomic_write, protect_inputs, write_json
from .reliability import flag_unreliable

__all__ = ["JobSettings", "Job", "Result", "round_metrics", "MACHINE_METRICS", "comparable_metrics", "config_options",
           "chain_diagnostics"]

log = logging.getLogger("physppl")

SIGNIFICANT_DIGITS = 6  # the one rounding rule for every number in metrics.json


def round_metrics(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """Floats to ``digits`` significant digits (recursively in dicts and lists); NumPy scalars to Python ones."""
    if isinstance(value, dict):
        return {str(k): round_metrics(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_metrics(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return round_metrics(value.tolist(), digits)
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value


# Metrics that describe the machine and the moment, not the result: left out when two runs are compared.
MACHINE_METRICS = ("wall_time", "peak_rss_mb", "threads", "device")


def chain_diagnostics(idata) -> dict:
    """Worst rank-normalised split R-hat (one chain is split in two, so it is defined for one chain too) and
    smallest bulk ESS over every posterior quantity of an MCMC run: what the reliability check reads
    (``r_hat_max`` > 1.01 is a warning)."""
    import arviz as az

    post = idata.posterior
    if post.sizes.get("chain", 1) == 1 and post.sizes.get("draw", 0) >= 8:
        # arviz gives no R-hat for one chain; split-R-hat of its two halves is the standard stand-in
        half = post.sizes["draw"] // 2
        post = az.convert_to_dataset({v: post[v].values[:, :2 * half].reshape(2, half, *post[v].shape[2:])
                                      for v in post.data_vars})
    # NaN for a quantity without spread (e.g. weights that sum to a constant): left out, not propagated
    rhat = np.concatenate([np.ravel(az.rhat(post)[v].values) for v in post.data_vars])
    ess = np.concatenate([np.ravel(az.ess(post)[v].values) for v in post.data_vars])
    return {"r_hat_max": float(np.nanmax(rhat)) if np.isfinite(rhat).any() else float("nan"),
            "ess_bulk_min": float(np.nanmin(ess)) if np.isfinite(ess).any() else float("nan")}


def comparable_metrics(metrics: dict) -> dict:
    """``metrics`` without timings and machine facts (keys ending in ``time``, ``_ms``, ``_s``, or in
    :data:`MACHINE_METRICS`): what two runs of the same job with the same seed must agree on."""
    def timing(key: str) -> bool:
        return key.endswith(("time", "_ms", "_s")) or key.startswith(MACHINE_METRICS)

    return {k: v for k, v in metrics.items() if not timing(k)}


@dataclass
class JobSettings:
    """Settings every job has (the command line's top-level ``seed``, ``threads``, ``device``, ``validate``).

    ``threads=None`` leaves torch's thread count as it is; 1 was fastest on small shared CPUs (see the
    benchmarks). ``device``: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:n]``.
    """

    seed: int = 0
    threads: int | None = 1
    device: str = "auto"
    validate: bool = False


class Job:
    """Context of one job; see the module docstring.

    Parameters
    ----------
    name : str
        The problem (recorded in ``metrics.json`` as ``problem``).
    settings : JobSettings, optional
    inputs : paths
        The user's input files: never written to.
    workdir : path, optional
        Where the job may write checkpoints while it runs (and, on the command line, its outputs); ``None`` for a
        job that writes nothing until :meth:`Result.save`.
    outputs : names
        Files the job will write in ``workdir``, checked against ``inputs`` before any work.
    hints : dict
        Advice appended to the reliability warnings of :mod:`~physppl.inference.reliability` that it names, e.g.
        which option raises the step budget.
    """

    def __init__(self, name: str, settings: JobSettings | None = None, *, inputs: Iterable = (),
                 workdir: str | os.PathLike | None = None, outputs: Sequence[str] = (),
                 hints: Mapping[str, str] | None = None):
        self.name = name
        self.hints = dict(hints or {})
        self.settings = settings or JobSettings()
        self.inputs = protect_inputs(*[p for p in inputs if p is not None])
        self.workdir = None if workdir is None else Path(workdir)
        self.outputs = tuple(outputs)
        self.device = torch.device("cpu")

    @property
    def seed(self) -> int:
        return int(self.settings.seed)

    def __enter__(self) -> "Job":
        s = self.settings
        if self.workdir is not None:
            for name in self.outputs:  # fail before any long run, not at the end
                if (self.workdir / name).resolve() in self.inputs:
                    raise ValueError(f"refusing to overwrite the input file {self.workdir / name}: write the outputs "
                                     "to another directory")
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(s.device)
        self._threads = torch.get_num_threads()
        if s.threads is not None:
            if int(s.threads) < 1:
                raise ValueError(f"threads must be >= 1 (or None to leave torch's setting), got {s.threads}")
            torch.set_num_threads(int(s.threads))
        # an empty parameter store for the job, the caller's restored afterwards: nothing leaks between jobs
        self._store = pyro.get_param_store().scope()
        self._store.__enter__()
        self._validation = pyro.validation_enabled(bool(s.validate))
        self._validation.__enter__()
        pyro.set_rng_seed(self.seed)
        self._signals = watch_signals()  # a signal stops the job at its engine's next step boundary
        self._signals.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._signals.__exit__(*exc)
        self._validation.__exit__(*exc)
        self._store.__exit__(*exc)
        torch.set_num_threads(self._threads)

    def result(self, cls: type["Result"] | None = None, **values) -> "Result":
        """A :class:`Result` (or the problem's subclass ``cls``) with the job's own metrics added and every metric
        rounded by the one rule; ``losses`` may be a list (one loss per step) or a DataFrame with a ``loss``
        column."""
        cls = cls or Result
        metrics = {"problem": self.name, **values.pop("metrics", {})}
        metrics.update(seed=self.seed, threads=torch.get_num_threads(), device=str(self.device),
                       wall_time_total=time.perf_counter() - self.t0,
                       # peak resident memory of this process so far (Linux reports KiB)
                       peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if metrics.get("engine") in ("nuts", "mcmc") and values.get("idata") is not None:
            metrics.update(chain_diagnostics(values["idata"]))
        losses = values.pop("losses", None)
        if losses is not None and not isinstance(losses, pd.DataFrame):
            losses = np.asarray(losses, dtype=float).reshape(-1)
            losses = pd.DataFrame({"step": np.arange(1, losses.size + 1), "loss": losses}) if losses.size else None
        return cls(metrics=flag_unreliable(round_metrics(metrics), self.hints), losses=losses, inputs=self.inputs, **values)


@dataclass
class Result:
    """What a job returns: the posterior, the headline figures, and the files a run directory holds.

    Attributes
    ----------
    idata : arviz.InferenceData
        ``posterior.nc``: draws in the units of the input, with named dims and coordinates.
    metrics : dict
        ``metrics.json``: headline figures and diagnostics (already rounded).
    losses : DataFrame, optional
        ``losses.csv``: ``step``, ``loss`` (and any other per-step columns).
    summary : DataFrame, optional
        ``summary.csv``: ``az.summary`` rows named by the model's coordinates.
    files : dict
        The problem's own outputs: file name -> ``write(path)``.
    figures : callable, optional
        ``figures(directory)`` draws the problem's plots.
    loss_curves : dict
        Extra curves for ``loss.png``: ``{label: (steps, values)}``.
    plot_losses : bool
        Draw ``loss.png`` from ``losses`` (a problem with its own training figure sets False).
    loss_label : str
        What ``losses["loss"]`` is, for the axis of ``loss.png``.
    """

    FILES: ClassVar[tuple[str, ...]] = ("posterior.nc", "summary.csv", LOSSES_FILE, "metrics.json")

    idata: Any = None
    metrics: dict = field(default_factory=dict)
    losses: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    files: dict[str, Callable[[Path], Any]] = field(default_factory=dict, repr=False)
    figures: Callable[[Path], Any] | None = field(default=None, repr=False)
    loss_curves: dict = field(default_factory=dict, repr=False)
    plot_losses: bool = True
    loss_label: str = "loss (-ELBO)"
    inputs: tuple[Path, ...] = ()

    def __repr__(self) -> str:
        head = {k: self.metrics[k] for k in list(self.metrics)[:8]}
        return f"{type(self).__name__}(metrics={head}, files={sorted(self.output_names())})"

    def output_names(self) -> list[str]:
        """The files :meth:`save` writes (figures aside)."""
        names = []
        if self.idata is not None:
            names.append("posterior.nc")
        if self.summary is not None:
            names.append("summary.csv")
        if self.losses is not None:
            names.append(LOSSES_FILE)
        return names + ["metrics.json"] + list(self.files)

    def save(self, directory: str | os.PathLike, figures: bool = True) -> Path:
        """Write every output into ``directory`` (created if needed), each file atomically; inputs are never
        overwritten. Returns the directory."""
        out = Path(directory)
        for name in self.output_names():
            if (out / name).resolve() in self.inputs:
                raise ValueError(f"refusing to overwrite the input file {out / name}: save to another directory")
        out.mkdir(parents=True, exist_ok=True)
        protect = self.inputs
        if self.idata is not None:
            atomic_write(out / "posterior.nc", lambda p: self.idata.to_netcdf(str(p), engine="h5netcdf"), protect)
        if self.summary is not None:
            atomic_write(out / "summary.csv", lambda p: self.summary.to_csv(p), protect)
        if self.losses is not None:
            atomic_write(out / LOSSES_FILE, lambda p: self.losses.to_csv(p, index=False), protect)
        for name, write in self.files.items():
            atomic_write(out / name, write, protect)
        if figures:
            if self.plot_losses and self.losses is not None and len(self.losses):
                from .plots import plot_loss  # matplotlib only when a figure is drawn

                plot_loss(self.losses["loss"].to_numpy(), out / "loss.png", ylabel=self.loss_label,
                          extra=self.loss_curves or None)
            if self.figures is not None:
                self.figures(out)
        write_json(out / "metrics.json", self.metrics)  # last: its presence marks a finished run
        log.info("outputs in %s", out)
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def config_options(cfg, fn: Callable, exclude: Iterable[str] = ()) -> dict:
    """The top-level configuration values of ``fn``'s keyword arguments (a problem's own options and the job
    settings), as plain Python values: how a command-line task passes its configuration to its Python function.
    ``exclude`` names the arguments the task builds itself (from config groups such as ``data`` or ``model``)."""
    from omegaconf import OmegaConf

    skip = set(exclude)
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or p.kind is not p.KEYWORD_ONLY or name not in cfg:
            continue
        value = cfg[name]
        out[name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out
