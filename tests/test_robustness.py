"""Runs that survive their environment: signals to a real ``physppl`` process, refused resumes, typed options."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

SIM = ["data.simulate.dmin=4.5", "data.simulate.n_images=40", "data.simulate.seed=0"]
QUIET = ["inference.progress=false", "n_draws=50"]
ENDLESS = ["inference.max_steps=1000000", "inference.min_steps=1000000", "inference.checkpoint_every=40"]


def _physppl(run_dir: Path, *overrides: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "physppl.cli", "+experiment=merging", *SIM, *QUIET, *overrides,
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _interrupt_mid_training(run_dir: Path, signum: int, *overrides: str) -> tuple[int, str, int]:
    """Start an endless merge, send ``signum`` once it is training, and return (exit status, output, step)."""
    proc = _physppl(run_dir, *ENDLESS, *overrides)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint.pt").exists():  # the first, at step 40: training
        time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    match = re.search(r"at step (\d+)", out)
    return proc.returncode, out, int(match.group(1)) if match else -1


def test_sigterm_checkpoints_exits_143_and_the_resumed_run_is_exact(tmp_path):
    """A real process, a real SIGTERM (what SLURM sends at a time limit): one line, status 143, a checkpoint;
    resuming it to step k + 50 gives the posterior of an uninterrupted run to k + 50, bit for bit (CPU), the
    half-dataset fit included."""
    code, out, step = _interrupt_mid_training(tmp_path / "a", signal.SIGTERM)
    assert code == 143, out[-2000:]
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.startswith("physppl: ")]
    assert len(lines) == 1 and "inference.resume=true" in lines[0], out[-2000:]
    assert step > 0 and torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["step"] == step

    budget = [f"inference.max_steps={step + 50}", f"inference.min_steps={step + 50}", "inference.checkpoint_every=0"]
    resumed = _physppl(tmp_path / "a", *budget, "inference.resume=true")
    straight = _physppl(tmp_path / "b", *budget)
    for proc in (resumed, straight):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
    for name in ("posterior.nc",):
        a = az.from_netcdf(tmp_path / "a" / name).posterior["F"].values
        b = az.from_netcdf(tmp_path / "b" / name).posterior["F"].values
        np.testing.assert_array_equal(a, b)
    import json

    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert ma["cc_half"] == mb["cc_half"] and ma["resumed_from"] == step


def test_ctrl_c_checkpoints_and_exits_130_in_one_line(tmp_path):
    code, out, step = _interrupt_mid_training(tmp_path, signal.SIGINT, "data.half_datasets=false")
    assert code == 130 and "Traceback" not in out, out[-2000:]
    assert [line for line in out.splitlines() if line.startswith("physppl: ")] == [
        f"physppl: interrupted by SIGINT at step {step}: checkpoint saved to {tmp_path / 'checkpoint.pt'}; resume "
        f"with the same command and inference.resume=true hydra.run.dir={tmp_path}"]


def test_resuming_with_another_likelihood_is_refused_naming_what_changed(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    from physppl.cli import run
    from physppl.inference.svi import CheckpointError

    base = ["+experiment=merging", *SIM, *QUIET, "data.half_datasets=false"]
    with initialize_config_module("physppl.conf", version_base="1.3"):
        run(compose("config", overrides=[*base, "inference.max_steps=20", "inference.min_steps=20"]), tmp_path)
        changed = compose("config", overrides=[*base, "inference.max_steps=40", "inference.min_steps=40",
                                               "model/likelihood=normal", "inference.resume=true"])
        steps = []
        monkeypatch.setattr("physppl.inference.svi.SVIEngine._converged", lambda self, losses: steps.append(1))
        with pytest.raises(CheckpointError, match=r"another problem: model differ.*only max_steps"):
            run(changed, tmp_path)
    assert steps == []  # refused before a single step
    longer = [*base, "inference.max_steps=40", "inference.min_steps=40", "inference.resume=true"]
    with initialize_config_module("physppl.conf", version_base="1.3"):
        assert run(compose("config", overrides=longer), tmp_path)["resumed_from"] == 20  # a longer budget is fine


@pytest.mark.parametrize("override, expected", [
    ("data.dmin=-1", "physppl: error: dmin must be > 0 (a resolution cutoff in A), got -1"),  # unwrapped from Hydra
    ("inference.max_steps=abc", "'abc' of type 'str' could not be converted to Integer\n    full_key: inference.max_steps"),
])
def test_bad_options_are_one_clear_error_before_any_training(tmp_path, override, expected):
    """physppl's own checks give one ``physppl: error:`` line; Hydra's, for the options its structured configs
    type, name the key in its own short message; neither is a traceback, and no training step runs."""
    proc = _physppl(tmp_path, override)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert expected in out, out[-2000:]
    assert "Traceback" not in out and "step budget" not in out and "SVI:" not in out and "merged" not in out


@pytest.mark.parametrize("override, error, expected", [
    ("data.dmin=abc", "ConfigError", "data.dmin='abc': expected a number or None"),
    ("data.dmin=-1", "InstantiationException", "dmin must be > 0"),  # the CLI reports the ValueError inside
    ("n_draws=0", "ValueError", "n_draws must be >= 1"),
    ("data.simulate.n_images=ten", "ConfigCompositionException", "data.simulate.n_images=ten"),  # Hydra's check
    ("inference.optim.betas=[0.9,x]", "ConfigError", "expected a list of numbers"),
    ("data.bogus=1", "ConfigCompositionException", "data.bogus"),
])
def test_each_bad_option_is_named_before_any_work(tmp_path, override, error, expected, monkeypatch):
    from hydra import compose, initialize_config_module

    from physppl.cli import run
    from physppl.inference.svi import SVIEngine

    monkeypatch.setattr(SVIEngine, "run", lambda *a, **k: pytest.fail("training started"))
    with initialize_config_module("physppl.conf", version_base="1.3"):
        with pytest.raises(Exception) as err:
            run(compose("config", overrides=["+experiment=merging", *SIM, override]), tmp_path)
    assert type(err.value).__name__ == error and expected in str(err.value)


def test_help_lists_the_experiments_and_version_is_physppls(monkeypatch, capsys):
    from importlib.metadata import version

    from physppl.cli import main

    monkeypatch.setattr(sys, "argv", ["physppl", "--version"])
    main()
    assert capsys.readouterr().out.strip() == f"physppl {version('physppl')}"
    monkeypatch.setattr(sys, "argv", ["physppl", "--help"])
    main()
    out = capsys.readouterr().out
    for name in ("merging", "md_weights", "beam_sbi", "vae_ising", "vae_digits"):
        assert re.search(rf"^\s+\+experiment={name}\s+\S", out, re.M), out


@pytest.mark.slow  # over a minute: submitit's local executor signals at 30 s and kills at 60 s
def test_a_submitit_job_past_its_time_limit_requeues_and_resumes(tmp_path):
    """hydra/launcher=submitit_local with timeout_min=1: submitit sends its requeue signal after 30 s, physppl
    checkpoints and hands over to submitit, the requeued job resumes from the checkpoint (resume=auto) and
    finishes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cmd = [sys.executable, "-m", "physppl.cli", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1",
           "+experiment=merging", *SIM, *QUIET, "data.half_datasets=false", "inference.max_steps=4000",
           "inference.min_steps=4000", "inference.checkpoint_every=1000", "inference.resume=auto",
           f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    metrics = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert metrics["resumed_from"] > 0 and metrics["steps"] == 4000  # the requeued job went on from the checkpoint
    logs = "".join(p.read_text() for p in (tmp_path / ".submitit").rglob("*_log.*"))
    assert "Calling checkpoint method" in logs and "stopping at the next step boundary" in logs
