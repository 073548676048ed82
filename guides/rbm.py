"""The RBM's exact posterior over its hidden units as a guide: ``q(h | v) = p(h | v) = prod_j Bernoulli(sigmoid(b_j +
(v W)_j))``. It is amortized (a function of ``v`` through the model's own parameters) and exact, because the
hidden units of an RBM are conditionally independent given the visible ones; so the ELBO of this guide is
``log p(v)`` up to ``log Z`` and nothing is learned by fitting it.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from physppl.models.rbm import BernoulliRBM

__all__ = ["RBMGuide"]


class RBMGuide(PyroModule):
    """Sample site ``h``: shape (batch, n_hidden), plates "data" (dim -2) and "hidden" (dim -1), as in
    :class:`~physppl.models.rbm.BernoulliRBM`; it holds no parameters of its own (it reads the model's)."""

    def __init__(self, model: BernoulliRBM):
        super().__init__()
        self._model = [model]  # in a list: the model's parameters are not the guide's

    def forward(self, v: torch.Tensor, subsample: torch.Tensor | None = None) -> None:
        model = self._model[0]
        v = v.to(model.W.dtype)
        with pyro.plate("data", v.shape[0], subsample=subsample, dim=-2) as idx:
            with pyro.plate("hidden", model.n_hidden, dim=-1):
                pyro.sample("h", dist.Bernoulli(probs=model.hidden_probs(v[idx]).detach()))
