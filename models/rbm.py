"""Restricted Boltzmann machine: binary visible and hidden units with the energy
``E(v, h) = -a.v - b.h - v^T W h`` and ``p(v, h) = exp(-E(v, h)) / Z``.

The hidden units sum out analytically: ``p(v) = exp(-F(v)) / Z`` with the free energy
``F(v) = -a.v - sum_j softplus(b_j + (v W)_j)``, and given ``v`` they are independent,
``p(h_j = 1 | v) = sigmoid(b_j + (v W)_j)`` (likewise ``p(v_i = 1 | h) = sigmoid(a_i + (W h)_i)``), which is what
block Gibbs sampling alternates. ``Z`` is intractable beyond ~25 units on the smaller layer: :meth:`log_z_exact`
enumerates the smaller layer; :func:`physppl.inference.ais.annealed_log_z` estimates it otherwise.

Spins: data in +-1 (Ising) map to 0/1 by ``(s + 1) / 2`` (:func:`to_binary`); the model itself is 0/1.
"""
from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.nn import functional as F

__all__ = ["BernoulliRBM", "to_binary", "all_states", "MAX_ENUMERATION_UNITS"]

MAX_ENUMERATION_UNITS = 24  # 2^24 states, enumerated in chunks of 2^16: seconds to a minute on a laptop
_CHUNK_BITS = 16


def to_binary(x: torch.Tensor, name: str = "data") -> torch.Tensor:
    """0/1 float configurations from 0/1 or +-1 values (any shape ``(n, ...)``, flattened to ``(n, N)``); any other
    value is an error naming how many entries and which values."""
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected configurations of shape (n, N) or (n, L, L), got shape {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    values = torch.unique(flat)
    if not torch.isfinite(flat).all():
        raise ValueError(f"{name}: {int((~torch.isfinite(flat)).sum())} entries are NaN or infinite")
    if set(values.tolist()) <= {0.0, 1.0}:
        return flat
    if set(values.tolist()) <= {-1.0, 1.0}:
        return (flat + 1) / 2
    bad = [v for v in values.tolist() if v not in (0.0, 1.0, -1.0)][:5]
    raise ValueError(f"{name}: expected spins as 0/1 or -1/+1, found other values such as {bad}")


def all_states(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Every binary vector of length ``n``, shape ``(2^n, n)``."""
    if n > MAX_ENUMERATION_UNITS:
        raise ValueError(f"enumerating 2^{n} states is too many (at most 2^{MAX_ENUMERATION_UNITS})")
    return torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=dtype)


class BernoulliRBM(PyroModule):
    """A Bernoulli-Bernoulli RBM as a Pyro model of the visible configurations.

    Sample sites
    ------------
    h : Tensor, shape (batch, n_hidden), plate "data" (dim -2) x plate "hidden" (dim -1)
        The hidden units, ``Bernoulli(sigmoid(b + v W))``: their exact conditional given the observed ``v``. It is a
        sample site so that the model's trace shows the latent structure (and :class:`physppl.guides.rbm.RBMGuide`,
        the exact posterior, can be checked against enumeration); the likelihood of ``v`` does not depend on it.
    v : factor, shape (batch,), plate "data"
        ``-F(v)``, the unnormalised log marginal of each configuration (``pyro.factor``): log p(v) + log Z.
        ``log Z`` is a constant of the parameters, not of the data, so the factor's gradient is the positive phase
        only; contrastive divergence (:mod:`physppl.inference.contrastive`) adds the negative phase.

    Parameters
    ----------
    n_visible, n_hidden : int
    init_scale : float
        Weights start as ``N(0, init_scale^2)`` (Hinton's practical guide: 0.01).
    visible_bias : Tensor, optional
        Start of ``a``; ``log(p / (1 - p))`` of the data's mean ``p`` is the usual choice (:meth:`init_from_data`).
    """

    def __init__(self, n_visible: int, n_hidden: int, init_scale: float = 0.01,
                 visible_bias: torch.Tensor | None = None, seed: int | None = None):
        super().__init__()
        if int(n_visible) < 1 or int(n_hidden) < 1:
            raise ValueError(f"BernoulliRBM: n_visible and n_hidden must be >= 1, got {n_visible}, {n_hidden}")
        self.n_visible, self.n_hidden = int(n_visible), int(n_hidden)
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        # unconstrained parameters: plain nn.Parameters (no PyroParam transform to apply at every access)
        self.W = torch.nn.Parameter(init_scale * torch.randn(self.n_visible, self.n_hidden, generator=gen,
                                                             dtype=torch.float64))
        a = torch.zeros(self.n_visible, dtype=torch.float64) if visible_bias is None else \
            torch.as_tensor(visible_bias, dtype=torch.float64).clone()
        self.a = torch.nn.Parameter(a)
        self.b = torch.nn.Parameter(torch.zeros(self.n_hidden, dtype=torch.float64))

    def init_from_data(self, v: torch.Tensor) -> "BernoulliRBM":
        """Visible biases at the data's log-odds (clipped at 1e-3): the model's marginals start right."""
        p = v.to(self.a.dtype).mean(0).clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.a.copy_(torch.log(p / (1 - p)))
        return self

    # -- the energy model ----------------------------------------------------------------------------
    def energy(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``E(v, h)``, shape ``broadcast(v, h)[:-1]``."""
        return -(v @ self.a) - (h @ self.b) - ((v @ self.W) * h).sum(-1)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """``F(v) = -log sum_h exp(-E(v, h))``, shape ``v.shape[:-1]``."""
        return -(v @ self.a) - F.softplus(v @ self.W + self.b).sum(-1)

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        """``p(h_j = 1 | v)``."""
        return torch.sigmoid(v @ self.W + self.b)

    def visible_probs(self, h: torch.Tensor) -> torch.Tensor:
        """``p(v_i = 1 | h)``."""
        return torch.sigmoid(h @ self.W.T + self.a)

    @torch.no_grad()
    def gibbs(self, v: torch.Tensor, steps: int = 1, beta: float | torch.Tensor = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """``steps`` block-Gibbs sweeps (h | v, then v | h) at inverse temperature ``beta`` (a float, or one per
        chain, shape ``(n_chains, 1)``, for parallel tempering): ``p_beta(v, h) ∝ exp(-beta E(v, h))``."""
        W, a, b = self.W.detach(), self.a.detach(), self.b.detach()
        tempered = not (isinstance(beta, (int, float)) and beta == 1.0)
        if int(steps) < 1:
            return v
        # preallocated uniforms compared in place: 1.7x faster than torch.bernoulli on small layers, which are
        # bound by per-op overhead and random-number generation (experiments/benchmarks/rbm.py)
        h = torch.empty(v.shape[:-1] + (self.n_hidden,), dtype=W.dtype, device=W.device)
        out = torch.empty(v.shape, dtype=W.dtype, device=W.device)
        u_h, u_v = torch.empty_like(h), torch.empty_like(out)
        x = v.to(W.dtype)
        for _ in range(int(steps)):
            p = torch.addmm(b, x, W) if x.dim() == 2 else x @ W + b
            p = (p * beta).sigmoid_() if tempered else p.sigmoid_()
            torch.lt(u_h.uniform_(generator=generator), p, out=h)
            p = torch.addmm(a, h, W.T) if h.dim() == 2 else h @ W.T + a
            p = (p * beta).sigmoid_() if tempered else p.sigmoid_()
            torch.lt(u_v.uniform_(generator=generator), p, out=out)
            x = out
        return out

    def tempered_log_marginal(self, v: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
        """``log sum_h exp(-beta E(v, h))``: the unnormalised marginal of the tempered RBM (parallel tempering)."""
        return beta * (v @ self.a) + F.softplus(beta * (v @ self.W + self.b)).sum(-1)

    # -- exact quantities for small models -----------------------------------------------------------
    def log_z_exact(self) -> torch.Tensor:
        """``log Z`` by enumerating the smaller layer (at most 2^24 states, in chunks so memory stays small)."""
        n = min(self.n_hidden, self.n_visible)
        if n > MAX_ENUMERATION_UNITS:
            raise ValueError(f"log_z_exact: the smaller layer has {n} units; enumerating 2^{n} states is too many "
                             f"(at most 2^{MAX_ENUMERATION_UNITS}); estimate log Z by annealed importance sampling")
        low = all_states(min(n, _CHUNK_BITS), self.W.dtype).to(self.W.device)
        parts = []
        for high in all_states(n - low.shape[1], self.W.dtype).to(self.W.device) if n > _CHUNK_BITS else [None]:
            x = low if high is None else torch.cat([high.expand(len(low), -1), low], 1)
            if self.n_hidden <= self.n_visible:
                # sum_v exp(-E) = exp(b.h) prod_i (1 + exp(a_i + (W h)_i))
                parts.append(torch.logsumexp(x @ self.b + F.softplus(x @ self.W.T + self.a).sum(-1), 0))
            else:
                parts.append(torch.logsumexp(-self.free_energy(x), 0))
        return torch.logsumexp(torch.stack(parts), 0)

    def pseudo_log_likelihood(self, v: torch.Tensor) -> torch.Tensor:
        """``sum_i log p(v_i | v_-i)`` per configuration (Besag): each conditional is
        ``sigmoid(F(v with v_i flipped) - F(v))``; needs no ``Z``, so it tracks training on any size."""
        v = v.to(self.W.dtype)
        pre = v @ self.W + self.b  # (n, n_hidden)
        f0 = self.free_energy(v)
        sign = 1 - 2 * v  # +1 where v_i = 0 (flipping adds W_i), -1 where it is 1
        # F(v^(i)) for every i at once: the hidden pre-activation moves by sign_i W_i
        pre_flip = pre.unsqueeze(1) + sign.unsqueeze(-1) * self.W  # (n, n_visible, n_hidden)
        f_flip = -(v @ self.a).unsqueeze(1) - sign * self.a - F.softplus(pre_flip).sum(-1)
        return F.logsigmoid(f_flip - f0.unsqueeze(1)).sum(-1)

    @torch.no_grad()
    def sample(self, n_chains: int, sweeps: int, start: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n_chains`` independent block-Gibbs chains run for ``sweeps`` sweeps from ``start`` (default: independent
        units at the visible biases' probabilities); the last state of each, shape ``(n_chains, n_visible)``."""
        if start is None:
            start = torch.bernoulli(torch.sigmoid(self.a.detach()).expand(int(n_chains), -1).contiguous(),
                                    generator=generator)
        return self.gibbs(start, sweeps, generator=generator)

    def log_prob_exact(self, v: torch.Tensor) -> torch.Tensor:
        """``log p(v)`` per configuration, with the enumerated ``log Z``."""
        return -self.free_energy(v.to(self.W.dtype)) - self.log_z_exact()

    # -- annealed importance sampling (physppl.inference.ais.AnnealedModel) ----------------------------
    def ais_base(self, visible_bias: torch.Tensor | None = None) -> "RBMAnnealing":
        """The path from a visible-only model with biases ``visible_bias`` (default: the RBM's own ``a``; the
        data's log-odds are a good base, Salakhutdinov & Murray) to this RBM, for :func:`annealed_log_z`."""
        return RBMAnnealing(self, self.a.detach() if visible_bias is None else visible_bias)

    # -- the Pyro model ------------------------------------------------------------------------------
    def forward(self, v: torch.Tensor, subsample: torch.Tensor | None = None) -> None:
        v = v.to(self.W.dtype)
        with pyro.plate("data", v.shape[0], subsample=subsample, dim=-2) as idx:
            vb = v[idx]
            with pyro.plate("hidden", self.n_hidden, dim=-1):
                pyro.sample("h", dist.Bernoulli(probs=self.hidden_probs(vb)))
            pyro.factor("v", -self.free_energy(vb).unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"n_visible={self.n_visible}, n_hidden={self.n_hidden}"


class RBMAnnealing:
    """``p_beta*(v) = exp((1 - beta) a0.v + beta a.v) prod_j (1 + exp(beta (b + v W)_j))``: at beta = 0 independent
    visible units with biases ``a0`` (times the constant 2^n_hidden), at beta = 1 the RBM's ``exp(-F(v))``; the
    transition is one block-Gibbs sweep of the joint at ``beta``."""

    def __init__(self, rbm: BernoulliRBM, a0: torch.Tensor):
        self.rbm = rbm
        self.a0 = torch.as_tensor(a0, dtype=rbm.W.dtype).detach()

    def log_unnormalised(self, v: torch.Tensor, beta: float) -> torch.Tensor:
        r = self.rbm
        return ((1 - beta) * self.a0 + beta * r.a) @ v.T + F.softplus(beta * (v @ r.W + r.b)).sum(-1)

    def sample_base(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.a0).expand(n, -1).contiguous(), generator=generator)

    def log_z_base(self) -> torch.Tensor:
        return F.softplus(self.a0).sum() + self.rbm.n_hidden * math.log(2.0)

    def transition(self, v: torch.Tensor, beta: float, generator: torch.Generator) -> torch.Tensor:
        r = self.rbm
        h = torch.bernoulli(torch.sigmoid(beta * (v @ r.W + r.b)), generator=generator)
        return torch.bernoulli(torch.sigmoid((1 - beta) * self.a0 + beta * (h @ r.W.T + r.a)), generator=generator)
