"""C2ST, SBC, coverage and the exact box-posterior sampler, against known answers."""
import numpy as np
import pytest
import torch
from scipy import stats

from physppl.inference.calibration import (box_posterior_rejection_sample, c2st, coverage, mean_error,
                                           rank_uniformity, sbc_ranks)


def test_c2st_separates_different_samples_only():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1500, 3)), rng.normal(size=(1500, 3))
    assert c2st(a, b) == pytest.approx(0.5, abs=0.05)
    assert c2st(a, b + np.array([3.0, 0, 0])) > 0.9
    with pytest.raises(ValueError, match="same number of columns"):
        c2st(a, b[:, :2])


def _gaussian_problem(n, bias=0.0, seed=0):
    """theta ~ N(0, 1), x ~ N(theta, 1): posterior N(x / 2, 1 / 2)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn((n, 2), generator=gen)
    x = theta + torch.randn((n, 2), generator=gen)

    def sample(xb, m):
        return xb / 2 + bias + np.sqrt(0.5) * torch.randn((m,) + xb.shape)

    return theta, x, sample


def test_sbc_accepts_the_exact_posterior_and_rejects_a_biased_one():
    theta, x, exact = _gaussian_problem(400)
    ranks = sbc_ranks(theta, x, exact, n_draws=99)
    assert ranks.shape == (400, 2) and ranks.min() >= 0 and ranks.max() <= 99
    good = rank_uniformity(ranks, 99)
    assert (good["ks_p"] > 0.01).all() and good["hist"].sum(1).tolist() == [400, 400]
    _, _, biased = _gaussian_problem(400, bias=0.5)
    bad = rank_uniformity(sbc_ranks(theta, x, biased, n_draws=99), 99)
    assert (bad["ks_p"] < 1e-4).all()


def test_coverage_of_the_exact_posterior_is_nominal():
    theta, x, exact = _gaussian_problem(2000)
    cov = coverage(exact(x, 400), theta)
    for level, frac in cov.items():
        assert frac == pytest.approx(np.full(2, level), abs=3.5 * np.sqrt(level * (1 - level) / 2000))
    assert mean_error(np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]]))[0] == pytest.approx(1.0)


def test_rejection_sampler_is_exact_on_a_truncated_normal():
    """Uniform box prior and a Gaussian likelihood: the posterior is a product of truncated normals."""
    low, high = torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0])
    x = torch.tensor([0.97, 0.1], dtype=torch.float64)
    sd = torch.tensor([0.05, 0.3], dtype=torch.float64)
    torch.manual_seed(0)
    draws, info = box_posterior_rejection_sample(lambda th: torch.distributions.Normal(th, sd).log_prob(x).sum(-1),
                                                 low, high, 20000)
    assert draws.shape == (20000, 2) and info["acceptance"] > 0.05
    for d in range(2):
        lo, hi = float(low[d]), float(high[d])
        exact = stats.truncnorm((lo - x[d].item()) / sd[d].item(), (hi - x[d].item()) / sd[d].item(),
                                loc=x[d].item(), scale=sd[d].item())
        assert stats.kstest(draws[:, d].numpy(), exact.cdf).pvalue > 0.01
