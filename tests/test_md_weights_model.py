"""Frame-weighting model pieces: the diffuse prediction, the simplex transforms, the nested Dirichlet, shapes."""
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import biject_to

from physppl.guides.md_weights import DirichletFrameGuide, logistic_normal_guide
from physppl.models.components.nested_dirichlet import NestedDirichlet
from physppl.models.components.simplex import CentredDirichlet, SoftmaxCenteredTransform
from physppl.models.md_weights import (FrameFactors, FrameWeightsModel, bragg_intensity, diffuse_intensity,
                                       dirichlet_concentration, effective_frames, pearson_cc)


def _random_frames(T=5, R=40, n_vox=15, complex_=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    re = 10 + torch.randn(R, T, generator=g, dtype=torch.float64)  # a large mean: centring must not matter
    im = torch.randn(R, T, generator=g, dtype=torch.float64) if complex_ else None
    voxel = torch.cat([torch.arange(n_vox), torch.randint(0, n_vox, (R - n_vox,), generator=g)])
    return re, im, voxel


@pytest.mark.parametrize("complex_", [True, False])
def test_diffuse_and_bragg_intensity_match_direct_formula(complex_):
    re, im, voxel = _random_frames(complex_=complex_)
    ff = FrameFactors(re, im, voxel)
    w = dist.Dirichlet(torch.ones(5, dtype=torch.float64)).sample()
    F = re + 1j * (im if im is not None else torch.zeros_like(re))
    # direct: x'(h) = sum_t w|F|^2 - |sum_t w F|^2 per P1 row, then the mean over rows of each observed voxel
    x_rows = (w * F.abs() ** 2).sum(-1) - (F * w).sum(-1).abs() ** 2
    b_rows = (F * w).sum(-1).abs() ** 2
    expect_x = torch.zeros(15, dtype=torch.float64).index_add(0, voxel, x_rows) / torch.bincount(voxel)
    expect_b = torch.zeros(15, dtype=torch.float64).index_add(0, voxel, b_rows) / torch.bincount(voxel)
    assert torch.allclose(diffuse_intensity(w, ff.block()), expect_x, rtol=1e-10)
    assert torch.allclose(bragg_intensity(w, ff.block()), expect_b, rtol=1e-10)
    # a subset of observed voxels gives the same values for those voxels; a contiguous range slices without a copy
    idx = torch.tensor([3, 0, 11])
    assert torch.allclose(diffuse_intensity(w, ff.block(idx)), expect_x[idx], rtol=1e-10)
    block = ff.block(torch.arange(4, 9))
    assert block.re.data_ptr() == ff.re[int(ff.offsets[4])].data_ptr()
    assert torch.allclose(diffuse_intensity(w, block), expect_x[4:9], rtol=1e-10)
    # batched weights (particles x plate slot) map to (particles, voxels)
    wb = dist.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((4, 1))
    assert diffuse_intensity(wb, ff.block(idx)).shape == (4, 3)


def test_centring_keeps_float32_accuracy_when_the_mean_dominates():
    re, im, voxel = _random_frames()
    re = re * 0.01 + 1000.0  # |<F>| ~ 1000, spread ~ 0.01: x' ~ 1e-4 of |F|^2
    w = torch.full((5,), 0.2, dtype=torch.float64)
    exact = diffuse_intensity(w, FrameFactors(re, im, voxel).block())
    single = diffuse_intensity(w.float(), FrameFactors(re.float(), im.float(), voxel).block())
    assert torch.allclose(single.double(), exact, rtol=1e-4)


def test_two_frames_relative_prediction_does_not_depend_on_the_split():
    re, im, voxel = _random_frames(T=2)
    ff = FrameFactors(re.float(), im.float(), voxel)
    model = FrameWeightsModel(ff, torch.zeros(15, dtype=torch.long))
    x1, _ = model.predictions(torch.tensor([0.3, 0.7]))
    x2, _ = model.predictions(torch.tensor([0.9, 0.1]))
    # x' = w1 w2 |F_A - F_B|^2: the split only scales the map, and x'/mean(x') removes the scale
    assert torch.allclose(x1, x2, rtol=1e-5)
    _, b1 = model.predictions(torch.tensor([0.3, 0.7]), bragg=True)
    _, b2 = model.predictions(torch.tensor([0.7, 0.3]), bragg=True)
    assert not torch.allclose(b1, b2, rtol=1e-2)  # Bragg intensities do tell p from 1 - p


def test_softmax_centred_transform():
    t = SoftmaxCenteredTransform()
    x = torch.randn(3, 4, dtype=torch.float64)
    y = t(x)
    assert y.shape == (3, 5) and torch.allclose(y.sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(t.inv(y), x)
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda z: t(z)[:-1], x[i])
        assert math.isclose(torch.logdet(J).item(), t.log_abs_det_jacobian(x[i], y[i]).item(), rel_tol=1e-9)
    assert isinstance(biject_to(CentredDirichlet(torch.ones(5)).support), SoftmaxCenteredTransform)
    assert not isinstance(biject_to(dist.Dirichlet(torch.ones(5)).support), SoftmaxCenteredTransform)


def test_nested_dirichlet_contains_the_dirichlet_and_has_right_moments():
    alpha = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.7, 1.5], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 1, 2])
    a = torch.zeros(3, dtype=torch.float64).index_add(0, group, alpha)
    nested = NestedDirichlet(a, alpha, group)
    w = dist.Dirichlet(alpha).sample((6,))
    assert torch.allclose(nested.log_prob(w), dist.Dirichlet(alpha).log_prob(w), atol=1e-9)
    draws = nested.rsample((100_000,))
    assert torch.allclose(draws.sum(-1), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(draws.mean(0), nested.mean, atol=3e-3)
    assert torch.allclose(draws.var(0), dist.Dirichlet(alpha).variance, rtol=0.05)
    # a tight group mass and a loose split: something a single Dirichlet cannot express
    loose = NestedDirichlet(torch.tensor([5000.0, 5000.0]), torch.ones(4), torch.tensor([0, 0, 1, 1]))
    d = loose.rsample((20_000,))
    assert d[:, :2].sum(-1).std() < 0.01 and d[:, 0].std() > 0.1


def test_nested_dirichlet_reparameterised_gradients():
    a = torch.tensor([2.0, 3.0], requires_grad=True)
    b = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    nd = NestedDirichlet(a, b, torch.tensor([0, 1, 1]))
    (nd.rsample((10,))[:, 0].sum() + nd.log_prob(nd.rsample()).sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and (a.grad != 0).any()


def test_dirichlet_concentration_is_the_maximum_entropy_prior():
    w0 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    conc = dirichlet_concentration(4, strength=2.5, prior_weights=w0).double()
    assert torch.allclose(conc, 1 + 2.5 * 4 * w0)
    ws = dist.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((5,))
    kl = (w0 * (w0.log() - ws.log())).sum(-1)
    diff = dist.Dirichlet(conc).log_prob(ws) + 2.5 * 4 * kl  # log Dir(w; 1 + cTw0) = -cT KL(w0||w) + const
    assert torch.allclose(diff, diff[0].expand(5), atol=1e-9)
    assert torch.equal(dirichlet_concentration(4), torch.ones(4))  # c = 0: the flat Dirichlet
    with pytest.raises(ValueError, match=">= 0"):
        dirichlet_concentration(4, strength=-1.0)
    with pytest.raises(ValueError, match="3 entries but there are 4 frames"):
        dirichlet_concentration(4, prior_weights=[0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="finite and positive"):
        dirichlet_concentration(2, prior_weights=[1.0, 0.0])


def test_pearson_cc_and_effective_frames():
    x, y = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert math.isclose(pearson_cc(x, y).item(), np.corrcoef(x, y)[0, 1], rel_tol=1e-9)
    assert math.isclose(pearson_cc(3 * x + 1, x).item(), 1.0, rel_tol=1e-12)
    assert math.isclose(effective_frames(torch.tensor([0.5, 0.5, 0.0, 0.0])).item(), 2.0)


def _tiny_model(bragg=True, **kw):
    re, im, voxel = _random_frames(T=6, R=60, n_vox=20)
    ff = FrameFactors(re.float(), im.float(), voxel)
    shell = torch.arange(20) % 3
    model = FrameWeightsModel(ff, shell, bragg=bragg, **kw)
    with torch.no_grad():
        y = 1.0 + torch.randn(20).abs()
    data = {"y": y, "sigma": torch.full((20,), 0.1), "y_bragg": torch.where(torch.arange(20) == 4, torch.nan, y),
            "sigma_bragg": torch.full((20,), 0.1)}
    return model, data


@pytest.mark.parametrize("guide_kind", ["dirichlet", "dirichlet_groups", "logistic_normal"])
def test_model_and_guide_shapes(guide_kind):
    model, data = _tiny_model(likelihood="student_t")
    if guide_kind == "logistic_normal":
        guide = logistic_normal_guide(model, rank=3)
    else:
        guide = DirichletFrameGuide(model, groups=[0, 0, 1, 1, 2, 2] if guide_kind == "dirichlet_groups" else None)
    tr = poutine.trace(model).get_trace(**data, subsample=torch.tensor([1, 5, 7]))
    assert tr.nodes["w"]["value"].shape == (6,)
    assert tr.nodes["noise"]["value"].shape == (3,)
    assert tr.nodes["y"]["value"].shape == (3,) and tr.nodes["y_bragg"]["value"].shape == (3,)
    gtr = poutine.trace(guide).get_trace(**data)
    latents = {n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n not in ("voxel", "shell")}
    guided = {n for n, s in gtr.nodes.items() if s["type"] == "sample" and not n.startswith("_") and n not in ("voxel", "shell")}
    assert guided == latents == {"w", "scale", "offset", "noise", "bragg_scale", "bragg_noise"}
    # vectorised particles: one pass over the frames for all of them
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, **data)
    assert torch.isfinite(loss)
    loss.backward()


def test_missing_bragg_values_are_masked():
    model, data = _tiny_model()
    tr = poutine.trace(model).get_trace(**data)
    tr.compute_log_prob()
    lp = tr.nodes["y_bragg"]["log_prob"]
    assert lp[4] == 0 and torch.isfinite(lp).all()


def test_model_rejects_bad_options():
    re, im, voxel = _random_frames()
    ff = FrameFactors(re, im, voxel)
    with pytest.raises(ValueError, match="likelihood"):
        FrameWeightsModel(ff, torch.zeros(15, dtype=torch.long), likelihood="cauchy")
    with pytest.raises(ValueError, match="needs sigmas"):
        FrameWeightsModel(ff, torch.zeros(15, dtype=torch.long), noise="data", has_sigma=False)
    with pytest.raises(ValueError, match="no frame structure factor"):
        FrameFactors(re, im, voxel + 1)


def test_nested_prior_is_flat_over_states_whatever_their_size():
    re, im, voxel = _random_frames(T=6)
    ff = FrameFactors(re.float(), im.float(), voxel)
    labels = [0, 0, 0, 0, 1, 2]  # a state of four frames, two of one
    nested = FrameWeightsModel(ff, torch.zeros(15, dtype=torch.long), groups=labels)
    flat = FrameWeightsModel(ff, torch.zeros(15, dtype=torch.long), groups=labels, prior="dirichlet")
    assert isinstance(nested.weights_prior(), NestedDirichlet) and isinstance(flat.weights_prior(), CentredDirichlet)
    mean, sd = nested.state_mass_prior(labels, 3)
    assert np.allclose(mean, 1 / 3) and np.allclose(sd, np.sqrt((1 / 3) * (2 / 3) / 4))
    mean, _ = flat.state_mass_prior(labels, 3)  # the flat Dirichlet over frames: mass follows the frame count
    assert np.allclose(mean, [4 / 6, 1 / 6, 1 / 6])
    draws = nested.weights_prior().sample((20000,))
    assert abs(float(draws[:, :4].sum(-1).mean()) - 1 / 3) < 0.01
    with pytest.raises(ValueError, match="must be the model's groups"):
        nested.state_mass_prior([0, 1, 0, 1, 0, 1], 2)


def test_guide_rejects_wrong_group_length():
    model, _ = _tiny_model()
    with pytest.raises(ValueError, match="one label per frame"):
        DirichletFrameGuide(model, groups=[0, 1])


def test_a_single_state_has_no_contraction_and_is_not_called_unidentified():
    """One state has mass 1 under any weights: its prior sd is 0, so the contraction is undefined (NaN), not a
    ratio of rounding errors, and the state is not reported as unidentified."""
    from physppl.md_weights.analysis import state_table

    draws = np.random.default_rng(0).dirichlet(np.ones(4), size=200)
    table = state_table(draws, np.zeros(4, dtype=int), ["state0"], (np.array([1.0]), np.array([0.0])))
    assert table["mean"].iloc[0] == pytest.approx(1.0) and np.isnan(table["contraction"].iloc[0])
    assert not (table["contraction"] < 0.5).any()
