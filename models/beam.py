"""Knife-edge scans of a 2-D Gaussian beam: the reference surrogate simulator as a vectorised Pyro model.

A beam with centre ``(mu_x, mu_y)``, widths ``(sig_x, sig_y)`` and correlation ``rho`` is scanned by a blade
along x, then along y. At blade position ``p`` the detector sees the transmitted part of the beam, a marginal
of the 2-D Gaussian: ``rate(p) = flux * Phi((p - mu) / sig) + background``. The detector is Poisson-Gaussian
(gain 1, read noise ``read_noise``), approximated by ``Normal(rate, sqrt(rate + read_noise^2))``. Neither the
correlation ``rho`` nor the divergence ``div`` reach the data (each scan sees one marginal at the sample), so
their posterior equals their prior: the two dimensions an inversion must leave at the prior.

Because the likelihood is tractable, the same model gives a reference posterior (NUTS) for any scan.
"""
from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = ["PARAM_NAMES", "PARAM_UNITS", "DEFAULT_BOUNDS", "KnifeEdgeBeamModel", "blade_positions"]

PARAM_NAMES = ("mu_x", "mu_y", "sig_x", "sig_y", "rho", "flux", "div")
PARAM_UNITS = {"mu_x": "mm", "mu_y": "mm", "sig_x": "mm", "sig_y": "mm", "rho": "", "flux": "counts", "div": "mrad"}
# The reference surrogate's uniform prior box (keep as the default so results compare across tools and runs).
DEFAULT_BOUNDS = {"mu_x": (-1.0, 1.0), "mu_y": (-1.0, 1.0), "sig_x": (0.1, 0.6), "sig_y": (0.1, 0.6),
                  "rho": (-0.9, 0.9), "flux": (500.0, 2000.0), "div": (0.05, 0.5)}


def blade_positions(n_per_axis: int = 100, start: float = -3.0, stop: float = 3.0) -> torch.Tensor:
    """Blade positions in mm, evenly spaced over ``[start, stop]``, shape (n_per_axis,)."""
    return torch.linspace(start, stop, n_per_axis)


class KnifeEdgeBeamModel(PyroModule):
    """Uniform box prior on the beam parameters and a Poisson-Gaussian likelihood of the two knife-edge scans.

    Sample sites (``n`` = number of scans, plate ``"obs"`` at dim -1)
    ----------------------------------------------------------------
    mu_x, mu_y : Tensor, shape (n,), plate "obs"
        Beam centre in mm, ``Uniform(-1, 1)``.
    sig_x, sig_y : Tensor, shape (n,), plate "obs"
        Beam widths (standard deviations) in mm, ``Uniform(0.1, 0.6)``.
    rho : Tensor, shape (n,), plate "obs"
        Correlation of the 2-D Gaussian, ``Uniform(-0.9, 0.9)``; does not reach the data.
    flux : Tensor, shape (n,), plate "obs"
        Total beam flux in counts, ``Uniform(500, 2000)``.
    div : Tensor, shape (n,), plate "obs"
        Divergence in mrad, ``Uniform(0.05, 0.5)``; does not reach the data.
    x : Tensor, shape (n, 2 * n_per_axis), plate "obs", event dim 1, observed when given
        The x-scan followed by the y-scan (counts per blade position).

    Parameters
    ----------
    positions : Tensor, shape (n_per_axis,), optional
        Blade positions in mm (default: 100 evenly over [-3, 3] mm), the same for both axes.
    background : float
        Known background rate (counts) added to the transmitted flux.
    read_noise : float
        Detector read noise (counts); the noise sd is ``sqrt(rate + read_noise^2)``.
    bounds : dict, optional
        ``{name: (low, high)}`` overriding the prior box of any parameter.
    """

    param_names = PARAM_NAMES

    def __init__(
        self,
        positions: torch.Tensor | Sequence[float] | None = None,
        background: float = 10.0,
        read_noise: float = 5.0,
        bounds: dict | None = None,
    ):
        super().__init__()
        pos = blade_positions() if positions is None else torch.as_tensor(positions, dtype=torch.get_default_dtype())
        if pos.dim() != 1 or pos.numel() < 2:
            raise ValueError(f"KnifeEdgeBeamModel: positions must be a 1-D array of >= 2 blade positions, got shape {tuple(pos.shape)}")
        if not bool((pos[1:] > pos[:-1]).all()):
            raise ValueError("KnifeEdgeBeamModel: blade positions must increase strictly")
        box = dict(DEFAULT_BOUNDS)
        for name, lh in (bounds or {}).items():
            if name not in box:
                raise ValueError(f"KnifeEdgeBeamModel: unknown parameter {name!r} in bounds; known: {', '.join(PARAM_NAMES)}")
            box[name] = (float(lh[0]), float(lh[1]))
        for name, (lo, hi) in box.items():
            if not lo < hi:
                raise ValueError(f"KnifeEdgeBeamModel: bounds of {name} must satisfy low < high, got ({lo}, {hi})")
        if box["sig_x"][0] <= 0 or box["sig_y"][0] <= 0 or box["flux"][0] < 0:
            raise ValueError("KnifeEdgeBeamModel: widths must have positive lower bounds and flux a non-negative one")
        self.register_buffer("positions", pos)
        self.register_buffer("low", torch.tensor([box[n][0] for n in PARAM_NAMES]))
        self.register_buffer("high", torch.tensor([box[n][1] for n in PARAM_NAMES]))
        self.background = float(background)
        self.read_noise = float(read_noise)

    # -- pieces usable without Pyro ------------------------------------------------------------------
    @property
    def x_dim(self) -> int:
        return 2 * int(self.positions.numel())

    @property
    def theta_dim(self) -> int:
        return len(PARAM_NAMES)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior box as (low, high), each shape (7,), in the order of ``PARAM_NAMES``."""
        return self.low, self.high

    def rate(self, theta: torch.Tensor) -> torch.Tensor:
        """Noise-free count rate, shape (..., 2 * n_per_axis), for ``theta`` of shape (..., 7)."""
        mu = theta[..., 0:2].unsqueeze(-1)  # (..., 2, 1): x then y
        sig = theta[..., 2:4].unsqueeze(-1)
        flux = theta[..., 5:6].unsqueeze(-1)
        transmitted = flux * torch.special.ndtr((self.positions - mu) / sig)  # (..., 2, n_per_axis)
        return (transmitted + self.background).flatten(-2)

    def noise_sd(self, rate: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(rate.clamp_min(0.0) + self.read_noise**2)

    def likelihood(self, theta: torch.Tensor) -> dist.Distribution:
        """``p(x | theta)`` with batch shape ``theta.shape[:-1]`` and event shape (2 * n_per_axis,)."""
        rate = self.rate(theta)
        return dist.Normal(rate, self.noise_sd(rate)).to_event(1)

    def log_likelihood(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(x | theta)``, broadcasting ``theta`` (..., 7) against ``x`` (..., 2 * n_per_axis)."""
        return self.likelihood(theta).log_prob(x)

    def prior(self) -> dist.Distribution:
        """The box prior on the stacked parameters, event shape (7,)."""
        return dist.Uniform(self.low, self.high).to_event(1)

    def simulate(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noisy scans for parameters ``theta`` (..., 7): shape (..., 2 * n_per_axis). Vectorised."""
        with torch.no_grad():
            rate = self.rate(theta)
            noise = torch.randn(rate.shape, generator=generator, dtype=rate.dtype, device=rate.device)
            return rate + self.noise_sd(rate) * noise

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from the prior box, shape (n, 7)."""
        u = torch.rand((n, self.theta_dim), generator=generator, dtype=self.low.dtype, device=self.low.device)
        return self.low + (self.high - self.low) * u

    # -- the Pyro model --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | None = None, n: int | None = None, subsample: torch.Tensor | None = None):
        """Sample the parameters of ``n`` beams (or of each row of ``x``) and their scans.

        ``x``: observed scans, shape (n, 2 * n_per_axis); ``subsample``: indices of the rows in this minibatch.
        Returns the stacked parameters, shape (n or batch, 7).
        """
        if x is not None:
            if x.dim() != 2 or x.shape[-1] != self.x_dim:
                raise ValueError(f"KnifeEdgeBeamModel: x must have shape (n, {self.x_dim}), got {tuple(x.shape)}")
            n = x.shape[0]
        n = 1 if n is None else int(n)
        with pyro.plate("obs", n, dim=-1, subsample=subsample) as idx:
            values = [pyro.sample(name, dist.Uniform(self.low[i], self.high[i]))
                      for i, name in enumerate(PARAM_NAMES)]
            theta = torch.stack(torch.broadcast_tensors(*values), dim=-1)
            obs = None if x is None else x.index_select(0, idx.to(x.device))
            pyro.sample("x", self.likelihood(theta), obs=obs)
        return theta

