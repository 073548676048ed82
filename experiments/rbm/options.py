"""The RBM jobs' options (the command line's ``evaluation.*`` and ``sampling.*``): each default once."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Evaluation", "Sampling"]


@dataclass(frozen=True)
class Evaluation:
    """How a trained RBM is scored (the command line's ``evaluation.*``).

    exact_max_units : log Z by enumerating the smaller layer when it has at most this many units, else AIS
    ais_chains, ais_betas : annealed importance sampling (Salakhutdinov & Murray 2008 used 100 x 14,500)
    eval_every_epochs, monitor_points : the training curve: held-out log-likelihood (exact when enumerable,
        pseudo-log-likelihood otherwise) on up to ``monitor_points`` samples every this many epochs
    posterior_batch : held-out samples whose hidden-unit draws (the exact p(h | v)) go to posterior.nc
    figures : draw the PNGs
    """

    exact_max_units: int = 20
    ais_chains: int = 100
    ais_betas: int = 10000
    eval_every_epochs: int = 5
    monitor_points: int = 500
    posterior_batch: int = 64
    figures: bool = True


@dataclass(frozen=True)
class Sampling:
    """Block-Gibbs sampling of a trained RBM for observables (the command line's ``sampling.*``).

    n_chains : independent chains (error bars by jackknife over them; R-hat across them)
    burn_in : sweeps discarded at the start of each chain
    n_samples, thin : configurations kept per chain, one every ``thin`` sweeps
    """

    n_chains: int = 50
    burn_in: int = 1000
    n_samples: int = 100
    thin: int = 10
