"""The VAE job: data in, SVI with an amortized encoder, held-out ELBO / IWAE, latent posterior and figures out.

Called by the ``physppl`` app as ``run(cfg, output_dir)``; returns the headline metrics (the app writes them to
``metrics.json``). Outputs in ``output_dir``: ``posterior.nc`` (latent draws for one batch of held-out samples),
``latents.csv`` (encoder means and labels of the held-out samples), ``loss.png``, ``reconstructions.png``,
``samples.png``, ``latent.png`` and, on Ising data, ``phase.png``; ``checkpoint.pt``, ``best_params.pt`` and
``heldout.json`` make the run resumable.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from physppl.inference.convert import draws_to_inference_data
from physppl.inference.device import resolve_device
from physppl.inference.iwae import ImportanceEstimate, importance_log_weights
from physppl.inference.outputs import atomic_write, protect_inputs, write_losses
from physppl.inference.svi import SVIEngine
from physppl.models.vae import check_support

from . import plots
from .data import VAEData
from .physics import phase_analysis
from .training import FitResult, amortization_gap, fit_vae

__all__ = ["run", "build", "evaluate", "latent_posterior", "OUTPUT_FILES"]

OUTPUT_FILES = ("posterior.nc", "metrics.json", "latents.csv", "checkpoint.pt", "best_params.pt", "heldout.json",
                "loss.png", "losses.csv", "reconstructions.png", "samples.png", "latent.png", "phase.png")

log = logging.getLogger(__name__)


def _cfg(cfg: DictConfig, key: str) -> dict:
    node = cfg.get(key)
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def build(cfg: DictConfig, data: VAEData, device: torch.device):
    """Model, guide and engine from the config, checked against the data, on ``device``."""
    model = instantiate(cfg.model)(event_shape=data.event_shape)
    check_support(data.x, model.likelihood, data.source)
    guide = instantiate(cfg.guide)(event_shape=data.event_shape, latent_dim=model.latent_dim)
    engine = instantiate(cfg.inference)
    if not isinstance(engine, SVIEngine):
        raise ValueError(f"the VAE is trained by stochastic variational inference: use inference=svi, got "
                         f"{type(engine).__name__}")
    return model.to(device), guide.to(device), engine


def latent_posterior(model, guide, x: torch.Tensor, rows: np.ndarray, labels: dict[str, np.ndarray],
                     n_draws: int, log_likelihood: bool = True):
    """InferenceData of ``n_draws`` guide draws of ``z`` for the samples ``x`` (one batch), with the observed
    samples and the log-likelihood ``log p(x_i | z)`` per sample and draw."""
    with torch.no_grad():
        z = guide.distribution(x).sample((n_draws,))  # (draws, n, latent_dim)
        ll = model.log_likelihood(x, z) if log_likelihood else None
    event_dims = ["row", "col"] if x.dim() == 3 else [f"x_dim_{k}" for k in range(x.dim() - 1)]
    dims = {"z": ["data", "latent"], "x": ["data", *event_dims]}
    coords = {"data": np.asarray(rows), "latent": np.arange(z.shape[-1])}
    extra = {"data": {k: np.asarray(v) for k, v in labels.items()}}
    return draws_to_inference_data(
        {"z": z[None]}, dims, observed_data={"x": x.cpu().numpy()},
        log_likelihood=None if ll is None else {"x": ll[None].cpu().numpy()}, coords=coords, dim_coords=extra)


def evaluate(model, guide, x: torch.Tensor, num_particles: int, batch_size: int = 64) -> ImportanceEstimate:
    """ELBO and IWAE (``num_particles`` importance samples) per sample of ``x``."""
    return ImportanceEstimate(importance_log_weights(model, guide, x.shape[0], num_particles, {"x": x},
                                                     batch_size=batch_size))


def _subset(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(k), replace=False))


def _round(d: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in d.items()}


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    """The VAE job; see the module docstring for its outputs."""
    out = Path(output_dir)
    seed = int(cfg.get("seed", 0))
    device = resolve_device(cfg.get("device", "auto"))
    source = instantiate(cfg.data)
    protect = protect_inputs(getattr(source, "path", None))
    for name in OUTPUT_FILES:  # fail before any long run, not at the end
        if (out / name).resolve() in protect:
            raise ValueError(f"refusing to overwrite the input file {out / name}: choose another hydra.run.dir")
    data = source.load()
    model, guide, engine = build(cfg, data, device)
    tcfg, ecfg, pcfg = _cfg(cfg, "train"), _cfg(cfg, "evaluation"), _cfg(cfg, "physics")
    figures = bool(ecfg.get("figures", True))
    x = data.x.to(device)
    split = {k: torch.as_tensor(v, device=device) for k, v in data.split.items()}
    x_train, x_val, x_test = x[split["train"]], x[split["val"]], x[split["test"]]
    log.info("data %s: %d train / %d val / %d test samples of shape %s on %s", data.name, len(x_train), len(x_val),
             len(x_test), tuple(data.event_shape), device)

    fit: FitResult = fit_vae(model, guide, x_train, x_val, engine, workdir=out, epochs=tcfg.get("epochs"),
                             eval_every_epochs=int(tcfg.get("eval_every_epochs", 1)),
                             patience=tcfg.get("patience", 10), min_delta=float(tcfg.get("min_delta", 0.0)),
                             eval_particles=int(tcfg.get("eval_particles", 1)),
                             convergence_test=bool(tcfg.get("convergence_test", False)))
    log.info("training: %s; best held-out ELBO %.3f at step %d", fit.stop_reason, fit.best_heldout_elbo, fit.best_step)

    # -- held-out figures ----------------------------------------------------------------------------------------
    pyro.set_rng_seed(seed + 1)  # evaluation draws do not depend on how long training ran
    t0 = time.perf_counter()
    k_iwae = int(ecfg.get("iwae_particles", 1000))
    rows = _subset(len(x_test), ecfg.get("max_points", 1000), seed)
    est = evaluate(model, guide, x_test[rows], k_iwae, int(ecfg.get("batch_size", 64)))
    n_pix = math.prod(data.event_shape)
    metrics: dict = {
        "data": data.name, "n_train": len(x_train), "n_val": len(x_val), "n_test": len(x_test),
        "event_shape": list(data.event_shape), "likelihood": model.likelihood, "latent_dim": model.latent_dim,
        "decoder": model.decoder_kind, "guide": type(guide).__name__, "flow": getattr(guide, "flow", None),
        "device": str(device), "steps": fit.steps, "epochs_run": round(fit.info["epochs_run"], 2),
        "stop_reason": fit.stop_reason, "train_time": fit.train_time, "step_time_ms": fit.step_time_ms,
        "resumed_from": fit.resumed_from, "best_step": fit.best_step,
        "best_epoch": fit.best_step / fit.info["steps_per_epoch"], "heldout_elbo": fit.best_heldout_elbo,
        "test_elbo": float(est.elbo.mean()), "test_iwae": float(est.iwae.mean()),
        "test_iwae_sem": float(est.iwae.std() / math.sqrt(len(rows))), "iwae_particles": k_iwae,
        "iwae_points": len(rows), "test_ess_mean": float(est.ess.mean()),
        "test_bits_per_dim": float(-est.iwae.mean() / (n_pix * math.log(2))),
    }
    n_gap = int(ecfg.get("gap_points", 100))
    if n_gap > 0:
        # a random subset of the IWAE points (the test rows are ordered, e.g. by temperature)
        pick = np.sort(np.random.default_rng(seed + 2).permutation(len(rows))[: min(n_gap, len(rows))])
        pyro.set_rng_seed(seed + 2)
        gap = amortization_gap(model, guide, x_test[rows[pick]], steps=int(ecfg.get("gap_steps", 500)),
                               lr=float(ecfg.get("gap_lr", 0.05)), particles=int(ecfg.get("gap_particles", 100)),
                               iwae_particles=k_iwae)
        # log p(x) on the subset: the tighter of the IWAE estimates with the encoder and the optimised proposal
        iwae_encoder = float(est.iwae[torch.as_tensor(pick)].mean())
        log_px = max(iwae_encoder, gap["iwae_meanfield"])
        metrics.update(amortization_gap=gap["amortization_gap"], gap_elbo_amortized=gap["elbo_amortized"],
                       gap_elbo_meanfield=gap["elbo_meanfield"], gap_iwae_encoder=iwae_encoder,
                       gap_iwae_meanfield=gap["iwae_meanfield"], gap_log_px=log_px,
                       approximation_gap=log_px - gap["elbo_meanfield"], gap_points=gap["n"])
    metrics["eval_time"] = time.perf_counter() - t0

    # -- latent posterior of one held-out batch ------------------------------------------------------------------
    test_rows = data.split["test"]
    labels_test = {k: v[test_rows] for k, v in data.labels.items()}
    n_post = min(int(ecfg.get("posterior_batch", 64)), len(x_test))
    post_rows = _subset(len(x_test), n_post, seed + 3)
    chosen = ecfg.get("posterior_rows")  # rows of the data set chosen by the user, else a random held-out batch
    if chosen:
        rows_all = np.asarray(chosen, dtype=int)
        if rows_all.min() < 0 or rows_all.max() >= data.n:
            raise ValueError(f"evaluation.posterior_rows must index the {data.n} samples, got {list(chosen)}")
        batch_x, batch_labels = x[torch.as_tensor(rows_all, device=device)], {k: v[rows_all] for k, v in
                                                                              data.labels.items()}
    else:
        rows_all, batch_x = test_rows[post_rows], x_test[post_rows]
        batch_labels = {k: v[post_rows] for k, v in labels_test.items()}
    idata = latent_posterior(model, guide, batch_x, rows_all, batch_labels, int(cfg.get("n_draws", 200)),
                             bool(cfg.get("log_likelihood", True)))
    atomic_write(out / "posterior.nc", lambda p: idata.to_netcdf(str(p), engine="h5netcdf"), protect=protect)

    mu_test = guide.latent_mean(x_test).cpu().numpy()
    table = pd.DataFrame({"row": test_rows, **{f"z{j}": mu_test[:, j] for j in range(mu_test.shape[1])},
                          **labels_test})
    atomic_write(out / "latents.csv", lambda p: table.to_csv(p, index=False), protect=protect)

    # -- physics ---------------------------------------------------------------------------------------------
    if data.meta.get("kind") == "ising" or {"temperature", "magnetization"} <= set(data.labels):
        mu_train = guide.latent_mean(x_train).cpu().numpy()
        labels_train = {k: v[data.split["train"]] for k, v in data.labels.items()}
        analysis = phase_analysis(mu_train, labels_train, mu_test, labels_test,
                                  ordered_below=float(pcfg.get("ordered_below", 1.8)),
                                  disordered_above=float(pcfg.get("disordered_above", 2.8)), seed=seed)
        metrics.update({k: v for k, v in analysis.items() if k != "curves" and not isinstance(v, (list, np.ndarray))})
        if "classifier_window" in analysis:
            metrics["classifier_window"] = analysis["classifier_window"]
        if figures:
            plots.plot_phase(analysis, labels_test, out / "phase.png")

    write_losses(out, fit.losses)  # negative ELBO per sample, per step
    # -- figures -------------------------------------------------------------------------------------------------
    if not figures:
        metrics = _round(metrics)
        log.info("metrics: %s", metrics)
        return metrics
    if fit.losses:
        plots.plot_loss(np.asarray(fit.losses), fit.history, fit.info["steps_per_epoch"], out / "loss.png",
                        fit.best_step)
    plots.plot_latent(mu_test, labels_test, out / "latent.png", title=f"{data.name}: encoder means of held-out samples")
    if data.image_shape is not None:
        shape = data.image_shape
        with torch.no_grad():
            show = post_rows[np.unique(np.linspace(0, len(post_rows) - 1, 32).round().astype(int))]  # all temperatures
            recon = model.decode(guide.latent_mean(x_test[show]).to(device)).cpu().numpy()
            orig = x_test[show].cpu().numpy()
            means = model.sample(32, mean=True).cpu().numpy()
            draws = model.sample(16, mean=False).cpu().numpy()
        first = (lambda a: a[:, 0]) if len(data.event_shape) == 3 else (lambda a: a)
        caption = None
        if "temperature" in labels_test:
            caption = "T = " + ", ".join(f"{t:.2f}" for t in labels_test["temperature"][show][:8]) + ", ..."
        plots.plot_reconstructions(first(orig).reshape(-1, *shape[:2]), first(recon).reshape(-1, *shape[:2]),
                                   out / "reconstructions.png", captions=caption)
        grid = np.concatenate([first(means).reshape(-1, *shape[:2]), first(draws).reshape(-1, *shape[:2])])
        plots.plot_image_grid(grid, out / "samples.png",
                              "samples from the prior: decoder means (rows 1-4) and draws of p(x | z) (rows 5-6)")
    metrics = _round(metrics)
    log.info("metrics: %s", metrics)
    return metrics
