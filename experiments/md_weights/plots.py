"""Plots for frame weighting: weights along the trajectory, state masses, fit by resolution shell."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from physppl.inference.plots import plt, save_figure

__all__ = ["plot_weights", "plot_states", "plot_fit_by_shell", "plot_cc_shells"]


def plot_weights(frames: pd.DataFrame, path: Path) -> Path:
    """Posterior mean and 90% interval of each frame's weight along the trajectory, coloured by state."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    t = frames["frame"].to_numpy()
    for k, (name, part) in enumerate(frames.groupby("state", sort=False)):
        idx = part["frame"].to_numpy()
        ax.errorbar(idx, part["mean"], yerr=[part["mean"] - part["q05"], part["q95"] - part["mean"]], fmt="o", ms=3,
                    lw=0.6, color=f"C{k}", label=f"state {name}")
    if "true" in frames:
        ax.plot(t, frames["true"], "k_", ms=8, label="truth")
    if "cc_fit" in frames:
        ax.plot(t, frames["cc_fit"], "x", color="0.4", ms=3, label="CC fit")
    ax.set_xlabel("frame")
    ax.set_ylabel("weight")
    ax.set_title("frame weights (posterior mean, 90% interval)")
    ax.legend(fontsize=7, ncol=4)
    return save_figure(fig, path)


def plot_states(states: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    x = np.arange(len(states))
    ax.errorbar(x, states["mean"], yerr=[states["mean"] - states["q05"], states["q95"] - states["mean"]], fmt="o",
                capsize=4, label="posterior (90%)")
    ax.plot(x + 0.15, states["prior_mean"], "s", mfc="none", color="0.5", label="prior mean")
    if "true" in states:
        ax.plot(x, states["true"], "k_", ms=16, mew=2, label="truth")
    if "cc_fit" in states:
        ax.plot(x - 0.15, states["cc_fit"], "x", color="C3", label="CC fit")
    ax.set_xticks(x, states["state"])
    ax.set_ylabel("state mass")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_fit_by_shell(y: np.ndarray, pred: np.ndarray, shell: np.ndarray, edges_d: np.ndarray, path: Path) -> Path:
    """Observed against predicted diffuse intensity, one panel per resolution shell."""
    shells = np.unique(shell)
    cols = min(5, len(shells))
    rows = int(np.ceil(len(shells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.3 * rows), squeeze=False)
    for ax, k in zip(axes.flat, shells):
        sel = shell == k
        ax.plot(pred[sel], y[sel], ".", ms=2, alpha=0.5)
        lo, hi = np.percentile(np.r_[pred[sel], y[sel]], [0.5, 99.5])
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.5)
        cc = np.corrcoef(pred[sel], y[sel])[0, 1] if sel.sum() > 2 else np.nan
        ax.set_title(f"{edges_d[k]:.2f}-{edges_d[k + 1]:.2f} A  CC {cc:.3f}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shells):]:
        ax.axis("off")
    fig.supxlabel("predicted", fontsize=8)
    fig.supylabel("observed", fontsize=8)
    return save_figure(fig, path)


def plot_cc_shells(shells: dict[str, pd.DataFrame], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, table in shells.items():
        x = 1.0 / np.square(0.5 * (table["d_max"] + table["d_min"]))
        ax.plot(x, table["cc"], "o-", label=label)
    ticks = next(iter(shells.values()))["d_min"].to_numpy()
    ax.set_xticks(1.0 / np.square(ticks[::2]), [f"{d:.1f}" for d in ticks[::2]])
    ax.set_xlabel("resolution (A)")
    ax.set_ylabel("CC(predicted, observed)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
