"""Frame weights against simulated ground truth, the two-frame (un)identifiable case, mismatched data, and NUTS.

Frames are gemmi structure factors of a toy two-domain molecule (states A, B and a decoy C) with thermal jitter;
observed diffuse (and Bragg) intensities come from known weights plus 5% (3%) noise. Seeds are fixed.
"""
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import physppl
from physppl.inference.nuts import NUTSEngine
from physppl.md_weights import analysis
from physppl.md_weights.data import MDWeightsDataSource
from physppl.md_weights.parts import ENGINES
from physppl.models.md_weights import FrameWeightsModel

MD = Path(__file__).resolve().parents[2] / "shared" / "data" / "md"
NO_JITTER = dict(atom_jitter=0.0, rigid_degrees=0.0, rigid_shift=0.0)


def _weigh(bragg=False, guide="dirichlet", max_steps=1500, min_steps=300, n_draws=400, warm=300, warm_lr=0.05,
           engine=None, model=None, **sim):
    """``physppl.weigh_frames`` on the simulated example ``sim`` (at 4 A unless given): the job's SVI settings with
    a step budget, a MAP warm start of ``warm`` steps, the guide grouped by state; seed 0."""
    sim.setdefault("dmin", 4.0)
    source = MDWeightsDataSource(simulate=sim, cache_dir=None, use_bragg=bragg)
    if engine is None:
        engine = ENGINES["svi"].build(max_steps=max_steps, min_steps=min_steps, progress=False, checkpoint_every=0)
    return physppl.weigh_frames(source, model=partial(FrameWeightsModel, **(model or {})), guide=guide, engine=engine,
                                warm_start_steps=warm, warm_start_lr=warm_lr, cc_baseline=False, n_draws=n_draws,
                                log_likelihood=False, seed=0)


def _draws(result, site="w"):
    return result.fit.flat(site).double().numpy()


def test_two_frames_without_bragg_the_split_is_its_prior_and_flagged():
    """x' = w1 w2 |F_A - F_B|^2 and the scale is free: the diffuse data cannot tell the split (nor p from 1 - p)."""
    # from the prior mean (no MAP: the split has none); 200 steps take q's concentration from 100 to near the prior's 2
    result = _weigh(labels=[0, 1], state_masses=[0.7, 0.3, 0.0], truth="frames", dmin=5.0, max_steps=200,
                    n_draws=1000, warm=0, **NO_JITTER)
    w1 = _draws(result)[:, 0]
    # the flat prior on the split: mean 1/2, sd 1/sqrt(12) = 0.289, 90% interval (0.05, 0.95)
    assert abs(w1.mean() - 0.5) < 0.05 and abs(w1.std() / 0.2887 - 1) < 0.12
    assert np.quantile(w1, 0.05) < 0.12 and np.quantile(w1, 0.95) > 0.88
    assert (result.states["contraction"] < 0.5).all()
    assert sorted(result.metrics["unidentified_states"]) == sorted(result.states["state"])  # and the run says so
    assert result.metrics["reliable"] is False and any(w.startswith("unidentified_states") for w in result.metrics["warnings"])


@pytest.mark.parametrize("split", [0.7, pytest.param(0.5, marks=pytest.mark.slow)])
def test_two_frames_with_bragg_recover_the_split(split):
    result = _weigh(bragg=True, labels=[0, 1], state_masses=[split, 1 - split, 0.0], truth="frames", dmin=5.0,
                    max_steps=200, warm=100, **NO_JITTER)
    w1 = _draws(result)[:, 0]
    assert abs(w1.mean() - split) < 0.02
    assert result.states["contraction"].min() > 0.99 and result.metrics["unidentified_states"] == []


def test_states_among_100_frames_masses_within_002_decoy_below_002():
    # Near an even split the diffuse data pin the masses only to second order, so the optimisers crawl along it:
    # from the default warm start (300 MAP steps at lr 0.05, which stops at masses 0.53 / 0.47) SVI needs ~1,200
    # steps to get within 0.02, and at the job's learning rate Adam's steps keep the masses jittering by ~0.015.
    # A MAP at lr 0.2 reaches 0.51 / 0.49 (a MAP step costs a third of an SVI step); then 300 SVI steps with the
    # learning rate decaying 1% a step, which settles the masses (job seeds 0-3: within 0.008 of the truth).
    optim = ENGINES["svi"].kwargs["optim"].build(lrd=0.99)
    engine = ENGINES["svi"].build(max_steps=300, min_steps=300, optim=optim, progress=False, checkpoint_every=0)
    result = _weigh(n_frames=100, truth="frames", state_masses=[0.5, 0.5, 0.0], engine=engine, warm=300, warm_lr=0.2)
    states = result.states
    assert np.abs(states["mean"].to_numpy() - [0.5, 0.5, 0.0]).max() < 0.02
    assert states["mean"].iloc[2] < 0.02


@pytest.mark.slow
def test_subset_of_frames_carries_the_weight_and_effective_number_matches():
    result = _weigh(n_frames=100, truth="subset", subset=[20, 30])
    w = _draws(result)
    assert w[:, 20:30].sum(1).mean() > 0.9
    n_eff = analysis.effective_frames_summary(w)["n_eff"]
    assert 7.0 < n_eff < 13.0  # truth 10


@pytest.mark.slow
def test_mismatched_structure_gives_intermediate_weights_and_a_wider_posterior():
    """Observed from A + B' (B' = the hinge at 12 degrees, absent from the frames, whose B has it at 20)."""
    sim = dict(n_frames=90, truth="states", state_masses=[0.5, 0.5, 0.0], n_truth_frames=200)
    mismatched = _weigh(**sim, observed_hinge_degrees=12.0)
    states = mismatched.states
    assert 0.05 < states["mean"].iloc[0] < 0.95 and 0.05 < states["mean"].iloc[1] < 0.95
    # the learned noise absorbs the misfit, so the posterior is wider than one that trusts the sigmas...
    trusting = _weigh(**sim, observed_hinge_degrees=12.0, model=dict(noise="data"))
    assert states["sd"].iloc[0] > 1.3 * trusting.states["sd"].iloc[0]
    # ...and the misfit shows: noise factors well above those of data the frames can explain
    matched = _weigh(**sim)
    assert _draws(mismatched, "noise").mean() > 1.3 * _draws(matched, "noise").mean()


T12 = dict(labels=[0] * 6 + [1] * 6, truth="frames", state_masses=[0.6, 0.4, 0.0])


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["dirichlet", "logistic_normal"])
def test_svi_matches_nuts_on_twelve_frames(guide):
    """State masses within 0.02 of NUTS and per-frame posterior sds within 30% (weights above 0.02)."""
    # NUTS chains start at the MAP of the warm start (300 steps), as the job's do
    nuts = NUTSEngine(num_samples=300, warmup_steps=300, num_chains=2, jit_compile=True, full_mass=True, progress=False)
    reference = _weigh(**T12, engine=nuts)
    assert reference.metrics["engine"] == "nuts" and reference.fit.n_chains == 2
    w_ref = _draws(reference)
    result = _weigh(**T12, guide=guide, max_steps=3000, min_steps=1000, n_draws=2000)
    w = _draws(result)
    labels, S = result.data.labels, len(result.data.label_names)
    masses = analysis.state_masses(w.mean(0), labels, S)
    masses_ref = analysis.state_masses(w_ref.mean(0), labels, S)
    assert np.abs(masses - masses_ref).max() < 0.02
    big = w_ref.mean(0) > 0.02
    ratio = w.std(0)[big] / w_ref.std(0)[big]
    assert np.all(np.abs(ratio - 1) < 0.3), ratio


@pytest.mark.slow
def test_thousand_frames_of_a_real_protein():
    """1AHO (altloc A / B, plus a decoy) at 2.5 A: 1,000 frames, truth 0.5 / 0.5 / 0 from an independent ensemble."""
    if not MD.is_dir():
        pytest.skip(f"real structure not found at {MD} (the shared data folder beside the repo)")
    result = _weigh(structure=str(MD / "1AHO_untangler_TW.pdb"), n_frames=1000, dwell=50.0, truth="states",
                    state_masses=[0.5, 0.5, 0.0], n_truth_frames=300, dmin=2.5, max_steps=2000)
    states = result.states
    assert np.abs(states["mean"].to_numpy() - [0.5, 0.5, 0.0]).max() < 0.02
    assert states["mean"].iloc[2] < 0.02
