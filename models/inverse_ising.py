"""The inverse Ising problem: couplings and fields of a fully visible Boltzmann machine from its samples.

Generative story: spins ``s in {-1, +1}^N`` follow ``p(s | J, h) = exp(sum_{i<j} J_ij s_i s_j + sum_i h_i s_i) / Z``,
with ``J`` including the inverse temperature (the nearest-neighbour ferromagnet at temperature T has ``J = 1/T`` on
the lattice bonds and 0 elsewhere). ``Z`` sums over ``2^N`` states, so the model's likelihood is Besag's
pseudo-likelihood (Besag 1975; Aurell & Ekeberg, PRL 108, 090201, 2012), the product over samples and sites of the
conditionals ``p(s_i | s_-i) = sigmoid(2 s_i f_i)`` with the local field ``f_i = h_i + sum_j J_ij s_j``. It is
convex in (J, h), consistent, and needs no Z.

A posterior built from it is a composite-likelihood posterior and is too narrow: every coupling enters the
conditionals of both its sites, so (in the weak-coupling limit exactly) its information is counted twice and its
variance is too small by 2x. :func:`pseudo_likelihood_curvature` returns what the sandwich (Godambe) adjustment of
:mod:`physppl.inference.composite` needs to correct that.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = ["InverseIsing", "to_pm1_spins", "all_pairs", "lattice_pairs", "resolve_pairs", "coupling_matrix",
           "conditional_log_probs", "pseudo_log_likelihood", "log_likelihood_exact", "log_partition",
           "pseudo_likelihood_curvature", "pairs_labels", "is_lattice_bond", "MAX_EXACT_SITES"]

MAX_EXACT_SITES = 20  # 2^20 states per evaluation of Z


# -- spins ---------------------------------------------------------------------------------------------------------
def to_pm1_spins(s: Any, source: str = "spins") -> tuple[np.ndarray, int | None]:
    """Spin samples as a float64 (n, N) array of +-1, and the lattice side L when given as (n, L, L).

    Accepts values {-1, +1} or {0, 1} (0 -> -1; bool too), shape (n, N) or (n, L, L). ``ValueError`` naming the
    ``source``, the shape or the values found (and where) otherwise.
    """
    if isinstance(s, torch.Tensor):
        s = s.detach().cpu().numpy()
    a = np.asarray(s)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_)) \
            or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{source}: spins must be a numeric array of +-1 (or 0/1), got dtype {a.dtype}")
    side = None
    if a.ndim == 3:
        if a.shape[1] != a.shape[2]:
            raise ValueError(f"{source}: a 3-D array must be (n, L, L) square lattices, got shape {a.shape}")
        side = int(a.shape[1])
        a = a.reshape(a.shape[0], -1)
    elif a.ndim != 2:
        raise ValueError(f"{source}: expected spins of shape (n_samples, n_sites) or (n_samples, L, L), got shape "
                         f"{a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"{source}: need at least 2 samples of at least 2 sites, got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{source}: non-finite value {a[bad]} at (sample, site) {bad}; spins must be +-1 or 0/1")
    values = np.unique(a)
    if set(values.tolist()) <= {-1.0, 1.0}:
        return a, side
    if set(values.tolist()) <= {0.0, 1.0}:
        return 2.0 * a - 1.0, side
    other = values[~np.isin(values, (-1.0, 0.0, 1.0))]
    shown = (other if other.size else values)[:8].tolist()
    where = tuple(int(i) for i in np.argwhere(~np.isin(a, (-1.0, 1.0)))[0]) if other.size == 0 else \
        tuple(int(i) for i in np.argwhere(a == other[0])[0])
    raise ValueError(f"{source}: spins must all be +-1 or all 0/1; found values {values[:8].tolist()} "
                     f"({shown} do not fit, e.g. at (sample, site) {where})")


# -- the candidate pairs -------------------------------------------------------------------------------------------
def all_pairs(n_sites: int) -> torch.Tensor:
    """Every pair ``(i, j)``, ``i < j``, in row-major order: LongTensor (N (N - 1) / 2, 2)."""
    i, j = torch.triu_indices(n_sites, n_sites, offset=1)
    return torch.stack([i, j], 1)


def lattice_pairs(L: int) -> torch.Tensor:
    """Nearest-neighbour bonds of the periodic L x L lattice (sites row by row), ``i < j``: LongTensor (n_bonds, 2)."""
    from .simulators.spin_glass import lattice_bonds

    return torch.as_tensor(lattice_bonds(int(L)), dtype=torch.long)


def resolve_pairs(graph: Any, n_sites: int, lattice_side: int | None = None) -> torch.Tensor:
    """The candidate pairs of ``graph``: ``"all"``, ``"lattice"`` (nearest neighbours of the periodic L x L lattice,
    ``N = L^2``) or an explicit list of pairs ``[[i, j], ...]``; LongTensor (n_pairs, 2), each row ``i < j``."""
    if isinstance(graph, str):
        key = graph.strip().lower()
        if key == "all":
            return all_pairs(n_sites)
        if key == "lattice":
            L = lattice_side if lattice_side is not None else math.isqrt(n_sites)
            if L * L != n_sites:
                raise ValueError(f"graph='lattice' needs N = L^2 sites on an L x L lattice, got N={n_sites}")
            return lattice_pairs(L)
        raise ValueError(f"graph must be 'all', 'lattice' or a list of pairs [[i, j], ...], got {graph!r}")
    p = torch.as_tensor(np.asarray(graph, dtype=np.int64))
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 1:
        raise ValueError(f"graph: a list of pairs must have shape (n_pairs, 2), got {tuple(p.shape)}")
    if bool((p < 0).any()) or bool((p >= n_sites).any()):
        raise ValueError(f"graph: site indices must be in 0..{n_sites - 1}, got min {int(p.min())} max {int(p.max())}")
    if bool((p[:, 0] == p[:, 1]).any()):
        raise ValueError(f"graph: pair {p[p[:, 0] == p[:, 1]][0].tolist()} joins a site to itself")
    p = torch.sort(p, dim=1).values
    if len(torch.unique(p, dim=0)) != len(p):
        raise ValueError("graph: a pair is listed twice")
    return p


def coupling_matrix(J: torch.Tensor, pairs: torch.Tensor, n_sites: int) -> torch.Tensor:
    """Symmetric couplings (..., N, N) with zero diagonal from ``J`` (..., n_pairs) on ``pairs`` (n_pairs, 2)."""
    J = torch.as_tensor(J)
    flat = pairs[:, 0] * n_sites + pairs[:, 1]
    upper = J.new_zeros(J.shape[:-1] + (n_sites * n_sites,)).index_add(-1, flat.to(J.device), J)
    upper = upper.reshape(J.shape[:-1] + (n_sites, n_sites))
    return upper + upper.transpose(-1, -2)


# -- likelihoods ---------------------------------------------------------------------------------------------------
def _local_fields(s: torch.Tensor, J: torch.Tensor, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``f_ni = h_i + sum_j J_ij s_nj``: (..., n, N) for J (..., n_pairs), h (..., N), s (n, N)."""
    Jm = coupling_matrix(J, pairs, s.shape[-1]).to(s.dtype)
    return s @ Jm + h.to(s.dtype).unsqueeze(-2)


def conditional_log_probs(s: torch.Tensor, J: torch.Tensor, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``log p(s_ni | s_n,-i) = log sigmoid(2 s_ni f_ni)`` for every sample and site: (..., n, N)."""
    return torch.nn.functional.logsigmoid(2.0 * s * _local_fields(s, J, h, pairs))


def pseudo_log_likelihood(s: torch.Tensor, J: torch.Tensor, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Log pseudo-likelihood of each sample, ``sum_i log p(s_i | s_-i)``: (..., n), batched over the leading dims of
    ``J`` (..., n_pairs) and ``h`` (..., N); ``s`` (n, N) of +-1."""
    return conditional_log_probs(s, J, h, pairs).sum(-1)


def _energies(states: torch.Tensor, Jm: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((states @ Jm) * states).sum(-1) + states @ h


def log_partition(J: torch.Tensor, h: torch.Tensor, pairs: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """``log Z`` by enumerating all 2^N states (N <= 20), in float64, differentiable; J (n_pairs,), h (N,)."""
    n = int(h.shape[-1])
    if n > MAX_EXACT_SITES:
        raise ValueError(f"the exact likelihood enumerates 2^N states: N={n} sites is beyond the limit of "
                         f"{MAX_EXACT_SITES}; use the pseudo-likelihood")
    if J.dim() != 1 or h.dim() != 1:
        raise ValueError(f"log_partition takes one J (n_pairs,) and one h (N,), got shapes {tuple(J.shape)}, "
                         f"{tuple(h.shape)}")
    Jm = coupling_matrix(J.double(), pairs, n)
    bits = torch.arange(n, device=h.device)
    parts = []
    for start in range(0, 2**n, chunk):
        codes = torch.arange(start, min(start + chunk, 2**n), device=h.device)[:, None]
        states = (2 * ((codes >> bits) & 1) - 1).double()
        parts.append(torch.logsumexp(_energies(states, Jm, h.double()), 0))
    return torch.logsumexp(torch.stack(parts), 0)


def log_likelihood_exact(s: torch.Tensor, J: torch.Tensor, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Exact ``log p(s_n | J, h)`` of each sample (n,), float64, with ``Z`` by enumeration (N <= 20 sites)."""
    s = torch.as_tensor(s).double()
    Jm = coupling_matrix(J.double(), pairs, s.shape[-1])
    return _energies(s, Jm, h.double()) - log_partition(J, h, pairs)


def pseudo_likelihood_curvature(s: torch.Tensor, J: torch.Tensor, h: torch.Tensor, pairs: torch.Tensor,
                                chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic curvature of the log pseudo-likelihood at (J, h), parameters ordered ``theta = (J, h)``
    (n_pairs + N values), in float64.

    Returns ``hessian`` (D, D), the Hessian of the *negative* log pseudo-likelihood summed over samples;
    ``score_mean`` (D,) and ``score_outer`` (D, D), the mean of the per-sample score vectors and the sum of the outer
    products of the centred ones (the sandwich's V). With ``sigma = sigmoid(2 s_i f_i)`` a sample's score is
    ``2 s_i (1 - sigma)`` for h_i and ``g_i s_j + g_j s_i`` for J_ij, and its conditional for site i adds
    ``4 sigma (1 - sigma) x x^T`` to the Hessian, with x the site's local-field gradient (1 for h_i, s_j for J_ij).
    """
    s = torch.as_tensor(s).double()
    J, h = J.detach().double(), h.detach().double()
    n, N = s.shape
    P = int(pairs.shape[0])
    D = P + N
    # theta-index of the coefficient of x_j in site i's local field: h_i on the diagonal, J_ij off it, -1 if absent
    index = torch.full((N, N), -1, dtype=torch.long, device=s.device)
    pr = pairs.to(s.device)
    index[pr[:, 0], pr[:, 1]] = torch.arange(P, device=s.device)
    index[pr[:, 1], pr[:, 0]] = torch.arange(P, device=s.device)
    index[torch.arange(N), torch.arange(N)] = P + torch.arange(N, device=s.device)
    valid = index >= 0
    blocks = s.new_zeros(N, N, N)
    scores = []
    eye = torch.eye(N, dtype=torch.bool, device=s.device)
    for start in range(0, n, chunk):
        x = s[start:start + chunk]
        f = _local_fields(x, J, h, pairs)
        sig = torch.sigmoid(2.0 * x * f)
        g = 2.0 * x * (1.0 - sig)  # d/df of log sigmoid(2 s f)
        w = 4.0 * sig * (1.0 - sig)  # -d^2/df^2
        # site i's regressors: the other spins, and 1 (the field) in column i
        X = torch.where(eye[:, None, :], torch.ones_like(x)[None], x[None])  # (N, b, N)
        blocks += torch.einsum("iba,bi,ibc->iac", X, w, X)
        score = x.new_zeros(len(x), D)
        score[:, P:] = g
        score[:, :P] = g[:, pr[:, 0]] * x[:, pr[:, 1]] + g[:, pr[:, 1]] * x[:, pr[:, 0]]
        scores.append(score)
    scores = torch.cat(scores)
    hessian = s.new_zeros(D, D)
    for i in range(N):
        idx = index[i][valid[i]]
        hessian.index_put_((idx[:, None], idx[None, :]), blocks[i][valid[i]][:, valid[i]], accumulate=True)
    mean = scores.mean(0)
    centred = scores - mean
    return hessian, mean, centred.T @ centred


# -- the model -----------------------------------------------------------------------------------------------------
class InverseIsing(PyroModule):
    """Couplings and fields of an Ising model (fully visible Boltzmann machine) under Besag's pseudo-likelihood.

    Sample sites
    ------------
    J : Tensor, shape (n_pairs,), plate "pairs"
        Coupling of each candidate pair ``pairs[k] = (i, j)``, ``i < j``; prior ``Normal(0, coupling_scale)`` or
        ``Laplace(0, coupling_scale)`` (sparse interaction graphs).
    h : Tensor, shape (N,), plate "sites"
        Field of each site, prior ``Normal(0, field_scale)``.
    pseudo_likelihood : factor, shape (n,) or (batch,), plate "samples"
        ``sum_i log sigmoid(2 s_ni f_ni)`` per sample (:func:`pseudo_log_likelihood`); a minibatch (``subsample``)
        is scaled by n / batch by the plate.

    Parameters
    ----------
    n_sites : int
        N, the number of spins per sample.
    graph : "all", "lattice" or list of pairs
        Candidate pairs (see :func:`resolve_pairs`); a pair left out has coupling 0.
    lattice_side : int, optional
        L of an L x L lattice (sites row by row), for ``graph="lattice"`` and to flag lattice bonds.
    prior : {"normal", "laplace"}
    coupling_scale, field_scale : float
        Prior scales of J and h.
    """

    def __init__(self, n_sites: int, graph: Any = "all", lattice_side: int | None = None, prior: str = "normal",
                 coupling_scale: float = 1.0, field_scale: float = 1.0):
        super().__init__()
        if int(n_sites) < 2:
            raise ValueError(f"InverseIsing: need n_sites >= 2, got {n_sites}")
        if prior not in ("normal", "laplace"):
            raise ValueError(f"InverseIsing: prior must be 'normal' or 'laplace', got {prior!r}")
        for name, v in (("coupling_scale", coupling_scale), ("field_scale", field_scale)):
            if not (math.isfinite(float(v)) and float(v) > 0):
                raise ValueError(f"InverseIsing: {name} must be finite and > 0, got {v!r}")
        self.n_sites = int(n_sites)
        self.lattice_side = None if lattice_side is None else int(lattice_side)
        self.graph = graph if isinstance(graph, str) else "explicit"
        self.prior = prior
        self.coupling_scale = float(coupling_scale)
        self.field_scale = float(field_scale)
        self.register_buffer("pairs", resolve_pairs(graph, self.n_sites, self.lattice_side))
        self.register_buffer("_zero", torch.zeros(()))

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.shape[0])

    def _coupling_distribution(self) -> dist.Distribution:
        family = dist.Normal if self.prior == "normal" else dist.Laplace
        return family(self._zero, self._zero + self.coupling_scale)

    def _field_distribution(self) -> dist.Distribution:
        return dist.Normal(self._zero, self._zero + self.field_scale)

    def log_prior(self, J: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``log p(J) + log p(h)``, summed over pairs and sites (batched over leading dims)."""
        return (self._coupling_distribution().log_prob(J).sum(-1)
                + self._field_distribution().log_prob(h).sum(-1))

    def prior_hessian(self) -> torch.Tensor:
        """Diagonal (n_pairs + N,) of the negative log prior's Hessian in (J, h); 0 for a Laplace prior's J
        (its curvature is 0 away from J = 0)."""
        j = (1.0 / self.coupling_scale**2) if self.prior == "normal" else 0.0
        return torch.cat([torch.full((self.n_pairs,), j), torch.full((self.n_sites,), 1.0 / self.field_scale**2)])

    def forward(self, s: torch.Tensor, subsample: torch.Tensor | None = None) -> None:
        """``s``: (n, N) spins +-1 (as :func:`to_pm1_spins` gives them); ``subsample`` indexes a minibatch of rows."""
        if s.dim() != 2 or s.shape[-1] != self.n_sites:
            raise ValueError(f"InverseIsing: expected spins of shape (n, {self.n_sites}), got {tuple(s.shape)}")
        with pyro.plate("pairs", self.n_pairs, dim=-1):
            J = pyro.sample("J", self._coupling_distribution())
        with pyro.plate("sites", self.n_sites, dim=-1):
            h = pyro.sample("h", self._field_distribution())
        with pyro.plate("samples", s.shape[0], subsample=subsample, dim=-1) as idx:
            pyro.factor("pseudo_likelihood", pseudo_log_likelihood(s[idx], J, h, self.pairs))


def pairs_labels(pairs: torch.Tensor | np.ndarray) -> list[str]:
    """``"i-j"`` for each pair: the ``pair`` coordinate of posterior.nc."""
    p = np.asarray(pairs)
    return [f"{int(i)}-{int(j)}" for i, j in p]


def is_lattice_bond(pairs: torch.Tensor | np.ndarray, lattice_side: int | None) -> np.ndarray:
    """Which pairs are nearest-neighbour bonds of the periodic L x L lattice (all False without a lattice)."""
    p = np.asarray(pairs)
    if lattice_side is None:
        return np.zeros(len(p), dtype=bool)
    bonds = {tuple(b) for b in np.asarray(lattice_pairs(lattice_side)).tolist()}
    return np.array([(int(i), int(j)) in bonds for i, j in p], dtype=bool)
