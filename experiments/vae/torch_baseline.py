"""The same VAE written in plain PyTorch: the reference for the benchmark and for regression tests.

It reuses physppl's encoder and decoder networks unchanged (so the architecture is identical by construction)
and writes the ELBO and the importance-weighted bound out by hand, without Pyro. Bernoulli likelihood only
(the one the benchmark uses).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from physppl.guides.vae import ConvEncoder, MLPEncoder
from physppl.models.vae import ConvDecoder, MLPDecoder

__all__ = ["TorchVAE"]


class TorchVAE(nn.Module):
    """Gaussian encoder + Bernoulli decoder with a standard Normal prior, trained by the reparameterised ELBO.

    Parameters mirror :class:`~physppl.models.vae.VAEModel` and :class:`~physppl.guides.vae.VAEGuide`;
    ``analytic_kl`` chooses the closed-form KL (as Pyro's ``TraceMeanField_ELBO``) or the single-sample
    estimate ``log q(z) - log p(z)`` (as ``Trace_ELBO``).
    """

    def __init__(self, event_shape: Sequence[int], latent_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "softplus", architecture: str = "mlp", channels: Sequence[int] = (32, 16),
                 encoder_channels: Sequence[int] = (16, 32), padding_mode: str = "zeros",
                 analytic_kl: bool = True, min_scale: float = 1e-4):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.latent_dim = int(latent_dim)
        self.analytic_kl = bool(analytic_kl)
        if architecture == "mlp":
            self.encoder = MLPEncoder(self.event_shape, latent_dim, hidden, activation, min_scale)
            self.decoder = MLPDecoder(latent_dim, self.event_shape, hidden, activation)
        elif architecture == "conv":
            self.encoder = ConvEncoder(self.event_shape, latent_dim, encoder_channels, hidden, activation,
                                       padding_mode, min_scale)
            self.decoder = ConvDecoder(latent_dim, self.event_shape, channels, hidden, activation, padding_mode)
        else:
            raise ValueError(f"unknown architecture {architecture!r}; choose mlp or conv")

    def _log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(z)
        ll = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        return ll.flatten(-len(self.event_shape)).sum(-1)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """One-sample ELBO of each row of ``x``, shape (n,)."""
        loc, scale, _ = self.encoder(x)
        q = torch.distributions.Normal(loc, scale)
        z = q.rsample()
        if self.analytic_kl:
            kl = (0.5 * (loc.square() + scale.square() - 1.0) - scale.log()).sum(-1)
        else:
            kl = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)
        return self._log_lik(x, z) - kl

    def loss(self, x: torch.Tensor, n_data: int | None = None) -> torch.Tensor:
        """``-ELBO`` of the minibatch ``x`` scaled to a data set of ``n_data`` rows (as Pyro's subsampled plate)."""
        scale = 1.0 if n_data is None else n_data / x.shape[0]
        return -self.elbo(x).sum() * scale

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_particles: int, chunk: int = 100) -> torch.Tensor:
        """``log p(x, z_k) - log q(z_k | x)`` for ``num_particles`` draws, shape (num_particles, n), float64."""
        loc, scale, _ = self.encoder(x)
        q = torch.distributions.Normal(loc, scale)
        out = []
        for k0 in range(0, num_particles, chunk):
            z = q.sample((min(chunk, num_particles - k0),))
            log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            out.append((self._log_lik(x, z) + log_pz - q.log_prob(z).sum(-1)).double())
        return torch.cat(out)

    def iwae(self, x: torch.Tensor, num_particles: int = 1000, chunk: int = 100) -> torch.Tensor:
        """Importance-weighted bound per row of ``x``, shape (n,)."""
        lw = self.log_weights(x, num_particles, chunk)
        return torch.logsumexp(lw, 0) - math.log(num_particles)
