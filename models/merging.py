"""Scaling and merging of unmerged diffraction intensities as one probabilistic model.

Generative story (careless's model, in Pyro): each unique reflection ``r`` has an amplitude ``F_r`` drawn
from Wilson's prior; the ``i``-th observation of it is ``I_i ~ L(k_i F_{r(i)}^2, sigma_i)`` with ``k_i`` a
scale computed from the observation's metadata and ``L`` a noise model (Normal, Student-t, Laplace).
Inferring ``q(F)`` by maximising the ELBO both scales and merges; contrast with the inverse-variance
weighted mean (:mod:`physppl.merging.weighted_mean`), the maximum-likelihood merge.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from .components.likelihoods import likelihood_from_name
from .components.wilson import wilson_prior

__all__ = ["MergingModel", "Likelihood", "ScaleModel", "ErrorModelProtocol", "MergingModelProtocol"]


# -- what a part of your own must do (checked by physppl.merge on the first observations, before training) ----------
@runtime_checkable
class Likelihood(Protocol):
    """Noise model of the intensities: ``likelihood(loc, sigma)`` with ``loc`` (n,) the predicted intensity
    ``k F^2`` and ``sigma`` (n,) the (error-model) sigma returns a ``torch.distributions.Distribution`` with batch
    shape (n,) whose ``log_prob`` scores the observed intensities."""

    def __call__(self, loc: torch.Tensor, sigma: torch.Tensor) -> dist.Distribution: ...


@runtime_checkable
class ScaleModel(Protocol):
    """Scale model: an ``nn.Module`` (a ``PyroModule`` for parameters with constraints) built as
    ``cls(n_images=..., n_features=...)`` whose ``forward(image, metadata, inv_d2)`` takes the image index (n,)
    (long), the standardised metadata (n, n_features) and 1/d^2 (n,) and returns the log-scale (n,). Optionally
    ``initialize_from(image, log_scale) -> bool`` starts it from a conventional scaling's per-observation log-scales.
    Smoothness priors may be added as ``pyro.factor`` sites."""

    def forward(self, image: torch.Tensor, metadata: torch.Tensor, inv_d2: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ErrorModelProtocol(Protocol):
    """Error model: an ``nn.Module`` whose ``forward(sigma, predicted)`` returns the inflated sigmas (n,)."""

    def forward(self, sigma: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class MergingModelProtocol(Protocol):
    """A merging model: built as ``cls(centric=, epsilon=, sigma_n=, scale=, likelihood=, error_model=, n_images=,
    n_features=)`` (``centric``, ``epsilon``, ``sigma_n``: tensors (n_refl,); ``scale`` a module or a factory taking
    ``n_images`` and ``n_features``), a module whose ``forward(refl, image, metadata, inv_d2, sigma, intensity=None,
    subsample=None)`` samples ``F`` (n_refl,) in plate ``"refl"`` and observes ``I`` (n_obs,) in plate ``"obs"``, with
    attributes ``scale`` (its scale model, for the learned-scale outputs) and ``n_refl``.
    :class:`MergingModel` is the reference; subclass it to change one piece."""

    scale: nn.Module

    def forward(self, refl: torch.Tensor, image: torch.Tensor, metadata: torch.Tensor, inv_d2: torch.Tensor,
                sigma: torch.Tensor, intensity: torch.Tensor | None = None,
                subsample: torch.Tensor | None = None) -> torch.Tensor: ...


class MergingModel(PyroModule):
    """Wilson prior on amplitudes, a learned scale, and a noise model for the unmerged intensities.

    Sample sites
    ------------
    F : Tensor, shape (n_refl,), plate "refl" (dim -1)
        Amplitude of each unique reflection (Friedel mates separate in anomalous mode), Wilson prior.
    I : Tensor, shape (n_obs,) or (batch,), plate "obs" (dim -1), observed
        Each unmerged intensity, ``likelihood(exp(log_scale) * F[refl]^2, sigma')`` with ``sigma'`` the
        reported sigma passed through the error model (if any); subsampled when
        ``subsample`` (indices into the observations) is given, with the ELBO rescaled by Pyro.

    The scale model may add a ``pyro.factor`` site (e.g. ``"image_scale_smoothness"``).

    Parameters
    ----------
    centric, epsilon, sigma_n : Tensor, shape (n_refl,)
        Centric flags, multiplicity factors and the Wilson scale ``Sigma_N(d)`` of each reflection.
    scale : nn.Module or factory
        Scale model (see :mod:`physppl.models.components.scale`); a factory is called with
        ``n_images`` and ``n_features``.
    likelihood : callable or str
        ``likelihood(loc, sigma) -> Distribution``, or its name (``normal``, ``student_t``, ``laplace``).
    error_model : nn.Module, optional
        ``error_model(sigma, loc) -> sigma'`` inflating the reported sigmas for systematic error
        (see :class:`~physppl.models.components.error_model.ErrorModel`); ``None`` uses them as reported.
    """

    def __init__(
        self,
        centric: torch.Tensor,
        epsilon: torch.Tensor,
        sigma_n: torch.Tensor,
        scale: nn.Module | Callable[..., nn.Module],
        likelihood: Callable | str = "normal",
        error_model: nn.Module | None = None,
        n_images: int | None = None,
        n_features: int | None = None,
    ):
        super().__init__()
        self.register_buffer("centric", torch.as_tensor(centric, dtype=torch.bool))
        self.register_buffer("epsilon", torch.as_tensor(epsilon, dtype=torch.get_default_dtype()))
        self.register_buffer("sigma_n", torch.as_tensor(sigma_n, dtype=torch.get_default_dtype()))
        self.scale = scale if isinstance(scale, nn.Module) else scale(n_images=n_images, n_features=n_features)
        self.likelihood = likelihood_from_name(likelihood) if isinstance(likelihood, str) else likelihood
        self.error_model = error_model

    @property
    def n_refl(self) -> int:
        return int(self.centric.shape[0])

    def forward(
        self,
        refl: torch.Tensor,
        image: torch.Tensor,
        metadata: torch.Tensor,
        inv_d2: torch.Tensor,
        sigma: torch.Tensor,
        intensity: torch.Tensor | None = None,
        subsample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with pyro.plate("refl", self.n_refl, dim=-1):
            F = pyro.sample("F", wilson_prior(self.centric, self.epsilon, self.sigma_n))
        idx = torch.arange(refl.shape[0]) if subsample is None else subsample
        # the scale runs outside the plate: its own prior terms (pyro.factor) are global, not per observation
        log_scale = self.scale(image[idx], metadata[idx], inv_d2[idx])
        with pyro.plate("obs", refl.shape[0], dim=-1, subsample=idx):
            loc = log_scale.exp() * F[..., refl[idx]].square()
            obs = None if intensity is None else intensity[idx]
            sd = sigma[idx] if self.error_model is None else self.error_model(sigma[idx], loc)
            return pyro.sample("I", self.likelihood(loc, sd), obs=obs)
