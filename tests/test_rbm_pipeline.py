"""The RBM jobs end to end on tiny settings: outputs, metrics against independent computations, resume, errors, and
the command line against the Python functions."""
from __future__ import annotations

import json
from functools import partial

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

import physppl
from physppl.cli import run as app_run
from physppl.inference.contrastive import ContrastiveDivergence
from physppl.inference.svi import CheckpointError
from physppl.models.rbm import BernoulliRBM, to_binary
from physppl.models.simulators.ising import energy, enumerate_states, magnetization
from physppl.rbm.api import log_likelihood
from physppl.rbm.observables import exact_boltzmann, observables
from physppl.rbm.options import Evaluation
from physppl.vae.data import IsingDataSource

ISING = dict(L=4, temperatures=[2.27, 3.0], n_per_temperature=400, n_chains=8, thermalize=100, every=2,
             progress=False)
TINY_ENGINE = dict(epochs=4, progress=False, k=2)


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_exact_log_z_in_chunks_matches_the_other_layer():
    """Above 2^16 states the enumeration runs in chunks: 17 hidden units enumerated against 18 visible ones."""
    rbm = BernoulliRBM(18, 17, init_scale=0.3, seed=2)
    by_hidden = rbm.log_z_exact()
    with torch.no_grad():
        from physppl.models.rbm import all_states

        by_visible = torch.logsumexp(-rbm.free_energy(all_states(18)), 0)
    torch.testing.assert_close(by_hidden, by_visible)


def test_pseudo_log_likelihood_against_the_enumerated_conditionals():
    rbm = BernoulliRBM(5, 3, init_scale=0.7, seed=1)
    v = torch.bernoulli(torch.full((4, 5), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(4, dtype=torch.float64)
    for i in range(5):
        flipped = v.clone()
        flipped[:, i] = 1 - flipped[:, i]
        lp, lq = -rbm.free_energy(v), -rbm.free_energy(flipped)
        expected += lp - torch.logaddexp(lp, lq)
    torch.testing.assert_close(rbm.pseudo_log_likelihood(v), expected)


def test_jackknife_observables_cover_the_exact_values():
    """Exact Boltzmann samples of the 4x4 lattice at T = 2.27 in 20 groups: every observable within 3.5 jackknife
    errors of the exact value, and the jackknife error of the energy within 30% of the binomial sd / sqrt(n)."""
    log_p, exact = exact_boltzmann(4, 2.27)
    states = enumerate_states(4)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(states), size=4000, p=np.exp(log_p))
    est = observables(states[pick], 2.27, np.repeat(np.arange(20), 200))
    for key, (value, err) in est.items():
        assert abs(value - exact[key]) < 3.5 * err, (key, value, err, exact[key])
    e = energy(states[pick]) / 16
    assert abs(est["energy"][1] / (e.std() / np.sqrt(len(e))) - 1) < 0.3
    assert np.isclose(est["abs_magnetization"][0], np.abs(magnetization(states[pick])).mean())


@pytest.fixture(scope="module")
def thermo_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("rbm_ising")
    cfg = _compose(["+experiment=rbm_ising", *[f"data.{k}={v}" for k, v in ISING.items()], "inference.epochs=5",
                    "inference.progress=false", "sampling.n_chains=10", "sampling.burn_in=20",
                    "sampling.n_samples=20", "sampling.thin=2", "model.n_hidden=8"])
    return app_run(cfg, out), out


def test_thermodynamics_job_writes_its_outputs_and_its_figures_agree(thermo_job):
    metrics, out = thermo_job
    for name in ("posterior.nc", "metrics.json", "thermodynamics.csv", "observables.png", "filters.png",
                 "samples.png", "rbm_T2.2700_h8.pt", "rbm_T3.0000_h8.pt"):
        assert (out / name).exists(), name
    table = pd.read_csv(out / "thermodynamics.csv")
    assert list(table["temperature"]) == [2.27, 3.0] and set(table["n_hidden"]) == {8}
    # the Monte Carlo column is the data's own: recompute it from the cached configurations
    d = IsingDataSource(**ISING).load()
    at = d.labels["temperature"] == 2.27
    mc = observables(d.x.numpy()[at].reshape(-1, 4, 4) * 2 - 1, 2.27, d.labels["chain"][at])
    assert np.isclose(table["mc_energy"][0], mc["energy"][0], rtol=1e-6)
    # exact columns are the enumeration's; the RBM's exact KL is recomputed from its saved parameters
    log_p, exact = exact_boltzmann(4, 3.0)
    assert np.isclose(table["exact_specific_heat"][1], exact["specific_heat"])
    saved = torch.load(out / "rbm_T3.0000_h8.pt", weights_only=False)
    rbm = BernoulliRBM(saved["n_visible"], saved["n_hidden"])
    rbm.load_state_dict(saved["state_dict"])
    log_q = rbm.log_prob_exact(to_binary(torch.as_tensor(enumerate_states(4)))).detach().numpy()
    assert np.isclose(table["exact_kl"][1], np.sum(np.exp(log_p) * (log_p - log_q)), rtol=1e-5)
    assert metrics["max_exact_kl"] == pytest.approx(table["exact_kl"].max(), rel=1e-5)
    # the weight on m > 0 (m = 0 split evenly), of the RBM by enumeration and of the data by counting
    m = magnetization(enumerate_states(4))
    assert np.isclose(table["rbm_exact_plus_share"][1], np.exp(log_q) @ ((m > 0) + 0.5 * (m == 0)), rtol=1e-6)
    at3 = d.labels["temperature"] == 3.0
    m_data = magnetization(d.x.numpy()[at3].reshape(-1, 4, 4) * 2 - 1)
    assert np.isclose(table["mc_plus_share"][1], np.mean((m_data > 0) + 0.5 * (m_data == 0)))
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior_predictive["energy"].dims == ("chain", "draw", "temperature", "n_hidden")
    assert idata.posterior_predictive["energy"].shape == (10, 20, 2, 1)
    e = idata.posterior_predictive["energy"].values[:, :, 0, 0].ravel()
    assert np.isclose(e.mean(), table["rbm_energy"][0])  # the table's RBM energy is the chains' mean
    assert json.loads((out / "metrics.json").read_text())["problem"] == "rbm_thermodynamics"


def test_train_rbm_scores_exactly_what_the_model_says(tmp_path):
    """On 4x4 Ising data (16 units: exact log Z): the reported held-out log-likelihood is the mean exact log p(v) of
    the test split; posterior.nc holds draws of p(h | v) whose mean is sigmoid(b + v W)."""
    res = physppl.train_rbm(IsingDataSource(**ISING), model=partial(BernoulliRBM, n_hidden=6),
                            engine=ContrastiveDivergence(**TINY_ENGINE), n_draws=400,
                            evaluation={"posterior_batch": 5, "eval_every_epochs": 2})
    d = res.data
    v_test = to_binary(d.x[d.split["test"]])
    assert res.metrics["log_z_method"] == "exact"
    assert res.metrics["test_log_likelihood"] == pytest.approx(float(res.model.log_prob_exact(v_test).mean().detach()),
                                                               rel=1e-5)
    h = res.idata.posterior["h"]
    assert h.dims == ("chain", "draw", "data", "hidden") and h.shape == (1, 400, 5, 6)
    v = res.idata.observed_data["v"].values
    probs = res.model.hidden_probs(torch.as_tensor(v)).detach().numpy()
    assert np.abs(h.values.mean((0, 1)) - probs).max() < 4 * 0.5 / np.sqrt(400)
    assert [r["epoch"] for r in res.training.history] == [2, 4] and "heldout_ll" in res.training.history[0]
    out = res.save(tmp_path / "saved")
    assert {"posterior.nc", "metrics.json", "rbm.pt", "history.csv", "losses.csv"} <= {p.name for p in out.iterdir()}


def test_ais_on_digits_sized_model_agrees_with_exact_log_z():
    """64 visible and 12 hidden units: exact log Z by the hidden layer; AIS (forced by exact_max_units=0) within
    3 of its error bars (measured difference 0.004, error bar 0.01)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.bernoulli(torch.full((200, 64), 0.3, dtype=torch.float64), generator=gen)
    rbm = BernoulliRBM(64, 12, init_scale=0.3, seed=4).init_from_data(v)
    exact = log_likelihood(rbm, v, Evaluation())
    ais = log_likelihood(rbm, v, Evaluation(exact_max_units=0, ais_chains=100, ais_betas=2000))
    assert exact["method"] == "exact" and ais["method"] == "ais"
    assert abs(ais["log_z"] - exact["log_z"]) < max(3 * ais["log_z_se"], 0.02), (ais, exact["log_z"])


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    """Four epochs straight, or two and then a resumed run to four: the same parameters, bit for bit; a checkpoint
    of another problem is refused."""
    d = IsingDataSource(**ISING).load()
    v = to_binary(d.x)
    straight = BernoulliRBM(16, 6, seed=0).init_from_data(v)
    ContrastiveDivergence(negative="pcd", **TINY_ENGINE).run(straight, v)
    first = BernoulliRBM(16, 6, seed=0).init_from_data(v)
    ckpt = tmp_path / "checkpoint.pt"
    ContrastiveDivergence(negative="pcd", **{**TINY_ENGINE, "epochs": 2}).run(first, v, checkpoint=ckpt)
    resumed = BernoulliRBM(16, 6, seed=0).init_from_data(v)
    res = ContrastiveDivergence(negative="pcd", resume=True, **TINY_ENGINE).run(resumed, v, checkpoint=ckpt)
    assert res.resumed_from == 2 and res.epochs == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="another problem"):
        ContrastiveDivergence(negative="pcd", resume=True, **{**TINY_ENGINE, "lr": 0.5}).run(
            BernoulliRBM(16, 6, seed=0), v, checkpoint=ckpt)


def test_bad_inputs_are_named(tmp_path):
    bad = np.zeros((50, 4, 4))
    bad[3, 1, 1] = 0.5
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"bad\.npy.*0/1 or -1/\+1.*0\.5"):
        physppl.train_rbm(str(tmp_path / "bad.npy"), engine=ContrastiveDivergence(**TINY_ENGINE))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ContrastiveDivergence(optimizer="rmsprop")
    with pytest.raises(ValueError, match="sampling: need n_chains >= 2"):
        physppl.rbm_thermodynamics(ISING, sampling={"n_chains": 1})
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ContrastiveDivergence(batch_size=100).run(BernoulliRBM(4, 2), torch.zeros(10, 4))


def test_spin_arrays_from_a_file_train(tmp_path):
    """A user's +-1 configurations (n, L, L) from a .npy: mapped to 0/1, trained, scored exactly."""
    spins = np.where(np.random.default_rng(0).random((120, 4, 4)) < 0.7, 1, -1).astype(np.int8)
    np.save(tmp_path / "spins.npy", spins)
    res = physppl.train_rbm(str(tmp_path / "spins.npy"), model=partial(BernoulliRBM, n_hidden=4),
                            engine=ContrastiveDivergence(**{**TINY_ENGINE, "batch_size": 20}))
    # independent spins at p = 0.7: the entropy bound, -16 H(0.7) = -9.77 nats; a tiny fit is close to it
    assert -11.0 < res.metrics["test_log_likelihood"] < -9.0
    assert np.array_equal(np.load(tmp_path / "spins.npy"), spins)
