"""Observation noise models: the distribution of a measurement given its prediction and reported sigma.

Each is a small callable ``likelihood(loc, sigma) -> Distribution`` so that a model takes one as an
injected part and the choice is a config change (``model/likelihood=student_t``).
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch

__all__ = ["NormalLikelihood", "StudentTLikelihood", "LaplaceLikelihood", "LIKELIHOODS", "likelihood_from_name"]


class NormalLikelihood:
    """Gaussian errors with the reported sigma (the model behind the inverse-variance weighted mean)."""

    def __call__(self, loc: torch.Tensor, sigma: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, sigma)

    def __repr__(self) -> str:
        return "NormalLikelihood()"


class StudentTLikelihood:
    """Student-t errors scaled by the reported sigma: heavy tails make the fit robust to outliers.

    Parameters
    ----------
    dof : float
        Degrees of freedom (smaller is more robust; careless uses values around 4-16).
    """

    def __init__(self, dof: float = 4.0):
        if not dof > 0:
            raise ValueError(f"StudentTLikelihood: dof must be > 0, got {dof}")
        self.dof = float(dof)

    def __call__(self, loc: torch.Tensor, sigma: torch.Tensor) -> dist.Distribution:
        return dist.StudentT(torch.as_tensor(self.dof, dtype=loc.dtype), loc, sigma)

    def __repr__(self) -> str:
        return f"StudentTLikelihood(dof={self.dof})"


class LaplaceLikelihood:
    """Laplace errors with the same standard deviation as the reported sigma (scale = sigma / sqrt 2)."""

    def __call__(self, loc: torch.Tensor, sigma: torch.Tensor) -> dist.Distribution:
        return dist.Laplace(loc, sigma / math.sqrt(2.0))

    def __repr__(self) -> str:
        return "LaplaceLikelihood()"


# Names accepted wherever a likelihood is configured by a plain string (``model.likelihood=student_t`` in a sweep).
LIKELIHOODS = {"normal": NormalLikelihood, "student_t": StudentTLikelihood, "laplace": LaplaceLikelihood}


def likelihood_from_name(name: str):
    """The likelihood called ``name`` (one of :data:`LIKELIHOODS`), with its default parameters."""
    try:
        return LIKELIHOODS[str(name).strip().lower()]()
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}: expected one of {', '.join(LIKELIHOODS)} "
                         "(or a config group option, model/likelihood=...)") from None
