"""Figures of the beam job: pair plots, posterior-predictive scans, SBC rank histograms, coverage, training."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from physppl.inference.plots import plt, save_figure

__all__ = ["plot_pair", "plot_predictive", "plot_sbc", "plot_coverage", "plot_training"]


def plot_pair(draws: np.ndarray, names: Sequence[str], path: Path, truth: np.ndarray | None = None,
              reference: np.ndarray | None = None, title: str = "") -> None:
    """Corner plot of posterior draws (n, D): marginal histograms and pairwise scatter; reference draws overlaid."""
    d = len(names)
    fig, axes = plt.subplots(d, d, figsize=(1.7 * d, 1.7 * d))
    sets = [(draws, "C0", "posterior")] + ([(reference, "C1", "reference")] if reference is not None else [])
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            for s, color, label in sets:
                if i == j:
                    ax.hist(s[:, i], bins=40, histtype="step", density=True, color=color, label=label)
                else:
                    ax.scatter(s[:2000, j], s[:2000, i], s=1, alpha=0.3, color=color, rasterized=True)
            if truth is not None:
                if i == j:
                    ax.axvline(truth[i], color="k", lw=0.8)
                else:
                    ax.plot(truth[j], truth[i], "k+", ms=8)
            ax.tick_params(labelsize=6)
            if i == d - 1:
                ax.set_xlabel(names[j], fontsize=8)
            if j == 0 and i > 0:
                ax.set_ylabel(names[i], fontsize=8)
            if i == j:
                ax.set_yticks([])
    if reference is not None:
        axes[0, 0].legend(fontsize=6, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


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


def plot_sbc(ranks: np.ndarray, n_draws: int, names: Sequence[str], path: Path, ks_p: np.ndarray | None = None,
             n_bins: int = 20) -> None:
    """SBC rank histograms with the 99% band of a uniform histogram of the same size."""
    d = len(names)
    cols = min(4, d)
    rows = -(-d // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    n = ranks.shape[0]
    lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / n_bins)
    for k in range(rows * cols):
        ax = axes.flat[k]
        if k >= d:
            ax.axis("off")
            continue
        ax.axhspan(lo, hi, color="0.85")
        ax.hist(ranks[:, k], bins=np.linspace(0, n_draws + 1, n_bins + 1), color="C0")
        label = names[k] + (f" (KS p={ks_p[k]:.2f})" if ks_p is not None else "")
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"SBC ranks over {n} prior draws ({n_draws} posterior draws each)", fontsize=9)
    save_figure(fig, path)


def plot_coverage(coverage: dict[float, np.ndarray], names: Sequence[str], path: Path, n: int) -> None:
    """Empirical against nominal coverage of central intervals, per parameter, with the binomial 95% band."""
    levels = np.array(sorted(coverage))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    grid = np.linspace(0.01, 0.99, 99)
    band = 1.96 * np.sqrt(grid * (1 - grid) / max(n, 1))
    ax.fill_between(grid, grid - band, grid + band, color="0.85", label="95% band")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    for k, name in enumerate(names):
        ax.plot(levels, [coverage[l][k] for l in levels], "o-", ms=3, label=name)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("empirical coverage")
    ax.legend(fontsize=7)
    ax.set_title(f"central-interval coverage ({n} simulations)", fontsize=9)
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
