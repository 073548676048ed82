"""Conditional normalizing-flow guides for the knife-edge beam model: ``q(theta | x)`` amortized over scans.

The guide has the model's signature and site names (``mu_x, mu_y, sig_x, sig_y, rho, flux, div``): it samples
the stacked parameters from a :class:`~physppl.inference.flows.ConditionalBoxFlow` (an auxiliary site
``theta``) and hands each to the model's site as a point mass, so Pyro's ELBO against the model's likelihood
trains it (amortized VI), while neural posterior estimation trains the same flow by maximum likelihood on
simulated pairs (:mod:`physppl.inference.npe`).
"""
from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from physppl.models.beam import DEFAULT_BOUNDS, PARAM_NAMES
from physppl.inference.flows import ConditionalBoxFlow

__all__ = ["KnifeEdgeSummaries", "KnifeEdgeFlowGuide", "knife_edge_flow"]


class KnifeEdgeSummaries(nn.Module):
    """Physics features of knife-edge scans, optionally after the raw scan.

    Per axis: the low and high plateaus (background, background + flux), and the centre and width of the
    beam from the moments of the normalised transmission curve (``mu = p_end - int F dp``,
    ``E p^2 = p_end^2 - 2 int p F dp``), which are linear in the data and so robust to noise.

    Parameters
    ----------
    positions : Tensor, shape (n_per_axis,)
        Blade positions (mm), the same on every axis.
    n_axes : int
        Number of scans concatenated in an observation.
    include_raw : bool
        Also return the raw scan (features = raw values, then summaries).
    plateau_points : int
        Points averaged at each end for the plateaus.
    """

    def __init__(self, positions: torch.Tensor | Sequence[float] | None = None, n_axes: int = 2,
                 include_raw: bool = True, plateau_points: int = 5):
        super().__init__()
        from physppl.models.beam import blade_positions

        pos = blade_positions() if positions is None else torch.as_tensor(positions, dtype=torch.get_default_dtype())
        self.register_buffer("positions", pos)
        self.n_axes = int(n_axes)
        self.include_raw = bool(include_raw)
        self.k = int(plateau_points)
        self.out_dim = 4 * self.n_axes + (self.n_axes * pos.numel() if include_raw else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scans = x.unflatten(-1, (self.n_axes, self.positions.numel()))
        lo = scans[..., : self.k].mean(-1, keepdim=True)
        hi = scans[..., -self.k :].mean(-1, keepdim=True)
        f = (scans - lo) / (hi - lo).abs().clamp_min(1.0)  # normalised transmission, ~ the beam's CDF
        p = self.positions
        dp = p[1:] - p[:-1]
        mid_f = 0.5 * (f[..., 1:] + f[..., :-1])  # trapezoid rule
        mid_p = 0.5 * (p[1:] + p[:-1])
        end = p[-1]
        mean = end - (mid_f * dp).sum(-1)
        second = end**2 - 2 * (mid_f * mid_p * dp).sum(-1)
        width = (second - mean.square()).clamp_min(1e-4).sqrt()
        summaries = torch.cat([lo.squeeze(-1), hi.squeeze(-1), mean, width], dim=-1)
        return torch.cat([x, summaries], dim=-1) if self.include_raw else summaries


def knife_edge_flow(
    low: Sequence[float] | torch.Tensor | None = None,
    high: Sequence[float] | torch.Tensor | None = None,
    positions: Sequence[float] | torch.Tensor | None = None,
    features: str = "raw+summaries",
    embedding_dims: Sequence[int] = (128,),
    context_dim: int = 64,
    n_transforms: int = 3,
    hidden_dims: Sequence[int] = (64, 64),
    count_bins: int = 8,
    bound: float = 5.0,
    fast: str = "density",
) -> ConditionalBoxFlow:
    """A :class:`ConditionalBoxFlow` over the 7 beam parameters given a pair of knife-edge scans.

    ``features``: ``"raw"`` (the z-scored scan), ``"summaries"`` (the 8 physics features only) or
    ``"raw+summaries"`` (both, the default). ``low``/``high`` default to the reference prior box. ``fast``:
    ``"density"`` for neural posterior estimation, ``"sampling"`` for amortized VI (see ConditionalBoxFlow).
    """
    low = torch.tensor([DEFAULT_BOUNDS[n][0] for n in PARAM_NAMES]) if low is None else torch.as_tensor(low)
    high = torch.tensor([DEFAULT_BOUNDS[n][1] for n in PARAM_NAMES]) if high is None else torch.as_tensor(high)
    choices = {"raw": None, "summaries": False, "raw+summaries": True}
    if features not in choices:
        raise ValueError(f"knife_edge_flow: features must be one of {', '.join(choices)}, got {features!r}")
    n_pos = 100 if positions is None else len(positions)
    feats = None if features == "raw" else KnifeEdgeSummaries(positions, include_raw=choices[features])
    return ConditionalBoxFlow(low, high, features=feats, x_dim=2 * n_pos, embedding_dims=embedding_dims,
                              context_dim=context_dim, n_transforms=n_transforms, hidden_dims=hidden_dims,
                              count_bins=count_bins, bound=bound, fast=fast)


class KnifeEdgeFlowGuide(PyroModule):
    """Amortized guide ``q(theta | x)`` for :class:`~physppl.models.beam.KnifeEdgeBeamModel`.

    Sample sites (plate ``"obs"`` at dim -1, ``n`` scans or the minibatch given by ``subsample``)
    ---------------------------------------------------------------------------------------------
    theta : Tensor, shape (n, 7), auxiliary
        The stacked parameters, drawn from the conditional flow given each scan.
    mu_x, mu_y, sig_x, sig_y, rho, flux, div : Tensor, shape (n,)
        Point masses at the columns of ``theta`` (the model's latent sites).

    Parameters
    ----------
    flow : ConditionalBoxFlow
        The conditional density estimator (its box should be the model's prior box). Its parameters are the
        guide's (a child module).
    """

    def __init__(self, flow: ConditionalBoxFlow, param_names: Sequence[str] = PARAM_NAMES):
        super().__init__()
        if flow.dim != len(param_names):
            raise ValueError(f"KnifeEdgeFlowGuide: the flow has {flow.dim} dimensions for {len(param_names)} parameters")
        self.flow = flow
        self.param_names = tuple(param_names)

    def forward(self, x: torch.Tensor | None = None, n: int | None = None, subsample: torch.Tensor | None = None):
        if x is None:
            raise ValueError("KnifeEdgeFlowGuide needs the observed scans x: it is conditioned on them")
        with pyro.plate("obs", x.shape[0], dim=-1, subsample=subsample) as idx:
            q = self.flow.distribution(x.index_select(0, idx.to(x.device)))
            theta = pyro.sample("theta", q, infer={"is_auxiliary": True})
            for i, name in enumerate(self.param_names):
                pyro.sample(name, dist.Delta(theta[..., i]))
        return theta
