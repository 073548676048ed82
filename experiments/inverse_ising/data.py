"""Spin samples for the inverse Ising problem: simulated with known couplings, or a user's array.

Each source is a small config object (the command line's ``data=ising_ferromagnet|ising_spin_glass|ising_spins``)
whose :meth:`load` returns :class:`SpinData`: spins as a float64 (n, N) tensor of +-1, the lattice side when the
sites form an L x L lattice, and the true couplings and fields when they are known. Nothing is read or simulated
until :meth:`load`, and every problem with the input is a ``ValueError`` naming the file, the array and the values.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from physppl.io.arrays import load_array
from physppl.models.inverse_ising import to_pm1_spins
from physppl.models.simulators.spin_glass import (MAX_EXACT_SITES, check_couplings, edwards_anderson_couplings,
                                                   ferromagnet_couplings, sample_exact, sample_gibbs)

__all__ = ["SpinData", "SimulatedSpins", "ArraySpins"]


@dataclass
class SpinData:
    """Spins and what is known about them.

    ``s``: (n, N) float64 tensor of +-1 (CPU); ``lattice_side``: L when site ``k`` is ``(k // L, k % L)`` of an
    L x L periodic lattice, else None; ``true_couplings``: symmetric (N, N) and ``true_fields`` (N,) when known.
    """

    s: torch.Tensor
    source: str
    lattice_side: int | None = None
    true_couplings: np.ndarray | None = None
    true_fields: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.s.shape[0])

    @property
    def n_sites(self) -> int:
        return int(self.s.shape[1])

    @property
    def has_truth(self) -> bool:
        return self.true_couplings is not None


class SimulatedSpins:
    """Samples of a periodic L x L Ising model with known couplings.

    Parameters
    ----------
    kind : {"ferromagnet", "spin_glass"}
        Nearest-neighbour ferromagnet (``J = 1/T`` on every bond) or Edwards-Anderson +-J spin glass (``+-1/T``,
        signs drawn with ``seed``).
    L, T : int, float
        Lattice side and temperature.
    n_samples : int
    field : float
        Uniform field ``h`` on every site (0: the up-down symmetric model).
    sampler : {"auto", "exact", "gibbs", "metropolis"}
        ``exact`` enumerates all 2^(L^2) states (L^2 <= 20): independent draws from the exact distribution;
        ``auto`` uses it when it can, else heat-bath Gibbs.
    n_chains, burn_in, thin
        The Markov-chain sampler's chains, burn-in sweeps and sweeps between kept configurations.
    seed : int
        Seeds the spin-glass bonds and the sampler.
    """

    def __init__(self, kind: str = "ferromagnet", L: int = 4, T: float = 3.0, n_samples: int = 4000,
                 field: float = 0.0, sampler: str = "auto", n_chains: int = 100, burn_in: int = 500, thin: int = 5,
                 p_positive: float = 0.5, seed: int = 0):
        if kind not in ("ferromagnet", "spin_glass"):
            raise ValueError(f"data.kind must be 'ferromagnet' or 'spin_glass', got {kind!r}")
        if sampler not in ("auto", "exact", "gibbs", "metropolis"):
            raise ValueError(f"data.sampler must be auto, exact, gibbs or metropolis, got {sampler!r}")
        if not (isinstance(L, (int, np.integer)) and L >= 2):
            raise ValueError(f"data.L must be an integer >= 2, got {L!r}")
        if not (math.isfinite(float(T)) and float(T) > 0):
            raise ValueError(f"data.T must be finite and > 0, got {T!r}")
        if int(n_samples) < 2:
            raise ValueError(f"data.n_samples must be >= 2, got {n_samples}")
        if sampler == "exact" and L * L > MAX_EXACT_SITES:
            raise ValueError(f"data.sampler=exact enumerates 2^(L^2) states: L={L} is beyond L^2 <= {MAX_EXACT_SITES}; "
                             "use data.sampler=gibbs")
        self.kind, self.L, self.T, self.n_samples = kind, int(L), float(T), int(n_samples)
        self.field, self.sampler = float(field), sampler
        self.n_chains, self.burn_in, self.thin = int(n_chains), int(burn_in), int(thin)
        self.p_positive, self.seed = float(p_positive), int(seed)
        self.path = None  # no input file to protect

    def couplings(self) -> np.ndarray:
        if self.kind == "ferromagnet":
            return ferromagnet_couplings(self.L, self.T)
        return edwards_anderson_couplings(self.L, self.T, seed=self.seed, p_positive=self.p_positive)

    def load(self) -> SpinData:
        J = self.couplings()
        h = np.full(self.L * self.L, self.field)
        method = self.sampler
        if method == "auto":
            method = "exact" if self.L * self.L <= MAX_EXACT_SITES else "gibbs"
        # the sampler's stream is its own: the spin-glass bonds drawn with the same seed do not correlate with it
        rng = np.random.default_rng([self.seed, 1])
        if method == "exact":
            s = sample_exact(J, h, self.n_samples, rng)
        else:
            s = sample_gibbs(J, h, self.n_samples, n_chains=self.n_chains, burn_in=self.burn_in, thin=self.thin,
                             method=method, rng=rng)
        name = f"{self.kind} L={self.L} T={self.T:g}"
        info = {"data": self.kind, "L": self.L, "T": self.T, "sampler": method, "data_seed": self.seed}
        return SpinData(s=torch.as_tensor(s, dtype=torch.float64), source=f"simulated {name}", lattice_side=self.L,
                        true_couplings=J, true_fields=h, info=info)


class ArraySpins:
    """A user's spin samples: a ``.npy`` / ``.npz`` file (``path``) or an in-memory array (``array``, Python only).

    Values +-1 or 0/1; shape (n, N), or (n, L, L) for an L x L lattice. An ``.npz`` may hold the true couplings
    (``couplings_key``, a symmetric (N, N) matrix, or (n_pairs,) over all pairs i < j in row-major order) and fields
    (``fields_key``, (N,)) beside the spins (``key``, or the only other array, or ``x``); the job then reports errors
    against them.

    Parameters
    ----------
    lattice_side : int, optional
        L for flat (n, L^2) samples of an L x L lattice (flags lattice bonds; ``graph: lattice`` needs it).
    """

    def __init__(self, path: str | None = None, key: str | None = None, lattice_side: int | None = None,
                 couplings_key: str = "J", fields_key: str = "h", array: Any = None):
        self.path = None if path is None else str(path)
        self.key = key
        self.lattice_side = None if lattice_side is None else int(lattice_side)
        self.couplings_key, self.fields_key = couplings_key, fields_key
        self.array = array

    def _extras(self, p: Path, chosen: str | None) -> dict[str, np.ndarray]:
        if p.suffix.lower() != ".npz":
            return {}
        try:
            with np.load(p, allow_pickle=False) as archive:
                return {k: archive[k] for k in (self.couplings_key, self.fields_key) if k in archive.files and k != chosen}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{p}: cannot read the truth arrays ({err})") from None

    def _spins_key(self, p: Path) -> str | None:
        """The spins' array in an .npz: ``key``, else the one array that is not a truth array."""
        if self.key is not None or p.suffix.lower() != ".npz" or not p.is_file():
            return self.key
        try:
            with np.load(p, allow_pickle=False) as archive:
                names = [n for n in archive.files if n not in (self.couplings_key, self.fields_key)]
        except (OSError, ValueError, zipfile.BadZipFile):
            return None  # load_array reports it
        return names[0] if len(names) == 1 else None

    def load(self) -> SpinData:
        extras: dict[str, np.ndarray] = {}
        if self.path is None and self.array is None:
            raise ValueError("no spin samples given: set data.path=/path/to/spins.npy (or .npz), or pass an array")
        if self.array is not None:
            source, raw = "the spin array", self.array
        else:
            p = Path(self.path).expanduser()
            loaded = load_array(p, self._spins_key(p), min_rows=2)
            source, raw = loaded.source, loaded.data
            extras = self._extras(loaded.path, loaded.key)
        s, side = to_pm1_spins(raw, source)
        n, N = s.shape
        if self.lattice_side is not None:
            if side is not None and side != self.lattice_side:
                raise ValueError(f"{source}: samples are {side} x {side} lattices but data.lattice_side="
                                 f"{self.lattice_side}")
            if self.lattice_side**2 != N:
                raise ValueError(f"{source}: data.lattice_side={self.lattice_side} needs {self.lattice_side**2} sites "
                                 f"per sample, the samples have {N}")
            side = self.lattice_side
        J = h = None
        if self.couplings_key in extras:
            J = np.asarray(extras[self.couplings_key], dtype=np.float64)
            if J.shape == (N * (N - 1) // 2,):
                full = np.zeros((N, N))
                full[np.triu_indices(N, 1)] = J
                J = full + full.T
            elif J.shape != (N, N):
                raise ValueError(f"{source}: the true couplings {self.couplings_key!r} must be ({N}, {N}) or "
                                 f"({N * (N - 1) // 2},) for {N} sites, got shape {J.shape}")
            try:
                J, _ = check_couplings(J)
            except ValueError as err:
                raise ValueError(f"{source}: array {self.couplings_key!r}: {err}") from None
        if self.fields_key in extras:
            h = np.asarray(extras[self.fields_key], dtype=np.float64).reshape(-1)
            if h.shape != (N,) or not np.all(np.isfinite(h)):
                raise ValueError(f"{source}: the true fields {self.fields_key!r} must be {N} finite values, got shape "
                                 f"{extras[self.fields_key].shape}")
        info = {"data": "array", "L": side}
        return SpinData(s=torch.as_tensor(s, dtype=torch.float64), source=source, lattice_side=side,
                        true_couplings=J, true_fields=h, info=info)
