"""What a posterior over frame weights says: per-frame and per-state summaries, identifiability, fit quality."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from physppl.merging.quality import cc_by_resolution, pearson

__all__ = ["state_masses", "frame_table", "state_table", "predicted_intensities", "effective_frames_summary",
           "weight_errors"]


def state_masses(w: np.ndarray, labels: np.ndarray, n_states: int) -> np.ndarray:
    """Sum of weights per state: (..., T) -> (..., S)."""
    out = np.zeros(w.shape[:-1] + (n_states,))
    for s in range(n_states):
        out[..., s] = w[..., labels == s].sum(-1)
    return out


def frame_table(draws: np.ndarray, labels: np.ndarray, names: list[str], truth: np.ndarray | None = None,
                cc_weights: np.ndarray | None = None) -> pd.DataFrame:
    """Per frame: state, posterior mean, sd, 90% interval (and truth, CC-fit weight when known)."""
    q05, q95 = np.quantile(draws, [0.05, 0.95], axis=0)
    table = pd.DataFrame({"frame": np.arange(draws.shape[1]), "state": [names[k] for k in labels],
                          "mean": draws.mean(0), "sd": draws.std(0), "q05": q05, "q95": q95})
    if truth is not None:
        table["true"] = truth
    if cc_weights is not None:
        table["cc_fit"] = cc_weights
    return table


def state_table(draws: np.ndarray, labels: np.ndarray, names: list[str], prior: tuple[np.ndarray, np.ndarray],
                truth: np.ndarray | None = None, cc_weights: np.ndarray | None = None) -> pd.DataFrame:
    """Per state: posterior mass (mean, sd, 90% interval), the prior's mean and sd (``prior``, e.g. from
    ``FrameWeightsModel.state_mass_prior``), and the contraction ``1 - var_post / var_prior``: near 0 when the
    data do not inform the state's mass (unidentified)."""
    S = len(names)
    m = state_masses(draws, labels, S)
    prior_mean, prior_sd = prior
    q05, q95 = np.quantile(m, [0.05, 0.95], axis=0)
    sd = m.std(0)
    table = pd.DataFrame({"state": names, "n_frames": np.bincount(labels, minlength=S), "mean": m.mean(0), "sd": sd,
                          "q05": q05, "q95": q95, "prior_mean": prior_mean, "prior_sd": prior_sd,
                          "contraction": _contraction(sd, prior_sd)})
    if truth is not None:
        table["true"] = truth
    if cc_weights is not None:
        table["cc_fit"] = state_masses(cc_weights, labels, S)
    return table


def _contraction(sd: np.ndarray, prior_sd: np.ndarray) -> np.ndarray:
    """``1 - var_post / var_prior``; NaN where the prior fixes the mass (one state: mass 1, nothing to learn),
    instead of a ratio of two rounding errors."""
    sd, prior_sd = np.asarray(sd, dtype=float), np.asarray(prior_sd, dtype=float)
    fixed = prior_sd < 1e-6
    return np.where(fixed, np.nan, 1 - np.square(sd) / np.where(fixed, 1.0, np.square(prior_sd)))


@torch.no_grad()
def predicted_intensities(data, model, draws: dict[str, np.ndarray], chunk: int = 50) -> dict[str, np.ndarray]:
    """Posterior mean and sd of the predicted diffuse (and Bragg) intensity per voxel, in the data's units, and
    the mean unscaled x' (frames' units). Frames streamed from disk are read once, a range of voxels at a time
    with every draw; frames in memory are used whole, a few draws at a time."""
    dev = data.frames.device if hasattr(data.frames, "device") else data.y.device
    w = torch.as_tensor(draws["w"], dtype=data.y.dtype, device=dev)
    col = lambda k: torch.as_tensor(draws[k], dtype=w.dtype, device=dev).reshape(-1, 1).double()  # noqa: E731
    a = col("scale")
    b = col("offset") if "offset" in draws else torch.zeros_like(a)
    bragg = data.y_bragg is not None and "bragg_scale" in draws
    ab = col("bragg_scale") if bragg else None
    n = w.shape[0]
    streamed = callable(getattr(data.frames, "voxel_ranges", None))
    ranges = data.frames.voxel_ranges() if streamed else [None]
    pieces: dict[str, list] = {}
    for k, idx in enumerate(ranges):
        if streamed and k + 1 < len(ranges):
            data.frames.prefetch(ranges[k + 1])
        sums: dict = {}
        step = n if streamed else chunk  # (chunk, N) stays small for large maps
        for start in range(0, n, step):
            sl = slice(start, start + step)
            x, ib, m, mb = model.intensities(w[sl], idx, bragg=bragg)  # x' once: the pass is N x T per draw
            x = x.double()
            parts = {"pred": data.y_shift + data.y_scale * (a[sl] * x / m.double() + b[sl]), "x": x * data.x_scale}
            if bragg:
                parts["bragg"] = data.bragg_scale * ab[sl] * ib.double() / mb.double()
            for name, v in parts.items():
                s1, s2 = sums.get(name, (0.0, 0.0))
                sums[name] = (s1 + v.sum(0), s2 + v.square().sum(0))
        for name, pair in sums.items():
            pieces.setdefault(name, []).append(pair)
    sums = {name: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v])) for name, v in pieces.items()}
    out = {}
    for k, (s1, s2) in sums.items():
        mean = s1 / n
        out[f"{k}_mean"] = mean.cpu().numpy()
        out[f"{k}_sd"] = (s2 / n - mean.square()).clamp_min(0).sqrt().cpu().numpy()
    return out


def observed(data) -> np.ndarray:
    return data.y_shift + data.y_scale * data.y.double().cpu().numpy()


def fit_quality(data, prediction: np.ndarray, n_shells: int = 10) -> tuple[dict, pd.DataFrame]:
    """CC of predicted to observed diffuse intensity overall and by resolution shell."""
    y = observed(data)
    shells = cc_by_resolution(prediction, y, data.dhkl, n_bins=min(n_shells, max(1, len(y) // 20)))
    return {"cc": pearson(prediction, y), "cc_shell_min": float(np.nanmin(shells["cc"]))}, shells


def effective_frames_summary(draws: np.ndarray) -> dict:
    """Kish's effective number of frames of the posterior mean weights, and its distribution over draws."""
    per_draw = 1.0 / np.square(draws).sum(-1)
    q05, q95 = np.quantile(per_draw, [0.05, 0.95])
    return {"n_eff": float(1.0 / np.square(draws.mean(0)).sum()), "n_eff_draws_mean": float(per_draw.mean()),
            "n_eff_draws_q05": float(q05), "n_eff_draws_q95": float(q95)}


def weight_errors(mean_w: np.ndarray, labels: np.ndarray, truth: dict | None, prefix: str = "") -> dict:
    """Distance of weights to the truth: L1 over frames (when the truth is per frame) and over state masses."""
    if not truth:
        return {}
    out = {}
    masses = state_masses(mean_w, labels, len(truth["state_masses"]))
    err = masses - np.asarray(truth["state_masses"])
    out[f"{prefix}state_mass_l1_error"] = float(np.abs(err).sum())
    out[f"{prefix}state_mass_max_error"] = float(np.abs(err).max())
    if truth.get("weights") is not None:
        out[f"{prefix}weight_l1_error"] = float(np.abs(mean_w - truth["weights"]).sum())
    return out
