"""The nested (two-level Dirichlet-tree) distribution on the simplex.

``w_t = M_g(t) * u_t`` with group masses ``M ~ Dir(a)`` over G groups and, inside each group g, a split
``u_g ~ Dir(b_g)``. A plain Dirichlet has one concentration that fixes the variance of every aggregate and every
component at once; with frames grouped into conformational states the posterior typically pins the state masses
tightly while the split inside a state stays as loose as the prior, which only this family can say. It contains the
Dirichlet: ``Dir(alpha)`` is the nested law with ``a_g = sum_{t in g} alpha_t`` and ``b = alpha``.

Density on the simplex (Lebesgue measure on the first T-1 coordinates, as Pyro's Dirichlet):
``log q(w) = log Dir(M; a) + sum_g [log Dir(u_g; b_g) - (n_g - 1) log M_g]``.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .simplex import centred_simplex

__all__ = ["NestedDirichlet"]


def _segment_sum(x: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    out = x.new_zeros(x.shape[:-1] + (n_groups,))
    return out.index_add(-1, group, x)


class NestedDirichlet(dist.TorchDistribution):
    """Two-level Dirichlet tree over T components in G groups.

    Parameters
    ----------
    group_concentration : Tensor, shape (..., G)
        Concentrations ``a`` of the group masses.
    concentration : Tensor, shape (..., T)
        Concentrations ``b`` of the split inside each group.
    group : LongTensor, shape (T,)
        Group of each component, values in ``0..G-1``; every group non-empty.
    """

    arg_constraints = {"group_concentration": constraints.positive, "concentration": constraints.positive}
    support = centred_simplex  # unconstrained by a centred softmax, like the frames' Dirichlet
    has_rsample = True

    def __init__(self, group_concentration: torch.Tensor, concentration: torch.Tensor, group: torch.Tensor,
                 validate_args=None):
        self.group = torch.as_tensor(group, dtype=torch.long, device=concentration.device)
        self.n_groups = int(group_concentration.shape[-1])
        batch_shape = torch.broadcast_shapes(group_concentration.shape[:-1], concentration.shape[:-1])
        self.group_concentration = group_concentration.expand(batch_shape + group_concentration.shape[-1:])
        self.concentration = concentration.expand(batch_shape + concentration.shape[-1:])
        self.group_size = torch.bincount(self.group, minlength=self.n_groups).to(concentration.dtype)
        if validate_args is not False and bool((self.group_size == 0).any()):
            raise ValueError("NestedDirichlet: every group needs at least one component")
        super().__init__(batch_shape, concentration.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return NestedDirichlet(self.group_concentration.expand(batch_shape + (self.n_groups,)),
                               self.concentration.expand(batch_shape + self.event_shape), self.group,
                               validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        masses = self.group_concentration / self.group_concentration.sum(-1, keepdim=True)
        within = self.concentration / _segment_sum(self.concentration, self.group, self.n_groups)[..., self.group]
        return masses[..., self.group] * within

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        masses = dist.Dirichlet(self.group_concentration).rsample(sample_shape)
        # a split inside every group at once: normalised Gamma draws per group
        gam = dist.Gamma(self.concentration.expand(shape), 1.0).rsample()
        gam = gam.clamp_min(torch.finfo(gam.dtype).tiny)
        u = gam / _segment_sum(gam, self.group, self.n_groups)[..., self.group]
        return masses[..., self.group] * u

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        tiny = torch.finfo(value.dtype).tiny
        masses = _segment_sum(value, self.group, self.n_groups).clamp_min(tiny)
        u = (value / masses[..., self.group]).clamp_min(tiny)
        lp_masses = dist.Dirichlet(self.group_concentration).log_prob(masses / masses.sum(-1, keepdim=True))
        b = self.concentration
        b_sum = _segment_sum(b, self.group, self.n_groups)
        lp_within = (torch.lgamma(b_sum).sum(-1) - torch.lgamma(b).sum(-1) + ((b - 1) * u.log()).sum(-1))
        jacobian = ((self.group_size - 1) * masses.log()).sum(-1)
        return lp_masses + lp_within - jacobian
