"""Stochastic variational inference: minibatches, a torch optimiser, convergence, checkpoints.

Knows nothing about the model's science. Model and guide are modules called as ``model(**data, subsample=idx)``,
where ``idx`` indexes the plate being minibatched (``None`` = all data); the loss is Pyro's ELBO as a module
(``Trace_ELBO()(model, guide)``) trained by a torch optimiser. Parameters live in the modules (Pyro's module-local
parameter mode), so a checkpoint is the modules' and the optimiser's ``state_dict``s.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.elbo import ELBO
from tqdm.auto import tqdm

from .fingerprint import MAY_CHANGE_ON_RESUME, fingerprint, fingerprint_differences
from .fit import Fit
from .interrupt import Interrupted, stop_if_signalled, watch_signals
from .optim import ClippedAdam
from .outputs import atomic_write

__all__ = ["SVIEngine", "SVIResult", "TrainingDivergedError", "CheckpointError"]

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model and guide it is loaded into."""


@dataclass
class SVIResult:
    losses: list[float] = field(default_factory=list)  # loss (negative ELBO) per step
    steps: int = 0
    wall_time: float = 0.0
    converged: bool = False
    stop_reason: str = ""
    resumed_from: int = 0

    @property
    def final_loss(self) -> float:
        tail = self.losses[-min(len(self.losses), 50):]
        return float(np.mean(tail)) if tail else float("nan")

    def info(self) -> dict:
        return {"engine": "svi", "steps": self.steps, "final_loss": self.final_loss, "converged": self.converged,
                "stop_reason": self.stop_reason, "train_time": self.wall_time, "resumed_from": self.resumed_from}


def _announced(batches, prefetch: Callable, depth: int = 1):
    """The minibatch stream ``depth`` steps ahead: ``prefetch(b)`` is called for each minibatch ``depth`` steps
    before it is used, so a model whose data live on disk reads the next ones while this one is computed (the model
    protocol's optional ``prefetch(subsample)`` and ``prefetch_depth``)."""
    queue = collections.deque([next(batches)])
    for _ in range(max(0, int(depth))):
        queue.append(next(batches))
        prefetch(queue[-1])
    while True:
        yield queue.popleft()
        queue.append(next(batches))
        prefetch(queue[-1])


class SVIEngine:
    """Run SVI to convergence or a step budget.

    Parameters
    ----------
    optim : callable, optional
        ``optim({"model": model, "guide": guide}) -> torch.optim.Optimizer``; default
        :class:`~physppl.inference.optim.ClippedAdam` with ``lr=0.01``.
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
        Start from ``checkpoint_path`` (it must exist).
    progress : bool
        Show a tqdm progress bar with the running loss.
    """

    needs_guide = True

    def __init__(
        self,
        optim: Callable | None = None,
        loss: ELBO | None = None,
        max_steps: int = 2000,
        min_steps: int = 200,
        window: int = 100,
        rtol: float = 1e-4,
        batch_size: int | None = None,
        batch_order: str = "random",
        checkpoint_every: int = 500,
        checkpoint_path: str | os.PathLike | None = None,
        resume: bool | str = False,
        progress: bool = True,
    ):
        if int(max_steps) < 1:
            raise ValueError(f"SVIEngine: max_steps must be >= 1, got {max_steps}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"SVIEngine: batch_size must be >= 1 or None, got {batch_size}")
        if batch_order not in ("random", "blocks"):
            raise ValueError(f"SVIEngine: batch_order must be 'random' or 'blocks', got {batch_order!r}")
        if int(window) < 1 or int(min_steps) < 0 or int(checkpoint_every) < 0:
            raise ValueError("SVIEngine: window must be >= 1, min_steps and checkpoint_every >= 0")
        self.optim = optim if optim is not None else ClippedAdam(lr=0.01)
        self.loss = loss if loss is not None else Trace_ELBO()
        self.max_steps = int(max_steps)
        self.min_steps = int(min_steps)
        self.window = int(window)
        self.rtol = float(rtol)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.batch_order = batch_order
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        if resume not in (True, False, "auto"):
            raise ValueError(f"SVIEngine: resume must be true, false or 'auto' (resume when a checkpoint exists), "
                             f"got {resume!r}")
        self.resume = resume
        self.progress = bool(progress)

    def __repr__(self) -> str:
        return (f"SVIEngine(optim={self.optim!r}, loss={type(self.loss).__name__}, max_steps={self.max_steps}, "
                f"min_steps={self.min_steps}, rtol={self.rtol}, batch_size={self.batch_size})")

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_file(self, workdir: str | os.PathLike | None) -> Path | None:
        if self.checkpoint_path is not None:
            return self.checkpoint_path
        return Path(workdir) / "checkpoint.pt" if workdir is not None else None

    def _save(self, path: Path, step: int, losses: list[float], model, guide, optimizer, generator,
              stamp: dict) -> None:
        # pyro's RNG state holds torch's, numpy's and Python's; the minibatch order has its own generator
        state = {"step": step, "losses": list(losses), "model": model.state_dict(), "guide": guide.state_dict(),
                 "optim": optimizer.state_dict(), "rng": pyro.util.get_rng_state(), "batch_rng": generator.get_state(),
                 "fingerprint": stamp}
        atomic_write(path, lambda p: torch.save(state, p))

    @staticmethod
    def _load(path: Path, model, guide, optimizer, generator, stamp: dict) -> tuple[int, list[float]]:
        # onto the CPU first: load_state_dict copies each tensor to its parameter's device (a GPU run resumes on CPU)
        try:
            state = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as err:  # torch raises several types for a truncated or foreign file
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
        if "fingerprint" in state:
            differ = fingerprint_differences(state["fingerprint"], stamp)
            if differ:
                raise CheckpointError(
                    f"checkpoint {path} was written for another problem: {', '.join(differ)} differ from this "
                    f"run's; only {', '.join(MAY_CHANGE_ON_RESUME)} may change on resume")
        for name, module in (("model", model), ("guide", guide)):
            try:
                module.load_state_dict(state[name])
            except (KeyError, RuntimeError) as err:
                raise CheckpointError(f"checkpoint {path} does not fit this {name} ({type(module).__name__}): "
                                      f"{str(err).strip()}; the configuration changed since it was written") from None
        try:
            optimizer.load_state_dict(state["optim"])
        except (KeyError, ValueError) as err:  # other parameter groups, e.g. another module_lr
            raise CheckpointError(f"checkpoint {path}: its optimiser state does not fit this run's optimiser ({err}); "
                                  "the configuration changed since it was written") from None
        pyro.util.set_rng_state(state["rng"])
        generator.set_state(state["batch_rng"])
        return int(state["step"]), list(state["losses"])

    # -- main loop -----------------------------------------------------------------------------------
    def _full_batch(self, n_data: int | None) -> bool:
        return n_data is None or self.batch_size is None or self.batch_size >= n_data

    def _batches(self, n_data: int | None, generator: torch.Generator):
        if self._full_batch(n_data):
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
        model: torch.nn.Module,
        guide: torch.nn.Module,
        data: dict | None = None,
        n_data: int | None = None,
        workdir: str | os.PathLike | None = None,
        callback: Callable[[int, list[float]], bool | str | None] | None = None,
    ) -> SVIResult:
        """Fit ``guide`` to ``model`` on ``data``; ``n_data`` is the size of the plate to minibatch over.

        ``callback(step, losses)`` runs after every step (e.g. a held-out evaluation every epoch); a truthy
        return stops training, and a string return is recorded as the stop reason (early stopping).
        """
        data = dict(data or {})
        ckpt = self.checkpoint_file(workdir)
        resume = self.resume is True or (self.resume == "auto" and ckpt is not None and ckpt.exists())
        result = SVIResult()
        # the minibatch order has its own generator, saved in checkpoints, so a resumed run continues the same stream
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        elbo = self.loss(model, guide)
        first = None if self._full_batch(n_data) else torch.arange(self.batch_size)
        # One evaluation before the optimiser exists: guides that make their parameters on the first call
        # (autoguides) have them then. Its random draws are undone so it changes nothing downstream.
        rng = pyro.util.get_rng_state()
        with torch.no_grad():
            elbo(**data, subsample=first)
        pyro.util.set_rng_state(rng)
        optimizer = self.optim({"model": model, "guide": guide})
        stamp = fingerprint(model, guide, data, objective=self.loss, optim=self.optim,
                             extra={"n_data": n_data, "batch_size": self.batch_size, "batch_order": self.batch_order})
        start_step = 0
        if resume:
            if ckpt is None or not ckpt.exists():
                raise CheckpointError(f"resume was asked for, but there is no checkpoint at {ckpt}: resume in the "
                                      "directory of the interrupted run, or give its checkpoint_path")
            start_step, result.losses = self._load(ckpt, model, guide, optimizer, generator, stamp)
            result.resumed_from = start_step
            log.info("resumed from %s at step %d", ckpt, start_step)
        batches = self._batches(n_data, generator)
        prefetch = getattr(model, "prefetch", None)
        if callable(prefetch) and not self._full_batch(n_data):
            batches = _announced(batches, prefetch, getattr(model, "prefetch_depth", 1))
        t0 = time.perf_counter()
        step = start_step
        bar = tqdm(total=self.max_steps, initial=start_step, disable=not self.progress, desc="SVI",
                   dynamic_ncols=True, mininterval=1.0)
        save = None if ckpt is None else \
            (lambda: self._save(ckpt, step, result.losses, model, guide, optimizer, generator, stamp))
        try:
            with watch_signals():
                while step < self.max_steps:
                    stop_if_signalled(step, ckpt, save)  # at a step boundary: the checkpoint is consistent
                    optimizer.zero_grad()
                    loss_t = elbo(**data, subsample=next(batches))
                    loss = float(loss_t.detach())
                    if not math.isfinite(loss):
                        last = next((x for x in reversed(result.losses) if math.isfinite(x)), float("nan"))
                        raise TrainingDivergedError(
                            f"SVI diverged: loss is {loss} at step {step + 1} (last finite loss {last:.6g}). Try a "
                            "smaller learning rate, a robust likelihood, or check the input for extreme values.")
                    loss_t.backward()
                    optimizer.step()
                    step += 1
                    result.losses.append(loss)
                    bar.update(1)
                    if step % 25 == 0:
                        bar.set_postfix(loss=f"{np.mean(result.losses[-25:]):.5g}")
                    if save is not None and self.checkpoint_every and step % self.checkpoint_every == 0:
                        save()
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
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread, in the middle of a step
            if save is not None:  # as of the last completed step (an interrupted optimiser step is the rare loss)
                save()
            raise Interrupted(signal.SIGINT, step, ckpt) from None
        finally:
            bar.close()
        if save is not None:
            save()
        result.steps = step
        result.wall_time = time.perf_counter() - t0
        log.info("SVI: %s; final loss %.6g; %.1f s", result.stop_reason, result.final_loss, result.wall_time)
        return result

    def fit(self, model, guide, data: dict, *, n_draws: int = 200, n_data: int | None = None,
            sites: list[str] | None = None, workdir=None, callback=None, init: dict | None = None) -> Fit:
        """:meth:`run`, then ``n_draws`` joint draws of the latent ``sites`` from the trained guide (one vectorised
        call). ``init`` is not used: a guide carries its own starting point."""
        from .convert import guide_draws
        from .fit import latent_sites

        result = self.run(model, guide, data, n_data=n_data, workdir=workdir, callback=callback)
        # site names from one minibatch: a full pass may not even be possible (data streamed from disk)
        probe = data if self._full_batch(n_data) else {**data, "subsample": torch.arange(self.batch_size)}
        sites = sites or latent_sites(model, probe)
        draws = guide_draws(guide, data, n_draws, sites)
        return Fit(model=model, guide=guide, data=data, draws=draws, losses=result.losses, info=result.info())
