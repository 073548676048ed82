"""Shapes and site bookkeeping of the merging model and guide, for every scale, likelihood and family."""
import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from physppl.merging.data import initial_estimates, prepare
from physppl.guides.merging import FAMILIES, MergingGuide
from physppl.merging.weighted_mean import ScaledWeightedMean
from physppl.models.components import scale as S
from physppl.models.components.likelihoods import LaplaceLikelihood, NormalLikelihood, StudentTLikelihood
from physppl.models.merging import MergingModel

SCALES = {
    "mlp": S.MLPScale,
    "image": S.ImageScale,
    "image_b": lambda **kw: S.ImageScale(b_factor=True, **kw),
    "bfactor": S.BFactorScale,
    "fixed": S.FixedScale,
    "composite": lambda **kw: S.CompositeScale([S.MLPScale, S.ImageScale], **kw),
}


@pytest.fixture(scope="module")
def data(small_sim):
    ds, _ = small_sim
    return prepare(ds, anomalous=True)


@pytest.fixture(scope="module")
def init(data):
    return initial_estimates(data)


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("likelihood", [NormalLikelihood(), StudentTLikelihood(4.0), LaplaceLikelihood()])
def test_model_and_guide_shapes(data, init, scale, likelihood):
    model = MergingModel(**data.model_init(), scale=SCALES[scale], likelihood=likelihood)
    guide = MergingGuide(init["F"].to_numpy(), init["SIGF"].to_numpy())
    kwargs = data.model_kwargs()
    gtr = poutine.trace(guide).get_trace(**kwargs)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(**kwargs)
    assert mtr.nodes["F"]["value"].shape == (data.n_refl,)
    assert mtr.nodes["I"]["value"].shape == (data.n_obs,)
    assert mtr.nodes["I"]["is_observed"]
    latents = {n for n, s in mtr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
               and not n in ("refl", "obs")}
    guide_sites = {n for n, s in gtr.nodes.items() if s["type"] == "sample" and n not in ("refl",)}
    assert guide_sites == latents == {"F"}
    mtr.compute_log_prob()
    assert torch.isfinite(mtr.log_prob_sum())
    # subsampling the observation plate keeps the reflection plate whole
    idx = torch.arange(0, data.n_obs, 7)
    sub = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(**kwargs, subsample=idx)
    assert sub.nodes["I"]["value"].shape == idx.shape
    assert sub.nodes["F"]["value"].shape == (data.n_refl,)


def test_image_scale_adds_smoothness_factor(data):
    model = MergingModel(**data.model_init(), scale=S.ImageScale)
    tr = poutine.trace(model).get_trace(**data.model_kwargs())
    assert "image_scale_smoothness" in tr.nodes


def test_prior_predictive_matches_wilson_mean_intensity(data):
    """With unit scale, simulated intensities average epsilon * Sigma_N per reflection."""
    model = MergingModel(**data.model_init(), scale=S.FixedScale)
    kwargs = {**data.model_kwargs(), "intensity": None}
    sims = torch.stack([model(**kwargs) for _ in range(200)])
    expected = (data.epsilon * data.sigma_n)[data.refl]
    ratio = sims.mean() / expected.mean()
    assert abs(ratio.item() - 1) < 0.05


def test_prepare_maps_to_asu_and_splits_friedel(small_sim):
    ds, truth = small_sim
    merged = prepare(ds, anomalous=False)
    anom = prepare(ds, anomalous=True)
    assert merged.n_obs == anom.n_obs == len(ds)
    assert set(np.unique(merged.friedel)) == {0}
    assert set(np.unique(anom.friedel)) <= {-1, 0, 1}
    # centric reflections are never split; acentric ones get up to two entries
    assert not anom.centric[torch.as_tensor(anom.friedel != 0)].any()
    assert merged.n_refl < anom.n_refl <= 2 * merged.n_refl
    assert abs(float(merged.intensity.mean()) - 1.0) < 1e-5  # normalised units
    truth_hkl = set(map(tuple, truth.get_hkls()))
    assert set(map(tuple, merged.hkl)) <= truth_hkl


def test_split_halves_by_image(small_sim):
    ds, _ = small_sim
    data = prepare(ds)
    halves = data.split_halves(seed=0)
    assert set(np.unique(halves.half)) == {0, 1}
    # each half-reflection holds observations from images of one half only
    image_half = {}
    for r, img in zip(halves.refl.numpy(), halves.image.numpy()):
        image_half.setdefault(img, halves.half[r])
        assert image_half[img] == halves.half[r]


def test_weighted_mean_recovers_block_scales_and_rejects_outliers():
    rng = np.random.default_rng(0)
    n_groups, n_obs = 400, 6000
    mu = rng.exponential(10.0, n_groups) + 1.0
    group = rng.integers(0, n_groups, n_obs)
    image = rng.integers(0, 100, n_obs)
    true_log_k = 0.3 * np.sin(np.arange(100) / 15.0)
    k = np.exp(true_log_k)[image]
    sigma = 0.05 * mu[group] + 0.1
    y = k * mu[group] + sigma * rng.normal(size=n_obs)
    bad = rng.random(n_obs) < 0.01
    y[bad] += 50 * sigma[bad]
    res = ScaledWeightedMean(block_size=1, outlier_z=6.0).fit(y, sigma, group, image, n_groups)
    fitted = res.log_scale - res.log_scale.mean()
    truth = np.log(k) - np.log(k).mean()
    assert np.abs(fitted - truth).max() < 0.03
    scale = np.exp(np.mean(np.log(res.mean / mu)))  # overall scale is a free gauge
    assert np.median(np.abs(res.mean / scale - mu) / res.sd) < 1.0
    assert res.outlier[bad].mean() > 0.9 and res.outlier[~bad].mean() < 0.01


def test_scale_prior_is_counted_once(data):
    """The smoothness factor is a global prior term: it must not be multiplied by the number of observations."""
    model = MergingModel(**data.model_init(), scale=lambda **kw: S.ImageScale(smoothness=0.1, **kw))
    with torch.no_grad():
        model.scale.log_k = pyro.nn.PyroParam(torch.linspace(0, 1, data.n_images))
    tr = poutine.trace(model).get_trace(**data.model_kwargs())
    tr.compute_log_prob()
    expected = -0.5 * (torch.linspace(0, 1, data.n_images).diff().square().sum() / 0.1**2)
    assert torch.allclose(tr.nodes["image_scale_smoothness"]["log_prob_sum"], expected, rtol=1e-5)


def test_missing_detector_metadata_is_skipped_but_other_columns_are_errors(small_sim):
    from physppl.io.mtz import MTZInputError

    ds = small_sim[0].drop(columns=["XDET", "YDET"])
    data = prepare(ds)
    assert data.feature_names == ["BATCH", "dHKL"] and data.n_features == 2
    with pytest.raises(MTZInputError, match="LP"):
        prepare(ds, metadata=["BATCH", "LP"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_guide_family_traces_with_the_model(data, init, family):
    model = MergingModel(**data.model_init(), scale=S.FixedScale)
    guide = MergingGuide(init["F"].to_numpy(), init["SIGF"].to_numpy(), family=family)
    kwargs = data.model_kwargs()
    gtr = poutine.trace(guide).get_trace(**kwargs)
    assert gtr.nodes["F"]["value"].shape == (data.n_refl,)
    assert (gtr.nodes["F"]["value"] >= 0).all()
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(**kwargs)
    gtr.compute_log_prob()
    mtr.compute_log_prob()
    elbo = mtr.log_prob_sum() - gtr.log_prob_sum()
    assert torch.isfinite(elbo)
    for k, v in guide.moments().items():
        assert v.shape == (data.n_refl,) and torch.isfinite(v).all(), k


def test_french_wilson_moments_match_numerical_integration():
    """The quadrature of physppl.merging.french_wilson against scipy's adaptive integration of the same posterior,
    for strong, weak and negative intensities, acentric and centric (agreement to 1e-5 of a posterior sd)."""
    from scipy.integrate import quad

    from physppl.merging.french_wilson import french_wilson_moments

    rng = np.random.default_rng(0)
    n = 60
    wilson = rng.uniform(0.5, 50, n)
    centric = rng.random(n) < 0.3
    s = rng.uniform(0.05, 20, n)
    i = np.concatenate([rng.normal(0, 3, n // 3) * s[: n // 3], rng.exponential(wilson[n // 3:])])
    out = french_wilson_moments(i, s, wilson, centric)
    for k in range(n):
        c = 2.0 if centric[k] else 1.0
        grid = np.linspace(0, np.sqrt(max(i[k], 0) + 60 * s[k] + 60 * wilson[k]), 100_001)
        log_p = -((grid**2 - i[k]) ** 2) / (2 * s[k] ** 2) - grid**2 / (c * wilson[k])
        log_p += 0.0 if centric[k] else np.log(np.maximum(grid, 1e-300))
        top = log_p.max()
        lo, hi = grid[log_p > top - 60][[0, -1]]

        def moment(p):
            def f(x):
                lp = -((x * x - i[k]) ** 2) / (2 * s[k] ** 2) - x * x / (c * wilson[k])
                lp += 0.0 if centric[k] else np.log(max(x, 1e-300))
                return x**p * np.exp(lp - top)
            return quad(f, lo, hi, limit=400, epsabs=0, epsrel=1e-11)[0]

        z, m1, m2, m4 = (moment(p) for p in (0, 1, 2, 4))
        f_mean, i_mean = m1 / z, m2 / z
        f_sd, i_sd = np.sqrt(i_mean - f_mean**2), np.sqrt(m4 / z - i_mean**2)
        assert abs(out["F"][k] - f_mean) < 1e-5 * f_sd and abs(out["SIGF"][k] / f_sd - 1) < 1e-5
        assert abs(out["I"][k] - i_mean) < 1e-5 * i_sd and abs(out["SIGI"][k] / i_sd - 1) < 1e-5
    with pytest.raises(ValueError, match="must be positive"):
        french_wilson_moments([1.0], [0.0], [1.0], [False])