"""The inverse Ising problem's named parts (models, guides, engines), each defined once for Python and the command
line."""
from __future__ import annotations

from typing import Any, Callable

import torch
from pyro.infer import Trace_ELBO

from physppl.guides.inverse_ising import low_rank_guide, mean_field_guide
from physppl.inference.fit import ProtocolError
from physppl.inference.nuts import NUTSEngine
from physppl.inference.optim import ClippedAdam
from physppl.inference.presets import Preset, call_accepting, resolve_named
from physppl.inference.svi import SVIEngine
from physppl.models.inverse_ising import InverseIsing

__all__ = ["MODELS", "GUIDES", "ENGINES", "resolve_model", "resolve_guide", "resolve_engine", "build_guide"]

_FROM_DATA = ("n_sites", "lattice_side")  # the model's arguments that come from the data
MODELS: dict[str, Preset] = {
    # J ~ Normal(0, 1): weakly informative for couplings of order 1/T with T ~ 1-5
    "normal": Preset(InverseIsing, partial=True, exclude=_FROM_DATA),
    # a sparse interaction graph: most J_ij near 0, a few of order 1/T (Laplace's scale is its mean |J|)
    "laplace": Preset(InverseIsing, partial=True, exclude=_FROM_DATA, prior="laplace", coupling_scale=0.2),
}
_FROM_FIT = ("model", "init_values", "init_hessian")  # a guide's arguments that come from the model and the MAP fit
GUIDES: dict[str, Preset] = {
    "mean_field": Preset(mean_field_guide, partial=True, exclude=_FROM_FIT),
    "low_rank": Preset(low_rank_guide, partial=True, exclude=_FROM_FIT, rank=10),
}
ENGINES: dict[str, Preset] = {
    # The guide starts at the MAP with the Hessian's spread, so SVI only polishes: a small, fast-decaying rate keeps
    # the means' step noise below the posterior sd (~0.02 at n = 4000; the low-rank guide's means drifted 0.69 sd
    # from the MAP with lrd 0.999, 0.26 sd with 0.995, the mean field's 0.08 either way); 8 vectorised particles
    # cost about one.
    "svi": Preset(SVIEngine, optim=Preset(ClippedAdam, lr=0.005, lrd=0.995, clip_norm=10.0, betas=(0.9, 0.99)),
                  loss=Preset(Trace_ELBO, num_particles=8, vectorize_particles=True, max_plate_nesting=1),
                  max_steps=3000, min_steps=500, window=100, rtol=1e-2, checkpoint_every=0),
    # started at the MAP (init): no warm-up is spent finding the mode; a dense mass matrix for correlated couplings
    "nuts": Preset(NUTSEngine, num_samples=500, warmup_steps=300, num_chains=2, jit_compile=True, full_mass=True),
}


def resolve_model(value: Any, **options: Any) -> Callable:
    """A model factory ``model(n_sites=..., lattice_side=...)``: a name of :data:`MODELS` (with ``options`` on
    top of its preset), or a factory (``options`` bound to it)."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in MODELS:
            raise ValueError(f"unknown model {value!r}: choose one of {', '.join(MODELS)}, or pass your own factory")
        return MODELS[key].build(**options)
    if isinstance(value, Preset):
        return value.build(**options)
    if not callable(value):
        raise ProtocolError(f"model {value!r} is not a factory model(n_sites=..., lattice_side=...)")
    if options:
        import functools

        return functools.partial(value, **options)
    return value


def resolve_guide(value: Any) -> Callable:
    guide = resolve_named(value, GUIDES, "guide")
    if not callable(guide):
        raise ProtocolError(f"guide {guide!r} is not a factory guide(model, init_values=None, init_hessian=None)")
    return guide


def resolve_engine(value: Any):
    engine = resolve_named(value, ENGINES, "engine")
    if not callable(getattr(engine, "fit", None)):
        raise ProtocolError(f"engine {type(engine).__name__} has no fit(model, guide, data, ...) method")
    return engine


def build_guide(factory: Callable, model, init_values: dict | None, hessian: torch.Tensor | None) -> torch.nn.Module:
    """``factory(model, init_values=..., init_hessian=...)``, passing only the arguments the factory takes."""
    options = {"init_values": init_values, "init_hessian": hessian}
    return call_accepting(factory, model, **{k: v for k, v in options.items() if v is not None})
