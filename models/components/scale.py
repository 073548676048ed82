"""Scale models: the multiplicative factor between |F|^2 and an observed intensity, from per-observation metadata.

Every scale model is a ``PyroModule`` with the same call,

    ``log_scale = scale_model(image, metadata, inv_d2)``  -> Tensor, shape (n,)

where ``image`` (long, shape (n,)) is the 0-based image index, ``metadata`` (shape (n, n_features)) the
standardised metadata and ``inv_d2`` (shape (n,)) is 1/d^2 in 1/A^2. Parameters are point estimates
(learned by maximising the ELBO); smoothness priors enter as ``pyro.factor`` sites. All constructors take
``n_images`` and ``n_features`` so a config can build any of them the same way.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pyro
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn

__all__ = ["MLPScale", "ImageScale", "BFactorScale", "FixedScale", "CompositeScale", "initialize_scale"]


class MLPScale(PyroModule):
    """A small neural network from metadata to log-scale, as in careless.

    Parameters
    ----------
    n_features : int
        Width of the metadata input.
    width, depth : int
        Hidden width and number of hidden layers.
    """

    def __init__(self, n_features: int, n_images: int | None = None, width: int = 32, depth: int = 3):
        super().__init__()
        if n_features < 1:
            raise ValueError("MLPScale needs at least one metadata feature (data.metadata is empty)")
        layers: list[nn.Module] = []
        d_in = n_features
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ELU()]
            d_in = width
        last = nn.Linear(d_in, 1)
        # Start at scale 1 everywhere: the data were normalised, so the fit begins from the identity.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)  # a plain torch child: its parameters are the module's

    def forward(self, image: torch.Tensor, metadata: torch.Tensor, inv_d2: torch.Tensor) -> torch.Tensor:
        return self.net(metadata).squeeze(-1)


class ImageScale(PyroModule):
    """One log-scale per block of ``block_size`` images (optionally a B-factor), tied by a random-walk prior.

    The smoothness prior ``log k[b+1] - log k[b] ~ Normal(0, smoothness)`` (and likewise for B with
    ``b_smoothness``) lets well-measured blocks inform their neighbours; it is a ``pyro.factor`` named
    ``"image_scale_smoothness"``. Blocks of several images help sparse data: on the HEWL 5% subset (~14
    observations per image) per-image scales fit noise (CC to the full-data merge 0.980 against 0.984 with
    blocks of 20, conventional scaling).
    """

    def __init__(
        self,
        n_images: int,
        n_features: int | None = None,
        smoothness: float = 0.01,
        b_factor: bool = False,
        b_smoothness: float = 0.5,
        block_size: int = 1,
    ):
        super().__init__()
        if n_images < 1:
            raise ValueError(f"ImageScale needs n_images >= 1, got {n_images}")
        if block_size < 1:
            raise ValueError(f"ImageScale needs block_size >= 1, got {block_size}")
        self.block_size = int(block_size)
        n_images = (n_images + self.block_size - 1) // self.block_size
        self.smoothness = float(smoothness)
        self.b_smoothness = float(b_smoothness)
        self.use_b = bool(b_factor)
        self.log_k = PyroParam(torch.zeros(n_images))
        if self.use_b:
            self.b = PyroParam(torch.zeros(n_images))

    @torch.no_grad()
    def initialize_from(self, image: torch.Tensor, log_scale: torch.Tensor) -> bool:
        """Start each image's log-scale at the mean of given per-observation log-scales (e.g. a conventional
        scaling), so the model and a guide initialised from that scaling start consistent."""
        n = self.log_k.shape[0]
        block = image // self.block_size
        count = torch.bincount(block, minlength=n).clamp(min=1)
        self.log_k = PyroParam(torch.bincount(block, weights=log_scale.double(), minlength=n).float() / count)
        return True

    def forward(self, image: torch.Tensor, metadata: torch.Tensor, inv_d2: torch.Tensor) -> torch.Tensor:
        log_k = self.log_k
        block = image // self.block_size
        penalty = log_k.diff().square().sum() / self.smoothness**2
        out = log_k[block]
        if self.use_b:
            b = self.b
            penalty = penalty + b.diff().square().sum() / self.b_smoothness**2
            out = out - 0.5 * b[block] * inv_d2  # exp(-2 B s^2) with s^2 = 1/(4 d^2)
        pyro.factor("image_scale_smoothness", -0.5 * penalty)
        return out


class BFactorScale(PyroModule):
    """A global scale and B-factor: ``log k - B / (2 d^2)``."""

    def __init__(self, n_images: int | None = None, n_features: int | None = None):
        super().__init__()
        self.log_k = PyroParam(torch.zeros(()))
        self.b = PyroParam(torch.zeros(()))

    @torch.no_grad()
    def initialize_from(self, image: torch.Tensor, log_scale: torch.Tensor) -> bool:
        self.log_k = PyroParam(log_scale.float().mean())
        return True

    def forward(self, image: torch.Tensor, metadata: torch.Tensor, inv_d2: torch.Tensor) -> torch.Tensor:
        return self.log_k - 0.5 * self.b * inv_d2


class FixedScale(PyroModule):
    """A known scale (default 1): for problems where scaling is done, and for exact reference posteriors."""

    def __init__(self, n_images: int | None = None, n_features: int | None = None, log_scale: float = 0.0):
        super().__init__()
        self.log_scale = float(log_scale)

    def forward(self, image: torch.Tensor, metadata: torch.Tensor, inv_d2: torch.Tensor) -> torch.Tensor:
        return torch.full(image.shape, self.log_scale, dtype=inv_d2.dtype)


class CompositeScale(PyroModule):
    """Product of several scale models (sum of their log-scales), e.g. an MLP times per-image factors.

    Parameters
    ----------
    parts : sequence of scale models, or of factories called with ``n_images`` and ``n_features``
    """

    def __init__(
        self,
        parts: Sequence[nn.Module | Callable[..., nn.Module]],
        n_images: int | None = None,
        n_features: int | None = None,
    ):
        super().__init__()
        built = [p if isinstance(p, nn.Module) else p(n_images=n_images, n_features=n_features) for p in parts]
        if not built:
            raise ValueError("CompositeScale needs at least one part")
        self.parts = PyroModule[nn.ModuleList](built)

    def initialize_from(self, image: torch.Tensor, log_scale: torch.Tensor) -> bool:
        """Initialise the first part that can be (only one, so the log-scales are not counted twice)."""
        return any(initialize_scale(part, image, log_scale) for part in self.parts)

    def forward(self, image: torch.Tensor, metadata: torch.Tensor, inv_d2: torch.Tensor) -> torch.Tensor:
        return sum(part(image, metadata, inv_d2) for part in self.parts)


def initialize_scale(scale: nn.Module, image: torch.Tensor, log_scale: torch.Tensor) -> bool:
    """Start ``scale`` from per-observation log-scales where the model supports it; True if it did.

    Models without ``initialize_from`` (the MLP: it starts at scale 1; a fixed scale) are left as they are.
    """
    init = getattr(scale, "initialize_from", None)
    return bool(init(image, log_scale)) if init is not None else False
