"""Reading user arrays (NumPy ``.npy`` / ``.npz``) of shape ``(n, ...)``: one sample per row.

Every problem is a ``ValueError`` (or ``FileNotFoundError``) naming the file, the array and what was expected,
raised before any training starts. Files are opened with ``allow_pickle=False``: an array file can then never
run code.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["LoadedArray", "load_array", "check_numeric", "check_sample_shape"]

PathLike = str | os.PathLike


@dataclass
class LoadedArray:
    """The data array, its name inside the file, and the per-sample 1-D arrays found beside it (labels)."""

    data: np.ndarray
    path: Path
    key: str | None
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.path}" + (f" [{self.key}]" if self.key else "")


def check_numeric(a: np.ndarray, source: str) -> None:
    """Only bool, integer and real floating dtypes; complex, strings and objects get a clear error."""
    if a.dtype == object:
        raise ValueError(f"{source}: dtype object is not supported; save a numeric array (np.asarray(x, float))")
    if not (np.issubdtype(a.dtype, np.bool_) or np.issubdtype(a.dtype, np.integer)
            or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{source}: dtype {a.dtype} is not supported; expected bool, integer or real floating "
                         "point values")


def check_sample_shape(a: np.ndarray, source: str, min_rows: int = 1, max_event_dims: int = 3) -> None:
    """Shape ``(n, ...)`` with ``n >= min_rows`` and 1 to ``max_event_dims`` dimensions per sample."""
    if a.ndim < 2:
        raise ValueError(f"{source}: expected shape (n, ...) with one sample per row, got shape {a.shape}; "
                         "a single flat vector is ambiguous: reshape it to (n, d)")
    if a.ndim - 1 > max_event_dims:
        raise ValueError(f"{source}: expected at most {max_event_dims} dimensions per sample, e.g. (n, d), (n, H, W) "
                         f"or (n, C, H, W); got shape {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{source}: {a.shape[0]} samples, need at least {min_rows} (training, validation and "
                         "test sets are split from the rows)")
    if any(s == 0 for s in a.shape[1:]):
        raise ValueError(f"{source}: empty sample dimension in shape {a.shape}")


def load_array(path: PathLike | None, key: str | None = None, min_rows: int = 1,
               max_event_dims: int = 3) -> LoadedArray:
    """Load ``path`` (``.npy``, or ``.npz`` with the array ``key``) and check dtype, shape and finiteness.

    An ``.npz`` with several arrays needs ``key`` unless one is called ``x``; its other 1-D numeric arrays with
    one entry per row (e.g. ``temperature``) are returned as labels.
    """
    if path is None or str(path).strip() in ("", "None", "null"):
        raise ValueError("no array file given: set data.path=/path/to/samples.npy (or .npz)")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"array file not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a directory: data.path must be a .npy or .npz file")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; expected a NumPy .npy or .npz file")
    with open(p, "rb") as fh:
        magic = fh.read(6)
    expected = b"\x93NUMPY" if suffix == ".npy" else b"PK\x03\x04"
    if not magic.startswith(expected):
        raise ValueError(f"{p}: not a readable NumPy {suffix} file (its first bytes are {magic!r}); save it with "
                         f"np.{'save' if suffix == '.npy' else 'savez'}")
    labels: dict[str, np.ndarray] = {}
    try:
        if suffix == ".npy":
            if key is not None:
                raise ValueError(f"{p}: data.key={key!r} is only for .npz archives")
            data, chosen = np.load(p, allow_pickle=False), None
        else:
            with np.load(p, allow_pickle=False) as archive:
                names = list(archive.files)
                if not names:
                    raise ValueError(f"{p}: the archive holds no arrays")
                if key is not None:
                    if key not in names:
                        raise ValueError(f"{p}: no array {key!r} in the archive; it holds {names}")
                    chosen = key
                elif len(names) == 1:
                    chosen = names[0]
                elif "x" in names:
                    chosen = "x"
                else:
                    raise ValueError(f"{p}: the archive holds several arrays {names}; choose one with data.key=NAME "
                                     "(or name the samples 'x')")
                data = archive[chosen]
                for name in names:
                    if name != chosen:
                        extra = archive[name]
                        if extra.ndim == 1 and extra.shape[0] == data.shape[0] and extra.dtype != object \
                                and np.issubdtype(extra.dtype, np.number):
                            labels[name] = extra
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ValueError(f"{p}: holds Python objects (pickled data); save a numeric array instead") from None
        raise
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{p}: not a readable NumPy file ({err})") from None
    source = f"{p}" + (f" [{chosen}]" if chosen else "")
    check_numeric(data, source)
    check_sample_shape(data, source, min_rows, max_event_dims)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(data))[0])
        raise ValueError(f"{source}: non-finite value {data[bad]} at index {bad} (row {bad[0]}); remove or impute it")
    return LoadedArray(data=data, path=p, key=chosen, labels=labels)
