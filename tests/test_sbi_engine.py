"""The generic simulation-based inference engine: priors with any support, estimators (NSF, MAF, cINN) that are
normalised densities, APT's atomic loss, importance refinement against a multimodal posterior, calibration
checks, the simulator protocol, and ``physppl.infer_sbi`` end to end (Python and command line, seeds)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from torch import distributions as D

import physppl
from physppl.cli import run
from physppl.inference.apt import AtomicLoss
from physppl.inference.calibration import expected_coverage
from physppl.inference.estimators import ConditionalINN, build_estimator
from physppl.inference.fit import ProtocolError
from physppl.inference.npe import NPETrainer, VariationalFocus
from physppl.inference.priors import as_prior
from physppl.inference.refine import ImportanceRefinement, refine
from physppl.models.simulators.sbi_tasks import TwoMoons
from physppl.simulation_inference.parts import PLANS, TRAINER


def _perturbed(est, seed=0, scale=0.3):
    """An estimator whose weights are far from their identity start: a non-trivial density to integrate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in est.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return est


@pytest.mark.parametrize("kind", ["nsf", "maf", "cinn"])
def test_estimator_density_integrates_to_one_on_a_box(kind):
    prior = D.Independent(D.Uniform(-torch.ones(2), torch.ones(2)), 1)
    est = build_estimator(prior, 3, kind=kind, transforms=2, hidden=(16,))
    est.fit_standardization(as_prior(prior).sample(500, torch.Generator().manual_seed(1)), torch.randn(500, 3))
    _perturbed(est, scale=0.15)
    # a density on the box piles mass against its faces, where a grid in theta cannot resolve it: integrate over a
    # grid in logit coordinates instead, q(theta(u)) |d theta / d u| du, with torch's own Jacobian of the map
    to_box = as_prior(prior).transform()
    g = torch.linspace(-14, 14, 801)
    u = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    theta = to_box(u)
    x = torch.tensor([0.3, -1.0, 0.5])
    with torch.no_grad():
        total = (est.log_prob(theta, x) + to_box.log_abs_det_jacobian(u, theta)).exp().sum() * (g[1] - g[0]) ** 2
    assert float(total) == pytest.approx(1.0, abs=0.01)
    draws = est.sample(x, 2000)
    assert draws.shape == (2000, 2) and bool((draws.abs() < 1).all())
    # log_prob is -inf outside the support
    assert est.log_prob(torch.tensor([[1.5, 0.0]]), x).item() == -math.inf


def test_truncated_estimator_rejects_outside_the_box_and_knows_its_normaliser():
    """box='truncate' (sbi's way): z-scored parameters, draws outside the box rejected; log_prob minus the
    log of the mass inside is the density of the draws, and integrates to one over the box."""
    from physppl.inference.refine import ConditionedEstimator

    prior = D.Independent(D.Uniform(-torch.ones(2), torch.ones(2)), 1)
    est = build_estimator(prior, 3, kind="nsf", transforms=2, hidden=(16,), box="truncate")
    # standardised as if the posterior were twice as wide as the box: much of the mass falls outside
    est.fit_standardization(2 * (2 * torch.rand(500, 2, generator=torch.Generator().manual_seed(1)) - 1),
                            torch.randn(500, 3))
    _perturbed(est, scale=0.1)
    x = torch.tensor([0.3, -1.0, 0.5])
    draws = est.sample(x, 4000)
    assert bool((draws.abs() <= 1).all()) and 0.05 < est.acceptance < 0.9
    q = ConditionedEstimator(est, x)
    g = (torch.arange(400) + 0.5) / 200 - 1  # cell midpoints over [-1, 1]
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    total = q.log_prob(grid).exp().sum() * (2 / 400) ** 2
    assert float(total) == pytest.approx(1.0, abs=0.03)


def test_an_ensemble_is_the_normalised_mixture_of_its_members_and_draws_from_it():
    """Three truncated NSFs with different weights: the ensemble's density is their mean, its draws stay in the
    box, follow that mixture (each member's share of the draws in the box matches its share of the mass), and
    ``log_prob`` minus the normaliser integrates to one."""
    from physppl.inference.estimators import EnsembleEstimator
    from physppl.inference.refine import ConditionedEstimator

    prior = D.Independent(D.Uniform(-torch.ones(2), torch.ones(2)), 1)
    members = []
    for k in range(3):
        torch.manual_seed(k)
        m = build_estimator(prior, 3, kind="nsf", transforms=2, hidden=(16,), box="truncate")
        m.fit_standardization(1.5 * (2 * torch.rand(500, 2, generator=torch.Generator().manual_seed(k)) - 1),
                              torch.randn(500, 3))
        members.append(_perturbed(m, seed=k, scale=0.15))
    ens = EnsembleEstimator(members)
    x = torch.tensor([0.3, -1.0, 0.5])
    g = (torch.arange(400) + 0.5) / 200 - 1
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        lp = ens.log_prob(grid, x)
        mean = torch.stack([m.log_prob(grid, x).exp() for m in members]).mean(0)
    torch.testing.assert_close(lp.exp(), mean, rtol=1e-5, atol=1e-7)
    torch.manual_seed(5)
    q = ConditionedEstimator(ens, x)
    assert float(q.log_prob(grid).exp().sum() * (2 / 400) ** 2) == pytest.approx(1.0, abs=0.03)
    draws = ens.sample(x, 20_000)
    assert draws.shape == (20_000, 2) and bool((draws.abs() <= 1).all())
    # the draws' histogram on a coarse grid against the mixture's mass per cell
    edges = torch.linspace(-1, 1, 5)
    counts = torch.histogramdd(draws, bins=[edges, edges]).hist.flatten() / len(draws)
    inner = edges[1:-1]
    cell = torch.bucketize(grid[:, 0].contiguous(), inner) * 4 + torch.bucketize(grid[:, 1].contiguous(), inner)
    mass = torch.zeros(16).index_add_(0, cell, mean.float())
    np.testing.assert_allclose(counts.numpy(), (mass / mass.sum()).numpy(), atol=0.015)
    # batched observations: one draw set per observation
    assert ens.sample(x.expand(4, 3), 7).shape == (7, 4, 2)
    with pytest.raises(ValueError, match="share the prior"):
        EnsembleEstimator([members[0], build_estimator(prior, 3, kind="nsf", box="logit")])


@pytest.mark.parametrize("kind", ["nsf", "cinn"])
def test_estimator_density_integrates_to_one_on_normal_and_lognormal(kind):
    prior = {"a": D.Normal(0.0, 1.0), "b": D.LogNormal(0.0, 0.5)}
    est = build_estimator(prior, 2, kind=kind, transforms=2, hidden=(16,))
    est.fit_standardization(as_prior(prior).sample(2000, torch.Generator().manual_seed(1)), torch.randn(2000, 2))
    _perturbed(est, scale=0.1)
    ga, gb = torch.linspace(-10, 10, 801), torch.linspace(1e-4, 15, 1200)
    grid = torch.stack(torch.meshgrid(ga, gb, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        total = est.log_prob(grid, torch.tensor([0.2, 0.1])).exp().sum() * (ga[1] - ga[0]) * (gb[1] - gb[0])
    assert float(total) == pytest.approx(1.0, abs=0.02)
    assert bool((est.sample(torch.zeros(2), 1000)[:, 1] > 0).all())


def test_cinn_blocks_invert_exactly():
    net = _perturbed(ConditionalINN(3, 4, transforms=4, hidden=(32,)))
    c = torch.randn(4)
    v = net.sample(c, 50)
    z = v
    for block, perm in zip(net.blocks, net.perms):
        z = block(z, c.expand(50, 4))[0][..., perm]
    back = z
    for block, inv in zip(reversed(net.blocks), reversed(net.inv_perms)):
        back = block.inverse(back[..., inv], c.expand(50, 4))
    torch.testing.assert_close(back, v, atol=1e-4, rtol=1e-4)


def test_atomic_loss_reduces_to_the_npe_loss_with_prior_atoms():
    """With atoms drawn from the prior, APT's loss - log M -> -log q(theta | x) + log p(theta) as M grows."""
    task = TwoMoons()
    prior = as_prior(task.prior)
    gen = torch.Generator().manual_seed(0)
    theta = prior.sample(64, gen)
    x = task.simulate(theta)
    est = build_estimator(prior, 2, kind="nsf", transforms=2, hidden=(16,))
    est.fit_standardization(prior.sample(500, gen), task.simulate(prior.sample(500, gen)))
    # a broad q (small perturbation): the log of the atoms' average ratio has little Monte Carlo bias
    _perturbed(est, scale=0.05)
    m = 8192
    atoms = torch.cat([theta.unsqueeze(1), prior.sample(64 * (m - 1), gen).reshape(64, m - 1, 2)], dim=1)
    loss = AtomicLoss(prior, num_atoms=m)
    with torch.no_grad():
        apt = loss(est, theta, x, atoms=atoms) - math.log(m)
        npe = (-est.log_prob(theta, x) + prior.log_prob(theta)).mean()
    assert float(apt) == pytest.approx(float(npe), abs=0.03)
    # the default atoms: the pair's own parameter first, then others of the batch, never itself again
    a = AtomicLoss(prior, num_atoms=5).atoms(theta)
    assert a.shape == (64, 5, 2)
    assert torch.equal(a[:, 0], theta)
    assert not (a[:, 1:] == a[:, :1]).all(-1).any()


class _Rough:
    """Stands in for an amortized posterior: every mode covered, each misplaced and too wide."""

    def __init__(self):
        locs = torch.tensor([[0.9, 0.85], [0.9, -0.85], [-0.9, 0.85], [-0.9, -0.85]])
        self.d = D.MixtureSameFamily(D.Categorical(torch.tensor([0.3, 0.2, 0.2, 0.3])),
                                     D.Independent(D.Normal(locs, 0.25), 1))

    def sample_and_log_prob(self, n):
        t = self.d.sample((n,))
        return t, self.d.log_prob(t)

    def log_prob(self, theta):
        return self.d.log_prob(theta)


def test_importance_refinement_recovers_four_modes_where_reverse_kl_collapses():
    """x = theta^2 + noise: the posterior has a mode in each quadrant, each of mass 1/4."""
    torch.manual_seed(0)
    low, high = -3 * torch.ones(2), 3 * torch.ones(2)
    prior = D.Independent(D.Uniform(low, high), 1)
    x_obs = torch.tensor([1.0, 1.0])

    def loglik(theta):
        return D.Normal(theta**2, 0.2).log_prob(x_obs).sum(-1)

    def quadrant_masses(draws):
        s = torch.sign(draws)
        return np.array([float(((s[:, 0] == a) & (s[:, 1] == b)).float().mean()) for a in (1, -1) for b in (1, -1)])

    # reverse-KL VI started near one mode stays there
    init = torch.tensor([1.0, 1.0]) + 0.1 * torch.randn(500, 2)
    q, res = VariationalFocus(steps=300, particles=64, lr=0.01, n_transforms=1, progress=False).fit(
        loglik, low, high, init)
    assert quadrant_masses(q.sample(4000))[0] > 0.95
    opts = ImportanceRefinement(n_proposal=20_000, mcmc_steps=10, seed=0)
    out = refine({"variational": q, "network": _Rough()}, loglik, prior, 4000, opts)
    assert out.method == "network" and out.reliable and out.candidates["variational"]["pareto_k"] > 0.7
    np.testing.assert_allclose(quadrant_masses(out.draws), 0.25, atol=0.03)
    # each mode's location is right too
    upper = out.draws[(out.draws > 0).all(-1)]
    np.testing.assert_allclose(upper.mean(0).numpy(), [1.0, 1.0], atol=0.03)
    # alone, the collapsed fit fails its importance check; without the SMC fallback that is flagged, not trusted
    no_smc = ImportanceRefinement(n_proposal=20_000, mcmc_steps=10, smc_particles=0, seed=0)
    lone = refine({"variational": q}, loglik, prior, 1000, no_smc)
    assert not lone.reliable and "Pareto k" in lone.warning and lone.smc is None
    # with it (the default), tempered SMC from the collapsed fit finds the other three modes, and importance
    # sampling with a mixture fitted to its particles gets their masses right and passes its own check
    rescued = refine({"variational": q}, loglik, prior, 4000, ImportanceRefinement(seed=0))
    assert rescued.method == "variational+smc+mixture" and rescued.reliable and rescued.warning is None
    assert rescued.pareto_k < 0.7 and rescued.smc["stages"] >= 2 and rescued.smc["capped_stages"] == 0
    np.testing.assert_allclose(quadrant_masses(rescued.draws), 0.25, atol=0.03)
    upper = rescued.draws[(rescued.draws > 0).all(-1)]
    np.testing.assert_allclose(upper.mean(0).numpy(), [1.0, 1.0], atol=0.03)
    # an SMC held to too few moves per stage fails its own check, and says so
    starved = refine({"variational": q}, loglik, prior, 1000, ImportanceRefinement(smc_max_moves=1, seed=0))
    assert not starved.reliable and starved.method == "variational+smc" and "own check" in starved.warning
    assert starved.smc["capped_stages"] > 0


def test_tempered_smc_reaches_a_known_posterior_from_a_misplaced_proposal():
    """Normal prior and likelihood: the posterior is N(0.8 x, 0.2^2 I) in closed form; the proposal is 20
    posterior sds away. The SMC's mean, sd and evidence match the exact ones."""
    from physppl.inference.smc import TemperedSMC

    x = torch.tensor([1.0, -0.5, 0.3])
    prior, noise = D.Independent(D.Normal(torch.zeros(3), 1.0), 1), 0.5
    g = D.Independent(D.Normal(torch.full((3,), 3.0), 0.3), 1)

    def sample_g(n):
        t = g.sample((n,))
        return t, g.log_prob(t)

    def log_target(t):
        return prior.log_prob(t) + D.Normal(t, noise).log_prob(x).sum(-1)

    torch.manual_seed(0)
    res = TemperedSMC(n_particles=8000, seed=0).run(sample_g, g.log_prob, log_target)
    assert res.betas[-1] == 1.0 and res.stages > 3 and res.capped == 0
    post_sd = (1 / (1 + 1 / noise**2)) ** 0.5
    np.testing.assert_allclose(res.particles.mean(0).numpy(), (0.8 * x).numpy(), atol=0.02)
    np.testing.assert_allclose(res.particles.std(0).numpy(), post_sd, rtol=0.05)
    # log p(x) = log N(x; 0, (1 + noise^2) I)
    exact = float(D.Normal(torch.zeros(3), (1 + noise**2) ** 0.5).log_prob(x).sum())
    assert res.log_evidence == pytest.approx(exact, abs=0.15)


def test_refinement_metrics_judge_each_observation_by_the_draws_it_returns():
    from physppl.inference.refine import refinement_metrics

    infos = [{"refined_with": "network", "refine_pareto_k": 0.3, "refine_ess": 900.0, "refine_reliable": True,
              "refine_candidates": {"network": {"pareto_k": 0.3}}},
             {"refined_with": "network+smc+mixture", "refine_pareto_k": 0.2, "refine_ess": 1500.0,
              "refine_reliable": True, "refine_candidates": {"network": {"pareto_k": 1.8}}, "refine_smc": {}},
             {"refined_with": "network+smc", "refine_pareto_k": 2.5, "refine_ess": 3.0, "refine_reliable": False,
              "refine_warning": "the fallback did not pass", "refine_candidates": {"network": {"pareto_k": 2.5}},
              "refine_smc": {}}]
    m = refinement_metrics(infos)
    # the SMC's own draws are judged by its check, not by the proposal's k-hat; the mixture's draws by theirs
    assert m["refine_pareto_k_max"] == 0.3 and m["refine_ess_min"] == 900.0
    assert m["refine_proposal_pareto_k_worst"] == 2.5 and m["refine_smc_observations"] == [1, 2]
    assert m["failed_checks"] == ["refinement_unreliable: observation 2: the fallback did not pass"]


def test_normal_prior_trains_and_matches_the_exact_posterior():
    """theta ~ N(0, I_2), x ~ N(theta, 0.5^2 I): the posterior is N(0.8 x, 0.2 I); a LogNormal nuisance parameter
    the data never see keeps its prior, inside its support."""
    prior = {"mu": D.Normal(torch.zeros(2), 1.0), "noise": D.LogNormal(-1.0, 0.3)}
    pr = as_prior(prior)
    gen = torch.Generator().manual_seed(0)
    theta = pr.sample(4000, gen)
    torch.manual_seed(0)
    x = theta[:, :2] + 0.5 * torch.randn(4000, 2)
    est = build_estimator(pr, 2, kind="nsf", transforms=2, hidden=(32, 32))
    NPETrainer(lr=2e-3, batch_size=200, max_epochs=60, patience=10, progress=False, seed=0).fit(est, theta, x)
    x_o = torch.tensor([1.0, -0.5])
    d = est.sample(x_o, 20_000)
    np.testing.assert_allclose(d[:, :2].mean(0).numpy(), 0.8 * x_o.numpy(), atol=0.08)
    np.testing.assert_allclose(d[:, :2].std(0).numpy(), math.sqrt(0.2), rtol=0.15)
    assert bool((d[:, 2] > 0).all())
    assert float(d[:, 2].median()) == pytest.approx(math.exp(-1.0), rel=0.1)
    assert est.param_names == ("mu[0]", "mu[1]", "noise")


def test_expected_coverage_is_calibrated_for_the_exact_posterior_and_not_for_an_overconfident_one():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(400, 2, generator=gen)
    x = theta + 0.5 * torch.randn(400, 2, generator=gen)

    def exact(scale):
        def sample_and_log_prob(xb, n):
            post = D.Normal(0.8 * xb, scale)
            t = post.sample((n,))
            return t, post.log_prob(t).sum(-1)

        def log_prob(tb, xb):
            return D.Normal(0.8 * xb, scale).log_prob(tb).sum(-1)
        return sample_and_log_prob, log_prob

    torch.manual_seed(0)
    good = expected_coverage(theta, x, *exact(math.sqrt(0.2)), n_draws=200)
    assert np.abs(good["empirical"] - good["levels"]).max() < 0.07
    bad = expected_coverage(theta, x, *exact(0.5 * math.sqrt(0.2)), n_draws=200)
    assert bad["empirical"][9] < good["levels"][9] - 0.2  # the 50% region holds far fewer than half


class _NoPrior:
    def simulate(self, theta):
        return theta


class _BadShape:
    prior = D.Independent(D.Uniform(torch.zeros(2), torch.ones(2)), 1)

    def simulate(self, theta):
        return theta.sum()


class _BadLikelihood(_BadShape):
    def simulate(self, theta):
        return theta * 2

    def log_likelihood(self, theta, x):
        return theta


def test_the_simulator_protocol_is_checked_with_clear_errors(tmp_path):
    with pytest.raises(ProtocolError, match="no `prior`"):
        physppl.infer_sbi(_NoPrior(), n_simulations=10)
    with pytest.raises(ProtocolError, match=r"returned shape \(\); expected \(2, ...\)"):
        physppl.infer_sbi(_BadShape(), n_simulations=10)
    with pytest.raises(ProtocolError, match=r"log_likelihood.*returned shape \(2, 2\)"):
        physppl.infer_sbi(_BadLikelihood(), n_simulations=10)
    with pytest.raises(ProtocolError, match="discrete"):
        physppl.infer_sbi(_NoPrior(), prior=D.Poisson(3.0), n_simulations=10)
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\) \(2 values\)"):
        physppl.infer_sbi(TwoMoons(), observed=np.zeros(3), n_simulations=10)
    bad = tmp_path / "obs.npy"
    np.save(bad, np.array([[0.1, 0.2], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"obs.npy: observation 1, value 0 is nan"):
        physppl.infer_sbi(TwoMoons(), observed=bad, n_simulations=10)


def _tiny(seed=0, **kw):
    plan = PLANS["npe"].build(trainer=TRAINER.build(max_epochs=15, progress=False),
                              refinement=ImportanceRefinement(n_proposal=4000, mcmc_steps=5, max_mcmc_steps=20))
    return physppl.infer_sbi(TwoMoons(), n_simulations=1500, n_observations=2, n_draws=1000, plan=plan,
                             estimator=lambda prior, x_dim: build_estimator(prior, x_dim, transforms=3, hidden=(32, 32)),
                             evaluate={"sbc": 60, "sbc_draws": 30, "c2st_draws": 1000, "plots": 1}, seed=seed, **kw)


def test_infer_sbi_refines_two_moons_and_seeds_reproduce(tmp_path):
    res = _tiny(workdir=tmp_path / "a")
    out = res.save(tmp_path / "a")
    # the refined posterior matches the exact one (two_moons has exact reference draws): C2ST near 0.5
    assert res.metrics["c2st_max"] < 0.6
    assert res.metrics["refine_pareto_k_max"] < 0.7
    for f in ("posterior.nc", "posterior.pt", "metrics.json", "calibration.json", "summary.csv", "losses.csv",
              "pair_obs0.png", "sbc_ranks.png", "coverage.png", "expected_coverage.png"):
        assert (out / f).is_file(), f
    import arviz as az

    idata = az.from_netcdf(out / "posterior.nc")
    # the simulator's own parameter names
    assert idata.posterior["theta1"].dims == ("chain", "draw", "obs") and idata.posterior["theta2"].shape == (1, 1000, 2)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "obs")
    assert {"theta1_true", "theta2_true"} == set(idata.constant_data.data_vars)
    calib = json.loads((out / "calibration.json").read_text())
    assert set(calib["sbc"]["ks_p"]) == {"theta1", "theta2"} and len(calib["sbc"]["expected_coverage"]["levels"]) == 19
    again = _tiny()
    torch.testing.assert_close(again.draws, res.draws, rtol=0, atol=0)
    other = _tiny(seed=1)
    assert not torch.equal(other.draws, res.draws)
    post = torch.load(out / "posterior.pt", weights_only=False)
    assert post.sample(torch.zeros(2), 5).shape == (5, 2)


def test_infer_sbi_trains_an_ensemble_whose_members_differ_and_saves_it(tmp_path):
    plan = PLANS["npe_ensemble"].build(trainer=TRAINER.build(max_epochs=5, progress=False), ensemble=2)
    res = physppl.infer_sbi(TwoMoons(), n_simulations=600, n_observations=1, n_draws=200, plan=plan,
                            estimator=lambda prior, x_dim: build_estimator(prior, x_dim, transforms=2, hidden=(16,)),
                            evaluate={"sbc": 0, "c2st_draws": 200, "plots": 0}, workdir=tmp_path)
    out = res.save(tmp_path)
    m = res.metrics
    assert m["ensemble"] == 2 and len(m["member_epochs"]) == 2 and m["epochs"] == sum(m["member_epochs"])
    assert m["estimator"] == "ensemble of 2 nsf"
    assert sorted(res.losses["member"].unique()) == [0, 1]
    assert (tmp_path / "npe_checkpoint_0.pt").is_file() and (tmp_path / "npe_checkpoint_1.pt").is_file()
    post = torch.load(out / "posterior.pt", weights_only=False)
    a, b = post.members if hasattr(post, "members") else post.flow.members
    # different initialisations: the members are different networks
    theta = torch.zeros(1, 2)
    with torch.no_grad():
        assert float(a.log_prob(theta, torch.zeros(2))) != float(b.log_prob(theta, torch.zeros(2)))
    with pytest.raises(ValueError, match="ensemble=1"):
        PLANS["apt"].build(ensemble=3)
    with pytest.raises(ValueError, match="ensemble must be >= 1"):
        PLANS["npe"].build(ensemble=0)


def test_refinement_and_smc_options_are_checked():
    from physppl.inference.smc import TemperedSMC

    with pytest.raises(ValueError, match="smc_defensive must be in"):
        ImportanceRefinement(smc_defensive=1.0)
    with pytest.raises(ValueError, match="defensive must be in"):
        ImportanceRefinement(defensive=-0.1)
    with pytest.raises(ValueError, match="ess_fraction must be in"):
        TemperedSMC(ess_fraction=1.5)


def test_command_line_runs_a_users_simulator_class_on_an_observed_file(tmp_path):
    observed = tmp_path / "x.npy"
    np.save(observed, np.full((2, 10), 0.3))
    overrides = ["+experiment=sbi", "model._target_=physppl.models.simulators.sbi_tasks.GaussianLinear",
                 f"observed={observed}", "n_simulations=800", "n_draws=300", "inference=sbi_npe_amortized",
                 "inference.trainer.max_epochs=3", "inference.trainer.progress=false", "evaluate.sbc=20",
                 "evaluate.sbc_draws=10", "evaluate.c2st_draws=300", "evaluate.plots=0", "guide.transforms=1",
                 "guide.hidden=[16]"]
    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics = run(cfg, tmp_path / "cli")
    assert metrics["problem"] == "sbi" and metrics["n_obs"] == 2 and metrics["estimator"] == "nsf"  # the file's
    assert metrics["likelihood"] is True and metrics["refinement"] is False
    assert (tmp_path / "cli" / "posterior.nc").is_file() and metrics["c2st_mean"] is not None


def test_embeddings_shape_the_context():
    """The learned embeddings map (batches of) scans to the flow's context, per axis for the convolutions."""
    from physppl.inference.estimators import Conv1dEmbedding

    prior = D.Independent(D.Uniform(-torch.ones(3), torch.ones(3)), 1)
    for embedding in ("mlp", "conv1d"):
        est = build_estimator(prior, 40, embedding=embedding, embedding_dim=8, n_axes=2, transforms=1, hidden=(8,))
        assert est.context(torch.randn(5, 40)).shape == (5, 8)
        assert est.sample(torch.randn(40), 4).shape == (4, 3) and est.sample(torch.randn(6, 40), 4).shape == (4, 6, 3)
    with pytest.raises(ValueError, match="do not split into 3 axes"):
        Conv1dEmbedding(40, n_axes=3)


class _HalfPilot(torch.nn.Module):
    """A first guess for the first parameter only (from the first feature), none for the second."""

    def forward(self, features):
        loc = torch.stack([0.5 * torch.tanh(features[..., 0]), torch.full_like(features[..., 0], float("nan"))], -1)
        scale = torch.stack([torch.full_like(features[..., 0], 0.1), torch.full_like(features[..., 0], float("nan"))], -1)
        return loc, scale


def test_a_pilot_recentres_the_density_and_keeps_it_normalised():
    prior = D.Independent(D.Uniform(-torch.ones(2), torch.ones(2)), 1)
    est = build_estimator(prior, 3, kind="nsf", transforms=2, hidden=(16,), pilot=_HalfPilot())
    est.fit_standardization(as_prior(prior).sample(500, torch.Generator().manual_seed(1)), torch.randn(500, 3))
    _perturbed(est, scale=0.1)
    x = torch.tensor([0.8, -1.0, 0.5])
    to_box = as_prior(prior).transform()
    g = torch.linspace(-14, 14, 801)
    u = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    theta = to_box(u)
    with torch.no_grad():
        total = (est.log_prob(theta, x) + to_box.log_abs_det_jacobian(u, theta)).exp().sum() * (g[1] - g[0]) ** 2
    assert float(total) == pytest.approx(1.0, abs=0.01)
    # untrained, the draws of the first parameter sit at the pilot's guess (scale 0.1, inflated 2x), and the
    # second spreads over the box
    est = build_estimator(prior, 3, kind="nsf", transforms=2, hidden=(16,), pilot=_HalfPilot())
    est.fit_standardization(as_prior(prior).sample(500, torch.Generator().manual_seed(1)), torch.randn(500, 3))
    d = est.sample(x, 4000)
    assert abs(float(d[:, 0].median()) - 0.5 * math.tanh(0.8)) < 0.15 and float(d[:, 0].std()) < 0.4
    assert float(d[:, 1].std()) > 0.3
