"""``physppl.train_rbm``: a restricted Boltzmann machine trained by the lecture's gradient (positive phase from the
data, negative phase from the model's Markov chains) and scored exactly or by AIS; the Ising thermodynamics of one RBM
per temperature is :mod:`physppl.rbm.thermodynamics`.

* :func:`train_rbm`: one RBM on a data set (binarised digits, Ising configurations, your 0/1 or +-1 arrays); held-out
  log-likelihood in nats per sample (exact when the smaller layer can be enumerated, AIS with its error bar otherwise),
  on the same split as :func:`physppl.train_vae`, so the two compare. Outputs: ``posterior.nc`` (draws of the hidden
  units of a held-out batch from their exact posterior p(h | v), with the configurations), ``metrics.json``,
  ``rbm.pt`` (the trained parameters), ``history.csv``, ``losses.csv``, ``training.png``, ``filters.png``,
  ``samples.png``.
The command line ``physppl +experiment=rbm_digits`` calls :func:`task`.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import arviz as az
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.inference.ais import annealed_log_z
from physppl.inference.convert import to_inference_data
from physppl.inference.fit import Fit
from physppl.inference.presets import resolve_named
from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.models.rbm import BernoulliRBM, to_binary
from physppl.vae.data import DigitsDataSource, IsingDataSource, data_source

from .options import Evaluation
from .parts import GUIDES, MODELS, resolve_engine

__all__ = ["train_rbm", "RBMResult", "Evaluation", "log_likelihood", "log_odds", "save_model", "task", "OUTPUT_FILES"]

log = logging.getLogger(__name__)
OUTPUT_FILES = ("posterior.nc", "metrics.json", "rbm.pt", "history.csv", "losses.csv", "checkpoint.pt",
                "training.png", "filters.png", "samples.png", "loss.png")
DATASETS: dict[str, Callable[[], Any]] = {"digits": DigitsDataSource, "ising": IsingDataSource}


@dataclass(repr=False)
class RBMResult(Result):
    """:class:`~physppl.inference.runner.Result` of :func:`train_rbm`, with ``model`` (the trained
    :class:`BernoulliRBM`), ``guide`` (its exact p(h | v)), ``data`` and ``training`` (the engine's
    :class:`~physppl.inference.contrastive.ContrastiveResult`)."""

    model: BernoulliRBM | None = None
    guide: Any = None
    data: Any = None
    training: Any = None


def _source(data: Any) -> Any:
    return data_source(data, DATASETS, "train_rbm")


def log_likelihood(rbm: BernoulliRBM, v: torch.Tensor, evaluation: Evaluation = Evaluation(),
                   seed: int = 0, base: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean log p(v) in nats per sample with its standard error: exact ``log Z`` when the smaller layer has at most
    ``evaluation.exact_max_units`` units, else AIS from independent units at ``base`` (the training data's log-odds
    is the usual base) with its error bar added in quadrature to the sampling error of the mean."""
    with torch.no_grad():
        neg_f = -rbm.free_energy(v)
        if min(rbm.n_visible, rbm.n_hidden) <= evaluation.exact_max_units:
            log_z, log_z_se, method, ess = float(rbm.log_z_exact()), 0.0, "exact", None
        else:
            res = annealed_log_z(rbm.ais_base(base), n_chains=evaluation.ais_chains, n_betas=evaluation.ais_betas,
                                 seed=seed)
            log_z, log_z_se, method, ess = res.log_z, res.log_z_se, "ais", res.ess
    ll = neg_f.double().cpu().numpy() - log_z
    se = math.sqrt(ll.var(ddof=1) / len(ll) + log_z_se**2) if len(ll) > 1 else log_z_se
    return {"mean": float(ll.mean()), "se": se, "log_z": log_z, "log_z_se": log_z_se, "method": method,
            "ais_ess": ess, "per_sample": ll}


def log_odds(v: torch.Tensor) -> torch.Tensor:
    """The visible units' log-odds in ``v`` (clipped at 1e-3): AIS's base model."""
    p = v.mean(0).clamp(1e-3, 1 - 1e-3)
    return torch.log(p / (1 - p))


def _monitor(rbm: BernoulliRBM, v_val: torch.Tensor, ev: Evaluation) -> Callable:
    """The per-epoch callback: held-out log-likelihood (exact when enumerable) or pseudo-log-likelihood per sample."""
    exact = min(rbm.n_visible, rbm.n_hidden) <= min(ev.exact_max_units, 16)  # cheap enough every few epochs
    v = v_val[: ev.monitor_points]

    def callback(epoch: int, result) -> dict | None:
        if ev.eval_every_epochs < 1 or epoch % ev.eval_every_epochs or len(v) == 0:
            return None
        with torch.no_grad():
            out = {"heldout_pll": float(rbm.pseudo_log_likelihood(v).mean())}
            if exact:
                out["heldout_ll"] = float(rbm.log_prob_exact(v).mean())
        return out

    return callback


def _hidden_posterior(rbm: BernoulliRBM, guide, v: torch.Tensor, rows: np.ndarray, n_draws: int) -> az.InferenceData:
    """Draws of the hidden units of ``v`` from the guide (the exact p(h | v)) with the configurations themselves."""
    with torch.no_grad():
        probs = rbm.hidden_probs(v)
        h = torch.bernoulli(probs.expand(n_draws, -1, -1).contiguous())
    fit = Fit(model=rbm, guide=guide, data={"v": v}, draws={"h": h[None].cpu()})
    idata = to_inference_data(fit, log_likelihood=False, coords={"data": np.asarray(rows),
                                                                  "hidden": np.arange(rbm.n_hidden)},
                              dims={"h": ["data", "hidden"]})
    # the configurations enter through a factor (the free energy), so the conversion sees no observed site
    idata.extend(az.from_dict(observed_data={"v": v.cpu().numpy()}, dims={"v": ["data", "visible"]},
                              coords={"data": np.asarray(rows), "visible": np.arange(rbm.n_visible)}))
    idata.posterior.attrs["physppl_note"] = "h ~ p(h | v), the RBM's exact conditional (its guide)"
    return idata


def save_model(rbm: BernoulliRBM, extra: dict | None = None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        torch.save({"n_visible": rbm.n_visible, "n_hidden": rbm.n_hidden, "state_dict": rbm.state_dict(),
                    **(extra or {})}, path)

    return write


def train_rbm(
    data: Any = "digits",
    *,
    model: Any = "rbm",
    guide: Any = "exact",
    engine: Any = "cd",
    evaluation: Evaluation | dict = Evaluation(),
    n_draws: int = 100,
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
) -> RBMResult:
    """Train a Bernoulli RBM on ``data``'s training split and score it on the held-out test split.

    Parameters
    ----------
    data : str, path or data source
        ``"digits"`` (scikit-learn's 8x8 digits binarised at 0.5, the VAE's split), ``"ising"``, a ``.npy``/``.npz``
        of 0/1 or +-1 configurations (n, N) or (n, L, L), or a data source with ``load()`` (``DigitsDataSource``,
        ``IsingDataSource(L=4, ...)``, ``ArrayDataSource(path=...)``).
    model : str or factory
        ``"rbm"`` (:data:`~physppl.rbm.parts.MODELS`) or ``factory(n_visible=..., seed=...)`` such as
        ``functools.partial(BernoulliRBM, n_hidden=64)``.
    guide : str or factory
        ``"exact"``: :class:`~physppl.guides.rbm.RBMGuide`, the exact p(h | v) (``factory(model=rbm)``).
    engine : str or ContrastiveDivergence
        ``"cd"`` (CD-10, Adam), ``"pcd"``, ``"pt"`` or your engine.
    evaluation : Evaluation or dict
    n_draws : int
        Draws of the hidden units per held-out sample in posterior.nc.
    """
    ev = Evaluation(**evaluation) if isinstance(evaluation, dict) else evaluation
    source = _source(data)
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    with Job("rbm", settings, inputs=[getattr(source, "path", None)], workdir=workdir, outputs=OUTPUT_FILES,
             ) as job:
        d = source.load()
        v = to_binary(d.x, d.source).to(job.device)
        split = {k: torch.as_tensor(np.asarray(i), device=job.device) for k, i in d.split.items()}
        v_train, v_val, v_test = v[split["train"]], v[split["val"]], v[split["test"]]
        if len(v_test) < 2:
            raise ValueError(f"{d.source}: the test split has {len(v_test)} samples; need at least 2 to score")
        rbm = resolve_named(model, MODELS, "model")(n_visible=v.shape[1], seed=job.seed)
        if not isinstance(rbm, BernoulliRBM):
            raise TypeError(f"train_rbm: the model must be a BernoulliRBM (or subclass), got {type(rbm).__name__}")
        rbm = rbm.to(job.device).init_from_data(v_train)
        rbm_guide = resolve_named(guide, GUIDES, "guide")(model=rbm)
        eng = resolve_engine(engine)
        log.info("data %s: %d train / %d val / %d test samples of %d units; RBM with %d hidden units, %r", d.name,
                 len(v_train), len(v_val), len(v_test), v.shape[1], rbm.n_hidden, eng)
        fit = eng.fit(rbm, rbm_guide, {"v": v_train}, workdir=workdir,
                      callback=_monitor(rbm, v_val if len(v_val) else v_test, ev))
        train = fit.info["result"]
        t0 = time.perf_counter()
        base = log_odds(v_train)
        test = log_likelihood(rbm, v_test, ev, seed=job.seed, base=base)
        n_units = v.shape[1]
        metrics: dict = {
            "data": d.name, "n_train": len(v_train), "n_val": len(v_val), "n_test": len(v_test),
            "n_visible": rbm.n_visible, "n_hidden": rbm.n_hidden, "engine": "contrastive",
            "negative_phase": getattr(eng, "negative", None), "k": getattr(eng, "k", None),
            **{k: x for k, x in fit.info.items() if k not in ("result", "engine")},
            "test_log_likelihood": test["mean"], "test_log_likelihood_se": test["se"], "log_z": test["log_z"],
            "log_z_se": test["log_z_se"], "log_z_method": test["method"], "ais_ess": test["ais_ess"],
            "test_bits_per_dim": -test["mean"] / (n_units * math.log(2)),
            "test_pseudo_log_likelihood": float(rbm.pseudo_log_likelihood(v_test).mean().detach()),
            "train_log_likelihood": float((-rbm.free_energy(v_train).detach().cpu().double()).mean() - test["log_z"]),
        }
        if test["method"] == "ais":
            metrics.update(ais_chains=ev.ais_chains, ais_betas=ev.ais_betas)
        metrics["eval_time"] = time.perf_counter() - t0
        rows = d.split["test"][: ev.posterior_batch]
        idata = _hidden_posterior(rbm, rbm_guide, v[torch.as_tensor(rows, device=job.device)], rows, n_draws)
        history = pd.DataFrame(train.history)
        gen = torch.Generator(device=job.device).manual_seed(job.seed + 1)
        samples = rbm.sample(32, 1000, generator=gen).cpu().numpy()
        shape = d.image_shape or _square(n_units)

        def figures(out: Path) -> None:
            from . import plots

            if not ev.figures:
                return
            plots.plot_training(history, train.losses, out / "training.png", title=f"RBM on {d.name}")
            if shape is not None:
                plots.plot_filters(rbm.W.detach().cpu().numpy(), shape, out / "filters.png")
                plots.plot_samples(samples, shape, out / "samples.png",
                                   f"{d.name}: block-Gibbs samples of the RBM (1,000 sweeps)")

        log.info("test log-likelihood %.4f +- %.4f nats per sample (%s log Z)", test["mean"], test["se"],
                 test["method"])
        return job.result(RBMResult, idata=idata, metrics=metrics, losses=train.losses, plot_losses=False,
                          files={"rbm.pt": save_model(rbm), "history.csv": lambda p: history.to_csv(p, index=False)},
                          figures=figures, model=rbm, guide=rbm_guide, data=d, training=train)


def _square(n: int) -> tuple[int, int] | None:
    r = int(round(math.sqrt(n)))
    return (r, r) if r * r == n else None


def task(cfg: DictConfig, workdir: str | os.PathLike) -> RBMResult:
    """The command line's RBM job: :func:`train_rbm` with the configuration's values."""
    return train_rbm(instantiate(cfg.data), model=instantiate(cfg.model), guide=instantiate(cfg.guide),
                     engine=instantiate(cfg.inference), workdir=workdir,
                     **config_options(cfg, train_rbm, exclude=("model", "guide", "engine")))
