"""Variational posteriors for :class:`~physppl.models.md_weights.FrameWeightsModel`.

``DirichletFrameGuide`` (the default): q(w) a Dirichlet parametrised as a mean on the simplex times a total
concentration, generalised to a two-level Dirichlet tree when frames are grouped into states or clusters: state
masses get their own concentration, and so does the split inside each state. One concentration for everything
makes the spread of every weight follow from how tightly the state masses are pinned, and understates the
uncertainty of the split inside a state several-fold (measured against NUTS in ``tests/test_md_weights_accuracy.py``);
one free concentration per frame converges far too slowly. The scale, offset and noise factors get a joint
Gaussian in unconstrained space.

``logistic_normal_guide``: softmax of a Gaussian with low-rank plus diagonal covariance over the frame logits and
all other latents together, so correlations between frames (and with the scale) are represented.
"""
from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, init_to_median, init_to_value
from pyro.nn import PyroModule, PyroParam

from physppl.inference.map import map_estimate
from physppl.models.components.nested_dirichlet import NestedDirichlet

__all__ = ["DirichletFrameGuide", "logistic_normal_guide", "initial_globals", "map_initial_values"]


def initial_globals(model) -> dict[str, torch.Tensor]:
    """Starting values in the model's normalised units: a uniform weighting fits with scale 1 and offset 0."""
    one = torch.ones((), dtype=model.concentration.dtype, device=model.concentration.device)
    values = {"scale": one, "offset": one * 0.0}
    if model.noise == "shell":
        values["noise"] = one.expand(model.n_shells).clone() * (1.0 if model.has_sigma else 0.3)
    if model.bragg:
        values["bragg_scale"] = one
        values["bragg_noise"] = one * (1.0 if model.bragg_has_sigma else 0.3)
    return values


@torch.no_grad()
def _residual_noise(model, values: dict, y, sigma=None, y_bragg=None, sigma_bragg=None, subsample=None) -> dict:
    """Noise factors that match the residuals of a point fit, per resolution shell (and for Bragg), over the
    voxels ``subsample`` (all when None)."""
    take = (lambda t: t) if subsample is None else (lambda t: None if t is None else t[subsample])  # noqa: E731
    x, ib = model.predictions(values["w"], subsample, bragg=model.bragg)
    y, sigma, y_bragg, sigma_bragg, shell = take(y), take(sigma), take(y_bragg), take(sigma_bragg), take(model.shell)
    resid = y - (values["scale"] * x + values.get("offset", 0.0))
    if model.has_sigma:
        resid = resid / sigma
    ms = torch.zeros(model.n_shells, dtype=resid.dtype, device=resid.device).index_add(0, shell, resid.square())
    n = torch.bincount(shell, minlength=model.n_shells).clamp_min(1)
    out = {"noise": (ms / n).sqrt().clamp(1e-3, 1e3)}
    if model.bragg:
        rb = y_bragg - values["bragg_scale"] * ib
        rb = rb / sigma_bragg if model.bragg_has_sigma else rb
        out["bragg_noise"] = rb[torch.isfinite(rb)].square().mean().sqrt().clamp(1e-3, 1e3)
    return out


def map_initial_values(model, steps: int = 300, lr: float = 0.05, subsample: torch.Tensor | None = None,
                       **model_kwargs) -> dict[str, torch.Tensor]:
    """Starting point for a guide: MAP weights, scale and offset with the noise factors held at their prior
    median, then noise factors matched to that fit's residuals (a noise scale learned from a poor start
    swallows the misfit before the weights move, and the fit stalls). ``subsample``: fit on these voxels only
    (frames streamed from disk: one read, reused at every step)."""
    init = initial_globals(model)
    fixed = {k: init[k] for k in ("noise", "bragg_noise") if k in init}
    init["w"] = model.concentration / model.concentration.sum()
    data = model_kwargs if subsample is None else {**model_kwargs, "subsample": subsample}
    values = map_estimate(model, data, steps=steps, lr=lr, fixed=fixed,
                          init={k: v for k, v in init.items() if k not in fixed})
    values.update(fixed)
    if model.noise == "shell" or model.bragg:
        noise = _residual_noise(model, values, subsample=subsample, **model_kwargs)
        values.update({k: v for k, v in noise.items() if k in values})
    return values


def _segment_log_softmax(logits: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    top = torch.full((n_groups,), -torch.inf, dtype=logits.dtype, device=logits.device)
    top = top.scatter_reduce(0, group, logits.detach(), reduce="amax")
    e = (logits - top[group]).exp()
    total = torch.zeros(n_groups, dtype=logits.dtype, device=logits.device).index_add(0, group, e)
    return logits - top[group] - total.log()[group]


class DirichletFrameGuide(PyroModule):
    """q(w) = two-level Dirichlet tree over frames grouped by state; joint Gaussian over the other latents.

    Sample sites
    ------------
    w : Tensor, shape (T,), no plate (event dim 1)
        ``NestedDirichlet``: state masses ``Dir(k0 * mu)``, split inside state g ``Dir(k_g * nu_g)``; with one
        group it is ``Dir(k * nu)``, a mean on the simplex times a total concentration.
    scale, offset, noise, bragg_scale, bragg_noise
        As in the model, from an ``AutoMultivariateNormal`` over them (the model with ``w`` hidden).

    Parameters
    ----------
    model : FrameWeightsModel
    groups : array-like of int, shape (T,), optional
        State or cluster of each frame; ``None`` puts all frames in one group.
    init_values : dict, optional
        Starting values of the latents (e.g. :func:`map_initial_values`); ``w`` sets the starting mean of q(w)
        (default: the prior mean), the others the Gaussian's location.
    init_concentration : float
        Starting total concentration of the state masses (and of each split, per frame in the state).
    """

    def __init__(self, model, groups=None, init_values: dict | None = None, init_concentration: float = 50.0,
                 init_scale: float = 0.05):
        super().__init__()
        T = model.n_frames
        dev, dt = model.concentration.device, model.concentration.dtype
        group = torch.zeros(T, dtype=torch.long) if groups is None else torch.as_tensor(groups, dtype=torch.long)
        if group.shape != (T,):
            raise ValueError(f"groups must give one label per frame ({T}), got shape {tuple(group.shape)}")
        _, group = torch.unique(group, return_inverse=True)  # labels 0..G-1, every group non-empty
        self.register_buffer("group", group.to(dev))
        G = int(group.max()) + 1
        self.n_groups = G
        values = {**initial_globals(model), **(init_values or {})}
        mean = torch.as_tensor(values.pop("w", model.concentration), dtype=dt, device=dev)
        mean = mean / mean.sum()
        mean = (mean + 1e-3 / T) / (1 + 1e-3)  # keep every frame reachable from the start
        masses = torch.zeros(G, dtype=dt, device=dev).index_add(0, self.group, mean)
        size = torch.bincount(self.group, minlength=G).to(dt)
        self.group_logits = PyroParam(masses.log())
        self.log_group_concentration = PyroParam(torch.tensor(float(init_concentration) * max(G, 2), dtype=dt, device=dev).log())
        self.within_logits = PyroParam((mean / masses[self.group]).log())
        self.log_within_concentration = PyroParam((float(init_concentration) * size).log())
        self.globals = AutoMultivariateNormal(poutine.block(model, hide=["w"]), init_scale=init_scale,
                                              init_loc_fn=init_to_value(values=values, fallback=init_to_median))

    def distribution(self) -> NestedDirichlet:
        """q(w) with the current parameters, in double precision: frames the data rule out get concentrations
        of 1e-2 or less, whose draws and log-densities leave float32's range."""
        log_a = self.log_group_concentration.double() + torch.log_softmax(self.group_logits.double(), -1)
        log_b = (self.log_within_concentration.double()[self.group]
                 + _segment_log_softmax(self.within_logits.double(), self.group, self.n_groups))
        return NestedDirichlet(log_a.clamp(-14.0, 28.0).exp(), log_b.clamp(-14.0, 28.0).exp(), self.group)

    def forward(self, *args, **kwargs):
        pyro.sample("w", self.distribution())
        return self.globals(*args, **kwargs)


def logistic_normal_guide(model, rank: int = 10, init_scale: float = 0.05,
                          init_values: dict | None = None) -> AutoLowRankMultivariateNormal:
    """Softmax of a Gaussian with low-rank covariance: ``AutoLowRankMultivariateNormal`` over all latents, where the
    model's weights unconstrain through a centred softmax (:mod:`physppl.models.components.simplex`)."""
    values = {**initial_globals(model), **(init_values or {})}
    w0 = torch.as_tensor(values.get("w", model.concentration), dtype=model.concentration.dtype)
    w0 = w0 / w0.sum()
    values["w"] = (w0 + 1e-3 / model.n_frames) / (1 + 1e-3)
    rank = max(1, min(int(rank), model.n_frames))
    return AutoLowRankMultivariateNormal(model, rank=rank, init_scale=init_scale,
                                         init_loc_fn=init_to_value(values=values, fallback=init_to_median))
