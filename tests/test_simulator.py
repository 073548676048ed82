"""Tests of the unmerged-data simulator (statistical checks use fixed seeds)."""

import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs

from physppl.models.simulators.merging import simulate_unmerged

SMALL = dict(dmin=3.0, n_images=60)


@pytest.fixture(scope="module")
def default_data():
    return simulate_unmerged(seed=1)


@pytest.fixture(scope="module")
def anomalous_data():
    # Strong counts and a large anomalous signal so a swapped Friedel sign is unmistakable.
    return simulate_unmerged(dmin=2.5, wilson_b=0.0, mean_intensity=1e5, anomalous_signal=0.3,
                             outlier_fraction=0.0, seed=3)


def _sigma(truth, mean_intensity=1000.0, wilson_b=20.0):
    s2 = 1.0 / (4.0 * truth["dHKL"].to_numpy(float) ** 2)
    return mean_intensity * np.exp(-2.0 * wilson_b * s2) * truth["EPSILON"].to_numpy(float)


def test_columns_and_metadata(default_data):
    u, t = default_data
    assert list(u.index.names) == ["H", "K", "L"] and list(t.index.names) == ["H", "K", "L"]
    assert not u.merged and t.merged
    assert u.spacegroup.hm == t.spacegroup.hm == "P 43 21 2"
    expected_u = {"BATCH": "Batch", "I": "Intensity", "SIGI": "Stddev", "XDET": "MTZReal",
                  "YDET": "MTZReal", "ROT": "MTZReal", "SCALE_TRUE": "MTZReal", "OUTLIER": "MTZInt"}
    assert {c: str(u[c].dtype) for c in u.columns} == expected_u
    expected_t = {"F": "SFAmplitude", "F(+)": "FriedelSFAmplitude", "F(-)": "FriedelSFAmplitude",
                  "I_TRUE": "Intensity", "CENTRIC": "bool", "EPSILON": "MTZInt", "dHKL": "MTZReal",
                  "N_OBS": "MTZInt"}
    assert {c: str(t[c].dtype) for c in t.columns} == expected_t
    batch = u["BATCH"].to_numpy(int)
    assert batch.min() >= 1 and batch.max() <= 360
    assert int(t["N_OBS"].sum()) == len(u)
    assert (t["N_OBS"] == 0).any()  # realistic incompleteness
    assert t["N_OBS"].max() >= 8
    assert not rs.utils.is_absent(t.get_hkls(), t.spacegroup).any()
    assert (u["SCALE_TRUE"].to_numpy(float) > 0).all()


def test_seed_reproducible_and_distinct():
    u1, t1 = simulate_unmerged(seed=5, **SMALL)
    u2, t2 = simulate_unmerged(seed=5, **SMALL)
    pd.testing.assert_frame_equal(u1, u2)
    pd.testing.assert_frame_equal(t1, t2)
    u3, t3 = simulate_unmerged(seed=6, **SMALL)
    assert not np.allclose(t1["F"].to_numpy(float), t3["F"].to_numpy(float))
    assert len(u1) != len(u3) or not np.allclose(u1["I"].to_numpy(float), u3["I"].to_numpy(float))


def test_round_trip_to_asu(default_data):
    u, t = default_data
    obs = u.get_hkls()
    asu = u.hkl_to_asu()
    assert asu.index.isin(t.index).all()
    # Observed indices really are spread over symmetry mates, not just the ASU.
    assert (obs != asu.get_hkls()).any(axis=1).mean() > 0.5
    counts = asu.groupby(level=["H", "K", "L"]).size()
    n_obs = t["N_OBS"].to_numpy(int)
    np.testing.assert_array_equal(counts.reindex(t.index, fill_value=0).to_numpy(), n_obs)


def test_friedel_sign_matches_rs_convention(anomalous_data):
    u, t = anomalous_data
    a = u.hkl_to_asu()
    plus = (a["M/ISYM"].to_numpy(int) % 2) == 1
    tt = t.loc[a.index]
    acentric = ~tt["CENTRIC"].to_numpy(bool)
    assert acentric.mean() > 0.5 and 0.4 < plus[acentric].mean() < 0.6
    fp, fm = tt["F(+)"].to_numpy(float), tt["F(-)"].to_numpy(float)
    assert np.abs(fp - fm)[acentric].mean() > 0.1 * tt["F"].to_numpy(float)[acentric].mean()
    np.testing.assert_allclose(0.5 * (fp + fm), tt["F"].to_numpy(float), rtol=1e-6)
    scale, I, sigi = (a[c].to_numpy(float) for c in ("SCALE_TRUE", "I", "SIGI"))
    right = scale * np.where(plus, fp, fm) ** 2
    wrong = scale * np.where(plus, fm, fp) ** 2
    z_right = ((I - right) / sigi)[acentric]
    z_wrong = ((I - wrong) / sigi)[acentric]
    assert abs(z_right.mean()) < 0.1 and abs(z_right.std() - 1.0) < 0.1
    assert z_wrong.std() > 10.0
    # The anomalous=True mapping keeps Friedel(-) observations at -H_asu.
    b = u.hkl_to_asu(anomalous=True)
    minus = ~plus & acentric
    np.testing.assert_array_equal(b.get_hkls()[minus], -a.get_hkls()[minus])


def test_noiseless_scale_structure():
    # Without drift and absorption the scale is exactly the linear-decay B factor.
    u, t = simulate_unmerged(scale_drift=0.0, absorption=0.0, decay_b=8.0, **SMALL)
    asu = u.hkl_to_asu()
    d = t.loc[asu.index, "dHKL"].to_numpy(float)
    frac = (u["BATCH"].to_numpy(float) - 1) / (SMALL["n_images"] - 1)
    np.testing.assert_allclose(u["SCALE_TRUE"].to_numpy(float),
                               np.exp(-2.0 * 8.0 * frac / (4 * d**2)), rtol=1e-6)
    u, _ = simulate_unmerged(scale_drift=0.0, absorption=0.0, decay_b=0.0, **SMALL)
    np.testing.assert_allclose(u["SCALE_TRUE"].to_numpy(float), 1.0)


def test_centric_and_epsilon_agree_with_rs(default_data):
    _, t = default_data
    H = t.get_hkls()
    np.testing.assert_array_equal(t["CENTRIC"].to_numpy(bool), rs.utils.is_centric(H, t.spacegroup))
    np.testing.assert_array_equal(t["EPSILON"].to_numpy(int),
                                  rs.utils.compute_structurefactor_multiplicity(H, t.spacegroup))
    np.testing.assert_allclose(t["dHKL"].to_numpy(float), rs.utils.compute_dHKL(H, t.cell))
    assert t["dHKL"].min() >= 2.0


def test_wilson_statistics(default_data):
    # ~7000 acentric / ~1600 centric reflections: tolerances are >= 4 standard errors.
    _, t = default_data
    e2 = t["I_TRUE"].to_numpy(float) / _sigma(t)
    centric = t["CENTRIC"].to_numpy(bool)
    ac, ce = e2[~centric], e2[centric]
    assert abs(ac.mean() - 1.0) < 0.05
    assert abs((ac < np.log(2)).mean() - 0.5) < 0.025  # median of Exp(1) is ln 2
    assert abs(ce.mean() - 1.0) < 0.2
    frac_ac, frac_ce = (ac < 0.1).mean(), (ce < 0.1).mean()
    assert abs(frac_ac - (1 - np.exp(-0.1))) < 0.015  # 0.095
    assert abs(frac_ce - 0.2482) < 0.06  # erf(sqrt(0.05))
    assert frac_ce > frac_ac + 0.08


def test_outlier_fraction():
    for frac in (0.0, 0.05):
        u, _ = simulate_unmerged(outlier_fraction=frac, seed=2)
        flags = u["OUTLIER"].to_numpy(int)
        n = len(flags)
        assert set(np.unique(flags)) <= {0, 1}
        assert abs(flags.mean() - frac) <= 4 * np.sqrt(frac * (1 - frac) / n) + 1e-12


def test_noise_model_z_scores(default_data):
    u, t = default_data
    asu = u.hkl_to_asu(anomalous=False)
    F = t.loc[asu.index, "F"].to_numpy(float)
    expected = u["SCALE_TRUE"].to_numpy(float) * F**2
    z = (u["I"].to_numpy(float) - expected) / u["SIGI"].to_numpy(float)
    out = u["OUTLIER"].to_numpy(bool)
    assert abs(z[~out].mean()) < 0.1 and abs(z[~out].std() - 1.0) < 0.1
    assert (z[out] > 4.0).all()  # corruptions are large and positive
    assert (u["I"].to_numpy(float) < 0).sum() > 100


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spacegroup="P 99 x"), "space group"),
        (dict(cell=(10.0, 10.0, 10.0)), "cell"),
        (dict(cell=(10.0, -1.0, 10.0, 90.0, 90.0, 90.0)), "cell"),
        (dict(dmin=0.0), "dmin"),
        (dict(dmin=-1.0), "dmin"),
        (dict(dmin=500.0), "no reflections"),
        (dict(n_images=0), "n_images"),
        (dict(n_images=2.5), "n_images"),
        (dict(multiplicity=0.0), "multiplicity"),
        (dict(mean_intensity=-1.0), "mean_intensity"),
        (dict(scale_drift=-0.1), "scale_drift"),
        (dict(decay_b=-1.0), "decay_b"),
        (dict(absorption=-0.1), "absorption"),
        (dict(outlier_fraction=1.0), "outlier_fraction"),
        (dict(outlier_fraction=-0.01), "outlier_fraction"),
        (dict(read_noise=-1.0), "read_noise"),
        (dict(anomalous_signal=1.0), "anomalous_signal"),
        (dict(anomalous_signal=-0.1), "anomalous_signal"),
        (dict(wilson_b=float("nan")), "wilson_b"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_unmerged(**kwargs)
