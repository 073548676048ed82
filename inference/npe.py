"""Neural posterior estimation: amortized training on simulated pairs, focusing on one observation, rounds.

Knows nothing of the physics. A *flow* is any ``nn.Module`` with ``log_prob(theta, x)``, ``sample(x, n)``,
``rsample_and_log_prob(x, n)``, ``fit_standardization(theta, x)`` and ``set_box(low, high)`` (e.g.
:class:`~physppl.inference.flows.ConditionalBoxFlow`); a *simulator* maps parameters (n, D) to data
(n, ...); the prior is a uniform box.

* :class:`NPETrainer`: maximum likelihood ``-log q(theta | x)`` on simulated pairs (Papamakarios & Murray 2016),
  with a held-out tenth for early stopping, progress bar, checkpoints every epoch and resume.
* :class:`VariationalFocus`: fit one observation's posterior by maximising the ELBO against the likelihood
  with a flow started from an amortized posterior's draws; possible whenever the likelihood is tractable.
* :class:`TruncatedSequentialNPE`: sequential rounds focused on one observation with truncated proposals
  (Deistler et al. 2022, TSNPE): each round simulates from the prior restricted to a box around the current
  posterior's mass, so the plain NPE loss stays valid and the density estimator works at the observation's scale.
* :class:`AmortizedPosterior`: the saved, reloadable posterior (``posterior.sample(x, n)``).
* :func:`fit_ensemble`: several estimators, each from its own initialisation, trained on the same pairs and
  joined into their mixture (:class:`~physppl.inference.estimators.EnsembleEstimator`).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .device import resolve_device
from .interrupt import Interrupted, stop_if_signalled, watch_signals
from .outputs import atomic_write
from .svi import TrainingDivergedError

__all__ = ["SBIPlan", "NPETrainer", "NPEResult", "fit_ensemble", "AmortizedPosterior", "load_posterior",
           "VariationalFocus", "FocusResult", "importance_diagnostics",
           "TruncatedSequentialNPE", "truncation_box"]

log = logging.getLogger(__name__)


@dataclass
class NPEResult:
    train_losses: list[float] = field(default_factory=list)  # mean -log q per epoch
    val_losses: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    best_epoch: int = 0
    wall_time: float = 0.0
    stop_reason: str = ""
    resumed_from: int = 0

    @property
    def best_val_loss(self) -> float:
        return float(min(self.val_losses)) if self.val_losses else float("nan")


class NPETrainer:
    """Train a conditional density estimator ``q(theta | x)`` by maximum likelihood on simulated pairs.

    Parameters
    ----------
    lr, batch_size : float, int
        Adam learning rate and minibatch size.
    max_epochs, patience : int
        Epoch budget; stop when the held-out loss has not improved for ``patience`` epochs (the best
        parameters are kept).
    validation_fraction : float
        Fraction of the pairs held out for early stopping.
    clip_norm : float
        Gradient norm clipping.
    max_time : float, optional
        Wall-clock budget in seconds (stops after the epoch that exceeds it).
    resume : bool
        Continue from ``<workdir>/<name>.pt`` if it exists.
    progress : bool
        tqdm progress bar over epochs.
    device : str, optional
        Where to train (``auto``, ``cpu``, ``cuda[:n]``): the flow and the pairs move there for training and the
        flow comes back to the device it was on, so sampling and evaluation code need not know.
    seed : int, optional
        Seed of the train/validation split and of the minibatch order (their own generator, so they do not depend
        on what else drew from torch's global generator); ``None`` draws it from torch's global generator.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        batch_size: int = 256,
        max_epochs: int = 200,
        patience: int = 15,
        validation_fraction: float = 0.1,
        clip_norm: float = 5.0,
        lr_decay: float = 1.0,
        max_time: float | None = None,
        resume: bool = False,
        progress: bool = True,
        device: str | None = None,
        seed: int | None = 0,
    ):
        if not 0 < validation_fraction < 1:
            raise ValueError(f"NPETrainer: validation_fraction must be in (0, 1), got {validation_fraction}")
        if batch_size < 1 or max_epochs < 1:
            raise ValueError("NPETrainer: batch_size and max_epochs must be >= 1")
        self.lr, self.batch_size, self.max_epochs = float(lr), int(batch_size), int(max_epochs)
        self.patience, self.validation_fraction = int(patience), float(validation_fraction)
        self.clip_norm, self.lr_decay = float(clip_norm), float(lr_decay)
        self.max_time = None if max_time is None else float(max_time)
        self.resume, self.progress = bool(resume), bool(progress)
        self.device = None if device is None else resolve_device(device)
        self.seed = None if seed is None else int(seed)

    def _save(self, path: Path, state: dict) -> None:
        atomic_write(path, lambda p: torch.save(state, p))

    def fit(
        self,
        flow: nn.Module,
        theta: torch.Tensor,
        x: torch.Tensor,
        workdir: str | os.PathLike | None = None,
        name: str = "npe_checkpoint",
        standardize: bool = True,
        loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> NPEResult:
        """Fit ``flow`` to pairs ``theta`` (N, D), ``x`` (N, ...) in place; returns the training record.

        ``loss(flow, theta_batch, x_batch)``: the mean loss of a minibatch (default ``-log q(theta | x)``, NPE;
        :func:`~physppl.inference.apt.atomic_loss` for sequential rounds); the held-out loss uses it too.
        """
        if len(theta) != len(x):
            raise ValueError(f"NPETrainer: {len(theta)} parameter vectors but {len(x)} simulations")
        n_val = max(1, int(round(self.validation_fraction * len(theta))))
        if len(theta) - n_val < 2:
            raise ValueError(f"NPETrainer: {len(theta)} simulations are too few to train on")
        if not (torch.isfinite(theta).all() and torch.isfinite(x).all()):
            raise ValueError("NPETrainer: the training pairs contain NaN or infinite values")
        if hasattr(flow, "on_features") and not isinstance(getattr(flow, "features", None), nn.Identity):
            # fixed features (e.g. a per-observation fit) are computed once here, not in every epoch
            x = flow.featurize(x)
            if not torch.isfinite(x).all():
                raise ValueError("NPETrainer: the estimator's features of some simulations are NaN or infinite")
            flow = flow.on_features()
        home = next(iter(flow.parameters()), theta).device
        if self.device is not None and self.device != home:
            flow.to(self.device)
            theta, x = theta.to(self.device), x.to(self.device)
        try:
            return self._fit(flow, theta, x, n_val, workdir, name, standardize, loss or _nll)
        finally:
            flow.to(home)

    def _fit(self, flow: nn.Module, theta: torch.Tensor, x: torch.Tensor, n_val: int, workdir, name: str,
             standardize: bool, loss_fn: Callable) -> NPEResult:
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if self.seed is None else self.seed
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(theta), generator=gen).to(theta.device)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if standardize:
            flow.fit_standardization(theta[train_idx], x[train_idx])
        optim = torch.optim.Adam(flow.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=self.lr_decay)
        result = NPEResult()
        best_state, best_val, since_best = copy.deepcopy(flow.state_dict()), float("inf"), 0
        ckpt = None if workdir is None else Path(workdir) / f"{name}.pt"
        if self.resume and ckpt is not None and ckpt.exists():
            state = torch.load(ckpt, weights_only=False, map_location=theta.device)
            flow.load_state_dict(state["flow"])
            optim.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"].cpu())
            val_idx, train_idx = state["val_idx"], state["train_idx"]
            best_state, best_val, since_best = state["best_state"], state["best_val"], state["since_best"]
            result.train_losses, result.val_losses = state["train_losses"], state["val_losses"]
            result.epochs = result.resumed_from = state["epoch"]
            result.steps, result.best_epoch = state["steps"], state["best_epoch"]
            log.info("resumed neural posterior estimation from %s at epoch %d", ckpt, result.epochs)
        theta_val, x_val = theta[val_idx], x[val_idx]
        t0 = time.perf_counter()
        bar = tqdm(total=self.max_epochs, initial=result.epochs, disable=not self.progress, desc="NPE", dynamic_ncols=True,
                   mininterval=1.0)
        result.stop_reason = f"epoch budget of {self.max_epochs} reached"
        try:
            with watch_signals():
                while result.epochs < self.max_epochs:
                    # each epoch ends with a checkpoint: stop between epochs
                    stop_if_signalled(result.epochs, ckpt, unit="epoch")
                    if since_best >= self.patience:
                        result.stop_reason = f"held-out loss stopped improving (best at epoch {result.best_epoch})"
                        break
                    flow.train()
                    order = train_idx[torch.randperm(len(train_idx), generator=gen).to(train_idx.device)]
                    total, count = 0.0, 0
                    for start in range(0, len(order), self.batch_size):
                        idx = order[start:start + self.batch_size]
                        loss = _guarded(loss_fn, flow, theta[idx], x[idx])
                        if not torch.isfinite(loss):
                            raise TrainingDivergedError(
                                f"neural posterior estimation diverged: loss {loss.item()} at epoch "
                                f"{result.epochs + 1}, step {result.steps + 1}; try a smaller learning rate")
                        optim.zero_grad()
                        loss.backward()
                        nn.utils.clip_grad_norm_(flow.parameters(), self.clip_norm)
                        optim.step()
                        result.steps += 1
                        total, count = total + loss.item() * len(idx), count + len(idx)
                    sched.step()
                    flow.eval()
                    with torch.no_grad():
                        parts = [_guarded(loss_fn, flow, theta_val[s:s + 4096], x_val[s:s + 4096]) * len(theta_val[s:s + 4096])
                                 for s in range(0, len(theta_val), 4096)]
                        val = float(torch.stack(parts).sum() / len(theta_val))
                    if not math.isfinite(val):
                        raise TrainingDivergedError(f"neural posterior estimation diverged: held-out loss {val} at "
                                                    f"epoch {result.epochs + 1}; try a smaller learning rate")
                    result.epochs += 1
                    result.train_losses.append(total / count)
                    result.val_losses.append(val)
                    if val < best_val - 1e-4:
                        best_val, since_best, result.best_epoch = val, 0, result.epochs
                        best_state = copy.deepcopy(flow.state_dict())
                    else:
                        since_best += 1
                    bar.update(1)
                    bar.set_postfix(train=f"{total / count:.4g}", val=f"{val:.4g}", best=f"{best_val:.4g}")
                    if ckpt is not None:
                        self._save(ckpt, {"flow": flow.state_dict(), "optim": optim.state_dict(),
                                          "sched": sched.state_dict(), "gen": gen.get_state(), "val_idx": val_idx,
                                          "train_idx": train_idx,
                                          "best_state": best_state, "best_val": best_val, "since_best": since_best,
                                          "train_losses": result.train_losses, "val_losses": result.val_losses,
                                          "epoch": result.epochs, "steps": result.steps,
                                          "best_epoch": result.best_epoch})
                    if self.max_time is not None and time.perf_counter() - t0 > self.max_time:
                        result.stop_reason = f"time budget of {self.max_time:g} s reached"
                        break
        except KeyboardInterrupt:  # a second Ctrl-C mid-epoch: the last epoch's checkpoint stands
            raise Interrupted(signal.SIGINT, result.epochs, ckpt if ckpt is not None and ckpt.exists() else None,
                              unit="epoch") from None
        finally:
            bar.close()
        if since_best >= self.patience and "stopped" not in result.stop_reason:
            result.stop_reason = f"held-out loss stopped improving (best at epoch {result.best_epoch})"
        flow.load_state_dict(best_state)
        flow.eval()
        result.wall_time = time.perf_counter() - t0
        log.info("NPE: %s; best held-out -log q %.4f after %d epochs (%d steps), %.1f s", result.stop_reason,
                 result.best_val_loss, result.epochs, result.steps, result.wall_time)
        return result


def fit_ensemble(trainer: NPETrainer, make: Callable[[], nn.Module], theta: torch.Tensor, x: torch.Tensor,
                 members: int, seed: int = 0, workdir: str | os.PathLike | None = None,
                 name: str = "npe_checkpoint") -> tuple[nn.Module, list[NPEResult]]:
    """``members`` estimators from ``make()``, member ``k`` initialised from seed ``seed + k`` (torch's global
    generator is given back afterwards), each trained by ``trainer`` on the same pairs (checkpoints
    ``<name>_<k>``), joined into an :class:`~physppl.inference.estimators.EnsembleEstimator`; with each training
    record."""
    from .estimators import EnsembleEstimator

    if int(members) < 1:
        raise ValueError(f"fit_ensemble: members must be >= 1, got {members}")
    nets, results = [], []
    for k in range(int(members)):
        with torch.random.fork_rng():
            torch.manual_seed(int(seed) + k)
            net = make()
        results.append(trainer.fit(net, theta, x, workdir=workdir, name=f"{name}_{k}"))
        nets.append(net)
        log.info("ensemble member %d of %d: %d epochs, held-out loss %.4f", k + 1, members, results[-1].epochs,
                 results[-1].best_val_loss)
    return EnsembleEstimator(nets), results


def _nll(flow: nn.Module, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean ``-log q(theta | x)``: the NPE loss."""
    return -flow.log_prob(theta, x).mean()


def _guarded(loss_fn: Callable, flow: nn.Module, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The loss, or NaN (not an exception) when the flow's parameters went NaN."""
    try:
        return loss_fn(flow, theta, x)
    except ValueError as err:  # argument validation (Pyro's, torch's) meets NaN parameters
        log.debug("invalid log_prob arguments: %s", err)
        return torch.tensor(float("nan"))


class AmortizedPosterior(nn.Module):
    """A trained conditional flow with its parameter names: ``sample(x, n)`` and ``log_prob(theta, x)``.

    Saved with :meth:`save` (a pickled module: reload with :func:`load_posterior` in the same package version).
    """

    def __init__(self, flow: nn.Module, param_names: Sequence[str], info: dict | None = None):
        super().__init__()
        self.flow = flow
        self.param_names = tuple(param_names)
        self.info = dict(info or {})

    def _as_tensor(self, x) -> torch.Tensor:
        ref = next(iter(self.flow.buffers()))
        return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=ref.dtype, device=ref.device)

    def sample(self, x, n: int = 1000) -> torch.Tensor:
        """``n`` posterior draws: shape (n, D) for one observation, (n, batch, D) for a batch of observations."""
        return self.flow.sample(self._as_tensor(x), int(n))

    def log_prob(self, theta, x) -> torch.Tensor:
        with torch.no_grad():
            return self.flow.log_prob(self._as_tensor(theta), self._as_tensor(x))

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, lambda p: torch.save(self, p))


def load_posterior(path: str | os.PathLike) -> AmortizedPosterior:
    """Reload a posterior written by :meth:`AmortizedPosterior.save` (a trusted file: it is unpickled)."""
    post = torch.load(Path(path), weights_only=False)
    if not isinstance(post, AmortizedPosterior):
        raise ValueError(f"{path}: not a saved posterior (found {type(post).__name__})")
    post.eval()
    return post


@dataclass
class FocusResult:
    losses: list[float] = field(default_factory=list)  # negative ELBO per step (up to the prior's constant)
    steps: int = 0
    wall_time: float = 0.0
    pareto_k: float = float("nan")  # PSIS diagnostic of q as an importance sampler: < 0.7 means q fits well
    ess_fraction: float = float("nan")  # importance-sampling effective sample size per draw
    stop_reason: str = ""


class VariationalFocus:
    """Fit one observation's posterior ``p(theta | x_obs)`` on a box by variational inference with a flow.

    Maximises ``E_q[log p(x_obs | theta) + log p(theta) - log q(theta)]`` (the prior is uniform on the box) with
    a :class:`~physppl.inference.flows.BoxFlow` started at a Gaussian fitted to draws of an amortized
    posterior (inflated, so the fit starts wide and contracts). Needs a tractable likelihood; much more
    accurate for one observation than an amortized estimate at any simulation budget.

    Parameters
    ----------
    steps, particles : int
        Optimisation steps and Monte Carlo draws per step.
    lr, final_lr_fraction : float
        Adam learning rate, decayed exponentially to ``lr * final_lr_fraction`` at the last step.
    inflate : float
        Factor on the initial Gaussian's scale.
    n_transforms, hidden_dims, count_bins, bound
        The flow (see :class:`~physppl.inference.flows.BoxFlow`).
    n_check : int
        Draws for the importance-sampling diagnostics (Pareto k, ESS) after the fit.
    """

    def __init__(self, steps: int = 1500, particles: int = 256, lr: float = 5e-3, final_lr_fraction: float = 0.05,
                 inflate: float = 1.5, n_transforms: int = 2, hidden_dims: Sequence[int] = (32, 32), count_bins: int = 8,
                 bound: float = 4.0, clip_norm: float = 10.0, n_check: int = 4000, progress: bool = True):
        if steps < 1 or particles < 1:
            raise ValueError("VariationalFocus: steps and particles must be >= 1")
        self.steps, self.particles, self.lr = int(steps), int(particles), float(lr)
        self.final_lr_fraction, self.inflate = float(final_lr_fraction), float(inflate)
        self.flow_kwargs = dict(n_transforms=int(n_transforms), hidden_dims=tuple(hidden_dims),
                                count_bins=int(count_bins), bound=float(bound))
        self.clip_norm, self.n_check, self.progress = float(clip_norm), int(n_check), bool(progress)

    def fit(self, log_likelihood: Callable[[torch.Tensor], torch.Tensor], low: torch.Tensor, high: torch.Tensor,
            init_draws: torch.Tensor, desc: str = "focus"):
        """``log_likelihood(theta)`` for theta (n, D) -> (n,); ``init_draws`` (m, D) place the starting Gaussian.
        Returns the fitted flow and a :class:`FocusResult`."""
        from .flows import BoxFlow, box_to_unconstrained

        u = box_to_unconstrained(init_draws, low, high)
        loc = u.mean(0)
        cov = torch.cov(u.T).reshape(len(loc), len(loc)) * self.inflate**2
        cov = cov + 1e-6 * torch.eye(len(loc)) * cov.diagonal().mean().clamp_min(1e-8)
        flow = BoxFlow(low, high, loc, torch.linalg.cholesky(cov), **self.flow_kwargs)
        optim = torch.optim.Adam(flow.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=self.final_lr_fraction ** (1.0 / self.steps))
        log_prior = -torch.log(high - low).sum()
        result = FocusResult()
        t0 = time.perf_counter()
        bar = tqdm(range(self.steps), disable=not self.progress, desc=desc, dynamic_ncols=True, mininterval=1.0)
        for step in bar:
            theta, log_q = flow.rsample_and_log_prob(self.particles)
            loss = -(log_likelihood(theta) + log_prior - log_q).mean()
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"variational fit ({desc}) diverged at step {step + 1}: loss {loss.item()}; "
                                            "try a smaller learning rate")
            optim.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), self.clip_norm)
            optim.step()
            sched.step()
            result.losses.append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(neg_elbo=f"{np.mean(result.losses[-50:]):.5g}")
        bar.close()
        result.steps = self.steps
        result.stop_reason = f"step budget of {self.steps} reached"
        flow.eval()
        with torch.no_grad():
            theta, log_q = flow.rsample_and_log_prob(self.n_check)
            log_w = (log_likelihood(theta) + log_prior - log_q).double().numpy()
        result.pareto_k, result.ess_fraction = importance_diagnostics(log_w)
        result.wall_time = time.perf_counter() - t0
        return flow, result


def importance_diagnostics(log_w: np.ndarray) -> tuple[float, float]:
    """Pareto-smoothed importance sampling k-hat (Vehtari et al. 2015; < 0.7: reliable) and ESS per draw."""
    import arviz as az

    with np.errstate(over="ignore", invalid="ignore"):  # a degenerate fit gives k-hat = inf, not a warning
        _, khat = az.psislw(np.asarray(log_w, dtype=float).copy())
    w = np.exp(log_w - log_w.max())
    ess = w.sum() ** 2 / (w**2).sum() / len(w)
    return float(khat), float(ess)


def truncation_box(draws: torch.Tensor, low: torch.Tensor, high: torch.Tensor, quantile: float = 1e-3,
                   expand: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A box holding the posterior's mass: per-parameter ``[quantile, 1 - quantile]`` range of ``draws`` (n, D),
    widened by ``expand`` times its width on each side, intersected with ``[low, high]``."""
    lo, hi = torch.quantile(draws, torch.tensor([quantile, 1 - quantile], dtype=draws.dtype), dim=0)
    width = hi - lo
    return torch.maximum(lo - expand * width, low), torch.minimum(hi + expand * width, high)


class TruncatedSequentialNPE:
    """Sequential neural posterior estimation for one observation, with truncated (box) proposals.

    Round 1 trains on draws from the prior. Each later round simulates from the prior restricted to a box
    around the current posterior's mass for ``x_obs`` (:func:`truncation_box`, nested in the previous box), and
    trains a fresh estimator on every pair inside the new box: the prior restricted to a box is uniform on it,
    so the plain maximum-likelihood loss remains valid and its posterior is the true one inside the box, which
    holds all but ``2 D quantile`` of the mass.

    Parameters
    ----------
    make_flow : callable
        ``make_flow(low, high)`` builds a fresh estimator for the box.
    trainer : NPETrainer
    simulations_per_round : int
    rounds : int
        Total rounds, the first included.
    quantile, expand : float
        Truncation: see :func:`truncation_box`.
    n_box_draws : int
        Posterior draws used to place the box.
    """

    def __init__(self, make_flow: Callable, trainer: NPETrainer, simulations_per_round: int = 2000, rounds: int = 4,
                 quantile: float = 1e-3, expand: float = 0.5, n_box_draws: int = 20000):
        if rounds < 1:
            raise ValueError(f"TruncatedSequentialNPE: rounds must be >= 1, got {rounds}")
        self.make_flow, self.trainer = make_flow, trainer
        self.simulations_per_round, self.rounds = int(simulations_per_round), int(rounds)
        self.quantile, self.expand, self.n_box_draws = float(quantile), float(expand), int(n_box_draws)

    def run(
        self,
        x_obs: torch.Tensor,
        simulate: Callable[[torch.Tensor], torch.Tensor],
        low: torch.Tensor,
        high: torch.Tensor,
        theta: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        flow: nn.Module | None = None,
        workdir: str | os.PathLike | None = None,
    ) -> tuple[nn.Module, dict]:
        """Run the rounds. ``theta, x``: earlier pairs from the prior (round 1's data); ``flow``: an estimator
        already trained on them (skips round 1's training). Returns the last round's estimator and a record."""
        record: dict = {"boxes": [], "n_train": [], "val_loss": [], "wall_time": []}
        box_lo, box_hi = low.clone(), high.clone()
        if theta is None:
            theta = box_lo + (box_hi - box_lo) * torch.rand((self.simulations_per_round, low.numel()))
            x = simulate(theta)
        for r in range(self.rounds):
            t0 = time.perf_counter()
            if r > 0:
                draws = flow.sample(x_obs, self.n_box_draws)
                new_lo, new_hi = truncation_box(draws, low, high, self.quantile, self.expand)
                box_lo, box_hi = torch.maximum(new_lo, box_lo), torch.minimum(new_hi, box_hi)  # nested boxes
                new_theta = box_lo + (box_hi - box_lo) * torch.rand((self.simulations_per_round, low.numel()))
                theta, x = torch.cat([theta, new_theta]), torch.cat([x, simulate(new_theta)])
            inside = ((theta > box_lo) & (theta < box_hi)).all(-1)
            if r > 0 or flow is None:
                flow = self.make_flow(box_lo, box_hi)
                res = self.trainer.fit(flow, theta[inside], x[inside], workdir=workdir, name=f"round{r + 1}_checkpoint")
                record["val_loss"].append(res.best_val_loss)
            record["boxes"].append((box_lo.tolist(), box_hi.tolist()))
            record["n_train"].append(int(inside.sum()))
            record["wall_time"].append(time.perf_counter() - t0)
            log.info("round %d: %d pairs in the box, box widths %s", r + 1, int(inside.sum()),
                     np.round((box_hi - box_lo).numpy(), 4).tolist())
        record["simulations"] = int(len(theta))
        return flow, record


@dataclass
class SBIPlan:
    """How a simulation-based job infers: an amortized posterior, optional sequential rounds, optional focus.

    Attributes
    ----------
    amortized : NPETrainer
        Trains the amortized flow by neural posterior estimation (``objective="npe"``).
    objective : {"npe", "vi"}
        Train the amortized flow on simulated pairs (NPE), or by amortized VI against the likelihood over the
        simulated data (``vi_engine``, an :class:`~physppl.inference.svi.SVIEngine`).
    vi_engine : SVIEngine, optional
        The engine of amortized VI.
    rounds : int
        1: amortized only; > 1: that many truncated sequential rounds per observation (TSNPE).
    simulations_per_round : int
        Simulations added in each later round.
    truncation_quantile, truncation_expand : float
        Where the truncated proposal's box is placed (see :func:`truncation_box`).
    focus : VariationalFocus, optional
        Finally fit each observation's posterior by VI against the likelihood, started from the flow's draws.
    refinement : ImportanceRefinement, optional
        Importance sampling against the likelihood with the focused fit and the amortized flow as candidate
        proposals (:func:`~physppl.inference.refine.refine`): the better diagnosed one (Pareto k, ESS) gives the
        draws, with a WARNING when neither passes. None: the focused fit's (or the flow's) own draws.
    """

    amortized: NPETrainer
    objective: str = "npe"
    vi_engine: object | None = None
    rounds: int = 1
    simulations_per_round: int = 2000
    truncation_quantile: float = 1e-3
    truncation_expand: float = 0.5
    focus: VariationalFocus | None = None
    refinement: object | None = None  # an ImportanceRefinement (refine.py imports this module: no annotation)

    def __post_init__(self):
        if self.objective not in ("npe", "vi"):
            raise ValueError(f"SBIPlan: objective must be 'npe' or 'vi', got {self.objective!r}")
        if self.objective == "vi" and self.vi_engine is None:
            raise ValueError("SBIPlan: objective 'vi' needs a vi_engine (an SVIEngine)")
        if int(self.rounds) < 1:
            raise ValueError(f"SBIPlan: rounds must be >= 1, got {self.rounds}")
        self.rounds = int(self.rounds)
