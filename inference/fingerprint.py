"""What a checkpoint was trained on, so that a resumed run refuses to continue another model's optimisation.

A fingerprint is a flat ``{key: text}`` dict: the model's and guide's structure (their module trees, as torch
prints them, with every submodule's class and settings), the objective, the optimiser, and each data tensor's shape,
dtype and content hash. A caller may add its own keys (e.g. the configuration options that define the problem).
Options that only say how long or how often to train (``max_steps``, ``checkpoint_every``, ``progress``, ...) are
not in it, so they may change on resume.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["fingerprint", "fingerprint_differences", "MAY_CHANGE_ON_RESUME"]

MAY_CHANGE_ON_RESUME = ("max_steps", "min_steps", "window", "rtol", "checkpoint_every", "progress", "threads",
                        "device")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        arr = value.detach().cpu().contiguous().numpy()
        digest = hashlib.sha1(arr.tobytes()).hexdigest()[:16]
        return f"tensor{tuple(arr.shape)} {arr.dtype} sha1:{digest}"
    if isinstance(value, np.ndarray):
        return _describe(torch.from_numpy(np.ascontiguousarray(value)))
    return repr(value)


def _structure(module: torch.nn.Module) -> str:
    """The module tree as torch prints it, plus each module's plain settings (a likelihood object, a count): torch
    prints only submodules, and a model's noise model is often a plain attribute. Values whose repr is an address
    (``<... at 0x...>``) are left out: they differ between runs of the same configuration."""
    lines = [f"{type(module).__module__}.{type(module).__qualname__}", repr(module)]
    for name, sub in module.named_modules():
        for attr, value in sorted(vars(sub).items()):
            if attr.startswith("_") or attr == "training" or isinstance(value, torch.nn.Module):
                continue
            text = _describe(value)
            if " at 0x" not in text:
                lines.append(f"{name + '.' if name else ''}{attr} = {text}")
    return "\n".join(lines)


def fingerprint(model: torch.nn.Module | None = None, guide: torch.nn.Module | None = None,
                data: Mapping[str, Any] | None = None, objective: Any = None, optim: Any = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The fingerprint of a fit (see the module's docstring); ``None`` parts are left out."""
    out: dict[str, str] = {}
    for key, part in (("model", model), ("guide", guide)):
        if part is not None:
            out[key] = _structure(part)
    if objective is not None:
        settings = {k: v for k, v in sorted(vars(objective).items()) if isinstance(v, (int, float, bool, str))}
        out["objective"] = f"{type(objective).__name__}{settings}"
    if optim is not None:
        out["optim"] = repr(optim)
    for key, value in sorted((data or {}).items()):
        out[f"data.{key}"] = _describe(value)
    for key, value in sorted((extra or {}).items()):
        out[str(key)] = _describe(value)
    return out


def fingerprint_differences(saved: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """The keys whose values differ, or that only one of the two has."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
