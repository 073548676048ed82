"""Training an energy model by its log-likelihood gradient: a positive phase from the data minus a negative phase
from the model, ``grad log p(v) = -<grad F>_data + <grad F>_model`` for ``p(v) = exp(-F(v)) / Z``.

The negative phase comes from Markov chains: ``"cd"`` (contrastive divergence, Hinton 2002: ``k`` Gibbs sweeps
started at the minibatch), ``"pcd"`` (persistent chains that carry over between steps, Tieleman 2008) or ``"pt"``
(persistent chains at several inverse temperatures with swaps between neighbours, Desjardins et al. 2010). The
surrogate loss ``mean F(v_data) - mean F(v_model)`` (model samples held fixed) has exactly this gradient, so a
torch optimiser does the update.

The model supplies ``free_energy(v)``, ``gibbs(v, steps, beta, generator)`` and, for ``"pt"``,
``tempered_log_marginal(v, beta)``; nothing here knows which model it is.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .interrupt import stop_if_signalled, watch_signals

__all__ = ["ContrastiveDivergence", "ContrastiveResult", "NEGATIVE_PHASES"]

log = logging.getLogger(__name__)
NEGATIVE_PHASES = ("cd", "pcd", "pt")


@dataclass
class ContrastiveResult:
    losses: list[float] = field(default_factory=list)  # mean F(data) - mean F(negative samples), per step
    steps: int = 0
    epochs: int = 0
    swap_rate: float | None = None  # parallel tempering: accepted share of proposed swaps
    wall_time: float = 0.0
    stop_reason: str = ""

    def info(self) -> dict:
        return {"engine": "contrastive", "steps": self.steps, "epochs": self.epochs, "train_time": self.wall_time,
                "stop_reason": self.stop_reason, "swap_rate": self.swap_rate}


class ContrastiveDivergence:
    """Minibatch SGD (momentum, weight decay, exponential learning-rate decay per epoch) on an energy model.

    Parameters
    ----------
    negative : "cd", "pcd" or "pt"
    k : Gibbs sweeps per step for each chain
    n_chains : persistent chains ("pcd", "pt"; default: the batch size)
    n_temperatures, beta_min : "pt": inverse temperatures geometric from 1 down to ``beta_min``
    """

    def __init__(self, negative: str = "pcd", k: int = 1, lr: float = 0.05, momentum: float = 0.5,
                 weight_decay: float = 1e-4, lr_decay: float = 1.0, batch_size: int = 100, epochs: int = 50,
                 n_chains: int | None = None, n_temperatures: int = 10, beta_min: float = 0.3, seed: int = 0,
                 progress: bool = True):
        if negative not in NEGATIVE_PHASES:
            raise ValueError(f"ContrastiveDivergence: negative must be one of {', '.join(NEGATIVE_PHASES)}, "
                             f"got {negative!r}")
        if int(k) < 1 or int(batch_size) < 1 or int(epochs) < 1:
            raise ValueError("ContrastiveDivergence: k, batch_size and epochs must be >= 1")
        if negative == "pt" and (int(n_temperatures) < 2 or not 0 < float(beta_min) < 1):
            raise ValueError("ContrastiveDivergence: parallel tempering needs n_temperatures >= 2 and "
                             "0 < beta_min < 1")
        self.negative, self.k, self.lr, self.momentum = negative, int(k), float(lr), float(momentum)
        self.weight_decay, self.lr_decay = float(weight_decay), float(lr_decay)
        self.batch_size, self.epochs = int(batch_size), int(epochs)
        self.n_chains = None if n_chains is None else int(n_chains)
        self.n_temperatures, self.beta_min = int(n_temperatures), float(beta_min)
        self.seed, self.progress = int(seed), bool(progress)

    def __repr__(self) -> str:
        return (f"ContrastiveDivergence(negative={self.negative!r}, k={self.k}, lr={self.lr}, "
                f"batch_size={self.batch_size}, epochs={self.epochs})")

    def _betas(self, dtype) -> torch.Tensor:
        return torch.logspace(0, torch.log10(torch.tensor(self.beta_min)), self.n_temperatures, dtype=dtype)

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

    def run(self, model: torch.nn.Module, v: torch.Tensor, callback=None) -> ContrastiveResult:
        """Train ``model`` on configurations ``v`` (n, N); ``callback(epoch, result)`` runs after every epoch and
        may return a string to stop (its reason)."""
        gen = torch.Generator().manual_seed(self.seed)
        v = v.to(next(model.parameters()).dtype)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.lr_decay)
        n = v.shape[0]
        n_chains = self.n_chains or min(self.batch_size, n)
        start = v[torch.randint(0, n, (n_chains,), generator=gen)].clone()
        betas = self._betas(v.dtype) if self.negative == "pt" else None
        chains = start.expand(len(betas), -1, -1).clone() if betas is not None else start
        result = ContrastiveResult()
        swaps = [0, 0]
        t0 = time.perf_counter()
        bar = tqdm(total=self.epochs, disable=not self.progress, desc=f"RBM ({self.negative})", dynamic_ncols=True,
                   mininterval=1.0)
        result.stop_reason = f"epoch budget of {self.epochs} reached"
        with watch_signals():
            try:
                for epoch in range(self.epochs):
                    perm = torch.randperm(n, generator=gen)
                    for s in range(0, n - self.batch_size + 1, self.batch_size):
                        stop_if_signalled(result.steps)  # no checkpoint: the run stops, to be started again
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
                    sched.step()
                    result.epochs = epoch + 1
                    bar.update(1)
                    stop = callback(result.epochs, result) if callback is not None else None
                    if stop:
                        result.stop_reason = str(stop)
                        break
            finally:
                bar.close()
        result.swap_rate = swaps[0] / swaps[1] if swaps[1] else None
        result.wall_time = time.perf_counter() - t0
        log.info("RBM training (%s-%d): %s; %d steps, %.1f s", self.negative, self.k, result.stop_reason,
                 result.steps, result.wall_time)
        return result
