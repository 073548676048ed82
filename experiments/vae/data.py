"""Data sets for the VAE job: Ising configurations (simulated, cached), scikit-learn's 8x8 digits, user arrays.

Each source is a small config object (the command line's ``data=ising|digits|array``) whose :meth:`load` returns a
:class:`VAEData`: float32 samples, per-sample labels for colouring the latent space, and a train / validation /
test split. Nothing is read or simulated until :meth:`load`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from physppl.io.arrays import load_array
from physppl.inference.outputs import atomic_write
from physppl.models.simulators.ising import T_C, sample_ising

__all__ = ["VAEData", "IsingDataSource", "DigitsDataSource", "ArrayDataSource", "cache_dir", "split_indices"]

log = logging.getLogger(__name__)

_ISING_CACHE_VERSION = 1  # bump when the sampler changes, so old caches are not reused


@dataclass
class VAEData:
    x: torch.Tensor  # (n, *event_shape) float32, CPU
    labels: dict[str, np.ndarray]  # per-sample quantities: temperature, magnetization, energy, digit, ...
    split: dict[str, np.ndarray]  # "train" / "val" / "test" row indices
    name: str
    source: str  # where the data came from, for messages
    image_shape: tuple[int, ...] | None = None  # how to draw one sample (H, W) or (H, W, C); None = not an image
    meta: dict = field(default_factory=dict)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Cache directory: ``override``, else ``$PHYSPPL_CACHE_DIR``, else ``$XDG_CACHE_HOME/physppl`` or
    ``~/.cache/physppl``; never inside the repository."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("PHYSPPL_CACHE_DIR"):
        return Path(os.environ["PHYSPPL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "physppl"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise ValueError(f"data.{name} must be in (0, 1), got {f}")
    if val_fraction + test_fraction >= 0.9:
        raise ValueError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves too little "
                         "for training")


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int,
                  strata: np.ndarray | None = None, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Random train/val/test split, stratified by ``strata`` (e.g. temperature or class) and keeping every
    ``groups`` value (e.g. a Markov chain) in one part, so held-out samples are not near-copies of training ones."""
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    strata = np.zeros(n, int) if strata is None else np.asarray(strata)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for s in np.unique(strata):
        rows = np.nonzero(strata == s)[0]
        ids = rng.permutation(np.unique(groups[rows]))
        n_test = max(1, int(round(test_fraction * ids.size))) if ids.size >= 3 else 0
        n_val = max(1, int(round(val_fraction * ids.size))) if ids.size >= 3 else 0
        chosen = {"test": ids[:n_test], "val": ids[n_test:n_test + n_val], "train": ids[n_test + n_val:]}
        for part, g in chosen.items():
            parts[part].append(rows[np.isin(groups[rows], g)])
    out = {k: np.sort(np.concatenate(v)) if v else np.zeros(0, int) for k, v in parts.items()}
    for k, v in out.items():
        if v.size == 0:
            raise ValueError(f"the {k} split is empty ({n} samples): add data or change data.val_fraction / "
                             "data.test_fraction")
    return out


class IsingDataSource:
    """2-D Ising configurations at a grid of temperatures, simulated once and cached.

    Spins +-1 become pixels 0/1 (for the Bernoulli likelihood). Labels: ``temperature``, ``magnetization``
    (signed, per site), ``abs_magnetization``, ``energy`` (per site), ``phase`` (1 below T_c). Whole Markov
    chains go to one split, stratified by temperature.

    Parameters
    ----------
    L : int
        Lattice size (even).
    temperatures : list of float, optional
        Explicit temperatures; default a linear grid of ``n_temperatures`` from ``t_min`` to ``t_max``.
    n_per_temperature, n_chains, thermalize, every, cluster_max_temperature, seed
        Passed to :func:`physppl.models.simulators.ising.sample_ising`.
    cache : bool
        Reuse / write the cache file (``cache_dir``, default ``~/.cache/physppl/ising``).
    """

    def __init__(self, L: int = 32, temperatures: Sequence[float] | None = None, t_min: float = 1.0,
                 t_max: float = 3.5, n_temperatures: int = 26, n_per_temperature: int = 200,
                 n_chains: int | None = 20, thermalize: int = 300, every: int = 10,
                 cluster_max_temperature: float | None = 3.0, seed: int = 0, cache: bool = True,
                 cache_dir: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 progress: bool = True):
        self.L = int(L)
        self.temperatures = None if temperatures is None else list(temperatures)
        self.t_min, self.t_max, self.n_temperatures = float(t_min), float(t_max), int(n_temperatures)
        self.n_per_temperature = int(n_per_temperature)
        self.n_chains = None if n_chains is None else int(n_chains)
        self.thermalize, self.every = int(thermalize), int(every)
        self.cluster_max_temperature = cluster_max_temperature
        self.seed = int(seed)
        self.cache = bool(cache)
        self.cache_dir = cache_dir
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.progress = bool(progress)
        self.path = None  # no user input file to protect

    def temperature_grid(self) -> np.ndarray:
        if self.temperatures is None:
            if self.n_temperatures < 1 or not self.t_max >= self.t_min:
                raise ValueError(f"data.n_temperatures must be >= 1 and data.t_max >= data.t_min, got "
                                 f"{self.n_temperatures}, [{self.t_min}, {self.t_max}]")
            grid = np.linspace(self.t_min, self.t_max, self.n_temperatures)
        else:
            grid = np.asarray(self.temperatures, dtype=float)
        if grid.size == 0 or np.any(~np.isfinite(grid)) or np.any(grid <= 0):
            raise ValueError(f"data.temperatures must be positive and finite, got {grid.tolist()}")
        return np.round(grid, 10)

    def _params(self) -> dict:
        return {"version": _ISING_CACHE_VERSION, "L": self.L, "temperatures": self.temperature_grid().tolist(),
                "n_per_temperature": self.n_per_temperature, "n_chains": self.n_chains, "thermalize": self.thermalize,
                "every": self.every, "cluster_max_temperature": self.cluster_max_temperature, "seed": self.seed}

    def cache_path(self) -> Path:
        params = self._params()
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir(self.cache_dir) / "ising" / f"ising_L{self.L}_{digest}.npz"

    def simulate(self):
        p = self._params()
        return sample_ising(self.L, p["temperatures"], self.n_per_temperature, n_chains=self.n_chains,
                            thermalize=self.thermalize, every=self.every,
                            cluster_max_temperature=self.cluster_max_temperature, seed=self.seed,
                            progress=self.progress)

    def _load_or_simulate(self) -> dict[str, np.ndarray]:
        path = self.cache_path()
        params = json.dumps(self._params(), sort_keys=True)
        if self.cache and path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    if str(f["params"]) == params:
                        log.info("Ising configurations from cache %s", path)
                        return {k: f[k] for k in f.files if k != "params"}
                log.warning("cache %s was written with other settings; simulating again", path)
            except (OSError, ValueError, KeyError) as err:
                log.warning("unreadable cache %s (%s); simulating again", path, err)
        log.info("simulating Ising configurations: L=%d, %d temperatures x %d", self.L, len(self.temperature_grid()),
                 self.n_per_temperature)
        s = self.simulate()
        arrays = {"spins": s.spins, "temperature": s.temperature, "energy": s.energy,
                  "magnetization": s.magnetization, "chain": s.chain}
        if self.cache:
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:  # a file handle: np.savez would append .npz to the temporary name
                    np.savez_compressed(fh, params=np.array(params), **arrays)

            atomic_write(path, write)
            log.info("cached to %s", path)
        return arrays

    def load(self) -> VAEData:
        a = self._load_or_simulate()
        x = torch.as_tensor((a["spins"] > 0).astype(np.float32))
        t = a["temperature"].astype(np.float64)
        labels = {"temperature": t, "magnetization": a["magnetization"].astype(np.float64),
                  "abs_magnetization": np.abs(a["magnetization"]).astype(np.float64),
                  "energy": a["energy"].astype(np.float64), "phase": (t < T_C).astype(np.int64),
                  "chain": a["chain"].astype(np.int64)}  # Monte Carlo chain: error bars by jackknife over chains
        split = split_indices(len(t), self.val_fraction, self.test_fraction, self.seed, strata=t, groups=a["chain"])
        return VAEData(x=x, labels=labels, split=split, name=f"ising_L{self.L}", source=f"Ising L={self.L}",
                       image_shape=(self.L, self.L),
                       meta={"kind": "ising", "L": self.L, "T_c": T_C,
                             "temperatures": self.temperature_grid().tolist()})


class DigitsDataSource:
    """scikit-learn's 8x8 handwritten digits (1,797 images, grey levels 0-16), scaled to [0, 1].

    Parameters
    ----------
    binarize : bool
        Threshold the grey levels at ``threshold`` (for the Bernoulli likelihood); ``false`` keeps grey levels
        (continuous Bernoulli or Gaussian likelihood).
    """

    def __init__(self, binarize: bool = True, threshold: float = 0.5, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2):
        self.binarize = bool(binarize)
        self.threshold = float(threshold)
        self.seed = int(seed)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.path = None

    def load(self) -> VAEData:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        if self.binarize:
            x = (x >= self.threshold).astype(np.float32)
        labels = {"digit": digits.target.astype(np.int64)}
        split = split_indices(len(x), self.val_fraction, self.test_fraction, self.seed, strata=digits.target)
        return VAEData(x=torch.as_tensor(x), labels=labels, split=split, name="digits", source="sklearn digits",
                       image_shape=(8, 8), meta={"kind": "digits", "binarized": self.binarize})


class ArrayDataSource:
    """A user's NumPy array of samples, shape (n, d), (n, H, W) or (n, C, H, W).

    Parameters
    ----------
    path : str
        ``.npy``, or ``.npz`` (array ``key``, or the only one, or ``x``; other 1-D arrays of length n become
        labels that colour the latent space, e.g. ``temperature``).
    spins : bool
        Map +-1 spins to 0/1 pixels.
    rescale : {None, "minmax"}
        ``minmax`` maps the data's range to [0, 1] (for the continuous Bernoulli likelihood).
    image_shape : list of int, optional
        How to draw one sample; default (H, W) for images, a square for flat vectors of square length.
    """

    def __init__(self, path: str | None = None, key: str | None = None, spins: bool = False,
                 rescale: str | None = None, image_shape: Sequence[int] | None = None, seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2):
        self.path = path
        self.key = key
        self.spins = bool(spins)
        if rescale not in (None, "none", "minmax"):
            raise ValueError(f"data.rescale must be null or minmax, got {rescale!r}")
        self.rescale = None if rescale in (None, "none") else rescale
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        self.seed = int(seed)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)

    def load(self) -> VAEData:
        loaded = load_array(self.path, self.key, min_rows=10)
        a = loaded.data
        source = loaded.source
        if self.spins:
            values = np.unique(a)
            if not set(values.tolist()) <= {-1, 1}:
                raise ValueError(f"{source}: data.spins=true needs values in {{-1, +1}}, found {values[:10].tolist()}")
            a = (a > 0)
        a = a.astype(np.float32)
        if self.rescale == "minmax":
            lo, hi = float(a.min()), float(a.max())
            if hi <= lo:
                raise ValueError(f"{source}: constant data ({lo}) cannot be rescaled")
            a = (a - lo) / (hi - lo)
        image_shape = self.image_shape or _default_image_shape(a.shape[1:])
        if image_shape is not None and int(np.prod(image_shape)) != int(np.prod(a.shape[1:])):
            raise ValueError(f"{source}: data.image_shape {list(image_shape)} does not hold one sample of shape "
                             f"{list(a.shape[1:])}")
        split = split_indices(a.shape[0], self.val_fraction, self.test_fraction, self.seed)
        labels = {k: v.astype(np.float64) for k, v in loaded.labels.items()}
        return VAEData(x=torch.as_tensor(a), labels=labels, split=split, name=loaded.path.stem, source=source,
                       image_shape=image_shape, meta={"kind": "array", "path": str(loaded.path), "key": loaded.key})


def _default_image_shape(event_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(event_shape) == 2:
        return tuple(event_shape)
    if len(event_shape) == 3:  # (C, H, W): draw the first channel
        return tuple(event_shape[1:])
    side = int(round(np.sqrt(event_shape[0])))
    return (side, side) if side * side == event_shape[0] else None


def data_source(data: Any, datasets: Mapping[str, Callable[[], Any]], caller: str) -> Any:
    """What a problem's ``data`` argument names: a built-in set by name (``datasets``), a ``.npy``/``.npz`` path (an
    :class:`ArrayDataSource`), or a data source of the caller's with ``load()``."""
    if isinstance(data, str) and data.strip().lower() in datasets:
        return datasets[data.strip().lower()]()
    if isinstance(data, (str, os.PathLike)):
        return ArrayDataSource(path=str(data))
    if callable(getattr(data, "load", None)):
        return data
    raise TypeError(f"{caller}: data must be {', '.join(repr(k) for k in datasets)}, a .npy/.npz path or a data "
                    f"source with load(); got {type(data).__name__}")
