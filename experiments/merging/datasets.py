"""Several unmerged files as one table: a data-set index per observation, checked to share symmetry and cell."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import reciprocalspaceship as rs

from physppl.io.mtz import MTZInputError

__all__ = ["combine_datasets", "check_compatible", "dataset_names", "CELL_TOLERANCE"]

# Relative tolerance on cell lengths and absolute (degrees) on angles for data sets merged in one model: beyond
# ~2% the same Miller index no longer means the same scattering vector to the data's resolution.
CELL_TOLERANCE = (0.02, 2.0)


def dataset_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short, unique names for the data sets (the file stems, numbered if two stems are equal)."""
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [f"{i}_{s}" for i, s in enumerate(stems)]


def check_compatible(datasets: Sequence[rs.DataSet], sources: Sequence[str]) -> None:
    """Raise :class:`MTZInputError` naming the files when space groups differ or cells are incompatible."""
    first, name0 = datasets[0], sources[0]
    sg0 = first.spacegroup
    c0 = np.array(first.cell.parameters)
    rel, ang = CELL_TOLERANCE
    for ds, name in zip(datasets[1:], sources[1:]):
        if ds.spacegroup is None or sg0 is None or ds.spacegroup.number != sg0.number:
            raise MTZInputError(
                f"{name}: space group {getattr(ds.spacegroup, 'hm', None)} differs from {name0}'s "
                f"{getattr(sg0, 'hm', None)}; data sets merged together must share a space group (reindex first)")
        c = np.array(ds.cell.parameters)
        bad_len = np.abs(c[:3] / c0[:3] - 1) > rel
        bad_ang = np.abs(c[3:] - c0[3:]) > ang
        if bad_len.any() or bad_ang.any():
            raise MTZInputError(
                f"{name}: cell {tuple(np.round(c, 3))} is incompatible with {name0}'s {tuple(np.round(c0, 3))} "
                f"(more than {rel:.0%} on a length or {ang} degrees on an angle)")


def combine_datasets(read: Callable[[str], rs.DataSet], paths: Sequence[str]) -> rs.DataSet:
    """Read each file with ``read``, check they can be merged together and stack them with a ``DATASET`` column
    (0, 1, ... in the order given). Symmetry and cell are the first file's."""
    if len(paths) == 0:
        raise ValueError("data.paths is empty: give one or more unmerged MTZ files")
    parts = [read(p) for p in paths]
    check_compatible(parts, [str(p) for p in paths])
    stacked = []
    for k, ds in enumerate(parts):
        ds = ds.copy()
        ds["DATASET"] = np.full(len(ds), k, dtype=np.int32)
        stacked.append(ds)
    out = rs.concat(stacked, check_isomorphous=False)
    out.spacegroup, out.cell = parts[0].spacegroup, parts[0].cell
    return out
