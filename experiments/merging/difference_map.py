"""Isomorphous difference maps between two merged data sets: weighted differences, model phases, peaks.

``physppl.difference_map(merged, phases=...)`` takes the two data sets of one merge (a run directory or a
:class:`~physppl.merging.api.MergeResult` with ``data.paths``) or two merged MTZ files, computes
``dF = F_on - F_off`` with its posterior (draws when both came from one model, so a correlated posterior keeps its
correlation), weights it (q-weighting, Ursby & Bourgeois 1997 in the form of Ren et al. 2001), puts the phases of a
model of the "off" state on it (structure factors by gemmi), and writes the map's coefficients (``difference.mtz``:
``DF``, ``SIGDF``, ``WDF``, ``PHIC``, ready for Coot), the peak list (``peaks.csv``, gemmi's flood-fill blob
search, heights in map sd) and the histogram of the map.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gemmi
import numpy as np
import pandas as pd
import reciprocalspaceship as rs

from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.io.mtz import MTZInputError, history_lines, mtz_writer

__all__ = ["difference_map", "DifferenceMapResult", "model_structure_factors", "q_weights", "find_peaks",
           "site_peak", "task", "WEIGHTINGS"]

log = logging.getLogger(__name__)

WEIGHTINGS = ("q", "none")
OUTPUT_FILES = ("difference.mtz", "peaks.csv", "posterior.nc", "summary.csv", "metrics.json")


@dataclass(repr=False)
class DifferenceMapResult(Result):
    """:class:`~physppl.inference.runner.Result` of a difference map, with ``coefficients`` (what
    ``difference.mtz`` holds, by ASU H, K, L), ``peaks`` (the peak list) and ``grid`` (the map, in map sd)."""

    coefficients: Any = None
    peaks: pd.DataFrame | None = None
    grid: Any = None


def model_structure_factors(model: str | os.PathLike | gemmi.Structure, hkl: np.ndarray) -> np.ndarray:
    """Complex structure factors of an atomic model (a PDB / mmCIF file or a read gemmi Structure) at ``hkl``
    (n, 3), by gemmi (X-ray form factors, the model's B-factors and occupancies, no bulk solvent)."""
    if isinstance(model, gemmi.Structure):
        st = model
    else:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"phases: model file {path} not found")
        st = gemmi.read_structure(str(path))
        st.setup_entities()
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise MTZInputError(f"{model}: no atoms in the model")
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    # gemmi's calculator takes one index per call (its FFT route would need the blur undone); ~0.4 ms each
    return np.array([calc.calculate_sf_from_model(st[0], [int(h), int(k), int(l)]) for h, k, l in hkl])


def q_weights(df: np.ndarray, sigdf: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Ursby-Bourgeois / Ren q-weights ``1 / (1 + sigdf^2/<sigdf^2> + alpha dF^2/<dF^2>)``, scaled to mean 1."""
    w = 1.0 / (1.0 + sigdf**2 / np.mean(sigdf**2) + alpha * df**2 / np.mean(df**2))
    return w / w.mean()


def _scale_to(reference: np.ndarray, other: np.ndarray, dhkl: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Per-reflection factor putting ``other`` on ``reference``'s scale: ratio of mean amplitudes in resolution
    shells, interpolated in 1/d^2 (the usual scaling of one data set to another before differences)."""
    s2 = 1.0 / dhkl**2
    edges = np.quantile(s2, np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges, s2, side="right") - 1, 0, n_bins - 1)
    centers = np.array([s2[which == b].mean() for b in range(n_bins)])
    ratio = np.array([reference[which == b].sum() / max(other[which == b].sum(), 1e-12) for b in range(n_bins)])
    return np.interp(s2, centers, ratio)


def find_peaks(grid: gemmi.FloatGrid, cutoff: float, structure: gemmi.Structure | None = None,
               min_volume: float = 0.2) -> pd.DataFrame:
    """Positive and negative peaks of a map in sd units above ``cutoff`` (gemmi's flood fill), strongest first,
    each with the nearest atom of ``structure`` and its distance, and whether it sits on a special position."""
    rows = []
    for sign in (1, -1):
        g = grid.clone()
        if sign < 0:
            arr = np.array(g, copy=False)
            arr *= -1
        for blob in gemmi.find_blobs_by_flood_fill(g, cutoff=cutoff, min_volume=min_volume, min_score=0,
                                                     min_peak=cutoff):
            p = blob.peak_pos
            # on a symmetry axis a map's noise adds up with its images: such peaks are flagged, not hidden
            special = int(grid.unit_cell.is_special_position(p)) if grid.spacegroup else 0
            rows.append({"height": sign * blob.peak_value, "x": p.x, "y": p.y, "z": p.z, "volume": blob.volume,
                         "special_position": special > 0})
    peaks = pd.DataFrame(rows, columns=["height", "x", "y", "z", "volume", "special_position"])
    peaks = peaks.reindex(peaks["height"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    peaks.insert(0, "rank", np.arange(1, len(peaks) + 1))
    if structure is not None and len(peaks):
        ns = gemmi.NeighborSearch(structure[0], structure.cell, 6).populate()
        near = []
        for x, y, z in peaks[["x", "y", "z"]].to_numpy():
            pos = gemmi.Position(x, y, z)
            marks = ns.find_atoms(pos, "\0", radius=6.0)
            best = None
            for m in marks:
                cra = m.to_cra(structure[0])
                d = structure.cell.find_nearest_image(cra.atom.pos, pos, gemmi.Asu.Any).dist()
                if best is None or d < best[0]:
                    best = (d, cra)
            if best is None:
                near.append(("", "", "", "", np.nan))
            else:
                d, cra = best
                near.append((cra.chain.name, cra.residue.name, str(cra.residue.seqid.num), cra.atom.name, d))
        peaks[["chain", "residue", "seq", "atom", "distance"]] = pd.DataFrame(near, index=peaks.index)
    return peaks


def site_peak(grid: gemmi.FloatGrid, structure: gemmi.Structure, residue: str, radius: float = 2.0,
              step: float = 0.25) -> float:
    """The largest |map value| (signed) within ``radius`` A of any atom of residue(s) named ``residue``."""
    atoms = [a.pos for ch in structure[0] for r in ch if r.name == residue for a in r]
    if not atoms:
        raise ValueError(f"no residue named {residue!r} in the model")
    ax = np.arange(-radius, radius + step / 2, step)
    offsets = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    offsets = offsets[np.linalg.norm(offsets, axis=1) <= radius]
    best = 0.0
    for a in atoms:
        for dx, dy, dz in offsets:
            v = grid.interpolate_value(gemmi.Position(a.x + dx, a.y + dy, a.z + dz))
            if abs(v) > abs(best):
                best = v
    return float(best)


def _far_from(peaks: pd.DataFrame, structure: gemmi.Structure, residue: str, radius: float) -> np.ndarray:
    """Peaks further than ``radius`` from every atom of ``residue`` (symmetry included)."""
    atoms = [a.pos for ch in structure[0] for r in ch if r.name == residue for a in r]
    far = np.ones(len(peaks), bool)
    for i, (x, y, z) in enumerate(peaks[["x", "y", "z"]].to_numpy()):
        pos = gemmi.Position(x, y, z)
        far[i] = all(structure.cell.find_nearest_image(a, pos, gemmi.Asu.Any).dist() > radius for a in atoms)
    return far


def _load_pair(merged, names: Sequence[str] | None, columns: tuple[str, str]):
    """(off, on) amplitude tables indexed by ASU H, K, L (F, SIGF), their names, and difference draws if any."""
    from .api import MergeResult  # the merge module only when its results are given

    f, sigf = columns
    if isinstance(merged, MergeResult) or (isinstance(merged, (str, os.PathLike)) and Path(merged).is_dir()):
        if isinstance(merged, MergeResult):
            table, idata = merged.table, merged.idata
            set_names = merged.data.dataset_names
            if table is None or "dataset" not in table.columns:
                raise ValueError("difference_map: the merge has one data set; merge two with data.paths=[off, on]")
            frames = {n: table[(table["dataset"] == k) & (table["friedel"] == 0)].set_index(["H", "K", "L"])
                      for k, n in enumerate(set_names)}
        else:
            run = Path(merged)
            files = sorted(run.glob("merged_*.mtz"))
            if len(files) < 2:
                raise FileNotFoundError(f"difference_map: {run} holds fewer than two merged_<name>.mtz files; give a "
                                        "run of a merge of several data sets, or two MTZ files")
            frames = {p.stem[len("merged_"):]: rs.read_mtz(str(p)) for p in files}
            set_names = list(frames)
            idata = None
            nc = run / "posterior.nc"
            if nc.exists():
                import arviz as az

                idata = az.from_netcdf(str(nc))
        pick = list(names) if names else list(set_names[:2])
        missing = [n for n in pick if n not in frames]
        if len(pick) != 2 or missing:
            raise ValueError(f"difference_map: choose two of the data sets {list(frames)} as merged=[off, on]; "
                             f"got {pick}")
        draws = _difference_draws(idata, pick) if idata is not None else None
        return frames[pick[0]], frames[pick[1]], pick, draws
    paths = list(merged)
    if len(paths) != 2:
        raise ValueError(f"difference_map: give two merged MTZ files (off, on), got {len(paths)}")
    frames = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"difference_map: {p} not found")
        ds = rs.read_mtz(str(p))
        for c in (f, sigf):
            if c not in ds.columns:
                raise MTZInputError(f"{p}: no column {c!r}; columns: {list(ds.columns)}. Set columns=[F, SIGF].")
        frames.append(ds.hkl_to_asu() if not ds.merged else ds)
    return frames[0], frames[1], [Path(p).stem for p in paths], None


def _difference_draws(idata, pick: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Posterior draws of F_off and F_on per ASU reflection (columns: draws), from one model's joint posterior."""
    post = getattr(idata, "posterior", None)
    if post is None or "F" not in post or "dataset" not in post["F"].coords:
        return None
    F = post["F"].stack(sample=("chain", "draw")).transpose("refl", "sample")
    coords = F.coords
    key = pd.MultiIndex.from_arrays([coords["H"].values, coords["K"].values, coords["L"].values],
                                    names=["H", "K", "L"])
    values = F.values
    dset = coords["dataset"].values.astype(str)
    centric_or_mean = coords["friedel"].values == 0
    out = []
    for name in pick:
        sel = (dset == name) & centric_or_mean
        out.append(pd.DataFrame(values[sel], index=key[sel]))
    joined_index = out[0].index.intersection(out[1].index)
    return out[0].loc[joined_index], out[1].loc[joined_index]


def difference_map(
    merged: Any = None,
    *,
    phases: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    columns: Sequence[str] = ("F", "SIGF"),
    weighting: str = "q",
    alpha: float = 0.05,
    dmin: float | None = None,
    dmax: float | None = None,
    compare_model: str | os.PathLike | None = None,
    site: str | None = None,
    site_radius: float = 2.0,
    peak_cutoff: float = 3.0,
    sample_rate: float = 3.0,
    scale: bool = True,
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
) -> DifferenceMapResult:
    """The isomorphous difference map ``F_on - F_off`` with the phases of a model of the off state.

    Parameters
    ----------
    merged : run directory, MergeResult, or [off.mtz, on.mtz]
        Two data sets: a merge of several files (their names pick the pair with ``names``; default the first two),
        or two merged MTZ files with ``columns`` (amplitude, sd).
    phases : path
        Atomic model (PDB/mmCIF) of the off state: its structure factors give the phases.
    names : [off, on], optional
        The data sets to difference, by name (a merge's file stems).
    weighting : {"q", "none"}
        q-weighting with ``alpha`` (:func:`q_weights`), or unweighted differences.
    dmin, dmax : float, optional
        Resolution range in A (default: all common reflections).
    compare_model : path, optional
        Model of the on state: the CC of dF with ``|Fc_on| - |Fc_off|`` is reported.
    site, site_radius : str, float
        A residue name (e.g. a chromophore, ``HC4``): the map's strongest value within ``site_radius`` of it, its
        rank among the map's peaks and the strongest peak elsewhere are reported.
    peak_cutoff : float
        Peaks listed down to this many map sd (both signs).
    sample_rate : float
        Map grid spacing is ``dmin / sample_rate``.
    scale : bool
        Put F_on on F_off's scale by resolution shell before differencing (harmless after a joint merge).
    """
    if merged is None:
        raise ValueError("difference_map: give merged= (a merge run directory, or [off.mtz, on.mtz])")
    if phases is None:
        raise ValueError("difference_map: give phases= (an atomic model of the off state, PDB or mmCIF)")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"difference_map: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if len(columns) != 2:
        raise ValueError(f"difference_map: columns must be [amplitude, sd], got {list(columns)}")
    phases = os.path.abspath(os.path.expanduser(str(phases)))
    if isinstance(merged, (str, os.PathLike)):
        merged = os.path.abspath(os.path.expanduser(str(merged)))
    elif isinstance(merged, (list, tuple)):
        merged = [os.path.abspath(os.path.expanduser(str(p))) for p in merged]
    if not os.path.isfile(phases):
        raise FileNotFoundError(f"difference_map: phases model {phases} not found")
    if isinstance(merged, str) and Path(merged).is_dir():  # the merge's own files are inputs: never overwritten
        inputs = [phases, compare_model, *map(str, Path(merged).iterdir())]
    elif isinstance(merged, list):
        inputs = [phases, compare_model, *merged]
    else:
        inputs = [phases, compare_model]
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    with Job("difference_map", settings, inputs=inputs, workdir=workdir, outputs=OUTPUT_FILES) as job:
        off, on, pick, draws = _load_pair(merged, names, tuple(columns))
        f, sigf = columns
        joined = off[[f, sigf]].astype(float).join(on[[f, sigf]].astype(float), lsuffix="_off", rsuffix="_on",
                                                   how="inner").dropna()
        structure = gemmi.read_structure(phases)
        structure.setup_entities()
        cell, sg = structure.cell, gemmi.SpaceGroup(structure.spacegroup_hm)
        hkl = joined.index.to_frame().to_numpy()
        d = np.array([cell.calculate_d(list(map(int, h))) for h in hkl])
        keep = np.ones(len(d), bool)
        if dmin is not None:
            keep &= d >= dmin
        if dmax is not None:
            keep &= d <= dmax
        joined, hkl, d = joined[keep], hkl[keep], d[keep]
        if len(joined) < 100:
            raise ValueError(f"difference_map: only {len(joined)} reflections common to {pick[0]} and {pick[1]}")
        f_off, s_off = joined[f"{f}_off"].to_numpy(), joined[f"{sigf}_off"].to_numpy()
        f_on, s_on = joined[f"{f}_on"].to_numpy(), joined[f"{sigf}_on"].to_numpy()
        k = _scale_to(f_off, f_on, d) if scale else np.ones_like(f_on)
        df = k * f_on - f_off
        diff_draws = None
        if draws is not None and set(joined.index) <= set(draws[0].index):
            diff_draws = k[:, None] * draws[1].loc[joined.index].to_numpy() - draws[0].loc[joined.index].to_numpy()
            sigdf = diff_draws.std(axis=1)
            sd_source = "posterior draws of one model"
        else:
            sigdf = np.sqrt((k * s_on) ** 2 + s_off**2)
            sd_source = "sds in quadrature"
        w = q_weights(df, sigdf, alpha) if weighting == "q" else np.ones_like(df)
        fc = model_structure_factors(structure, hkl)  # the model read once for phases, peaks and the site
        phi = np.angle(fc, deg=True)
        coef = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "DF": df, "SIGDF": sigdf, "W": w,
                           "WDF": w * df, "PHIC": phi, "FC": np.abs(fc)},
                          spacegroup=sg, cell=cell, merged=True)
        coef = coef.astype({"H": "HKL", "K": "HKL", "L": "HKL", "DF": "SFAmplitude", "SIGDF": "Stddev", "W": "Weight",
                            "WDF": "SFAmplitude", "PHIC": "Phase", "FC": "SFAmplitude"}).set_index(["H", "K", "L"])
        mtz = coef.to_gemmi()
        grid = mtz.transform_f_phi_to_map("WDF", "PHIC", sample_rate=sample_rate)
        arr = np.array(grid, copy=False)
        rms = float(arr.std())
        arr /= rms  # the map in sd units
        peaks = find_peaks(grid, peak_cutoff, structure)
        metrics: dict = {"off": pick[0], "on": pick[1], "n_reflections": int(len(joined)), "d_min": float(d.min()),
                         "d_max": float(d.max()), "weighting": weighting, "sigdf_from": sd_source,
                         "map_rms": rms, "n_peaks": int(len(peaks)),
                         "cc_F_off_Fc": float(np.corrcoef(f_off, np.abs(fc))[0, 1]),
                         "top_peak_sigma": float(peaks["height"].iloc[0]) if len(peaks) else None}
        if compare_model is not None:
            fc_on = np.abs(model_structure_factors(compare_model, hkl))
            # the two models' overall scale and B differ (refined apart): scale as the data were
            dfc = _scale_to(np.abs(fc), fc_on, d) * fc_on - np.abs(fc)
            metrics["cc_dF_dFc"] = float(np.corrcoef(df, dfc)[0, 1])
            metrics["cc_wdF_dFc"] = float(np.corrcoef(w * df, dfc)[0, 1])
        if site is not None:
            value = site_peak(grid, structure, site, site_radius)
            far = _far_from(peaks, structure, site, site_radius) if len(peaks) else np.zeros(0, bool)
            elsewhere = peaks["height"][far].abs()
            general = peaks["height"][far & ~peaks["special_position"].to_numpy(bool)].abs()
            metrics.update({"site": site, "site_peak_sigma": abs(value), "site_peak_sign": int(np.sign(value)),
                            "site_rank": int(1 + (elsewhere > abs(value)).sum()),
                            "site_rank_general": int(1 + (general > abs(value)).sum()),
                            "max_elsewhere_sigma": float(elsewhere.max()) if len(elsewhere) else 0.0,
                            "max_elsewhere_general_sigma": float(general.max()) if len(general) else 0.0})
            if metrics["site_rank"] > 1:
                log.info("the strongest feature at %s (%.2f sd) ranks %d among the map's peaks", site, abs(value),
                         metrics["site_rank"])
        idata = _difference_idata(joined.index, df, sigdf, diff_draws)

        def figures(out: Path) -> None:
            from .plots import plot_difference_histogram

            mark = (site, metrics["site_peak_sign"] * metrics["site_peak_sigma"]) if site is not None else None
            plot_difference_histogram(arr.ravel(), peaks, out / "difference_histogram.png", site=mark)

        files = {"difference.mtz": mtz_writer(coef, history=history_lines(f"difference map {pick[1]} - {pick[0]}")),
                 "peaks.csv": lambda p, t=peaks: t.to_csv(p, index=False)}
        return job.result(DifferenceMapResult, idata=idata, metrics=metrics, files=files, figures=figures,
                          coefficients=coef, peaks=peaks, grid=grid)


def _difference_idata(index: pd.MultiIndex, df, sigdf, diff_draws):
    """``posterior.nc``: dF per reflection (draws of one model, or a Normal with the quadrature sd)."""
    import arviz as az

    names = np.array([f"{h} {kk} {l}" for h, kk, l in index])
    if diff_draws is not None:
        values = diff_draws.T[None]
    else:
        rng = np.random.default_rng(0)
        values = (df[:, None] + sigdf[:, None] * rng.standard_normal((len(df), 200))).T[None]
    return az.from_dict(posterior={"dF": values}, coords={"refl": names}, dims={"dF": ["refl"]},
                        attrs={"units": "dF in the merged files' amplitude units"})


def task(cfg, workdir) -> DifferenceMapResult:
    """The command line's difference-map job: :func:`difference_map` with the configuration's values."""
    from omegaconf import OmegaConf

    merged = cfg.merged
    if OmegaConf.is_list(merged):
        merged = [str(p) for p in merged]
    return difference_map(merged, workdir=workdir, **config_options(cfg, difference_map, exclude=("merged",)))
