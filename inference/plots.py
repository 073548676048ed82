"""Figures every job shares (the training curve), and saving a figure atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from .outputs import atomic_write  # noqa: E402

__all__ = ["save_figure", "plot_loss", "plt"]


def save_figure(fig, path: str | Path, protect: tuple = ()) -> Path:
    """Save ``fig`` as PNG at ``path`` (atomically) and close it."""
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"), protect=protect)
    finally:
        plt.close(fig)


def plot_loss(losses: Sequence[float], path: str | Path, ylabel: str = "loss (-ELBO)", title: str = "training",
              extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """The loss per step, with a running median over 1% of the steps to show the trend of a noisy curve.

    ``extra`` adds curves drawn on a second axis: ``{label: (steps, values)}`` (e.g. a held-out ELBO).
    """
    loss = np.asarray(losses, dtype=float)
    steps = np.arange(1, loss.size + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="per step")
    w = max(1, loss.size // 100)
    if w > 1:
        smooth = np.array([np.median(loss[max(0, i - w):i + 1]) for i in range(loss.size)])
        ax.plot(steps, smooth, lw=1.2, label=f"running median ({w} steps)")
    # a linear axis over the last 90% of the steps: the first steps are orders of magnitude off and would hide the
    # convergence that matters
    tail = loss[loss.size // 10:] if loss.size >= 20 else loss
    if tail.size and np.all(np.isfinite(tail)):
        lo, hi = float(tail.min()), float(tail.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if extra:
        ax2 = ax.twinx()
        for label, (x, y) in extra.items():
            ax2.plot(x, y, "o-", ms=2, lw=0.8, color="C3", label=label)
        ax2.set_ylabel(", ".join(extra))
        ax2.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
    return save_figure(fig, path)


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


def plot_expected_coverage(levels: np.ndarray, empirical: np.ndarray, n: int, path: Path) -> None:
    """Expected coverage of highest-density regions (joint over the parameters) against the nominal level."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    grid = np.linspace(0.01, 0.99, 99)
    band = 1.96 * np.sqrt(grid * (1 - grid) / max(n, 1))
    ax.fill_between(grid, grid - band, grid + band, color="0.85", label="95% band")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(levels, empirical, "o-", ms=3, color="C0", label="posterior")
    ax.set_xlabel("credibility level of the highest-density region")
    ax.set_ylabel("fraction of true parameters inside")
    ax.text(0.05, 0.9, "above: underconfident\nbelow: overconfident", fontsize=7, transform=ax.transAxes)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"expected coverage ({n} simulations)", fontsize=9)
    save_figure(fig, path)
