"""Figures of a VAE run: loss curves, image grids, the latent space coloured by physical labels, and the
Ising phase analysis; each saved atomically as PNG in the run directory."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from physppl.inference.plots import save_figure  # noqa: E402

__all__ = ["plot_loss", "plot_image_grid", "plot_reconstructions", "plot_latent", "plot_phase", "latent_2d"]

LABEL_TITLES = {"temperature": "temperature T", "abs_magnetization": "|m|", "magnetization": "m",
                "energy": "energy per site", "digit": "digit", "phase": "T < T_c"}


def plot_loss(losses: np.ndarray, history: list[dict], steps_per_epoch: int, path: Path,
              best_step: int | None = None) -> Path:
    """Training loss (per sample, averaged per epoch) and held-out -ELBO against epochs."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    losses = np.asarray(losses, float)
    n_ep = len(losses) // max(1, steps_per_epoch)
    if n_ep >= 1:
        per_epoch = losses[: n_ep * steps_per_epoch].reshape(n_ep, steps_per_epoch).mean(1)
        ax.plot(np.arange(1, n_ep + 1), per_epoch, lw=1.0, label="training loss (-ELBO, minibatch)")
    if history:
        ep = np.array([h["step"] for h in history]) / steps_per_epoch
        ax.plot(ep, [-h["heldout_elbo"] for h in history], "o-", ms=2.5, lw=1.0, label="held-out -ELBO")
    if best_step:
        ax.axvline(best_step / steps_per_epoch, color="k", lw=0.6, ls="--", label="best (kept)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per sample")
    if n_ep >= 1:
        lo = min(per_epoch.min(), min((-h["heldout_elbo"] for h in history), default=np.inf))
        hi = np.quantile(per_epoch, 0.9) if n_ep > 3 else per_epoch.max()
        if history:
            hi = max(hi, np.quantile([-h["heldout_elbo"] for h in history], 0.9))
        ax.set_ylim(lo - 0.05 * abs(hi - lo) - 1e-6, hi + 0.05 * abs(hi - lo) + 1e-6)
    ax.legend(fontsize=8)
    ax.set_title("VAE training")
    return save_figure(fig, path)


def plot_image_grid(images: np.ndarray, path: Path, title: str = "", ncol: int = 8,
                    row_labels: list[str] | None = None, vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """Images (n, H, W) in a grid of ``ncol`` columns."""
    images = np.asarray(images)
    n = images.shape[0]
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.1 * ncol, 1.1 * nrow + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k < n:
            ax.imshow(images[k], cmap="gray_r", vmin=vmin, vmax=vmax, interpolation="nearest")
        else:
            ax.axis("off")
    if row_labels:
        for r, lab in enumerate(row_labels[:nrow]):
            axes[r, 0].set_ylabel(lab, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path, captions=None,
                         ncol: int = 8) -> Path:
    """Alternating rows: data, then the decoder mean at the encoder's latent mean."""
    n = min(len(originals), 4 * ncol)
    rows, labels = [], []
    for start in range(0, n, ncol):
        rows += [originals[start:start + ncol], reconstructions[start:start + ncol]]
        labels += ["data", "recon."]
    images = np.concatenate(rows)
    title = "held-out data and reconstructions (decoder mean at E_q[z])"
    if captions is not None:
        title += "\n" + captions
    return plot_image_grid(images, path, title, ncol=ncol, row_labels=labels)


def latent_2d(mu: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Two coordinates to draw: the latent itself (d <= 2) or its first two principal components."""
    mu = np.asarray(mu, float)
    if mu.shape[1] == 1:
        return np.column_stack([mu[:, 0], np.zeros(len(mu))]), "z_1", ""
    if mu.shape[1] == 2:
        return mu, "z_1", "z_2"
    from sklearn.decomposition import PCA

    pca = PCA(2).fit(mu)
    ev = pca.explained_variance_ratio_
    return pca.transform(mu), f"PC1 of E_q[z] ({ev[0]:.0%})", f"PC2 ({ev[1]:.0%})"


def plot_latent(mu: np.ndarray, labels: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """Latent means of held-out samples, one panel per label (temperature, |m|, energy, digit...)."""
    xy, xl, yl = latent_2d(mu)
    names = [k for k in ("temperature", "abs_magnetization", "energy", "digit") if k in labels]
    names += [k for k in labels if k not in names and k not in ("phase", "magnetization")]
    names = names[:4] or [None]
    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes.flat, names):
        if name is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
        else:
            cmap = "tab10" if name == "digit" else ("coolwarm" if name == "temperature" else "viridis")
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels[name], s=4, cmap=cmap, alpha=0.8)
            fig.colorbar(sc, ax=ax, label=LABEL_TITLES.get(name, name))
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.suptitle(title or "latent space (encoder means, held-out samples)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_phase(analysis: dict, labels: dict[str, np.ndarray], path: Path) -> Path:
    """Ising: the order-parameter direction against T and |m|, and the classifier's P(ordered) against T."""
    curves = analysis["curves"]
    t = labels["temperature"]
    proj = curves["projection_test"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    sc = ax.scatter(t, proj, c=labels["magnetization"], cmap="coolwarm", s=5, vmin=-1, vmax=1)
    fig.colorbar(sc, ax=ax, label="m")
    ax.axvline(analysis["t_c"], color="k", lw=0.7, ls="--")
    ax.set_xlabel("T")
    ax.set_ylabel("best latent direction w . E_q[z]")
    ax.set_title(f"corr with m: {analysis['corr_latent_m']:.3f}", fontsize=9)
    ax = axes[1]
    sc = ax.scatter(np.abs(labels["magnetization"]), np.abs(proj), c=t, cmap="coolwarm", s=5)
    fig.colorbar(sc, ax=ax, label="T")
    ax.set_xlabel("|m|")
    ax.set_ylabel("|w . E_q[z]|")
    ax.set_title(f"corr(|w . mu|, |m|) = {analysis['corr_abs_latent_abs_m']:.3f}", fontsize=9)
    ax = axes[2]
    if "p_ordered" in curves:
        ax.plot(curves["temperatures"], curves["p_ordered"], "o-", ms=3,
                label=f"trained on T<={analysis['classifier_window'][0]} / T>={analysis['classifier_window'][1]}")
        if np.isfinite(analysis.get("switch_temperature", np.nan)):
            ax.axvline(analysis["switch_temperature"], color="C0", lw=0.8,
                       label=f"switch {analysis['switch_temperature']:.3f}")
    if "p_ordered_supervised" in curves:
        ax.plot(curves["temperatures"], curves["p_ordered_supervised"], "s-", ms=3, alpha=0.7,
                label="trained with labels T < T_c")
    ax.axvline(analysis["t_c"], color="k", lw=0.8, ls="--", label=f"Onsager T_c = {analysis['t_c']:.3f}")
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.set_xlabel("T")
    ax.set_ylabel("mean P(ordered | E_q[z])")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
