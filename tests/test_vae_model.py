"""VAE model and guides: shapes and site names, learning, agreement with a plain-PyTorch VAE, checkpoint
semantics, the amortization-gap guide, and clear errors."""
from __future__ import annotations

import copy

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from physppl.vae.torch_baseline import TorchVAE
from physppl.guides.vae import MeanFieldLatentGuide, VAEGuide
from physppl.inference.iwae import importance_log_weights
from physppl.models.vae import VAEModel, check_support

N, D = 24, 3


def _data(shape=(8, 8), likelihood="bernoulli", seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((N, *shape), generator=g)
    if likelihood == "bernoulli":
        return (u < 0.4).float()
    return u


def _pair(shape=(8, 8), likelihood="bernoulli", arch="mlp", flow=None, latent=D):
    model = VAEModel(shape, latent, likelihood=likelihood, decoder=arch, hidden=[16], channels=[8, 4])
    guide = VAEGuide(shape, latent, encoder=arch, hidden=[16], channels=[4, 8], flow=flow, flow_hidden=[8])
    return model, guide


CASES = [((8, 8), "bernoulli", "mlp", None), ((8, 8), "continuous_bernoulli", "conv", None),
         ((2, 8, 4), "gaussian", "conv", None), ((10,), "bernoulli", "mlp", "iaf"), ((8, 8), "gaussian", "mlp", "iaf")]


@pytest.mark.parametrize("shape,likelihood,arch,flow", CASES)
def test_trace_shapes_and_site_names(shape, likelihood, arch, flow):
    model, guide = _pair(shape, likelihood, arch, flow)
    x = _data(shape, likelihood)
    idx = torch.tensor([3, 1, 7, 5, 0])
    gt = poutine.trace(guide).get_trace(x=x, subsample=idx)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x=x, subsample=idx)
    mt.compute_log_prob()
    assert gt.nodes["z"]["value"].shape == (5, D)
    assert mt.nodes["x"]["value"].shape == (5, *shape) and mt.nodes["x"]["is_observed"]
    assert torch.equal(mt.nodes["x"]["value"], x[idx])
    assert mt.nodes["x"]["log_prob"].shape == (5,) and mt.nodes["z"]["log_prob"].shape == (5,)
    latents = {n for n, s in mt.nodes.items() if s["type"] == "sample" and not s["is_observed"]
               and n != "data"}
    guide_sites = {n for n, s in gt.nodes.items() if s["type"] == "sample" and n != "data"}
    assert latents == guide_sites == {"z"}
    for tr in (gt, mt):
        frames = [f for f in tr.nodes["z"]["cond_indep_stack"]]
        assert [(f.name, f.dim, f.size) for f in frames] == [("data", -1, 5)]  # the minibatch
    assert mt.nodes["x"]["scale"] == pytest.approx(N / 5)  # the ELBO is rescaled to the full data set


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
def test_generates_without_data(likelihood):
    model, _ = _pair((6, 6), likelihood)
    x = model(n=4)
    assert x.shape == (4, 6, 6)
    assert model.sample(3).shape == (3, 6, 6)
    if likelihood != "gaussian":
        assert ((model.sample(3) >= 0) & (model.sample(3) <= 1)).all()


@pytest.mark.parametrize("flow", [None, "iaf"])
def test_one_svi_step_lowers_the_loss(flow):
    model, guide = _pair(flow=flow)
    x = _data()
    loss = TraceMeanField_ELBO(num_particles=16, vectorize_particles=True)

    def evaluate():  # common random numbers: the same draws before and after the step
        pyro.set_rng_seed(123)
        return loss.loss(model, guide, x=x)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), TraceMeanField_ELBO())
    before = evaluate()
    svi.step(x=x, subsample=torch.arange(8))
    after = evaluate()
    assert after < before - 0.5, (before, after)


def _copy_weights(model, guide, twin):
    twin.encoder.load_state_dict(guide.encoder.state_dict())
    twin.decoder.load_state_dict(model.decoder.state_dict())


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_pyro_elbo_equals_plain_torch_elbo(arch):
    """Trace_ELBO = one-sample torch ELBO and TraceMeanField_ELBO = torch ELBO with analytic KL, with the same
    weights and seed, full batch and subsampled; and the importance weights agree draw for draw."""
    model, guide = _pair(arch=arch)
    twin = TorchVAE((8, 8), D, hidden=[16], architecture=arch, channels=[8, 4], encoder_channels=[4, 8])
    _copy_weights(model, guide, twin)
    x = _data()
    for elbo, analytic in ((Trace_ELBO(), False), (TraceMeanField_ELBO(), True)):
        twin.analytic_kl = analytic
        for idx in (None, torch.arange(5, 13)):
            pyro.set_rng_seed(7)
            pyro_loss = elbo.loss(model, guide, x=x, subsample=idx)
            pyro.set_rng_seed(7)
            torch_loss = twin.loss(x if idx is None else x[idx], n_data=N).item()
            assert pyro_loss == pytest.approx(torch_loss, rel=1e-5)
    pyro.set_rng_seed(3)
    lw = importance_log_weights(model, guide, N, 40, {"x": x}, batch_size=N, max_elements=10**9)
    pyro.set_rng_seed(3)
    ref = twin.log_weights(x, 40, chunk=40)
    assert torch.allclose(lw, ref, atol=1e-3)


def test_networks_follow_a_restored_parameter_store():
    """After a checkpoint is loaded into Pyro's store (engine resume, best-parameter restore) the networks
    compute with the stored tensors, and the optimiser steps the tensors the networks use."""
    model, guide = _pair()
    x = _data()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(x=x)
    state = copy.deepcopy(pyro.get_param_store().get_state())
    z = torch.zeros(1, D)
    before = model.decode(z).clone()
    svi.step(x=x)
    assert not torch.allclose(model.decode(z), before)
    pyro.get_param_store().set_state(copy.deepcopy(state))
    assert torch.allclose(model.decode(z), before)
    weight = model.decoder.net[0].weight
    assert weight is pyro.get_param_store()["decoder$$$net.0.weight"]
    w0 = weight.detach().clone()
    svi.step(x=x)
    assert not torch.equal(model.decoder.net[0].weight.detach(), w0)


def test_meanfield_guide_shapes_and_errors():
    g = MeanFieldLatentGuide(torch.zeros(6, 2), torch.ones(6, 2))
    tr = poutine.trace(g).get_trace(subsample=torch.tensor([1, 4]))
    assert tr.nodes["z"]["value"].shape == (2, 2)
    with pytest.raises(ValueError, match="n_data, latent_dim"):
        MeanFieldLatentGuide(torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="positive"):
        MeanFieldLatentGuide(torch.zeros(6, 2), torch.zeros(6, 2))


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="likelihood"):
        VAEModel((8, 8), 2, likelihood="poisson")
    with pytest.raises(ValueError, match="multiples of 8"):
        VAEModel((12, 12), 2, decoder="conv", channels=[8, 8, 8])
    with pytest.raises(ValueError, match="images"):
        VAEGuide((64,), 2, encoder="conv")
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        VAEGuide((8, 8), 1, flow="iaf")
    with pytest.raises(ValueError, match="activation"):
        VAEModel((8, 8), 2, activation="swishy")
    with pytest.raises(ValueError, match="unknown flow"):
        VAEGuide((8, 8), 2, flow="maf")


def test_support_checks_say_what_is_wrong():
    spins = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    with pytest.raises(ValueError, match=r"data.spins=true"):
        check_support(spins, "bernoulli", "spins.npy")
    with pytest.raises(ValueError, match="continuous_bernoulli"):
        check_support(torch.tensor([[0.2, 0.7]]), "bernoulli", "grey.npy")
    with pytest.raises(ValueError, match=r"grey.npy: the continuous_bernoulli likelihood needs values in \[0, 1\]"):
        check_support(torch.tensor([[0.2, 1.7]]), "continuous_bernoulli", "grey.npy")
    with pytest.raises(ValueError, match="non-finite"):
        check_support(torch.tensor([[0.2, float("nan")]]), "gaussian", "x.npy")
    check_support(torch.tensor([[-3.0, 7.0]]), "gaussian", "x.npy")


@pytest.mark.gpu
def test_training_and_evaluation_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, guide = _pair(flow="iaf")
    dev = torch.device("cuda")
    model.to(dev)
    guide.to(dev)
    x = _data().to(dev)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for _ in range(3):
        svi.step(x=x, subsample=torch.arange(8))
    lw = importance_log_weights(model, guide, N, 20, {"x": x})
    assert lw.shape == (20, N) and torch.isfinite(lw).all()
