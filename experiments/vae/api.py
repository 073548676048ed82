"""``physppl.train_vae``: data in; SVI with an amortized encoder, held-out ELBO / IWAE, latent posterior, figures out.

Outputs (``Result.save``): ``posterior.nc`` (latent draws for one batch of held-out samples), ``latents.csv``
(encoder means and labels of the held-out samples), ``loss.png``, ``reconstructions.png``, ``samples.png``,
``latent.png`` and, on Ising data, ``phase.png``; with a ``workdir``, ``checkpoint.pt``, ``best_params.pt`` and
``heldout.json`` make the run resumable. The command line (``physppl +experiment=vae_ising``) calls :func:`task`.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyro
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.inference.convert import to_inference_data
from physppl.inference.fit import Fit, ProtocolError
from physppl.inference.iwae import ImportanceEstimate, importance_log_weights
from physppl.inference.presets import resolve_named
from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.models.vae import check_support

from .data import DigitsDataSource, IsingDataSource, VAEData, data_source
from .options import Evaluation, PhaseAnalysis, Training
from .parts import GUIDES, MODELS, resolve_engine
from .training import FitResult, amortization_gap, fit_vae

__all__ = ["train_vae", "VAEResult", "Training", "Evaluation", "PhaseAnalysis", "task", "evaluate", "latent_posterior",
           "OUTPUT_FILES"]

OUTPUT_FILES = ("posterior.nc", "metrics.json", "latents.csv", "checkpoint.pt", "best_params.pt", "heldout.json",
                "loss.png", "losses.csv", "reconstructions.png", "samples.png", "latent.png", "phase.png")

log = logging.getLogger(__name__)

# what the runner's reliability warnings should advise, in this problem's options
RELIABILITY_HINTS = {"not_converged": "raise training.epochs"}


@dataclass(repr=False)
class VAEResult(Result):
    """:class:`~physppl.inference.runner.Result` of a VAE, with

    Attributes
    ----------
    model, guide : the trained decoder model and encoder guide (best held-out parameters restored)
    latents : DataFrame
        ``latents.csv``: encoder means of the held-out samples with their labels.
    data : VAEData
    training : FitResult
        Losses, held-out history, steps, stop reason.
    """

    model: Any = None
    guide: Any = None
    latents: pd.DataFrame | None = None
    data: VAEData | None = None
    training: FitResult | None = None


DATASETS: dict[str, Callable[[], Any]] = {"digits": DigitsDataSource, "ising": IsingDataSource}


def _source(data: Any) -> Any:
    return data_source(data, DATASETS, "train_vae")


def latent_posterior(model, guide, x: torch.Tensor, rows: np.ndarray, labels: dict[str, np.ndarray],
                     n_draws: int, log_likelihood: bool = True):
    """InferenceData of ``n_draws`` guide draws of ``z`` for the samples ``x`` (one batch), with the observed
    samples and the log-likelihood ``log p(x_i | z)`` per sample and draw (the one conversion path)."""
    with torch.no_grad():
        z = guide.distribution(x).sample((n_draws,))  # (draws, n, latent_dim), one vectorised call
    event_dims = ["row", "col"] if x.dim() == 3 else [f"x_dim_{k}" for k in range(x.dim() - 1)]
    fit = Fit(model=model, guide=guide, data={"x": x}, draws={"z": z[None].cpu()})
    coords = {"data": np.asarray(rows), "latent": np.arange(z.shape[-1])}
    extra = {"data": {k: np.asarray(v) for k, v in labels.items()}}
    return to_inference_data(fit, log_likelihood=log_likelihood, coords=coords, dim_coords=extra,
                             dims={"z": ["data", "latent"], "x": ["data", *event_dims]})


def evaluate(model, guide, x: torch.Tensor, num_particles: int, batch_size: int = 64) -> ImportanceEstimate:
    """ELBO and IWAE (``num_particles`` importance samples) per sample of ``x``."""
    return ImportanceEstimate(importance_log_weights(model, guide, x.shape[0], num_particles, {"x": x},
                                                     batch_size=batch_size))


def _subset(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(k), replace=False))


def train_vae(
    data: Any = "digits",
    *,
    model: Any = "mlp",
    guide: Any = "encoder",
    engine: Any = "svi",
    training: Training | dict = Training(),
    evaluation: Evaluation | dict = Evaluation(),
    physics: PhaseAnalysis | dict = PhaseAnalysis(),
    n_draws: int = 200,
    log_likelihood: bool = True,
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
) -> VAEResult:
    """Train a VAE by SVI with held-out early stopping, and evaluate it (ELBO, IWAE, amortization gap, phases).

    Parameters
    ----------
    data : str, path or data source
        ``"digits"`` (scikit-learn's 8x8 digits), ``"ising"`` (2-D Ising configurations across T_c, simulated once
        and cached), a ``.npy``/``.npz`` of samples, or a data source (``DigitsDataSource(binarize=False)``, ...).
    model, guide : str, class or factory
        By name (:data:`~physppl.vae.parts.MODELS`: ``"mlp"``, ``"conv"``; :data:`~physppl.vae.parts.GUIDES`:
        ``"encoder"``, ``"conv_encoder"``, ``"iaf"``), or factories ``model(event_shape=...)`` and
        ``guide(event_shape=..., latent_dim=...)`` such as ``functools.partial(VAEModel, latent_dim=2)``, or your own
        modules' classes with the same sites (``z`` and ``x`` in plate ``"data"``).
    engine : str or SVIEngine
        ``"svi"`` (minibatches of 128, analytic KL, Adam at 1e-3) or your engine.
    training, evaluation, physics : dataclass or dict
        See :class:`Training`, :class:`Evaluation`, :class:`PhaseAnalysis`.
    n_draws : int
        Latent draws per sample in ``posterior.nc``.
    """
    tr = Training(**training) if isinstance(training, dict) else training
    ev = Evaluation(**evaluation) if isinstance(evaluation, dict) else evaluation
    ph = PhaseAnalysis(**physics) if isinstance(physics, dict) else physics
    source = _source(data)
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    with Job("vae", settings, inputs=[getattr(source, "path", None)], workdir=workdir, outputs=OUTPUT_FILES,
             hints=RELIABILITY_HINTS) as job:
        d = source.load()
        net = resolve_named(model, MODELS, "model")(event_shape=d.event_shape)
        if not isinstance(net, torch.nn.Module):
            raise ProtocolError(f"train_vae: model {type(net).__name__} is not an nn.Module")
        check_support(d.x, getattr(net, "likelihood", "bernoulli"), d.source)
        enc = resolve_named(guide, GUIDES, "guide")(event_shape=d.event_shape, latent_dim=net.latent_dim)
        net, enc = net.to(job.device), enc.to(job.device)
        eng = resolve_engine(engine)
        x = d.x.to(job.device)
        split = {k: torch.as_tensor(v, device=job.device) for k, v in d.split.items()}
        x_train, x_val, x_test = x[split["train"]], x[split["val"]], x[split["test"]]
        log.info("data %s: %d train / %d val / %d test samples of shape %s on %s", d.name, len(x_train), len(x_val),
                 len(x_test), tuple(d.event_shape), job.device)
        fit = fit_vae(net, enc, x_train, x_val, eng, workdir=workdir, epochs=tr.epochs,
                      eval_every_epochs=tr.eval_every_epochs, patience=tr.patience, min_delta=tr.min_delta,
                      eval_particles=tr.eval_particles, convergence_test=tr.convergence_test)
        log.info("training: %s; best held-out ELBO %.3f at step %d", fit.stop_reason, fit.best_heldout_elbo,
                 fit.best_step)
        return _evaluate(job, d, net, enc, fit, x, x_train, x_test, ev, ph, n_draws, log_likelihood)


def _evaluate(job: Job, d: VAEData, model, guide, fit: FitResult, x, x_train, x_test, ev: Evaluation,
              ph: PhaseAnalysis, n_draws: int, log_likelihood: bool) -> VAEResult:
    seed = job.seed
    pyro.set_rng_seed(seed + 1)  # evaluation draws do not depend on how long training ran
    t0 = time.perf_counter()
    rows = _subset(len(x_test), ev.max_points, seed)
    est = evaluate(model, guide, x_test[rows], ev.iwae_particles, ev.batch_size)
    n_pix = math.prod(d.event_shape)
    metrics: dict = {
        "data": d.name, "n_train": len(x_train), "n_val": len(d.split["val"]), "n_test": len(x_test),
        "event_shape": list(d.event_shape), "likelihood": getattr(model, "likelihood", None),
        "latent_dim": model.latent_dim, "decoder": getattr(model, "decoder_kind", None),
        "guide": type(guide).__name__, "flow": getattr(guide, "flow", None), "engine": "svi",
        "steps": fit.steps, "epochs_run": fit.info["epochs_run"], "stop_reason": fit.stop_reason,
        "train_time": fit.train_time, "step_time_ms": fit.step_time_ms, "resumed_from": fit.resumed_from,
        "best_step": fit.best_step, "best_epoch": fit.best_step / fit.info["steps_per_epoch"],
        "heldout_elbo": fit.best_heldout_elbo, "test_elbo": float(est.elbo.mean()),
        "test_iwae": float(est.iwae.mean()), "test_iwae_sem": float(est.iwae.std() / math.sqrt(len(rows))),
        "iwae_particles": ev.iwae_particles, "iwae_points": len(rows), "test_ess_mean": float(est.ess.mean()),
        "test_bits_per_dim": float(-est.iwae.mean() / (n_pix * math.log(2))),
    }
    if ev.gap_points > 0:
        # a random subset of the IWAE points (the test rows are ordered, e.g. by temperature)
        pick = np.sort(np.random.default_rng(seed + 2).permutation(len(rows))[: min(ev.gap_points, len(rows))])
        pyro.set_rng_seed(seed + 2)
        gap = amortization_gap(model, guide, x_test[rows[pick]], steps=ev.gap_steps, lr=ev.gap_lr,
                               particles=ev.gap_particles, iwae_particles=ev.iwae_particles)
        # log p(x) on the subset: the tighter of the IWAE estimates with the encoder and the optimised proposal
        iwae_encoder = float(est.iwae[torch.as_tensor(pick)].mean())
        log_px = max(iwae_encoder, gap["iwae_meanfield"])
        metrics.update(amortization_gap=gap["amortization_gap"], gap_elbo_amortized=gap["elbo_amortized"],
                       gap_elbo_meanfield=gap["elbo_meanfield"], gap_iwae_encoder=iwae_encoder,
                       gap_iwae_meanfield=gap["iwae_meanfield"], gap_log_px=log_px,
                       approximation_gap=log_px - gap["elbo_meanfield"], gap_points=gap["n"])
    metrics["eval_time"] = time.perf_counter() - t0

    # -- latent posterior of one held-out batch ------------------------------------------------------------------
    test_rows = d.split["test"]
    labels_test = {k: v[test_rows] for k, v in d.labels.items()}
    post_rows = _subset(len(x_test), min(ev.posterior_batch, len(x_test)), seed + 3)
    if ev.posterior_rows:  # rows of the data set chosen by the user, else a random held-out batch
        rows_all = np.asarray(ev.posterior_rows, dtype=int)
        if rows_all.min() < 0 or rows_all.max() >= d.n:
            raise ValueError(f"evaluation.posterior_rows must index the {d.n} samples, got {list(ev.posterior_rows)}")
        batch_x = x[torch.as_tensor(rows_all, device=x.device)]
        batch_labels = {k: v[rows_all] for k, v in d.labels.items()}
    else:
        rows_all, batch_x = test_rows[post_rows], x_test[post_rows]
        batch_labels = {k: v[post_rows] for k, v in labels_test.items()}
    idata = latent_posterior(model, guide, batch_x, rows_all, batch_labels, n_draws, log_likelihood)

    mu_test = guide.latent_mean(x_test).cpu().numpy()
    table = pd.DataFrame({"row": test_rows, **{f"z{j}": mu_test[:, j] for j in range(mu_test.shape[1])},
                          **labels_test})

    # -- physics ---------------------------------------------------------------------------------------------
    analysis = None
    if d.meta.get("kind") == "ising" or {"temperature", "magnetization"} <= set(d.labels):
        from .physics import phase_analysis  # scikit-learn: imported for Ising data only

        mu_train = guide.latent_mean(x_train).cpu().numpy()
        labels_train = {k: v[d.split["train"]] for k, v in d.labels.items()}
        analysis = phase_analysis(mu_train, labels_train, mu_test, labels_test, ordered_below=ph.ordered_below,
                                  disordered_above=ph.disordered_above, seed=seed)
        metrics.update({k: v for k, v in analysis.items() if k != "curves" and not isinstance(v, (list, np.ndarray))})
        if "classifier_window" in analysis:
            metrics["classifier_window"] = analysis["classifier_window"]

    with torch.no_grad():
        shape = d.image_shape
        show = post_rows[np.unique(np.linspace(0, len(post_rows) - 1, 32).round().astype(int))]  # all temperatures
        images = None
        if shape is not None and ev.figures:
            recon = model.decode(guide.latent_mean(x_test[show])).cpu().numpy()
            images = {"orig": x_test[show].cpu().numpy(), "recon": recon,
                      "means": model.sample(32, mean=True).cpu().numpy(), "draws": model.sample(16, mean=False).cpu().numpy()}

    def figures(out: Path) -> None:
        from . import plots  # matplotlib only when figures are drawn

        if not ev.figures:
            return
        if fit.losses:
            plots.plot_loss(np.asarray(fit.losses), fit.history, fit.info["steps_per_epoch"], out / "loss.png",
                            fit.best_step)
        if analysis is not None:
            plots.plot_phase(analysis, labels_test, out / "phase.png")
        plots.plot_latent(mu_test, labels_test, out / "latent.png", title=f"{d.name}: encoder means of held-out samples")
        if images is not None:
            first = (lambda a: a[:, 0]) if len(d.event_shape) == 3 else (lambda a: a)
            caption = None
            if "temperature" in labels_test:
                caption = "T = " + ", ".join(f"{t:.2f}" for t in labels_test["temperature"][show][:8]) + ", ..."
            plots.plot_reconstructions(first(images["orig"]).reshape(-1, *shape[:2]),
                                       first(images["recon"]).reshape(-1, *shape[:2]), out / "reconstructions.png",
                                       captions=caption)
            grid = np.concatenate([first(images["means"]).reshape(-1, *shape[:2]),
                                   first(images["draws"]).reshape(-1, *shape[:2])])
            plots.plot_image_grid(grid, out / "samples.png",
                                  "samples from the prior: decoder means (rows 1-4) and draws of p(x | z) (rows 5-6)")

    files = {"latents.csv": lambda p: table.to_csv(p, index=False)}
    log.info("test ELBO %.3f, IWAE %.3f nats per sample", metrics["test_elbo"], metrics["test_iwae"])
    return job.result(VAEResult, idata=idata, metrics=metrics, losses=fit.losses, files=files, figures=figures,
                      plot_losses=False, model=model, guide=guide, latents=table, data=d, training=fit)


def task(cfg: DictConfig, workdir: str | os.PathLike) -> VAEResult:
    """The command line's VAE job: :func:`train_vae` with the configuration's values."""
    return train_vae(instantiate(cfg.data), model=instantiate(cfg.model), guide=instantiate(cfg.guide),
                     engine=instantiate(cfg.inference), workdir=workdir,
                     **config_options(cfg, train_vae, exclude=("model", "guide", "engine")))
