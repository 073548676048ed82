"""Sequential neural posterior estimation with atomic proposals: APT / SNPE-C (Greenberg et al. 2019).

Round 1 trains the estimator on prior simulations by NPE. Each later round draws parameters from the current
posterior at the observation, ``p~_r(theta) = q(theta | x_o)``, simulates, and trains on every pair so far
with the *atomic* loss: for each pair ``(theta_i, x_i)`` a set of ``M`` atoms (``theta_i`` and ``M - 1``
parameters of other pairs in the minibatch) and

    -log [ (q(theta_i | x_i) / p(theta_i)) / sum_j (q(theta_j | x_i) / p(theta_j)) ]

whose minimiser is the true posterior whatever the proposals were ("which of these parameters generated this
x?"). With prior proposals the atoms are prior draws, and as ``M`` grows the loss tends to the NPE loss
``-log q(theta_i | x_i)`` plus ``log p(theta_i) + log M`` (constants for the network), which is why round 1 uses NPE directly (as sbi does).
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .priors import Prior, as_prior

__all__ = ["AtomicLoss", "SequentialAPT", "APTRecord"]

log = logging.getLogger(__name__)


class AtomicLoss:
    """The APT atomic loss over a minibatch (see the module docstring); a ``loss`` for :class:`NPETrainer`.

    Parameters
    ----------
    prior : Prior or distribution
        ``p(theta)`` of the atoms' ratio.
    num_atoms : int
        ``M``, atoms per pair (the pair's own parameter included); capped at the minibatch size.
    seed : int
        Seed of the atoms' draws (their own generator).
    """

    def __init__(self, prior, num_atoms: int = 10, seed: int = 0):
        if num_atoms < 2:
            raise ValueError(f"AtomicLoss: num_atoms must be >= 2, got {num_atoms}")
        self.prior: Prior = as_prior(prior)
        self.num_atoms = int(num_atoms)
        self.gen = torch.Generator().manual_seed(int(seed))

    def atoms(self, theta: torch.Tensor) -> torch.Tensor:
        """(B, M, D): each pair's own parameter first, then ``M - 1`` others of the batch, without replacement."""
        b = theta.shape[0]
        m = min(self.num_atoms, b)
        probs = (1.0 - torch.eye(b)) / max(b - 1, 1)
        others = torch.multinomial(probs, m - 1, replacement=False, generator=self.gen).to(theta.device)
        return torch.cat([theta.unsqueeze(1), theta[others]], dim=1)

    def __call__(self, flow: nn.Module, theta: torch.Tensor, x: torch.Tensor,
                 atoms: torch.Tensor | None = None) -> torch.Tensor:
        atoms = self.atoms(theta) if atoms is None else atoms  # (B, M, D)
        b, m, d = atoms.shape
        x_rep = x.unsqueeze(1).expand((b, m) + x.shape[1:])
        log_q = flow.log_prob(atoms.reshape(b * m, d), x_rep.reshape((b * m,) + x.shape[1:])).reshape(b, m)
        log_p = self.prior.log_prob(atoms.reshape(b * m, d).cpu()).to(log_q).reshape(b, m)
        ratio = log_q - log_p
        return -(ratio[:, 0] - torch.logsumexp(ratio, dim=1)).mean()


@dataclass
class APTRecord:
    simulations: list[int] = field(default_factory=list)   # pairs trained on after each round
    val_loss: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    change: list[float] = field(default_factory=list)       # KL(q_r || q_{r-1}) at x_o, nats (nan for round 1)
    sd: list[list[float]] = field(default_factory=list)     # posterior sd per parameter at x_o
    wall_time: list[float] = field(default_factory=list)
    stalled_at: int | None = None                          # first round whose change fell below min_change
    note: str = ""


class SequentialAPT:
    """APT rounds focused on one observation (the seed's Algorithm 1).

    Parameters
    ----------
    trainer : NPETrainer
        Trains every round (the same network, continued from the previous round's weights).
    rounds : int
        Total rounds, the first (prior simulations, NPE loss) included.
    simulations_per_round : int
        Simulations drawn from the current posterior in each later round.
    num_atoms : int
        Atoms of the atomic loss.
    min_change : float
        A round whose posterior at ``x_o`` moved by less than this (KL from the previous round's, in nats) has
        stopped improving: it is logged as a WARNING, recorded, and (``stop_when_stalled``) ends the rounds.
    n_check : int
        Draws for the per-round KL and sds.
    """

    def __init__(self, trainer, rounds: int = 4, simulations_per_round: int = 2000, num_atoms: int = 10,
                 min_change: float = 0.01, stop_when_stalled: bool = True, n_check: int = 4000, seed: int = 0):
        if rounds < 1:
            raise ValueError(f"SequentialAPT: rounds must be >= 1, got {rounds}")
        self.trainer, self.rounds = trainer, int(rounds)
        self.simulations_per_round, self.num_atoms = int(simulations_per_round), int(num_atoms)
        self.min_change, self.stop_when_stalled = float(min_change), bool(stop_when_stalled)
        self.n_check, self.seed = int(n_check), int(seed)

    def run(self, estimator: nn.Module, prior, simulate: Callable[[torch.Tensor], torch.Tensor], x_obs: torch.Tensor,
            theta: torch.Tensor | None = None, x: torch.Tensor | None = None, trained: bool = False,
            workdir: str | os.PathLike | None = None) -> tuple[nn.Module, APTRecord]:
        """Run the rounds on ``estimator`` (in place) and return it with the record.

        ``theta, x``: round 1's prior simulations (drawn here when None); ``trained``: the estimator was already
        trained on them (the amortized posterior), so round 1 only records.
        """
        prior = as_prior(prior)
        record = APTRecord()
        gen = torch.Generator().manual_seed(self.seed)
        if theta is None:
            theta = prior.sample(self.simulations_per_round, generator=gen)
            x = simulate(theta)
        loss = AtomicLoss(prior, self.num_atoms, seed=self.seed)
        previous = None
        for r in range(self.rounds):
            t0 = time.perf_counter()
            if r > 0:
                new_theta = estimator.sample(x_obs, self.simulations_per_round)
                new_x = simulate(new_theta)
                finite = torch.isfinite(new_x.reshape(len(new_x), -1)).all(-1)
                if not bool(finite.all()):
                    log.warning("APT round %d: %d of %d simulations are not finite and are dropped", r + 1,
                                int((~finite).sum()), len(new_x))
                theta, x = torch.cat([theta, new_theta[finite]]), torch.cat([x, new_x[finite]])
            wd = None if workdir is None else Path(workdir)
            if r > 0 or not trained:
                res = self.trainer.fit(estimator, theta, x, workdir=wd, name=f"apt_round{r + 1}_checkpoint",
                                       standardize=(r == 0), loss=None if r == 0 else loss)
                record.val_loss.append(res.best_val_loss)
                record.epochs.append(res.epochs)
            else:
                record.val_loss.append(float("nan"))
                record.epochs.append(0)
            draws, log_q = estimator.sample_and_log_prob(x_obs, self.n_check)
            record.sd.append(draws.std(0).tolist())
            if previous is None:
                record.change.append(float("nan"))
            else:
                with torch.no_grad():
                    kl = float((log_q - previous.log_prob(draws, x_obs)).mean())
                record.change.append(kl)
                if kl < self.min_change and record.stalled_at is None:
                    record.stalled_at = r + 1
                    record.note = (f"round {r + 1} stopped improving: the posterior at the observation moved by "
                                   f"{kl:.4f} nats (< {self.min_change:g}); more rounds will not change it")
                    log.warning("APT: %s", record.note)
            previous = copy.deepcopy(estimator).eval()
            record.simulations.append(int(len(theta)))
            record.wall_time.append(time.perf_counter() - t0)
            log.info("APT round %d: %d pairs, held-out loss %.4f, change %.4g nats, sd %s", r + 1, len(theta),
                     record.val_loss[-1], record.change[-1], np.round(record.sd[-1], 4).tolist())
            if record.stalled_at is not None and self.stop_when_stalled:
                break
        return estimator, record
