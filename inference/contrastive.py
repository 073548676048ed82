"""Training an energy model by its log-likelihood gradient: a positive phase from the data minus a negative phase
from the model, ``grad log p(v) = -<grad F>_data + <grad F>_model`` for ``p(v) = exp(-F(v)) / Z``.

The negative phase comes from Markov chains: ``"cd"`` (contrastive divergence, Hinton 2002: ``k`` Gibbs sweeps
started at the minibatch), ``"pcd"`` (persistent chains that carry over between steps, Tieleman 2008) or ``"pt"``
(persistent chains at several inverse temperatures with swaps between neighbours, Desjardins et al. 2010). The
surrogate loss ``mean F(v_data) - mean F(v_model)`` (model samples held fixed) has exactly this gradient, so a
torch optimiser does the update.

Persistent chains that cannot cross between the modes of a multimodal model (the two magnetisations of an ordered
Ising model) leave the modes' relative weight without a gradient: it drifts. On 4x4 Ising data at T_c this made
PCD's exact KL 2-7 nats where CD-10 reached 0.07 (``tests/test_rbm_accuracy.py``); hence CD-10 as the default.

The model supplies ``free_energy(v)``, ``gibbs(v, steps, beta, generator)`` and, for ``"pt"``,
``tempered_log_marginal(v, beta)``; nothing here knows which model it is.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .fingerprint import fingerprint, fingerprint_differences
from .fit import Fit
from .interrupt import Interrupted, stop_if_signalled, watch_signals
from .outputs import atomic_write
from .svi import CheckpointError, TrainingDivergedError

__all__ = ["ContrastiveDivergence", "ContrastiveResult", "NEGATIVE_PHASES", "OPTIMIZERS"]

log = logging.getLogger(__name__)
NEGATIVE_PHASES = ("cd", "pcd", "pt")
OPTIMIZERS = ("adam", "sgd")
# options that say how long or how visibly to train: a resumed run may change them
_MAY_CHANGE = ("epochs", "progress", "checkpoint_every", "checkpoint_path", "resume")


@dataclass
class ContrastiveResult:
    losses: list[float] = field(default_factory=list)  # mean F(data) - mean F(negative samples), per step
    steps: int = 0
    epochs: int = 0
    swap_rate: float | None = None  # parallel tempering: accepted share of proposed swaps
    wall_time: float = 0.0
    stop_reason: str = ""
    resumed_from: int = 0  # epoch a resumed run started at
    history: list[dict] = field(default_factory=list)  # what the callback returned per epoch (monitoring)

    def info(self) -> dict:
        return {"engine": "contrastive", "steps": self.steps, "epochs_run": self.epochs, "train_time": self.wall_time,
                "stop_reason": self.stop_reason, "swap_rate": self.swap_rate, "resumed_from": self.resumed_from}


class ContrastiveDivergence:
    """Minibatch training of an energy model (Adam or SGD with momentum, weight decay, exponential learning-rate
    decay per epoch), checkpointed per epoch.

    Parameters
    ----------
    negative : "cd", "pcd" or "pt"
    k : Gibbs sweeps per step for each chain
    optimizer : "adam" (default; ``momentum`` is its beta1) or "sgd" (``momentum`` is SGD's)
    n_chains : persistent chains ("pcd", "pt"; default: the batch size)
    n_temperatures, beta_min : "pt": inverse temperatures geometric from 1 down to ``beta_min``
    checkpoint_every : epochs between checkpoints (0: only at the end and on a signal)
    checkpoint_path : where (default ``checkpoint.pt`` in the ``workdir`` of :meth:`fit`; none without either)
    resume : True (a checkpoint must exist), False, or "auto" (when one exists)
    """

    needs_guide = False  # the negative phase replaces a guide; the exact p(h | v) is the RBM's guide

    def __init__(self, negative: str = "cd", k: int = 10, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0, lr_decay: float = 0.99, batch_size: int = 100, epochs: int = 300,
                 optimizer: str = "adam", n_chains: int | None = None, n_temperatures: int = 10,
                 beta_min: float = 0.3, seed: int = 0, progress: bool = True, checkpoint_every: int = 10,
                 checkpoint_path: str | os.PathLike | None = None, resume: bool | str = False):
        if negative not in NEGATIVE_PHASES:
            raise ValueError(f"ContrastiveDivergence: negative must be one of {', '.join(NEGATIVE_PHASES)}, "
                             f"got {negative!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"ContrastiveDivergence: optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{optimizer!r}")
        if int(k) < 1 or int(batch_size) < 1 or int(epochs) < 1:
            raise ValueError("ContrastiveDivergence: k, batch_size and epochs must be >= 1")
        if not float(lr) > 0 or not 0 < float(lr_decay) <= 1 or not 0 <= float(momentum) < 1:
            raise ValueError(f"ContrastiveDivergence: need lr > 0, 0 < lr_decay <= 1 and 0 <= momentum < 1; got "
                             f"{lr}, {lr_decay}, {momentum}")
        if negative == "pt" and (int(n_temperatures) < 2 or not 0 < float(beta_min) < 1):
            raise ValueError("ContrastiveDivergence: parallel tempering needs n_temperatures >= 2 and "
                             "0 < beta_min < 1")
        if resume not in (True, False, "auto"):
            raise ValueError(f"ContrastiveDivergence: resume must be true, false or 'auto', got {resume!r}")
        self.negative, self.k, self.lr, self.momentum = negative, int(k), float(lr), float(momentum)
        self.weight_decay, self.lr_decay = float(weight_decay), float(lr_decay)
        self.batch_size, self.epochs, self.optimizer = int(batch_size), int(epochs), optimizer
        self.n_chains = None if n_chains is None else int(n_chains)
        self.n_temperatures, self.beta_min = int(n_temperatures), float(beta_min)
        self.seed, self.progress = int(seed), bool(progress)
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.resume = resume

    def __repr__(self) -> str:
        return (f"ContrastiveDivergence(negative={self.negative!r}, k={self.k}, optimizer={self.optimizer!r}, "
                f"lr={self.lr}, batch_size={self.batch_size}, epochs={self.epochs})")

    def settings(self) -> dict:
        """The settings that define the optimisation (a checkpoint's fingerprint)."""
        return {k: v for k, v in vars(self).items() if k not in _MAY_CHANGE}

    def _betas(self, dtype) -> torch.Tensor:
        return torch.logspace(0, math.log10(self.beta_min), self.n_temperatures, dtype=dtype)

    def _optimiser(self, model: torch.nn.Module):
        if self.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.lr, betas=(self.momentum, 0.999),
                                    weight_decay=self.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    @torch.no_grad()
    def _swap(self, model, chains: torch.Tensor, betas: torch.Tensor, gen: torch.Generator, offset: int) -> tuple:
        """Propose swaps between neighbouring temperatures (even or odd pairs): Metropolis on the product of the
        tempered marginals."""
        accepted = proposed = 0
        for i in range(offset, len(betas) - 1, 2):
            x, y = chains[i], chains[i + 1]
            log_r = (model.tempered_log_marginal(y, betas[i]) + model.tempered_log_marginal(x, betas[i + 1])
                     - model.tempered_log_marginal(x, betas[i]) - model.tempered_log_marginal(y, betas[i + 1]))
            accept = torch.log(torch.rand(log_r.shape, generator=gen, dtype=log_r.dtype)) < log_r
            chains[i][accept], chains[i + 1][accept] = y[accept].clone(), x[accept].clone()
            accepted, proposed = accepted + int(accept.sum()), proposed + accept.numel()
        return accepted, proposed

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_file(self, workdir: str | os.PathLike | None) -> Path | None:
        if self.checkpoint_path is not None:
            return self.checkpoint_path
        return Path(workdir) / "checkpoint.pt" if workdir is not None else None

    @staticmethod
    def _load(path: Path, stamp: dict) -> dict:
        try:
            state = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as err:  # torch raises several types for a truncated or foreign file
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
        differ = fingerprint_differences(state.get("fingerprint", {}), stamp)
        if differ:
            raise CheckpointError(f"checkpoint {path} was written for another problem: {', '.join(differ)} differ "
                                  f"from this run's; only {', '.join(_MAY_CHANGE)} may change on resume")
        return state

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, model: torch.nn.Module, v: torch.Tensor, callback: Callable | None = None,
            checkpoint: str | os.PathLike | None = None) -> ContrastiveResult:
        """Train ``model`` on configurations ``v`` (n, N).

        ``callback(epoch, result)`` runs after every epoch; it may return a dict (recorded in ``result.history``,
        e.g. a held-out log-likelihood) or a string (a reason to stop). ``checkpoint``: the file to save to every
        ``checkpoint_every`` epochs and on a signal, and to resume from (``resume``).
        """
        ckpt = None if checkpoint is None else Path(checkpoint)
        param = next(model.parameters())
        v = v.to(dtype=param.dtype, device=param.device)
        n = v.shape[0]
        if n < self.batch_size:
            raise ValueError(f"ContrastiveDivergence: {n} training samples, fewer than batch_size={self.batch_size}")
        gen = torch.Generator(device=v.device).manual_seed(self.seed)
        opt = self._optimiser(model)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.lr_decay)
        n_chains = self.n_chains or self.batch_size
        start = v[torch.randint(0, n, (n_chains,), generator=gen, device=v.device)].clone()
        betas = self._betas(v.dtype).to(v.device) if self.negative == "pt" else None
        chains = start.expand(len(betas), -1, -1).clone() if betas is not None else start
        result = ContrastiveResult()
        swaps = [0, 0]
        stamp = fingerprint(model, data={"v": v}, extra=self.settings())
        resume = self.resume is True or (self.resume == "auto" and ckpt is not None and ckpt.exists())
        if resume:
            if ckpt is None or not ckpt.exists():
                raise CheckpointError(f"resume was asked for, but there is no checkpoint at {ckpt}")
            state = self._load(ckpt, stamp)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["rng"])
            chains = state["chains"].to(v.device)
            swaps = list(state["swaps"])
            result.losses, result.history = list(state["losses"]), list(state["history"])
            result.steps, result.epochs = int(state["steps"]), int(state["epoch"])
            result.resumed_from = result.epochs
            log.info("resumed from %s at epoch %d", ckpt, result.epochs)

        def save() -> None:
            if ckpt is None:
                return
            state = {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                     "rng": gen.get_state(), "chains": chains.cpu(), "swaps": swaps, "losses": result.losses,
                     "history": result.history, "steps": result.steps, "epoch": result.epochs, "fingerprint": stamp}
            atomic_write(ckpt, lambda p: torch.save(state, p))

        t0 = time.perf_counter()
        bar = tqdm(total=self.epochs, initial=result.epochs, disable=not self.progress,
                   desc=f"RBM ({self.negative}-{self.k})", dynamic_ncols=True, mininterval=1.0)
        result.stop_reason = f"epoch budget of {self.epochs} reached"
        try:
            with watch_signals():
                for epoch in range(result.epochs, self.epochs):
                    # at an epoch boundary: the checkpoint is consistent
                    stop_if_signalled(epoch, ckpt, save if ckpt is not None else None, unit="epoch")
                    perm = torch.randperm(n, generator=gen, device=v.device)
                    for s in range(0, n - self.batch_size + 1, self.batch_size):
                        batch = v[perm[s:s + self.batch_size]]
                        if self.negative == "cd":
                            negative = model.gibbs(batch, self.k, generator=gen)
                        elif self.negative == "pcd":
                            chains = model.gibbs(chains, self.k, generator=gen)
                            negative = chains
                        else:
                            chains = model.gibbs(chains, self.k, beta=betas.view(-1, 1, 1), generator=gen)
                            a, p = self._swap(model, chains, betas, gen, result.steps % 2)
                            swaps[0], swaps[1] = swaps[0] + a, swaps[1] + p
                            negative = chains[0]
                        loss = model.free_energy(batch).mean() - model.free_energy(negative.detach()).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        result.steps += 1
                        result.losses.append(float(loss.detach()))
                    if not all(torch.isfinite(p).all() for p in model.parameters()):
                        raise TrainingDivergedError(
                            f"RBM training diverged at epoch {epoch + 1}: a parameter is not finite; lower lr")
                    sched.step()
                    result.epochs = epoch + 1
                    bar.update(1)
                    out = callback(result.epochs, result) if callback is not None else None
                    if isinstance(out, dict):
                        result.history.append({"epoch": result.epochs, "step": result.steps, **out})
                        bar.set_postfix({k: f"{x:.4g}" for k, x in out.items() if isinstance(x, float)})
                    if self.checkpoint_every and result.epochs % self.checkpoint_every == 0:
                        save()
                    if isinstance(out, str) and out:
                        result.stop_reason = out
                        break
        except KeyboardInterrupt:  # a second Ctrl-C in the middle of an epoch: keep the last finished epoch's state
            raise Interrupted(signal.SIGINT, result.epochs, ckpt if ckpt is not None and ckpt.exists() else None,
                              unit="epoch") from None
        finally:
            bar.close()
        save()
        result.swap_rate = swaps[0] / swaps[1] if swaps[1] else None
        result.wall_time = time.perf_counter() - t0
        log.info("RBM training (%s-%d): %s; %d steps, %.1f s", self.negative, self.k, result.stop_reason,
                 result.steps, result.wall_time)
        return result

    def fit(self, model, guide, data: dict, *, n_draws: int = 200, n_data: int | None = None,
            sites: list[str] | None = None, workdir=None, callback=None, init: dict | None = None) -> Fit:
        """The engine protocol (:class:`physppl.inference.fit.Engine`): train on ``data["v"]``; the fit holds no
        draws (the parameters are point estimates; draws of the hidden units come from the model's exact
        conditional). ``info["result"]`` is the :class:`ContrastiveResult`."""
        if "v" not in data:
            raise ValueError(f"ContrastiveDivergence.fit: data must hold the configurations as 'v', got {sorted(data)}")
        res = self.run(model, data["v"], callback=callback, checkpoint=self.checkpoint_file(workdir))
        return Fit(model=model, guide=guide, data=data, draws={}, info={**res.info(), "result": res})
