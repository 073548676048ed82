"""Plots a crystallographer looks at after a merge; each saved as PNG in the run directory."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from physppl.inference.plots import save_figure  # noqa: E402

__all__ = ["plot_cc_shells", "plot_scales", "plot_wilson", "plot_comparison"]


def plot_cc_shells(shells: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = 1.0 / np.square(0.5 * (shells["d_max"] + shells["d_min"]))
    ax.plot(x, shells["cc_half"], "o-", label="CC1/2")
    for column in (c for c in shells.columns if c.startswith("cc_half_")):  # each data set of a joint merge
        ax.plot(x, shells[column], ".--", label=f"CC1/2 {column[len('cc_half_'):]}")
    if "cc_anom_half" in shells:
        ax.plot(x, shells["cc_anom_half"], "s-", label="CCanom (halves)")
    ticks = shells["d_min"].to_numpy()
    ax.set_xticks(1.0 / np.square(ticks[::2]))
    ax.set_xticklabels([f"{t:.2f}" for t in ticks[::2]])
    ax.set_xlabel("resolution (A)")
    ax.set_ylabel("correlation")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    return save_figure(fig, path)


def plot_scales(batch: np.ndarray, image_scale: np.ndarray, inv_d2: np.ndarray, obs_scale: np.ndarray, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(batch, image_scale, lw=0.8)
    axes[0].set_xlabel("image (BATCH)")
    axes[0].set_ylabel("mean scale")
    axes[1].plot(inv_d2, obs_scale, ",", alpha=0.3)
    # 1/d^2 on the axis (a Wilson plot's abscissa), labelled by d in A
    ticks = np.quantile(inv_d2, [0.02, 0.35, 0.65, 0.98])
    axes[1].set_xticks(ticks)
    axes[1].set_xticklabels([f"{1 / np.sqrt(t):.2f}" for t in ticks])
    axes[1].set_xlabel("d (A)")
    axes[1].set_ylabel("scale per observation")
    fig.suptitle("learned scale")
    return save_figure(fig, path)


def plot_wilson(dhkl: np.ndarray, intensity: np.ndarray, epsilon: np.ndarray, sigma_n: np.ndarray, path: Path) -> Path:
    """Mean merged intensity per resolution shell against the prior's Sigma_N (both in the file's units)."""
    s2 = 1.0 / np.square(dhkl)
    order = np.argsort(s2)
    bins = np.array_split(order, 20)
    x = [s2[b].mean() for b in bins]
    y = [np.mean(intensity[b] / epsilon[b]) for b in bins]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(x, np.maximum(y, 1e-12), "o", label="<I>/eps, merged")
    ax.semilogy(s2[order], sigma_n[order], "-", label="Wilson prior Sigma_N")
    ax.set_xlabel("1/d^2 (1/A^2)")
    ax.set_ylabel("mean intensity")
    ax.legend()
    return save_figure(fig, path)


def plot_comparison(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, path: Path) -> Path:
    """Scatter on linear axes (negative intensities stay where they are) with y = x and the CC."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(x[ok], y[ok], ".", ms=1, alpha=0.4)
    lo, hi = np.quantile(np.concatenate([x[ok], y[ok]]), [0.0, 0.999]) if ok.any() else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.6, label="y = x")
    cc = np.corrcoef(x[ok], y[ok])[0, 1] if ok.sum() > 2 else np.nan
    ax.set_title(f"CC = {cc:.4f} ({ok.sum()} reflections)", fontsize=9)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", fontsize=7)
    return save_figure(fig, path)


def plot_difference_histogram(values: np.ndarray, peaks, path, site: tuple[str, float] | None = None) -> None:
    """Histogram of a difference map in sd units against a unit Normal, and the peak heights by rank (with the
    strongest value at a named site, when given)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hist(values, bins=200, density=True, color="0.5", label="map")
    x = np.linspace(values.min(), values.max(), 400)
    a.plot(x, np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
    a.set_yscale("log")
    a.set_ylim(1e-7, 1)
    a.set_xlabel("map value (sd)")
    if site is not None:
        a.axvline(site[1], color="tab:blue", lw=1.5, label=f"{site[0]}: {site[1]:+.2f} sd")
        b.axhline(abs(site[1]), color="tab:blue", lw=1.5, label=f"{site[0]}")
        b.legend()
    a.legend()
    if len(peaks):
        colors = ["tab:green" if h > 0 else "tab:red" for h in peaks["height"]]
        a_ = peaks["height"].abs().to_numpy()
        b.bar(peaks["rank"].to_numpy()[:50], a_[:50], color=colors[:50])
    b.set_xlabel("peak rank (green +, red -)")
    b.set_ylabel("|peak| (sd)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_wavelength_curve(wavelength: np.ndarray, relative: np.ndarray, spots: np.ndarray, path: Path) -> Path:
    """The learned wavelength normalisation of Laue data (relative scale, mean 1 in log) over the spots' wavelengths."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(spots, bins=60, color="0.85", weights=np.full(len(spots), 1.0 / max(len(spots), 1)))
    ax.set_ylabel("fraction of spots")
    ax.set_xlabel("wavelength (A)")
    twin = ax.twinx()
    twin.plot(wavelength, relative, "C0-", lw=2)
    twin.set_ylabel("learned relative scale")
    ax.set_title("wavelength normalisation (lambda curve)")
    return save_figure(fig, path)
