"""Engines that know no physics, checked on a conjugate model with an exact posterior."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

import physppl
from physppl.inference.convert import Rescale, guide_draws, site_dims, summarize, to_inference_data
from physppl.inference.fit import Fit, ProtocolError, fit
from physppl.inference.map import MAPEngine
from physppl.inference.nuts import NUTSEngine
from physppl.inference.optim import ClippedAdam
from physppl.inference.interrupt import Interrupted
from physppl.inference.svi import CheckpointError, SVIEngine, TrainingDivergedError

PRIOR_SD = 10.0


class Model(PyroModule):
    """mu ~ Normal(0, 10), shape (); y ~ Normal(mu, 1), shape (n,), plate "data"."""

    def forward(self, y, subsample=None):
        mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        with pyro.plate("data", y.shape[0], subsample=subsample) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


class PointGuide(PyroModule):
    """q(mu) = Normal(loc, scale), starting at (0, 1): no random initialisation, so runs repeat step by step."""

    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.tensor(0.0))
        self.scale = PyroParam(torch.tensor(1.0), dist.constraints.positive)

    def forward(self, y, subsample=None):
        pyro.sample("mu", dist.Normal(self.loc, self.scale))


class NetGuide(PyroModule):
    """q(mu) from a plain torch child module: its parameters are the guide's."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 2)

    def forward(self, y, subsample=None):
        out = self.net(torch.ones(1))
        pyro.sample("mu", dist.Normal(out[0], torch.nn.functional.softplus(out[1])))


def exact(y):
    prec = 1 / PRIOR_SD**2 + len(y)
    return float(y.sum() / prec), math.sqrt(1 / prec)


@pytest.fixture
def y():
    return 1.5 + torch.randn(400, generator=torch.Generator().manual_seed(0))


def _engine(**kw):
    # lr decays to 0.05 * 0.998^1500 = 0.0025, so the final iterate sits close to the optimum
    args = dict(optim=ClippedAdam(lr=0.05, lrd=0.998), max_steps=1500, min_steps=1500, progress=False,
                checkpoint_every=0)
    args.update(kw)
    return SVIEngine(**args)


@pytest.mark.parametrize("batch_size", [None, 100])
def test_svi_recovers_exact_posterior(y, tmp_path, batch_size):
    model, guide = Model(), AutoNormal(Model())
    res = _engine(batch_size=batch_size).run(model, guide, {"y": y}, n_data=len(y), workdir=tmp_path)
    mean, sd = exact(y)
    loc, scale = guide.median()["mu"].item(), guide.scales.mu.item()
    # tolerance: a fifth of a posterior sd on the mean (minibatch noise included), 15% on the sd
    assert abs(loc - mean) < 0.2 * sd
    assert abs(scale / sd - 1) < 0.15
    assert res.steps == 1500 and np.isfinite(res.final_loss)
    assert len(pyro.get_param_store()) == 0  # parameters live in the modules, not in Pyro's global store


def test_fit_returns_draws_in_the_posterior_and_two_fits_share_nothing(y):
    mean, sd = exact(y)
    first = fit(Model(), PointGuide(), {"y": y}, _engine(), n_draws=4000)
    second = fit(Model(), PointGuide(), {"y": y}, _engine(max_steps=50, min_steps=50), n_draws=10)
    assert first.draws["mu"].shape == (1, 4000) and second.draws["mu"].shape == (1, 10)
    draws = first.draws["mu"]
    # 4000 draws: Monte Carlo error of the mean is sd/63; the fit itself is within 0.1 sd
    assert abs(draws.mean().item() - mean) < 0.15 * sd and abs(draws.std().item() / sd - 1) < 0.1
    # the second fit started from its own initial values: its first loss equals the first fit's first loss
    assert second.losses[0] == pytest.approx(first.losses[0], rel=0.2)
    assert first.info["engine"] == "svi" and first.info["steps"] == 1500 and second.info["steps"] == 50


def test_svi_stops_on_convergence(y, tmp_path):
    res = _engine(min_steps=100, rtol=1e-3, window=50).run(Model(), AutoNormal(Model()), {"y": y}, n_data=len(y))
    assert res.converged and res.steps < 1500
    assert "converged" in res.stop_reason


def test_svi_detects_divergence_and_names_the_step():
    bad = torch.tensor([1.0, float("inf"), 2.0])
    with pytest.raises(TrainingDivergedError, match=r"at step 1\b"):
        _engine().run(Model(), PointGuide(), {"y": bad}, n_data=3)


def test_checkpoint_resume_matches_uninterrupted_run(y, tmp_path):
    pyro.set_rng_seed(3)
    guide = PointGuide()
    _engine(max_steps=300, min_steps=300).run(Model(), guide, {"y": y}, workdir=tmp_path / "a")
    expected = {k: v.detach().clone() for k, v in guide.state_dict().items()}

    pyro.set_rng_seed(3)
    _engine(max_steps=200, min_steps=300, checkpoint_every=100).run(Model(), PointGuide(), {"y": y},
                                                                   workdir=tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    pyro.set_rng_seed(99)  # the checkpoint restores the RNG state too
    resumed = PointGuide()
    res = _engine(max_steps=300, min_steps=300, resume=True).run(Model(), resumed, {"y": y}, workdir=tmp_path / "b")
    assert res.resumed_from == 200 and res.steps == 300 and len(res.losses) == 300
    for k, v in expected.items():
        assert torch.equal(resumed.state_dict()[k], v), k  # bit for bit on the CPU


def test_resume_restores_a_plain_torch_child_module(y, tmp_path):
    torch.manual_seed(5)
    pyro.set_rng_seed(5)
    full = NetGuide()
    _engine(max_steps=200, min_steps=200).run(Model(), full, {"y": y}, workdir=tmp_path / "a")
    expected = full.net(torch.ones(1)).detach().clone()
    torch.manual_seed(5)
    pyro.set_rng_seed(5)
    _engine(max_steps=120, min_steps=200, checkpoint_every=60).run(Model(), NetGuide(), {"y": y},
                                                                   workdir=tmp_path / "b")
    torch.manual_seed(99)  # other initial weights: only the checkpoint can bring the module back
    resumed = NetGuide()
    _engine(max_steps=200, min_steps=200, resume=True).run(Model(), resumed, {"y": y}, workdir=tmp_path / "b")
    assert torch.allclose(resumed.net(torch.ones(1)).detach(), expected, atol=1e-6)


def test_resume_errors_name_the_checkpoint(y, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _engine(resume=True).run(Model(), PointGuide(), {"y": y}, workdir=tmp_path)
    _engine(max_steps=5).run(Model(), PointGuide(), {"y": y}, workdir=tmp_path)
    with pytest.raises(CheckpointError, match="another problem: guide differ"):  # a guide of another structure
        _engine(max_steps=10, resume=True).run(Model(), NetGuide(), {"y": y}, workdir=tmp_path)


def test_nuts_recovers_exact_posterior_and_converts(y):
    res = fit(Model(), None, {"y": y[:50]}, NUTSEngine(num_samples=300, warmup_steps=200, num_chains=2, progress=False))
    mean, sd = exact(y[:50])
    draws = res.draws["mu"]
    assert draws.shape == (2, 300)
    # 600 draws: Monte Carlo error of the mean ~ sd/sqrt(ESS); allow 0.25 sd
    assert abs(draws.mean().item() - mean) < 0.25 * sd
    assert abs(draws.std().item() / sd - 1) < 0.2
    idata = to_inference_data(res)
    assert idata.posterior["mu"].dims == ("chain", "draw")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")
    assert idata.observed_data["y"].shape == (50,)
    assert idata.sample_stats["diverging"].shape == (2, 300)
    # pointwise log-likelihood (one vectorised call over draws) equals the Normal density at each draw
    ll = idata.log_likelihood["y"].values[1, 7]
    ref = dist.Normal(draws[1, 7].double(), 1.0).log_prob(y[:50].double()).numpy()
    assert np.allclose(ll, ref, atol=1e-5)


def test_rescaled_sites_are_in_user_units_with_the_jacobian_in_the_log_likelihood(y):
    res = fit(Model(), PointGuide(), {"y": y}, _engine(max_steps=200, min_steps=200), n_draws=50)
    plain = to_inference_data(res)
    scaled = to_inference_data(res, rescale={"mu": Rescale(3.0, 1.0), "y": Rescale(3.0, 1.0)})
    assert np.allclose(scaled.posterior["mu"].values, 1.0 + 3.0 * plain.posterior["mu"].values)
    assert np.allclose(scaled.observed_data["y"].values, 1.0 + 3.0 * y.numpy(), atol=1e-5)
    # the density of y in user units is the internal density over |dy_user / dy| = 3
    assert np.allclose(scaled.log_likelihood["y"].values, plain.log_likelihood["y"].values - math.log(3.0))
    assert '"mu": {"scale": 3.0, "shift": 1.0}' in scaled.posterior.attrs["physppl_rescaled"]


def test_guide_draws_are_vectorised_with_plate_dims():
    class Plated(PyroModule):
        def forward(self, n=5, subsample=None):
            with pyro.plate("refl", n):
                pyro.sample("F", dist.HalfNormal(torch.ones(n)))

    class Guide(PyroModule):
        def forward(self, n=5, subsample=None):
            with pyro.plate("refl", n):
                pyro.sample("F", dist.LogNormal(torch.arange(5.0), 0.1))

    assert site_dims(pyro.poutine.trace(Plated()).get_trace()) == {"F": ["refl"]}
    draws = guide_draws(Guide(), {}, 4000, ["F"])
    assert draws["F"].shape == (1, 4000, 5)
    # each reflection's draws follow its own distribution: log-mean k, log-sd 0.1
    logs = draws["F"][0].log()
    assert torch.allclose(logs.mean(0), torch.arange(5.0), atol=0.01) and torch.allclose(logs.std(0), torch.full((5,), 0.1), atol=0.01)
    idata = to_inference_data(Fit(model=Plated(), guide=None, data={}, draws=draws), log_likelihood=False)
    assert idata.posterior["F"].dims == ("chain", "draw", "refl")
    summary = summarize(idata)
    assert list(summary.index[:2]) == ["F[0]", "F[1]"] and "refl" in summary.columns


def test_map_engine_finds_the_mode(y):
    res = fit(Model(), None, {"y": y}, MAPEngine(steps=800, lr=0.05))
    mean, sd = exact(y)
    assert res.draws["mu"].shape == (1, 1) and abs(res.draws["mu"].item() - mean) < 0.05 * sd


def test_interrupt_saves_a_checkpoint_and_says_where(y, tmp_path, monkeypatch):
    from pyro.infer.elbo import ELBOModule

    calls = {"n": 0}
    real = ELBOModule.forward

    def forward(self, *args, **kwargs):
        calls["n"] += 1  # call 1 is the engine's initialising evaluation; call k + 1 is step k
        if calls["n"] == 41:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ELBOModule, "forward", forward)
    with pytest.raises(Interrupted, match="SIGINT at step 39: checkpoint saved") as err:
        _engine(max_steps=100).run(Model(), PointGuide(), {"y": y}, workdir=tmp_path)
    assert err.value.exit_status == 130
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 39 and len(state["losses"]) == 39


def test_a_signal_stops_at_the_next_step_boundary_and_resumes_exactly(y, tmp_path):
    """SIGTERM during step 30 (sent by the callback, as a batch system would): the step finishes, the checkpoint
    holds 30 steps, and resuming to 60 gives the parameters of an uninterrupted 60-step run."""
    import os
    import signal

    def send(step, losses):
        if step == 30:
            os.kill(os.getpid(), signal.SIGTERM)

    model, guide = Model(), PointGuide()
    pyro.set_rng_seed(0)
    with pytest.raises(Interrupted, match="SIGTERM at step 30") as err:
        _engine(max_steps=60).run(model, guide, {"y": y}, workdir=tmp_path / "a", callback=send)
    assert err.value.exit_status == 143 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = Model(), PointGuide()
    _engine(max_steps=60, resume=True).run(*resumed, {"y": y}, workdir=tmp_path / "a")
    straight = Model(), PointGuide()
    pyro.set_rng_seed(0)
    _engine(max_steps=60).run(*straight, {"y": y}, workdir=tmp_path / "b")
    for p, q in zip(resumed[1].parameters(), straight[1].parameters()):
        assert torch.equal(p, q)


def test_resume_refuses_a_checkpoint_of_another_model(y, tmp_path):
    _engine(max_steps=10).run(Model(), PointGuide(), {"y": y}, workdir=tmp_path)
    other = Model()
    other.extra = torch.nn.Linear(1, 1)  # another structure, same parameters of the guide
    with pytest.raises(CheckpointError, match="model differ.*max_steps"):
        _engine(max_steps=20, resume=True).run(other, PointGuide(), {"y": y}, workdir=tmp_path)
    with pytest.raises(CheckpointError, match="data.y differ"):
        _engine(max_steps=20, resume=True).run(Model(), PointGuide(), {"y": y + 1}, workdir=tmp_path)
    _engine(max_steps=20, resume=True).run(Model(), PointGuide(), {"y": y}, workdir=tmp_path)  # a longer budget is fine


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

    def every_step(step, losses):
        seen.append((step, len(losses)))
        return f"early stop at {step}" if step == 120 else None

    res = _engine(max_steps=500).run(Model(), PointGuide(), {"y": y}, workdir=tmp_path, callback=every_step)
    assert res.steps == 120 and res.stop_reason == "early stop at 120" and not res.converged
    assert seen[0] == (1, 1) and seen[-1] == (120, 120)


def test_no_workdir_writes_no_checkpoint(y, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _engine(max_steps=20, checkpoint_every=5).run(Model(), PointGuide(), {"y": y})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _engine(resume=True).run(Model(), PointGuide(), {"y": y})


def test_learning_rates_per_submodule_and_unknown_names_are_errors():
    class WithChild(PyroModule):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Linear(2, 1)
            self.other = PyroParam(torch.zeros(3))

    model = WithChild()
    opt = ClippedAdam(lr=0.05, module_lr={"scale": 0.002})({"model": model, "guide": PointGuide()})
    rates = {g["name"]: (g["lr"], len(g["params"])) for g in opt.param_groups}
    assert rates == {"default": (0.05, 3), "scale": (0.002, 2)}  # other + the guide's loc, scale; weight, bias
    with pytest.raises(ValueError, match="no submodule 'scal'.*model.scale"):
        ClippedAdam(module_lr={"scal": 0.1})({"model": model, "guide": PointGuide()})


def test_protocol_errors_name_what_is_missing(y):
    def function_model(y, subsample=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    class NoSubsample(PyroModule):
        def forward(self, y):
            pyro.sample("mu", dist.Normal(0.0, 1.0))

    class WrongSite(PyroModule):
        def forward(self, y, subsample=None):
            pyro.sample("nu", dist.Normal(0.0, 1.0))

    with pytest.raises(ProtocolError, match="not a torch.nn.Module"):
        fit(function_model, PointGuide(), {"y": y})
    with pytest.raises(ProtocolError, match="must accept subsample"):
        fit(NoSubsample(), PointGuide(), {"y": y})
    with pytest.raises(ProtocolError, match=r"samples \['nu'\], which are not latent sites"):
        fit(Model(), WrongSite(), {"y": y})
    with pytest.raises(ProtocolError, match="needs a guide"):
        fit(Model(), None, {"y": y})


def test_top_level_api_is_importable_lazily():
    assert callable(physppl.merge) and callable(physppl.weigh_frames) and callable(physppl.infer_beam)
    assert callable(physppl.train_vae) and physppl.fit is fit
    assert physppl.__version__
    with pytest.raises(AttributeError):
        physppl.no_such_thing


def test_resolve_device():
    from physppl.inference.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_masked_and_weighted_points_count_in_the_log_likelihood_as_the_model_counts_them(y):
    present = torch.arange(20) % 4 != 0
    weight = torch.linspace(0.5, 2.0, 20)

    class Masked(PyroModule):
        def forward(self, y, subsample=None):
            mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
            with pyro.plate("data", 20), pyro.poutine.scale(scale=weight), pyro.poutine.mask(mask=present):
                pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.where(present, y[:20], torch.zeros(20)))

    res = Fit(model=Masked(), guide=None, data={"y": y}, draws={"mu": torch.full((1, 3), 1.5)})
    idata = to_inference_data(res, rescale={"y": Rescale(2.0)})
    ll = idata.log_likelihood["y"].values[0, 0]
    ref = weight * dist.Normal(1.5, 1.0).log_prob(y[:20]) - math.log(2.0)
    np.testing.assert_allclose(ll[present.numpy()], ref[present].numpy(), rtol=1e-5)
    assert (ll[~present.numpy()] == 0).all()  # no term for a missing measurement, and no Jacobian either
    obs = idata.observed_data["y"].values
    assert np.isnan(obs[~present.numpy()]).all() and np.allclose(obs[present.numpy()], 2.0 * y[:20][present].numpy())


def test_unreliable_diagnostics_become_warnings_and_a_flag(caplog):
    """Each diagnostic past its limit is logged as a WARNING and listed in ``metrics["warnings"]``; passing values
    leave the result reliable."""
    from physppl.inference.reliability import flag_unreliable

    good = flag_unreliable({"divergences": 0, "max_rhat_w": 1.003, "loo_pareto_k_above_0.7": 0.0,
                            "loo_pareto_k_max": 0.5, "focus_pareto_k_max": 0.69, "converged": False,
                            "stop_reason": "early stopping at step 10", "unidentified_states": []})
    assert good["reliable"] is True and good["warnings"] == []
    with caplog.at_level("WARNING"):
        bad = flag_unreliable({"divergences": 3, "r_hat_max": 1.05, "loo_pareto_k_above_0.7": 0.012,
                               "loo_pareto_k_max": 2.4, "focus_pareto_k_max": 0.8, "converged": False,
                               "stop_reason": "step budget of 2000 reached", "unidentified_states": ["A", "B"]})
    assert bad["reliable"] is False
    heads = sorted(w.split(":")[0] for w in bad["warnings"])
    assert heads == ["divergences", "focus_pareto_k_max", "loo_pareto_k", "not_converged", "r_hat_max",
                     "unidentified_states"]
    assert sum("unreliable result" in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 6
    assert "1.2% of points" in " ".join(bad["warnings"])
