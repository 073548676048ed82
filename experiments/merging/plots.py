"""Plots a crystallographer looks at after a merge; each saved as PNG in the run directory."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from physppl.inference.outputs import atomic_write  # noqa: E402

__all__ = ["save_figure", "plot_loss", "plot_cc_shells", "plot_scales", "plot_wilson", "plot_comparison"]


def save_figure(fig, path: Path) -> Path:
    out = atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return out


def plot_loss(losses: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (-ELBO)")
    ax.set_yscale("symlog")
    ax.set_title("SVI convergence")
    return save_figure(fig, path)


def plot_cc_shells(shells: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = 1.0 / np.square(0.5 * (shells["d_max"] + shells["d_min"]))
    ax.plot(x, shells["cc_half"], "o-", label="CC1/2")
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
    axes[1].plot(1.0 / np.sqrt(inv_d2), obs_scale, ",", alpha=0.3)
    axes[1].set_xscale("log")
    axes[1].invert_xaxis()
    axes[1].set_xlabel("d (A)")
    axes[1].set_ylabel("scale per observation")
    fig.suptitle("learned scale")
    return save_figure(fig, path)


def plot_wilson(dhkl: np.ndarray, intensity: np.ndarray, epsilon: np.ndarray, sigma_n: np.ndarray, path: Path) -> Path:
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
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.loglog(np.clip(x, 1e-6, None), np.clip(y, 1e-6, None), ".", ms=1, alpha=0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_figure(fig, path)
