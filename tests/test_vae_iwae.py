"""The importance-weighted log-likelihood estimator against exact marginal likelihoods (a conjugate model and a
linear-Gaussian VAE), its bounds, chunking and errors; the amortization gap against its closed form."""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from physppl.vae.training import amortization_gap
from physppl.guides.vae import MeanFieldLatentGuide, VAEGuide
from physppl.inference.iwae import importance_estimate, importance_log_weights
from physppl.models.vae import VAEModel

N = 24


def conjugate_model(x, subsample=None):
    with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def exact_guide(x, subsample=None):
    with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2, math.sqrt(0.5)))


def shifted_guide(x, subsample=None):
    with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2 + 0.7, 1.2))


def test_exact_posterior_gives_the_exact_marginal_likelihood():
    """With q = p(z | x) every weight equals p(x) = N(x; 0, 2), whatever the chunking."""
    x = torch.randn(N) * 2
    truth = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).double()
    for batch, cap in ((N, 2**24), (5, 7)):
        est = importance_estimate(conjugate_model, exact_guide, N, 30, model_kwargs={"x": x}, batch_size=batch,
                                  max_elements=cap)
        assert torch.allclose(est.iwae, truth, atol=1e-5) and torch.allclose(est.elbo, truth, atol=1e-5)
        assert torch.allclose(est.ess, torch.full((N,), 30.0, dtype=torch.float64))


def test_bounds_tighten_with_more_particles_towards_the_truth():
    x = torch.randn(200) * 2
    truth = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).double()
    pyro.set_rng_seed(1)
    gaps = []
    for k in (1, 10, 100, 3000):
        est = importance_estimate(conjugate_model, shifted_guide, 200, k, model_kwargs={"x": x})
        gaps.append(float((truth - est.iwae).mean()))
        if k > 1:
            assert (est.iwae >= est.elbo - 1e-9).all()  # Jensen, draw by draw
    # K = 1: the ELBO, below log p(x) by KL(q || p(z | x)) = 0.90 nats for this guide
    assert gaps[0] == pytest.approx(0.90, abs=0.1)
    assert gaps[0] > gaps[1] > gaps[2]  # the bound tightens with K
    assert abs(gaps[2]) < 0.05 and abs(gaps[3]) < 0.01  # towards log p(x)


def test_indices_and_nested_plates():
    """A pixel plate inside the data plate is summed like an event dimension."""
    x = torch.randn(6, 4)

    def model_event(x, subsample=None):
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x[idx])

    def model_plate(x, subsample=None):
        with pyro.plate("data", x.shape[0], subsample=subsample, dim=-2) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("pixel", 4, dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x, subsample=None):
        with pyro.plate("data", x.shape[0], subsample=subsample):
            pyro.sample("z", dist.Normal(0.1, 0.9))

    def guide_plate(x, subsample=None):
        with pyro.plate("data", x.shape[0], subsample=subsample, dim=-2):
            pyro.sample("z", dist.Normal(0.1, 0.9))

    idx = torch.tensor([4, 1, 2])
    pyro.set_rng_seed(5)
    a = importance_log_weights(model_event, guide, 6, 50, {"x": x}, indices=idx)
    pyro.set_rng_seed(5)
    b = importance_log_weights(model_plate, guide_plate, 6, 50, {"x": x}, indices=idx)
    assert a.shape == b.shape == (50, 3)
    assert torch.allclose(a, b, atol=1e-5)


def test_global_latents_are_refused():
    def model(x, subsample=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    def guide(x, subsample=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="outside the data plate"):
        importance_log_weights(model, guide, 4, 5, {"x": torch.zeros(4)})
    with pytest.raises(ValueError, match="no sample site"):
        importance_log_weights(lambda x, subsample=None: pyro.sample("x", dist.Normal(0.0, 1.0), obs=x[0]),
                               lambda x, subsample=None: None, 4, 5, {"x": torch.zeros(4)})


def linear_gaussian_vae(seed: int = 0, n: int = N):
    """A VAE with a linear decoder and Gaussian pixels (probabilistic PCA): its posterior is Gaussian and
    ``log p(x)`` and the best mean-field ELBO are known in closed form."""
    torch.manual_seed(seed)
    model = VAEModel((6,), 2, likelihood="gaussian", hidden=[], min_scale=0.0)
    w = torch.tensor([[1.0, 0.3], [0.2, 1.0], [0.8, 0.6], [-0.3, 0.8], [0.9, -0.1], [0.7, 0.6]])
    with torch.no_grad():
        model.decoder.net[0].weight.copy_(w)
        model.decoder.net[0].bias.copy_(torch.linspace(-1, 1, 6))
        model.raw_scale_unconstrained.fill_(-0.4328)  # softplus^-1(0.5): pixel sd 0.5
    sigma = torch.nn.functional.softplus(model.raw_scale_unconstrained).detach()
    b = model.decoder.net[0].bias.detach()
    z = torch.randn(n, 2)
    x = z @ w.T + b + sigma * torch.randn(n, 6)
    cov = w @ w.T + torch.diag(sigma.square())
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x).double()
    prec = torch.eye(2) + w.T @ torch.diag(sigma.square().reciprocal()) @ w
    mean = torch.linalg.solve(prec, w.T @ torch.diag(sigma.square().reciprocal()) @ (x - b).T).T
    kl_best = 0.5 * (torch.log(torch.diagonal(prec)).sum() - torch.logdet(prec))
    return model, x, log_px, mean, prec, float(kl_best)


def test_vae_marginal_likelihood_is_exact_with_the_exact_posterior():
    model, x, log_px, mean, prec, _ = linear_gaussian_vae()
    cov = torch.linalg.inv(prec)

    def posterior(x, subsample=None, n=None):
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            pyro.sample("z", dist.MultivariateNormal(mean[idx], cov))

    est = importance_estimate(model, posterior, N, 20, model_kwargs={"x": x})
    assert torch.allclose(est.iwae, log_px, atol=2e-4)


def test_vae_iwae_of_the_best_mean_field_guide():
    """ELBO of the optimal diagonal guide = log p(x) - KL_best (closed form); IWAE(2000) recovers log p(x)."""
    model, x, log_px, mean, prec, kl_best = linear_gaussian_vae()
    sd = torch.diagonal(prec).rsqrt().expand_as(mean)
    guide = MeanFieldLatentGuide(mean, sd)
    pyro.set_rng_seed(2)
    est = importance_estimate(model, guide, N, 2000, model_kwargs={"x": x})
    assert float(est.elbo.mean()) == pytest.approx(float(log_px.mean()) - kl_best, abs=0.01)
    assert float(est.iwae.mean()) == pytest.approx(float(log_px.mean()), abs=0.01)


def test_amortization_gap_against_the_exact_mean_field_optimum():
    """With the decoder fixed, the per-sample mean-field guide reaches the best diagonal-Gaussian ELBO (known in
    closed form), the decoder and the encoder are untouched, and the decoder is trainable again afterwards with no
    gradients left on it (it is frozen for the fit, not copied)."""
    model, x, log_px, _, _, kl_best = linear_gaussian_vae()
    guide = VAEGuide((6,), 2, hidden=[8])  # untrained: a poor amortized posterior
    pyro.set_rng_seed(1)
    importance_log_weights(model, guide, N, 1, {"x": x})  # registers the parameters
    decoder_before = {k: v.clone() for k, v in model.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in guide.state_dict().items()}
    gap = amortization_gap(model, guide, x, steps=300, lr=0.1, particles=256)
    best = float(log_px.mean()) - kl_best
    assert gap["elbo_meanfield"] == pytest.approx(best, abs=0.05)
    assert gap["amortization_gap"] > 1.0
    for module, before in ((model, decoder_before), (guide, encoder_before)):
        assert module.state_dict().keys() == before.keys()
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in guide.parameters())
    assert not pyro.get_param_store().keys()  # parameters live in the modules, never in Pyro's global store
