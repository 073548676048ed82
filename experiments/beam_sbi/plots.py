"""Figures of the beam job: pair plots, posterior-predictive scans, SBC rank histograms, coverage, training."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from physppl.inference.plots import plot_coverage, plot_expected_coverage, plot_pair, plot_sbc, plt, save_figure  # noqa: F401,E501 (re-exported)

__all__ = ["plot_pair", "plot_predictive", "plot_sbc", "plot_coverage", "plot_expected_coverage", "plot_training"]


def plot_predictive(x_obs: np.ndarray, predictive: np.ndarray, positions: np.ndarray, path: Path,
                    axis_names: Sequence[str] = ("x", "y"), title: str = "") -> None:
    """Observed scans with the posterior-predictive median and 50%/90% bands, one panel per axis."""
    n_axes = len(axis_names)
    per = len(positions)
    lo90, lo50, med, hi50, hi90 = np.quantile(predictive, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
    fig, axes = plt.subplots(2, n_axes, figsize=(5 * n_axes, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for a, name in enumerate(axis_names):
        sl = slice(a * per, (a + 1) * per)
        ax, res = axes[0, a], axes[1, a]
        ax.fill_between(positions, lo90[sl], hi90[sl], color="C0", alpha=0.2, label="90% predictive")
        ax.fill_between(positions, lo50[sl], hi50[sl], color="C0", alpha=0.4, label="50% predictive")
        ax.plot(positions, med[sl], color="C0", lw=1)
        ax.plot(positions, x_obs[sl], "k.", ms=2, label="observed")
        ax.set_title(f"{name}-scan", fontsize=9)
        ax.set_ylabel("counts")
        sd = 0.5 * (hi90[sl] - lo90[sl]) / 1.645
        res.plot(positions, (x_obs[sl] - med[sl]) / np.maximum(sd, 1e-9), "k.", ms=2)
        res.axhline(0, color="C0", lw=0.8)
        res.set_ylabel("z")
        res.set_xlabel("blade position (mm)")
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_training(train: Sequence[float], val: Sequence[float], path: Path, focus: dict[int, Sequence[float]] | None = None) -> None:
    """Neural posterior estimation losses per epoch, and each observation's variational loss (if any)."""
    panels = 2 if focus else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(np.arange(1, len(train) + 1), train, label="training")
        ax.plot(np.arange(1, len(val) + 1), val, label="held out")
        ax.legend(fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("-log q(theta | x)")
    ax.set_title("amortized posterior", fontsize=9)
    if focus:
        ax = axes[0, 1]
        for k, losses in focus.items():
            ax.plot(losses, lw=0.6, label=f"obs {k}")
        ax.set_yscale("symlog")
        ax.set_xlabel("step")
        ax.set_ylabel("negative ELBO")
        ax.set_title("focused fits", fontsize=9)
    save_figure(fig, path)
