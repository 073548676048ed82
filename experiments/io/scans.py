"""Reading and validating observed 1-D scans (e.g. knife-edge scans along two axes) from CSV or NPY files.

Accepted layouts, for scans of ``n_axes`` axes with ``n_per_axis`` points each (``length = n_axes * n_per_axis``):

* ``.npy``: one scan, shape ``(length,)``, or several, shape ``(n, length)``, the axes concatenated in order.
* ``.csv`` without a header: one value per line (one scan of ``length`` values), or one scan per row.
* ``.csv`` with a header ``axis,position,signal`` (long form, one row per blade position; axis names such as
  ``x``/``y``): positions must increase strictly along each axis and match the expected ones, if given.
* ``.csv`` with a header ``position_<axis>,signal_<axis>`` for each axis (wide form, one row per position).

Every problem is reported before any long run: which file, which row/column, what was expected.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["ScanInputError", "ObservedScans", "read_scans", "validate_scans", "validate_positions"]


class ScanInputError(ValueError):
    """An observed scan file that cannot be used as it is."""


@dataclass
class ObservedScans:
    """Validated scans, shape (n, length), each row the axes' scans concatenated; ``path`` is the source file."""

    x: np.ndarray
    path: Path | None = None
    positions: np.ndarray | None = None  # (n_axes, n_per_axis) when the file gave them

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def validate_positions(positions: np.ndarray, axis: str, source: str, expected: np.ndarray | None = None,
                       atol: float = 1e-6) -> None:
    """Blade positions of one axis: finite, strictly increasing, and equal to ``expected`` (if given)."""
    pos = np.asarray(positions, dtype=float)
    bad = np.flatnonzero(~np.isfinite(pos))
    if bad.size:
        raise ScanInputError(f"{source}: position of axis {axis!r} at point {bad[0]} is {pos[bad[0]]}: positions must be finite")
    step = np.diff(pos)
    if (step <= 0).any():
        k = int(np.flatnonzero(step <= 0)[0])
        raise ScanInputError(f"{source}: positions of axis {axis!r} are not strictly increasing: point {k + 1} "
                             f"({pos[k + 1]:g}) follows point {k} ({pos[k]:g}); sort the scan by position")
    if expected is not None:
        exp = np.asarray(expected, dtype=float)
        if pos.shape != exp.shape:
            raise ScanInputError(f"{source}: axis {axis!r} has {pos.size} positions, expected {exp.size}")
        worst = int(np.argmax(np.abs(pos - exp)))
        if abs(pos[worst] - exp[worst]) > atol * max(1.0, float(np.abs(exp).max())):
            raise ScanInputError(f"{source}: axis {axis!r} position {worst} is {pos[worst]:g}, expected {exp[worst]:g} "
                                 f"(the model's blade positions {exp[0]:g}..{exp[-1]:g} in {exp.size} steps); "
                                 "set the model's positions to the scan's")


def validate_scans(x: np.ndarray, length: int, source: str = "scans", axis_names: Sequence[str] = ("x", "y")) -> np.ndarray:
    """Shape (n, length) float array with every entry finite; a 1-D scan becomes one row."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iuf":
        raise ScanInputError(f"{source}: expected numbers, got an array of dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != length:
        raise ScanInputError(f"{source}: expected one scan of {length} values or an array of shape (n, {length}) "
                             f"({len(axis_names)} axes of {length // len(axis_names)} points, concatenated), "
                             f"got shape {np.asarray(x).shape}")
    if arr.shape[0] == 0:
        raise ScanInputError(f"{source}: no scans in the file")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        row, col = (int(v) for v in bad[0])
        per = length // len(axis_names)
        raise ScanInputError(f"{source}: scan {row}, value {col} (axis {axis_names[col // per]!r}, point {col % per}) "
                             f"is {arr[row, col]}; {len(bad)} non-finite value(s) in all: scans must be finite")
    return arr


def _read_csv(path: Path, length: int, axis_names: Sequence[str], expected: np.ndarray | None):
    rows, line_of = [], []  # non-blank rows and their line numbers in the file
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append(r)
                line_of.append(reader.line_num)
    if not rows:
        raise ScanInputError(f"{path}: empty file")
    head = [c.strip().lower() for c in rows[0]]

    def number(text: str, r: int, c: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ScanInputError(f"{path}: line {line_of[r]}, column {c!r}: {text!r} is not a number") from None

    if {"axis", "position", "signal"} <= set(head):
        ia, ip, isig = head.index("axis"), head.index("position"), head.index("signal")
        by_axis: dict[str, list[tuple[float, float]]] = {}
        for r, row in enumerate(rows[1:], start=1):
            if len(row) <= max(ia, ip, isig):
                raise ScanInputError(f"{path}: line {line_of[r]} has {len(row)} columns, expected {len(head)}")
            by_axis.setdefault(row[ia].strip().lower(), []).append((number(row[ip], r, "position"), number(row[isig], r, "signal")))
        missing = [a for a in axis_names if a not in by_axis]
        extra = [a for a in by_axis if a not in axis_names]
        if missing or extra:
            raise ScanInputError(f"{path}: column 'axis' must hold the axes {', '.join(axis_names)}; "
                                 f"missing {missing or 'none'}, unexpected {extra or 'none'}")
        cols = [np.asarray(by_axis[a]) for a in axis_names]
    elif all(f"position_{a}" in head and f"signal_{a}" in head for a in axis_names):
        table = []
        for r, row in enumerate(rows[1:], start=1):
            if len(row) != len(head):
                raise ScanInputError(f"{path}: line {line_of[r]} has {len(row)} columns, expected {len(head)}")
            table.append([number(v, r, head[k]) for k, v in enumerate(row)])
        table = np.asarray(table)
        cols = [table[:, [head.index(f"position_{a}"), head.index(f"signal_{a}")]] for a in axis_names]
    else:
        def is_number(text: str) -> bool:
            try:
                float(text)
                return True
            except ValueError:
                return False

        if not all(is_number(v) for v in rows[0]):  # a header this reader does not know
            raise ScanInputError(f"{path}: expected numbers only, or a header 'axis,position,signal', or columns "
                                 f"{', '.join(f'position_{a},signal_{a}' for a in axis_names)}; got header {rows[0]}")
        # numbers only: the first bad value or ragged row is named by its line in the file
        for r, row in enumerate(rows):
            if len(row) != len(rows[0]):
                raise ScanInputError(f"{path}: line {line_of[r]} has {len(row)} values, line {line_of[0]} has "
                                     f"{len(rows[0])}")
        values = np.asarray([[number(v, r, str(k + 1)) for k, v in enumerate(row)] for r, row in enumerate(rows)])
        if values.shape[1] == 1:
            values = values[:, 0]
        return values, None
    per = length // len(axis_names)
    positions = []
    for a, pairs in zip(axis_names, cols):
        if pairs.shape[0] != per:
            raise ScanInputError(f"{path}: axis {a!r} has {pairs.shape[0]} points, expected {per}")
        validate_positions(pairs[:, 0], a, str(path), None if expected is None else expected)
        positions.append(pairs[:, 0])
    return np.concatenate([p[:, 1] for p in cols]), np.stack(positions)


def read_scans(
    path: str | os.PathLike,
    length: int = 200,
    axis_names: Sequence[str] = ("x", "y"),
    positions: np.ndarray | Sequence[float] | None = None,
) -> ObservedScans:
    """Read and validate observed scans from ``.npy`` or ``.csv`` (layouts in the module docstring).

    ``positions`` (n_per_axis,): the blade positions the scans must have been taken at (checked when the file
    gives positions).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"observed scans: no file at {path}")
    expected = None if positions is None else np.asarray(positions, dtype=float)
    file_positions = None
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ScanInputError(f"{path}: not a readable .npy array ({err})") from None
    elif suffix in (".csv", ".txt"):
        raw, file_positions = _read_csv(path, length, axis_names, expected)
    else:
        raise ScanInputError(f"{path}: unknown scan format {suffix!r}; use .npy (shape ({length},) or (n, {length})) or .csv")
    x = validate_scans(raw, length, str(path), axis_names)
    return ObservedScans(x=x, path=path, positions=file_positions)
