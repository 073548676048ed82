"""Training a VAE with :class:`~physppl.inference.svi.SVIEngine`: held-out ELBO every epoch, early stopping with
the best parameters kept, and the amortization gap of the trained encoder."""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pyro.infer import TraceMeanField_ELBO

from physppl.guides.vae import MeanFieldLatentGuide
from physppl.inference.iwae import importance_log_weights
from physppl.inference.optim import ClippedAdam
from physppl.inference.outputs import atomic_write, write_json
from physppl.inference.svi import SVIEngine, TrainingDivergedError

from .options import Evaluation, Training

__all__ = ["HeldOutMonitor", "FitResult", "fit_vae", "heldout_elbo", "amortization_gap"]

log = logging.getLogger(__name__)


def heldout_elbo(model, guide, x: torch.Tensor, num_particles: int = 1, batch_size: int = 512) -> float:
    """Mean ELBO per sample (nats) of ``x`` under the current model and guide (no gradients)."""
    logw = importance_log_weights(model, guide, x.shape[0], num_particles, {"x": x}, batch_size=batch_size)
    return float(logw.mean())


def _param_state(model, guide) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "guide": copy.deepcopy(guide.state_dict())}


def _restore(model, guide, state: dict) -> None:
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])


class HeldOutMonitor:
    """``SVIEngine`` callback: every ``every`` steps, the mean held-out ELBO; keeps the best parameters and stops
    after ``patience`` evaluations without an improvement of at least ``min_delta`` nats.

    Its history is written to ``workdir/heldout.json`` (and the best parameters to ``workdir/best_params.pt``) at
    each evaluation, so a resumed run (``inference.resume=true``) continues the same early-stopping record.
    """

    def __init__(self, model, guide, x_val: torch.Tensor, every: int, patience: int | None = 10,
                 min_delta: float = 0.0, num_particles: int = 1, n_train: int = 1,
                 workdir: Path | None = None, resume: bool = False):
        self.model, self.guide, self.x_val = model, guide, x_val
        self.every = max(1, int(every))
        self.patience = None if patience is None or patience <= 0 else int(patience)
        self.min_delta = float(min_delta)
        self.num_particles = int(num_particles)
        self.n_train = max(1, int(n_train))
        self.workdir = None if workdir is None else Path(workdir)
        self.history: list[dict] = []
        self.best = -math.inf
        self.best_step = 0
        self.best_state: dict | None = None
        self._first = True
        self.eval_time = 0.0  # seconds spent in held-out evaluations (not training)
        if resume and self.workdir is not None and (self.workdir / "heldout.json").exists():
            saved = json.loads((self.workdir / "heldout.json").read_text())
            self.history = saved.get("history", [])
            if (self.workdir / "best_params.pt").exists():
                self.best_state = torch.load(self.workdir / "best_params.pt", weights_only=False)
                self.best, self.best_step = saved["best"], saved["best_step"]

    def _trim(self, step: int) -> None:
        """On the first call after a resume, forget evaluations past the checkpoint we resumed from."""
        self.history = [h for h in self.history if h["step"] < step]
        if self.best_step >= step:
            self.best, self.best_step, self.best_state = -math.inf, 0, None
            for h in self.history:  # best among the kept records; its parameters are gone, so refit from here
                if h["heldout_elbo"] > self.best:
                    self.best, self.best_step = h["heldout_elbo"], h["step"]

    def __call__(self, step: int, losses: list[float]):
        if self._first:
            self._trim(step)
            self._first = False
        if step % self.every:
            return None
        t0 = time.perf_counter()
        elbo = heldout_elbo(self.model, self.guide, self.x_val, self.num_particles)
        if not math.isfinite(elbo):
            raise TrainingDivergedError(f"held-out ELBO is {elbo} at step {step}: training diverged; try a smaller "
                                        "inference.optim.lr")
        train = float(np.mean(losses[-self.every:])) / self.n_train
        self.history.append({"step": step, "train_loss": train, "heldout_elbo": elbo})
        improved = elbo > self.best + self.min_delta
        if improved:
            self.best, self.best_step = elbo, step
            self.best_state = _param_state(self.model, self.guide)
            if self.workdir is not None:
                atomic_write(self.workdir / "best_params.pt", lambda p: torch.save(self.best_state, p))
        if self.workdir is not None:
            write_json(self.workdir / "heldout.json", {"history": self.history, "best": self.best,
                                                       "best_step": self.best_step})
        self.eval_time += time.perf_counter() - t0
        evals_since = sum(1 for h in self.history if h["step"] > self.best_step)
        if self.patience is not None and evals_since >= self.patience:
            return (f"early stopping at step {step}: held-out ELBO did not improve for {self.patience} evaluations "
                    f"(best {self.best:.3f} nats at step {self.best_step})")
        return None


@dataclass
class FitResult:
    losses: list[float]
    history: list[dict]
    steps: int
    stop_reason: str
    train_time: float
    step_time_ms: float
    best_step: int
    best_heldout_elbo: float
    resumed_from: int = 0
    info: dict = field(default_factory=dict)


def fit_vae(model, guide, x_train: torch.Tensor, x_val: torch.Tensor, engine: SVIEngine,
            workdir: Path | None = None, epochs: int | None = Training.epochs,
            eval_every_epochs: int = Training.eval_every_epochs, patience: int | None = Training.patience,
            min_delta: float = Training.min_delta, eval_particles: int = Training.eval_particles,
            convergence_test: bool = Training.convergence_test, restore_best: bool = True) -> FitResult:
    """Minibatch SVI on ``x_train`` with held-out evaluation on ``x_val``; the best parameters are restored.

    ``epochs`` (if given) sets the engine's step budget to ``epochs`` passes over the training set. Without
    ``convergence_test`` the engine's loss-window test is switched off: minibatch losses are noisy and the
    held-out ELBO is the better stopping rule.
    """
    n = int(x_train.shape[0])
    batch = engine.batch_size if engine.batch_size is not None else n
    steps_per_epoch = max(1, n // min(batch, n))
    if epochs is not None:
        engine.max_steps = int(epochs) * steps_per_epoch
    if not convergence_test:
        engine.min_steps = engine.max_steps + 1
    monitor = HeldOutMonitor(model, guide, x_val, every=eval_every_epochs * steps_per_epoch, patience=patience,
                             min_delta=min_delta, num_particles=eval_particles, n_train=n, workdir=workdir,
                             resume=engine.resume)
    result = engine.run(model, guide, {"x": x_train}, n_data=n, workdir=workdir, callback=monitor)
    if restore_best and monitor.best_state is not None:
        _restore(model, guide, monitor.best_state)
    trained = max(1, result.steps - result.resumed_from)
    return FitResult(losses=[l / n for l in result.losses], history=monitor.history, steps=result.steps,
                     stop_reason=result.stop_reason, train_time=result.wall_time,
                     step_time_ms=1e3 * (result.wall_time - monitor.eval_time) / trained, best_step=monitor.best_step,
                     best_heldout_elbo=monitor.best, resumed_from=result.resumed_from,
                     info={"steps_per_epoch": steps_per_epoch, "epochs_run": result.steps / steps_per_epoch,
                           "eval_time": monitor.eval_time})


def amortization_gap(model, guide, x: torch.Tensor, steps: int = Evaluation.gap_steps, lr: float = Evaluation.gap_lr,
                     particles: int = Evaluation.gap_particles, num_particles: int = 8, iwae_particles: int = 0,
                     progress: bool = False) -> dict:
    """ELBO of the amortized encoder vs. a per-sample mean-field Gaussian optimised with the decoder fixed.

    The mean-field guide starts at the encoder's Gaussian (its base distribution when the guide has a flow), so
    for a Gaussian encoder the gap is >= 0 up to Monte Carlo noise. With ``iwae_particles`` the optimised
    guide also serves as the proposal of an IWAE estimate of ``log p(x)`` (a better proposal than the encoder, so
    a tighter bound), and ``log p(x) - ELBO_meanfield`` is the approximation gap of the Gaussian family.
    Returns mean nats per sample.
    """
    n = int(x.shape[0])
    elbo_amortized = heldout_elbo(model, guide, x, particles)
    with torch.no_grad():
        loc, scale, _ = guide.encoder(x)
    mf = MeanFieldLatentGuide(loc, scale).to(loc.device)
    # only the per-sample guide parameters move: the decoder's are frozen for this fit and restored after
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    # the optimum is sharp (posterior sds can be << 1): average a few draws per step and decay the rate 10x
    engine = SVIEngine(optim=ClippedAdam(lr=lr, lrd=0.1 ** (1.0 / max(1, steps)), clip_norm=1e10),
                       loss=TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=True),
                       max_steps=steps, min_steps=steps + 1, batch_size=None, checkpoint_every=0, progress=progress)
    t0 = time.perf_counter()
    try:
        engine.run(model, mf, {"x": x}, n_data=n)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    elbo_mf = heldout_elbo(model, mf, x, particles)
    out = {}
    if iwae_particles:
        logw = importance_log_weights(model, mf, n, iwae_particles, {"x": x}, batch_size=16)
        iwae = torch.logsumexp(logw, 0) - math.log(iwae_particles)
        out = {"iwae_meanfield": float(iwae.mean()), "approximation_gap": float(iwae.mean()) - elbo_mf}
    return {"n": n, "elbo_amortized": elbo_amortized, "elbo_meanfield": elbo_mf,
            "amortization_gap": elbo_mf - elbo_amortized, "meanfield_steps": steps,
            "meanfield_time": time.perf_counter() - t0, **out}

