"""Wilson's distribution of structure-factor amplitudes (acentric and centric).

For a reflection with expected intensity ``Sigma = epsilon * Sigma_N(d)``:

* acentric: ``p(F) = 2 F / Sigma * exp(-F^2 / Sigma)`` (Rayleigh; ``F^2 ~ Exponential(mean Sigma)``)
* centric:  ``p(F) = sqrt(2 / (pi Sigma)) * exp(-F^2 / (2 Sigma))`` (half-normal with variance ``Sigma``)

Both have ``E[F^2] = Sigma``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

__all__ = ["Wilson", "wilson_prior", "wilson_sigma_by_resolution", "resolution_shells"]

_TINY = 1e-12


class Wilson(TorchDistribution):
    """Wilson amplitude distribution with a per-element centric flag.

    Parameters
    ----------
    sigma : Tensor
        Expected intensity ``E[F^2]`` of each reflection (epsilon already applied), positive.
    centric : Tensor of bool
        True where the reflection is centric.
    """

    arg_constraints = {"sigma": constraints.positive}
    support = constraints.nonnegative  # F = 0 is possible (centric; folded draws)
    has_rsample = True

    def __init__(self, sigma: torch.Tensor, centric: torch.Tensor, validate_args=None):
        self.sigma, centric_f = broadcast_all(sigma, centric.to(torch.as_tensor(sigma).dtype))
        self.centric = centric_f > 0.5
        super().__init__(self.sigma.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Wilson, _instance)
        batch_shape = torch.Size(batch_shape)
        new.sigma = self.sigma.expand(batch_shape)
        new.centric = self.centric.expand(batch_shape)
        super(Wilson, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.clamp(min=_TINY)  # F = 0 has density 0 (acentric): keep gradients finite
        f2_over_sigma = value.square() / self.sigma
        acentric = math.log(2.0) + value.log() - self.sigma.log() - f2_over_sigma
        centric = 0.5 * math.log(2.0 / math.pi) - 0.5 * self.sigma.log() - 0.5 * f2_over_sigma
        return torch.where(self.centric, centric, acentric)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        sigma = self.sigma.expand(shape)
        # acentric: F^2 = Sigma * Exp(1); centric: F = |N(0, Sigma)|
        e = torch.empty(shape, dtype=sigma.dtype, device=sigma.device).exponential_()
        z = torch.randn(shape, dtype=sigma.dtype, device=sigma.device)
        acentric = (sigma * e).sqrt()
        centric = sigma.sqrt() * z.abs()
        return torch.where(self.centric.expand(shape), centric, acentric)

    @property
    def mean(self) -> torch.Tensor:
        acentric = 0.5 * (math.pi * self.sigma).sqrt()
        centric = (2.0 * self.sigma / math.pi).sqrt()
        return torch.where(self.centric, centric, acentric)

    @property
    def variance(self) -> torch.Tensor:
        return self.sigma - self.mean.square()


def wilson_prior(centric: torch.Tensor, epsilon: torch.Tensor, sigma_n: torch.Tensor) -> Wilson:
    """Wilson prior for amplitudes with multiplicity ``epsilon`` and resolution-dependent scale ``sigma_n``."""
    return Wilson(epsilon.to(sigma_n.dtype) * sigma_n, centric)


def resolution_shells(dhkl: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-count shells in ``1/d^2``: the shell index of each reflection and the shell edges in ``1/d^2``."""
    s2 = 1.0 / np.square(np.asarray(dhkl, dtype=float))
    edges = np.quantile(s2, np.linspace(0.0, 1.0, n_bins + 1))
    return np.clip(np.searchsorted(edges, s2, side="right") - 1, 0, n_bins - 1), edges


def wilson_sigma_by_resolution(
    intensity: np.ndarray, epsilon: np.ndarray, dhkl: np.ndarray, n_bins: int = 20, floor: float = 1e-3
) -> np.ndarray:
    """Estimate ``Sigma_N(d) = <I / epsilon>`` as a smooth function of resolution.

    Means of ``I / epsilon`` in equal-count shells of ``1/d^2`` are interpolated linearly in
    ``log Sigma`` against ``1/d^2`` (a Wilson plot is near-linear there), so each reflection gets its
    own value. Negative shell means (noise-dominated shells) are floored at ``floor`` times the overall mean.

    Parameters
    ----------
    intensity, epsilon, dhkl : array, shape (n_refl,)
        Per-reflection intensity estimate (e.g. a weighted mean), multiplicity and resolution.
    """
    intensity, epsilon, dhkl = (np.asarray(a, dtype=float) for a in (intensity, epsilon, dhkl))
    s2 = 1.0 / np.square(dhkl)
    n_bins = int(max(1, min(n_bins, len(s2) // 50)))
    which, _ = resolution_shells(dhkl, n_bins)
    normalised = intensity / epsilon
    total = np.bincount(which, weights=normalised, minlength=n_bins)
    count = np.maximum(np.bincount(which, minlength=n_bins), 1)
    centers = np.bincount(which, weights=s2, minlength=n_bins) / count
    overall = max(float(np.mean(normalised)), _TINY)
    shell_mean = np.maximum(total / count, floor * overall)
    return np.exp(np.interp(s2, centers, np.log(shell_mean)))
