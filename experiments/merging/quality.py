"""Figures of merit for a merge: CC1/2 and CCanom between half-datasets, CC to a reference, truth checks."""
from __future__ import annotations

import numpy as np
import pandas as pd

from physppl.models.components.wilson import resolution_shells

__all__ = ["pearson", "resolution_bins", "cc_by_resolution", "merged_table", "half_dataset_cc",
           "anomalous_differences", "reference_cc", "true_amplitudes", "align_truth", "truth_metrics"]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def resolution_bins(dhkl: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Equal-count shells in 1/d^2: (bin index per row, edges in A from low to high resolution)."""
    which, edges = resolution_shells(dhkl, n_bins)
    return which, 1.0 / np.sqrt(edges)


def cc_by_resolution(x: np.ndarray, y: np.ndarray, dhkl: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    which, edges = resolution_bins(dhkl, n_bins)
    rows = [{"d_max": edges[b], "d_min": edges[b + 1], "n": int((which == b).sum()),
             "cc": pearson(x[which == b], y[which == b])} for b in range(n_bins)]
    return pd.DataFrame(rows)


def merged_table(data, moments: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per model reflection in the data's original units: H, K, L, friedel, half, dHKL, F..N."""
    f = np.sqrt(data.norm)
    table = pd.DataFrame({
        "H": data.hkl[:, 0], "K": data.hkl[:, 1], "L": data.hkl[:, 2], "friedel": data.friedel,
        "half": data.half if data.half is not None else 0, "dHKL": data.dhkl,
        "centric": data.centric.numpy(),
        "F": moments["F_mean"] * f, "SIGF": moments["F_sd"] * f,
        "I": moments["I_mean"] * data.norm, "SIGI": moments["I_sd"] * data.norm,
        "N": data.n_per_refl(),
    })
    if data.dataset is not None:
        table["dataset"] = data.dataset
    return table


def anomalous_differences(table: pd.DataFrame, value: str = "I", by: str | None = None) -> pd.DataFrame:
    """value(+) - value(-) per acentric reflection with both mates (optionally per ``by`` group, e.g. half)."""
    idx = ["H", "K", "L"] + ([by] if by else [])
    acentric = table[table["friedel"] != 0]
    wide = acentric.pivot_table(index=idx, columns="friedel", values=[value, "dHKL"], aggfunc="first").dropna()
    if wide.empty:
        return pd.DataFrame(columns=["dano", "dHKL"])
    out = pd.DataFrame({"dano": wide[(value, 1)] - wide[(value, -1)], "dHKL": wide[("dHKL", 1)]})
    return out


def half_dataset_cc(halves: pd.DataFrame, n_bins: int = 10) -> tuple[dict, pd.DataFrame]:
    """CC1/2 of intensities (overall and per shell) and, with Friedel mates separate, CCanom between halves."""
    index = ["H", "K", "L", "friedel"] + (["dataset"] if "dataset" in halves.columns else [])
    wide = halves.pivot_table(index=index, columns="half", values=["I", "dHKL"], aggfunc="first")
    wide = wide.dropna()
    if len(wide) < 3 * n_bins:  # too few reflections in both halves for shells (e.g. a data set of two images)
        return {"cc_half": float("nan"), "n_cc_half": int(len(wide))}, pd.DataFrame(
            {"d_max": [np.nan], "d_min": [np.nan], "n": [len(wide)], "cc_half": [np.nan]})
    i1, i2, d = wide[("I", 0)].to_numpy(), wide[("I", 1)].to_numpy(), wide[("dHKL", 0)].to_numpy()
    shells = cc_by_resolution(i1, i2, d, n_bins).rename(columns={"cc": "cc_half"})
    out = {"cc_half": pearson(i1, i2), "n_cc_half": int(len(i1))}
    if (halves["friedel"] != 0).any():
        dano = anomalous_differences(halves, "I", by="half").reset_index()
        wide_a = dano.pivot_table(index=["H", "K", "L"], columns="half", values=["dano", "dHKL"]).dropna()
        if len(wide_a) >= 3:
            a1, a2 = wide_a[("dano", 0)].to_numpy(), wide_a[("dano", 1)].to_numpy()
            out["cc_anom_half"] = pearson(a1, a2)
            out["n_cc_anom_half"] = int(len(a1))
            shells["cc_anom_half"] = cc_by_resolution(a1, a2, wide_a[("dHKL", 0)].to_numpy(), n_bins)["cc"]
    return out, shells


def reference_cc(merged, reference) -> dict:
    """CC of mean intensities with a reference merge, and of anomalous differences when both have them.

    ``merged`` and ``reference`` are rs.DataSets indexed by ASU H, K, L with I (and I(+), I(-)).
    """
    joined = merged[["I"]].join(reference[["I"]], rsuffix="_ref", how="inner")
    out = {"cc_ref": pearson(joined["I"].to_numpy(float), joined["I_ref"].to_numpy(float)), "n_ref": int(len(joined))}
    if {"I(+)", "I(-)"} <= set(merged.columns) and {"I(+)", "I(-)"} <= set(reference.columns):
        a = (merged["I(+)"] - merged["I(-)"]).rename("d")
        b = (reference["I(+)"] - reference["I(-)"]).rename("d_ref")
        j = pd.concat([a, b], axis=1, join="inner").astype(float).dropna()
        out["cc_anom_ref"] = pearson(j["d"].to_numpy(), j["d_ref"].to_numpy())
        out["n_anom_ref"] = int(len(j))
    return out


def true_amplitudes(truth, hkl: np.ndarray, friedel: np.ndarray, dataset: np.ndarray | None = None) -> np.ndarray:
    """True F of each model reflection from a simulator's truth table: F(+) / F(-) for Friedel-separate rows,
    the Friedel mean F otherwise (with several data sets, data set k's ``F_k`` where the truth has it); NaN where
    truth has no such reflection."""
    t = truth.reset_index().set_index(["H", "K", "L"])
    keys = pd.MultiIndex.from_arrays([hkl[:, 0], hkl[:, 1], hkl[:, 2]], names=["H", "K", "L"])
    out = np.full(len(friedel), np.nan)
    sets = np.zeros(len(friedel), int) if dataset is None else np.asarray(dataset)
    for k in np.unique(sets):
        suffix = f"_{k}" if f"F_{k}" in t.columns else ""
        for sign, column in ((0, "F"), (1, "F(+)"), (-1, "F(-)")):
            sel = (np.asarray(friedel) == sign) & (sets == k)
            if sel.any() and column + suffix in t.columns:
                out[sel] = t[column + suffix].astype(float).reindex(keys[sel]).to_numpy()
    return out


def align_truth(f_est: np.ndarray, f_true: np.ndarray, dhkl: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Put true amplitudes on a merge's scale: one factor per resolution shell, interpolated in 1/d^2.

    The overall scale of a merge and its variation with resolution are not identifiable from unmerged data
    (``k(d) F^2`` is invariant to ``k -> c(d) k, F -> F / sqrt(c(d))``; only the Wilson prior weakly pins
    ``c``), so comparing with truth needs this smooth factor; each shell's factor is the median log ratio of
    its stronger half of reflections, so it is robust and ~1% precise with ~100 reflections per shell.
    """
    s2 = 1.0 / np.square(dhkl)
    which, _ = resolution_bins(dhkl, n_bins)
    centers, logs = [], []
    for b in range(n_bins):
        sel = (which == b) & (f_est > 0) & (f_true > 0)
        strong = sel & (f_true >= np.median(f_true[sel])) if sel.any() else sel
        if strong.sum() >= 5:
            centers.append(s2[which == b].mean())
            logs.append(np.median(np.log(f_est[strong] / f_true[strong])))
    if not centers:
        return f_true
    return f_true * np.exp(np.interp(s2, centers, logs))


def truth_metrics(f_est: np.ndarray, lower: np.ndarray, upper: np.ndarray, f_true: np.ndarray, dhkl: np.ndarray) -> dict:
    """CC to the true amplitudes, and coverage of the intervals after aligning truth by :func:`align_truth`."""
    ok = np.isfinite(f_est) & np.isfinite(f_true) & (f_true > 0)
    f_est, lower, upper, f_true, dhkl = (a[ok] for a in (f_est, lower, upper, f_true, dhkl))
    aligned = align_truth(f_est, f_true, dhkl)
    inside = (aligned >= lower) & (aligned <= upper)
    return {"cc_truth": pearson(f_est, f_true), "coverage90": float(inside.mean()), "n_truth": int(ok.sum())}
