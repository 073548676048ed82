"""Simulated Laue (polychromatic) still images, optionally of two related structures, with known truth.

Each image is a still of a randomly oriented crystal in a pink beam: the scattering vector ``s = R B h`` of a
reflection ``h`` meets the Ewald sphere of wavelength ``lambda = -2 s_z / |s|^2``, and the reflection is recorded
when that wavelength lies in the band. All orders ``n h0`` of a ray diffract onto one pixel (at ``lambda0 / n``),
so a spot is the sum of its recorded harmonics, each weighted by the source spectrum at its wavelength; the spot
is indexed by its lowest recorded order, as Laue integration programs do. With two states, state 1's normalised
structure factors are ``E1 = r E0 + sqrt(1 - r^2) e`` (complex Gaussian ``e``), the double-Wilson relation, so the
true difference and its correlation are known.
"""
from __future__ import annotations

import math

import gemmi
import numpy as np
import reciprocalspaceship as rs

__all__ = ["simulate_laue", "true_spectrum"]

_DETECTOR_DISTANCE = 200.0  # mm; pixels of 0.1 mm on a 3000 x 3000 detector centred on the beam
_PIXEL = 0.1
_MAX_TWO_THETA = math.radians(60.0)


def true_spectrum(wavelength: np.ndarray, band: tuple[float, float], peak: float | None = None) -> np.ndarray:
    """The simulated source's relative intensity: a skewed bump over the band (an undulator-like pink beam)."""
    lo, hi = band
    peak = lo + 0.4 * (hi - lo) if peak is None else peak
    x = np.asarray(wavelength, float)
    width = np.where(x < peak, 0.25, 0.45) * (hi - lo)
    return np.exp(-0.5 * ((x - peak) / width) ** 2)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([[a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
                     [2*(b*c + a*d), a*a - b*b + c*c - d*d, 2*(c*d - a*b)],
                     [2*(b*d - a*c), 2*(c*d + a*b), a*a - b*b - c*c + d*d]])


def simulate_laue(
    spacegroup: str = "P 21 21 21",
    cell: tuple[float, ...] = (34.0, 45.0, 52.0, 90.0, 90.0, 90.0),
    dmin: float = 2.0,
    n_images: int = 12,
    band: tuple[float, float] = (0.6, 1.6),
    wilson_b: float = 15.0,
    mean_intensity: float = 2000.0,
    scale_drift: float = 0.1,
    read_noise: float = 5.0,
    n_states: int = 1,
    state_correlation: float = 0.9,
    seed: int = 0,
) -> tuple[rs.DataSet, rs.DataSet]:
    """Simulate Laue stills; with ``n_states = 2`` half the images are of a second, related structure.

    Returns
    -------
    unmerged : rs.DataSet
        One row per spot, indexed by its (P1, as recorded) H, K, L, with BATCH, I, SIGI, X, Y (pixels),
        Wavelength (of the recorded order), DATASET (the state), N_HARMONICS (recorded orders on the spot) and
        SCALE_TRUE (the image's scale).
    truth : rs.DataSet
        ASU H, K, L with F (state 0), F_0, F_1 (with two states), CENTRIC, EPSILON, dHKL; ``attrs["band"]``.
    """
    if n_states not in (1, 2):
        raise ValueError(f"n_states must be 1 or 2, got {n_states}")
    if not 0.0 <= state_correlation <= 1.0:
        raise ValueError(f"state_correlation must be in [0, 1], got {state_correlation}")
    lo, hi = float(band[0]), float(band[1])
    if not 0 < lo < hi:
        raise ValueError(f"band must be (lambda_min, lambda_max) with 0 < min < max, got {band}")
    sg = gemmi.find_spacegroup_by_name(spacegroup)
    if sg is None:
        raise ValueError(f"unknown space group {spacegroup!r}")
    gcell = gemmi.UnitCell(*map(float, cell))
    rng = np.random.default_rng(seed)

    # true amplitudes of the ASU (acentric Rayleigh / centric half-normal), per state
    H = rs.utils.generate_reciprocal_asu(gcell, sg, dmin, anomalous=False)
    H = H[~rs.utils.is_absent(H, sg)].astype(np.int64)
    d = rs.utils.compute_dHKL(H, gcell).astype(float)
    eps = rs.utils.compute_structurefactor_multiplicity(H, sg).astype(float)
    centric = rs.utils.is_centric(H, sg).astype(bool)
    sigma = mean_intensity * np.exp(-2.0 * wilson_b / (4 * d**2)) * eps
    n = len(H)

    def complex_e():
        re, im = rng.normal(size=n), rng.normal(size=n)
        return np.where(centric, re, (re + 1j * im) / math.sqrt(2))

    e0 = complex_e()
    states = [np.abs(e0) * np.sqrt(sigma)]
    if n_states == 2:
        r = state_correlation
        e1 = r * e0 + math.sqrt(1 - r * r) * complex_e()
        states.append(np.abs(e1) * np.sqrt(sigma))
    asu_index = {tuple(h): i for i, h in enumerate(H)}

    # every P1 reflection to dmin (both hands), mapped to its ASU reflection
    hmax = [int(math.floor(gcell.parameters[i] / dmin)) + 1 for i in range(3)]
    grid = np.stack(np.meshgrid(*[np.arange(-m, m + 1) for m in hmax], indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)]
    grid = grid[rs.utils.compute_dHKL(grid, gcell) >= dmin]
    grid = grid[~rs.utils.is_absent(grid, sg)]
    g_asu, _ = rs.utils.hkl_to_asu(grid, sg)
    g_refl = np.array([asu_index.get(tuple(h), -1) for h in g_asu])
    keep = g_refl >= 0
    grid, g_refl = grid[keep], g_refl[keep]
    gcd = np.gcd.reduce(np.abs(grid), axis=1)
    B = np.array(gcell.frac.mat.tolist()).T  # s = B h in 1/A (reciprocal basis)

    walk = np.cumsum(rng.normal(size=n_images))
    walk = (walk - walk.mean()) / (walk.std() or 1.0) * scale_drift
    rows = []
    for img in range(n_images):
        state = 0 if n_states == 1 else img % 2
        F = states[state]
        R = _random_rotation(rng)
        s = grid @ B.T @ R.T
        s2 = np.einsum("ij,ij->i", s, s)
        lam = -2.0 * s[:, 2] / s2
        two_theta = 2 * np.arcsin(np.clip(lam * np.sqrt(s2) / 2, 0, 1))
        rec = (lam >= lo) & (lam <= hi) & (two_theta <= _MAX_TWO_THETA)
        idx = np.flatnonzero(rec)
        if len(idx) == 0:
            continue
        h0 = grid[idx] // gcd[idx, None]
        ray, inverse = np.unique(h0, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        k = math.exp(walk[img])
        term = k * true_spectrum(lam[idx], (lo, hi)) * F[g_refl[idx]] ** 2
        expected = np.bincount(inverse, weights=term, minlength=len(ray))
        n_orders = np.bincount(inverse, minlength=len(ray))
        lowest = np.full(len(ray), np.iinfo(np.int64).max)
        np.minimum.at(lowest, inverse, gcd[idx])
        first = np.flatnonzero(gcd[idx] == lowest[inverse])
        first = first[np.unique(inverse[first], return_index=True)[1]]  # one member (the lowest order) per ray
        src = idx[first]
        # detector position of the diffracted beam k_out = k_in + s, |k| = 1 / lambda, beam along -z
        kin = np.array([0.0, 0.0, -1.0]) / lam[src, None]
        kout = kin + s[src]
        x = _DETECTOR_DISTANCE * kout[:, 0] / -kout[:, 2] / _PIXEL + 1500.0
        y = _DETECTOR_DISTANCE * kout[:, 1] / -kout[:, 2] / _PIXEL + 1500.0
        on = (kout[:, 2] < 0) & (x >= 0) & (x < 3000) & (y >= 0) & (y < 3000)
        e = expected[inverse[first]][on]
        bg = rng.uniform(20.0, 50.0, len(e))
        counts = rng.poisson(e + bg) - rng.poisson(bg)
        i_obs = counts + rng.normal(0.0, read_noise, len(e))
        rows.append(dict(hkl=grid[src][on], I=i_obs, SIGI=np.sqrt(e + 2 * bg + read_noise**2), X=x[on], Y=y[on],
                         Wavelength=lam[src][on], BATCH=np.full(len(e), img), DATASET=np.full(len(e), state),
                         N_HARMONICS=n_orders[inverse[first]][on], SCALE_TRUE=np.full(len(e), k)))
    cat = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    hkl = cat.pop("hkl")
    types = {"I": "Intensity", "SIGI": "Stddev", "X": "MTZReal", "Y": "MTZReal", "Wavelength": "MTZReal",
             "BATCH": "Batch", "DATASET": "MTZInt", "N_HARMONICS": "MTZInt", "SCALE_TRUE": "MTZReal"}
    frame = {"H": rs.DataSeries(hkl[:, 0], dtype="HKL"), "K": rs.DataSeries(hkl[:, 1], dtype="HKL"),
             "L": rs.DataSeries(hkl[:, 2], dtype="HKL")}
    frame.update({key: rs.DataSeries(v, dtype=types[key]) for key, v in cat.items()})
    unmerged = rs.DataSet(frame, spacegroup=sg, cell=gcell, merged=False).set_index(["H", "K", "L"])
    if n_states == 1:
        unmerged = unmerged.drop(columns=["DATASET"])
    truth_cols = {"H": rs.DataSeries(H[:, 0], dtype="HKL"), "K": rs.DataSeries(H[:, 1], dtype="HKL"),
                  "L": rs.DataSeries(H[:, 2], dtype="HKL"), "F": rs.DataSeries(states[0], dtype="SFAmplitude"),
                  "CENTRIC": centric, "EPSILON": rs.DataSeries(eps, dtype="MTZInt"),
                  "dHKL": rs.DataSeries(d, dtype="MTZReal")}
    for k_state, F in enumerate(states if n_states == 2 else []):
        truth_cols[f"F_{k_state}"] = rs.DataSeries(F, dtype="SFAmplitude")
    truth = rs.DataSet(truth_cols, spacegroup=sg, cell=gcell, merged=True).set_index(["H", "K", "L"])
    truth.attrs["band"] = (lo, hi)
    return unmerged, truth
