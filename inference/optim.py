"""Optimisers with per-parameter-group learning rates, configured by parameter-name prefix."""
from __future__ import annotations

from typing import Sequence

from pyro.optim import ClippedAdam

__all__ = ["clipped_adam"]


def clipped_adam(
    lr: float = 0.01,
    lr_by_prefix: dict[str, float] | None = None,
    lrd: float = 1.0,
    clip_norm: float = 10.0,
    betas: Sequence[float] = (0.9, 0.999),
) -> ClippedAdam:
    """Pyro's ClippedAdam with an exponential schedule (``lr * lrd**step``) and learning rates by name prefix.

    ``lr_by_prefix={"scale": 0.002}`` gives every parameter whose Pyro name starts with ``scale`` its own rate;
    e.g. the few shared parameters of a model need smaller steps than thousands of whitened guide parameters.
    """
    overrides = dict(lr_by_prefix or {})

    def args(name: str) -> dict:
        rate = next((v for k, v in overrides.items() if name.startswith(k)), lr)
        return {"lr": float(rate), "lrd": float(lrd), "clip_norm": float(clip_norm), "betas": tuple(betas)}

    return ClippedAdam(args)
