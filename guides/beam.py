"""Conditional normalizing-flow guides for the knife-edge beam model: ``q(theta | x)`` amortized over scans.

The guide has the model's signature and site names (``mu_x, mu_y, sig_x, sig_y, rho, flux, div``): it samples
the stacked parameters from a :class:`~physppl.inference.flows.ConditionalBoxFlow` (an auxiliary site
``theta``) and hands each to the model's site as a point mass, so Pyro's ELBO against the model's likelihood
trains it (amortized VI), while neural posterior estimation trains the same flow by maximum likelihood on
simulated pairs (:mod:`physppl.inference.npe`).
"""
from __future__ import annotations

import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from physppl.models.beam import DEFAULT_BOUNDS, PARAM_NAMES
from physppl.inference.estimators import PosteriorEstimator, build_estimator
from physppl.inference.flows import ConditionalBoxFlow

__all__ = ["KnifeEdgeSummaries", "KnifeEdgeFit", "KnifeEdgePilot", "KnifeEdgeFlowGuide", "knife_edge_flow",
           "knife_edge_estimator"]


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


class KnifeEdgeFit(nn.Module):
    """Maximum-likelihood fits of each scan as features: near-sufficient statistics of the beam's centre, width
    and flux.

    Per axis, the scan is fitted by iteratively reweighted Gauss-Newton (the noise variance ``rate + read_noise^2``
    held at the last iterate's rate) to ``background + F Phi((p - mu) / sig)``, from the moment estimates of
    :class:`KnifeEdgeSummaries`; the features are ``mu, log sig, log F`` and the log of their Gauss-Newton standard
    errors, 12 in all (optionally after the raw scan). Vectorised over scans, a fixed number of iterations, so it
    is differentiable-free preprocessing that costs a few ms per minibatch.

    Parameters
    ----------
    positions : Tensor (n_per_axis,), the blade positions; n_axes : scans per observation
    background, read_noise : the detector model's known constants
    include_raw : also return the raw scan; iterations : Gauss-Newton steps
    """

    def __init__(self, positions: torch.Tensor | Sequence[float] | None = None, n_axes: int = 2,
                 background: float = 10.0, read_noise: float = 5.0, include_raw: bool = True, iterations: int = 8):
        super().__init__()
        self.moments = KnifeEdgeSummaries(positions, n_axes=n_axes, include_raw=False)
        self.n_axes, self.include_raw, self.iterations = int(n_axes), bool(include_raw), int(iterations)
        self.background, self.read_noise = float(background), float(read_noise)
        n_pos = self.moments.positions.numel()
        self.out_dim = 6 * self.n_axes + (self.n_axes * n_pos if include_raw else 0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.n_axes
        m = self.moments(x)  # (..., 4 a): lo, hi, mean, width per axis
        lo, hi, mu, width = m[..., :a], m[..., a:2 * a], m[..., 2 * a:3 * a], m[..., 3 * a:]
        y = x.unflatten(-1, (a, self.moments.positions.numel())).double()
        p = self.moments.positions.double()
        mu = mu.double().clamp(float(p[0]), float(p[-1]))
        log_sig = torch.log(width.double().clamp(0.02, 2.0))
        log_f = torch.log((hi - lo).double().clamp_min(10.0))
        theta = torch.stack([mu, log_sig, log_f], -1)  # (..., a, 3)
        eye = torch.eye(3, dtype=torch.float64)
        for _ in range(self.iterations):
            sig, flux = theta[..., 1:2].exp(), theta[..., 2:3].exp()
            z = (p - theta[..., 0:1]) / sig
            cdf, pdf = torch.special.ndtr(z), torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
            rate = self.background + flux * cdf
            w = 1.0 / (rate.clamp_min(0.0) + self.read_noise**2)
            jac = torch.stack([-flux * pdf / sig, -flux * pdf * z, flux * cdf], -1)  # (..., a, P, 3)
            h = (jac * w.unsqueeze(-1)).transpose(-1, -2) @ jac + 1e-6 * eye
            g = ((jac * (w * (y - rate)).unsqueeze(-1)).sum(-2)).unsqueeze(-1)
            step = torch.linalg.solve(h, g).squeeze(-1)
            theta = theta + step.clamp(-0.5, 0.5)  # damped: the moment start can be far for a beam at an edge
            theta[..., 1] = theta[..., 1].clamp(math.log(0.01), math.log(3.0))
        se = torch.sqrt(torch.diagonal(torch.linalg.inv(h), dim1=-2, dim2=-1).clamp_min(1e-12))
        feats = torch.cat([theta.flatten(-2), torch.log(se).flatten(-2)], -1).to(x.dtype)
        return torch.cat([x, feats], dim=-1) if self.include_raw else feats


class KnifeEdgePilot(nn.Module):
    """The beam parameters' first guess from :class:`KnifeEdgeFit`'s features: ``(loc, scale)`` of shape (..., 7)
    in the order of :data:`~physppl.models.beam.PARAM_NAMES`; the fitted centres, widths and flux (the two axes'
    average) with their standard errors, NaN for ``rho`` and ``div``, which the scans do not inform."""

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = features[..., -12:]  # the fit's 12 values come last (after the raw scan when it is included)
        est, se = f[..., :6], f[..., 6:].exp()
        nan = torch.full_like(est[..., 0], float("nan"))
        sig_x, sig_y = est[..., 1].exp(), est[..., 4].exp()
        flux_x, flux_y = est[..., 2].exp(), est[..., 5].exp()
        flux = 0.5 * (flux_x + flux_y)
        flux_se = 0.5 * torch.sqrt((flux_x * se[..., 2]) ** 2 + (flux_y * se[..., 5]) ** 2)
        loc = torch.stack([est[..., 0], est[..., 3], sig_x, sig_y, nan, flux, nan], -1)
        scale = torch.stack([se[..., 0], se[..., 3], sig_x * se[..., 1], sig_y * se[..., 4], nan, flux_se, nan], -1)
        return loc, scale


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


def knife_edge_estimator(
    low: Sequence[float] | torch.Tensor | None = None,
    high: Sequence[float] | torch.Tensor | None = None,
    positions: Sequence[float] | torch.Tensor | None = None,
    kind: str = "nsf",
    features: str = "fit",
    embedding: str = "none",
    embedding_dim: int = 64,
    embedding_hidden: Sequence[int] = (128,),
    transforms: int = 5,
    hidden: Sequence[int] = (64, 64),
    bins: int = 8,
    pilot: bool = True,
    fast: str = "density",
) -> PosteriorEstimator:
    """A :class:`~physppl.inference.estimators.PosteriorEstimator` (zuko NSF, MAF or the cINN) over the 7 beam
    parameters on the prior box, given a pair of scans: a drop-in for :func:`knife_edge_flow` in neural posterior
    estimation (``fast`` is accepted for that signature; amortized VI needs :func:`knife_edge_flow`).

    ``features``: as in :func:`knife_edge_flow`, or ``"fit"`` / ``"raw+fit"`` (:class:`KnifeEdgeFit`: per-axis
    maximum-likelihood centre, width and flux with their standard errors); ``embedding``: ``"mlp"``, ``"conv1d"``
    (one convolution stack per scan axis; with ``features="raw"``) or ``"none"``.
    ``pilot``: with the fit's features, the flow models each parameter relative to the fit (:class:`KnifeEdgePilot`)
    rather than over the whole prior box.
    """
    if fast != "density":
        raise ValueError("knife_edge_estimator trains by NPE; amortized VI (fast='sampling') needs knife_edge_flow")
    low = torch.tensor([DEFAULT_BOUNDS[n][0] for n in PARAM_NAMES]) if low is None else torch.as_tensor(low)
    high = torch.tensor([DEFAULT_BOUNDS[n][1] for n in PARAM_NAMES]) if high is None else torch.as_tensor(high)
    makers = {"raw": lambda: None, "summaries": lambda: KnifeEdgeSummaries(positions, include_raw=False),
              "raw+summaries": lambda: KnifeEdgeSummaries(positions, include_raw=True),
              "fit": lambda: KnifeEdgeFit(positions, include_raw=False),
              "raw+fit": lambda: KnifeEdgeFit(positions, include_raw=True)}
    if features not in makers:
        raise ValueError(f"knife_edge_estimator: features must be one of {', '.join(makers)}, got {features!r}")
    n_pos = 100 if positions is None else len(positions)
    feats = makers[features]()
    prior = dist.Uniform(low.float(), high.float()).to_event(1)
    use_pilot = bool(pilot) and features in ("fit", "raw+fit")
    return build_estimator(prior, 2 * n_pos, kind=kind, embedding=embedding, features=feats,
                           embedding_dim=embedding_dim, embedding_hidden=embedding_hidden, n_axes=2,
                           transforms=transforms, hidden=hidden, bins=bins,
                           pilot=KnifeEdgePilot() if use_pilot else None)


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
