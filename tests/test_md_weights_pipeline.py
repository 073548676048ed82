"""The md_weights job end to end on tiny settings: outputs, user files, resume, and refusing to overwrite inputs."""
import json
import subprocess
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs
from hydra import compose, initialize_config_module

from physppl.md_weights.make_frames import write_example
from physppl.cli import run

TINY = ["data.simulate.labels=[0,0,1,1,2,2]", "data.simulate.truth=frames", "data.simulate.dmin=5.0",
        "warm_start.steps=40", "cc_baseline.steps=60", "n_draws=40", "inference.progress=false"]
SHORT_SVI = ["inference.max_steps=120", "inference.min_steps=120"]


def _cfg(*overrides, svi=True):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=["+experiment=md_weights", *TINY, *(SHORT_SVI if svi else []), *overrides])


def test_default_run_writes_every_output(tmp_path):
    metrics = run(_cfg(), tmp_path)
    for name in ("weights.csv", "states.csv", "diffuse_fit.mtz", "cc_shells.csv", "posterior.nc", "summary.csv",
                 "metrics.json", "weights.png", "states.png", "fit_by_shell.png", "cc_shells.png", "loss.png", "losses.csv"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("cc", "cc_fit_cc", "n_eff", "state_mass_mean", "state_mass_max_error", "cc_fit_state_mass_max_error",
                "min_contraction", "steps", "peak_rss_mb"):
        assert key in saved, key
    weights = pd.read_csv(tmp_path / "weights.csv")
    assert list(weights.columns[:6]) == ["frame", "state", "mean", "sd", "q05", "q95"] and len(weights) == 6
    assert np.isclose(weights["mean"].sum(), 1.0, atol=1e-3) and (weights["q05"] <= weights["q95"]).all()
    states = pd.read_csv(tmp_path / "states.csv")
    assert states["state"].tolist() == ["A", "B", "C"] and "true" in states and "cc_fit" in states
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert idata.posterior["w"].dims == ("chain", "draw", "frame")
    assert idata.posterior["state"].values.tolist() == ["A", "A", "B", "B", "C", "C"]
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "voxel")
    # the sweep objective: PSIS-LOO of the joint (diffuse + Bragg) log-likelihood per voxel, as ArviZ computes it
    joint = idata.log_likelihood["y"] + idata.log_likelihood["y_bragg"]
    elpd = az.loo(az.InferenceData(posterior=idata.posterior, log_likelihood=joint.astype("float64").to_dataset(
        name="y"))).elpd_loo
    assert np.isfinite(saved["elpd_loo"]) and saved["elpd_loo"] == pytest.approx(elpd, abs=1e-5)
    assert saved["elpd_loo"] < float(joint.mean("draw").sum())  # LOO costs fit against the in-sample mean
    fit = rs.read_mtz(str(tmp_path / "diffuse_fit.mtz"))
    assert {"IOBS", "SIGIOBS", "IPRED", "SIGIPRED", "XPRED", "XCCFIT"} <= set(fit.columns)
    assert len(fit) == metrics["n_voxels"] and fit.spacegroup.xhm().replace(" ", "") == "P212121"


def test_user_files_nuts_and_the_logistic_normal_guide(tmp_path):
    paths = write_example(tmp_path / "in", "npz", labels=[0, 0, 1, 1, 2, 2], truth="frames", dmin=5.0)
    before = {p: Path(p).read_bytes() for p in paths.values()}
    metrics = run(_cfg(f"data.frames={paths['frames']}", f"data.observed={paths['observed']}",
                       f"data.bragg={paths['bragg']}", "guide=md_logistic_normal", "model.likelihood=student_t",
                       "data.shell_weighting=equal", "data.n_shells=3"), tmp_path / "svi")
    assert metrics["bragg"] and metrics["n_frames"] == 6 and metrics["engine"] == "svi"
    assert {p: Path(p).read_bytes() for p in paths.values()} == before  # inputs untouched
    nuts = run(_cfg("data.simulate.labels=[0,0,0,1,1,1]", "data.use_bragg=false", "inference=nuts",
                    "inference.num_samples=30", "inference.warmup_steps=30", "inference.num_chains=1",
                    "inference.max_tree_depth=5", svi=False), tmp_path / "nuts")
    assert nuts["engine"] == "nuts" and "max_rhat_w" in nuts and "divergences" in nuts


def test_resume_continues_from_the_checkpoint(tmp_path):
    run(_cfg("inference.max_steps=60", "inference.min_steps=60", "inference.checkpoint_every=30"), tmp_path)
    resumed = run(_cfg("inference.max_steps=100", "inference.min_steps=100", "inference.resume=true"), tmp_path)
    assert resumed["resumed_from"] == 60 and resumed["steps"] == 100


def test_refuses_to_overwrite_an_input(tmp_path):
    paths = write_example(tmp_path, "npz", labels=[0, 1], truth="frames", dmin=6.0)
    weights = tmp_path / "weights.csv"
    weights.write_text("weight\n1\n1\n")
    with pytest.raises(ValueError, match="refusing to overwrite the input file"):
        run(_cfg(f"data.frames={paths['frames']}", f"data.observed={paths['observed']}",
                 f"data.prior_weights={weights}"), tmp_path)


def test_command_line_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "amplitudes.npz"
    np.savez(bad, F=np.abs(np.random.randn(3, 4)), hkl=np.eye(4, 3, dtype=int))
    obs = write_example(tmp_path / "ex", "npz", labels=[0, 1], truth="frames", dmin=6.0)["observed"]
    proc = subprocess.run([sys.executable, "-m", "physppl.cli", "+experiment=md_weights",
                           f"data.frames={bad}", f"data.observed={obs}", f"hydra.run.dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "look like amplitudes" in proc.stderr and "Traceback" not in proc.stderr
