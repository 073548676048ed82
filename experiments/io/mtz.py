"""Reading and writing MTZ reflection files for merging.

Unmerged input (one row per observation) is read with
:func:`read_unmerged_mtz`, merged reference data with
:func:`read_merged_mtz`, and results are written with
:func:`write_mtz_atomic`. Every problem with the input file is reported as an
:class:`MTZInputError` whose message names the file, the column concerned and
what was expected, so that a user can fix the call or the configuration
without reading a traceback.

Columns are found by their MTZ column type when no names are given:

========  =========================  =============================
MTZ type  meaning                    examples
========  =========================  =============================
``J``     intensity                  ``I``, ``IPR``, ``IMEAN``
``Q``     standard deviation         ``SIGI``, ``SIGIPR``
``B``     batch (image) number       ``BATCH``
``K``     intensity of I(+) or I(-)  ``I(+)``, ``Iplus``
``M``     sigma of a ``K`` column    ``SIGI(+)``, ``SIGIplus``
``F``     amplitude                  ``F``, ``FP``
========  =========================  =============================
"""

from __future__ import annotations

import logging
import os
import pathlib
import warnings
from collections.abc import Iterable, Sequence

import gemmi
import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from physppl.inference.outputs import atomic_write
from reciprocalspaceship.utils import hkl_to_asu

__all__ = [
    "MTZInputError",
    "read_unmerged_mtz",
    "read_merged_mtz",
    "write_mtz_atomic",
    "mtz_writer",
    "add_free_r",
    "check_free_r_file",
    "history_lines",
]

PathLike = str | os.PathLike
log = logging.getLogger(__name__)

#: Configuration keys through which the application passes column names.
HYDRA_KEYS = {
    "intensity": "data.columns.intensity",
    "sigma": "data.columns.sigma",
    "batch": "data.columns.batch",
}
PARTIAL_MODES = ("auto", "sum", "full_only", "ignore")

# Name of the column that holds a displaced file column when a chosen column
# is renamed onto its label (e.g. IPR chosen -> the file's own I becomes I_FILE).
_DISPLACED_SUFFIX = "_FILE"


class MTZInputError(ValueError):
    """Bad or unsuitable MTZ input; the message names the file, the column and what was expected."""


# ----------------------------------------------------------------------------
# File level checks
# ----------------------------------------------------------------------------


def _existing_file(path: PathLike) -> pathlib.Path:
    """Return ``path`` as a Path, raising FileNotFoundError if it is not a file."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not an MTZ file" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"MTZ file {str(p)!r} {what}")
    return p


def _read_gemmi(path: pathlib.Path) -> gemmi.Mtz:
    """Read the file with gemmi, turning any parse failure into MTZInputError."""
    try:
        return gemmi.read_mtz_file(str(path))
    except (RuntimeError, ValueError, OSError, MemoryError) as exc:
        raise MTZInputError(f"{str(path)!r} is not a readable MTZ file: {exc}") from exc


def _column_types(mtz: gemmi.Mtz) -> dict[str, str]:
    """Map column label -> one-letter MTZ type, in file order."""
    return {c.label: c.type for c in mtz.columns}


def _describe_columns(mtz: gemmi.Mtz) -> str:
    """List the file's columns with their MTZ types, for error messages."""
    return ", ".join(f"{label} ({kind})" for label, kind in _column_types(mtz).items())


def _hkl_array(mtz: gemmi.Mtz) -> np.ndarray:
    return np.asarray(mtz.make_miller_array(), dtype=np.int32).reshape(-1, 3)


def _n_duplicate_asu_hkls(mtz: gemmi.Mtz) -> int:
    """Number of rows whose Miller index (mapped to the ASU) repeats an earlier row.

    Without a space group the indices are compared as written: unmerged files
    store them in the ASU anyway (the observed index is encoded in M/ISYM).
    """
    hkls = _hkl_array(mtz)
    if len(hkls) == 0:
        return 0
    if mtz.spacegroup is not None:
        hkls = hkl_to_asu(hkls, mtz.spacegroup)[0]
    return len(hkls) - len(np.unique(hkls, axis=0))


def _has_batch_column(mtz: gemmi.Mtz) -> bool:
    return any(kind == "B" for kind in _column_types(mtz).values())


def _check_is_unmerged(mtz: gemmi.Mtz, path: pathlib.Path) -> None:
    """Reject merged files: no Batch column and every reflection occurs once."""
    if _has_batch_column(mtz):
        return
    if _n_duplicate_asu_hkls(mtz) == 0:
        raise MTZInputError(
            f"{str(path)!r} looks like a merged MTZ file: it has no Batch (type B) "
            f"column and each reflection occurs only once. Merging needs an unmerged "
            f"file with one row per observation and a BATCH column (e.g. from "
            f"dials.export or AIMLESS with OUTPUT UNMERGED). Columns found: "
            f"{_describe_columns(mtz)}"
        )


def _check_is_merged(mtz: gemmi.Mtz, path: pathlib.Path) -> None:
    """Reject unmerged files where a merged reference is needed."""
    n_dup = _n_duplicate_asu_hkls(mtz)
    if _has_batch_column(mtz) or n_dup > 0:
        reason = (
            "it has a Batch (type B) column"
            if _has_batch_column(mtz)
            else f"{n_dup} of {mtz.nreflections} rows repeat a reflection"
        )
        raise MTZInputError(
            f"{str(path)!r} looks like an unmerged MTZ file ({reason}); a merged "
            f"file with one row per unique reflection is needed here (e.g. the "
            f"merged output of AIMLESS with IMEAN/SIGIMEAN or I(+)/I(-) columns). "
            f"Columns found: {_describe_columns(mtz)}"
        )


def _is_valid_cell(cell: gemmi.UnitCell | None) -> bool:
    """True for a usable cell.

    gemmi reports a file without a usable cell as (1, 1, 1, 90, 90, 90); a real
    crystal never has 1 A axes, so that placeholder counts as missing.
    """
    if cell is None:
        return False
    params = np.array(cell.parameters, dtype=float)
    if not np.all(np.isfinite(params)) or np.any(params <= 0.0):
        return False
    return not np.allclose(params, [1, 1, 1, 90, 90, 90])


def _check_symmetry(mtz: gemmi.Mtz, path: pathlib.Path) -> gemmi.UnitCell:
    """Require a space group and a cell; return the cell to use.

    The global CELL record is preferred; a dataset cell (DCELL) is a fallback
    because some writers only fill those.
    """
    if mtz.spacegroup is None:
        raise MTZInputError(
            f"{str(path)!r} has no space group (no SYMINF/SYMM records); the space "
            f"group is needed to map reflections to the asymmetric unit. Re-export "
            f"the file with symmetry, e.g. with pointless or gemmi."
        )
    if _is_valid_cell(mtz.cell):
        return mtz.cell
    for dataset in mtz.datasets:
        if _is_valid_cell(dataset.cell):
            return dataset.cell
    raise MTZInputError(
        f"{str(path)!r} has no valid unit cell (found {mtz.cell.parameters}); "
        f"positive cell lengths and angles are needed. Re-export the file with "
        f"the unit cell set."
    )


def _to_dataset(mtz: gemmi.Mtz, cell: gemmi.UnitCell, path: pathlib.Path) -> rs.DataSet:
    """Convert to an rs.DataSet, keeping the first real wavelength.

    The HKL_base dataset carries a dummy wavelength (0 or 9.999), which makes
    rs warn about several wavelengths for every ordinary CCP4 file; that
    warning is noise here, so the base dataset is skipped.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mtz contains multiple datasets")
        try:
            ds = rs.DataSet.from_gemmi(mtz)
        except ValueError as exc:  # e.g. several M/ISYM columns
            raise MTZInputError(f"{str(path)!r} cannot be converted: {exc}") from exc
    real = [
        d.wavelength for d in mtz.datasets if d.wavelength > 0 and d.dataset_name != "HKL_base"
    ]
    ds.wavelength = real[0] if real else None
    ds.cell = cell
    return ds


def _open_checked(path: PathLike, *, merged: bool) -> tuple[pathlib.Path, gemmi.Mtz, gemmi.UnitCell]:
    """Run the file level checks in order; return path, gemmi object and cell."""
    p = _existing_file(path)
    mtz = _read_gemmi(p)
    if merged:
        _check_is_merged(mtz, p)
    else:
        _check_is_unmerged(mtz, p)
    cell = _check_symmetry(mtz, p)
    return p, mtz, cell


# ----------------------------------------------------------------------------
# Column selection
# ----------------------------------------------------------------------------


def _columns_of_type(types: dict[str, str], kind: str) -> list[str]:
    return [label for label, t in types.items() if t == kind]


def _missing_column_error(
    path: pathlib.Path, mtz: gemmi.Mtz, role: str, expected: str, name: str | None = None
) -> MTZInputError:
    key = HYDRA_KEYS.get(role)
    fix = f" Pass {key}=NAME to choose one." if key else ""
    if name is not None:
        head = f"{str(path)!r} has no column {name!r} (asked for as the {role} column)."
    else:
        head = f"{str(path)!r}: could not find the {role} column ({expected})."
    return MTZInputError(f"{head} Available columns: {_describe_columns(mtz)}.{fix}")


def _named_column(
    path: pathlib.Path, mtz: gemmi.Mtz, name: str, role: str, expected_type: str
) -> str:
    """Validate a column given by name; warn when its MTZ type is unexpected."""
    types = _column_types(mtz)
    if name not in types:
        raise _missing_column_error(path, mtz, role, expected_type, name=name)
    if types[name] != expected_type:
        warnings.warn(
            f"{str(path)!r}: column {name!r} chosen as the {role} column has MTZ type "
            f"{types[name]!r}, expected {expected_type!r}; using it anyway.",
            stacklevel=4,
        )
    return name


def _find_intensity(path: pathlib.Path, mtz: gemmi.Mtz, name: str | None) -> str:
    """Choose the intensity column.

    ``I`` wins over the profile-fitted ``IPR``: in DIALS exports ``I`` holds
    the intensity the integration program selected (profile-fitted or
    summation, or a combination of both, per reflection), which is the one
    meant for scaling.
    """
    if name is not None:
        return _named_column(path, mtz, name, "intensity", "J")
    candidates = _columns_of_type(_column_types(mtz), "J")
    if not candidates:
        raise _missing_column_error(path, mtz, "intensity", "an MTZ column of type J")
    for preferred in ("I", "IMEAN", "IPR"):
        if preferred in candidates:
            return preferred
    if len(candidates) == 1:
        return candidates[0]
    raise MTZInputError(
        f"{str(path)!r} has several intensity (type J) columns {candidates} and none "
        f"is named I; pass {HYDRA_KEYS['intensity']}=NAME to choose one. Available "
        f"columns: {_describe_columns(mtz)}."
    )


def _paired_sigma(types: dict[str, str], value: str, sigma_type: str) -> str | None:
    """Sigma column belonging to ``value``: ``SIG<value>``, else the next sigma column in file order."""
    if types.get("SIG" + value) == sigma_type:
        return "SIG" + value
    labels = list(types)
    following = labels[labels.index(value) + 1 :] if value in types else []
    if following and types[following[0]] == sigma_type:
        return following[0]
    return None


def _find_sigma(path: pathlib.Path, mtz: gemmi.Mtz, name: str | None, intensity: str) -> str:
    """Choose the standard deviation (type Q) column that goes with ``intensity``."""
    if name is not None:
        return _named_column(path, mtz, name, "sigma", "Q")
    types = _column_types(mtz)
    paired = _paired_sigma(types, intensity, "Q")
    if paired is not None:
        return paired
    candidates = _columns_of_type(types, "Q")
    if len(candidates) == 1:
        return candidates[0]
    expected = (
        f"an MTZ column of type Q named SIG{intensity} to go with {intensity!r}"
    )
    if candidates:
        expected += f"; several candidates {candidates}"
    raise _missing_column_error(path, mtz, "sigma", expected)


def _find_batch(path: pathlib.Path, mtz: gemmi.Mtz, name: str | None) -> str:
    """Choose the Batch (type B) column, preferring one named BATCH."""
    if name is not None:
        return _named_column(path, mtz, name, "batch", "B")
    candidates = _columns_of_type(_column_types(mtz), "B")
    if "BATCH" in candidates:
        return "BATCH"
    if len(candidates) == 1:
        return candidates[0]
    expected = "an MTZ column of type B (image number of each observation)"
    if candidates:
        expected += f"; several candidates {candidates}"
    raise _missing_column_error(path, mtz, "batch", expected)


def _rename_canonical(ds: rs.DataSet, mapping: dict[str, str]) -> rs.DataSet:
    """Rename chosen columns to canonical labels, moving displaced ones aside."""
    chosen = set(mapping)
    displaced = {
        target: target + _DISPLACED_SUFFIX
        for source, target in mapping.items()
        if source != target and target in ds.columns and target not in chosen
    }
    return ds.rename(columns={**displaced, **mapping})


# ----------------------------------------------------------------------------
# Bad values
# ----------------------------------------------------------------------------


def _bad_value_mask(
    ds: rs.DataSet, path: pathlib.Path, drop_bad_sigma: bool, i_col: str, s_col: str
) -> np.ndarray:
    """Find rows with NaN/inf intensity or non-finite/non-positive sigma.

    ``i_col``/``s_col`` are the file's names for ``I``/``SIGI``, used in the
    message. Raises MTZInputError describing the counts unless
    ``drop_bad_sigma``.
    """
    i = ds["I"].to_numpy(dtype=float, na_value=np.nan)
    s = ds["SIGI"].to_numpy(dtype=float, na_value=np.nan)
    bad_i = ~np.isfinite(i)
    nan_s = ~np.isfinite(s)
    nonpos_s = np.isfinite(s) & (s <= 0.0)
    bad = bad_i | nan_s | nonpos_s
    n_bad = int(bad.sum())
    if n_bad == len(ds):  # dropping them would leave nothing: another column is the only fix
        raise MTZInputError(
            f"{str(path)!r}: none of its {len(ds)} rows is usable (column {s_col!r}: {int(nan_s.sum())} NaN/inf, "
            f"{int(nonpos_s.sum())} zero or negative; column {i_col!r}: {int(bad_i.sum())} NaN/inf). Choose "
            f"other columns (data.columns.intensity=..., data.columns.sigma=...); columns of this file: "
            f"{', '.join(map(str, ds.columns))}"
        )
    if n_bad and not drop_bad_sigma:
        raise MTZInputError(
            f"{str(path)!r}: {n_bad} of {len(ds)} rows have unusable values "
            f"(column {s_col!r}: {int(nan_s.sum())} NaN/inf, "
            f"{int(nonpos_s.sum())} zero or negative; column {i_col!r}: "
            f"{int(bad_i.sum())} NaN/inf). Intensities must be finite and sigmas "
            f"finite and positive. Set data.drop_bad_sigma=true to drop these rows."
        )
    return bad


# ----------------------------------------------------------------------------
# Partials
# ----------------------------------------------------------------------------


def _partial_mask(ds: rs.DataSet) -> np.ndarray:
    """Rows that are one part of an unsummed partial reflection.

    ``PARTIAL`` comes from the 256 flag in M/ISYM (set by rs when reading) or
    from an explicit integer column; MOSFLM marks parts with a nonzero
    ``MPART``.
    """
    mask = np.zeros(len(ds), dtype=bool)
    if "PARTIAL" in ds.columns:
        mask |= ds["PARTIAL"].to_numpy(dtype=float, na_value=0.0) != 0
    if "MPART" in ds.columns:
        mask |= ds["MPART"].to_numpy(dtype=float, na_value=0.0) != 0
    return mask


def _group_parts(parts: pd.DataFrame) -> np.ndarray:
    """Group id per part: same observed H,K,L and a run of consecutive batches.

    ``parts`` must be sorted by H, K, L, BATCH. A gap of more than one batch
    starts a new reflection (a later pass through the same reflection).
    """
    hkl = parts[["H", "K", "L"]].to_numpy(dtype=np.int64)
    batch = parts["BATCH"].to_numpy(dtype=np.int64)
    new = np.ones(len(parts), dtype=bool)
    if len(parts) > 1:
        same_hkl = np.all(hkl[1:] == hkl[:-1], axis=1)
        consecutive = (batch[1:] - batch[:-1]) <= 1
        new[1:] = ~(same_hkl & consecutive)
    return np.cumsum(new) - 1


def _representative_part(fraction: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Row index (into the sorted parts) whose BATCH labels each summed reflection.

    The part with the largest FRACTIONCALC (where the reflection peaks);
    when all parts have equal fractions, the middle part.
    """
    start = np.searchsorted(group, np.arange(n_groups))
    count = np.bincount(group, minlength=n_groups)
    max_frac = np.full(n_groups, -np.inf)
    np.maximum.at(max_frac, group, fraction)
    is_max = fraction == max_frac[group]
    n_max = np.bincount(group, weights=is_max, minlength=n_groups).astype(int)
    # First part reaching the maximum: rows are sorted by batch inside a group.
    first_max = np.full(n_groups, len(fraction))
    np.minimum.at(first_max, group, np.where(is_max, np.arange(len(fraction)), len(fraction)))
    middle = start + (count - 1) // 2
    return np.where((n_max == count) & (count > 1), middle, first_max)


def _sum_partials(
    ds: rs.DataSet, is_part: np.ndarray, path: pathlib.Path, min_fraction: float
) -> rs.DataSet:
    """Sum the parts of each partial reflection; drop incomplete sums."""
    if "FRACTIONCALC" not in ds.columns:
        raise MTZInputError(
            f"{str(path)!r}: {int(is_part.sum())} rows are parts of partially recorded "
            f"reflections but there is no FRACTIONCALC column, so it cannot be told "
            f"whether the summed parts make a complete reflection. Use "
            f'partials="full_only" to drop the parts, or "ignore" to keep them unsummed.'
        )
    flat = ds.reset_index()
    flat["_row"] = np.arange(len(flat))
    parts = flat[is_part].sort_values(["H", "K", "L", "BATCH"], kind="stable")
    fraction = parts["FRACTIONCALC"].to_numpy(dtype=float, na_value=np.nan)
    if not np.all(np.isfinite(fraction)):
        raise MTZInputError(
            f"{str(path)!r}: {int((~np.isfinite(fraction)).sum())} partial rows have no "
            f"FRACTIONCALC value, so their sums cannot be checked for completeness. "
            f'Use partials="full_only" to drop the parts, or "ignore" to keep them unsummed.'
        )
    group = _group_parts(parts)
    n_groups = int(group[-1]) + 1 if len(group) else 0
    rep = _representative_part(fraction, group, n_groups)
    count = np.bincount(group, minlength=n_groups)

    summed: dict[str, np.ndarray] = {}
    for col in parts.columns:
        values = parts[col]
        if col in ("H", "K", "L", "BATCH", "_row"):
            summed[col] = values.to_numpy()[rep]
        elif col == "I" or col == "FRACTIONCALC":
            summed[col] = np.bincount(group, weights=values.to_numpy(dtype=float), minlength=n_groups)
        elif col == "SIGI":
            var = values.to_numpy(dtype=float) ** 2
            summed[col] = np.sqrt(np.bincount(group, weights=var, minlength=n_groups))
        elif col == "PARTIAL":
            summed[col] = np.zeros(n_groups, dtype=bool)
        elif col == "MPART":
            summed[col] = np.zeros(n_groups)
        elif col == "NPART":
            summed[col] = count.astype(float)
        elif pd.api.types.is_numeric_dtype(values.dtype):
            v = values.to_numpy(dtype=float, na_value=np.nan)
            mean = np.bincount(group, weights=v, minlength=n_groups) / count
            summed[col] = np.round(mean) if _is_integer_dtype(values.dtype) else mean
        else:
            summed[col] = values.to_numpy()[rep]
    sums = pd.DataFrame(summed)
    for col in parts.columns:
        sums[col] = sums[col].astype(parts[col].dtype)

    complete = sums["FRACTIONCALC"].to_numpy(dtype=float) >= min_fraction
    n_incomplete = int((~complete).sum())
    if n_incomplete:
        warnings.warn(
            f"{str(path)!r}: dropped {n_incomplete} of {n_groups} summed partial "
            f"reflections whose total FRACTIONCALC is below min_fraction={min_fraction} "
            f"(incomplete partials cannot be scaled up reliably).",
            stacklevel=3,
        )
    out = pd.concat([flat[~is_part], sums[complete]], ignore_index=True)
    out = out.sort_values("_row", kind="stable").drop(columns="_row")
    return _as_unmerged(out, ds)


def _is_integer_dtype(dtype) -> bool:
    """True for numpy and rs integer dtypes (Batch, MTZInt, ...)."""
    return np.issubdtype(np.dtype(getattr(dtype, "numpy_dtype", dtype)), np.integer)


def _as_unmerged(frame: pd.DataFrame, like: rs.DataSet) -> rs.DataSet:
    """Rebuild an unmerged, HKL-indexed DataSet carrying ``like``'s metadata."""
    ds = rs.DataSet(
        frame.reset_index(drop=True),
        spacegroup=like.spacegroup,
        cell=like.cell,
        merged=False,
    )
    ds.wavelength = like.wavelength
    for c in ("H", "K", "L"):
        ds[c] = ds[c].astype("HKL")
    return ds.set_index(["H", "K", "L"])


def _apply_partials(
    ds: rs.DataSet, path: pathlib.Path, partials: str, min_fraction: float
) -> rs.DataSet:
    """Sum, drop or keep unsummed partial rows according to ``partials``."""
    is_part = _partial_mask(ds)
    if not is_part.any() or partials == "ignore":
        return ds
    if partials == "full_only":
        warnings.warn(
            f"{str(path)!r}: dropped {int(is_part.sum())} of {len(ds)} rows that are "
            f'parts of partially recorded reflections (partials="full_only").',
            stacklevel=3,
        )
        return ds[~is_part].copy()
    return _sum_partials(ds, is_part, path, min_fraction)


# ----------------------------------------------------------------------------
# Public readers
# ----------------------------------------------------------------------------


def read_unmerged_mtz(
    path: PathLike,
    intensity: str | None = None,
    sigma: str | None = None,
    batch: str | None = None,
    partials: str = "auto",
    drop_bad_sigma: bool = False,
    min_fraction: float = 0.95,
) -> rs.DataSet:
    """Read an unmerged MTZ file into a new DataSet with canonical columns.

    Parameters
    ----------
    path : str or os.PathLike
        Unmerged MTZ file (one row per observation). It is only read.
    intensity, sigma, batch : str, optional
        Column names (configuration keys ``data.columns.intensity``,
        ``data.columns.sigma``, ``data.columns.batch``). When None the
        columns are found by MTZ type: intensity is the type ``J`` column,
        preferring ``I`` over the profile-fitted ``IPR`` because in DIALS
        output ``I`` is the intensity the integration program chose for each
        reflection (profile-fitted, summation, or their combination); sigma
        is the type ``Q`` column paired with it (``SIG`` + name, e.g. SIGI for
        I, SIGIPR for IPR); batch is the type ``B`` column.
    partials : {"auto", "sum", "full_only", "ignore"}
        What to do with unsummed parts of partially recorded reflections
        (rows flagged by ``PARTIAL``, or by a nonzero MOSFLM ``MPART``):

        * ``"auto"``/``"sum"``: sum the parts of each reflection (same
          observed H,K,L on a run of consecutive batches): I is the sum,
          SIGI the root sum of squares, BATCH the batch of the part with the
          largest FRACTIONCALC (the middle part on ties), FRACTIONCALC the sum,
          other numeric columns the mean. Sums with total FRACTIONCALC below
          ``min_fraction`` are dropped with a warning. Needs FRACTIONCALC.
        * ``"full_only"``: drop the parts (with a warning).
        * ``"ignore"``: keep all rows unchanged.

        Files with no flagged parts are unaffected by this option. This is
        the usual case: ``dials.export`` sums partials by default and writes
        ``PARTIAL`` (M/ISYM flag) and ``FRACTIONCALC`` per row; AIMLESS
        unmerged output is already summed (``PARTIAL`` all False) and records
        the number of parts in ``NPART``.
    drop_bad_sigma : bool
        If True, drop rows with NaN/inf intensity or NaN/inf/non-positive
        sigma with a warning; if False such rows raise MTZInputError.
    min_fraction : float
        Smallest total FRACTIONCALC a summed partial may have to be kept.

    Returns
    -------
    rs.DataSet
        Indexed by observed H, K, L, with ``I`` (Intensity), ``SIGI``
        (Stddev), ``BATCH`` (Batch) and the file's other columns under their
        own names (XDET, YDET, ROT, LP, FRACTIONCALC, PARTIAL, ...). A file
        column displaced by a renamed one (e.g. the file's ``I`` when
        ``intensity="IPR"``) is kept as ``I_FILE``. ``spacegroup``, ``cell``
        and ``merged=False`` are set.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    MTZInputError
        In this order: the file is not a readable MTZ; it looks merged; it
        lacks a space group or cell; a column cannot be found; intensities or
        sigmas are unusable (unless ``drop_bad_sigma``); partials cannot be
        summed.
    """
    if partials not in PARTIAL_MODES:
        raise ValueError(f"partials must be one of {PARTIAL_MODES}, got {partials!r}")
    p, mtz, cell = _open_checked(path, merged=False)
    i_col = _find_intensity(p, mtz, intensity)
    s_col = _find_sigma(p, mtz, sigma, i_col)
    b_col = _find_batch(p, mtz, batch)
    log.info("%s: intensity %s, sigma %s, image %s%s", p.name, i_col, s_col, b_col,
             "" if intensity else f" (chosen by MTZ type; {HYDRA_KEYS['intensity']}=NAME for another)")

    ds = _to_dataset(mtz, cell, p)
    if ds.merged:
        # rs calls a file merged when no index repeats; a Batch column says otherwise.
        m_isym = ds.get_m_isym_keys()
        ds.merged = False
        if len(m_isym) == 1:
            ds.hkl_to_observed(m_isym[0], inplace=True)
        elif m_isym:
            raise MTZInputError(
                f"{str(p)!r} has several M/ISYM columns {m_isym}; an unmerged file "
                f"needs exactly one to recover the observed indices."
            )
    ds = _rename_canonical(ds, {i_col: "I", s_col: "SIGI", b_col: "BATCH"})
    bad = _bad_value_mask(ds, p, drop_bad_sigma, i_col, s_col)
    if bad.any():
        warnings.warn(
            f"{str(p)!r}: dropped {int(bad.sum())} of {len(ds)} rows with NaN/inf "
            f"intensity ({i_col!r}) or NaN/inf/non-positive sigma ({s_col!r}) "
            f"(data.drop_bad_sigma=true).",
            stacklevel=2,
        )
        ds = ds[~bad].copy()
    ds = _apply_partials(ds, p, partials, min_fraction)
    ds.spacegroup, ds.cell, ds.merged = mtz.spacegroup, cell, False
    return ds


def _friedel_columns(
    path: pathlib.Path, mtz: gemmi.Mtz
) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Find ((I+, SIGI+), (I-, SIGI-)) among type K/M columns, or None."""
    types = _column_types(mtz)
    k_cols = _columns_of_type(types, "K")
    if not k_cols:
        return None

    def sign_of(label: str) -> str | None:
        low = label.lower()
        if low.endswith("(+)") or low.endswith("+") or "plus" in low:
            return "+"
        if low.endswith("(-)") or low.endswith("-") or "minus" in low:
            return "-"
        return None

    plus = [c for c in k_cols if sign_of(c) == "+"]
    minus = [c for c in k_cols if sign_of(c) == "-"]
    if len(plus) != 1 or len(minus) != 1:
        raise MTZInputError(
            f"{str(path)!r}: cannot tell the I(+) and I(-) columns apart among the "
            f"Friedel intensity (type K) columns {k_cols}; expected one named like "
            f"I(+)/Iplus and one like I(-)/Iminus. Available columns: "
            f"{_describe_columns(mtz)}"
        )
    pairs = []
    for col in (plus[0], minus[0]):
        sig = _paired_sigma(types, col, "M")
        if sig is None:
            raise MTZInputError(
                f"{str(path)!r}: no sigma (type M) column for Friedel intensity "
                f"{col!r}; expected SIG{col} or a type M column right after it. "
                f"Available columns: {_describe_columns(mtz)}"
            )
        pairs.append((col, sig))
    return pairs[0], pairs[1]


def _mean_intensity(path: pathlib.Path, mtz: gemmi.Mtz) -> tuple[str, str] | None:
    """Find (I, SIGI) among type J/Q columns, preferring IMEAN, or None."""
    types = _column_types(mtz)
    j_cols = _columns_of_type(types, "J")
    if not j_cols:
        return None
    chosen = next((c for c in ("IMEAN", "I") if c in j_cols), None)
    if chosen is None:
        if len(j_cols) > 1:
            raise MTZInputError(
                f"{str(path)!r} has several intensity (type J) columns {j_cols} and none "
                f"is named IMEAN or I. Available columns: {_describe_columns(mtz)}"
            )
        chosen = j_cols[0]
    sig = _paired_sigma(types, chosen, "Q")
    if sig is None:
        raise MTZInputError(
            f"{str(path)!r}: no sigma (type Q) column for intensity {chosen!r}; "
            f"expected SIG{chosen}. Available columns: {_describe_columns(mtz)}"
        )
    return chosen, sig


def _amplitude(mtz: gemmi.Mtz) -> tuple[str, str] | None:
    """(F, SIGF) among type F/Q columns when present, else None."""
    types = _column_types(mtz)
    f_cols = _columns_of_type(types, "F")
    chosen = next((c for c in ("F", "FP", "FMEAN") if c in f_cols), None)
    if chosen is None and len(f_cols) == 1:
        chosen = f_cols[0]
    if chosen is None:
        return None
    sig = _paired_sigma(types, chosen, "Q")
    return (chosen, sig) if sig is not None else None


def _measured(i: np.ndarray, sig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Set unmeasured entries to NaN.

    AIMLESS writes a missing Friedel mate as I=0 with sigma 0; a zero (or
    negative, or NaN) sigma never describes a real measurement.
    """
    missing = ~(np.isfinite(i) & np.isfinite(sig) & (sig > 0))
    return np.where(missing, np.nan, i), np.where(missing, np.nan, sig)


def _friedel_mean(
    ip: np.ndarray, sp: np.ndarray, im: np.ndarray, sm: np.ndarray, centric: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance mean of I(+) and I(-).

    Centric reflections have one measurement written into both columns
    (AIMLESS does this), so averaging would shrink the sigma by sqrt(2)
    for nothing: they take I(+) (or I(-) when I(+) is missing) as is.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        wp = np.where(np.isfinite(ip) & (sp > 0), 1.0 / sp**2, 0.0)
        wm = np.where(np.isfinite(im) & (sm > 0), 1.0 / sm**2, 0.0)
        wm = np.where(centric & (wp > 0), 0.0, wm)
        wsum = wp + wm
        mean = (wp * np.nan_to_num(ip) + wm * np.nan_to_num(im)) / wsum
        sig = 1.0 / np.sqrt(wsum)
    missing = wsum == 0
    return np.where(missing, np.nan, mean), np.where(missing, np.nan, sig)


def read_merged_mtz(path: PathLike, anomalous: bool = False) -> rs.DataSet:
    """Read a merged (reference) MTZ file into a DataSet with canonical columns.

    Parameters
    ----------
    path : str or os.PathLike
        Merged MTZ file (one row per unique reflection).
    anomalous : bool
        Also return ``I(+)``, ``SIGI(+)``, ``I(-)``, ``SIGI(-)``, taken from the
        Friedel intensity (type K) and sigma (type M) columns, e.g.
        I(+)/SIGI(+)/I(-)/SIGI(-) (AIMLESS) or Iplus/SIGIplus/Iminus/SIGIminus.

    Returns
    -------
    rs.DataSet
        Indexed by ASU H, K, L, ``merged=True``, with ``I``/``SIGI`` from
        IMEAN/SIGIMEAN, or I/SIGI, or, when the file only has Friedel columns,
        their inverse-variance mean (centrics: the single value); plus
        ``F``/``SIGF`` when the file has amplitudes. Other file columns are
        not returned. Intensities whose sigma is not positive are unmeasured
        (AIMLESS writes a missing Friedel mate as 0 with sigma 0) and become
        NaN; rows without any intensity (e.g. systematic absences written as
        missing) are dropped.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    MTZInputError
        If the file is not a readable MTZ, looks unmerged, lacks a space
        group or cell, or has no usable intensity columns.
    """
    p, mtz, cell = _open_checked(path, merged=True)
    mean_cols = _mean_intensity(p, mtz)
    # Friedel columns are only needed for anomalous output or to make I/SIGI.
    friedel = _friedel_columns(p, mtz) if anomalous or mean_cols is None else None
    if mean_cols is None and friedel is None:
        raise MTZInputError(
            f"{str(p)!r} has no intensity columns: expected IMEAN/SIGIMEAN or I/SIGI "
            f"(types J/Q) or I(+)/SIGI(+)/I(-)/SIGI(-) (types K/M). Available "
            f"columns: {_describe_columns(mtz)}"
        )
    if anomalous and friedel is None:
        raise MTZInputError(
            f"{str(p)!r} has no Friedel intensity columns (types K/M, e.g. "
            f"I(+)/SIGI(+)/I(-)/SIGI(-)) but anomalous=True. Available columns: "
            f"{_describe_columns(mtz)}"
        )
    src = _to_dataset(mtz, cell, p)
    src.merged = True
    hkls = src.get_hkls()
    asu_hkls, isym = hkl_to_asu(hkls, mtz.spacegroup)[:2]
    # Odd ISYM = Friedel-plus operator; even = the index was inverted, so
    # I(+) and I(-) swap roles.
    flipped = (np.asarray(isym) % 2) == 0
    out = rs.DataSet(
        {"H": asu_hkls[:, 0], "K": asu_hkls[:, 1], "L": asu_hkls[:, 2]},
        spacegroup=mtz.spacegroup,
        cell=cell,
        merged=True,
    )
    for c in ("H", "K", "L"):
        out[c] = out[c].astype("HKL")
    out = out.set_index(["H", "K", "L"])
    out.wavelength = src.wavelength
    centric = out.label_centrics()["CENTRIC"].to_numpy()

    def values(col: str) -> np.ndarray:
        return src[col].to_numpy(dtype=float, na_value=np.nan)

    if friedel is not None:
        (ip_c, sp_c), (im_c, sm_c) = friedel
        ip, sp = _measured(values(ip_c), values(sp_c))
        im, sm = _measured(values(im_c), values(sm_c))
        ip, im = np.where(flipped, im, ip), np.where(flipped, ip, im)
        sp, sm = np.where(flipped, sm, sp), np.where(flipped, sp, sm)
    if mean_cols is not None:
        i_mean, s_mean = _measured(values(mean_cols[0]), values(mean_cols[1]))
    else:
        i_mean, s_mean = _friedel_mean(ip, sp, im, sm, centric)
    out["I"] = rs.DataSeries(i_mean, index=out.index, dtype="Intensity")
    out["SIGI"] = rs.DataSeries(s_mean, index=out.index, dtype="Stddev")
    if anomalous:
        out["I(+)"] = rs.DataSeries(ip, index=out.index, dtype="FriedelIntensity")
        out["SIGI(+)"] = rs.DataSeries(sp, index=out.index, dtype="StddevFriedelI")
        out["I(-)"] = rs.DataSeries(im, index=out.index, dtype="FriedelIntensity")
        out["SIGI(-)"] = rs.DataSeries(sm, index=out.index, dtype="StddevFriedelI")
    amp = _amplitude(mtz)
    if amp is not None:
        out["F"] = rs.DataSeries(values(amp[0]), index=out.index, dtype="SFAmplitude")
        out["SIGF"] = rs.DataSeries(values(amp[1]), index=out.index, dtype="Stddev")
    keep = np.isfinite(out["I"].to_numpy(dtype=float, na_value=np.nan))
    if anomalous:
        for c in ("I(+)", "I(-)"):
            keep |= np.isfinite(out[c].to_numpy(dtype=float, na_value=np.nan))
    out = out[keep]
    out.spacegroup, out.cell, out.merged = mtz.spacegroup, cell, True
    return out


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    """True if ``a`` and ``b`` name the same file (after resolving links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _writable_copy(ds: rs.DataSet) -> rs.DataSet:
    """Copy with MTZ dtypes; rs maps unmerged data to the ASU in place while writing."""
    out = ds.copy()
    needs_dtype = [
        c
        for c in out.columns
        if not isinstance(out[c].dtype, rs.dtypes.base.MTZDtype)
        and not (out[c].dtype == bool and c in ("PARTIAL", "CENTRIC"))
    ]
    for c in needs_dtype:
        out[c] = out[c].infer_mtz_dtype()
    return out


MTZ_HISTORY_WIDTH = 80  # the MTZ format's history records are 80 characters each, at most 30 of them


def mtz_writer(ds: rs.DataSet, history: Sequence[str] = ()):
    """``write(path)`` for ``ds`` as an MTZ file (a copy with MTZ dtypes is taken now; ``ds`` is not modified).

    ``history`` lines (program, version, command) go into the file's history records, wrapped to 80 characters;
    rs has no history argument, so the file is written through its gemmi object (``DataSet.to_gemmi``).
    """
    data = _writable_copy(ds)
    records = [line[i:i + MTZ_HISTORY_WIDTH] for line in history for i in range(0, max(len(line), 1),
                                                                                  MTZ_HISTORY_WIDTH)][:30]
    if not records:
        return lambda path: data.write_mtz(str(path))

    def write(path) -> None:
        mtz = data.to_gemmi()
        mtz.history = records
        mtz.write_to_file(str(path))

    return write


def history_lines(action: str) -> list[str]:
    """MTZ history for a file physppl writes: program, version, date, and the command line that ran it."""
    import datetime
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("physppl")
    except PackageNotFoundError:  # running from a source tree that is not installed
        ver = "unknown"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from_cli = bool(sys.argv) and os.path.basename(sys.argv[0]) in ("physppl", "cli.py")  # entry point, -m
    command = "physppl " + " ".join(sys.argv[1:]) if from_cli else f"physppl.{action}(...) from Python"
    return [f"From physppl {ver}, {action}, {when}", f"command: {command}"]


def check_free_r_file(path: PathLike) -> tuple[pathlib.Path, rs.DataSet, str]:
    """(path, its data, the name of its free-R column); a clear error when the file or the column is missing."""
    path = _existing_file(path)
    other = rs.read_mtz(str(path))
    key = next((k for k in ("R-free-flags", "FreeR_flag") if k in other.columns), None)
    if key is None:
        raise MTZInputError(f"{path}: no free-R column (R-free-flags or FreeR_flag) to copy; its columns: "
                            f"{', '.join(other.columns)}")
    return path, other, key


def add_free_r(ds: rs.DataSet, free_r: float | PathLike, seed: int = 0) -> rs.DataSet:
    """``ds`` with free-R flags: a user's, copied by Miller index from the MTZ file ``free_r`` (its
    ``R-free-flags`` or ``FreeR_flag`` column), or new ones for a fraction ``free_r`` of the reflections (Phenix
    convention, 1 = test set, column ``R-free-flags``; ``rs.utils.add_rfree``)."""
    if isinstance(free_r, (int, float)) and not isinstance(free_r, bool):
        if not 0.0 < float(free_r) < 1.0:
            raise ValueError(f"free_r must be a fraction in (0, 1) or an MTZ file with free-R flags, got {free_r}")
        return rs.utils.add_rfree(ds, fraction=float(free_r), seed=int(seed))
    path, other, key = check_free_r_file(free_r)
    out = rs.utils.copy_rfree(ds, other, rfree_key=key)
    missing = int(out[key].isna().sum())
    if missing:
        raise MTZInputError(f"{path}: {missing} of {len(out)} merged reflections have no {key} there; give flags "
                            "that cover the merged data, or free_r=<fraction> for new ones")
    return out


def write_mtz_atomic(
    ds: rs.DataSet, path: PathLike, protect: Iterable[PathLike] = ()
) -> pathlib.Path:
    """Write ``ds`` to ``path`` as an MTZ file, atomically.

    The data go to a temporary file in the destination directory, which is
    then moved over ``path`` with :func:`os.replace`, so an interrupted write
    never leaves a truncated file behind. ``ds`` itself is not modified.

    Parameters
    ----------
    ds : rs.DataSet
        Data with space group and cell set.
    path : str or os.PathLike
        Destination file; its directory must exist.
    protect : iterable of str or os.PathLike
        Files that must never be overwritten (e.g. the input files); writing
        onto any of them, also through a symbolic link, raises.

    Returns
    -------
    pathlib.Path
        Absolute path of the written file.

    Raises
    ------
    MTZInputError
        If ``path`` is one of the ``protect`` paths or is a directory.
    FileNotFoundError
        If the destination directory does not exist.
    """
    target = pathlib.Path(path).expanduser().absolute()
    for guarded in protect:
        if _same_file(target, pathlib.Path(guarded).expanduser()):
            raise MTZInputError(
                f"refusing to write {str(target)!r}: it is the input file "
                f"{str(guarded)!r}, which must not be overwritten; choose another "
                f"output path."
            )
    if target.is_dir():
        raise MTZInputError(f"cannot write MTZ to {str(target)!r}: it is a directory")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write MTZ to {str(target)!r}: directory {str(target.parent)!r} does not exist"
        )
    data = _writable_copy(ds)
    atomic_write(target, lambda tmp: data.write_mtz(str(tmp)))
    return target
