"""Simulated unmerged X-ray diffraction data with known ground truth."""

from __future__ import annotations

import math
from numbers import Integral, Real

import gemmi
import numpy as np
import reciprocalspaceship as rs

__all__ = ["simulate_unmerged", "simulate_xfel"]

_DETECTOR_SIZE = 2500.0  # pixels
_OSCILLATION = 0.5  # degrees per image
# Attenuation centre deliberately off the detector centre so it is not symmetric.
_ABSORPTION_CENTRE = (0.65 * _DETECTOR_SIZE, 0.35 * _DETECTOR_SIZE)
_BACKGROUND_RANGE = (20.0, 50.0)  # counts under a spot
_MAX_OBS_FACTOR = 3.0  # clip Poisson counts per reflection at ~3x the mean


def _check_real(name: str, value, low: float, high: float = math.inf,
                low_inclusive: bool = True, high_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if not (ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def _truth_dataset(H, f_plus, f_minus, centric, eps, d, n_obs, sg, gcell) -> "rs.DataSet":
    """The ground truth table of the simulators: one row per Friedel-merged ASU ``H, K, L`` with ``F`` (the mean
    of ``F(+)`` and ``F(-)``), ``F(+)``, ``F(-)``, ``I_TRUE``, ``CENTRIC``, ``EPSILON``, ``dHKL`` and ``N_OBS``."""
    f_mean = 0.5 * (f_plus + f_minus)
    return rs.DataSet(
        {
            "H": rs.DataSeries(H[:, 0], dtype="HKL"),
            "K": rs.DataSeries(H[:, 1], dtype="HKL"),
            "L": rs.DataSeries(H[:, 2], dtype="HKL"),
            "F": rs.DataSeries(f_mean, dtype="SFAmplitude"),
            "F(+)": rs.DataSeries(f_plus, dtype="FriedelSFAmplitude"),
            "F(-)": rs.DataSeries(f_minus, dtype="FriedelSFAmplitude"),
            "I_TRUE": rs.DataSeries(f_mean**2, dtype="Intensity"),
            "CENTRIC": centric,
            "EPSILON": rs.DataSeries(eps, dtype="MTZInt"),
            "dHKL": rs.DataSeries(d, dtype="MTZReal"),
            "N_OBS": rs.DataSeries(n_obs, dtype="MTZInt"),
        },
        spacegroup=sg,
        cell=gcell,
        merged=True,
    ).set_index(["H", "K", "L"])


def simulate_unmerged(
    spacegroup: str = "P 43 21 2",
    cell: tuple[float, ...] = (79.3, 79.3, 37.8, 90.0, 90.0, 90.0),
    dmin: float = 2.0,
    n_images: int = 360,
    multiplicity: float = 4.0,
    wilson_b: float = 20.0,
    mean_intensity: float = 1000.0,
    scale_drift: float = 0.15,
    decay_b: float = 4.0,
    absorption: float = 0.2,
    outlier_fraction: float = 0.01,
    read_noise: float = 5.0,
    anomalous_signal: float = 0.0,
    seed: int = 0,
) -> tuple["rs.DataSet", "rs.DataSet"]:
    """Simulate an unmerged rotation dataset together with its ground truth.

    Parameters
    ----------
    spacegroup : str
        Hermann-Mauguin name of the space group (e.g. ``"P 43 21 2"``).
    cell : tuple of float
        Unit cell ``(a, b, c, alpha, beta, gamma)`` in Angstrom / degrees.
    dmin : float
        High-resolution limit in Angstrom.
    n_images : int
        Number of images in the sweep (0.5 degrees each).
    multiplicity : float
        Mean number of observations per unique (Friedel-merged) reflection;
        counts are Poisson distributed, so some reflections are missing.
    wilson_b : float
        Overall B factor of the true structure.
    mean_intensity : float
        Mean ``F^2`` (photon counts) at low resolution for ``epsilon = 1``.
    scale_drift : float
        Standard deviation of the smooth per-image log-scale random walk.
    decay_b : float
        B-factor increase from the first to the last image.
    absorption : float
        Strength of the detector-position dependent attenuation.
    outlier_fraction : float
        Fraction of observations corrupted by a large positive intensity.
    read_noise : float
        Standard deviation of Gaussian noise added to the counts.
    anomalous_signal : float
        Relative size of Friedel differences for acentric reflections.
    seed : int
        Seed for ``numpy.random.default_rng``.

    Returns
    -------
    unmerged : rs.DataSet
        Observations indexed by observed ``H, K, L`` with columns ``BATCH``,
        ``I``, ``SIGI``, ``XDET``, ``YDET``, ``ROT``, ``SCALE_TRUE`` and
        ``OUTLIER``. ``I`` has expectation ``SCALE_TRUE * F(+/-)^2``.
    truth : rs.DataSet
        Ground truth indexed by Friedel-merged ASU ``H, K, L`` with columns
        ``F``, ``F(+)``, ``F(-)``, ``I_TRUE``, ``CENTRIC``, ``EPSILON``,
        ``dHKL`` and ``N_OBS``.

    Raises
    ------
    ValueError
        If an argument is out of range or the space group is unknown.
    """
    dmin = _check_real("dmin", dmin, 0.0, low_inclusive=False)
    if isinstance(n_images, bool) or not isinstance(n_images, Integral) or n_images < 1:
        raise ValueError(f"n_images must be an integer >= 1, got {n_images!r}")
    n_images = int(n_images)
    multiplicity = _check_real("multiplicity", multiplicity, 0.0, low_inclusive=False)
    wilson_b = _check_real("wilson_b", wilson_b, -math.inf)
    mean_intensity = _check_real("mean_intensity", mean_intensity, 0.0, low_inclusive=False)
    scale_drift = _check_real("scale_drift", scale_drift, 0.0)
    decay_b = _check_real("decay_b", decay_b, 0.0)
    absorption = _check_real("absorption", absorption, 0.0)
    outlier_fraction = _check_real("outlier_fraction", outlier_fraction, 0.0, 1.0)
    read_noise = _check_real("read_noise", read_noise, 0.0)
    anomalous_signal = _check_real("anomalous_signal", anomalous_signal, 0.0, 1.0)
    sg, gcell, H, d, eps, centric = _asu_reflections(spacegroup, cell, dmin)
    rng = np.random.default_rng(seed)

    # True amplitudes (Wilson statistics).
    n_refl = len(H)
    s2 = 1.0 / (4.0 * d**2)
    sigma = mean_intensity * np.exp(-2.0 * wilson_b * s2) * eps
    f_acentric = np.sqrt(rng.exponential(sigma))
    f_centric = np.abs(rng.normal(0.0, np.sqrt(sigma)))
    F = np.where(centric, f_centric, f_acentric)
    delta = np.clip(anomalous_signal * rng.normal(size=n_refl), -0.95, 0.95)
    delta[centric] = 0.0
    f_plus, f_minus = F * (1.0 + delta), F * (1.0 - delta)

    # Observations: Poisson counts per reflection, random symmetry mates.
    max_obs = max(1, int(math.ceil(_MAX_OBS_FACTOR * multiplicity + 2)))
    n_obs = np.minimum(rng.poisson(multiplicity, n_refl), max_obs)
    refl = np.repeat(np.arange(n_refl), n_obs)
    n = len(refl)
    rots = np.array([op.rot for op in sg.operations().sym_ops]) // gemmi.Op.DEN
    op_idx = rng.integers(len(rots), size=n)
    # Proper rotations of the ASU index give Friedel(+) (odd ISYM in rs); inverted ones Friedel(-).
    plus = rng.random(n) < 0.5
    H_obs = np.einsum("ni,nij->nj", H[refl], rots[op_idx]) * np.where(plus, 1, -1)[:, None]

    image = rng.integers(1, n_images + 1, size=n)
    rot = (image - 1 + rng.random(n)) * _OSCILLATION
    xdet = rng.uniform(0.0, _DETECTOR_SIZE, n)
    ydet = rng.uniform(0.0, _DETECTOR_SIZE, n)

    # Smooth per-image log scale: random walk rescaled to mean 0, sd scale_drift.
    walk = np.cumsum(rng.normal(size=n_images))
    walk -= walk.mean()
    if n_images > 1 and walk.std() > 0:
        walk *= scale_drift / walk.std()
    else:
        walk[:] = 0.0
    frac = (image - 1) / (n_images - 1) if n_images > 1 else np.zeros(n)
    r2 = ((xdet - _ABSORPTION_CENTRE[0]) ** 2 + (ydet - _ABSORPTION_CENTRE[1]) ** 2) / (
        0.5 * _DETECTOR_SIZE
    ) ** 2
    scale = np.exp(walk[image - 1]) * np.exp(-2.0 * decay_b * frac * s2[refl]) * np.exp(-absorption * r2)

    # Counting noise; subtracting a noisy background estimate makes var(I) = E + 2 bg + rn^2 = SIGI^2.
    expected = scale * np.where(plus, f_plus[refl], f_minus[refl]) ** 2
    bg = rng.uniform(*_BACKGROUND_RANGE, n)
    counts = rng.poisson(expected + bg) - rng.poisson(bg)
    I = counts + rng.normal(0.0, read_noise, n) if read_noise > 0 else counts.astype(float)
    sigi = np.sqrt(expected + 2.0 * bg + read_noise**2)
    outlier = rng.random(n) < outlier_fraction
    n_out = int(outlier.sum())
    I[outlier] += rng.uniform(5.0, 20.0, n_out) * sigi[outlier] + rng.uniform(0.1, 1.0, n_out) * mean_intensity

    unmerged = rs.DataSet(
        {
            "H": rs.DataSeries(H_obs[:, 0], dtype="HKL"),
            "K": rs.DataSeries(H_obs[:, 1], dtype="HKL"),
            "L": rs.DataSeries(H_obs[:, 2], dtype="HKL"),
            "BATCH": rs.DataSeries(image, dtype="Batch"),
            "I": rs.DataSeries(I, dtype="Intensity"),
            "SIGI": rs.DataSeries(sigi, dtype="Stddev"),
            "XDET": rs.DataSeries(xdet, dtype="MTZReal"),
            "YDET": rs.DataSeries(ydet, dtype="MTZReal"),
            "ROT": rs.DataSeries(rot, dtype="MTZReal"),
            "SCALE_TRUE": rs.DataSeries(scale, dtype="MTZReal"),
            "OUTLIER": rs.DataSeries(outlier.astype(np.int32), dtype="MTZInt"),
        },
        spacegroup=sg,
        cell=gcell,
        merged=False,
    ).set_index(["H", "K", "L"])

    truth = _truth_dataset(H, f_plus, f_minus, centric, eps, d, n_obs, sg, gcell)
    return unmerged, truth


def _asu_reflections(spacegroup, cell, dmin: float):
    """The space group, the cell and its unique, non-absent ASU reflections to ``dmin``: (sg, gcell, H, d, eps,
    centric); bad arguments raise before any work."""
    sg = gemmi.find_spacegroup_by_name(spacegroup) if isinstance(spacegroup, str) else None
    if sg is None:
        raise ValueError(f"unknown space group {spacegroup!r}")
    if len(cell) != 6:
        raise ValueError(f"cell must have 6 parameters (a, b, c, alpha, beta, gamma), got {len(cell)}")
    for name, v in zip(("a", "b", "c", "alpha", "beta", "gamma"), cell):
        _check_real(f"cell parameter {name}", v, 0.0, low_inclusive=False)
    gcell = gemmi.UnitCell(*map(float, cell))
    if gcell.volume <= 0 or not math.isfinite(gcell.volume):
        raise ValueError(f"cell angles do not describe a valid unit cell: {tuple(cell)}")
    H = rs.utils.generate_reciprocal_asu(gcell, sg, dmin, anomalous=False)
    H = H[~rs.utils.is_absent(H, sg)].astype(np.int32)
    if len(H) == 0:
        raise ValueError(f"no reflections to dmin={dmin} for this cell; decrease dmin")
    d = rs.utils.compute_dHKL(H, gcell)
    eps = rs.utils.compute_structurefactor_multiplicity(H, sg).astype(np.int32)
    centric = rs.utils.is_centric(H, sg).astype(bool)
    return sg, gcell, H, d, eps, centric


def _wilson_truth(spacegroup, cell, dmin: float, wilson_b: float, mean_intensity: float, anomalous_signal: float,
                  rng: np.random.Generator):
    """Unique ASU reflections of ``cell`` to ``dmin`` and their true amplitudes from Wilson statistics."""
    sg, gcell, H, d, eps, centric = _asu_reflections(spacegroup, cell, dmin)
    sigma = mean_intensity * np.exp(-2.0 * wilson_b / (4.0 * d**2)) * eps
    F = np.where(centric, np.abs(rng.normal(0.0, np.sqrt(sigma))), np.sqrt(rng.exponential(sigma)))
    delta = np.clip(anomalous_signal * rng.normal(size=len(H)), -0.95, 0.95)
    delta[centric] = 0.0
    return sg, gcell, H, d, eps, centric, F * (1.0 + delta), F * (1.0 - delta)


def simulate_xfel(
    n_obs: int = 100_000,
    refl_per_image: float = 150.0,
    spacegroup: str = "P 43 21 2",
    cell: tuple[float, ...] = (79.3, 79.3, 37.8, 90.0, 90.0, 90.0),
    dmin: float = 2.0,
    wilson_b: float = 20.0,
    mean_intensity: float = 1000.0,
    shot_sd: float = 0.3,
    image_b_sd: float = 2.0,
    partiality_width: float = 0.4,
    absorption: float = 0.2,
    outlier_fraction: float = 0.005,
    read_noise: float = 5.0,
    anomalous_signal: float = 0.0,
    seed: int = 0,
) -> tuple["rs.DataSet", "rs.DataSet"]:
    """Simulate a serial-crystallography (XFEL-like) unmerged data set of ``n_obs`` still-image observations.

    Many images with few reflections each (``refl_per_image`` on average, Poisson-spread over the images), each
    observation a partial: ``I ~ k_image * p * F^2`` with an independent shot-to-shot log-scale (sd ``shot_sd``)
    and B factor (sd ``image_b_sd``) per image, and a partiality ``p = exp(-x^2 / (2 w^2))`` of the spot's
    excitation error ``x`` (column ``EWALD_OFFSET``, uniform in [-1, 1]; ``w = partiality_width``), which the
    scale model can learn from that metadata column. Detector absorption, counting noise, read noise and
    outliers as :func:`simulate_unmerged`.

    Every step is vectorised (one pass over the observations, no per-observation Python), so 10^7 observations
    take ~10 s and ~2 GB; columns are float32 / int32 (an MTZ file's types).

    Returns ``(unmerged, truth)`` like :func:`simulate_unmerged`; ``unmerged`` has columns ``BATCH``, ``I``,
    ``SIGI``, ``XDET``, ``YDET``, ``EWALD_OFFSET``, ``PARTIALITY_TRUE``, ``SCALE_TRUE`` and ``OUTLIER``.
    """
    if isinstance(n_obs, bool) or not isinstance(n_obs, Integral) or n_obs < 1:
        raise ValueError(f"n_obs must be an integer >= 1, got {n_obs!r}")
    n_obs = int(n_obs)
    refl_per_image = _check_real("refl_per_image", refl_per_image, 1.0)
    dmin = _check_real("dmin", dmin, 0.0, low_inclusive=False)
    wilson_b = _check_real("wilson_b", wilson_b, -math.inf)
    mean_intensity = _check_real("mean_intensity", mean_intensity, 0.0, low_inclusive=False)
    shot_sd = _check_real("shot_sd", shot_sd, 0.0)
    image_b_sd = _check_real("image_b_sd", image_b_sd, 0.0)
    partiality_width = _check_real("partiality_width", partiality_width, 0.0, low_inclusive=False)
    absorption = _check_real("absorption", absorption, 0.0)
    outlier_fraction = _check_real("outlier_fraction", outlier_fraction, 0.0, 1.0)
    read_noise = _check_real("read_noise", read_noise, 0.0)
    anomalous_signal = _check_real("anomalous_signal", anomalous_signal, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    sg, gcell, H, d, eps, centric, f_plus, f_minus = _wilson_truth(spacegroup, cell, dmin, wilson_b,
                                                                   mean_intensity, anomalous_signal, rng)
    n_refl = len(H)

    # images: each observation's image, sorted (a file lists an image's spots together)
    n_images = max(1, int(round(n_obs / refl_per_image)))
    per_image = rng.multinomial(n_obs, np.full(n_images, 1.0 / n_images))
    image = np.repeat(np.arange(1, n_images + 1, dtype=np.int32), per_image)
    refl = rng.integers(n_refl, size=n_obs, dtype=np.int64)
    plus = rng.random(n_obs) < 0.5
    # observed indices: a random symmetry mate of the ASU index (inverted for Friedel(-)), one operator at a time
    rots = np.array([op.rot for op in sg.operations().sym_ops]) // gemmi.Op.DEN
    op_idx = rng.integers(len(rots), size=n_obs)
    H_obs = np.empty((n_obs, 3), np.int32)
    for k, rot in enumerate(rots):
        sel = np.flatnonzero(op_idx == k)
        H_obs[sel] = H[refl[sel]] @ rot.astype(np.int32)
    H_obs[~plus] *= -1
    del op_idx

    xdet = rng.uniform(0.0, _DETECTOR_SIZE, n_obs).astype(np.float32)
    ydet = rng.uniform(0.0, _DETECTOR_SIZE, n_obs).astype(np.float32)
    offset = rng.uniform(-1.0, 1.0, n_obs).astype(np.float32)
    partiality = np.exp(-0.5 * np.square(offset / partiality_width))
    shot = rng.normal(0.0, shot_sd, n_images)
    image_b = rng.normal(0.0, image_b_sd, n_images)
    s2 = (1.0 / (4.0 * d**2))[refl]
    r2 = np.square(xdet - _ABSORPTION_CENTRE[0]) + np.square(ydet - _ABSORPTION_CENTRE[1])
    r2 = r2 / (0.5 * _DETECTOR_SIZE) ** 2
    scale = np.exp(shot[image - 1] - 2.0 * image_b[image - 1] * s2 - absorption * r2) * partiality
    del s2, r2
    expected = scale * np.square(np.where(plus, f_plus[refl], f_minus[refl]))
    bg = rng.uniform(*_BACKGROUND_RANGE, n_obs)
    I = (rng.poisson(expected + bg) - rng.poisson(bg)).astype(np.float64)
    if read_noise > 0:
        I += rng.normal(0.0, read_noise, n_obs)
    sigi = np.sqrt(expected + 2.0 * bg + read_noise**2)
    del bg
    outlier = rng.random(n_obs) < outlier_fraction
    n_out = int(outlier.sum())
    I[outlier] += rng.uniform(5.0, 20.0, n_out) * sigi[outlier] + rng.uniform(0.1, 1.0, n_out) * mean_intensity

    f32 = lambda a: np.asarray(a, np.float32)
    unmerged = rs.DataSet(
        {
            "H": rs.DataSeries(H_obs[:, 0], dtype="HKL"),
            "K": rs.DataSeries(H_obs[:, 1], dtype="HKL"),
            "L": rs.DataSeries(H_obs[:, 2], dtype="HKL"),
            "BATCH": rs.DataSeries(image, dtype="Batch"),
            "I": rs.DataSeries(f32(I), dtype="Intensity"),
            "SIGI": rs.DataSeries(f32(sigi), dtype="Stddev"),
            "XDET": rs.DataSeries(xdet, dtype="MTZReal"),
            "YDET": rs.DataSeries(ydet, dtype="MTZReal"),
            "EWALD_OFFSET": rs.DataSeries(offset, dtype="MTZReal"),
            "PARTIALITY_TRUE": rs.DataSeries(f32(partiality), dtype="MTZReal"),
            "SCALE_TRUE": rs.DataSeries(f32(scale), dtype="MTZReal"),
            "OUTLIER": rs.DataSeries(outlier.astype(np.int32), dtype="MTZInt"),
        },
        spacegroup=sg,
        cell=gcell,
        merged=False,
    ).set_index(["H", "K", "L"])
    n_seen = np.bincount(refl, minlength=n_refl)
    truth = _truth_dataset(H, f_plus, f_minus, centric, eps, d, n_seen, sg, gcell)
    return unmerged, truth
