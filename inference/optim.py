"""Optimisers for the SVI engine: a factory that builds a torch optimiser over a model's and a guide's parameters,
with learning rates per submodule."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from pyro.optim.clipped_adam import ClippedAdam as _ClippedAdamOptimizer
from torch import nn

__all__ = ["ClippedAdam", "parameter_groups"]


def _submodule(modules: Mapping[str, nn.Module], path: str) -> nn.Module | None:
    """``path`` ("scale", "error_model", "guide.encoder", ...) looked up in the model, then in the guide; None for a
    part the model declares but left out (an attribute set to None, e.g. no error model)."""
    head, _, rest = path.partition(".")
    if head in modules:  # an explicit owner: "model.scale" / "guide.encoder"
        owner = modules[head]
        return owner if not rest else owner.get_submodule(rest)
    found = []
    for owner in modules.values():
        try:
            found.append(owner.get_submodule(path))
        except AttributeError:
            continue
    if not found:
        if any(getattr(owner, path, 0) is None for owner in modules.values()):
            return None
        names = sorted({f"{k}.{n}" if n else k for k, m in modules.items() for n, _ in m.named_children()})
        raise ValueError(f"module_lr: no submodule {path!r} in the {' or the '.join(modules)}; "
                         f"submodules: {', '.join(names) or 'none'}")
    return found[0]


def parameter_groups(modules: Mapping[str, nn.Module], module_lr: Mapping[str, float] | None, lr: float) -> list[dict]:
    """Torch parameter groups: one per entry of ``module_lr`` (its submodule's parameters at that rate), and the
    remaining parameters at ``lr``. A parameter shared by two modules goes to the first group that claims it."""
    seen: set[int] = set()
    groups = []
    for path, rate in (module_lr or {}).items():
        optional = path.endswith("?")  # "lambda_curve?": a part only some models have
        path = path.rstrip("?")
        try:
            module = _submodule(modules, path)
        except ValueError:
            if optional:
                continue
            raise
        if module is None:
            continue
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": float(rate), "name": path})
    rest = [p for m in modules.values() for p in m.parameters() if p.requires_grad and id(p) not in seen
            and not seen.add(id(p))]
    if rest:
        groups.insert(0, {"params": rest, "lr": float(lr), "name": "default"})
    return groups


class ClippedAdam:
    """Pyro's ClippedAdam (Adam with element-wise gradient clipping and the schedule ``lr * lrd**step``) as a
    torch optimiser over the model's and the guide's parameters.

    Parameters
    ----------
    lr : float
        Learning rate of every parameter not named in ``module_lr``.
    module_lr : dict, optional
        Learning rates of submodules by attribute path, looked up in the model and then the guide (``"scale"``,
        ``"error_model"``; ``"guide.encoder"`` to be explicit). An unknown path is an error naming the submodules,
        unless it ends in ``?`` (``"lambda_curve?"``: a part only some models have).
        E.g. the few shared parameters of a merging model's scale need smaller steps than thousands of whitened
        guide parameters.
    lrd : float
        Learning-rate decay per step.
    clip_norm : float
        Bound of each gradient element.
    betas : pair of float
        Adam's moment decay rates.
    """

    def __init__(self, lr: float = 0.01, module_lr: dict[str, float] | None = None, lrd: float = 1.0,
                 clip_norm: float = 10.0, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"ClippedAdam: lr must be > 0, got {lr}")
        if not 0 < lrd <= 1:
            raise ValueError(f"ClippedAdam: lrd must be in (0, 1], got {lrd}")
        self.lr = float(lr)
        self.module_lr = {str(k): float(v) for k, v in (module_lr or {}).items()}
        self.lrd = float(lrd)
        self.clip_norm = float(clip_norm)
        self.betas = tuple(float(b) for b in betas)
        self.weight_decay = float(weight_decay)

    def __call__(self, modules: Mapping[str, nn.Module]) -> torch.optim.Optimizer:
        groups = parameter_groups(modules, self.module_lr, self.lr)
        if not groups:
            raise ValueError("ClippedAdam: the model and guide have no trainable parameters")
        return _ClippedAdamOptimizer(groups, lr=self.lr, betas=self.betas, clip_norm=self.clip_norm, lrd=self.lrd,
                                     weight_decay=self.weight_decay)

    def __repr__(self) -> str:
        return (f"ClippedAdam(lr={self.lr}, module_lr={self.module_lr}, lrd={self.lrd}, clip_norm={self.clip_norm}, "
                f"betas={self.betas})")
