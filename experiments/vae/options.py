"""The VAE job's options (the command line's ``training.*``, ``evaluation.*``, ``physics.*``): each default once."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Training", "Evaluation", "PhaseAnalysis"]


@dataclass(frozen=True)
class Training:
    """How long and how the VAE trains (the command line's ``training.*``).

    epochs : step budget = epochs x (n_train // batch_size)
    eval_every_epochs : held-out ELBO on the validation split every this many epochs
    patience : early stopping after this many evaluations without improvement (None: never)
    min_delta : the improvement (nats) that counts
    eval_particles : particles of the held-out ELBO
    convergence_test : also the engine's loss-window test (noisy with minibatches; the held-out ELBO decides)
    """

    epochs: int | None = 200
    eval_every_epochs: int = 1
    patience: int | None = 20
    min_delta: float = 0.0
    eval_particles: int = 4
    convergence_test: bool = False


@dataclass(frozen=True)
class Evaluation:
    """Held-out figures and outputs (the command line's ``evaluation.*``).

    iwae_particles, max_points, batch_size : IWAE with this many importance samples on up to ``max_points`` test
        samples, ``batch_size`` at a time
    gap_points, gap_steps, gap_lr, gap_particles : the amortization gap, from a per-sample mean-field guide fitted on
        ``gap_points`` test samples (0 skips it)
    posterior_batch, posterior_rows : the held-out samples whose latent draws go to posterior.nc (a random batch, or
        these rows of the data set)
    figures : draw the PNGs
    """

    iwae_particles: int = 1000
    max_points: int | None = 1000
    batch_size: int = 64
    gap_points: int = 100
    gap_steps: int = 1000
    gap_lr: float = 0.05
    gap_particles: int = 100
    posterior_batch: int = 64
    posterior_rows: tuple[int, ...] | None = None
    figures: bool = True


@dataclass(frozen=True)
class PhaseAnalysis:
    """The Ising phase analysis (``physics.*``): the latent classifier trains only on clearly ordered
    (T < ``ordered_below``) and disordered (T > ``disordered_above``) samples."""

    ordered_below: float = 1.8
    disordered_above: float = 2.8
