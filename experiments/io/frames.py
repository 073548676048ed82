"""Reading and writing frame structure factors (MD snapshots) and observed diffuse/Bragg intensities.

Frames: a folder of per-frame MTZ files (amplitude + phase columns), or one stacked array of shape
(frames, reflections), complex, with its Miller indices: NumPy ``.npz`` (keys ``F``, ``hkl``, optional ``state``,
``cell``, ``spacegroup``), ``.npy`` (memory-mapped; Miller indices in ``<stem>_hkl.npy`` or given), or HDF5
(datasets ``F``, ``hkl``, optional ``state``; attributes ``cell``, ``spacegroup``). Observed intensities: an MTZ
with an intensity column and (optionally) its sigma.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Iterable

import gemmi
import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from physppl.models.simulators.md_frames import FrameSet

from physppl.inference.outputs import atomic_write
from .mtz import MTZInputError, _column_types, _describe_columns, _find_intensity, _find_sigma, _read_gemmi

__all__ = ["FrameInputError", "read_frames", "read_observed", "read_labels", "read_weights", "write_frames", "write_intensity_mtz", "intensity_dataset",
           "ObservedTable", "check_finite_frames"]

PathLike = str | os.PathLike


class FrameInputError(ValueError):
    """Bad frame or observed-intensity input; the message names the file and what was expected."""


class ObservedTable:
    """Observed intensities: hkl (N, 3) int, intensity (N,), sigma (N,) or None, cell, space group."""

    def __init__(self, hkl, intensity, sigma, cell, spacegroup, path=None):
        self.hkl, self.intensity, self.sigma = np.asarray(hkl, np.int32), np.asarray(intensity, float), sigma
        self.cell, self.spacegroup, self.path = tuple(cell), str(spacegroup), path


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def check_finite_frames(F, path, chunk: int = 256) -> None:
    """Raise if any F is NaN/inf, naming the first bad frame and reflection (chunked: works on memory maps)."""
    for start in range(0, F.shape[0], chunk):
        block = np.asarray(F[start:start + chunk])
        bad = ~np.isfinite(block)
        if bad.any():
            t, n = np.argwhere(bad)[0]
            raise FrameInputError(f"{path}: {int(bad.sum())} non-finite structure factors in frames "
                                  f"{start}..{start + block.shape[0] - 1}, first at frame {start + t}, reflection {n}")


def _check_kind(F, path, kind: str) -> str:
    """complex | real, from the data and the ``kind`` asked for; amplitudes alone are refused."""
    if kind not in ("auto", "complex", "real"):
        raise FrameInputError(f"frames kind must be auto, complex or real, got {kind!r}")
    is_complex = np.iscomplexobj(F)
    if kind == "complex" and not is_complex:
        raise FrameInputError(f"{path}: data.frames_kind=complex but the array has real dtype {F.dtype}; store complex "
                              "F (amplitude * exp(i phase)) or set data.frames_kind=real for real (signed) F")
    if is_complex:
        return "complex"
    if kind == "auto":
        sample = np.asarray(F[: min(F.shape[0], 64)])
        if (sample >= 0).all():
            raise FrameInputError(
                f"{path}: every structure factor is real and non-negative: these look like amplitudes |F|, but "
                "x' = sum w|F|^2 - |sum w F|^2 needs the phases (complex F). Give complex F, or set "
                "data.frames_kind=real if they really are signed real structure factors.")
    return "real"


def _check_hkl(hkl, n_refl: int, path) -> np.ndarray:
    hkl = np.asarray(hkl)
    if hkl.ndim != 2 or hkl.shape[1] != 3:
        raise FrameInputError(f"{path}: Miller indices must have shape (reflections, 3), got {hkl.shape}")
    if hkl.shape[0] != n_refl:
        raise FrameInputError(f"{path}: {hkl.shape[0]} Miller indices for {n_refl} reflections per frame")
    if not np.issubdtype(hkl.dtype, np.integer):
        if not np.allclose(hkl, np.round(hkl)):
            raise FrameInputError(f"{path}: Miller indices must be integers")
        hkl = np.round(hkl)
    return hkl.astype(np.int32)


def _check_stack(F, path) -> None:
    if F.ndim != 2:
        raise FrameInputError(f"{path}: the frames array must have shape (frames, reflections), got {F.shape}")
    if F.shape[0] < 2 or F.shape[1] < 1:
        raise FrameInputError(f"{path}: need at least 2 frames and 1 reflection, got shape {F.shape}")


def _read_frame_mtz(path: pathlib.Path, amplitude: str | None, phase: str | None):
    mtz = _read_gemmi(path)
    types = _column_types(mtz)
    amp = amplitude or next((c for c in types if types[c] == "F"), None)
    if amp is None or amp not in types:
        raise FrameInputError(f"{path}: no structure-factor amplitude column (type F){'' if amplitude is None else ' named ' + amplitude}. "
                              f"Available columns: {_describe_columns(mtz)}")
    ph = phase or next((c for c in types if types[c] == "P"), None)
    hkl = np.asarray(mtz.make_miller_array(), dtype=np.int32)
    f = np.asarray(mtz.column_with_label(amp).array, dtype=np.float64)
    if ph is None or ph not in types:
        raise FrameInputError(
            f"{path}: amplitude column {amp!r} has no phase column (type P): x' needs complex F = |F| exp(i phi). "
            f"Available columns: {_describe_columns(mtz)}")
    phi = np.deg2rad(np.asarray(mtz.column_with_label(ph).array, dtype=np.float64))
    return hkl, (f * np.exp(1j * phi)).astype(np.complex64), mtz


def _read_mtz_folder(folder: pathlib.Path, amplitude, phase) -> FrameSet:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".mtz"), key=lambda p: _natural_key(p.name))
    if len(files) < 2:
        raise FrameInputError(f"{folder}: a frames folder needs at least 2 MTZ files, found {len(files)}")
    hkl0, f0, mtz0 = _read_frame_mtz(files[0], amplitude, phase)
    order0 = np.lexsort(hkl0.T[::-1])
    hkl0, f0 = hkl0[order0], f0[order0]
    F = np.empty((len(files), len(hkl0)), dtype=np.complex64)
    F[0] = f0
    key0 = pd.MultiIndex.from_arrays(hkl0.T)
    for t, p in enumerate(files[1:], start=1):
        hkl, f, _ = _read_frame_mtz(p, amplitude, phase)
        order = np.lexsort(hkl.T[::-1])
        if hkl.shape != hkl0.shape or not np.array_equal(hkl[order], hkl0):
            common = len(key0.intersection(pd.MultiIndex.from_arrays(hkl.T)))
            raise FrameInputError(
                f"frames have different reflection sets: {p.name} has {len(hkl)} reflections, {files[0].name} has "
                f"{len(hkl0)}, {common} in common. Give every frame the same Miller indices (same resolution cut).")
        F[t] = f[order]
    return FrameSet(F, hkl0, tuple(mtz0.cell.parameters), mtz0.spacegroup.hm if mtz0.spacegroup else "P 1",
                    np.zeros(len(files), dtype=np.int64), [])


def read_frames(
    path: PathLike,
    hkl: PathLike | None = None,
    kind: str = "auto",
    amplitude: str | None = None,
    phase: str | None = None,
    check_finite: bool = True,
) -> tuple[FrameSet, str]:
    """Read frames; returns the FrameSet (F possibly a read-only memory map) and ``"complex"`` or ``"real"``.

    The FrameSet's ``state`` holds labels stored with the frames (``state`` key/dataset), else zeros, and
    ``state_names`` is empty when none were stored.
    """
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"frames path {str(p)!r} does not exist")
    cell, sg, state, state_names = (1.0, 1.0, 1.0, 90.0, 90.0, 90.0), "P 1", None, []
    if p.is_dir():
        fs = _read_mtz_folder(p, amplitude, phase)
        F, hkl_arr, cell, sg = fs.F, fs.hkl, fs.cell, fs.spacegroup
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "F" not in z or "hkl" not in z:
                raise FrameInputError(f"{p}: a frames .npz needs arrays 'F' (frames, reflections) and 'hkl' "
                                      f"(reflections, 3); found {sorted(z.files)}")
            F, hkl_arr = z["F"], z["hkl"]
            state = z["state"] if "state" in z else None
            state_names = [str(n) for n in z["state_names"]] if "state_names" in z else []
            cell = tuple(z["cell"].tolist()) if "cell" in z else cell
            sg = str(z["spacegroup"]) if "spacegroup" in z else sg
    elif p.suffix == ".npy":
        F = np.load(p, mmap_mode="r")
        hkl_path = pathlib.Path(hkl) if hkl is not None else p.with_name(p.stem + "_hkl.npy")
        if not hkl_path.exists():
            raise FrameInputError(f"{p}: a .npy frames array needs its Miller indices: {hkl_path} not found "
                                  "(give data.hkl=PATH to an (reflections, 3) .npy)")
        hkl_arr = np.load(hkl_path)
    elif p.suffix in (".h5", ".hdf5"):
        import h5py

        fh = h5py.File(p, "r")
        if "F" not in fh or "hkl" not in fh:
            raise FrameInputError(f"{p}: an HDF5 frames file needs datasets 'F' and 'hkl'; found {list(fh.keys())}")
        F, hkl_arr = fh["F"], fh["hkl"][()]
        state = fh["state"][()] if "state" in fh else None
        cell = tuple(fh.attrs["cell"].tolist()) if "cell" in fh.attrs else cell
        sg = str(fh.attrs["spacegroup"]) if "spacegroup" in fh.attrs else sg
    else:
        raise FrameInputError(f"{p}: frames must be a folder of MTZ files, .npz, .npy or .h5/.hdf5, got {p.suffix!r}")
    _check_stack(F, p)
    hkl_arr = _check_hkl(hkl_arr, F.shape[1], p)
    if len(np.unique(hkl_arr, axis=0)) != len(hkl_arr):
        raise FrameInputError(f"{p}: Miller indices repeat; each reflection must appear once per frame")
    frames_kind = _check_kind(F, p, kind)
    if check_finite:
        check_finite_frames(F, p)
    labels = np.zeros(F.shape[0], dtype=np.int64) if state is None else np.asarray(state).astype(np.int64)
    if labels.shape != (F.shape[0],):
        raise FrameInputError(f"{p}: 'state' must hold one label per frame ({F.shape[0]}), got shape {labels.shape}")
    return FrameSet(F, hkl_arr, cell, sg, labels, state_names), frames_kind


def _per_frame_column(path: PathLike, n_frames: int, names: tuple[str, ...], what: str) -> np.ndarray:
    """One value per frame from a .npy, or a CSV column named one of ``names`` (or its only column)."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(p)!r} does not exist")
    if p.suffix == ".npy":
        raw = np.load(p, allow_pickle=False)
    else:
        table = pd.read_csv(p)
        col = next((c for c in table.columns if c.lower() in names), None)
        if col is None:
            if table.shape[1] != 1:
                raise FrameInputError(f"{p}: expected a column named {' or '.join(names)}; found {list(table.columns)}")
            col = table.columns[0]
        raw = table[col].to_numpy()
    raw = np.asarray(raw).reshape(-1)
    if raw.shape[0] != n_frames:
        raise FrameInputError(f"{p}: {raw.shape[0]} {what} for {n_frames} frames")
    return raw


def read_labels(path: PathLike, n_frames: int) -> tuple[np.ndarray, list[str]]:
    """State/cluster label per frame from a CSV (a column named state/label/cluster, or the only column) or .npy."""
    raw = _per_frame_column(path, n_frames, ("state", "label", "cluster"), "labels")
    names, labels = np.unique(raw.astype(str), return_inverse=True)
    return labels.astype(np.int64), [str(n) for n in names]


def read_weights(path: PathLike, n_frames: int) -> np.ndarray:
    """Prior weight of each frame (e.g. from a maximum-entropy or BME run) from a CSV (column weight/w/prior, or the
    only column) or .npy; positive, normalised to sum 1."""
    w = _per_frame_column(path, n_frames, ("weight", "w", "prior", "prior_weight"), "prior weights").astype(float)
    if not np.isfinite(w).all() or (w <= 0).any():
        raise FrameInputError(f"{path}: prior weights must be finite and positive ({int((~np.isfinite(w) | (w <= 0)).sum())} are not)")
    return w / w.sum()


def read_observed(path: PathLike, intensity: str | None = None, sigma: str | None = None,
                  require_sigma: bool = False) -> ObservedTable:
    """Observed intensities from an MTZ: the intensity column (type J, or named) and its sigma (type Q) if any."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"observed intensities: {str(p)!r} does not exist")
    mtz = _read_gemmi(p)
    if mtz.spacegroup is None or not mtz.cell.is_crystal():
        raise MTZInputError(f"{p}: no space group or unit cell; the symmetry of the observed data is needed")
    col = _find_intensity(p, mtz, intensity)
    try:
        sig = _find_sigma(p, mtz, sigma, col)
    except MTZInputError:
        if require_sigma or sigma is not None:
            raise
        sig = None
    hkl = np.asarray(mtz.make_miller_array(), dtype=np.int32)
    i = np.asarray(mtz.column_with_label(col).array, dtype=np.float64)
    s = None if sig is None else np.asarray(mtz.column_with_label(sig).array, dtype=np.float64)
    bad = ~np.isfinite(i) | (np.zeros_like(i, bool) if s is None else (~np.isfinite(s) | (s <= 0)))
    if bad.all():
        raise FrameInputError(f"{p}: no usable intensities in column {col!r} (all missing, or sigmas not positive)")
    if bad.any():
        keep = ~bad
        hkl, i, s = hkl[keep], i[keep], (None if s is None else s[keep])
    asu, _ = rs.utils.hkl_to_asu(hkl, mtz.spacegroup)
    if len(np.unique(asu, axis=0)) != len(asu):
        raise FrameInputError(f"{p}: reflections repeat after mapping to the asymmetric unit: observed data must be "
                              "merged (one value per unique reflection)")
    table = ObservedTable(asu, i, s, mtz.cell.parameters, mtz.spacegroup.hm, p)
    table.n_dropped = int(bad.sum())
    return table


def _saver(save, *args, **kwargs):
    # through a file object: given a name, NumPy appends .npy/.npz to the temporary file's name
    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as fh:
            save(fh, *args, **kwargs)

    return write


def write_frames(path: PathLike, frames: FrameSet) -> pathlib.Path:
    """Write a FrameSet as ``.npz`` (F, hkl, state, cell, spacegroup), or ``.npy`` + ``<stem>_hkl.npy``."""
    p = pathlib.Path(path)
    if p.suffix == ".npz":
        atomic_write(p, _saver(np.savez, F=frames.F, hkl=frames.hkl, state=frames.state,
                               state_names=np.asarray(frames.state_names or [], dtype=str),
                               cell=np.asarray(frames.cell), spacegroup=np.asarray(frames.spacegroup)))
    elif p.suffix == ".npy":
        atomic_write(p.with_name(p.stem + "_hkl.npy"), _saver(np.save, frames.hkl))
        atomic_write(p, _saver(np.save, frames.F))
    else:
        raise ValueError(f"write_frames: use a .npz or .npy path, got {p}")
    return p


def intensity_dataset(hkl: np.ndarray, columns: dict[str, tuple[np.ndarray, str]], cell, spacegroup: str) -> rs.DataSet:
    """A merged DataSet indexed by H, K, L with ``columns`` {label: (values, MTZ dtype name)}."""
    ds = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2]}, cell=gemmi.UnitCell(*cell),
                    spacegroup=gemmi.SpaceGroup(spacegroup), merged=True)
    for c in ("H", "K", "L"):
        ds[c] = ds[c].astype("HKL")
    for label, (values, dtype) in columns.items():
        ds[label] = rs.DataSeries(np.asarray(values), dtype=dtype)
    return ds.set_index(["H", "K", "L"])


def write_intensity_mtz(path: PathLike, hkl: np.ndarray, columns: dict[str, tuple[np.ndarray, str]], cell,
                        spacegroup: str, protect: Iterable[PathLike] = ()) -> pathlib.Path:
    """:func:`intensity_dataset` written atomically as an MTZ file."""
    ds = intensity_dataset(hkl, columns, cell, spacegroup)
    atomic_write(path, lambda tmp: ds.write_mtz(str(tmp)), protect=tuple(protect))
    return pathlib.Path(path)
