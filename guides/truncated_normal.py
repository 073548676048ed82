"""A Normal distribution truncated to [0, inf), reparameterised, with analytic raw moments.

torch and Pyro 1.9 have no truncated normal. Sampling uses the inverse CDF on whichever side of the
truncation point is numerically safe, so a posterior far from zero and one piled against zero both work.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

__all__ = ["PositiveTruncatedNormal"]

_EPS = 1e-6


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x.square()) / math.sqrt(2.0 * math.pi)


class PositiveTruncatedNormal(TorchDistribution):
    """``Normal(loc, scale)`` restricted to ``x >= 0``."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.nonnegative  # F = 0 is possible (centric; folded draws)
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PositiveTruncatedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(PositiveTruncatedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def _alpha(self) -> torch.Tensor:
        # standardised truncation point; clamped where the mass beyond it underflows in float32
        return (-self.loc / self.scale).clamp(max=8.0)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(_EPS, 1 - _EPS)
        alpha = self._alpha.expand(shape)
        ndtr = torch.special.ndtr
        # alpha <= 0: invert the CDF from below; alpha > 0: invert the survival function (tail side)
        lower = torch.special.ndtri((ndtr(alpha) + u * (1.0 - ndtr(alpha))).clamp(_EPS, 1 - _EPS))
        upper = -torch.special.ndtri((ndtr(-alpha) * (1.0 - u)).clamp(min=1e-30))
        z = torch.where(alpha <= 0, lower, upper)
        return (self.loc + self.scale * z).clamp(min=0.0)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        log_z = torch.special.log_ndtr(-self._alpha)
        return -0.5 * z.square() - 0.5 * math.log(2 * math.pi) - self.scale.log() - log_z

    def raw_moments(self, k: int = 4) -> list[torch.Tensor]:
        """``[E x, E x^2, ..., E x^k]`` by the recurrence ``m_j = mu m_{j-1} + (j-1) s^2 m_{j-2}``."""
        alpha = self._alpha
        hazard = _phi(alpha) / torch.special.ndtr(-alpha).clamp(min=1e-30)
        m = [torch.ones_like(self.loc), self.loc + self.scale * hazard]
        for j in range(2, k + 1):
            m.append(self.loc * m[j - 1] + (j - 1) * self.scale.square() * m[j - 2])
        return m[1:]

    @property
    def mean(self) -> torch.Tensor:
        return self.raw_moments(1)[0]

    @property
    def variance(self) -> torch.Tensor:
        m1, m2 = self.raw_moments(2)
        return (m2 - m1.square()).clamp(min=0.0)
