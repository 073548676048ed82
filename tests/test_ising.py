"""The Ising sampler against exact results: enumeration (checked by a transfer matrix), detailed balance and
stationarity on a 4 x 4 lattice, Onsager's energy and magnetisation. Statistical tests use fixed seeds."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from physppl.models.simulators.ising import (
    T_C,
    energy,
    enumerate_states,
    exact_observables,
    magnetization,
    metropolis_half_sweep,
    metropolis_sweep,
    onsager_energy,
    onsager_magnetization,
    sample_ising,
    swendsen_wang_update,
)

L4 = 4
TEMPS = (1.5, 2.269, 3.5)


def _transfer_matrix_log_z(L: int, t: float) -> float:
    """log Z of the periodic L x L lattice as Tr(T^L), T the row-to-row transfer matrix (independent of
    the enumeration code)."""
    rows = np.array(list(itertools.product((-1, 1), repeat=L)), dtype=float)
    e_row = -(rows * np.roll(rows, -1, axis=1)).sum(1)
    e_between = -rows @ rows.T
    tm = np.exp(-(e_row[:, None] + e_between) / t)
    eig = np.linalg.eigvals(tm)
    return float(np.log(np.sum(eig**L).real))


def test_energy_and_magnetization_of_known_states():
    up = np.ones((1, 6, 6), np.int8)
    checker = np.where(np.add.outer(np.arange(6), np.arange(6)) % 2 == 0, 1, -1).astype(np.int8)[None]
    assert energy(up)[0] == -2 * 36 and magnetization(up)[0] == 1.0
    assert energy(checker)[0] == 2 * 36 and magnetization(checker)[0] == 0.0
    one_flip = up.copy()
    one_flip[0, 2, 3] = -1
    assert energy(one_flip)[0] == -2 * 36 + 8  # four broken bonds


@pytest.mark.parametrize("L", [2, 3, 4])
def test_enumeration_matches_transfer_matrix(L):
    for t in TEMPS:
        ex = exact_observables(L, [t])
        assert ex["log_z"][0] == pytest.approx(_transfer_matrix_log_z(L, t), rel=1e-10)
        # <E> = -d log Z / d beta, by central differences of the transfer-matrix log Z
        h = 1e-5
        beta = 1 / t
        e = -(_transfer_matrix_log_z(L, 1 / (beta + h)) - _transfer_matrix_log_z(L, 1 / (beta - h))) / (2 * h)
        assert ex["energy"][0] == pytest.approx(e / L**2, abs=1e-5)


def _exact_draws(t: float, n: int, seed: int):
    states = enumerate_states(L4)
    e = energy(states).astype(float)
    p = np.exp(-(e - e.min()) / t)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(states), size=n, p=p)
    return states[idx].copy(), states, p


def _energy_hist_pvalue(spins, states, p):
    """Chi-square p-value of the energy histogram of ``spins`` against the exact distribution ``p``."""
    e_all = energy(states)
    levels = np.unique(e_all)
    expected = np.array([p[e_all == lv].sum() for lv in levels]) * len(spins)
    observed = np.array([(energy(spins) == lv).sum() for lv in levels])
    keep = expected > 5  # pool the rare levels so the chi-square approximation holds
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _symmetry_pvalue(before, after):
    """Detailed balance from pi makes the joint law of (X0, X1) symmetric: test N(a, b) = N(b, a) for the
    classes a = (energy, magnetisation) with a chi-square on the antisymmetric part."""
    key0 = energy(before) * 1000 + np.rint(magnetization(before) * 16).astype(int)
    key1 = energy(after) * 1000 + np.rint(magnetization(after) * 16).astype(int)
    pairs, counts = np.unique(np.stack([key0, key1], 1), axis=0, return_counts=True)
    table = {tuple(k): c for k, c in zip(pairs, counts)}
    stat, dof = 0.0, 0
    for (a, b), n_ab in table.items():
        if a < b:
            n_ba = table.get((b, a), 0)
            if n_ab + n_ba >= 10:
                stat += (n_ab - n_ba) ** 2 / (n_ab + n_ba)
                dof += 1
    assert dof >= 10
    return stats.chi2.sf(stat, dof)


N_EXACT = 100_000


@pytest.mark.parametrize("t", [1.8, T_C, 3.0])
def test_metropolis_half_sweep_detailed_balance_and_stationarity(t):
    x0, states, p = _exact_draws(t, N_EXACT, seed=1)
    rng = np.random.default_rng(2)
    x1 = metropolis_half_sweep(x0.copy(), np.full(N_EXACT, 1 / t), 0, rng)
    assert (x1 != x0).any(axis=(1, 2)).mean() > 0.05  # it moves
    assert _symmetry_pvalue(x0, x1) > 1e-3
    assert _energy_hist_pvalue(x1, states, p) > 1e-3
    x2 = metropolis_sweep(x1, np.full(N_EXACT, 1 / t), rng)
    assert _energy_hist_pvalue(x2, states, p) > 1e-3


@pytest.mark.parametrize("t", [1.8, T_C, 3.0])
def test_swendsen_wang_detailed_balance_and_stationarity(t):
    x0, states, p = _exact_draws(t, N_EXACT, seed=3)
    x1 = swendsen_wang_update(x0.copy(), np.full(N_EXACT, 1 / t), np.random.default_rng(4))
    assert (x1 != x0).any(axis=(1, 2)).mean() > 0.3
    assert _symmetry_pvalue(x0, x1) > 1e-3
    assert _energy_hist_pvalue(x1, states, p) > 1e-3


def test_stationarity_test_rejects_a_wrong_kernel():
    """Negative control: both tests reject updates run at a temperature 15% off the one the draws come from,
    so passing them above means something."""
    t = 2.5
    x0, states, p = _exact_draws(t, N_EXACT, seed=5)
    rng = np.random.default_rng(6)
    for update in (lambda x, b: metropolis_half_sweep(x, b, 0, rng), lambda x, b: swendsen_wang_update(x, b, rng)):
        for factor in (0.85, 1.15):
            wrong = update(x0.copy(), np.full(N_EXACT, factor / t))
            assert _energy_hist_pvalue(wrong, states, p) < 1e-6
            assert _symmetry_pvalue(x0, wrong) < 1e-6


def test_long_run_matches_exact_averages_on_4x4():
    temps = [1.8, T_C, 3.0]
    s = sample_ising(L4, temps, 4000, n_chains=400, thermalize=50, every=3, seed=7)
    ex = exact_observables(L4, temps)
    for i, t in enumerate(temps):
        sel = s.temperature == t
        # chains are independent: standard error from per-chain means
        for name, values, exact in (("energy", s.energy[sel], ex["energy"][i]),
                                    ("|m|", np.abs(s.magnetization[sel]), ex["abs_magnetization"][i])):
            chain = s.chain[sel] - s.chain[sel].min()
            per_chain = np.bincount(chain, weights=values) / np.bincount(chain)
            se = per_chain.std(ddof=1) / math.sqrt(per_chain.size)
            assert abs(values.mean() - exact) < 5 * se + 1e-3, (name, t, values.mean(), exact, se)


def test_onsager_reference_values():
    assert onsager_energy(T_C) == pytest.approx(-math.sqrt(2), abs=1e-9)
    assert T_C == pytest.approx(2.269185, abs=1e-6)
    # high temperature: U -> -2 tanh(1/T) to leading order
    assert onsager_energy(50.0) == pytest.approx(-2 * math.tanh(1 / 50.0), rel=1e-3)
    assert onsager_magnetization(1.0) == pytest.approx(0.999276, abs=1e-6)
    assert onsager_magnetization(2.5) == 0.0


def test_sampler_matches_onsager_away_from_tc():
    """L = 16 is effectively infinite away from T_c (correlation length of a few sites)."""
    temps = [1.6, 3.5]
    s = sample_ising(16, temps, 200, n_chains=50, thermalize=100, every=5, seed=8)
    for t in temps:
        sel = s.temperature == t
        assert s.energy[sel].mean() == pytest.approx(onsager_energy(t), abs=0.01)
    low = s.temperature == 1.6
    assert np.abs(s.magnetization[low]).mean() == pytest.approx(onsager_magnetization(1.6), abs=0.01)
    # both signs of the ordered phase are visited (the cluster update flips whole domains)
    assert 0.25 < (s.magnetization[low] > 0).mean() < 0.75


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="even"):
        metropolis_sweep(np.ones((1, 5, 5), np.int8), np.ones(1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="temperatures"):
        sample_ising(8, [2.0, -1.0], 10)
    with pytest.raises(ValueError, match="L must be"):
        sample_ising(7, [2.0], 10)
    with pytest.raises(ValueError, match="enumeration"):
        enumerate_states(6)


@pytest.mark.slow
def test_binder_cumulant_crossing_locates_onsager_tc():
    """Finite-size scaling: the Binder cumulants U4 = 1 - <m^4> / 3<m^2>^2 of L = 8 and 16 cross at T_c
    (corrections are small for the 2-D Ising model); the crossing must lie within 1.5% of Onsager's T_c."""
    temps = np.linspace(2.15, 2.40, 11)
    u = {}
    for L in (8, 16):
        s = sample_ising(L, temps, 4000, n_chains=200, thermalize=200, every=2, seed=L)
        m = s.magnetization
        u[L] = np.array([1 - np.mean(m[s.temperature == t] ** 4) / (3 * np.mean(m[s.temperature == t] ** 2) ** 2)
                         for t in temps])
    d = u[16] - u[8]
    k = int(np.nonzero(np.diff(np.sign(d)))[0][0])
    t_cross = temps[k] - d[k] * (temps[k + 1] - temps[k]) / (d[k + 1] - d[k])
    assert abs(t_cross - T_C) / T_C < 0.015, t_cross


@pytest.mark.slow
def test_large_lattice_matches_onsager_across_temperatures():
    temps = np.array([1.0, 1.5, 1.9, 2.1, 2.6, 3.0, 3.5])
    s = sample_ising(64, temps, 100, n_chains=20, thermalize=300, every=10, seed=9)
    for t in temps:
        sel = s.temperature == t
        assert s.energy[sel].mean() == pytest.approx(float(onsager_energy(t)), abs=0.006), t
        if t < 2.1:
            assert np.abs(s.magnetization[sel]).mean() == pytest.approx(float(onsager_magnetization(t)), abs=0.01), t
