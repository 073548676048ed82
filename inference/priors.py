"""Priors for simulation-based inference: any torch or Pyro distribution with a support, or a product of them.

:func:`as_prior` turns what a user has into a :class:`Prior` over one flat parameter vector ``theta`` (n, D):

* a distribution whose event is a vector (``BoxUniform``-like ``Independent(Uniform(low, high), 1)``,
  ``MultivariateNormal``, ``pyro.distributions.Normal(...).to_event(1)``);
* a scalar-batched distribution (``Normal(zeros(3), 1)``: read as D independent parameters);
* a dict ``{name: distribution}`` or a list of them: the product, concatenated in order (each piece a scalar
  or a vector), e.g. ``{"mu": Normal(0., 1.), "sigma": LogNormal(0., 0.5), "frac": Uniform(0., 1.)}``.

Each piece's support gives the bijection from unconstrained space (``torch.distributions.biject_to``): density
estimators work on unconstrained, z-scored coordinates and map back, so every draw lies in the support and the
density includes the Jacobian.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.distributions import Distribution, biject_to, constraints
from torch.distributions.transforms import Transform

__all__ = ["Prior", "as_prior"]


@dataclass
class _Piece:
    name: str
    dist: Distribution
    size: int          # number of entries of theta this piece holds
    vector: bool       # the distribution's event is a vector (event_dim 1) rather than a scalar


class Prior:
    """A prior over a flat parameter vector, built by :func:`as_prior`.

    Attributes
    ----------
    names : tuple of str
        One name per entry of ``theta`` (``"mu"``, or ``"w[0]", "w[1]"`` for a vector piece).
    dim : int
        Length of ``theta``.
    low, high : Tensor (D,) or None
        The box, when every entry has an interval support (a uniform box prior), else None.
    """

    def __init__(self, pieces: Sequence[_Piece]):
        self._pieces = list(pieces)
        names: list[str] = []
        for p in self._pieces:
            names += [p.name] if p.size == 1 and not p.vector else [f"{p.name}[{i}]" for i in range(p.size)]
        self.names = tuple(names)
        self.dim = len(names)
        bounds = [_interval(p.dist) for p in self._pieces]
        if all(b is not None for b in bounds):
            self.low = torch.cat([b[0].reshape(-1).expand(p.size) for b, p in zip(bounds, self._pieces)])
            self.high = torch.cat([b[1].reshape(-1).expand(p.size) for b, p in zip(bounds, self._pieces)])
        else:
            self.low = self.high = None

    # -- splitting and joining the flat vector -----------------------------------------------------------
    def _split(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """Each piece's value in its distribution's own shape: (...,) for a scalar, (..., k) otherwise."""
        out, start = [], 0
        for p in self._pieces:
            part = theta[..., start:start + p.size]
            out.append(part.squeeze(-1) if (not p.vector and p.dist.batch_shape == ()) else part)
            start += p.size
        return out

    @staticmethod
    def _reduce(p: _Piece, t: torch.Tensor, batch_dims: int, op) -> torch.Tensor:
        """Sum (log densities) or all (support checks) a piece's elementwise result down to theta's batch shape."""
        return op(t.reshape(t.shape[:batch_dims] + (-1,)), -1) if t.dim() > batch_dims else t

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws, shape (n, D). ``generator`` seeds them without touching torch's global generator."""
        if generator is not None:
            state = torch.random.get_rng_state()
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        try:
            parts = []
            for p in self._pieces:
                s = p.dist.sample((int(n),))
                parts.append(s.reshape(int(n), p.size).to(torch.get_default_dtype()))
            return torch.cat(parts, dim=-1)
        finally:
            if generator is not None:
                torch.random.set_rng_state(state)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """``log p(theta)``, shape ``theta.shape[:-1]``; ``-inf`` outside the support."""
        nb = theta.dim() - 1
        total = torch.zeros(theta.shape[:-1], dtype=theta.dtype, device=theta.device)
        for p, part in zip(self._pieces, self._split(theta)):
            ok = p.dist.support.check(part)
            # values outside the support are replaced by an inside point before log_prob (which may raise or
            # return NaN there) and get -inf afterwards
            safe = torch.where(ok.reshape(ok.shape + (1,) * (part.dim() - ok.dim())), part,
                               biject_to(p.dist.support)(torch.zeros_like(part)))
            lp = self._reduce(p, p.dist.log_prob(safe), nb, torch.sum)
            total = total + torch.where(self._reduce(p, ok, nb, torch.all), lp, torch.full_like(lp, -float("inf")))
        return total

    def in_support(self, theta: torch.Tensor) -> torch.Tensor:
        """Boolean ``theta.shape[:-1]``: whether each ``theta`` lies in the prior's support."""
        nb = theta.dim() - 1
        ok = torch.ones(theta.shape[:-1], dtype=torch.bool, device=theta.device)
        for p, part in zip(self._pieces, self._split(theta)):
            ok = ok & self._reduce(p, p.dist.support.check(part), nb, torch.all)
        return ok

    def transform(self) -> Transform:
        """The bijection from unconstrained R^D onto the support, acting on the last dimension."""
        from torch.distributions.transforms import CatTransform, IndependentTransform

        parts, lengths = [], []
        for p in self._pieces:
            t = biject_to(p.dist.support)
            # a scalar support's transform acts elementwise; mark it as acting on a vector for CatTransform
            parts.append(t if t.domain.event_dim == 1 else IndependentTransform(t, 1))
            lengths.append(p.size)
        return CatTransform(parts, dim=-1, lengths=lengths)

    def describe(self) -> str:
        return ", ".join(f"{p.name}: {type(p.dist).__name__}" for p in self._pieces)


def _interval(d: Distribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    support = d.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if isinstance(support, (constraints.interval, constraints.half_open_interval)):
        return torch.as_tensor(support.lower_bound, dtype=torch.get_default_dtype()), \
            torch.as_tensor(support.upper_bound, dtype=torch.get_default_dtype())
    return None


def _piece(name: str, d) -> _Piece:
    if not isinstance(d, Distribution):
        raise TypeError(f"prior {name!r}: expected a torch or Pyro distribution, got {type(d).__name__}")
    if d.support.is_discrete:
        raise ValueError(f"prior {name!r}: {type(d).__name__} is discrete; simulation-based inference here needs "
                         "continuous parameters")
    if len(d.event_shape) > 1 or (len(d.event_shape) == 1 and len(d.batch_shape) > 0):
        raise ValueError(f"prior {name!r}: batch shape {tuple(d.batch_shape)} and event shape {tuple(d.event_shape)}; "
                         "give a scalar, a vector of independent scalars, or one vector-valued distribution")
    try:
        biject_to(d.support)
    except NotImplementedError:
        raise ValueError(f"prior {name!r}: torch has no bijection onto the support {d.support} of "
                         f"{type(d).__name__}") from None
    if len(d.event_shape) == 1:
        return _Piece(name, d, int(d.event_shape[0]), True)
    size = int(torch.Size(d.batch_shape).numel())
    return _Piece(name, d, size, len(d.batch_shape) > 0)


def as_prior(prior, names: Sequence[str] | None = None) -> Prior:
    """A :class:`Prior` from a distribution, a dict ``{name: distribution}``, a list of them, or a Prior.

    ``names`` labels the entries of a single vector distribution (default ``theta[0]``, ``theta[1]``, ...).
    """
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, Mapping):
        if not prior:
            raise ValueError("prior: the dict of distributions is empty")
        return Prior([_piece(str(k), v) for k, v in prior.items()])
    if isinstance(prior, (list, tuple)):
        if not prior:
            raise ValueError("prior: the list of distributions is empty")
        return Prior([_piece(f"theta{i}", v) for i, v in enumerate(prior)])
    piece = _piece("theta", prior)
    out = Prior([piece])
    if names is not None:
        if len(names) != out.dim:
            raise ValueError(f"prior: {len(names)} names for {out.dim} parameters")
        out.names = tuple(str(n) for n in names)
    return out
