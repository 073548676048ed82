"""The VAE job end to end on tiny settings: outputs, metrics, Ising physics, resume, early stopping, errors; the
Python function against the command line; the README's Python examples."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import get_method, instantiate
from pyro.infer import TraceMeanField_ELBO

import physppl
from physppl.cli import run as app_run
from physppl.guides.vae import ConvEncoder
from physppl.inference.optim import ClippedAdam
from physppl.inference.runner import comparable_metrics
from physppl.inference.svi import SVIEngine, TrainingDivergedError
from physppl.models.simulators.ising import T_C
from physppl.vae import training
from physppl.vae.api import Evaluation, Training
from physppl.vae.data import DigitsDataSource, IsingDataSource
from physppl.vae.parts import GUIDES, MODELS
from physppl.vae.physics import phase_analysis, switch_temperature
from readme_tools import composed_configs

REPO = Path(__file__).resolve().parents[1]
TINY = ["inference.progress=false", "training.epochs=2", "training.eval_particles=1", "evaluation.iwae_particles=20",
        "evaluation.max_points=60", "evaluation.gap_points=10", "evaluation.gap_steps=20",
        "evaluation.posterior_batch=8", "n_draws=10", "model.hidden=[32]", "guide.hidden=[32]"]
# The digits job trained just far enough (135 steps at lr 0.01, seconds) that the latent code matters: a decoder
# that ignores z cannot beat independent pixels (-25.1 nats per test digit), and this job reaches -21 to -22.
DIGITS = ["+experiment=vae_digits", "model.latent_dim=4", *TINY, "training.epochs=15", "inference.optim.lr=0.01",
          "model.hidden=[64]", "guide.hidden=[64]"]
# a small Ising data set: L = 8, 7 temperatures across T_c, 40 configurations each (command line and Python)
ISING = ["data.L=8", "data.temperatures=[1.2,1.6,2.0,2.4,2.8,3.2,3.6]", "data.n_per_temperature=40", "data.n_chains=10",
         "data.thermalize=60", "data.every=3", "data.progress=false"]
ISING_DATA = dict(L=8, temperatures=[1.2, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6], n_per_temperature=40, n_chains=10,
                  thermalize=60, every=3, progress=False)
# what the command line writes besides Result.save: the training state of a resumable run
NOT_SAVED = ("checkpoint.pt", "best_params.pt", "heldout.json")


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def _job(overrides, workdir):
    """The command line's job (``physppl.cli.run``), returning its Result rather than only the metrics."""
    cfg = _compose(overrides)
    result = get_method(cfg.task)(cfg, workdir)
    result.save(workdir)
    return result


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file() and not p.name.endswith(".log")
            and p.name not in NOT_SAVED}


def _pixel_marginal_baseline(data) -> float:
    """Mean log-likelihood of the test digits under independent pixels with the training split's frequencies: the
    best a decoder that ignores z (or fed by an encoder that ignores x) can do."""
    x, t = data.x[data.split["train"]], data.x[data.split["test"]]
    p = x.mean(0).clamp(1e-3, 1 - 1e-3)
    return float((t * p.log() + (1 - t) * (1 - p).log()).flatten(1).sum(1).mean())


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_digits")
    return app_run(_compose(DIGITS), out), out


def test_digits_job_writes_every_output(digits_job):
    m, out = digits_job
    for name in ("posterior.nc", "metrics.json", "latents.csv", "loss.png", "losses.csv", "reconstructions.png",
                 "samples.png", "latent.png", "checkpoint.pt", "best_params.pt", "heldout.json"):
        assert (out / name).exists(), name
    assert m["steps"] == 15 * (m["n_train"] // 128) and m["epochs_run"] == 15
    assert m["test_iwae"] >= m["test_elbo"] - 1e-6 and m["test_iwae"] - m["test_elbo"] < 1.0
    # measured on seeds 0-9 of this job: test ELBO -22.10 to -20.98 (seed 0: -22.06), IWAE -21.76 to -20.67,
    # held-out ELBO -22.98 to -20.77, amortization gap 0.03 to 0.55 nats; an untrained VAE scores -44 and
    # independent pixels -25.1, so a broken decoder or encoder fails the lower bounds
    baseline = _pixel_marginal_baseline(DigitsDataSource().load())
    assert baseline == pytest.approx(-25.13, abs=0.05)
    assert -23.0 < m["test_elbo"] < -20.0, m["test_elbo"]
    assert m["test_iwae"] > baseline + 2.5, (m["test_iwae"], baseline)
    assert -23.5 < m["heldout_elbo"] < -20.0, m["heldout_elbo"]
    assert -0.5 < m["amortization_gap"] < 1.5 and m["iwae_particles"] == 20
    idata = az.from_netcdf(out / "posterior.nc")
    assert dict(idata.posterior["z"].sizes) == {"chain": 1, "draw": 10, "data": 8, "latent": 4}
    assert dict(idata.log_likelihood["x"].sizes) == {"chain": 1, "draw": 10, "data": 8}
    assert "digit" in idata.posterior.coords and dict(idata.observed_data["x"].sizes) == {"data": 8, "row": 8,
                                                                                             "col": 8}
    table = pd.read_csv(out / "latents.csv")
    assert len(table) == m["n_test"] and {"z0", "z3", "digit"} <= set(table.columns)


def test_python_function_matches_the_command_line(digits_job, tmp_path):
    """physppl.train_vae with the DIGITS settings and the same seed gives the command line's metrics (timings
    aside), latent draws and latent table, and Result.save writes the files of the command line's run directory."""
    cli_metrics, cli_out = digits_job
    # the engine spelled out: the vae_svi preset (plain Adam, batches of 128, analytic KL) at lr 0.01
    engine = SVIEngine(optim=ClippedAdam(lr=0.01, clip_norm=1e10), loss=TraceMeanField_ELBO(), batch_size=128,
                       progress=False)
    res = physppl.train_vae("digits", model=MODELS["mlp"].build(latent_dim=4, hidden=[64]),
                            guide=GUIDES["encoder"].build(hidden=[64]), engine=engine,
                            training=Training(epochs=15, eval_particles=1),
                            evaluation=Evaluation(iwae_particles=20, max_points=60, gap_points=10, gap_steps=20,
                                                  posterior_batch=8), n_draws=10)
    assert comparable_metrics(res.metrics) == comparable_metrics(cli_metrics)
    cli_post = az.from_netcdf(cli_out / "posterior.nc")
    np.testing.assert_array_equal(res.idata.posterior["z"].values, cli_post.posterior["z"].values)
    np.testing.assert_array_equal(res.idata.log_likelihood["x"].values, cli_post.log_likelihood["x"].values)
    pd.testing.assert_frame_equal(res.latents, pd.read_csv(cli_out / "latents.csv"), check_dtype=False)
    out = res.save(tmp_path / "py")
    assert _files(out) == _files(cli_out)
    assert json.loads((out / "metrics.json").read_text()) == res.metrics
    assert not list(out.glob("checkpoint*")) and res.training.steps == cli_metrics["steps"]


def test_ising_job_reports_the_phase_transition(tmp_path):
    cfg = _compose(["+experiment=vae_ising", *ISING, f"data.cache_dir={tmp_path / 'cache'}", *TINY, "training.epochs=15", "inference.batch_size=32"])
    m = app_run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "phase.png").exists()
    # Measured on seeds 0-11 of this job: corr_latent_m 0.9977-0.9995, corr_abs_latent_abs_m 0.9887-0.9977,
    # switch 2.303-2.481 (seed 0: 2.402; on this 8 x 8 lattice the finite-size transition lies above T_c),
    # classifier_accuracy_far 0.95-0.975. A latent space that ignores the magnetisation, or a phase analysis that
    # mislabels or misplaces the crossing, fails these bounds; the old window (1.8, 2.8) was the training window.
    assert m["corr_latent_m"] > 0.99 and m["corr_abs_latent_abs_m"] > 0.975
    assert 2.25 < m["switch_temperature"] < 2.55, m["switch_temperature"]
    assert m["switch_minus_tc"] == pytest.approx(m["switch_temperature"] - T_C, abs=1e-5)
    assert m["classifier_accuracy_far"] >= 0.925


def test_switch_temperature_interpolates_the_crossing():
    """Linear interpolation of the mean P(ordered) per temperature at 1/2; NaN when it never crosses."""
    t = np.repeat([1.0, 1.5, 2.0, 2.5, 3.0], 4)
    p = np.repeat([1.0, 0.9, 0.7, 0.2, 0.0], 4)
    t_switch, temps, mean_p = switch_temperature(t, p)
    assert t_switch == pytest.approx(2.0 + 0.5 * 0.2 / 0.5)  # between 2.0 (0.7) and 2.5 (0.2)
    assert np.allclose(temps, [1.0, 1.5, 2.0, 2.5, 3.0]) and np.allclose(mean_p, [1.0, 0.9, 0.7, 0.2, 0.0])
    assert np.isnan(switch_temperature(t, np.full_like(p, 0.8))[0])


def test_phase_analysis_on_a_known_latent_space():
    """Synthetic latent means: the signed magnetisation plus noise. At each temperature a known fraction of the
    configurations is ordered (m = +-0.9), the rest disordered (m ~ 0), so the classifier's mean P(ordered) per
    temperature is that fraction and its switch is where the fraction crosses 1/2 (T = 2.2 + 0.4 * 0.4/0.6)."""
    rng = np.random.default_rng(0)
    temps = np.array([1.0, 1.4, 1.8, 2.2, 2.6, 3.0, 3.4])
    ordered_fraction = np.array([1.0, 1.0, 1.0, 0.9, 0.3, 0.0, 0.0])

    def sample(n_per):
        t = np.repeat(temps, n_per)
        ordered = np.concatenate([np.arange(n_per) < round(f * n_per) for f in ordered_fraction])
        m = np.where(ordered, 0.9 * rng.choice([-1.0, 1.0], size=t.size), rng.normal(0, 0.05, t.size))
        mu = np.stack([m + rng.normal(0, 0.02, t.size), rng.normal(0, 1, t.size)], 1)  # one informative coordinate
        return mu, {"temperature": t, "magnetization": m}

    mu_train, lab_train = sample(60)
    mu_test, lab_test = sample(50)
    out = phase_analysis(mu_train, lab_train, mu_test, lab_test, ordered_below=1.8, disordered_above=2.8)
    assert out["corr_latent_m"] > 0.995 and out["corr_abs_latent_abs_m"] > 0.99
    assert out["switch_temperature"] == pytest.approx(2.2 + 0.4 * 0.4 / 0.6, abs=0.03)
    assert out["classifier_accuracy_far"] == 1.0
    assert out["switch_temperature_supervised"] == pytest.approx(out["switch_temperature"], abs=0.1)
    # the magnetisation's sign is irrelevant (Z2): flipping the latent changes nothing
    flipped = phase_analysis(-mu_train, lab_train, -mu_test, lab_test, ordered_below=1.8, disordered_above=2.8)
    assert flipped["switch_temperature"] == pytest.approx(out["switch_temperature"], abs=1e-6)


def test_user_array_with_labels(tmp_path):
    """data=array: +-1 spins from an .npz with per-sample temperature and magnetisation labels; the latent space
    is coloured by them and the phase analysis runs on them."""
    from physppl.models.simulators.ising import sample_ising

    s = sample_ising(8, [1.5, 2.0, 2.5, 3.0, 3.5], 24, n_chains=8, thermalize=40, every=2, seed=3)
    np.savez(tmp_path / "configs.npz", x=s.spins, temperature=s.temperature, magnetization=s.magnetization)
    cfg = _compose(["+experiment=vae_ising", "data=array", f"data.path={tmp_path / 'configs.npz'}", "data.spins=true",
                    *TINY, "training.epochs=3", "inference.batch_size=32", "evaluation.figures=false",
                    "evaluation.posterior_rows=[0,5,119]"])
    m = app_run(cfg, tmp_path / "run")
    post = az.from_netcdf(tmp_path / "run" / "posterior.nc").posterior
    assert post["data"].values.tolist() == [0, 5, 119]
    assert np.allclose(post["temperature"].values, s.temperature[[0, 5, 119]])
    assert m["data"] == "configs" and m["event_shape"] == [8, 8]
    assert "corr_latent_m" in m and "switch_temperature" in m
    table = pd.read_csv(tmp_path / "run" / "latents.csv")
    assert {"temperature", "magnetization"} <= set(table.columns)


def test_conv_and_continuous_bernoulli_variants_build_and_step(tmp_path):
    cfg = _compose(["+experiment=vae_digits", "model=vae_conv", "guide=vae_conv_encoder", "data.binarize=false",
                    "model.likelihood=continuous_bernoulli", *TINY[:1], "training.epochs=1"])
    data = instantiate(cfg.data).load()
    model = instantiate(cfg.model)(event_shape=data.event_shape)
    guide = instantiate(cfg.guide)(event_shape=data.event_shape, latent_dim=model.latent_dim)
    engine = instantiate(cfg.inference)
    assert model.decoder_kind == "conv" and model.likelihood == "continuous_bernoulli"
    assert isinstance(guide.encoder, ConvEncoder) and model.latent_dim == MODELS["conv"].kwargs["latent_dim"]
    fit = training.fit_vae(model, guide, data.x[:256], data.x[256:320], engine, epochs=1, eval_every_epochs=1)
    assert fit.steps == 2 and np.isfinite(fit.best_heldout_elbo)
    # grey levels under a Bernoulli likelihood are refused with a hint, before any training
    with pytest.raises(ValueError, match="continuous_bernoulli"):
        app_run(_compose(["+experiment=vae_digits", "data.binarize=false"]), tmp_path / "grey")
    assert not (tmp_path / "grey" / "checkpoint.pt").exists()


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    """Two epochs, then resume to four, gives the same parameters and held-out record as four straight."""
    base = ["+experiment=vae_digits", "model.latent_dim=3", *TINY, "evaluation.gap_points=0",
            "evaluation.figures=false"]
    straight = _job(base + ["training.epochs=4"], tmp_path / "a")
    _job(base + ["training.epochs=2"], tmp_path / "b")
    resumed = _job(base + ["training.epochs=4", "inference.resume=true"], tmp_path / "b")
    assert resumed.metrics["resumed_from"] == straight.metrics["steps"] // 2
    assert resumed.metrics["heldout_elbo"] == pytest.approx(straight.metrics["heldout_elbo"], abs=1e-4)
    for part in ("model", "guide"):
        a, b = getattr(straight, part).state_dict(), getattr(resumed, part).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (part, k)
    hist = json.loads((tmp_path / "b" / "heldout.json").read_text())["history"]
    assert [h["step"] for h in hist] == [h["step"] for h in
                                        json.loads((tmp_path / "a" / "heldout.json").read_text())["history"]]


class _Weight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.0))


def test_early_stopping_keeps_the_best_parameters(monkeypatch):
    values = iter([-50.0, -40.0, -30.0, -35.0, -31.0, -32.0, -20.0])
    monkeypatch.setattr(training, "heldout_elbo", lambda *a, **k: next(values))
    model, guide = _Weight(), _Weight()
    mon = training.HeldOutMonitor(model, guide, None, every=2, patience=3)
    stops = []
    for step in range(1, 13):
        with torch.no_grad():
            model.w.fill_(float(step))
            guide.w.fill_(-float(step))
        stops.append(mon(step, [0.0] * step))
    assert stops[:11] == [None] * 11 and "did not improve for 3 evaluations" in stops[11]
    assert "best -30.000 nats at step 6" in stops[11]
    # the kept state is a copy of both modules at step 6, not a view of the live parameters
    assert float(mon.best_state["model"]["w"]) == 6.0 and float(mon.best_state["guide"]["w"]) == -6.0
    assert float(model.w.detach()) == 12.0
    training._restore(model, guide, mon.best_state)
    assert float(model.w.detach()) == 6.0 and float(guide.w.detach()) == -6.0


def test_nan_heldout_elbo_is_reported_as_divergence(monkeypatch):
    monkeypatch.setattr(training, "heldout_elbo", lambda *a, **k: float("nan"))
    mon = training.HeldOutMonitor(None, None, None, every=1)
    with pytest.raises(TrainingDivergedError, match="held-out ELBO is nan at step 1"):
        mon(1, [1.0])


def test_command_line_reports_bad_array_in_one_line(tmp_path, monkeypatch):
    """The ``physppl`` command (run in-process) exits with a one-line error naming the file and the fix."""
    from physppl import cli

    spins = np.where(np.random.default_rng(0).random((30, 4, 4)) < 0.5, -1, 1).astype(np.int8)
    np.save(tmp_path / "spins.npy", spins)
    monkeypatch.setattr(sys, "argv", ["physppl", "+experiment=vae_digits", "data=array",
                                      f"data.path={tmp_path / 'spins.npy'}", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    message = str(exit_info.value.code)
    assert message.startswith("physppl: error:") and "\n" not in message
    assert "spins.npy" in message and "data.spins=true" in message
    assert np.array_equal(np.load(tmp_path / "spins.npy"), spins)  # the input is untouched


# -- the README's Python examples, as printed ---------------------------------------------------------------------

def _readme_snippets() -> list[str]:
    text = (REPO / "experiments" / "vae" / "README.md").read_text()
    section = text.split("## From Python, without Hydra")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    """Each Python example of experiments/vae/README.md runs as printed. The two ``physppl.train_vae`` examples
    (minutes as printed) run through a wrapper that keeps their arguments and shrinks only the budgets, as the
    TINY settings do: at most 3 epochs, 20 importance samples on 60 test points, a 10-point amortization gap fit
    of 20 steps, no figures (checked on the digits job), and for "ising" the small ISING_DATA lattice. The
    building-blocks example runs unchanged."""
    real = physppl.train_vae
    calls = []

    def quick(data="digits", *, training=Training(), evaluation=Evaluation(), **kwargs):
        tr = training if isinstance(training, Training) else Training(**training)
        ev = evaluation if isinstance(evaluation, Evaluation) else Evaluation(**evaluation)
        calls.append({"data": data, "training": tr, "evaluation": ev, **kwargs})
        if data == "ising":
            data = IsingDataSource(**ISING_DATA, cache_dir=str(tmp_path / "cache"))
        tr = dataclasses.replace(tr, epochs=min(tr.epochs, 3), eval_particles=1)
        ev = dataclasses.replace(ev, iwae_particles=20, max_points=min(ev.max_points, 60), gap_points=10,
                                 gap_steps=20, posterior_batch=8, figures=False)
        return real(data, training=tr, evaluation=ev, **{**kwargs, "n_draws": 10})

    monkeypatch.setattr(physppl, "train_vae", quick)
    monkeypatch.chdir(tmp_path)
    snippets = _readme_snippets()
    assert len(snippets) == 3
    spaces = []
    for k, code in enumerate(snippets):
        namespace: dict = {}
        exec(compile(code, f"experiments/vae/README.md, Python example {k + 1}", "exec"), namespace)
        spaces.append(namespace)
    out = capsys.readouterr().out
    # 1: digits with the defaults
    assert "test ELBO" in out and (tmp_path / "out" / "posterior.nc").is_file()
    assert (tmp_path / "out" / "latents.csv").is_file() and (tmp_path / "out" / "metrics.json").is_file()
    assert calls[0]["data"] == "digits" and calls[0]["training"] == Training() and calls[0]["evaluation"] == Evaluation()
    assert {"z0", "z49", "digit"} <= set(spaces[0]["z"].columns) and spaces[0]["images"].shape == (16, 8, 8)
    # 2: Ising with exactly the choices of +experiment=vae_ising
    assert "the latent classifier switches at T =" in out and spaces[1]["res"].metrics["latent_dim"] == 2
    cfg = _compose(["+experiment=vae_ising"])
    assert calls[1]["data"] == "ising" and type(instantiate(cfg.data)) is IsingDataSource
    assert calls[1]["training"] == Training(**cfg.training)
    assert calls[1]["evaluation"] == Evaluation(**cfg.evaluation)
    ours, theirs = calls[1]["model"](event_shape=(8, 8)), instantiate(cfg.model)(event_shape=(8, 8))
    assert (ours.latent_dim, ours.likelihood, ours.decoder_kind) == (theirs.latent_dim, theirs.likelihood,
                                                                     theirs.decoder_kind) == (2, "bernoulli", "mlp")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert set(calls[1]) == {"data", "training", "evaluation", "model"}  # guide, engine: the defaults, as in the CLI
    # 3: the building blocks, unchanged
    assert "held-out ELBO" in out
    ns = spaces[2]
    assert ns["z"].shape == (ns["test"].shape[0], 8) and ns["images"].shape == (16, 8, 8)
    # measured with seeds 0-2: IWAE -23.61 to -22.81 nats (ELBO -23.84 to -23.06); independent pixels give -25.1
    assert -25.0 < float(ns["est"].iwae.mean()) < -21.5, float(ns["est"].iwae.mean())


def test_readme_command_lines_compose():
    """Every command line of the README's Run section is a valid configuration (no option renamed away)."""
    configs = composed_configs(REPO / "experiments" / "vae" / "README.md", "## Run")
    assert len(configs) == 7
    for overrides, cfg in configs:
        assert cfg.task == "physppl.vae.api.task", overrides
