"""The merging job end to end on tiny simulated data: outputs, formats, modes, reproducibility, bad input."""
import json
import os
import subprocess
import sys

import arviz as az
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs
from hydra import compose, initialize_config_module

from physppl.cli import run

TINY_DATA = ["data.simulate.dmin=4.5", "data.simulate.n_images=40", "n_draws=20"]
TINY = TINY_DATA + ["inference.max_steps=150", "inference.min_steps=150", "inference.progress=false"]


def _run(tmp_path, overrides, name="run", tiny=TINY):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=tiny + overrides)
    return run(cfg, tmp_path / name), tmp_path / name


def test_default_job_writes_every_output(tmp_path):
    metrics, out = _run(tmp_path, [])
    for f in ("merged.mtz", "posterior.nc", "summary.csv", "metrics.json", "cc_half.csv", "loss.png", "losses.csv", "scale.png",
              "wilson.png", "cc_half.png", "truth.png", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("final_loss", "train_time", "wall_time_total", "steps", "cc_half", "cc_truth", "coverage90", "n_obs",
                "n_refl", "intensity_norm"):
        assert key in saved and saved[key] is not None, key
    merged = rs.read_mtz(str(out / "merged.mtz"))
    assert {"F", "SIGF", "I", "SIGI", "N"} <= set(merged.columns)
    assert merged.spacegroup.hm == "P 43 21 2" and merged.cell.a == pytest.approx(79.3, abs=0.01)
    assert int(merged["N"].sum()) == saved["n_obs"]
    assert len(merged) == saved["n_refl"] and (merged["SIGF"] > 0).all() and (merged["F"] > 0).all()
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["F"].dims == ("chain", "draw", "refl")
    assert idata.posterior["F"].shape == (1, 20, saved["n_refl"])
    assert "H" in idata.posterior.coords and "dHKL" in idata.posterior.coords
    assert idata.log_likelihood["I"].dims == ("chain", "draw", "obs")
    assert idata.observed_data["I"].shape == (saved["n_obs"],)
    # summary.csv rows are named by Miller index, with H, K, L beside them
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    first = summary.iloc[0]
    assert summary.index[0] == f"F[{first['H']} {first['K']} {first['L']}]"


def test_anomalous_mode_writes_friedel_columns(tmp_path):
    metrics, out = _run(tmp_path, ["+experiment=merging_anomalous"])
    merged = rs.read_mtz(str(out / "merged.mtz"))
    assert {"F(+)", "SIGF(+)", "F(-)", "SIGF(-)", "I(+)", "I(-)", "N(+)", "N(-)"} <= set(merged.columns)
    assert "cc_anom_half" in metrics
    both = merged["F(+)"].notna() & merged["F(-)"].notna()
    assert both.sum() > 0.5 * len(merged)


def test_baseline_runs_with_the_same_outputs(tmp_path):
    metrics, out = _run(tmp_path, ["+experiment=merging_baseline"], tiny=TINY_DATA)
    assert metrics["engine"] == "weighted_mean"
    for f in ("merged.mtz", "posterior.nc", "metrics.json", "cc_half.csv"):
        assert (out / f).is_file()
    assert metrics["cc_truth"] > 0.9


def test_resume_continues_from_checkpoint(tmp_path):
    _run(tmp_path, ["data.half_datasets=false", "inference.max_steps=100", "inference.min_steps=300"], "r")
    m, _ = _run(tmp_path, ["data.half_datasets=false", "inference.resume=true", "inference.max_steps=200",
                           "inference.min_steps=300"], "r")
    assert m["resumed_from"] == 100 and m["steps"] == 200


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mtz"):
        _run(tmp_path, [f"data.path={tmp_path / 'nope.mtz'}"])


def test_input_is_never_overwritten(tmp_path, small_sim):
    out = tmp_path / "run"
    out.mkdir()
    target = out / "merged.mtz"
    small_sim[0].write_mtz(str(target))
    before = target.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite the input file"):
        _run(tmp_path, [f"data.path={target}", "data.half_datasets=false"])
    assert target.read_bytes() == before


def test_command_line_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "notes.mtz"
    bad.write_text("not an mtz")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "physppl.cli", f"data.path={bad}",
                           f"hydra.run.dir={tmp_path / 'cli'}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "is not a readable MTZ file" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a subprocess sweep; tests/test_sweeps.py runs one in the default suite
def test_hydra_multirun_jobs_are_independent(tmp_path):
    """Two identical jobs in one sweep (Hydra's basic launcher runs them in one process) give the same result."""
    cmd = [sys.executable, "-m", "physppl.cli", "-m", *TINY, "data.half_datasets=false",
           "log_likelihood=false", "seed=0,0", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    a, b = (json.loads(p.read_text()) for p in runs)
    assert a["final_loss"] == b["final_loss"] and a["cc_truth"] == b["cc_truth"]
    # identical posteriors, not only similar summaries (the control is in tests/test_sweeps.py)
    draws = [az.from_netcdf(p.parent / "posterior.nc").posterior["F"].values for p in runs]
    np.testing.assert_array_equal(draws[0], draws[1])


def test_resume_with_half_datasets_starts_halves_fresh_when_not_reached(tmp_path):
    """A run stopped before its half-dataset fit resumes the main fit and runs the halves from scratch."""
    _run(tmp_path, ["data.half_datasets=false", "inference.max_steps=100", "inference.min_steps=300"], "h")
    assert not (tmp_path / "h" / "checkpoint_halves.pt").exists()
    m, out = _run(tmp_path, ["inference.resume=true", "inference.max_steps=150", "inference.min_steps=300"], "h")
    assert m["resumed_from"] == 100 and "cc_half" in m
    assert (out / "checkpoint_halves.pt").is_file()
