"""A synthetic MD trajectory at scale: thousands of frames x millions of voxels of correlated structure factors.

Atom-level frames (:mod:`physppl.models.simulators.md_frames`) cost gemmi a structure-factor calculation per
frame; at 5,000 frames x 10^6 voxels that is hours. This generator keeps what matters to frame weighting and to
its compression over frames: frames fall in conformational states with their own mean structure factor, and
fluctuate inside a state along a few collective modes (MD frames are strongly correlated), plus a small
independent part (thermal noise, not compressible):

    F(h, t) = A_s(h) + sum_k c_k(t) D_{s,k}(h) + eps(h, t),   s = state of frame t,

with complex Gaussian ``A_s``, ``D``, ``eps`` whose sd falls with resolution as ``exp(-B s^2 / 4)``. The observed
diffuse intensity is ``y(h) = a x'(h) + b + sigma(h) e`` with x' of the true weights (uniform inside each state,
``state_masses`` across states). Rows are produced block by block, each block from its own seed, so a store of
any size is written in bounded memory and the same blocks come back on every call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .md_frames import state_trajectory

__all__ = ["SyntheticTrajectory", "TrajectoryBlock"]

DEFAULT_CELL_EDGE = 60.0  # A: up to ~10^5 voxels (1.4 A) the cell of every earlier example


@dataclass
class TrajectoryBlock:
    """Voxels ``start:stop``: F's real and imaginary parts (B, T) float32, the true x' (B,), and y, sigma (B,)."""

    start: int
    stop: int
    re: np.ndarray
    im: np.ndarray
    x_true: np.ndarray
    y: np.ndarray
    sigma: np.ndarray


class SyntheticTrajectory:
    """Frames in ``len(state_masses)`` states along a Markov trajectory, and their diffuse data.

    Parameters
    ----------
    n_frames, n_voxels : int
        T and N (P1: one row per voxel).
    state_masses : sequence of float
        True weight of each state (the frames inside a state share it equally).
    n_modes : int
        Collective modes per state (the rank of the within-state fluctuation).
    within, noise_frac : float
        Sd of the modes and of the independent part, relative to a state mean's.
    between : float
        Sd of each state's departure from the common mean structure factor, relative to it.
    b_factor : float
        Resolution fall-off (A^2).
    cell_edge : float, optional
        The cubic cell's edge (A), for d-spacings. Default: 60 A, or larger where N voxels of a 60 A cell would
        reach past ``d_min``: a million voxels then span 1.4 A, as a real crystal's map would, instead of 0.77 A,
        where the signal is exp(-9) of the low-resolution one and the sigmas vanish with it.
    d_min : float
        The resolution the default cell keeps the map within (A).
    dwell : float, optional
        Mean frames between state changes (default T / 30).
    scale, offset, noise : float
        ``y = scale x' + offset + sigma e`` with ``sigma = noise * scale * (x' + 0.1 amp^2)``.
    """

    def __init__(self, n_frames: int = 1000, n_voxels: int = 100_000, state_masses=(0.2, 0.5, 0.3), n_modes: int = 8,
                 within: float = 0.3, between: float = 0.4, noise_frac: float = 0.05, b_factor: float = 20.0,
                 cell_edge: float | None = None, d_min: float = 1.4, scale: float = 1000.0, offset: float = 50.0,
                 noise: float = 0.05, dwell: float | None = None, seed: int = 0):
        masses = np.asarray(state_masses, float)
        if masses.ndim != 1 or (masses < 0).any() or not np.isclose(masses.sum(), 1.0):
            raise ValueError(f"state_masses must be non-negative and sum to 1, got {state_masses}")
        if n_frames < len(masses) or n_voxels < 1:
            raise ValueError("need at least one frame per state and one voxel")
        self.n_frames, self.n_voxels, self.n_modes = int(n_frames), int(n_voxels), int(n_modes)
        self.state_masses = masses
        self.within, self.between, self.noise_frac = float(within), float(between), float(noise_frac)
        self.b_factor = float(b_factor)
        self.scale, self.offset, self.noise, self.seed = float(scale), float(offset), float(noise), int(seed)
        n_states = len(masses)
        dwell = max(2.0, self.n_frames / 30) if dwell is None else float(dwell)  # ~30 state visits
        self.labels = state_trajectory(self.n_frames, populations=np.full(n_states, 1.0 / n_states), dwell=dwell,
                                       seed=seed)
        counts = np.bincount(self.labels, minlength=n_states)
        self.true_weights = masses[self.labels] / counts[self.labels]
        rng = np.random.default_rng([seed, 1])
        # smooth collective coordinates along the trajectory (an AR(1) per mode): correlated frames
        c = np.empty((self.n_frames, self.n_modes))
        c[0] = rng.standard_normal(self.n_modes)
        rho = 0.95
        for t in range(1, self.n_frames):
            c[t] = rho * c[t - 1] + np.sqrt(1 - rho ** 2) * rng.standard_normal(self.n_modes)
        self.coords = c.astype(np.float32)
        self.hkl = self._miller_indices(rng)
        index_norm = np.sqrt((self.hkl.astype(float) ** 2).sum(1))  # |hkl|: d = cell_edge / |hkl| (cubic)
        self.cell_edge = (max(DEFAULT_CELL_EDGE, float(d_min) * float(index_norm.max())) if cell_edge is None
                          else float(cell_edge))
        self.dhkl = self.cell_edge / index_norm
        self.state_names = [f"state{k}" for k in range(n_states)]
        # F = features (B, S + S K) @ design (S + S K, T): a state indicator per frame, then each state's modes
        # (collective coordinates scaled to sd ``within``, zero outside the state)
        onehot = np.eye(n_states, dtype=np.float32)[self.labels].T
        modes = (onehot[:, None, :] * self.coords.T[None] * np.float32(self.within / np.sqrt(self.n_modes)))
        self._design = torch.as_tensor(np.concatenate([onehot, modes.reshape(-1, self.n_frames)]))

    def _miller_indices(self, rng) -> np.ndarray:
        m = 1
        while ((2 * m + 1) ** 3 - 1) // 2 < self.n_voxels:
            m += 1
        # the N lowest-resolution reflections of a cube of indices (a sphere in reciprocal space), shuffled
        r = np.arange(-m, m + 1)
        h, k, l = np.meshgrid(r, r, r, indexing="ij")
        hkl = np.stack([h.ravel(), k.ravel(), l.ravel()], 1)
        # one of each Friedel pair (F(-h) = F(h)* carries nothing new)
        h, k, l = hkl.T
        hkl = hkl[(h > 0) | ((h == 0) & (k > 0)) | ((h == 0) & (k == 0) & (l > 0))]
        s2 = (hkl ** 2).sum(1)
        hkl = hkl[s2 > 0][np.argsort(s2[s2 > 0], kind="stable")[: self.n_voxels]]
        return hkl[rng.permutation(len(hkl))].astype(np.int32)

    def blocks(self, block_voxels: int = 4096) -> Iterator[TrajectoryBlock]:
        """Every voxel once, in order, ``block_voxels`` at a time."""
        for start in range(0, self.n_voxels, block_voxels):
            yield self.block(start, min(self.n_voxels, start + block_voxels), block_voxels)

    def block(self, start: int, stop: int, block_voxels: int = 4096) -> TrajectoryBlock:
        """Voxels start:stop; ``start`` must be a multiple of ``block_voxels`` (each such block has its own seed)."""
        if start % block_voxels:
            raise ValueError(f"start {start} is not a multiple of block_voxels={block_voxels}")
        # torch for the (B, T) work: its normal sampler and float32 kernels are several times NumPy's here
        gen = torch.Generator().manual_seed(hash((self.seed, 2, start // block_voxels)) % (2 ** 63))
        B, T, K, S = stop - start, self.n_frames, self.n_modes, len(self.state_masses)
        s2 = torch.as_tensor(1.0 / self.dhkl[start:stop] ** 2)
        amp = torch.exp(-self.b_factor * s2 / 4.0).float()[:, None]
        normal = lambda *shape: torch.randn(shape, generator=gen)  # noqa: E731
        a0, dev, modes = normal(2, B, 1), normal(2, B, S), normal(2, B, S, K)
        parts = self.noise_frac * normal(2, B, T)
        for c in range(2):  # state means and modes in one product with the frames' design matrix
            feats = torch.cat([a0[c] + self.between * dev[c], modes[c].reshape(B, S * K)], 1)
            parts[c].addmm_(feats, self._design)
        parts *= amp
        w = torch.as_tensor(self.true_weights, dtype=torch.float32)
        centred = parts - (parts @ w)[..., None]  # x' is the weighted variance: centre first (float32 cancellation)
        x_true = (centred.square() @ w).sum(0).double()
        # relative errors with a floor at the resolution's own intensity level (the model's noise is per shell)
        sigma = self.noise * self.scale * (x_true + 0.1 * amp[:, 0].double() ** 2)
        y = self.scale * x_true + self.offset + sigma * torch.randn(B, generator=gen, dtype=torch.float64)
        return TrajectoryBlock(start, stop, parts[0].numpy(), parts[1].numpy(), x_true.numpy(), y.numpy(),
                               sigma.numpy())
