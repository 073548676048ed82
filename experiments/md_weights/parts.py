"""The named parts of frame weighting (guides, engines), each defined once for Python and the command line."""
from __future__ import annotations

from typing import Any, Callable

import torch
from pyro.infer import Trace_ELBO

from physppl.guides.md_weights import DirichletFrameGuide, logistic_normal_guide, map_initial_values
from physppl.inference.fit import ProtocolError
from physppl.inference.nuts import NUTSEngine
from physppl.inference.optim import ClippedAdam
from physppl.inference.presets import Preset, call_accepting, resolve_named
from physppl.inference.svi import SVIEngine

__all__ = ["GUIDES", "ENGINES", "resolve_guide", "resolve_engine", "build_guide", "initial_values"]

_FROM_MODEL = ("model", "groups", "init_values")  # a guide's arguments that come from the model and the data
GUIDES: dict[str, Preset] = {
    "dirichlet": Preset(DirichletFrameGuide, partial=True, exclude=_FROM_MODEL),
    "logistic_normal": Preset(logistic_normal_guide, partial=True, exclude=_FROM_MODEL),
}
ENGINES: dict[str, Preset] = {
    # 8 vectorised particles per step cost little more than one (one pass over the frames)
    "svi": Preset(SVIEngine, optim=Preset(ClippedAdam, lr=0.05, lrd=0.999, clip_norm=10.0, betas=(0.9, 0.99)),
                  loss=Preset(Trace_ELBO, num_particles=8, vectorize_particles=True, max_plate_nesting=1),
                  max_steps=3000, min_steps=500, window=100, rtol=1e-3, checkpoint_every=500),
    "nuts": Preset(NUTSEngine),
}


def resolve_guide(value: Any) -> Callable:
    guide = resolve_named(value, GUIDES, "guide")
    if not callable(guide):
        raise ProtocolError(f"guide {guide!r} is not a factory guide(model, groups=None, init_values=None)")
    return guide


def resolve_engine(value: Any):
    engine = resolve_named(value, ENGINES, "engine")
    if not callable(getattr(engine, "fit", None)):
        raise ProtocolError(f"engine {type(engine).__name__} has no fit(model, guide, data, ...) method")
    return engine


def build_guide(factory: Callable, model, labels, init: dict | None) -> torch.nn.Module:
    """``factory(model, groups=labels, init_values=init)``, passing only the arguments the factory takes."""
    return call_accepting(factory, model, groups=labels, **({} if init is None else {"init_values": init}))


def initial_values(model, data: dict, steps: int = 300, lr: float = 0.05,
                   subsample: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MAP weights, scale and offset with the noise held at its prior median, then noise matched to the fit
    (on the voxels ``subsample`` only, when given)."""
    return map_initial_values(model, steps=steps, lr=lr, subsample=subsample, **data)
