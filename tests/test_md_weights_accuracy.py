"""Frame weights against simulated ground truth, the two-frame (un)identifiable case, mismatched data, and NUTS.

Frames are gemmi structure factors of a toy two-domain molecule (states A, B and a decoy C) with thermal jitter;
observed diffuse (and Bragg) intensities come from known weights plus 5% (3%) noise. Seeds are fixed.
"""
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import pytest
from pyro.infer import Trace_ELBO

from physppl.md_weights import analysis
from physppl.md_weights.data import MDWeightsDataSource
from physppl.md_weights.pipeline import build_guide, build_model, fit
from physppl.guides.md_weights import DirichletFrameGuide, logistic_normal_guide, map_initial_values
from physppl.inference.nuts import NUTSEngine
from physppl.inference.optim import clipped_adam
from physppl.inference.svi import SVIEngine
from physppl.models.md_weights import FrameWeightsModel

MD = Path(__file__).resolve().parents[2] / "shared" / "data" / "md"
NO_JITTER = dict(atom_jitter=0.0, rigid_degrees=0.0, rigid_shift=0.0)


def _data(bragg=False, **sim):
    sim.setdefault("dmin", 4.0)
    src = MDWeightsDataSource(simulate=sim, cache_dir=None, use_bragg=bragg)
    frames, kind, diffuse, br, truth = src.load()
    return src.prepare(frames, kind, diffuse, br, truth)


def _svi(data, guide=DirichletFrameGuide, max_steps=1500, min_steps=300, n_draws=400, warm=300, **model_kw):
    pyro.set_rng_seed(0)
    model = build_model(partial(FrameWeightsModel, **model_kw), data)
    g = build_guide(partial(guide), model, data, warm_start_steps=warm)
    engine = SVIEngine(clipped_adam(lr=0.05, lrd=0.999), loss=Trace_ELBO(num_particles=8, vectorize_particles=True,
                       max_plate_nesting=1), max_steps=max_steps, min_steps=min_steps, rtol=1e-3, progress=False,
                       checkpoint_every=0)
    return model, fit(model, data, engine, g, n_draws=n_draws)


def _states(model, data, result):
    prior = model.state_mass_prior(data.labels, len(data.label_names))
    return analysis.state_table(result.flat("w"), data.labels, data.label_names, prior)


def test_two_frames_without_bragg_the_split_is_its_prior_and_flagged():
    """x' = w1 w2 |F_A - F_B|^2 and the scale is free: the diffuse data cannot tell the split (nor p from 1 - p)."""
    data = _data(labels=[0, 1], state_masses=[0.7, 0.3, 0.0], truth="frames", dmin=5.0, **NO_JITTER)
    model, result = _svi(data, max_steps=400, min_steps=200, n_draws=1000, warm=0)
    w1 = result.flat("w")[:, 0]
    states = _states(model, data, result)
    # the flat prior on the split: mean 1/2, sd 1/sqrt(12) = 0.289, 90% interval (0.05, 0.95)
    assert abs(w1.mean() - 0.5) < 0.05 and abs(w1.std() / 0.2887 - 1) < 0.12
    assert np.quantile(w1, 0.05) < 0.12 and np.quantile(w1, 0.95) > 0.88
    assert (states["contraction"] < 0.5).all()  # what the run reports as unidentified_states


@pytest.mark.parametrize("split", [0.7, pytest.param(0.5, marks=pytest.mark.slow)])
def test_two_frames_with_bragg_recover_the_split(split):
    data = _data(bragg=True, labels=[0, 1], state_masses=[split, 1 - split, 0.0], truth="frames", dmin=5.0, **NO_JITTER)
    model, result = _svi(data, max_steps=500, min_steps=200, warm=100)
    w1 = result.flat("w")[:, 0]
    assert abs(w1.mean() - split) < 0.02
    assert _states(model, data, result)["contraction"].min() > 0.99


def test_states_among_100_frames_masses_within_002_decoy_below_002():
    data = _data(n_frames=100, truth="frames", state_masses=[0.5, 0.5, 0.0])
    # near an even split the diffuse data pin the masses only to second order: give SVI the steps to get there
    model, result = _svi(data, max_steps=1500, min_steps=1200, warm=150)
    states = _states(model, data, result)
    assert np.abs(states["mean"].to_numpy() - [0.5, 0.5, 0.0]).max() < 0.02
    assert states["mean"].iloc[2] < 0.02


@pytest.mark.slow
def test_subset_of_frames_carries_the_weight_and_effective_number_matches():
    data = _data(n_frames=100, truth="subset", subset=[20, 30])
    model, result = _svi(data)
    w = result.flat("w")
    assert w[:, 20:30].sum(1).mean() > 0.9
    n_eff = analysis.effective_frames_summary(w)["n_eff"]
    assert 7.0 < n_eff < 13.0  # truth 10


@pytest.mark.slow
def test_mismatched_structure_gives_intermediate_weights_and_a_wider_posterior():
    """Observed from A + B' (B' = the hinge at 12 degrees, absent from the frames, whose B has it at 20)."""
    sim = dict(n_frames=90, truth="states", state_masses=[0.5, 0.5, 0.0], n_truth_frames=200)
    mismatched = _data(**sim, observed_hinge_degrees=12.0)
    model, result = _svi(mismatched)
    states = _states(model, mismatched, result)
    assert 0.05 < states["mean"].iloc[0] < 0.95 and 0.05 < states["mean"].iloc[1] < 0.95
    # the learned noise absorbs the misfit, so the posterior is wider than one that trusts the sigmas...
    trusting_model, trusting = _svi(mismatched, noise="data")
    trusting_states = _states(trusting_model, mismatched, trusting)
    assert states["sd"].iloc[0] > 1.3 * trusting_states["sd"].iloc[0]
    # ...and the misfit shows: noise factors well above those of data the frames can explain
    matched = _data(**sim)
    _, matched_result = _svi(matched)
    assert result.flat("noise").mean() > 1.3 * matched_result.flat("noise").mean()


T12 = dict(labels=[0] * 6 + [1] * 6, truth="frames", state_masses=[0.6, 0.4, 0.0])


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["dirichlet", "logistic_normal"])
def test_svi_matches_nuts_on_twelve_frames(guide):
    """State masses within 0.02 of NUTS and per-frame posterior sds within 30% (weights above 0.02)."""
    data = _data(**T12)
    pyro.set_rng_seed(0)
    ref_model = build_model(partial(FrameWeightsModel), data)
    init = map_initial_values(ref_model, **data.model_kwargs())
    nuts = NUTSEngine(num_samples=300, warmup_steps=300, num_chains=2, jit_compile=True, full_mass=True, progress=False)
    result_ref = nuts.run(ref_model, init_values=init, **data.model_kwargs())
    w_ref = result_ref.samples["w"].reshape(-1, 12).numpy()
    model, result = _svi(data, guide=DirichletFrameGuide if guide == "dirichlet" else logistic_normal_guide,
                         max_steps=3000, min_steps=1000, n_draws=2000)
    w = result.flat("w")
    S = len(data.label_names)
    masses = analysis.state_masses(w.mean(0), data.labels, S)
    masses_ref = analysis.state_masses(w_ref.mean(0), data.labels, S)
    assert np.abs(masses - masses_ref).max() < 0.02
    big = w_ref.mean(0) > 0.02
    ratio = w.std(0)[big] / w_ref.std(0)[big]
    assert np.all(np.abs(ratio - 1) < 0.3), ratio


@pytest.mark.slow
def test_thousand_frames_of_a_real_protein():
    """1AHO (altloc A / B, plus a decoy) at 2.5 A: 1,000 frames, truth 0.5 / 0.5 / 0 from an independent ensemble."""
    if not MD.is_dir():
        pytest.skip(f"real structure not found at {MD} (the shared data folder beside the repo)")
    data = _data(structure=str(MD / "1AHO_untangler_TW.pdb"), n_frames=1000, dwell=50.0, truth="states",
                 state_masses=[0.5, 0.5, 0.0], n_truth_frames=300, dmin=2.5)
    model, result = _svi(data, max_steps=2000)
    states = _states(model, data, result)
    assert np.abs(states["mean"].to_numpy() - [0.5, 0.5, 0.0]).max() < 0.02
    assert states["mean"].iloc[2] < 0.02
