"""Observed scans and simulated training sets for the beam job, with an on-disk cache of simulations.

Training sets are generated in chunks of ``CHUNK`` simulations, chunk ``k`` from its own seed, so a run asking
for 10^5 simulations re-uses the 10^4 an earlier run cached and appends the rest; the first ``n`` pairs are the
same whatever budget was asked before. The cache key covers the simulator's settings, so changing the blade
positions, background or prior box never re-uses stale simulations.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from physppl.io.scans import read_scans
from physppl.inference.outputs import atomic_write
from physppl.models.beam import KnifeEdgeBeamModel

__all__ = ["CHUNK", "SimulationCache", "BeamDataSource", "simulator_key", "default_cache_dir"]

log = logging.getLogger(__name__)

CHUNK = 10_000


def default_cache_dir() -> Path:
    """``$PHYSPPL_CACHE`` or ``$XDG_CACHE_HOME/physppl`` (``~/.cache/physppl``), then ``beam_sbi``."""
    root = os.environ.get("PHYSPPL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "physppl"
    return Path(root) / "beam_sbi"


def simulator_key(model: KnifeEdgeBeamModel) -> str:
    """A short hash of everything that changes the simulator's output distribution."""
    desc = {"positions": model.positions.tolist(), "background": model.background, "read_noise": model.read_noise,
            "low": model.low.tolist(), "high": model.high.tolist(), "version": 1}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]


class SimulationCache:
    """Simulated (theta, x) pairs on disk, one file per chunk: ``<dir>/<key>/seed<seed>_chunk<k>.pt``."""

    def __init__(self, directory: str | os.PathLike | None = None, enabled: bool = True):
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.enabled = bool(enabled)

    def _chunk(self, model: KnifeEdgeBeamModel, seed: int, k: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.directory / simulator_key(model) / f"seed{seed}_chunk{k}.pt"
        if self.enabled and path.is_file():
            try:
                data = torch.load(path, weights_only=True)
                if data["theta"].shape[0] >= size:
                    return data["theta"][:size], data["x"][:size]
            except (OSError, RuntimeError, KeyError) as err:  # a damaged cache file is regenerated
                log.warning("ignoring unreadable cache file %s (%s)", path, err)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
        theta = model.sample_prior(CHUNK, gen)
        x = model.simulate(theta, gen)
        if self.enabled:
            atomic_write(path, lambda p: torch.save({"theta": theta, "x": x}, p))
        return theta[:size], x[:size]

    def training_set(self, model: KnifeEdgeBeamModel, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` simulations of stream ``seed``: theta (n, D), x (n, x_dim); cached chunk by chunk."""
        if n < 1:
            raise ValueError(f"the number of simulations must be >= 1, got {n}")
        parts = [self._chunk(model, seed, k, min(CHUNK, n - k * CHUNK)) for k in range(-(-n // CHUNK))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def extra(self, model: KnifeEdgeBeamModel, tag: str, theta_new: torch.Tensor | None = None,
              x_new: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Pairs appended under ``tag`` (e.g. one observation's sequential rounds); appends the new ones if given."""
        path = self.directory / simulator_key(model) / f"{tag}.pt"
        old = torch.load(path, weights_only=True) if (self.enabled and path.is_file()) else None
        if theta_new is None:
            return None if old is None else (old["theta"], old["x"])
        theta = theta_new if old is None else torch.cat([old["theta"], theta_new])
        x = x_new if old is None else torch.cat([old["x"], x_new])
        if self.enabled:
            atomic_write(path, lambda p: torch.save({"theta": theta, "x": x}, p))
        return theta, x


@dataclass
class ObservedBeams:
    """The scans to infer from, shape (n, x_dim); ``truth`` (n, D) when they were simulated."""

    x: torch.Tensor
    truth: torch.Tensor | None
    source: str
    path: Path | None = None


class BeamDataSource:
    """Where the job's scans and simulations come from.

    Parameters
    ----------
    observed : path, optional
        Observed scans (``.npy`` of shape (200,) or (n, 200), or ``.csv``; see
        :mod:`physppl.io.scans`). ``None``: ``n_observations`` scans simulated from the prior with
        ``observation_seed`` (fixed test observations with known truth).
    n_simulations : int
        Simulation budget of the amortized posterior (pairs drawn from the prior).
    simulation_seed : int
        Seed of the training stream (the cache re-uses it across runs).
    cache_dir : path, optional
        Where simulations are cached (default ``~/.cache/physppl/beam_sbi``; ``$PHYSPPL_CACHE`` overrides).
    cache : bool
        Use the cache at all.
    """

    def __init__(self, observed: str | os.PathLike | None = None, n_observations: int = 10, observation_seed: int = 2024,
                 n_simulations: int = 10_000, simulation_seed: int = 0, cache_dir: str | None = None, cache: bool = True):
        self.observed = None if observed in (None, "") else Path(observed).expanduser()
        self.n_observations = int(n_observations)
        self.observation_seed = int(observation_seed)
        self.n_simulations = int(n_simulations)
        self.simulation_seed = int(simulation_seed)
        self.cache = SimulationCache(cache_dir, enabled=cache)
        if self.n_simulations < 10:
            raise ValueError(f"data.n_simulations must be >= 10, got {self.n_simulations}")

    def load_observed(self, model: KnifeEdgeBeamModel) -> ObservedBeams:
        """The scans to infer from, validated before any training."""
        if self.observed is not None:
            scans = read_scans(self.observed, length=model.x_dim, positions=model.positions.numpy())
            return ObservedBeams(torch.as_tensor(scans.x, dtype=model.low.dtype), None, str(self.observed), self.observed)
        if self.n_observations < 1:
            raise ValueError(f"data.n_observations must be >= 1, got {self.n_observations}")
        theta, x = fixed_observations(model, self.n_observations, self.observation_seed)
        return ObservedBeams(x, theta, f"{self.n_observations} simulated scans (seed {self.observation_seed})")

    def training_set(self, model: KnifeEdgeBeamModel, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.training_set(model, self.n_simulations if n is None else int(n), self.simulation_seed)


def fixed_observations(model: KnifeEdgeBeamModel, n: int, seed: int = 2024) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scans simulated from the prior with their parameters: theta (n, D), x (n, x_dim); reproducible."""
    gen = torch.Generator().manual_seed(int(seed))
    theta = model.sample_prior(n, gen)
    return theta, model.simulate(theta, gen)


def save_scans_npy(path: str | os.PathLike, x: torch.Tensor | np.ndarray) -> Path:
    """Write scans as ``.npy`` (shape (n, x_dim)) atomically, e.g. to try ``data.observed=`` on simulated data."""
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    return atomic_write(path, lambda p: np.save(open(p, "wb"), arr))
