"""Torlai & Melko's experiment at full size (slow): RBMs trained per temperature against the exact Boltzmann
distribution (4x4, enumerated) and against Monte Carlo (8x8).

Each check states what was measured on this configuration (seeded data and training); the limits sit above those
values with room for another CPU's rounding, and far below what an untrained or broken model gives (after 5 epochs:
KL 4-5 nats, energies 70 error bars off).
"""
from functools import partial

import numpy as np
import pytest

import physppl
from physppl.inference.contrastive import ContrastiveDivergence
from physppl.models.rbm import BernoulliRBM
from physppl.vae.data import IsingDataSource

pytestmark = pytest.mark.slow


def test_4x4_rbms_learn_the_boltzmann_distribution_at_three_temperatures():
    """32 hidden units, CD-10, 300 epochs on 4,000 configurations per temperature (about 3 CPU-minutes)."""
    res = physppl.rbm_thermodynamics(
        IsingDataSource(L=4, temperatures=[2.0, 2.27, 3.0], n_per_temperature=5000, progress=False),
        model=partial(BernoulliRBM, n_hidden=32), engine=ContrastiveDivergence(progress=False),
        evaluation={"figures": False})
    t = res.table
    # exact KL(Boltzmann || RBM): measured 0.043, 0.048, 0.046 nats (the empirical distribution of 4,000 samples
    # of 65,536 states is itself further from the Boltzmann distribution than that)
    assert (t["exact_kl"] < 0.07).all(), t["exact_kl"].tolist()
    # held-out log-likelihood within 0.2 nats of the best possible, minus the Boltzmann entropy (measured 0.01-0.15)
    assert ((t["exact_log_likelihood"] - t["test_log_likelihood"]).abs() < 0.2).all()
    # against Monte Carlo in combined error bars: |m| measured within 2.3; energy 4.0, C 3.2, chi 3.9 at worst (the
    # goal, "within Monte Carlo error", is met at T_c and missed by up to 4 error bars at T = 2.0 and 3.0)
    assert (t["z_abs_magnetization"].abs() < 3.0).all(), t["z_abs_magnetization"].tolist()
    for key in ("energy", "specific_heat", "susceptibility"):
        assert (t[f"z_{key}"].abs() < 5.0).all(), (key, t[f"z_{key}"].tolist())
    # the Gibbs chains sample the RBM they came from: their energy agrees with the RBM's enumerated energy
    gibbs_vs_exact = (t["rbm_energy"] - t["rbm_exact_energy"]) / t["rbm_energy_err"]
    assert (gibbs_vs_exact.abs() < 4).all(), gibbs_vs_exact.tolist()
    assert res.metrics["max_rhat_rbm_energy"] < 1.01


def test_8x8_observable_curves_follow_monte_carlo():
    """256 hidden units (4N), CD-10, 300 epochs at T = 1.5, 2.27, 3.5 (about 8 CPU-minutes). With N = 64 hidden units
    the disordered phase's energy came out 0.077 per site too high (z = 20 at T = 3.5, with PCD-5, with 300 epochs,
    with 5x the data and with 3x the learning rate alike): a capacity limit, which 4N hidden units remove."""
    res = physppl.rbm_thermodynamics(
        IsingDataSource(L=8, temperatures=[1.5, 2.27, 3.5], n_per_temperature=5000, progress=False),
        model=partial(BernoulliRBM, n_hidden=256), engine=ContrastiveDivergence(progress=False),
        evaluation={"figures": False, "ais_betas": 3000})
    t = res.table
    # measured |z|: energy 5.1, 3.2, 2.2; |m| 2.7, 2.8, 0.8; C 1.7, 4.7, 1.3; chi 3.8, 2.8, 0.6
    assert (t["z_energy"].abs() < 6.0).all(), t["z_energy"].tolist()
    assert (t["z_abs_magnetization"].abs() < 3.5).all(), t["z_abs_magnetization"].tolist()
    assert (t["z_specific_heat"].abs() < 6.0).all(), t["z_specific_heat"].tolist()
    assert (t["z_susceptibility"].abs() < 5.0).all(), t["z_susceptibility"].tolist()
    # energy per site within 3% of Monte Carlo (measured 0.5%, 2.3%, 1.6%; with 64 hidden units 12% at T = 3.5)
    relative = ((t["rbm_energy"] - t["mc_energy"]) / t["mc_energy"].abs()).to_numpy()
    assert np.all(np.abs(relative) < 0.03), relative.tolist()
    # the peaks of C and chi are where Monte Carlo has them: at T_c of the three
    assert t["rbm_specific_heat"].idxmax() == t["mc_specific_heat"].idxmax() == 1
    assert t["rbm_susceptibility"].idxmax() == t["mc_susceptibility"].idxmax() == 1
