"""The VAE job end to end on tiny settings: outputs, metrics, Ising physics, resume, early stopping, errors."""
from __future__ import annotations

import sys
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from physppl.vae import training
from physppl.vae.pipeline import build
from physppl.cli import run as app_run
from physppl.inference.device import resolve_device
from physppl.inference.svi import TrainingDivergedError

REPO = Path(__file__).resolve().parents[1]
TINY = ["inference.progress=false", "train.epochs=2", "train.eval_particles=1", "evaluation.iwae_particles=20",
        "evaluation.max_points=60", "evaluation.gap_points=10", "evaluation.gap_steps=20",
        "evaluation.posterior_batch=8", "n_draws=10", "model.hidden=[32]", "guide.hidden=[32]"]


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_digits_job_writes_every_output(tmp_path):
    cfg = _compose(["+experiment=vae_digits", "model.latent_dim=4", *TINY])
    m = app_run(cfg, tmp_path)
    for name in ("posterior.nc", "metrics.json", "latents.csv", "loss.png", "losses.csv", "reconstructions.png", "samples.png",
                 "latent.png", "checkpoint.pt", "heldout.json"):
        assert (tmp_path / name).exists(), name
    assert m["steps"] == 2 * (m["n_train"] // 128) and m["epochs_run"] == 2
    assert m["test_iwae"] >= m["test_elbo"] - 1e-6
    assert -60 < m["test_elbo"] < -15 and np.isfinite(m["heldout_elbo"])
    assert m["amortization_gap"] > -0.5 and m["iwae_particles"] == 20
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert dict(idata.posterior["z"].sizes) == {"chain": 1, "draw": 10, "data": 8, "latent": 4}
    assert dict(idata.log_likelihood["x"].sizes) == {"chain": 1, "draw": 10, "data": 8}
    assert "digit" in idata.posterior.coords and dict(idata.observed_data["x"].sizes) == {"data": 8, "row": 8,
                                                                                             "col": 8}
    table = pd.read_csv(tmp_path / "latents.csv")
    assert len(table) == m["n_test"] and {"z0", "z3", "digit"} <= set(table.columns)


def test_ising_job_reports_the_phase_transition(tmp_path):
    cfg = _compose(["+experiment=vae_ising", "data.L=8", "data.temperatures=[1.2,1.6,2.0,2.4,2.8,3.2,3.6]",
                    "data.n_per_temperature=40", "data.n_chains=10", "data.thermalize=60", "data.every=3",
                    f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false", *TINY, "train.epochs=15",
                    "inference.batch_size=32"])
    m = app_run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "phase.png").exists()
    # even a tiny model finds the magnetisation; the classifier's switch lies between the training windows
    assert m["corr_latent_m"] > 0.9 and m["corr_abs_latent_abs_m"] > 0.8
    assert 1.8 < m["switch_temperature"] < 2.8
    assert m["classifier_accuracy_far"] > 0.9


def test_user_array_with_labels(tmp_path):
    """data=array: +-1 spins from an .npz with per-sample temperature and magnetisation labels; the latent space
    is coloured by them and the phase analysis runs on them."""
    from physppl.models.simulators.ising import sample_ising

    s = sample_ising(8, [1.5, 2.0, 2.5, 3.0, 3.5], 24, n_chains=8, thermalize=40, every=2, seed=3)
    np.savez(tmp_path / "configs.npz", x=s.spins, temperature=s.temperature, magnetization=s.magnetization)
    cfg = _compose(["+experiment=vae_ising", "data=array", f"data.path={tmp_path / 'configs.npz'}", "data.spins=true",
                    *TINY, "train.epochs=3", "inference.batch_size=32", "evaluation.figures=false",
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
                    "model.likelihood=continuous_bernoulli", *TINY[:1], "train.epochs=1"])
    source = instantiate(cfg.data)
    data = source.load()
    model, guide, engine = build(cfg, data, resolve_device("cpu"))
    fit = training.fit_vae(model, guide, data.x[:256], data.x[256:320], engine, epochs=1, eval_every_epochs=1)
    assert fit.steps == 2 and np.isfinite(fit.best_heldout_elbo)
    # grey levels under a Bernoulli likelihood are refused with a hint
    cfg = _compose(["+experiment=vae_digits", "data.binarize=false"])
    with pytest.raises(ValueError, match="continuous_bernoulli"):
        build(cfg, instantiate(cfg.data).load(), resolve_device("cpu"))


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    """Two epochs, then resume to four, gives the same parameters and held-out record as four straight."""
    base = ["+experiment=vae_digits", "model.latent_dim=3", *TINY, "evaluation.gap_points=0",
            "evaluation.figures=false"]
    straight = app_run(_compose(base + ["train.epochs=4"]), tmp_path / "a")
    state_a = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    app_run(_compose(base + ["train.epochs=2"]), tmp_path / "b")
    pyro.clear_param_store()
    resumed = app_run(_compose(base + ["train.epochs=4", "inference.resume=true"]), tmp_path / "b")
    assert resumed["resumed_from"] == straight["steps"] // 2
    assert resumed["heldout_elbo"] == pytest.approx(straight["heldout_elbo"], abs=1e-4)
    for k, v in pyro.get_param_store().items():
        assert torch.allclose(v, state_a[k], atol=1e-5), k
    import json

    hist = json.loads((tmp_path / "b" / "heldout.json").read_text())["history"]
    assert [h["step"] for h in hist] == [h["step"] for h in
                                        json.loads((tmp_path / "a" / "heldout.json").read_text())["history"]]


def test_early_stopping_keeps_the_best_parameters(monkeypatch):
    values = iter([-50.0, -40.0, -30.0, -35.0, -31.0, -32.0, -20.0])
    monkeypatch.setattr(training, "heldout_elbo", lambda *a, **k: next(values))
    pyro.param("w", torch.tensor(0.0))
    mon = training.HeldOutMonitor(None, None, None, every=2, patience=3)
    stops = []
    for step in range(1, 13):
        pyro.get_param_store()["w"] = torch.tensor(float(step))
        stops.append(mon(step, [0.0] * step))
    assert stops[:11] == [None] * 11 and "did not improve for 3 evaluations" in stops[11]
    assert "best -30.000 nats at step 6" in stops[11]
    assert float(mon.best_state["params"]["w"].detach()) == 6.0


def test_nan_heldout_elbo_is_reported_as_divergence(monkeypatch):
    monkeypatch.setattr(training, "heldout_elbo", lambda *a, **k: float("nan"))
    mon = training.HeldOutMonitor(None, None, None, every=1)
    with pytest.raises(TrainingDivergedError, match="held-out ELBO is nan at step 1"):
        mon(1, [1.0])


def test_command_line_reports_bad_array_in_one_line(tmp_path, monkeypatch):
    """The ``physppl`` command (run in-process) exits with a one-line error naming the file and the fix."""
    from physppl.inference import app

    spins = np.where(np.random.default_rng(0).random((30, 4, 4)) < 0.5, -1, 1).astype(np.int8)
    np.save(tmp_path / "spins.npy", spins)
    monkeypatch.setattr(sys, "argv", ["physppl", "+experiment=vae_digits", "data=array",
                                      f"data.path={tmp_path / 'spins.npy'}", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        app.main()
    message = str(exit_info.value.code)
    assert message.startswith("physppl: error:") and "\n" not in message
    assert "spins.npy" in message and "data.spins=true" in message
    assert np.array_equal(np.load(tmp_path / "spins.npy"), spins)  # the input is untouched


def test_readme_python_example_runs(capsys):
    """The Python example of experiments/vae/README.md, verbatim."""
    text = (REPO / "experiments" / "vae" / "README.md").read_text()
    code = text.split("## From Python, without Hydra")[1].split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README example", "exec"), namespace)
    out = capsys.readouterr().out
    assert "held-out ELBO" in out
    assert namespace["z"].shape == (namespace["test"].shape[0], 8) and namespace["images"].shape == (16, 8, 8)
    assert float(namespace["est"].iwae.mean()) > -40.0
