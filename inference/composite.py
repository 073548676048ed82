"""Posteriors from composite likelihoods (pseudo-likelihoods, pairwise likelihoods): the curvature adjustment.

A composite log-likelihood ``l_c`` (a sum of log conditionals or marginals that is not the log of one density)
has a consistent maximiser, but its curvature ``H`` overstates the information: the posterior it makes is too
narrow. The Godambe (sandwich) information ``G = H V^{-1} H``, with ``V`` the variance of the score (the sum of the
outer products of the per-observation score vectors), is the inverse of the estimator's asymptotic covariance.
Following Ribatet, Cooley & Davison (Statistica Sinica 22, 813, 2012) and Chandler & Bate (Biometrika 94, 167,
2007), draws from the composite posterior are moved linearly about the mode ``theta_hat``,

    theta_adj = theta_hat + D (theta - theta_hat),   D H^{-1} D^T = G^{-1},   D = M_G^{-1} M,

with Cholesky factors ``M^T M = H`` and ``M_G^T M_G = G`` (Ribatet's ``C = M^{-1} M_G`` acts on the likelihood's
argument, ``l_adj(theta) = l_c(theta_hat + C (theta - theta_hat))``; draws move by its inverse, ``D = C^{-1}``).
With a prior, only the likelihood's part of the curvature is adjusted: ``G = H_l V^{-1} H_l + H_prior`` with
``H_l = H - H_prior``.

The map assumes the draws have covariance ``H^{-1}`` (exact draws of the composite posterior, near Gaussian). Draws
from an approximation with another known covariance ``S`` (a mean-field guide's ``diag(1 / H_kk)`` is narrower than
``H^{-1}`` wherever parameters correlate) take ``draws_covariance=S`` instead: ``D = L_G^{-T} L_S^{-1}`` with
``L_S L_S^T = S`` and ``L_G L_G^T = G``, so that ``D S D^T = G^{-1}`` again. Nothing here knows what the parameters
mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["godambe_information", "SandwichAdjustment", "sandwich_adjustment"]


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.T)


def _prior_matrix(prior_hessian, d: int, like: torch.Tensor) -> torch.Tensor:
    if prior_hessian is None:
        return like.new_zeros(d, d)
    p = torch.as_tensor(prior_hessian, dtype=like.dtype, device=like.device)
    if p.dim() == 1:
        p = torch.diag(p)
    if p.shape != (d, d):
        raise ValueError(f"prior_hessian must be ({d},) or ({d}, {d}), got {tuple(p.shape)}")
    return p


def _cholesky(a: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(_sym(a))
    if int(info) != 0:
        raise ValueError(f"sandwich adjustment: {what} is not positive definite (the mode is not a strict "
                         "maximum, or the data do not inform every parameter)")
    return factor


def godambe_information(hessian, score_outer, prior_hessian=None, rel_jitter: float = 1e-10) -> torch.Tensor:
    """``G = H_l V^{-1} H_l + H_prior`` (D, D), float64; ``hessian`` is the negative log posterior's (or, without a
    prior, the negative composite log-likelihood's) Hessian at the mode, ``score_outer`` the summed outer products of
    the centred per-observation scores, ``prior_hessian`` (D,) or (D, D) the negative log prior's part of
    ``hessian``. ``V`` gets a ridge of ``rel_jitter`` times its mean diagonal so a degenerate direction stays
    finite."""
    H = torch.as_tensor(hessian).double()
    V = torch.as_tensor(score_outer, dtype=H.dtype, device=H.device)
    d = H.shape[0]
    if H.shape != (d, d) or V.shape != (d, d):
        raise ValueError(f"hessian and score_outer must both be (D, D), got {tuple(H.shape)} and {tuple(V.shape)}")
    P = _prior_matrix(prior_hessian, d, H)
    Hl = _sym(H - P)
    ridge = rel_jitter * float(torch.diagonal(V).mean().clamp_min(1e-300))
    LV = _cholesky(V + ridge * torch.eye(d, dtype=H.dtype, device=H.device), "the score variance V")
    A = torch.linalg.solve_triangular(LV, Hl, upper=False)  # L_V^{-1} H_l, so A^T A = H_l V^{-1} H_l
    return _sym(A.T @ A + P)


@dataclass
class SandwichAdjustment:
    """The linear map of a composite posterior's draws: ``theta_adj = mode + (theta - mode) @ transform.T``.

    ``godambe`` (D, D) is the adjusted precision G; ``variance_ratio`` (D,) is ``diag(G^{-1}) / diag(H^{-1})`` (or
    over ``diag(S)`` for given draws' covariance S), how much each parameter's variance grows (2 for a parameter
    counted twice by the composite likelihood).
    """

    mode: torch.Tensor
    transform: torch.Tensor
    godambe: torch.Tensor
    variance_ratio: torch.Tensor

    @classmethod
    def from_curvature(cls, mode, hessian, score_outer, prior_hessian=None,
                       draws_covariance=None) -> "SandwichAdjustment":
        """The adjustment at ``mode`` (D,) from the curvature (see :func:`godambe_information`); the draws are taken
        to have covariance ``H^{-1}``, or ``draws_covariance`` (D, D) when given."""
        H = _sym(torch.as_tensor(hessian).double())
        G = godambe_information(H, score_outer, prior_hessian)
        LG = _cholesky(G, "the Godambe information G")
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        if draws_covariance is None:
            L = _cholesky(H, "the Hessian H")
            # D = M_G^{-1} M with M = L^T, M_G = L_G^T (upper triangular)
            D = torch.linalg.solve_triangular(LG.T, L.T, upper=True)
            var_before = torch.diagonal(torch.cholesky_solve(eye, L))
        else:
            S = torch.as_tensor(draws_covariance, dtype=H.dtype, device=H.device)
            if S.shape != H.shape:
                raise ValueError(f"draws_covariance must be {tuple(H.shape)}, got {tuple(S.shape)}")
            LS = _cholesky(S, "the draws' covariance")
            D = torch.linalg.solve_triangular(LG.T, torch.linalg.solve_triangular(LS, eye, upper=False), upper=True)
            var_before = torch.diagonal(S)
        var_g = torch.diagonal(torch.cholesky_solve(eye, LG))
        return cls(mode=torch.as_tensor(mode).double().reshape(-1), transform=D, godambe=G,
                   variance_ratio=var_g / var_before)

    def apply(self, draws):
        """Adjusted draws, same shape and type as ``draws`` (..., D) (a NumPy array or a tensor)."""
        is_numpy = not isinstance(draws, torch.Tensor)
        x = torch.as_tensor(np.asarray(draws) if is_numpy else draws).double()
        if x.shape[-1] != self.mode.shape[0]:
            raise ValueError(f"draws have {x.shape[-1]} parameters, the adjustment {self.mode.shape[0]}")
        out = self.mode + (x - self.mode) @ self.transform.T
        return out.numpy() if is_numpy else out.to(draws.dtype)


def sandwich_adjustment(draws, mode, hessian, score_outer, prior_hessian=None, draws_covariance=None):
    """Curvature-adjusted composite-posterior draws (..., D): see the module docstring and
    :class:`SandwichAdjustment` (whose ``from_curvature(...).apply(draws)`` this is)."""
    return SandwichAdjustment.from_curvature(mode, hessian, score_outer, prior_hessian, draws_covariance).apply(draws)
