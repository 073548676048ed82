"""Figures of the RBM runs: training curves, weight filters, samples, and the observables against temperature (RBM
beside Monte Carlo); each saved atomically as PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from physppl.inference.plots import save_figure  # noqa: E402
from physppl.vae.plots import plot_image_grid  # noqa: E402

from .observables import OBSERVABLES  # noqa: E402

__all__ = ["plot_training", "plot_filters", "plot_samples", "plot_observables", "plot_ising_samples"]

TITLES = {"energy": "energy per site", "abs_magnetization": "|m|", "specific_heat": "specific heat C",
          "susceptibility": r"susceptibility $\chi$"}


def plot_training(history: pd.DataFrame, losses: list[float], path: Path, title: str = "") -> Path:
    """Held-out log-likelihood (exact) or pseudo-log-likelihood per sample against epochs, and the surrogate loss."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    if len(history):
        for key, label in (("heldout_ll", "held-out log-likelihood (exact)"),
                           ("heldout_pll", "held-out pseudo-log-likelihood")):
            if key in history:
                ax.plot(history["epoch"], history[key], marker=".", label=label)
        ax.legend(fontsize=8)
    ax.set(xlabel="epoch", ylabel="nats per sample", title=title)
    axes[1].plot(np.arange(1, len(losses) + 1), losses, lw=0.5)
    axes[1].set(xlabel="step", ylabel="mean F(data) - mean F(model samples)", title="surrogate loss")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_filters(W: np.ndarray, shape: tuple[int, int], path: Path, title: str = "weights of each hidden unit",
                 max_units: int = 64) -> Path:
    """Each hidden unit's weights to the visible layer, drawn on the data's image grid."""
    k = min(W.shape[1], max_units)
    ncol = min(8, k)
    nrow = int(np.ceil(k / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.1 * ncol, 1.1 * nrow + 0.4), squeeze=False)
    lim = float(np.abs(W[:, :k]).max()) or 1.0
    for j, ax in enumerate(axes.flat):
        ax.axis("off")
        if j < k:
            ax.imshow(W[:, j].reshape(shape), cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.suptitle(f"{title} (colour: +-{lim:.2g})", fontsize=9)
    return save_figure(fig, path)


def plot_samples(samples: np.ndarray, shape: tuple[int, int], path: Path, title: str) -> Path:
    return plot_image_grid(np.asarray(samples).reshape(-1, *shape), path, title)


def plot_observables(table: pd.DataFrame, path: Path, t_c: float, L: int) -> Path:
    """Energy, |m|, C and chi against T: Monte Carlo (the training data) and the RBMs' Gibbs samples, with error
    bars; the exact values when the lattice was enumerated."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for ax, key in zip(axes.flat, OBSERVABLES):
        mc = table.drop_duplicates("temperature")
        ax.errorbar(mc["temperature"], mc[f"mc_{key}"], mc[f"mc_{key}_err"], fmt="o", color="k", ms=4,
                    capsize=2, label="Monte Carlo")
        for n_h, rows in table.groupby("n_hidden"):
            ax.errorbar(rows["temperature"] + 0.01, rows[f"rbm_{key}"], rows[f"rbm_{key}_err"], fmt="s", ms=3,
                        capsize=2, label=f"RBM, n_h = {n_h}")
        if f"exact_{key}" in table:
            ax.plot(mc["temperature"], mc[f"exact_{key}"], "-", color="0.6", lw=1, label="exact (enumeration)")
        ax.axvline(t_c, color="0.8", ls="--", lw=1)
        ax.set(xlabel="T", title=TITLES[key])
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"2-D Ising, L = {L}: RBMs trained per temperature vs Monte Carlo", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_ising_samples(samples: dict, path: Path) -> Path:
    """A row of RBM samples (+-1 spins) per temperature (and hidden-layer size)."""
    keys = sorted(samples)
    ncol = max(len(v) for v in samples.values())
    fig, axes = plt.subplots(len(keys), ncol, figsize=(1.0 * ncol + 1.2, 1.0 * len(keys) + 0.3), squeeze=False)
    for r, key in enumerate(keys):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(samples[key]):
                ax.imshow(samples[key][c], cmap="gray", vmin=-1, vmax=1)
        axes[r][0].set_ylabel(f"T={key[0]:.3g}\nn_h={key[1]}", fontsize=7)
    fig.suptitle("block-Gibbs samples of each RBM", fontsize=9)
    return save_figure(fig, path)
