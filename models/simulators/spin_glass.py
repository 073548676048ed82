"""Ground truth for the inverse Ising problem: coupling matrices and samplers for any couplings and fields.

Convention (the one :mod:`physppl.models.inverse_ising` infers): ``p(s) ∝ exp(sum_{i<j} J_ij s_i s_j + sum_i h_i s_i)``
over spins ``s_i = +-1``, with ``J`` already holding the inverse temperature. Sites of an L x L lattice are numbered
row by row, ``site = row * L + col``.

* :func:`ferromagnet_couplings`: the periodic nearest-neighbour ferromagnet at temperature T (``J = 1/T`` on every
  bond), the model of :mod:`physppl.models.simulators.ising` written as a coupling matrix.
* :func:`edwards_anderson_couplings`: the Edwards-Anderson spin glass, bonds ``+-1/T`` with random signs (seeded).
* :func:`sample_exact`: independent draws from the exact Boltzmann distribution by enumerating all ``2^N`` states
  (N <= 20): ground truth with no Markov-chain doubt.
* :func:`sample_gibbs`: heat-bath (or Metropolis) single-site updates in a fixed order, vectorised over many chains,
  for any N; burn-in and thinning in sweeps.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_EXACT_SITES", "lattice_bonds", "ferromagnet_couplings", "edwards_anderson_couplings",
           "check_couplings", "enumerate_spins", "boltzmann_log_weights", "exact_probabilities", "sample_exact",
           "sample_gibbs"]

MAX_EXACT_SITES = 20  # 2^20 states: about 170 MB of float64 weights at most, seconds to enumerate


def lattice_bonds(L: int) -> np.ndarray:
    """Nearest-neighbour bonds ``(i, j)``, ``i < j``, of the periodic L x L lattice, shape (n_bonds,); each site's
    right and down bond, so ``2 L^2`` bonds for L >= 3 (for L = 2 the two periodic neighbours coincide: 4 bonds)."""
    if not (isinstance(L, (int, np.integer)) and L >= 2):
        raise ValueError(f"lattice side L must be an integer >= 2, got {L!r}")
    site = np.arange(L * L).reshape(L, L)
    pairs = np.concatenate([np.stack([site.ravel(), np.roll(site, -1, axis=a).ravel()], 1) for a in (1, 0)])
    pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0)


def ferromagnet_couplings(L: int, T: float) -> np.ndarray:
    """Symmetric (L^2, L^2) coupling matrix of the periodic nearest-neighbour ferromagnet at temperature T:
    ``J_ij = 1/T`` on lattice bonds, 0 elsewhere and on the diagonal."""
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"temperature T must be finite and > 0, got {T!r}")
    J = np.zeros((L * L, L * L))
    b = lattice_bonds(L)
    J[b[:, 0], b[:, 1]] = J[b[:, 1], b[:, 0]] = 1.0 / T
    return J


def edwards_anderson_couplings(L: int, T: float, seed: int = 0, p_positive: float = 0.5) -> np.ndarray:
    """Symmetric (L^2, L^2) couplings of the Edwards-Anderson +-J spin glass at temperature T: each lattice bond
    ``+1/T`` with probability ``p_positive``, else ``-1/T``, drawn with ``numpy.random.default_rng(seed)``."""
    if not 0.0 <= p_positive <= 1.0:
        raise ValueError(f"p_positive must be in [0, 1], got {p_positive}")
    J = ferromagnet_couplings(L, T)
    b = lattice_bonds(L)
    sign = np.where(np.random.default_rng(seed).random(len(b)) < p_positive, 1.0, -1.0)
    J[b[:, 0], b[:, 1]] *= sign
    J[b[:, 1], b[:, 0]] *= sign
    return J


def check_couplings(J: np.ndarray, h: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``J`` as a float64 symmetric (N, N) matrix with zero diagonal and ``h`` as (N,) (a scalar broadcast);
    ``ValueError`` naming what is wrong otherwise."""
    J = np.asarray(J, dtype=np.float64)
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"couplings J must be a square (N, N) matrix, got shape {J.shape}")
    if not np.all(np.isfinite(J)):
        raise ValueError("couplings J hold non-finite values")
    if not np.allclose(J, J.T, atol=1e-12):
        i, j = np.unravel_index(np.argmax(np.abs(J - J.T)), J.shape)
        raise ValueError(f"couplings J must be symmetric: J[{i},{j}] = {J[i, j]} but J[{j},{i}] = {J[j, i]}")
    if np.any(np.diag(J) != 0):
        raise ValueError(f"couplings J must have a zero diagonal (s_i^2 = 1 is a constant), got {np.diag(J)[:5]}...")
    n = J.shape[0]
    h = np.zeros(n) if h is None else np.broadcast_to(np.asarray(h, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(h)):
        raise ValueError("fields h hold non-finite values")
    return J, h


def enumerate_spins(n_sites: int) -> np.ndarray:
    """All ``2^n_sites`` configurations, int8 array (2^N, N) of +-1; state k has spin i = +1 where bit i of k is 1."""
    if not 1 <= n_sites <= MAX_EXACT_SITES:
        raise ValueError(f"exact enumeration is for 1 <= N <= {MAX_EXACT_SITES} sites (2^N states), got N={n_sites}; "
                         "use sample_gibbs for larger systems")
    codes = np.arange(2**n_sites, dtype=np.int64)[:, None]
    return (2 * ((codes >> np.arange(n_sites)) & 1) - 1).astype(np.int8)


def boltzmann_log_weights(spins: np.ndarray, J: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``sum_{i<j} J_ij s_i s_j + sum_i h_i s_i`` per configuration (rows of ``spins``), in chunks of 2^16 rows."""
    out = np.empty(len(spins))
    for start in range(0, len(spins), 1 << 16):
        s = spins[start:start + (1 << 16)].astype(np.float64)
        out[start:start + len(s)] = 0.5 * np.einsum("ni,ij,nj->n", s, J, s) + s @ h
    return out


def exact_probabilities(J: np.ndarray, h: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every state (2^N, N) and its exact Boltzmann probability (2^N,)."""
    J, h = check_couplings(J, h)
    states = enumerate_spins(J.shape[0])
    logw = boltzmann_log_weights(states, J, h)
    p = np.exp(logw - logw.max())
    return states, p / p.sum()


def sample_exact(J: np.ndarray, h: np.ndarray | float | None = None, n_samples: int = 1000,
                 rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """``n_samples`` independent configurations (int8, (n_samples, N), +-1) from the exact Boltzmann distribution
    of ``J``, ``h``, by enumeration of all 2^N states (N <= 20)."""
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(rng)
    states, p = exact_probabilities(J, h)
    return states[rng.choice(len(p), size=int(n_samples), p=p)]


def sample_gibbs(J: np.ndarray, h: np.ndarray | float | None = None, n_samples: int = 1000, n_chains: int = 100,
                 burn_in: int = 500, thin: int = 5, method: str = "gibbs",
                 rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """Configurations (int8, (n_samples, N), +-1) from ``n_chains`` independent Markov chains run side by side.

    One sweep updates every site once, in order: ``gibbs`` sets ``s_i = +1`` with probability
    ``sigmoid(2 f_i)``, ``f_i = h_i + sum_j J_ij s_j`` (heat bath); ``metropolis`` flips ``s_i`` with probability
    ``min(1, exp(-2 s_i f_i))``. Chains start from independent random states; after ``burn_in`` sweeps each chain
    yields a configuration every ``thin`` sweeps until ``n_samples`` are collected (rows ordered draw by draw, so
    consecutive rows come from different chains).

    Below a ferromagnet's critical temperature single-site moves do not cross between the two magnetisation signs
    on large lattices: each chain then samples one sign, and the mix over chains is only roughly even.
    """
    if method not in ("gibbs", "metropolis"):
        raise ValueError(f"method must be 'gibbs' or 'metropolis', got {method!r}")
    if int(n_samples) < 1 or int(n_chains) < 1 or int(burn_in) < 0 or int(thin) < 1:
        raise ValueError(f"need n_samples >= 1, n_chains >= 1, burn_in >= 0, thin >= 1; got {n_samples}, {n_chains}, "
                         f"{burn_in}, {thin}")
    J, h = check_couplings(J, h)
    rng = np.random.default_rng(rng)
    n_chains = int(min(n_chains, n_samples))
    n = J.shape[0]
    s = np.where(rng.random((n_chains, n)) < 0.5, -1.0, 1.0)
    per_chain = math.ceil(int(n_samples) / n_chains)
    kept = []
    for sweep in range(1, int(burn_in) + per_chain * int(thin) + 1):
        u = rng.random((n, n_chains))
        for i in range(n):  # sequential within a chain (neighbours interact), vectorised over chains
            f = h[i] + s @ J[:, i]
            if method == "gibbs":
                s[:, i] = np.where(u[i] < 1.0 / (1.0 + np.exp(-2.0 * f)), 1.0, -1.0)
            else:
                flip = u[i] < np.exp(np.minimum(0.0, -2.0 * s[:, i] * f))
                s[flip, i] *= -1.0
        if sweep > burn_in and (sweep - burn_in) % thin == 0:
            kept.append(s.astype(np.int8))
    return np.concatenate(kept)[: int(n_samples)]
