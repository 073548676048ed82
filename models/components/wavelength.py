"""The wavelength dependence of Laue intensities: a smooth curve in log-scale over the source band."""
from __future__ import annotations

import pyro
import torch
from pyro.nn import PyroModule, PyroParam

__all__ = ["WavelengthCurve"]


class WavelengthCurve(PyroModule):
    """``c(lambda)``: piecewise linear in log-scale on ``n_knots`` equally spaced knots over ``band``.

    A Laue spot's intensity carries the source spectrum, the detector's response and the lambda^4 and
    Lorentz factors at its wavelength; their product is smooth in lambda, so a random-walk prior on the second
    differences of the knot values (``"wavelength_smoothness"``, sd ``smoothness`` per knot) learns it without
    following noise. Outside the band the curve is held at its end values.
    """

    def __init__(self, band: tuple[float, float], n_knots: int = 16, smoothness: float = 0.1):
        super().__init__()
        lo, hi = float(band[0]), float(band[1])
        if not 0 < lo < hi:
            raise ValueError(f"WavelengthCurve: band must be (lambda_min, lambda_max) with 0 < min < max, got {band}")
        if n_knots < 2:
            raise ValueError(f"WavelengthCurve: n_knots must be >= 2, got {n_knots}")
        self.lo, self.hi, self.n_knots, self.smoothness = lo, hi, int(n_knots), float(smoothness)
        self.values = PyroParam(torch.zeros(self.n_knots))

    def forward(self, wavelength: torch.Tensor) -> torch.Tensor:
        v = self.values
        if self.n_knots > 2:
            pyro.factor("wavelength_smoothness", -0.5 * v.diff(n=2).square().sum() / self.smoothness**2)
        x = (wavelength - self.lo) / (self.hi - self.lo) * (self.n_knots - 1)
        x = x.clamp(0.0, self.n_knots - 1 - 1e-6)
        i = x.floor().long()
        t = x - i
        return v[i] * (1 - t) + v[i + 1] * t

    @torch.no_grad()
    def curve(self, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
        """(wavelengths, relative scale exp(c - mean c)) on a grid over the band, for plots."""
        lam = torch.linspace(self.lo, self.hi, n, device=self.values.device)
        with pyro.poutine.block():
            c = self(lam)
        return lam.cpu(), (c - c.mean()).exp().cpu()
