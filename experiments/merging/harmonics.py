"""Harmonic overlaps of Laue data: which reflections add up in one spot.

A spot recorded at Miller index ``h`` with wavelength ``lambda`` lies on the ray of its fundamental
``h0 = h / gcd(h)``; every multiple ``n h0`` diffracts onto the same pixel at wavelength ``lambda0 / n`` (Bragg's
law keeps ``lambda / d`` fixed along the ray, ``lambda0 = gcd(h) lambda``). A harmonic is recorded when its
wavelength lies in the source band ``[lambda_min, lambda_max]`` and its resolution ``d0 / n`` is within the data's
limit. With a band narrower than a factor 2 only high orders of low-resolution rays can coincide, so most spots are
singlets; :func:`expand_harmonics` finds them all from the cell, the band and the resolution limit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import reciprocalspaceship as rs

__all__ = ["Harmonics", "expand_harmonics"]


@dataclass
class Harmonics:
    """The reflections recorded in each spot, padded to the largest multiplet.

    ``hkl`` (n_obs, H, 3): Miller indices (P1, as observed) of each component, the observed index first;
    ``wavelength`` (n_obs, H) and ``dhkl`` (n_obs, H) of each component; ``mask`` (n_obs, H) True for a real
    component. ``H == 1`` means every spot is a singlet.
    """

    hkl: np.ndarray
    wavelength: np.ndarray
    dhkl: np.ndarray
    mask: np.ndarray

    @property
    def max_order(self) -> int:
        return int(self.mask.shape[1])

    @property
    def n_multiplets(self) -> int:
        return int((self.mask.sum(1) > 1).sum())


def expand_harmonics(hkl: np.ndarray, wavelength: np.ndarray, cell, band: tuple[float, float],
                     dmin: float) -> Harmonics:
    """All harmonics of each spot within ``band`` (A) and ``d >= dmin`` (A); see the module docstring."""
    hkl = np.asarray(hkl, dtype=np.int64)
    lam = np.asarray(wavelength, dtype=float)
    lo, hi = float(band[0]), float(band[1])
    g = np.gcd.reduce(np.abs(hkl), axis=1)
    g = np.where(g == 0, 1, g)
    h0 = hkl // g[:, None]
    lam0 = lam * g
    d0 = np.atleast_1d(rs.utils.compute_dHKL(h0, cell)).astype(float) if len(h0) else np.zeros(0)
    tol = 1e-6
    n_lo = np.maximum(np.ceil(lam0 / hi - tol), 1).astype(np.int64)
    n_hi = np.minimum(np.floor(lam0 / lo + tol), np.floor(d0 / dmin + tol)).astype(np.int64)
    n_lo, n_hi = np.minimum(n_lo, g), np.maximum(n_hi, g)  # the observed order is always a component
    count = n_hi - n_lo + 1
    width = int(count.max()) if len(count) else 1
    orders = n_lo[:, None] + np.arange(width)[None, :]
    mask = orders <= n_hi[:, None]
    # the observed order first, then the others in increasing order
    is_obs = orders == g[:, None]
    key = np.where(is_obs, -1, np.where(mask, orders, np.iinfo(np.int64).max))
    order = np.argsort(key, axis=1, kind="stable")
    orders = np.take_along_axis(orders, order, 1)
    mask = np.take_along_axis(mask, order, 1)
    orders = np.where(mask, orders, g[:, None])  # padding repeats the observed component (masked out)
    comp_hkl = h0[:, None, :] * orders[..., None]
    comp_lam = lam0[:, None] / orders
    comp_d = d0[:, None] / orders
    return Harmonics(hkl=comp_hkl, wavelength=comp_lam, dhkl=comp_d, mask=mask)
