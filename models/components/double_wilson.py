"""The bivariate (double-) Wilson prior between related data sets, and the priors a merging model can take.

For two data sets whose structures are related (a dark and an illuminated crystal, two time points), the
normalised structure factors ``E_p`` of the parent and ``E_c`` of the child are jointly complex Gaussian with
correlation ``r``. Given the parent's amplitude ``F_p`` (expected intensity ``Sigma_p``), the child's amplitude
``F_c`` (``Sigma_c``) is

* acentric: Rice, ``p(F_c | F_p) = F_c / s^2 * exp(-(F_c^2 + nu^2) / (2 s^2)) * I0(F_c nu / s^2)`` with
  ``nu = r F_p sqrt(Sigma_c / Sigma_p)`` and ``s^2 = Sigma_c (1 - r^2) / 2``;
* centric: folded Normal, ``|N(nu, Sigma_c (1 - r^2))|``.

Both reduce to Wilson's distribution at ``r = 0`` and keep ``E[F_c^2] = Sigma_c`` when ``F_p`` is Wilson
distributed, so the chain of priors has Wilson marginals. A data set without a parent (``parents[k] = None``) has
Wilson's prior; a reflection of a child data set whose parent data set lacks it has Wilson's prior too.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.nn import PyroModule, PyroParam

from .wilson import Wilson

__all__ = ["DoubleWilson", "rice_log_prob", "WilsonPrior", "DoubleWilsonPrior", "parent_reflections"]

_TINY = 1e-12


def rice_log_prob(x: torch.Tensor, nu: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """log Rice(x; nu, s^2) with ``log I0(z) = log i0e(z) + z`` (finite for any z)."""
    x = x.clamp(min=_TINY)
    z = x * nu / s2
    return x.log() - s2.log() - (x.square() + nu.square()) / (2 * s2) + torch.special.i0e(z).log() + z


def _folded_normal_log_prob(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    a = -(x - mu).square() / (2 * var)
    b = -(x + mu).square() / (2 * var)
    return torch.logaddexp(a, b) - 0.5 * torch.log(2 * math.pi * var)


class DoubleWilson(TorchDistribution):
    """Joint prior of all reflections' amplitudes: Wilson for roots, Rice / folded Normal given the parent.

    Parameters
    ----------
    sigma : Tensor (n_refl,)
        Expected intensity ``Sigma = epsilon Sigma_N(d)`` of each reflection.
    centric : Tensor of bool (n_refl,)
    parent : Tensor of long (n_refl,)
        Index of the same reflection in the parent data set, ``-1`` for a reflection with Wilson's prior.
    r : Tensor (n_refl,)
        Correlation with the parent (ignored where ``parent < 0``), in [0, 1).

    The log-density of each element depends on its parent's value: it is a density of the whole vector,
    factorised along the parent tree, with batch shape (n_refl,) so it sits in the ``"refl"`` plate.
    """

    arg_constraints = {"sigma": constraints.positive}
    support = constraints.nonnegative
    has_rsample = True

    def __init__(self, sigma: torch.Tensor, centric: torch.Tensor, parent: torch.Tensor, r: torch.Tensor,
                 validate_args=None):
        self.sigma = torch.as_tensor(sigma)
        self.centric = torch.as_tensor(centric, dtype=torch.bool)
        self.parent = torch.as_tensor(parent, dtype=torch.long)
        self.r = torch.as_tensor(r, dtype=self.sigma.dtype).expand(self.sigma.shape)
        self.has_parent = self.parent >= 0
        self._p = self.parent.clamp(min=0)
        super().__init__(self.sigma.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape[-1:] != self.sigma.shape[-1:]:
            raise ValueError(f"DoubleWilson couples its {self.sigma.shape[-1]} reflections; it can only gain leading "
                             f"batch dimensions, not become {tuple(batch_shape)}")
        new = self._get_checked_instance(DoubleWilson, _instance)
        for name in ("sigma", "centric", "parent", "r", "has_parent", "_p"):
            setattr(new, name, getattr(self, name))
        super(DoubleWilson, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        wilson = Wilson(self.sigma, self.centric).log_prob(value)
        fp = value[..., self._p]
        ratio = (self.sigma / self.sigma[self._p]).sqrt()
        r = self.r.clamp(0.0, 1 - 1e-6)
        nu = r * fp * ratio
        acentric = rice_log_prob(value, nu, self.sigma * (1 - r.square()) / 2)
        centric = _folded_normal_log_prob(value, nu, self.sigma * (1 - r.square()))
        child = torch.where(self.centric, centric, acentric)
        return torch.where(self.has_parent, child, wilson)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        f = Wilson(self.sigma, self.centric).rsample(shape[:-1])
        ratio = (self.sigma / self.sigma[self._p]).sqrt()
        r = self.r.clamp(0.0, 1 - 1e-6)
        depth = 0
        # children take their parent's draw: one pass per generation of the parent tree
        pending = self.has_parent.clone()
        while bool(pending.any()):
            depth += 1
            if depth > self.sigma.shape[-1]:
                raise ValueError("DoubleWilson: the parent indices form a cycle")
            ready = pending & ~pending[self._p]
            nu = r * f[..., self._p] * ratio
            s = (self.sigma * (1 - r.square())).sqrt()
            z1 = torch.randn(shape, dtype=f.dtype, device=f.device)
            z2 = torch.randn(shape, dtype=f.dtype, device=f.device)
            acentric = ((nu + s / math.sqrt(2) * z1).square() + (s / math.sqrt(2) * z2).square()).sqrt()
            centric = (nu + s * z1).abs()
            child = torch.where(self.centric, centric, acentric)
            f = torch.where(ready, child, f)
            pending = pending & ~ready
        return f


def parent_reflections(dataset: np.ndarray, keys: np.ndarray, parents: Sequence[int | None]) -> np.ndarray:
    """For each reflection, the index of the reflection with the same key (ASU H, K, L, Friedel sign) in its data
    set's parent data set; ``-1`` where the data set has no parent or the parent lacks that reflection."""
    dataset = np.asarray(dataset)
    n_sets = int(dataset.max()) + 1 if len(dataset) else 0
    if len(parents) != n_sets:
        raise ValueError(f"double-Wilson prior: parents has {len(parents)} entries for {n_sets} data sets; give one "
                         "per data set (null for a data set without a parent), e.g. parents=[null,0]")
    out = np.full(len(dataset), -1, dtype=np.int64)
    keys = np.asarray(keys).reshape(len(dataset), -1)
    names = [f"k{j}" for j in range(keys.shape[1])]
    table = pd.DataFrame(keys, columns=names).assign(dataset=dataset, row=np.arange(len(dataset)))
    for k, p in enumerate(parents):
        if p is None:
            continue
        if not (0 <= int(p) < n_sets) or int(p) == k:
            raise ValueError(f"double-Wilson prior: parent {p} of data set {k} is out of range; data sets are "
                             f"0..{n_sets - 1} and a data set cannot be its own parent")
        child, parent = table[table["dataset"] == k], table[table["dataset"] == int(p)]
        joined = child.merge(parent, on=names, how="inner", suffixes=("", "_parent"))
        out[joined["row"].to_numpy()] = joined["row_parent"].to_numpy()
    return out


class WilsonPrior(PyroModule):
    """Wilson's prior for every reflection (the default)."""

    def bind(self, centric: torch.Tensor, epsilon: torch.Tensor, sigma_n: torch.Tensor, **_) -> "WilsonPrior":
        self.register_buffer("sigma", epsilon * sigma_n)
        self.register_buffer("centric", centric)
        return self

    def forward(self) -> dist.Distribution:
        return Wilson(self.sigma, self.centric)


class DoubleWilsonPrior(PyroModule):
    """careless's double-Wilson prior between data sets (``--double-wilson-parents``, ``--double-wilson-r``).

    Parameters
    ----------
    parents : list of int or None, optional
        Parent data set of each data set (``None`` for a root). Default: a chain, each data set the child of the
        one before it (``[None, 0, 1, ...]``).
    r : float or list of float
        Correlation of each data set with its parent (entries of roots are ignored); one number for all.
    learn_r : bool
        Learn each child's ``r`` (a point estimate, starting at ``r``) instead of holding it fixed.
    """

    def __init__(self, parents: Sequence[int | None] | None = None, r: float | Sequence[float] = 0.99,
                 learn_r: bool = False):
        super().__init__()
        self.parents = None if parents is None else [None if p is None else int(p) for p in parents]
        self.r_init = [float(x) for x in r] if isinstance(r, (list, tuple)) or hasattr(r, "__len__") else float(r)
        values = self.r_init if isinstance(self.r_init, list) else [self.r_init]
        if any(not 0.0 <= x < 1.0 for x in values):
            raise ValueError(f"double-Wilson prior: r must be in [0, 1), got {self.r_init}")
        self.learn_r = bool(learn_r)

    def bind(self, centric: torch.Tensor, epsilon: torch.Tensor, sigma_n: torch.Tensor,
             dataset: torch.Tensor | None = None, refl_key: np.ndarray | None = None) -> "DoubleWilsonPrior":
        if dataset is None or refl_key is None:
            raise ValueError("double-Wilson prior: the data have one data set; give several files (data.paths=[...])")
        dataset_np = np.asarray(dataset)
        n_sets = int(dataset_np.max()) + 1
        parents = self.parents if self.parents is not None else [None] + list(range(n_sets - 1))
        r = self.r_init if isinstance(self.r_init, list) else [self.r_init] * n_sets
        if len(r) != n_sets:
            raise ValueError(f"double-Wilson prior: r has {len(r)} entries for {n_sets} data sets")
        self.parents_used = list(parents)
        parent = parent_reflections(dataset_np, refl_key, parents)
        self.register_buffer("sigma", epsilon * sigma_n)
        self.register_buffer("centric", centric)
        self.register_buffer("parent", torch.as_tensor(parent))
        self.register_buffer("dataset", torch.as_tensor(dataset_np, dtype=torch.long))
        r0 = torch.tensor(r, dtype=torch.get_default_dtype())
        if self.learn_r:
            self.r_set = PyroParam(r0.clamp(1e-3, 0.999), constraint=constraints.interval(0.0, 0.999))
        else:
            self.register_buffer("r_set", r0)
        return self

    def forward(self) -> dist.Distribution:
        return DoubleWilson(self.sigma, self.centric, self.parent, self.r_set[self.dataset])
