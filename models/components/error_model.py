"""Error model: inflate reported sigmas for systematic errors the scale model cannot capture.

``sigma'^2 = (sdfac * sigma)^2 + (sdadd * I_pred)^2``, the form AIMLESS and DIALS use (their SDFAC and SDADD),
with ``sdfac`` and ``sdadd`` learned with the scale. Without it, the strongest reflections, whose counting
errors are below the scale model's residual error, get posterior intervals that are too narrow.
"""
from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

__all__ = ["ErrorModel", "ReportedSigma"]


class ErrorModel(PyroModule):
    """Learned ``sdfac`` (multiplier of the reported sigma) and ``sdadd`` (fraction of the predicted intensity).

    Parameters
    ----------
    sdfac, sdadd : float
        Initial values; ``sdfac`` is bounded below by ``min_sdfac`` so the model cannot claim better-than-
        reported precision by much.
    """

    def __init__(self, sdfac: float = 1.0, sdadd: float = 0.02, min_sdfac: float = 0.5):
        super().__init__()
        self.min_sdfac = float(min_sdfac)
        self.sdfac = PyroParam(torch.tensor(float(sdfac)), constraints.greater_than(self.min_sdfac))
        self.sdadd = PyroParam(torch.tensor(float(sdadd)), constraints.positive)

    def forward(self, sigma: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((self.sdfac * sigma).square() + (self.sdadd * predicted).square())


class ReportedSigma(PyroModule):
    """No error model: the reported sigmas as they are."""

    def forward(self, sigma: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        return sigma
