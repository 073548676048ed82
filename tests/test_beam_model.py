"""The knife-edge beam simulator as a Pyro model: shapes, physical limits, noise, prior support, vectorisation."""
import pyro
import pytest
import torch

from physppl.models.beam import DEFAULT_BOUNDS, PARAM_NAMES, KnifeEdgeBeamModel, blade_positions


@pytest.fixture
def model():
    return KnifeEdgeBeamModel()


def test_trace_shapes_and_sites(model):
    x = model.simulate(model.sample_prior(5))
    tr = pyro.poutine.trace(model).get_trace(x=x)
    tr.compute_log_prob()
    for name in PARAM_NAMES:
        assert tr.nodes[name]["value"].shape == (5,)
        assert tr.nodes[name]["cond_indep_stack"][0].name == "obs"
    assert tr.nodes["x"]["value"].shape == (5, 200) and tr.nodes["x"]["is_observed"]
    assert tr.nodes["x"]["log_prob"].shape == (5,)
    theta = torch.stack([tr.nodes[n]["value"] for n in PARAM_NAMES], -1)
    assert torch.allclose(tr.nodes["x"]["log_prob"], model.log_likelihood(theta, x))


def test_subsample_and_prior_predictive(model):
    x = model.simulate(model.sample_prior(8))
    tr = pyro.poutine.trace(model).get_trace(x=x, subsample=torch.tensor([1, 5]))
    assert tr.nodes["x"]["value"].shape == (2, 200)
    assert torch.equal(tr.nodes["x"]["value"], x[[1, 5]])
    prior_pred = pyro.poutine.trace(model).get_trace(n=3)
    assert prior_pred.nodes["x"]["value"].shape == (3, 200)


def test_blade_limits_and_positions(model):
    pos = blade_positions()
    assert pos.shape == (100,) and pos[0] == -3.0 and pos[-1] == 3.0
    theta = torch.tensor([[0.2, -0.3, 0.3, 0.2, 0.5, 1500.0, 0.1]])
    rate = model.rate(theta)[0]
    assert rate.shape == (200,)
    # the blade at the far end of each axis passes the whole beam; at the near end only the background
    assert rate[99] == pytest.approx(1510.0, rel=1e-6) and rate[199] == pytest.approx(1510.0, rel=1e-6)
    assert rate[0] == pytest.approx(10.0, abs=1e-6) and rate[100] == pytest.approx(10.0, abs=1e-6)
    # half the beam is passed at its centre; the rate increases monotonically along each scan
    centred = model.rate(torch.tensor([[0.0, 0.0, 0.3, 0.3, 0.0, 1000.0, 0.1]]))
    custom = KnifeEdgeBeamModel(positions=[-1.0, 0.0, 1.0])
    assert custom.rate(torch.tensor([0.0, 0.0, 0.3, 0.3, 0.0, 1000.0, 0.1]))[1] == pytest.approx(510.0)
    assert (centred[0, 1:100] >= centred[0, :99]).all()


def test_noise_is_poisson_gaussian(model):
    theta = torch.tensor([0.1, 0.2, 0.25, 0.4, 0.0, 1200.0, 0.3]).expand(20000, 7)
    x = model.simulate(theta, torch.Generator().manual_seed(1))
    rate = model.rate(theta[:1])[0]
    z = (x - rate) / torch.sqrt(rate + 25.0)
    assert z.mean().abs() < 0.01 and (z.std() - 1).abs() < 0.01


def test_rho_and_divergence_do_not_reach_the_data(model):
    theta = model.sample_prior(50, torch.Generator().manual_seed(3)).double().requires_grad_(True)
    x = model.double().simulate(theta.detach(), torch.Generator().manual_seed(4))
    model.log_likelihood(theta, x).sum().backward()
    assert torch.all(theta.grad[:, [4, 6]] == 0) and torch.all(theta.grad[:, [0, 1, 2, 3, 5]].abs().sum(0) > 0)
    other = theta.detach().clone()
    other[:, 4], other[:, 6] = -other[:, 4], 0.5 - other[:, 6]
    assert torch.equal(model.simulate(theta.detach(), torch.Generator().manual_seed(4)),
                       model.simulate(other, torch.Generator().manual_seed(4)))


def test_prior_support(model):
    theta = model.sample_prior(100_000, torch.Generator().manual_seed(0))
    low = torch.tensor([DEFAULT_BOUNDS[n][0] for n in PARAM_NAMES])
    high = torch.tensor([DEFAULT_BOUNDS[n][1] for n in PARAM_NAMES])
    assert (theta >= low).all() and (theta <= high).all()
    assert torch.allclose(theta.mean(0), (low + high) / 2, rtol=0.02, atol=0.01)
    inside = model.prior().log_prob(theta[:3])
    assert torch.allclose(inside, -torch.log(high - low).sum().expand(3))
    tr = pyro.poutine.trace(model).get_trace(n=1000)
    for i, name in enumerate(PARAM_NAMES):
        v = tr.nodes[name]["value"]
        assert (v >= low[i]).all() and (v <= high[i]).all()


def test_vectorised_simulation_of_many(model):
    theta = model.sample_prior(100_000, torch.Generator().manual_seed(0))
    x = model.simulate(theta, torch.Generator().manual_seed(1))
    assert x.shape == (100_000, 200) and torch.isfinite(x).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"positions": [0.0, -1.0, 1.0]}, "increase strictly"),
    ({"positions": [[0.0, 1.0]]}, "1-D array"),
    ({"bounds": {"sig_x": (0.5, 0.1)}}, "low < high"),
    ({"bounds": {"width": (0.1, 0.5)}}, "unknown parameter 'width'"),
    ({"bounds": {"sig_y": (0.0, 0.5)}}, "positive lower bounds"),
])
def test_bad_model_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KnifeEdgeBeamModel(**kwargs)


def test_bad_observation_shape(model):
    with pytest.raises(ValueError, match=r"shape \(n, 200\)"):
        model(x=torch.zeros(3, 150))
