"""Flows and the beam guide: normalisation, support, consistency of densities, Pyro site discipline, features."""
import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from physppl.guides.beam import KnifeEdgeFlowGuide, KnifeEdgeSummaries, knife_edge_flow
from physppl.models.beam import PARAM_NAMES, KnifeEdgeBeamModel
from physppl.inference.flows import BoxFlow, ConditionalBoxFlow

LOW, HIGH = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 1.0])


def _perturb(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _grid(n=400):
    a = LOW[0] + (HIGH[0] - LOW[0]) * (torch.arange(n) + 0.5) / n
    b = LOW[1] + (HIGH[1] - LOW[1]) * (torch.arange(n) + 0.5) / n
    g = torch.stack(torch.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
    return g, float((HIGH - LOW).prod()) / n**2


@pytest.mark.parametrize("fast", ["density", "sampling"])
def test_conditional_flow_is_normalised_inside_its_box(fast):
    flow = ConditionalBoxFlow(LOW, HIGH, x_dim=3, n_transforms=2, hidden_dims=(16,), fast=fast)
    _perturb(flow, 0.05)
    g, cell = _grid()
    with torch.no_grad():
        for x in (torch.tensor([0.3, -1.0, 2.0]), torch.tensor([-2.0, 0.0, 0.5])):
            mass = flow.log_prob(g, x.expand(len(g), 3)).exp().sum() * cell
            assert float(mass) == pytest.approx(1.0, abs=0.015)
            draws = flow.sample(x, 2000)
            assert draws.shape == (2000, 2) and ((draws > LOW) & (draws < HIGH)).all()


def test_sampling_densities_match_log_prob():
    for fast in ("density", "sampling"):
        flow = ConditionalBoxFlow(torch.zeros(4), torch.ones(4) * 3, x_dim=5, n_transforms=2, hidden_dims=(16,), fast=fast)
        _perturb(flow, 0.1)
        x = torch.randn(3, 5)
        theta, log_q = flow.rsample_and_log_prob(x, 7)
        assert theta.shape == (7, 3, 4) and log_q.shape == (7, 3)
        assert torch.allclose(log_q, flow.log_prob(theta, x), atol=1e-3)


def test_box_flow_is_normalised_and_starts_at_its_gaussian():
    flow = BoxFlow(LOW, HIGH, torch.tensor([0.2, -0.1]), torch.tensor([[0.8, 0.0], [0.3, 0.5]]))
    theta, log_q = flow.rsample_and_log_prob(20000)
    u = torch.logit((theta - LOW) / (HIGH - LOW))
    assert torch.allclose(u.mean(0), torch.tensor([0.2, -0.1]), atol=0.05)
    assert torch.allclose(torch.cov(u.T), torch.tensor([[0.64, 0.24], [0.24, 0.34]]), atol=0.05)
    _perturb(flow.transforms, 0.05)
    theta, log_q = flow.rsample_and_log_prob(5)
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(theta), log_q, atol=1e-3)
        g, cell = _grid()
        assert float(flow.log_prob(g).exp().sum() * cell) == pytest.approx(1.0, abs=0.01)


def test_summaries_recover_centre_width_and_flux():
    model = KnifeEdgeBeamModel()
    theta = torch.tensor([[0.3, -0.5, 0.25, 0.4, 0.0, 1500.0, 0.2]])
    feats = KnifeEdgeSummaries(include_raw=False)(model.rate(theta))[0]
    lo, hi, mean, width = feats[:2], feats[2:4], feats[4:6], feats[6:8]
    assert torch.allclose(lo, torch.tensor([10.0, 10.0]), atol=0.01)
    assert torch.allclose(hi, torch.tensor([1510.0, 1510.0]), atol=0.5)
    assert torch.allclose(mean, torch.tensor([0.3, -0.5]), atol=0.005)
    assert torch.allclose(width, torch.tensor([0.25, 0.4]), atol=0.01)
    assert KnifeEdgeSummaries()(torch.zeros(2, 200)).shape == (2, 208)


def test_guide_sites_match_the_model_latents():
    model = KnifeEdgeBeamModel()
    flow = knife_edge_flow(low=model.low, high=model.high, n_transforms=1, hidden_dims=(16,), embedding_dims=(16,),
                           context_dim=8)
    theta = model.sample_prior(6)
    x = model.simulate(theta)
    flow.fit_standardization(theta, x)
    guide = KnifeEdgeFlowGuide(flow)
    g_tr = pyro.poutine.trace(guide).get_trace(x=x, subsample=torch.tensor([0, 2, 3]))
    m_tr = pyro.poutine.trace(pyro.poutine.replay(model, trace=g_tr)).get_trace(x=x, subsample=torch.tensor([0, 2, 3]))
    latents = {n for n, s in m_tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "obs"}
    assert latents == set(PARAM_NAMES)
    for n in PARAM_NAMES:
        assert g_tr.nodes[n]["value"].shape == (3,)
        assert torch.equal(m_tr.nodes[n]["value"], g_tr.nodes[n]["value"])
    assert g_tr.nodes["theta"]["infer"]["is_auxiliary"]
    assert math.isfinite(Trace_ELBO().loss(model, guide, x=x))
    with pytest.raises(ValueError, match="needs the observed scans"):
        guide()


def test_flow_rejects_bad_boxes():
    with pytest.raises(ValueError, match="low < high"):
        ConditionalBoxFlow(torch.tensor([1.0]), torch.tensor([0.0]), x_dim=2)
    with pytest.raises(ValueError, match="features must be one of"):
        knife_edge_flow(features="pixels")


def test_log_density_of_draws_stays_finite_when_the_sigmoid_saturates():
    """Amortized VI scores each draw with log q(theta | x); a draw pushed onto a face of the box in float32 must
    not be inverted (logit of 0 or 1 is infinite: SVI diverged at step 50 of the default beam_avi job)."""
    torch.manual_seed(0)
    model = KnifeEdgeBeamModel()
    theta = model.sample_prior(64)
    x = model.simulate(theta)
    flow = knife_edge_flow(model.low, model.high, model.positions, fast="sampling", n_transforms=1,
                           hidden_dims=[16], embedding_dims=[16], context_dim=8)
    flow.fit_standardization(theta, x)
    flow.theta_norm.scale.mul_(200.0)  # a very wide q in logit space: many draws saturate at the faces
    q = flow.distribution(x[:8])
    torch.manual_seed(1)
    draws = q.rsample((50,))
    torch.manual_seed(1)
    same_draws, log_q_along_the_pass = flow.rsample_and_log_prob(x[:8], 50)
    torch.testing.assert_close(draws, same_draws)
    assert ((draws == model.low) | (draws == model.high)).any(), "the test needs saturated draws"
    # the density Pyro's ELBO uses (log_prob of the draw) is the one accumulated while drawing it
    torch.testing.assert_close(q.log_prob(draws), log_q_along_the_pass, rtol=1e-4, atol=1e-3)
    guide = KnifeEdgeFlowGuide(flow)
    pyro.clear_param_store()
    loss = Trace_ELBO().differentiable_loss(model, guide, x=x[:8])
    assert torch.isfinite(loss)


def test_knife_edge_fit_features_recover_the_beam_with_calibrated_errors():
    """The per-scan maximum-likelihood features: centre and width within their own standard errors of the truth."""
    from physppl.guides.beam import KnifeEdgeFit

    model = KnifeEdgeBeamModel()
    gen = torch.Generator().manual_seed(3)
    theta = model.sample_prior(1000, gen)
    feats = KnifeEdgeFit(model.positions, include_raw=False)(model.simulate(theta, gen))
    assert feats.shape == (1000, 12) and bool(torch.isfinite(feats).all())
    # columns per axis (x, y): mu, log sig, log F, then their log standard errors
    for axis in (0, 1):
        mu, log_sig, se_mu = feats[:, 3 * axis], feats[:, 3 * axis + 1], feats[:, 6 + 3 * axis].exp()
        z = (mu - theta[:, axis]) / se_mu
        assert float(z.std()) == pytest.approx(1.0, abs=0.1)  # the Gauss-Newton errors are the real ones
        assert float((log_sig.exp() - theta[:, 2 + axis]).abs().median()) < 0.01  # mm; prior width 0.5 mm
    flux = feats[:, 2].exp()
    assert float(((flux - theta[:, 5]) / theta[:, 5]).abs().median()) < 0.02
    # the pilot puts them in the parameters' order, with no guess for rho and div
    from physppl.guides.beam import KnifeEdgePilot

    loc, scale = KnifeEdgePilot()(feats)
    assert bool(torch.isnan(loc[:, [4, 6]]).all()) and bool(torch.isnan(scale[:, [4, 6]]).all())
    z = (loc[:, [0, 1, 2, 3, 5]] - theta[:, [0, 1, 2, 3, 5]]) / scale[:, [0, 1, 2, 3, 5]]
    assert bool((z.std(0) - 1).abs().max() < 0.15)


def test_an_estimator_on_fixed_features_trains_on_them_once_and_scores_raw_scans():
    """NPETrainer computes costly fixed features once and trains the same parameters the raw-scan
    estimator uses: after training, log q from raw scans is the trained density."""
    from physppl.guides.beam import knife_edge_estimator
    from physppl.inference.npe import NPETrainer

    model = KnifeEdgeBeamModel()
    gen = torch.Generator().manual_seed(0)
    theta = model.sample_prior(600, gen)
    x = model.simulate(theta, gen)
    est = knife_edge_estimator(low=model.low, high=model.high, positions=model.positions, transforms=1, hidden=(16,))
    calls = []
    est.features.register_forward_hook(lambda *a: calls.append(1))
    res = NPETrainer(max_epochs=3, batch_size=100, progress=False).fit(est, theta, x)
    assert len(calls) == 1  # one featurisation of the 600 scans, not one per minibatch
    with torch.no_grad():
        nll = -est.log_prob(theta[:50], x[:50]).mean()
    assert bool(torch.isfinite(nll)) and res.epochs == 3
    assert est.sample(x[0], 10).shape == (10, 7)
