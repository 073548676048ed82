"""VAE model and guides: shapes and site names, learning, agreement with a plain-PyTorch VAE, checkpoint
semantics, the amortization-gap guide, and clear errors."""
from __future__ import annotations

import copy

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from physppl.guides.vae import MeanFieldLatentGuide, VAEGuide
from physppl.inference.iwae import importance_log_weights
from physppl.inference.optim import ClippedAdam
from physppl.inference.svi import SVIEngine
from physppl.models.vae import VAEModel, check_support
from physppl.vae.torch_baseline import TorchVAE

N, D = 24, 3


def _trainer(model, guide, elbo, lr):
    """One SVI step as the engine takes it: the ELBO as a module, a torch optimiser over both modules' parameters
    (Pyro's module-local parameter mode: the parameters live in the modules, not in a global store)."""
    loss = elbo(model, guide)
    optimizer = ClippedAdam(lr=lr, clip_norm=1e10)({"model": model, "guide": guide})

    def step(**data):
        optimizer.zero_grad()
        value = loss(**data)
        value.backward()
        optimizer.step()
        return float(value.detach())

    return step, optimizer


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

    step, _ = _trainer(model, guide, TraceMeanField_ELBO(), lr=0.02)
    before = evaluate()
    step(x=x, subsample=torch.arange(8))
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
    """After a checkpoint's state_dicts are loaded into the modules (engine resume, best-parameter restore) the
    networks compute with the restored values, and the optimiser still steps the tensors the networks use."""
    model, guide = _pair()
    x = _data()
    step, optimizer = _trainer(model, guide, Trace_ELBO(), lr=0.01)
    step(x=x)
    state = copy.deepcopy({"model": model.state_dict(), "guide": guide.state_dict()})
    z = torch.zeros(1, D)
    before = model.decode(z).clone()
    q_before = guide.distribution(x[:2]).mean.clone()
    step(x=x)
    assert not torch.allclose(model.decode(z), before)
    assert not torch.allclose(guide.distribution(x[:2]).mean, q_before)
    model.load_state_dict(copy.deepcopy(state["model"]))
    guide.load_state_dict(copy.deepcopy(state["guide"]))
    assert torch.allclose(model.decode(z), before) and torch.allclose(guide.distribution(x[:2]).mean, q_before)
    weight = model.decoder.net[0].weight
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(weight) in optimised and id(guide.encoder.loc.weight) in optimised
    assert not pyro.get_param_store().keys()  # nothing in Pyro's global store
    w0 = weight.detach().clone()
    step(x=x)
    assert not torch.equal(model.decoder.net[0].weight.detach(), w0)


def test_engine_checkpoint_resumes_the_same_trajectory(tmp_path):
    """SVIEngine's checkpoint (the modules' and the optimiser's state_dicts and the RNG streams): 3 steps, then
    resume to 6 in fresh modules, gives the parameters of 6 straight steps; a checkpoint of another
    architecture is refused with CheckpointError."""
    from physppl.inference.svi import CheckpointError

    x = _data()

    def engine(steps, resume=False, path=tmp_path / "ckpt.pt"):
        return SVIEngine(optim=ClippedAdam(lr=0.01), loss=TraceMeanField_ELBO(), max_steps=steps, min_steps=steps + 1,
                         batch_size=8, checkpoint_path=path, resume=resume, progress=False)

    pyro.set_rng_seed(4)
    model_a, guide_a = _pair()
    engine(6, path=tmp_path / "straight.pt").run(model_a, guide_a, {"x": x}, n_data=N)
    pyro.set_rng_seed(4)
    model_b, guide_b = _pair()
    engine(3).run(model_b, guide_b, {"x": x}, n_data=N)
    model_c, guide_c = _pair()  # fresh modules: everything comes from the checkpoint
    res = engine(6, resume=True).run(model_c, guide_c, {"x": x}, n_data=N)
    assert res.resumed_from == 3 and res.steps == 6 and len(res.losses) == 6
    for a, c in ((model_a, model_c), (guide_a, guide_c)):
        for (name, pa), (_, pc) in zip(a.state_dict().items(), c.state_dict().items()):
            torch.testing.assert_close(pa, pc, msg=name)
    other_model, other_guide = _pair(latent=D + 1)
    with pytest.raises(CheckpointError, match="another problem: guide, model differ"):
        engine(6, resume=True).run(other_model, other_guide, {"x": x}, n_data=N)


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
    step, _ = _trainer(model, guide, TraceMeanField_ELBO(), lr=0.01)
    for _ in range(3):
        step(x=x, subsample=torch.arange(8))
    lw = importance_log_weights(model, guide, N, 20, {"x": x})
    assert lw.shape == (20, N) and torch.isfinite(lw).all()
