"""Figures every job shares (the training curve), and saving a figure atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
