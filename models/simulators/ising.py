"""The 2-D Ising model on an L x L periodic lattice: samplers, exact enumeration and Onsager's results.

Energy ``H(s) = -J sum_<ij> s_i s_j`` over nearest-neighbour pairs (each site's right and down bond, periodic
boundaries), ``J = k_B = 1``, spins ``s_i = +-1``, Boltzmann weight ``exp(-H / T)``. The critical temperature of
the infinite lattice is Onsager's ``T_c = 2 / ln(1 + sqrt 2) = 2.269185...``.

Samplers run many chains at once (one per row of a ``(n_chains, L, L)`` array, each at its own temperature):

* :func:`metropolis_sweep`, checkerboard Metropolis: the two sublattices of an even-L periodic lattice do not
  touch, so each half-sweep flips all sites of one colour in parallel and is exactly reversible.
* :func:`swendsen_wang_update`, the Swendsen-Wang cluster algorithm: bonds between aligned neighbours are
  activated with probability ``1 - exp(-2/T)``, clusters (connected components, across the periodic edges)
  flip with probability 1/2. It removes critical slowing down near T_c and flips the ordered phase between
  its two magnetisation signs, which local Metropolis cannot do on a 32 x 32 lattice.

:func:`sample_ising` combines them into independent configurations on a grid of temperatures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.special import ellipk

__all__ = [
    "T_C",
    "IsingSamples",
    "energy",
    "magnetization",
    "metropolis_half_sweep",
    "metropolis_sweep",
    "swendsen_wang_update",
    "sample_ising",
    "enumerate_states",
    "exact_observables",
    "onsager_energy",
    "onsager_magnetization",
]

T_C = 2.0 / math.log(1.0 + math.sqrt(2.0))  # Onsager's critical temperature, J = k_B = 1


def _check_lattice(spins: np.ndarray) -> tuple[int, int]:
    if spins.ndim != 3 or spins.shape[1] != spins.shape[2]:
        raise ValueError(f"spins must have shape (n_chains, L, L), got {spins.shape}")
    return spins.shape[0], spins.shape[1]


def energy(spins: np.ndarray) -> np.ndarray:
    """Total energy ``-sum_<ij> s_i s_j`` of each configuration, shape ``spins.shape[:-2]``."""
    s = np.asarray(spins, dtype=np.int32)
    return -(s * (np.roll(s, -1, axis=-1) + np.roll(s, -1, axis=-2))).sum(axis=(-1, -2))


def magnetization(spins: np.ndarray) -> np.ndarray:
    """Magnetisation per site ``sum_i s_i / L^2`` (signed) of each configuration."""
    s = np.asarray(spins, dtype=np.int32)
    return s.sum(axis=(-1, -2)) / (s.shape[-1] * s.shape[-2])


def _local_field(s: np.ndarray) -> np.ndarray:
    return np.roll(s, 1, -1) + np.roll(s, -1, -1) + np.roll(s, 1, -2) + np.roll(s, -1, -2)


def metropolis_half_sweep(spins: np.ndarray, beta: np.ndarray, parity: int, rng: np.random.Generator) -> np.ndarray:
    """Metropolis update of every site of one colour (``(i + j) % 2 == parity``) of every chain, in place.

    Same-colour sites share no bond, so their updates are independent and the half-sweep is exactly a product
    of single-site Metropolis kernels: reversible with respect to the Boltzmann distribution.

    Parameters
    ----------
    spins : int8 array, shape (n_chains, L, L), values +-1, L even
    beta : array, shape (n_chains,)
        Inverse temperature of each chain.
    parity : {0, 1}
        Which sublattice to update.
    """
    n, L = _check_lattice(spins)
    if L % 2:
        raise ValueError(f"checkerboard Metropolis needs an even lattice size (odd L={L} with periodic "
                         "boundaries joins two sites of the same colour)")
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), (n,))
    # acceptance min(1, exp(-beta dE)) for dE = 2 s h in {-8, -4, 0, 4, 8}: a table per chain, no exp per site
    table = np.minimum(1.0, np.exp(-beta[:, None] * np.array([-8.0, -4.0, 0.0, 4.0, 8.0])))
    s = spins.astype(np.int8, copy=False)
    dE_index = (s * _local_field(s) + 4) // 2  # 0..4
    accept = rng.random(spins.shape) < table[np.arange(n)[:, None, None], dE_index]
    colour = np.add.outer(np.arange(L), np.arange(L)) % 2 == parity
    spins[accept & colour] *= -1
    return spins


def metropolis_sweep(spins: np.ndarray, beta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One checkerboard Metropolis sweep (both sublattices) of every chain, in place; returns ``spins``."""
    metropolis_half_sweep(spins, beta, 0, rng)
    return metropolis_half_sweep(spins, beta, 1, rng)


def swendsen_wang_update(spins: np.ndarray, beta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Swendsen-Wang update of every chain, in place; returns ``spins``.

    Clusters are found by scipy's connected components (C code) on one sparse graph holding all chains, so
    the update is vectorised over chains and periodic bonds need no special case.
    """
    n, L = _check_lattice(spins)
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), (n,))
    p_bond = (1.0 - np.exp(-2.0 * beta))[:, None, None]
    site = np.arange(n * L * L).reshape(n, L, L)
    heads, tails = [], []
    for axis in (-1, -2):
        neighbour = np.roll(site, -1, axis=axis)
        active = (spins == np.roll(spins, -1, axis=axis)) & (rng.random(spins.shape) < p_bond)
        heads.append(site[active])
        tails.append(neighbour[active])
    head, tail = np.concatenate(heads), np.concatenate(tails)
    graph = sparse.coo_matrix((np.ones(head.size, dtype=np.int8), (head, tail)), shape=(site.size, site.size))
    n_clusters, label = connected_components(graph, directed=False)
    sign = np.where(rng.random(n_clusters) < 0.5, -1, 1).astype(spins.dtype)
    spins *= sign[label].reshape(spins.shape)
    return spins


@dataclass
class IsingSamples:
    """Configurations with their physical labels; arrays share the first dimension ``n``."""

    spins: np.ndarray  # int8, (n, L, L), +-1
    temperature: np.ndarray  # (n,)
    energy: np.ndarray  # energy per site, (n,)
    magnetization: np.ndarray  # signed magnetisation per site, (n,)
    chain: np.ndarray  # index of the chain that produced each configuration, (n,)

    def __len__(self) -> int:
        return int(self.spins.shape[0])


def sample_ising(
    L: int,
    temperatures: Sequence[float],
    n_per_temperature: int,
    n_chains: int | None = None,
    thermalize: int = 300,
    every: int = 10,
    cluster_max_temperature: float | None = 3.0,
    seed: int = 0,
    progress: bool = False,
) -> IsingSamples:
    """Equilibrium configurations at each temperature, from independent vectorised chains.

    Every chain starts from a random (infinite-temperature) state; one sweep is a checkerboard Metropolis sweep
    followed, for chains at ``T <= cluster_max_temperature``, by a Swendsen-Wang update. After ``thermalize``
    sweeps each chain yields a configuration every ``every`` sweeps.

    Parameters
    ----------
    L : int
        Lattice size (even, >= 2).
    temperatures : sequence of float
        Temperatures (J / k_B units), each > 0.
    n_per_temperature : int
        Configurations per temperature; split over ``n_chains`` chains per temperature (default
        ``min(n_per_temperature, 20)``), so each chain contributes ``ceil(n_per_temperature / n_chains)``.
    cluster_max_temperature : float or None
        Highest temperature at which the cluster update runs (above ~1.3 T_c local moves decorrelate fast and
        clusters are small); ``None`` disables it.
    """
    temps = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if temps.size == 0 or not np.all(np.isfinite(temps)) or np.any(temps <= 0):
        raise ValueError(f"temperatures must be a non-empty list of finite values > 0, got {temperatures!r}")
    if not (isinstance(L, (int, np.integer)) and L >= 2 and L % 2 == 0):
        raise ValueError(f"L must be an even integer >= 2, got {L!r}")
    if n_per_temperature < 1 or thermalize < 0 or every < 1:
        raise ValueError(f"need n_per_temperature >= 1, thermalize >= 0, every >= 1; got {n_per_temperature}, "
                         f"{thermalize}, {every}")
    n_chains = int(min(n_per_temperature, 20) if n_chains is None else n_chains)
    if n_chains < 1:
        raise ValueError(f"n_chains must be >= 1, got {n_chains}")
    per_chain = math.ceil(n_per_temperature / n_chains)
    rng = np.random.default_rng(seed)
    chain_t = np.repeat(temps, n_chains)
    beta = 1.0 / chain_t
    spins = np.where(rng.random((chain_t.size, L, L)) < 0.5, -1, 1).astype(np.int8)
    cluster = np.zeros(chain_t.size, bool) if cluster_max_temperature is None else chain_t <= cluster_max_temperature

    def sweep():
        metropolis_sweep(spins, beta, rng)
        if cluster.any():
            sub = spins[cluster]
            swendsen_wang_update(sub, beta[cluster], rng)
            spins[cluster] = sub

    total = thermalize + per_chain * every
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"Ising L={L}", mininterval=1.0)
    kept = []
    for k in range(1, total + 1):
        sweep()
        if k > thermalize and (k - thermalize) % every == 0:
            kept.append(spins.copy())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # (draw, chain, L, L) -> per temperature, the first n_per_temperature over chains and draws
    draws = np.stack(kept)
    n_t = temps.size
    draws = draws.reshape(per_chain, n_t, n_chains, L, L).transpose(1, 2, 0, 3, 4).reshape(n_t, -1, L, L)
    chain_id = np.broadcast_to(np.arange(n_t * n_chains).reshape(n_t, n_chains, 1), (n_t, n_chains, per_chain))
    draws = draws[:, :n_per_temperature].reshape(-1, L, L)
    chain_id = chain_id.reshape(n_t, -1)[:, :n_per_temperature].reshape(-1)
    t = np.repeat(temps, n_per_temperature)
    return IsingSamples(spins=draws, temperature=t, energy=energy(draws) / (L * L),
                        magnetization=magnetization(draws), chain=chain_id)


# -- exact results ------------------------------------------------------------------------------------------
def enumerate_states(L: int) -> np.ndarray:
    """All ``2^(L*L)`` configurations, int8 array (2^(L*L), L, L); L <= 4 (65,536 states)."""
    if L < 2 or L > 4:
        raise ValueError(f"exact enumeration is for 2 <= L <= 4 (2^(L*L) states), got L={L}")
    n = L * L
    codes = np.arange(2**n, dtype=np.int64)[:, None]
    bits = (codes >> np.arange(n)) & 1
    return (2 * bits - 1).astype(np.int8).reshape(-1, L, L)


def exact_observables(L: int, temperatures: Sequence[float]) -> dict[str, np.ndarray]:
    """Exact Boltzmann averages on an L x L periodic lattice by enumeration, one value per temperature.

    Returns ``energy`` (<E>/N), ``abs_magnetization`` (<|m|>), ``m2`` (<m^2>), ``m4`` (<m^4>) and
    ``log_z`` (log partition function).
    """
    states = enumerate_states(L)
    e = energy(states).astype(np.float64)
    m = magnetization(states)
    out = {k: [] for k in ("energy", "abs_magnetization", "m2", "m4", "log_z")}
    for t in np.asarray(temperatures, dtype=np.float64).reshape(-1):
        logw = -e / t
        shift = logw.max()
        w = np.exp(logw - shift)
        z = w.sum()
        p = w / z
        out["energy"].append(p @ e / (L * L))
        out["abs_magnetization"].append(p @ np.abs(m))
        out["m2"].append(p @ m**2)
        out["m4"].append(p @ m**4)
        out["log_z"].append(math.log(z) + shift)
    return {k: np.asarray(v) for k, v in out.items()}


def onsager_energy(temperature: float | np.ndarray) -> np.ndarray:
    """Energy per site of the infinite square lattice (Onsager 1944)."""
    t = np.asarray(temperature, dtype=np.float64)
    k2b = 2.0 / t
    kappa = 2.0 * np.sinh(k2b) / np.cosh(k2b) ** 2
    coef = 2.0 * np.tanh(k2b) ** 2 - 1.0
    # scipy's ellipk takes the parameter m = kappa^2; K diverges (logarithmically) at T_c, where coef = 0
    with np.errstate(invalid="ignore"):
        term = np.where(np.abs(coef) < 1e-12, 0.0, coef * ellipk(np.minimum(kappa**2, 1.0)))
    return -(1.0 / np.tanh(k2b)) * (1.0 + (2.0 / np.pi) * term)


def onsager_magnetization(temperature: float | np.ndarray) -> np.ndarray:
    """Spontaneous magnetisation per site of the infinite lattice (Onsager-Yang): ``(1 - sinh(2/T)^-4)^(1/8)``."""
    t = np.asarray(temperature, dtype=np.float64)
    inner = 1.0 - np.sinh(2.0 / t) ** -4.0
    return np.where(t < T_C, np.clip(inner, 0.0, None) ** 0.125, 0.0)
