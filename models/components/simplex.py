"""A symmetric parametrisation of the simplex: softmax with one pinned logit (the additive log-ratio).

Pyro maps the simplex to R^(T-1) by stick-breaking, which orders the components: the last weights are products of
many sticks, so a Gaussian guide in that space treats frames unequally. The centred softmax treats every component
but the reference alike, which is what a logistic-normal posterior over exchangeable frames needs. Sites whose
distribution has :data:`centred_simplex` as support get this transform from ``biject_to`` (autoguides, NUTS).
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import Transform

__all__ = ["SoftmaxCenteredTransform", "centred_simplex", "CentredDirichlet"]


class SoftmaxCenteredTransform(Transform):
    """``x in R^(T-1) -> softmax([x, 0])`` on the (T-1)-simplex; ``log|det J| = sum_t log w_t``."""

    domain = constraints.real_vector
    codomain = constraints.simplex
    bijective = True

    def __eq__(self, other):
        return isinstance(other, SoftmaxCenteredTransform)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._padded(x), dim=-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_y = y.clamp_min(torch.finfo(y.dtype).tiny).log()
        return log_y[..., :-1] - log_y[..., -1:]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # from x (stable log-softmax) rather than log(y), which underflows for tiny weights
        return torch.log_softmax(self._padded(x), dim=-1).sum(-1)

    @staticmethod
    def _padded(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(x.shape[:-1] + (1,))], dim=-1)

    def forward_shape(self, shape):
        return shape[:-1] + (shape[-1] + 1,)

    def inverse_shape(self, shape):
        return shape[:-1] + (shape[-1] - 1,)


class _CentredSimplex(constraints._Simplex):
    """The simplex, unconstrained by :class:`SoftmaxCenteredTransform` instead of stick-breaking."""


centred_simplex = _CentredSimplex()


@biject_to.register(_CentredSimplex)
@transform_to.register(_CentredSimplex)
def _centred_simplex_bijector(constraint):
    return SoftmaxCenteredTransform()


class CentredDirichlet(dist.Dirichlet):
    """A Dirichlet whose support unconstrains through the centred softmax (same density as ``Dirichlet``)."""

    support = centred_simplex

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(CentredDirichlet, _instance)
        return super().expand(batch_shape, _instance=new)
