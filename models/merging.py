"""Scaling and merging of unmerged diffraction intensities as one probabilistic model.

Generative story (careless's model, in Pyro): each unique reflection ``r`` has an amplitude ``F_r`` drawn
from Wilson's prior; the ``i``-th observation of it is ``I_i ~ L(k_i F_{r(i)}^2, sigma_i)`` with ``k_i`` a
scale computed from the observation's metadata and ``L`` a noise model (Normal, Student-t, Laplace).
Inferring ``q(F)`` by maximising the ELBO both scales and merges; contrast with the inverse-variance
weighted mean (:mod:`physppl.merging.weighted_mean`), the maximum-likelihood merge.

Several data sets merged together give each its own reflections (``dataset``, ``refl_key``) under one scale, and
the prior may tie them (:mod:`~physppl.models.components.double_wilson`); :class:`LaueMergingModel` adds the
wavelength curve of polychromatic data and predicts a spot as the sum of its harmonics.
"""
from __future__ import annotations

import copy
from typing import Callable, Protocol, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from .components.double_wilson import DoubleWilsonPrior, WilsonPrior
from .components.likelihoods import likelihood_from_name
from .components.wavelength import WavelengthCurve

__all__ = ["MergingModel", "LaueMergingModel", "PRIORS", "Likelihood", "ScaleModel", "ErrorModelProtocol", "MergingModelProtocol"]


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


PRIORS = {"wilson": WilsonPrior, "double_wilson": DoubleWilsonPrior}


def _bound_prior(prior, centric, epsilon, sigma_n, dataset, refl_key) -> nn.Module:
    """The prior module for these reflections: a name, a class or factory, or a module (copied: one model's
    reflections must not rebind another's)."""
    if prior is None or isinstance(prior, str):
        name = prior or "wilson"
        if name not in PRIORS:
            raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIORS)}")
        prior = PRIORS[name]()
    elif not isinstance(prior, nn.Module):
        prior = prior()
    else:
        prior = copy.deepcopy(prior)
    if not callable(getattr(prior, "bind", None)):
        raise TypeError(f"prior {type(prior).__name__} has no bind(centric, epsilon, sigma_n, dataset=, refl_key=)")
    return prior.bind(centric, epsilon, sigma_n, dataset=dataset, refl_key=refl_key) or prior


class MergingModel(PyroModule):
    """Wilson prior on amplitudes, a learned scale, and a noise model for the unmerged intensities.

    Sample sites
    ------------
    F : Tensor, shape (n_refl,), plate "refl" (dim -1)
        Amplitude of each unique reflection (Friedel mates separate in anomalous mode; with several data sets,
        each data set's reflections), Wilson's prior or the double-Wilson prior between data sets.
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
        prior: nn.Module | str | Callable[[], nn.Module] | None = None,
        dataset: torch.Tensor | None = None,
        refl_key=None,
    ):
        super().__init__()
        self.register_buffer("centric", torch.as_tensor(centric, dtype=torch.bool))
        self.register_buffer("epsilon", torch.as_tensor(epsilon, dtype=torch.get_default_dtype()))
        self.register_buffer("sigma_n", torch.as_tensor(sigma_n, dtype=torch.get_default_dtype()))
        self.prior = _bound_prior(prior, self.centric, self.epsilon, self.sigma_n, dataset, refl_key)
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
            F = pyro.sample("F", self.prior())
        idx = torch.arange(refl.shape[0], device=refl.device) if subsample is None else subsample
        # the scale runs outside the plate: its own prior terms (pyro.factor) are global, not per observation
        log_scale = self.scale(image[idx], metadata[idx], inv_d2[idx])
        with pyro.plate("obs", refl.shape[0], dim=-1, subsample=idx):
            loc = log_scale.exp() * F[..., refl[idx]].square()
            obs = None if intensity is None else intensity[idx]
            sd = sigma[idx] if self.error_model is None else self.error_model(sigma[idx], loc)
            return pyro.sample("I", self.likelihood(loc, sd), obs=obs)


class LaueMergingModel(MergingModel):
    """Merging of Laue (polychromatic) data: the scale learns the source's wavelength curve, and a spot that
    records several harmonics (h, 2h, 3h, ... at wavelengths lambda, lambda/2, ...) is predicted as their sum.

    Sample sites
    ------------
    F : Tensor, shape (n_refl,), plate "refl" (dim -1)
        As :class:`MergingModel`.
    I : Tensor, shape (n_obs,) or (batch,), plate "obs" (dim -1), observed
        Each spot's intensity, ``likelihood(sum_j k_i(lambda_ij) F[refl_ij]^2, sigma')`` over the spot's
        components ``j`` (one for a singlet), with ``log k_i(lambda) = scale(metadata_i) + c(lambda)``.

    The wavelength curve ``c`` (:class:`~physppl.models.components.wavelength.WavelengthCurve`, parameter
    ``lambda_curve``) adds the ``pyro.factor`` site ``"wavelength_smoothness"``.

    Parameters
    ----------
    wavelength_range : (float, float)
        The source band in A (the data's ``band``), where the curve has its knots.
    n_knots, curve_smoothness : int, float
        Knots of the piecewise-linear log-curve and the sd of its second differences.
    Others as :class:`MergingModel`.
    """

    # the base's arguments written out, not **kwargs: the command line's config is generated from this signature
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
        prior: nn.Module | str | Callable[[], nn.Module] | None = None,
        dataset: torch.Tensor | None = None,
        refl_key=None,
        wavelength_range: tuple[float, float] = (0.9, 1.3),
        n_knots: int = 16,
        curve_smoothness: float = 0.1,
    ):
        super().__init__(centric, epsilon, sigma_n, scale, likelihood=likelihood, error_model=error_model,
                         n_images=n_images, n_features=n_features, prior=prior, dataset=dataset, refl_key=refl_key)
        self.lambda_curve = WavelengthCurve(wavelength_range, n_knots=n_knots, smoothness=curve_smoothness)

    def forward(self, refl, image, metadata, inv_d2, sigma, intensity=None, subsample=None, wavelength=None,
                harmonic_refl=None, harmonic_wavelength=None) -> torch.Tensor:
        if wavelength is None:
            raise ValueError("LaueMergingModel needs each spot's wavelength: set data.wavelength=<column>")
        with pyro.plate("refl", self.n_refl, dim=-1):
            F = pyro.sample("F", self.prior())
        idx = torch.arange(refl.shape[0], device=refl.device) if subsample is None else subsample
        # scale and curve outside the plate: their smoothness factors are global, not per observation
        base = self.scale(image[idx], metadata[idx], inv_d2[idx])
        if harmonic_refl is None:
            log_k = base + self.lambda_curve(wavelength[idx])
        else:
            comp = harmonic_refl[idx]
            log_k = base.unsqueeze(-1) + self.lambda_curve(harmonic_wavelength[idx])
        with pyro.plate("obs", refl.shape[0], dim=-1, subsample=idx):
            if harmonic_refl is None:
                loc = log_k.exp() * F[..., refl[idx]].square()
            else:
                terms = log_k.exp() * F[..., comp.clamp(min=0)].square()
                loc = torch.where(comp >= 0, terms, torch.zeros_like(terms)).sum(-1)
            obs = None if intensity is None else intensity[idx]
            sd = sigma[idx] if self.error_model is None else self.error_model(sigma[idx], loc)
            return pyro.sample("I", self.likelihood(loc, sd), obs=obs)
