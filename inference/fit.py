"""One call for any model: ``fit(model, guide, data, engine)`` returns draws, losses and diagnostics.

The engines (:class:`~physppl.inference.svi.SVIEngine`, :class:`~physppl.inference.nuts.NUTSEngine`,
:class:`~physppl.inference.map.MAPEngine`, or a user's own) all meet :class:`Engine`: a ``fit`` method with the
signature below that returns a :class:`Fit`. A problem never asks which engine it was given.

The model protocol (checked by :func:`check_model`): a :class:`torch.nn.Module` (a ``PyroModule``) called as
``model(**data, subsample=idx)``, where ``idx`` indexes the plate the engine minibatches over (``None`` = all
data), that declares its latent and observed sample sites inside named ``pyro.plate``s. Optionally it has
``prefetch(subsample)``: a minibatching engine then announces each minibatch ``prefetch_depth`` steps (an optional
int attribute, default 1) before it uses it (data on disk are read ahead). A guide is called the same way and
samples the model's latent sites (check: :func:`check_guide`). Parameters live in the modules
(Pyro's module-local parameter mode, set when physppl is imported), so two fits in one process share nothing.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_factor, site_is_subsample
from torch import nn

__all__ = ["Fit", "Engine", "fit", "check_model", "check_guide", "latent_sites", "observed_sites", "ProtocolError"]


class ProtocolError(TypeError):
    """A user's model, guide, engine or part does not meet the protocol it is used for; the message says what is
    missing."""


@dataclass
class Fit:
    """What an engine returns.

    ``draws`` maps each latent site to a CPU tensor of shape (chains, draws, *site_shape) in the model's own
    (internal) units; ``losses`` is the training curve (negative ELBO per step; empty for samplers); ``info`` holds
    the engine's diagnostics (``engine``, ``steps``, ``converged``, ``stop_reason``, ``train_time``, ...), and
    ``sample_stats`` per-draw statistics (NUTS: ``diverging``) for ArviZ.
    """

    model: nn.Module | None
    guide: nn.Module | None
    data: dict[str, Any]
    draws: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    sample_stats: dict[str, np.ndarray] | None = None
    extras: dict = field(default_factory=dict)  # engine-specific results a problem may use (not written anywhere)

    @property
    def n_chains(self) -> int:
        return int(next(iter(self.draws.values())).shape[0])

    @property
    def n_draws(self) -> int:
        return int(next(iter(self.draws.values())).shape[1])

    def flat(self, site: str) -> torch.Tensor:
        """Draws of ``site`` with chains and draws merged: shape (chains * draws, *site_shape)."""
        v = self.draws[site]
        return v.reshape((-1,) + tuple(v.shape[2:]))


@runtime_checkable
class Engine(Protocol):
    """An inference engine: ``needs_guide`` says whether :meth:`fit` uses the guide."""

    needs_guide: bool

    def fit(self, model: nn.Module, guide: nn.Module | None, data: dict, *, n_draws: int = 200,
            n_data: int | None = None, sites: list[str] | None = None, workdir=None,
            callback: Callable | None = None, init: dict | None = None) -> Fit: ...


def _trace(fn: Callable, data: dict):
    with torch.no_grad():
        return poutine.trace(fn).get_trace(**data)


def latent_sites(model: Callable, data: dict, trace=None) -> list[str]:
    """Names of the model's latent sample sites (not observed, not plate subsample or factor sites)."""
    tr = trace if trace is not None else _trace(model, data)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
            and not site_is_subsample(s) and not site_is_factor(s)]


def observed_sites(model: Callable, data: dict, trace=None) -> list[str]:
    """Names of the model's observed sample sites (``pyro.factor`` sites are priors or penalties, not data)."""
    tr = trace if trace is not None else _trace(model, data)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and s["is_observed"]
            and not site_is_subsample(s) and not site_is_factor(s)]


def _accepts_subsample(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters
    except (TypeError, ValueError):
        return True
    return "subsample" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_model(model: Any, data: dict, what: str = "model") -> None:
    """Raise ``TypeError`` naming what is missing when ``model`` does not meet the model protocol."""
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise ProtocolError(f"{what} {name} is not a torch.nn.Module: write it as a pyro.nn.PyroModule whose forward(**data, "
                        "subsample=None) declares its sample sites (its parameters then live in the module)")
    if type(model).forward is nn.Module.forward:
        raise ProtocolError(f"{what} {name} has no forward method: it must define forward(**data, subsample=None)")

    if not _accepts_subsample(model):
        raise ProtocolError(f"{what} {name}.forward must accept subsample=None (indices of the minibatch, or None for "
                        "all data)")
    try:
        inspect.signature(model.forward).bind(**data)
    except TypeError as err:
        raise ProtocolError(f"{what} {name}.forward cannot be called with the data's keywords "
                        f"{sorted(data)}: {err}") from None


def check_guide(guide: Any, model: nn.Module, data: dict, what: str = "guide") -> None:
    """Raise ``TypeError`` when ``guide`` is not a module callable like the model, or samples a site the model
    does not have as a latent."""
    check_model(guide, data, what)
    tr = _trace(guide, data)
    guide_sites = {n for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
                   and not s["infer"].get("is_auxiliary")}
    latents = set(latent_sites(model, data))
    extra = sorted(guide_sites - latents)
    if extra:
        raise ProtocolError(f"{what} {type(guide).__name__} samples {extra}, which are not latent sites of the model "
                        f"{type(model).__name__} (its latents: {sorted(latents)})")


def fit(model: nn.Module, guide: nn.Module | None = None, data: dict | None = None, engine: Engine | None = None, *,
        n_draws: int = 200, n_data: int | None = None, sites: list[str] | None = None, workdir=None,
        callback: Callable | None = None, init: dict | None = None, check: bool = True) -> Fit:
    """Fit ``model`` (and ``guide``) to ``data`` with ``engine`` (default: an :class:`SVIEngine` with its defaults).

    Parameters
    ----------
    model, guide : PyroModule
        Called as ``model(**data, subsample=idx)``; see the module docstring for the protocol.
    data : dict
        Keyword arguments of the model and guide (tensors, on the device the fit should run on).
    n_draws : int
        Posterior draws to return (per chain for samplers).
    n_data : int, optional
        Size of the plate the engine may minibatch over (the engine's ``batch_size``).
    sites : list of str, optional
        Latent sites to return draws of (default: every latent site).
    workdir : path, optional
        Where an engine may write checkpoints (none are written without it).
    init : dict, optional
        Starting values of latent sites, for engines that start from given values (NUTS, MAP).
    """
    from .svi import SVIEngine

    data = dict(data or {})
    engine = SVIEngine() if engine is None else engine
    if not callable(getattr(engine, "fit", None)):
        raise ProtocolError(f"engine {type(engine).__name__} has no fit(model, guide, data, ...) method (see "
                        "physppl.inference.fit.Engine)")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    needs_guide = bool(getattr(engine, "needs_guide", True))
    if check:
        check_model(model, data)
        if needs_guide:
            if guide is None:
                raise ProtocolError(f"engine {type(engine).__name__} needs a guide")
            # a minibatching engine is checked on one minibatch: a full pass may not fit (data streamed from disk)
            batch = getattr(engine, "batch_size", None)
            probe = data if n_data is None or batch is None or batch >= n_data else \
                {**data, "subsample": torch.arange(int(batch))}
            check_guide(guide, model, probe)
    try:
        return engine.fit(model, guide if needs_guide else None, data, n_draws=n_draws, n_data=n_data, sites=sites,
                          workdir=workdir, callback=callback, init=init)
    except AttributeError as err:
        # a PyroModule built before module-local parameters were switched on has no local parameter state
        if "param_state" in str(err):
            raise ProtocolError("the model or guide was built in Pyro's global-parameter mode: import physppl (or call "
                            "pyro.settings.set(module_local_params=True)) before building it") from None
        raise
