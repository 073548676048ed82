"""Inverse-variance weighted mean with multiplicative block scales: the maximum-likelihood merge.

For observations ``y_i`` with sigmas ``s_i`` of groups ``g(i)`` measured in blocks ``b(i)``, the model
``y_i ~ Normal(k_b mu_g, s_i)`` is fitted by alternating the closed-form updates of ``mu`` and ``k``,
with observations more than ``outlier_z`` sigmas from their group's fit left out after a few rounds.
Written with ``numpy.bincount`` rather than a pandas groupby because each update is one pass over the data
(~1 ms for 50k observations, against ~30 ms for a groupby).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from physppl.inference.fit import Fit

from .french_wilson import french_wilson_moments

__all__ = ["ScaledWeightedMean", "WeightedMeanResult", "weighted_mean", "WeightedMeanEngine"]


@dataclass
class WeightedMeanResult:
    mean: np.ndarray  # (n_groups,) NaN where a group has no observation
    sd: np.ndarray  # (n_groups,)
    n: np.ndarray  # (n_groups,) observations used
    log_scale: np.ndarray  # (n_obs,) per-observation log k
    outlier: np.ndarray  # (n_obs,) bool
    iterations: int


def weighted_mean(y: np.ndarray, sigma: np.ndarray, group: np.ndarray, n_groups: int, scale: np.ndarray | None = None):
    """Inverse-variance weighted mean of ``y / scale`` per group, and its standard error."""
    k = np.ones_like(y) if scale is None else scale
    w = 1.0 / np.square(sigma)
    num = np.bincount(group, weights=w * k * y, minlength=n_groups)
    den = np.bincount(group, weights=w * k * k, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den, 1.0 / np.sqrt(den)


class ScaledWeightedMean:
    """Conventional scaling and merging.

    Parameters
    ----------
    block_size : int
        Images per scale block (one scale factor per block).
    n_iter : int
        Alternating rounds.
    outlier_z : float
        Reject observations further than this many sigmas (sigma inflated by ``error_fraction`` of the
        prediction) from their group's fit; 0 disables rejection.
    error_fraction : float
        Relative systematic error added in quadrature for the outlier test only.
    """

    def __init__(self, block_size: int = 20, n_iter: int = 10, outlier_z: float = 6.0, error_fraction: float = 0.05):
        if block_size < 1:
            raise ValueError(f"ScaledWeightedMean: block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.n_iter = int(n_iter)
        self.outlier_z = float(outlier_z)
        self.error_fraction = float(error_fraction)

    def fit(self, y: np.ndarray, sigma: np.ndarray, group: np.ndarray, image: np.ndarray, n_groups: int) -> WeightedMeanResult:
        y, sigma = np.asarray(y, float), np.asarray(sigma, float)
        group = np.asarray(group, int)
        block = np.asarray(image, int) // self.block_size
        n_blocks = int(block.max()) + 1
        log_k = np.zeros(n_blocks)
        keep = np.ones(y.shape, bool)
        for it in range(self.n_iter):
            w = np.where(keep, 1.0 / np.square(sigma), 0.0)
            k = np.exp(log_k)[block]
            num = np.bincount(group, weights=w * k * y, minlength=n_groups)
            den = np.bincount(group, weights=w * k * k, minlength=n_groups)
            mu = np.divide(num, den, out=np.zeros(n_groups), where=den > 0)
            # block scale: least squares of y on mu within the block, strong groups dominate by weight
            m = mu[group]
            kn = np.bincount(block, weights=w * m * y, minlength=n_blocks)
            kd = np.bincount(block, weights=w * m * m, minlength=n_blocks)
            ok = (kd > 0) & (kn > 0)
            new = np.where(ok, np.log(np.where(ok, kn, 1.0) / np.where(ok, kd, 1.0)), 0.0)
            log_k = new - new[ok].mean() if ok.any() else new
            if self.outlier_z > 0 and it >= 2:
                pred = np.exp(log_k)[block] * m
                z = np.abs(y - pred) / np.sqrt(np.square(sigma) + np.square(self.error_fraction * pred))
                keep = z <= self.outlier_z
                # never reject every observation of a group: with none left it could not be merged at all
                emptied = np.bincount(group, weights=keep, minlength=n_groups) == 0
                keep |= emptied[group]
        k = np.exp(log_k)[block]
        mean, sd = weighted_mean(y[keep], sigma[keep], group[keep], n_groups, k[keep])
        n = np.bincount(group[keep], minlength=n_groups)
        return WeightedMeanResult(mean=mean, sd=sd, n=n, log_scale=np.log(k), outlier=~keep, iterations=self.n_iter)

    def __repr__(self) -> str:
        return f"ScaledWeightedMean(block_size={self.block_size}, n_iter={self.n_iter}, outlier_z={self.outlier_z})"


class WeightedMeanEngine(ScaledWeightedMean):
    """The conventional merge as an engine of ``physppl.merge``: :class:`ScaledWeightedMean`, then French-Wilson
    amplitudes under the model's Wilson prior. It reads the observations and the model's reflection classes
    (``centric``, ``epsilon``, ``sigma_n``) and fits nothing else: no guide, and no likelihood in posterior.nc.

    Its draws of ``F`` are folded normals with the French-Wilson mean and sd (an approximation of that posterior);
    the exact moments are in ``Fit.extras["moments"]``.
    """

    needs_guide = False

    def fit(self, model, guide, data: dict, *, n_draws: int = 200, n_data=None, sites=None, workdir=None,
            callback=None, init=None) -> Fit:
        t0 = time.perf_counter()
        intensity, sigma = (data[k].detach().double().cpu().numpy() for k in ("intensity", "sigma"))
        refl, image = (data[k].detach().cpu().numpy() for k in ("refl", "image"))
        n_refl = int(model.centric.shape[0])
        res = ScaledWeightedMean.fit(self, intensity, sigma, refl, image, n_refl)
        mean = np.where(np.isfinite(res.mean), res.mean, 0.0)
        sd = np.where(np.isfinite(res.sd), res.sd, np.nanmax(res.sd))
        wilson = (model.epsilon * model.sigma_n).detach().double().cpu().numpy()
        fw = french_wilson_moments(mean, sd, wilson, model.centric.cpu().numpy())
        moments = {"F_mean": fw["F"], "F_sd": fw["SIGF"], "I_mean": fw["I"], "I_sd": fw["SIGI"]}
        gen = torch.Generator().manual_seed(0)
        loc, scale = torch.as_tensor(fw["F"]), torch.as_tensor(fw["SIGF"])
        draws = (loc + scale * torch.randn((1, n_draws, n_refl), generator=gen, dtype=loc.dtype)).abs()
        info = {"engine": "weighted_mean", "outliers": int(res.outlier.sum()), "train_time": time.perf_counter() - t0}
        return Fit(model=None, guide=None, data=data, draws={"F": draws}, info=info,
                   extras={"moments": moments, "obs_log_scale": res.log_scale})
