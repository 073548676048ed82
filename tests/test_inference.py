"""Engines that know no physics, checked on a conjugate model with an exact posterior."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.optim import ClippedAdam

from physppl.inference.convert import draw_from_guide, site_dims, to_inference_data
from physppl.inference.nuts import NUTSEngine
from physppl.inference.svi import SVIEngine, TrainingDivergedError

PRIOR_SD = 10.0


def model(y, subsample=None):
    """mu ~ Normal(0, 10) with shape (); y ~ Normal(mu, 1), shape (n,), plate "data"."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", y.shape[0], subsample=subsample) as idx:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


def exact(y):
    prec = 1 / PRIOR_SD**2 + len(y)
    return float(y.sum() / prec), math.sqrt(1 / prec)


@pytest.fixture
def y():
    return 1.5 + torch.randn(400, generator=torch.Generator().manual_seed(0))


def point_guide(y, subsample=None):
    """q(mu) = Normal(loc, scale); no random initialisation, so runs are reproducible step by step."""
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def _engine(**kw):
    # lr decays to 0.05 * 0.998^1500 = 0.0025, so the final iterate sits close to the optimum
    args = dict(optim=ClippedAdam({"lr": 0.05, "lrd": 0.998}), max_steps=1500, min_steps=1500, progress=False, checkpoint_every=0)
    args.update(kw)
    return SVIEngine(**args)


@pytest.mark.parametrize("batch_size", [None, 100])
def test_svi_recovers_exact_posterior(y, tmp_path, batch_size):
    guide = AutoNormal(model)
    res = _engine(batch_size=batch_size).run(model, guide, n_data=len(y), workdir=tmp_path, y=y)
    mean, sd = exact(y)
    loc, scale = guide.median()["mu"].item(), pyro.param("AutoNormal.scales.mu").item()
    # tolerance: a fifth of a posterior sd on the mean (minibatch noise included), 15% on the sd
    assert abs(loc - mean) < 0.2 * sd
    assert abs(scale / sd - 1) < 0.15
    assert res.steps == 1500 and np.isfinite(res.final_loss)


def test_svi_stops_on_convergence(y, tmp_path):
    res = _engine(min_steps=100, rtol=1e-3, window=50).run(model, AutoNormal(model), n_data=len(y), workdir=tmp_path, y=y)
    assert res.converged and res.steps < 1500
    assert "converged" in res.stop_reason


def test_svi_detects_divergence_and_names_the_step(tmp_path):
    bad = torch.tensor([1.0, float("inf"), 2.0])
    with pytest.raises(TrainingDivergedError, match=r"at step 1\b"):
        _engine().run(model, AutoNormal(model), n_data=3, workdir=tmp_path, y=bad)


def test_checkpoint_resume_matches_uninterrupted_run(y, tmp_path):
    pyro.set_rng_seed(3)
    _engine(max_steps=300, min_steps=300).run(model, point_guide, workdir=tmp_path / "a", y=y)
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    _engine(max_steps=200, min_steps=300, checkpoint_every=100).run(model, point_guide, workdir=tmp_path / "b", y=y)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    pyro.clear_param_store()
    pyro.set_rng_seed(99)  # the checkpoint restores the RNG state too
    res = _engine(max_steps=300, min_steps=300, resume=True).run(model, point_guide, workdir=tmp_path / "b", y=y)
    assert res.resumed_from == 200 and res.steps == 300 and len(res.losses) == 300
    for k, v in expected.items():
        assert torch.allclose(pyro.param(k).detach(), v, atol=1e-5), k


def test_resume_restores_torch_modules_registered_with_pyro_module(y, tmp_path):
    """pyro.module keeps the module's own Parameter objects in the store: resume must update those in place."""
    holder = {}

    def net_guide(y, subsample=None):
        out = pyro.module("net", holder["net"])(torch.ones(1))
        pyro.sample("mu", dist.Normal(out[0], torch.nn.functional.softplus(out[1])))

    def new_process(seed):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        torch.manual_seed(seed)
        holder["net"] = torch.nn.Linear(1, 2)  # built afresh, as a new process would

    new_process(5)
    _engine(max_steps=200, min_steps=200).run(model, net_guide, workdir=tmp_path / "a", y=y)
    expected = holder["net"](torch.ones(1)).detach().clone()
    new_process(5)
    _engine(max_steps=120, min_steps=200, checkpoint_every=60).run(model, net_guide, workdir=tmp_path / "b", y=y)
    new_process(99)  # other initial weights: only the checkpoint can bring the module back
    _engine(max_steps=200, min_steps=200, resume=True).run(model, net_guide, workdir=tmp_path / "b", y=y)
    assert torch.allclose(holder["net"](torch.ones(1)).detach(), expected, atol=1e-5)


def test_resume_without_checkpoint_is_a_clear_error(y, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _engine(resume=True).run(model, AutoNormal(model), workdir=tmp_path, y=y)


def test_nuts_recovers_exact_posterior_and_converts(y):
    res = NUTSEngine(num_samples=300, warmup_steps=200, num_chains=2, progress=False).run(model, y=y[:50])
    mean, sd = exact(y[:50])
    draws = res.samples["mu"]
    assert draws.shape == (2, 300)
    # 600 draws: Monte Carlo error of the mean ~ sd/sqrt(ESS); allow 0.25 sd
    assert abs(draws.mean().item() - mean) < 0.25 * sd
    assert abs(draws.std().item() / sd - 1) < 0.2
    idata = to_inference_data(model, {"y": y[:50]}, res.samples, sample_stats={"diverging": res.diverging})
    assert idata.posterior["mu"].dims == ("chain", "draw")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")
    assert idata.observed_data["y"].shape == (50,)
    assert idata.sample_stats["diverging"].shape == (2, 300)
    # pointwise log-likelihood equals the Normal density at each draw
    ll = idata.log_likelihood["y"].values[1, 7]
    ref = dist.Normal(draws[1, 7], 1.0).log_prob(y[:50]).numpy()
    assert np.allclose(ll, ref, atol=1e-5)


def test_guide_draws_have_plate_dims():
    def plated(n=5, subsample=None):
        with pyro.plate("refl", n):
            pyro.sample("F", dist.HalfNormal(torch.ones(n)))

    def guide(n=5, subsample=None):
        with pyro.plate("refl", n):
            pyro.sample("F", dist.LogNormal(torch.zeros(n), 0.1))

    tr = pyro.poutine.trace(plated).get_trace()
    assert site_dims(tr) == {"F": ["refl"]}
    draws = draw_from_guide(guide, {}, 40, ["F"])
    assert draws["F"].shape == (1, 40, 5)
    idata = to_inference_data(plated, {}, draws, log_likelihood=False)
    assert idata.posterior["F"].dims == ("chain", "draw", "refl")


def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(y, tmp_path, monkeypatch):
    from pyro.infer import SVI

    calls = {"n": 0}
    real_step = SVI.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(SVI, "step", step)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 39.*resume=true"):
        _engine(max_steps=100).run(model, point_guide, workdir=tmp_path, y=y)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 39 and len(state["losses"]) == 39


def test_block_minibatches_are_contiguous_and_cover_every_index():
    engine = _engine(batch_size=3, batch_order="blocks")
    batches = engine._batches(10, torch.Generator().manual_seed(0))
    epoch = [next(batches) for _ in range(3)]
    assert all(torch.equal(b, torch.arange(int(b[0]), int(b[0]) + 3)) for b in epoch)
    assert sorted(int(b[0]) for b in epoch) == [0, 3, 6]
    with pytest.raises(ValueError, match="batch_order"):
        _engine(batch_order="sorted")


def test_callback_stops_training_with_its_reason(y, tmp_path):
    seen = []

    def every_50(step, losses):
        seen.append((step, len(losses)))
        return f"early stop at {step}" if step == 120 else None

    res = _engine(max_steps=500).run(model, point_guide, workdir=tmp_path, callback=every_50, y=y)
    assert res.steps == 120 and res.stop_reason == "early stop at 120" and not res.converged
    assert seen[0] == (1, 1) and seen[-1] == (120, 120)


def test_no_workdir_writes_no_checkpoint(y, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _engine(max_steps=20, checkpoint_every=5).run(model, point_guide, y=y)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _engine(resume=True).run(model, point_guide, y=y)


def test_resolve_device():
    from physppl.inference.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
