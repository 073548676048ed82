"""Thermodynamic observables of 2-D Ising configurations with jackknife error bars over independent chains.

Per site: energy ``e = E / N``, ``|m|``; specific heat ``C = N var(e) / T^2`` and susceptibility
``chi = N (<m^2> - <|m|>^2) / T`` (the finite-lattice convention with ``|m|``, since <m> = 0 by symmetry).
"""
from __future__ import annotations

import numpy as np

from physppl.models.simulators.ising import energy, enumerate_states, magnetization

__all__ = ["OBSERVABLES", "observables", "exact_boltzmann", "enumerated_observables"]

OBSERVABLES = ("energy", "abs_magnetization", "specific_heat", "susceptibility")


def _estimates(e: np.ndarray, m: np.ndarray, n_sites: int, t: float, w: np.ndarray | None = None) -> np.ndarray:
    w = np.full(e.shape, 1.0 / e.size) if w is None else w / w.sum()
    mean_e, mean_am, mean_m2 = w @ e, w @ np.abs(m), w @ m**2
    return np.array([mean_e, mean_am, n_sites * (w @ e**2 - mean_e**2) / t**2, n_sites * (mean_m2 - mean_am**2) / t])


def observables(spins: np.ndarray, temperature: float, groups: np.ndarray) -> dict[str, tuple[float, float]]:
    """``{name: (value, error)}`` from configurations ``spins`` (n, L, L) of +-1; ``groups`` labels each sample's
    independent chain: the error is the delete-one-chain jackknife's (correlations within a chain are kept)."""
    s = np.asarray(spins)
    n_sites = s.shape[-1] * s.shape[-2]
    e, m = energy(s) / n_sites, magnetization(s)
    full = _estimates(e, m, n_sites, temperature)
    ids = np.unique(groups)
    if len(ids) < 2:
        return {k: (float(v), float("nan")) for k, v in zip(OBSERVABLES, full)}
    leave = np.stack([_estimates(e[groups != g], m[groups != g], n_sites, temperature) for g in ids])
    err = np.sqrt((len(ids) - 1) / len(ids) * ((leave - leave.mean(0)) ** 2).sum(0))
    return {k: (float(v), float(d)) for k, v, d in zip(OBSERVABLES, full, err)}


def exact_boltzmann(L: int, temperature: float) -> tuple[np.ndarray, dict[str, float]]:
    """Log-probabilities of every configuration of the L x L lattice (L <= 4) in :func:`enumerate_states` order,
    and the exact observables."""
    log_w = -energy(enumerate_states(L)).astype(np.float64) / temperature
    log_p = log_w - np.logaddexp.reduce(log_w)
    return log_p, enumerated_observables(log_p, L, temperature)


def enumerated_observables(log_p: np.ndarray, L: int, temperature: float) -> dict[str, float]:
    """The observables of any distribution over the L x L configurations given by its log-probabilities in
    :func:`enumerate_states` order (the Boltzmann distribution, or a trained RBM's exact marginal)."""
    states = enumerate_states(L)
    n_sites = L * L
    values = _estimates(energy(states) / n_sites, magnetization(states), n_sites, temperature, np.exp(log_p))
    return dict(zip(OBSERVABLES, map(float, values)))
