"""Point estimates (MAP) of a model's latent sites: an engine, and a warm start for variational guides.

Guides that start far from the posterior can stall: a learned noise scale grows to absorb the initial misfit
faster than the other latents move, after which the data barely pull on them. Starting the guide at a MAP fit
with such scales held fixed avoids that trap.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_median, init_to_value

from .fit import Fit, latent_sites
from .svi import TrainingDivergedError

__all__ = ["minimize_lbfgs", "map_estimate", "MAPEngine"]

log = logging.getLogger(__name__)


def map_estimate(
    model: torch.nn.Module,
    data: dict | None = None,
    steps: int = 300,
    lr: float = 0.05,
    fixed: dict[str, torch.Tensor] | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Maximise the joint density over the model's latents (``fixed`` sites conditioned to given values) with Adam.

    The point estimates are the parameters of an ``AutoDelta`` of its own, so the model's parameters are not
    trained. Returns the MAP values of the free latent sites (constrained), detached.
    """
    data = dict(data or {})
    conditioned = poutine.condition(model, data=dict(fixed or {}))
    loc_fn = init_to_value(values=dict(init or {}), fallback=init_to_median) if init else init_to_median
    guide = AutoDelta(conditioned, init_loc_fn=loc_fn)
    elbo = Trace_ELBO()(conditioned, guide)
    with torch.no_grad():
        elbo(**data)  # the autoguide makes its parameters on the first call
    optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
    loss = float("nan")
    for step in range(1, int(steps) + 1):
        optimizer.zero_grad()
        loss_t = elbo(**data)
        loss = float(loss_t.detach())
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"MAP estimate diverged at step {step} (loss {loss})")
        loss_t.backward()
        optimizer.step()
    with torch.no_grad():
        values = {k: v.detach().clone() for k, v in guide.median(**data).items()}
    log.info("MAP: %d steps, final loss %.6g", steps, loss)
    return values


class MAPEngine:
    """The posterior mode of the latent sites as a single draw (Adam on an ``AutoDelta``); no guide needed.

    Parameters
    ----------
    steps, lr : int, float
        Adam steps and learning rate.
    """

    needs_guide = False

    def __init__(self, steps: int = 1000, lr: float = 0.05):
        if int(steps) < 1:
            raise ValueError(f"MAPEngine: steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.lr = float(lr)

    def fit(self, model, guide, data: dict, *, n_draws: int = 1, n_data: int | None = None,
            sites: list[str] | None = None, workdir=None, callback: Callable | None = None,
            init: dict | None = None) -> Fit:
        t0 = time.perf_counter()
        values = map_estimate(model, data, steps=self.steps, lr=self.lr, init=init)
        sites = sites or latent_sites(model, data)
        draws = {k: values[k].detach().cpu()[None, None] for k in sites if k in values}
        return Fit(model=model, guide=None, data=data, draws=draws,
                   info={"engine": "map", "steps": self.steps, "train_time": time.perf_counter() - t0})


def minimize_lbfgs(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iter: int = 500,
                   tol: float = 1e-10) -> tuple[torch.Tensor, dict]:
    """Minimise a smooth ``objective(x)`` from ``x0`` (float64) with L-BFGS and a strong-Wolfe line search; returns
    the minimiser and ``{"iterations", "objective", "grad_norm", "converged"}``."""
    x = x0.detach().clone().double().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=int(max_iter), tolerance_grad=tol, tolerance_change=tol * 1e-2,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(x)
        value.backward()
        return value

    opt.step(closure)
    with torch.enable_grad():
        value = objective(x)
        (grad,) = torch.autograd.grad(value, x)
    value = value.detach()
    state = opt.state[opt.param_groups[0]["params"][0]]
    grad_norm = float(grad.abs().max())
    info = {"iterations": int(state.get("n_iter", 0)), "objective": float(value), "grad_norm": grad_norm,
            "converged": bool(grad_norm < 1e-5 * max(1.0, abs(float(value))) ** 0.5 or grad_norm < 1e-6)}
    return x.detach(), info
