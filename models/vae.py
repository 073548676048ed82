"""Variational autoencoder, generative side: a Normal latent prior and a neural decoder likelihood.

Generative story (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"): each configuration ``x_i`` (an
image, a lattice of spins, any array of fixed shape) has a latent code ``z_i ~ N(0, I_d)``, and its pixels
are independent given the code, ``x_ij ~ p(x_ij | f_theta(z_i)_j)`` with ``f_theta`` a neural network (the
decoder). The matching amortized encoder ``q_phi(z | x)`` is :class:`physppl.guides.vae.VAEGuide`; training
both by maximising the ELBO is the VAE.

The network blocks here (:func:`mlp`, :class:`MLPDecoder`, :class:`ConvDecoder`) are plain ``nn.Module`` s so a
plain-PyTorch VAE can reuse them unchanged (see ``experiments/benchmarks/vae.py``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LIKELIHOODS",
    "ACTIVATIONS",
    "VAEModel",
    "MLPDecoder",
    "ConvDecoder",
    "mlp",
    "activation",
    "check_support",
    "conv_grid",
]

LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")
ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU,
               "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


def mlp(sizes: Sequence[int], act: str, final_activation: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(a), int(b)))
        if final_activation or k < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def _check_sizes(name: str, sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in (sizes or [])]
    if any(s < 1 for s in sizes):
        raise ValueError(f"{name} must be positive integers, got {list(sizes)}")
    return sizes


def conv_grid(event_shape: Sequence[int], n_levels: int) -> tuple[int, int, int]:
    """``(channels, H, W)`` of an image event shape for the conv nets, which halve H and W ``n_levels`` times."""
    shape = tuple(int(s) for s in event_shape)
    if len(shape) == 2:
        c, h, w = 1, *shape
    elif len(shape) == 3:
        c, h, w = shape
    else:
        raise ValueError(f"the conv networks need images, event shape (H, W) or (C, H, W); got {shape}: "
                         "use the MLP variant (model.decoder=mlp) for flat features")
    f = 2**n_levels
    if h % f or w % f:
        raise ValueError(f"the conv networks halve the image {n_levels} times, so H and W must be multiples of {f}; "
                         f"got {h} x {w}: use fewer channels entries or the MLP variant")
    return c, h, w


class MLPDecoder(nn.Module):
    """``z (..., latent_dim) -> output (..., *event_shape)`` through fully connected layers."""

    def __init__(self, latent_dim: int, event_shape: Sequence[int], hidden: Sequence[int] = (400,),
                 act: str = "softplus"):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.net = mlp([latent_dim, *_check_sizes("hidden", hidden), math.prod(self.event_shape)], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(*z.shape[:-1], *self.event_shape)


class ConvDecoder(nn.Module):
    """``z -> output (..., *event_shape)``: a linear map to a coarse grid, then (upsample x2, 3x3 conv) blocks.

    Nearest-neighbour upsampling + convolution rather than transposed convolution: no checkerboard artefacts, and
    the convolution can use ``padding_mode="circular"``, which respects periodic boundaries (Ising lattices).
    """

    def __init__(self, latent_dim: int, event_shape: Sequence[int], channels: Sequence[int] = (32, 16),
                 hidden: Sequence[int] = (), act: str = "softplus", padding_mode: str = "zeros"):
        super().__init__()
        channels = _check_sizes("channels", channels)
        if not channels:
            raise ValueError("ConvDecoder needs at least one channels entry")
        self.event_shape = tuple(int(s) for s in event_shape)
        c_out, h, w = conv_grid(self.event_shape, len(channels))
        self.grid = (channels[0], h // 2 ** len(channels), w // 2 ** len(channels))
        self.fc = mlp([latent_dim, *_check_sizes("hidden", hidden), math.prod(self.grid)], act, final_activation=True)
        blocks: list[nn.Module] = []
        for c_in, c_next in zip(channels, channels[1:] + [channels[-1]]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c_in, c_next, 3, padding=1, padding_mode=padding_mode), activation(act)]
        blocks.append(nn.Conv2d(channels[-1], c_out, 3, padding=1, padding_mode=padding_mode))
        self.conv = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.grid)
        return self.conv(h).reshape(*batch, *self.event_shape)


def check_support(x: np.ndarray | torch.Tensor, likelihood: str, source: str = "data") -> None:
    """Raise ``ValueError`` naming ``source`` if ``x`` (n, ...) lies outside the support of ``likelihood``."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{source}: non-finite value {a[tuple(bad)]} at index {tuple(int(i) for i in bad)}")
    if likelihood == "bernoulli":
        bad = (a != 0) & (a != 1)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            values = np.unique(a)
            hint = ""
            if set(values.tolist()) <= {-1, 1}:
                hint = " The values are +-1 spins: map them to {0, 1} (data.spins=true)."
            elif a.min() >= 0 and a.max() <= 1:
                hint = " For grey levels in [0, 1] use model.likelihood=continuous_bernoulli, or binarise them."
            raise ValueError(f"{source}: the bernoulli likelihood needs values in {{0, 1}}; found {a[first]!r} at "
                             f"index {first} ({values.size} distinct values, range [{a.min()}, {a.max()}]).{hint}")
    elif likelihood == "continuous_bernoulli":
        if a.min() < 0 or a.max() > 1:
            first = tuple(int(i) for i in np.argwhere((a < 0) | (a > 1))[0])
            raise ValueError(f"{source}: the continuous_bernoulli likelihood needs values in [0, 1]; found "
                             f"{a[first]!r} at index {first} (range [{a.min()}, {a.max()}]): rescale the data "
                             "(data.rescale=minmax) or use model.likelihood=gaussian")


class VAEModel(PyroModule):
    """``p(x, z) = N(z; 0, I) p(x | decoder(z))`` for a batch of configurations of shape ``event_shape``.

    Sample sites
    ------------
    z : Tensor, shape (n, latent_dim), plate "data" (dim -1), event dim 1
        Latent code of each configuration, standard Normal prior.
    x : Tensor, shape (n, *event_shape), plate "data" (dim -1), observed, event dims ``len(event_shape)``
        The configuration; pixels independent given ``z``. With ``subsample`` (indices into the data) the plate
        holds that minibatch and Pyro rescales the ELBO to the full data set.

    Parameters
    ----------
    event_shape : sequence of int
        Shape of one configuration, e.g. ``(32, 32)`` for an Ising lattice, ``(8, 8)`` for a digit.
    latent_dim : int
        Dimension of ``z``.
    likelihood : {"bernoulli", "continuous_bernoulli", "gaussian"}
        ``bernoulli`` for spins/binary pixels (decoder gives logits); ``continuous_bernoulli`` (Loaiza-Ganem &
        Cunningham 2019) for grey levels in [0, 1]; ``gaussian`` for real values (decoder gives the mean, the
        per-pixel standard deviation is a learned parameter bounded below by ``min_scale``).
    decoder : {"mlp", "conv"}
    hidden : sequence of int
        Widths of the hidden layers (MLP), or of the layers before the coarse grid (conv).
    activation : str
        One of :data:`ACTIVATIONS`.
    channels : sequence of int
        Conv decoder: channels of each upsampling level, coarse to fine.
    padding_mode : {"zeros", "circular", "reflect", "replicate"}
        Conv decoder padding; ``circular`` for periodic lattices.
    min_scale : float
        Gaussian likelihood: lower bound of the per-pixel standard deviation.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        latent_dim: int = 2,
        likelihood: str = "bernoulli",
        decoder: str = "mlp",
        hidden: Sequence[int] = (400,),
        activation: str = "softplus",
        channels: Sequence[int] = (32, 16),
        padding_mode: str = "zeros",
        min_scale: float = 1e-2,
    ):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        if not self.event_shape or any(s < 1 for s in self.event_shape):
            raise ValueError(f"VAEModel: event_shape must be non-empty positive sizes, got {event_shape}")
        if int(latent_dim) < 1:
            raise ValueError(f"VAEModel: latent_dim must be >= 1, got {latent_dim}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"VAEModel: unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        self.latent_dim = int(latent_dim)
        self.likelihood = likelihood
        self.decoder_kind = decoder
        if decoder == "mlp":
            self.decoder = MLPDecoder(self.latent_dim, self.event_shape, hidden, activation)
        elif decoder == "conv":
            self.decoder = ConvDecoder(self.latent_dim, self.event_shape, channels, hidden, activation, padding_mode)
        else:
            raise ValueError(f"VAEModel: unknown decoder {decoder!r}; choose mlp or conv")
        if likelihood == "gaussian":
            # per-pixel sd = softplus(raw) + min_scale: bounded below so a constant pixel cannot drive it to 0
            self.raw_scale = PyroParam(torch.full(self.event_shape, math.log(math.expm1(0.1))))
        self.min_scale = float(min_scale)
        self.register_buffer("prior_loc", torch.zeros(self.latent_dim))
        self.register_buffer("prior_scale", torch.ones(self.latent_dim))

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    def prior(self) -> dist.Distribution:
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def likelihood_dist(self, out: torch.Tensor) -> dist.Distribution:
        """``p(x | z)`` from the decoder output ``out`` (..., *event_shape)."""
        if self.likelihood == "bernoulli":
            d = dist.Bernoulli(logits=out)
        elif self.likelihood == "continuous_bernoulli":
            d = dist.ContinuousBernoulli(logits=out)
        else:
            d = dist.Normal(out, F.softplus(self.raw_scale) + self.min_scale)
        return d.to_event(self.event_dim)

    def forward(self, x: torch.Tensor | None = None, subsample: torch.Tensor | None = None,
                n: int | None = None) -> torch.Tensor:
        """Score ``x`` (n, *event_shape), or generate ``n`` configurations when ``x`` is None."""
        if x is None and n is None:
            raise ValueError("VAEModel: give the data x or the number of configurations n")
        n_data = x.shape[0] if x is not None else int(n)
        prior = self.prior()
        with pyro.plate("data", n_data, subsample=subsample, dim=-1) as idx:
            z = pyro.sample("z", prior)
            obs = None if x is None else (x if subsample is None else x[idx])
            return pyro.sample("x", self.likelihood_dist(self.decoder(z)), obs=obs)

    # -- helpers for analysis (no Pyro effects) ----------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of ``p(x | z)`` (pixel probabilities for Bernoulli), shape (..., *event_shape)."""
        return self.likelihood_dist(self.decoder(z)).mean

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``log p(x | z)`` summed over pixels; ``z`` (..., n, latent_dim) broadcasts against ``x`` (n, ...)."""
        return self.likelihood_dist(self.decoder(z)).log_prob(x)

    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """``n`` configurations from the prior: the decoder mean (``mean=True``) or a draw of ``p(x | z)``."""
        z = self.prior().sample((n,))
        d = self.likelihood_dist(self.decoder(z))
        return d.mean if mean else d.sample()
