"""The named parts of a merge (scale models, noise models, error models, guides, engines), each defined once.

``physppl.merge(scale="mlp_image", likelihood="student_t", ...)`` and the command line's ``model/scale=mlp_image``,
``model/likelihood=student_t`` ... use the same :class:`~physppl.inference.presets.Preset`. Your own part goes
where a name does (an object, a class or a factory); it is checked against its protocol
(:mod:`physppl.models.merging`) on the first observations, before any training, so a part that does not fit fails
with a message naming what is missing.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from physppl.guides.merging import FAMILIES, MergingGuide, PairedMergingGuide
from physppl.inference.fit import ProtocolError
from physppl.inference.nuts import NUTSEngine
from physppl.inference.optim import ClippedAdam
from physppl.inference.presets import Preset, resolve_named
from physppl.inference.svi import SVIEngine
from physppl.models.components.double_wilson import DoubleWilsonPrior, WilsonPrior
from physppl.models.components.error_model import ErrorModel, ReportedSigma
from physppl.models.components.likelihoods import LIKELIHOODS as LIKELIHOOD_CLASSES
from physppl.models.components.scale import BFactorScale, CompositeScale, FixedScale, ImageScale, MLPScale

from .weighted_mean import WeightedMeanEngine

__all__ = ["SCALES", "LIKELIHOODS", "ERROR_MODELS", "GUIDES", "ENGINES", "MERGING_OPTIM", "resolve_scale",
           "resolve_likelihood", "resolve_error_model", "resolve_prior", "PRIORS", "resolve_guide", "resolve_engine", "check_parts"]

_DATA_SIZES = ("n_images", "n_features")  # a scale model's arguments that come from the data
SCALES: dict[str, Preset] = {
    # careless's neural network on metadata, times per-image factors tied by a random-walk prior
    "mlp_image": Preset(CompositeScale, partial=True, exclude=_DATA_SIZES,
                        parts=[Preset(MLPScale, partial=True, exclude=_DATA_SIZES),
                               Preset(ImageScale, partial=True, exclude=_DATA_SIZES)]),
    # serial (XFEL) stills: the MLP on metadata (partiality from the Ewald offset, absorption) times a scale and a
    # B factor per shot, independent from shot to shot (a loose tie only: a shot's pulse is not its neighbour's)
    "mlp_shot": Preset(CompositeScale, partial=True, exclude=_DATA_SIZES,
                       parts=[Preset(MLPScale, partial=True, exclude=_DATA_SIZES),
                              Preset(ImageScale, partial=True, exclude=_DATA_SIZES, smoothness=10.0, b_factor=True,
                                     b_smoothness=100.0)]),
    "mlp": Preset(MLPScale, partial=True, exclude=_DATA_SIZES),
    "image": Preset(ImageScale, partial=True, exclude=_DATA_SIZES),
    "image_b": Preset(ImageScale, partial=True, exclude=_DATA_SIZES, b_factor=True),
    "bfactor": Preset(BFactorScale, partial=True, exclude=_DATA_SIZES),
    "fixed": Preset(FixedScale, partial=True, exclude=_DATA_SIZES),
}
LIKELIHOODS: dict[str, Preset] = {name: Preset(cls) for name, cls in LIKELIHOOD_CLASSES.items()}
ERROR_MODELS: dict[str, Preset] = {"sdfac_sdadd": Preset(ErrorModel), "none": Preset(ReportedSigma)}
PRIORS: dict[str, Preset] = {"wilson": Preset(WilsonPrior), "double_wilson": Preset(DoubleWilsonPrior)}
GUIDES: dict[str, Preset] = {family: Preset(MergingGuide, partial=True, family=family) for family in FAMILIES}
# several data sets under the double-Wilson prior: each reflection correlated with its parent's
GUIDES["paired_folded_normal"] = Preset(PairedMergingGuide, partial=True, exclude=("parent",))

# Guide parameters are whitened (steps in units of each reflection's sd) and take the larger rate; the few shared
# parameters of the scale and error models need smaller steps (measured on simulated data: a scale rate of 0.002
# reached in 200 steps the loss that 0.0005 reached in 600 and a single rate of 0.01 in 2000).
# The Laue wavelength curve and a learned double-Wilson r are such shared parameters too (present in some models).
MERGING_OPTIM = Preset(ClippedAdam, lr=0.05, module_lr={"scale": 0.002, "error_model": 0.002, "lambda_curve?": 0.01,
                                                        "prior?": 0.002}, lrd=0.999,
                       clip_norm=10.0, betas=(0.9, 0.99))
ENGINES: dict[str, Preset] = {
    "svi": Preset(SVIEngine, optim=MERGING_OPTIM, loss=Preset(Trace_ELBO, num_particles=1), max_steps=2000, min_steps=300, window=100, rtol=1e-3,
                  checkpoint_every=500),
    # Laue data (measured on PYP, double-Wilson, Normal likelihood): 8,000 steps with a slower decay reach careless's
    # agreement with the dark model (CC to Fc 0.878 against 0.829 at 3,000 steps and lrd 0.999, where the
    # convergence test stopped) and raise the chromophore's q-weighted difference peak from 3.5 to 5.5 sd
    "svi_long": Preset(SVIEngine, optim=Preset(ClippedAdam, lr=0.05, module_lr=MERGING_OPTIM.kwargs["module_lr"],
                                               lrd=0.9997, clip_norm=10.0, betas=(0.9, 0.99)),
                       loss=Preset(Trace_ELBO, num_particles=1), max_steps=8000, min_steps=8000, window=100,
                       rtol=1e-3, checkpoint_every=500),
    "nuts": Preset(NUTSEngine),
    "weighted_mean": Preset(WeightedMeanEngine),
}


def _instance(value: Any, what: str) -> Any:
    """A class given where an object is expected is built with its defaults."""
    if inspect.isclass(value):
        try:
            return value()
        except TypeError as err:
            raise ProtocolError(f"{what} {value.__name__} cannot be built without arguments ({err}): pass an instance") from None
    return value


def resolve_likelihood(value: Any) -> Callable:
    lik = _instance(resolve_named(value, LIKELIHOODS, "likelihood"), "likelihood")
    if not callable(lik):
        raise ProtocolError(f"likelihood {type(lik).__name__} does not meet the Likelihood protocol "
                        "(physppl.models.merging.Likelihood): missing method __call__(loc, sigma) -> Distribution")
    return lik


def resolve_error_model(value: Any) -> nn.Module | None:
    if value is None:
        return None
    em = _instance(resolve_named(value, ERROR_MODELS, "error model"), "error model")
    if not isinstance(em, nn.Module) or type(em).forward is nn.Module.forward:
        raise ProtocolError(f"error model {type(em).__name__} does not meet the ErrorModel protocol (an nn.Module): "
                        "missing method forward(sigma, predicted) -> sigma'")
    return em


def resolve_prior(value: Any) -> nn.Module | None:
    """The prior module, or None for Wilson's (so a model of your own need not take a prior)."""
    if value is None or (isinstance(value, str) and value == "wilson"):
        return None
    prior = _instance(resolve_named(value, PRIORS, "prior"), "prior")
    if isinstance(prior, WilsonPrior):
        return None
    if not callable(getattr(prior, "bind", None)):
        raise ProtocolError(f"prior {type(prior).__name__} has no bind(centric, epsilon, sigma_n, dataset=, refl_key=) "
                            "method (physppl.models.merging.MergingModel, parameter prior)")
    return prior


def resolve_scale(value: Any) -> nn.Module | Callable[..., nn.Module]:
    """A scale module, or a factory called later with ``n_images`` and ``n_features``."""
    scale = resolve_named(value, SCALES, "scale model")
    if isinstance(scale, nn.Module):
        return scale
    if not callable(scale):
        raise ProtocolError(f"scale model {scale!r} is neither an nn.Module nor a factory of one")
    return scale


def resolve_guide(value: Any) -> nn.Module | Callable[..., nn.Module]:
    """A guide module, or a factory called with ``init_mean`` and ``init_sd`` (per reflection, file units / norm)."""
    guide = resolve_named(value, GUIDES, "guide")
    if isinstance(guide, nn.Module) or callable(guide):
        return guide
    raise ProtocolError(f"guide {guide!r} is neither an nn.Module nor a factory of one")


def resolve_engine(value: Any):
    engine = resolve_named(value, ENGINES, "engine")
    if not callable(getattr(engine, "fit", None)):
        raise ProtocolError(f"engine {type(engine).__name__} has no fit(model, guide, data, ...) method "
                        "(physppl.inference.fit.Engine)")
    return engine


def _missing_forward(module: Any) -> bool:
    return not isinstance(module, nn.Module) or type(module).forward is nn.Module.forward


@torch.no_grad()
def check_parts(model: nn.Module, data: dict, n: int = 4) -> None:
    """Call the model's scale, error and noise models on the first ``n`` observations and check what they return;
    raise ``TypeError`` naming the part, the protocol and what was wrong."""
    idx = torch.arange(min(n, int(data["refl"].shape[0])), device=data["refl"].device)
    scale = getattr(model, "scale", None)
    if scale is not None:
        if _missing_forward(scale):
            raise ProtocolError(f"scale model {type(scale).__name__} does not meet the ScaleModel protocol "
                            "(physppl.models.merging.ScaleModel): missing method forward(image, metadata, inv_d2) "
                            "-> log_scale")
        with poutine.block():  # its smoothness factor is not part of this check
            out = scale(data["image"][idx], data["metadata"][idx], data["inv_d2"][idx])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(idx),):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ProtocolError(f"scale model {type(scale).__name__}.forward returned {shape} for {len(idx)} observations;"
                            f" the ScaleModel protocol expects a log-scale tensor of shape ({len(idx)},)")
    loc = data["intensity"][idx].abs() + 1.0
    sigma = data["sigma"][idx]
    error_model = getattr(model, "error_model", None)
    if error_model is not None:
        out = error_model(sigma, loc)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(idx),):
            raise ProtocolError(f"error model {type(error_model).__name__}.forward(sigma, predicted) must return sigmas of "
                            f"shape ({len(idx)},)")
        sigma = out
    likelihood = getattr(model, "likelihood", None)
    if likelihood is not None:
        d = likelihood(loc, sigma)
        if not isinstance(d, torch.distributions.Distribution):
            raise ProtocolError(f"likelihood {type(likelihood).__name__}(loc, sigma) returned {type(d).__name__}; the "
                            "Likelihood protocol expects a torch Distribution")
        lp = d.log_prob(data["intensity"][idx])
        if tuple(lp.shape) != (len(idx),):
            raise ProtocolError(f"likelihood {type(likelihood).__name__}(loc, sigma).log_prob(I) has shape "
                            f"{tuple(lp.shape)} for {len(idx)} observations; expected ({len(idx)},)")
