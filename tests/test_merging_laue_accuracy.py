"""Laue merging against simulated truth: the wavelength curve, harmonic deconvolution, a two-state difference.

Simulated Laue stills (``physppl.models.simulators.laue``) with a known source spectrum and, in the two-state test,
a known second structure related by the double-Wilson relation (r = 0.9). Each merge trains to a fixed step budget
with fixed seeds; tolerances are stated beside each check with the value measured on this machine.
"""
from __future__ import annotations

import numpy as np
import pytest

import physppl
from physppl.merging.data import LAUE_METADATA, MergingDataSource
from physppl.merging.parts import ENGINES
from physppl.merging.quality import align_truth, true_amplitudes
from physppl.merging.difference_map import _scale_to
from physppl.models.simulators.laue import simulate_laue, true_spectrum

pytestmark = pytest.mark.slow


def _merge(unmerged, truth, steps: int = 1500, **options):
    source = MergingDataSource(simulate=lambda: (unmerged, truth), wavelength="Wavelength",
                               metadata=list(LAUE_METADATA), half_datasets=False,
                               **{k: v for k, v in options.items() if k in ("harmonics", "separate")})
    parts = {k: v for k, v in options.items() if k not in ("harmonics", "separate")}
    engine = ENGINES["svi"].build(max_steps=steps, progress=False)
    return physppl.merge(source, scale="image", engine=engine, n_draws=200, seed=0, **parts)


@pytest.fixture(scope="module")
def one_state():
    unmerged, truth = simulate_laue(n_images=8, dmin=2.5, seed=2)
    return unmerged, truth, _merge(unmerged, truth), _merge(unmerged, truth, harmonics=False)


def test_the_wavelength_curve_is_recovered(one_state):
    unmerged, _, laue, _ = one_state
    lam, rel = laue.model.lambda_curve.curve()
    lo, hi = np.quantile(unmerged["Wavelength"].to_numpy(float), [0.02, 0.98])
    inside = (lam.numpy() >= lo) & (lam.numpy() <= hi)
    learned = np.log(rel.numpy()[inside])
    true = np.log(true_spectrum(lam.numpy()[inside], (0.6, 1.6)))
    # relative curve (the overall scale belongs to F): measured max deviation 0.007 in log-scale
    assert np.abs((learned - learned.mean()) - (true - true.mean())).max() < 0.05


def test_harmonics_are_deconvolved(one_state):
    _, truth, laue, singlets = one_state
    h = laue.data.harmonic_refl.numpy()
    multiplets = (h >= 0).sum(1) > 1
    assert multiplets.sum() > 400
    in_multiplets = set(map(tuple, laue.data.hkl[np.unique(h[multiplets][h[multiplets] >= 0])]))
    common = in_multiplets & set(map(tuple, singlets.table[["H", "K", "L"]].to_numpy()))
    cc = {}
    for name, res in (("harmonics", laue), ("singlets", singlets)):
        t = res.table[[tuple(x) in common for x in res.table[["H", "K", "L"]].to_numpy()]]
        f_true = true_amplitudes(truth, t[["H", "K", "L"]].to_numpy(), t["friedel"].to_numpy())
        cc[name] = np.corrcoef(t["F"], f_true)[0, 1]
    # each reflection of a multiplet: measured CC 0.905 with harmonics in the likelihood, 0.831 as singlets
    assert cc["harmonics"] > cc["singlets"] + 0.04, cc
    # and the reflections only ever seen inside multiplets are merged at all
    assert laue.data.n_refl > singlets.data.n_refl


@pytest.mark.parametrize("guide", ["folded_normal", "paired_folded_normal"])
def test_a_two_state_difference_is_recovered_with_honest_intervals(guide):
    unmerged, truth = simulate_laue(n_images=8, dmin=2.5, n_states=2, state_correlation=0.9, seed=4)
    res = _merge(unmerged, truth, steps=2000, prior="double_wilson", guide=guide)
    t = res.table
    draws = res.fit.flat("F").double().numpy() * np.sqrt(res.data.norm)
    rows = {k: {tuple(x): i for x, i in zip(t[["H", "K", "L"]].to_numpy()[sel], np.flatnonzero(sel))}
            for k in (0, 1) for sel in [t["dataset"].to_numpy() == k]}
    both = sorted(set(rows[0]) & set(rows[1]))
    r0 = np.array([rows[0][key] for key in both])
    r1 = np.array([rows[1][key] for key in both])
    hkl, d = t[["H", "K", "L"]].to_numpy()[r0], t["dHKL"].to_numpy()[r0]
    f0_true = true_amplitudes(truth, hkl, t["friedel"].to_numpy()[r0], np.zeros(len(r0), int))
    f1_true = true_amplitudes(truth, hkl, t["friedel"].to_numpy()[r0], np.ones(len(r0), int))
    # the merge's scale is arbitrary (per resolution) and each data set's images have their own: put state 1 on
    # state 0's scale as a difference map does, and truth on state 0's scale by one factor for both states
    k = _scale_to(t["F"].to_numpy()[r0], t["F"].to_numpy()[r1], d)
    c = align_truth(t["F"].to_numpy()[r0], f0_true, d) / f0_true
    d_true = c * (f1_true - f0_true)
    d_draws = k * draws[:, r1] - draws[:, r0]
    d_mean = d_draws.mean(0)
    lower, upper = np.quantile(d_draws, [0.05, 0.95], axis=0)
    coverage = np.mean((d_true >= lower) & (d_true <= upper))
    cc = np.corrcoef(d_mean, d_true)[0, 1]
    print(f'two-state {guide}: n={len(both)} cc={cc:.3f} coverage={coverage:.3f}')
    assert len(both) > 1000
    # measured (seed 4, 2000 steps): CC of the posterior-mean difference to the true difference 0.870 (mean-field)
    # and 0.866 (paired); 90% intervals of the difference cover the truth 0.740 and 0.729 of the time. The
    # intervals are too narrow by that much: the scale parameters are point estimates, so their uncertainty (4
    # images per state here) is not in q(F); the bounds catch a broken sd (coverage near 0) or a broken mean.
    assert cc > 0.8, cc
    assert 0.65 <= coverage <= 0.98, coverage
