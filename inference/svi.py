"""Stochastic variational inference engine: minibatches, clipped Adam, convergence, checkpoints.

Knows nothing about the model's science. The model and guide are called as
``model(**model_kwargs, subsample=idx)`` where ``idx`` indexes the data plate (``None`` = all data).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO
from pyro.optim import ClippedAdam, PyroOptim
from tqdm.auto import tqdm

__all__ = ["SVIEngine", "SVIResult", "TrainingDivergedError"]

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class SVIResult:
    losses: list[float] = field(default_factory=list)  # loss (negative ELBO) per step, per observation-set
    steps: int = 0
    wall_time: float = 0.0
    converged: bool = False
    stop_reason: str = ""
    resumed_from: int = 0

    @property
    def final_loss(self) -> float:
        tail = self.losses[-min(len(self.losses), 50):]
        return float(np.mean(tail)) if tail else float("nan")


class SVIEngine:
    """Run SVI to convergence or a step budget.

    Parameters
    ----------
    optim : PyroOptim, optional
        Defaults to ``ClippedAdam(lr=0.01)``; ``lrd`` in its args sets an exponential LR decay per step.
    loss : ELBO, optional
        Defaults to ``Trace_ELBO()``.
    max_steps, min_steps : int
        Step budget; no convergence test before ``min_steps``.
    window, rtol : int, float
        Converged when the mean loss of the last ``window`` steps improved on the window before by less than
        ``rtol`` times the total improvement since the first window (scale-free, and safe when the loss
        crosses zero).
    batch_size : int, optional
        Minibatch size over the data plate (epochs of random permutations); ``None`` = full batch.
    batch_order : {"random", "blocks"}
        ``random``: each minibatch a random subset; ``blocks``: contiguous index ranges in random order, for data
        laid out so that a slice is a random sample and costs no copy (e.g. rows shuffled once, or on disk).
    checkpoint_every : int
        Save a checkpoint every this many steps (0 = only at the end and on interrupt).
    checkpoint_path : path, optional
        Where checkpoints go (default ``checkpoint.pt`` in the ``workdir`` given to :meth:`run`; with neither,
        no checkpoint is written, so library use leaves no files behind).
    resume : bool
        Start from ``checkpoint_path`` if it exists.
    progress : bool
        Show a tqdm progress bar with the running loss.
    """

    def __init__(
        self,
        optim: PyroOptim | None = None,
        loss: ELBO | None = None,
        max_steps: int = 2000,
        min_steps: int = 200,
        window: int = 100,
        rtol: float = 1e-4,
        batch_size: int | None = None,
        batch_order: str = "random",
        checkpoint_every: int = 500,
        checkpoint_path: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
    ):
        if max_steps < 1:
            raise ValueError(f"SVIEngine: max_steps must be >= 1, got {max_steps}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"SVIEngine: batch_size must be >= 1 or null, got {batch_size}")
        if batch_order not in ("random", "blocks"):
            raise ValueError(f"SVIEngine: batch_order must be 'random' or 'blocks', got {batch_order!r}")
        self.batch_order = batch_order
        self.optim = optim if optim is not None else ClippedAdam({"lr": 0.01})
        self.loss = loss if loss is not None else Trace_ELBO()
        self.max_steps = int(max_steps)
        self.min_steps = int(min_steps)
        self.window = int(window)
        self.rtol = float(rtol)
        self.batch_size = batch_size
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.resume = bool(resume)
        self.progress = bool(progress)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self, path: Path, step: int, losses: list[float]) -> None:
        state = {
            "step": step,
            "losses": list(losses),
            "params": pyro.get_param_store().get_state(),
            "optim": self.optim.get_state(),
            "rng": pyro.util.get_rng_state(),
            "batch_rng": self._generator.get_state(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _register_params(self, model: Callable, guide: Callable, n_data: int | None, model_kwargs: dict) -> None:
        """Run guide and model once, so every parameter is in the store as the tensor its module computes with."""
        full = n_data is None or self.batch_size is None or self.batch_size >= n_data
        idx = None if full else torch.arange(self.batch_size)
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(**model_kwargs, subsample=idx)
            poutine.replay(model, trace=guide_trace)(**model_kwargs, subsample=idx)

    def _load(self, path: Path) -> tuple[int, list[float]]:
        # onto the CPU first: copy_ below moves each tensor to its parameter's device (a GPU run resumes on a CPU)
        state = torch.load(path, weights_only=False, map_location="cpu")
        # Copy into the store's tensors rather than replacing them (ParamStoreDict.set_state): nn.Modules registered
        # with pyro.module keep computing with their own Parameter objects, which a replacement would orphan.
        store = pyro.get_param_store()
        saved = state["params"]
        for name, value in saved["params"].items():
            current = store._params.get(name)
            if current is None:
                store._params[name] = value
                store._param_to_name[value] = name
            elif current.shape != value.shape:
                raise ValueError(f"checkpoint {path}: parameter {name!r} has shape {tuple(value.shape)}, the model's "
                                 f"{tuple(current.shape)}: the configuration changed since it was written")
            else:
                with torch.no_grad():
                    current.copy_(value)
        store._constraints.update(saved["constraints"])
        self.optim.set_state(state["optim"])
        pyro.util.set_rng_state(state["rng"])
        self._generator.set_state(state["batch_rng"])
        return int(state["step"]), list(state["losses"])

    # -- main loop -----------------------------------------------------------------------------------
    def _batches(self, n_data: int | None, generator: torch.Generator):
        if n_data is None or self.batch_size is None or self.batch_size >= n_data:
            while True:
                yield None
        while True:
            if self.batch_order == "blocks":
                starts = torch.arange(0, n_data - self.batch_size + 1, self.batch_size)
                for start in starts[torch.randperm(len(starts), generator=generator)].tolist():
                    yield torch.arange(start, start + self.batch_size)
                continue
            perm = torch.randperm(n_data, generator=generator)
            for start in range(0, n_data - self.batch_size + 1, self.batch_size):
                yield perm[start : start + self.batch_size]

    def _converged(self, losses: list[float]) -> bool:
        w = self.window
        if len(losses) < max(self.min_steps, 2 * w):
            return False
        new, old, first = np.mean(losses[-w:]), np.mean(losses[-2 * w : -w]), np.mean(losses[:w])
        return (old - new) <= self.rtol * max(first - new, 1e-12)

    def run(
        self,
        model: Callable,
        guide: Callable,
        n_data: int | None = None,
        workdir: str | os.PathLike | None = None,
        callback: Callable[[int, list[float]], bool | str | None] | None = None,
        **model_kwargs,
    ) -> SVIResult:
        """Fit ``guide`` to ``model``; ``n_data`` is the size of the data plate to minibatch over.

        ``callback(step, losses)`` runs after every step (e.g. a held-out evaluation every epoch); a truthy
        return stops training, and a string return is recorded as the stop reason (early stopping).
        """
        ckpt = self.checkpoint_path or (Path(workdir) / "checkpoint.pt" if workdir is not None else None)
        result = SVIResult()
        start_step = 0
        # minibatch order has its own generator, saved in checkpoints, so a resumed run continues the same stream
        self._generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        if self.resume:
            if ckpt is None or not ckpt.exists():
                raise FileNotFoundError(
                    f"inference.resume=true but no checkpoint at {ckpt}: run in the same directory "
                    "(hydra.run.dir=...) or set inference.checkpoint_path"
                )
            self._register_params(model, guide, n_data, model_kwargs)
            start_step, result.losses = self._load(ckpt)
            result.resumed_from = start_step
            log.info("resumed from %s at step %d", ckpt, start_step)
        svi = SVI(model, guide, self.optim, loss=self.loss)
        batches = self._batches(n_data, self._generator)
        t0 = time.perf_counter()
        step = start_step
        bar = tqdm(total=self.max_steps, initial=start_step, disable=not self.progress, desc="SVI", dynamic_ncols=True, mininterval=1.0)
        try:
            while step < self.max_steps:
                loss = svi.step(**model_kwargs, subsample=next(batches))
                step += 1
                if not math.isfinite(loss):
                    last = next((x for x in reversed(result.losses) if math.isfinite(x)), float("nan"))
                    raise TrainingDivergedError(
                        f"SVI diverged: loss is {loss} at step {step} (last finite loss {last:.6g}). "
                        "Try a smaller optim.lr, a robust likelihood (model/likelihood=student_t), or check "
                        "the input for extreme values."
                    )
                result.losses.append(float(loss))
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{np.mean(result.losses[-25:]):.5g}")
                if ckpt is not None and self.checkpoint_every and step % self.checkpoint_every == 0:
                    self._save(ckpt, step, result.losses)
                stop = callback(step, result.losses) if callback is not None else None
                if stop:
                    result.stop_reason = stop if isinstance(stop, str) else f"stopped by callback at step {step}"
                    break
                if self._converged(result.losses):
                    result.converged = True
                    result.stop_reason = f"converged at step {step} (rtol {self.rtol:g} over {self.window} steps)"
                    break
            else:
                result.stop_reason = f"step budget of {self.max_steps} reached"
        except KeyboardInterrupt:
            if ckpt is None:
                raise
            self._save(ckpt, step, result.losses)
            raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved to {ckpt}; rerun with inference.resume=true")
        finally:
            bar.close()
        if ckpt is not None:
            self._save(ckpt, step, result.losses)
        result.steps = step
        result.wall_time = time.perf_counter() - t0
        log.info("SVI: %s; final loss %.6g; %.1f s", result.stop_reason, result.final_loss, result.wall_time)
        return result
