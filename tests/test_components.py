"""Wilson prior, likelihood families, guide families: densities, moments and sampling against numerics."""
import math

import numpy as np
import pytest
import torch

from physppl.guides.merging import FAMILIES, MergingGuide
from physppl.guides.truncated_normal import PositiveTruncatedNormal
from physppl.models.components.likelihoods import LaplaceLikelihood, NormalLikelihood, StudentTLikelihood
from physppl.models.components.wilson import Wilson, wilson_prior, wilson_sigma_by_resolution


def _integrate(d, upper):
    grid = torch.linspace(1e-6, upper, 400001, dtype=torch.float64)
    dens = d.log_prob(grid[:, None]).exp()
    dx = grid[1] - grid[0]
    return (dens * dx).sum(0), (dens * grid[:, None] ** 2 * dx).sum(0)


def test_wilson_density_normalises_and_has_mean_intensity_sigma():
    sigma = torch.tensor([0.5, 2.0, 0.5, 2.0], dtype=torch.float64)
    centric = torch.tensor([False, False, True, True])
    mass, second = _integrate(Wilson(sigma, centric), 40.0)
    assert torch.allclose(mass, torch.ones(4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(second, sigma, rtol=1e-3)


def test_wilson_sampling_matches_density():
    torch.manual_seed(0)
    d = Wilson(torch.tensor([1.5, 1.5]), torch.tensor([False, True]))
    x = d.rsample((200_000,))
    assert torch.allclose(x.mean(0), d.mean, rtol=0.01)
    assert torch.allclose(x.square().mean(0), torch.tensor([1.5, 1.5]), rtol=0.01)
    # centric amplitudes are more often weak: P(F^2 < 0.1 Sigma) is 0.095 acentric, 0.248 centric
    weak = (x.square() < 0.15).float().mean(0)
    assert abs(weak[0] - (1 - math.exp(-0.1))) < 0.01
    assert abs(weak[1] - math.erf(math.sqrt(0.05))) < 0.01


def test_wilson_prior_applies_epsilon():
    d = wilson_prior(torch.tensor([False]), torch.tensor([4.0]), torch.tensor([0.5]))
    assert torch.allclose(d.sigma, torch.tensor([2.0]))


def test_wilson_sigma_by_resolution_follows_falloff():
    rng = np.random.default_rng(0)
    d = rng.uniform(2.0, 20.0, 5000)
    truth = 100 * np.exp(-2 * 20.0 / (4 * d**2))
    intensity = truth * rng.exponential(size=d.size)
    est = wilson_sigma_by_resolution(intensity, np.ones_like(d), d)
    assert np.median(np.abs(np.log(est / truth))) < 0.1


@pytest.mark.parametrize("lik", [NormalLikelihood(), StudentTLikelihood(4.0), LaplaceLikelihood()])
def test_likelihood_has_reported_sigma_scale(lik):
    d = lik(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]))
    x = d.sample((200_000,))
    mad = x.abs().median(0).values / torch.tensor([1.0, 2.0, 3.0])
    # median |error| / sigma is 0.674 (Normal), 0.741 (t4), 0.490 (Laplace with sd sigma)
    expected = {"NormalLikelihood": 0.674, "StudentTLikelihood": 0.741, "LaplaceLikelihood": 0.490}[type(lik).__name__]
    assert torch.allclose(mad, torch.full((3,), expected), atol=0.01)


def test_student_t_rejects_bad_dof():
    with pytest.raises(ValueError, match="dof"):
        StudentTLikelihood(0.0)


def test_truncated_normal_normalises_and_moments():
    loc = torch.tensor([-3.0, -0.5, 0.2, 5.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    d = PositiveTruncatedNormal(loc, scale)
    mass, second = _integrate(d, 12.0)
    assert torch.allclose(mass, torch.ones(4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(second, d.raw_moments(2)[1], rtol=1e-3)
    x = d.rsample((100_000,))
    assert (x >= 0).all()
    assert torch.allclose(x.mean(0), d.mean, rtol=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_guide_moments_match_draws(family):
    torch.manual_seed(1)
    # a weak (sd comparable to mean), a medium and a strong amplitude
    mean = torch.tensor([0.3, 0.8, 3.0])
    sd = torch.tensor([0.2, 0.2, 0.3])
    g = MergingGuide(mean, sd, family=family)
    x = g.distribution().rsample((200_000,)).detach()
    m = g.moments()
    assert torch.allclose(x.mean(0), m["F_mean"], rtol=0.02, atol=0.005)
    assert torch.allclose(x.std(0), m["F_sd"], rtol=0.03, atol=0.005)
    assert torch.allclose(x.square().mean(0), m["I_mean"], rtol=0.02, atol=0.005)
    # initialisation honours the requested moments for well-determined amplitudes
    assert abs(m["F_mean"][2] - 3.0) < 0.02 and abs(m["F_sd"][2] - 0.3) < 0.02


def test_guide_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown family"):
        MergingGuide(torch.ones(2), torch.ones(2), family="beta")
    with pytest.raises(ValueError, match="NaN"):
        MergingGuide(torch.tensor([1.0, float("nan")]), torch.ones(2))


def test_likelihood_by_name_for_command_line_sweeps():
    """``model.likelihood=student_t`` (a plain string in a sweep) gives the same model as the config group."""
    from physppl.models.components.likelihoods import StudentTLikelihood, likelihood_from_name

    loc, sigma = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    y = torch.tensor([1.3, 9.0])
    by_name = likelihood_from_name("Student_T")(loc, sigma).log_prob(y)
    torch.testing.assert_close(by_name, StudentTLikelihood()(loc, sigma).log_prob(y))
    assert likelihood_from_name("normal")(loc, sigma).log_prob(y)[1] < by_name[1]  # the outlier costs more
    with pytest.raises(ValueError, match="unknown likelihood 'cauchy'.*normal, student_t, laplace"):
        likelihood_from_name("cauchy")
