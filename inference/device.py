"""Choosing the torch device from a config string: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:n]``."""
from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> CUDA if available else CPU; an explicit ``"cuda"`` without a GPU is an error."""
    if isinstance(spec, torch.device):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device={spec!r} is not a device: use auto, cpu or cuda[:index]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but no CUDA device is available here: use device=auto or device=cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={spec!r}: only cpu and cuda are supported")
    return device
