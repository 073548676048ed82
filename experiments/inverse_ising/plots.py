"""Figures of the inverse Ising job (matplotlib, imported only when figures are drawn)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["plot_couplings", "plot_coupling_matrices"]


def plot_couplings(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Posterior mean and 90% interval of every coupling: against the true value when known (lattice bonds in
    colour), else sorted by the mean."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    bond = table["is_lattice_bond"].to_numpy()
    err = np.vstack([table["mean"] - table["q05"], table["q95"] - table["mean"]])
    if "true" in table:
        x = table["true"].to_numpy()
        for mask, colour, label in ((~bond, "0.45", "other pairs"), (bond, "C3", "lattice bonds")):
            if mask.any():
                ax.errorbar(x[mask], table["mean"][mask], yerr=err[:, mask], fmt="o", ms=3, color=colour, alpha=0.7,
                            elinewidth=0.8, label=label)
        lim = [min(x.min(), table["q05"].min()) - 0.05, max(x.max(), table["q95"].max()) + 0.05]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("true J_ij")
        ax.legend(loc="upper left", frameon=False)
    else:
        order = np.argsort(table["mean"].to_numpy())
        ax.errorbar(np.arange(len(order)), table["mean"].to_numpy()[order], yerr=err[:, order], fmt="o", ms=2,
                    color="C0", elinewidth=0.6)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("pair (sorted by posterior mean)")
    ax.set_ylabel("posterior mean J_ij and 90% interval")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coupling_matrices(mean: np.ndarray, truth: np.ndarray | None, path: Path,
                           lattice_side: int | None = None) -> None:
    """Heatmaps of the true and the posterior-mean coupling matrix (sites row by row), on one colour scale."""
    panels = [("posterior mean", mean)] if truth is None else [("true", truth), ("posterior mean", mean),
                                                               ("mean - true", mean - truth)]
    vmax = max(float(np.abs(m).max()) for _, m in panels) or 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for k, (ax, (name, m)) in enumerate(zip(axes[0], panels)):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"J: {name}", fontsize=10)
        ax.set_xlabel("site j" + (f" (row * {lattice_side} + col)" if lattice_side else ""))
        if k == 0:
            ax.set_ylabel("site i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
