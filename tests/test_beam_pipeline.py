"""The beam job end to end on a tiny budget: outputs, formats, reload, resume, bad input before any training."""
import json
import os
import subprocess
import sys

import arviz as az
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from physppl.cli import run
from physppl.inference.npe import load_posterior
from physppl.models.beam import PARAM_NAMES

TINY = ["+experiment=beam_sbi", "data.n_simulations=600", "data.n_observations=2", "inference.amortized.max_epochs=2",
        "inference.amortized.progress=false", "inference.focus.steps=40", "inference.focus.progress=false",
        "inference.focus.particles=32", "evaluate.sbc=20", "evaluate.sbc_draws=20", "evaluate.reference=false",
        "evaluate.plots=1", "n_draws=300", "evaluate.predictive_draws=50", "guide.n_transforms=1",
        "guide.hidden_dims=[16]", "guide.embedding_dims=[32]", "guide.context_dim=16"]


def _run(tmp_path, overrides, name="run"):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=TINY + [f"data.cache_dir={tmp_path / 'cache'}"] + overrides)
    return run(cfg, tmp_path / name), tmp_path / name


def test_default_job_writes_every_output(tmp_path):
    metrics, out = _run(tmp_path, [])
    for f in ("posterior.nc", "posterior.pt", "metrics.json", "calibration.json", "summary.csv", "pair_obs0.png",
              "predictive_obs0.png", "sbc_ranks.png", "coverage.png", "training.png", "losses.csv", "npe_checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("n_obs", "train_time", "infer_time", "coverage90_truth", "sbc_ks_p_min", "sample_1000_ms", "z_error_mu_x"):
        assert saved.get(key) is not None, key
    assert "focus_pareto_k_max" in saved  # null (JSON for NaN) when the tiny fit is far off
    idata = az.from_netcdf(out / "posterior.nc")
    for name in PARAM_NAMES:
        assert idata.posterior[name].dims == ("chain", "draw", "obs") and idata.posterior[name].shape == (1, 300, 2)
    assert idata.observed_data["x"].dims == ("obs", "point") and idata.observed_data["x"].shape == (2, 200)
    assert idata.posterior_predictive["x"].shape == (1, 50, 2, 200)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "obs")
    assert set(idata.constant_data.data_vars) == {f"{n}_true" for n in PARAM_NAMES}
    # every draw inside the prior box
    assert float(idata.posterior["sig_x"].min()) >= 0.1 and float(idata.posterior["flux"].max()) <= 2000
    calib = json.loads((out / "calibration.json").read_text())
    assert set(calib["sbc"]["ks_p"]) == set(PARAM_NAMES) and len(calib["per_observation"]) == 2
    post = load_posterior(out / "posterior.pt")
    x = idata.observed_data["x"].values
    assert post.sample(x[0], 7).shape == (7, 7) and post.sample(x, 3).shape == (3, 2, 7)
    assert post.param_names == PARAM_NAMES


def test_observed_file_single_scan_and_simulation_cache(tmp_path):
    from physppl.beam_sbi.data import BeamDataSource, fixed_observations
    from physppl.models.beam import KnifeEdgeBeamModel

    _, x = fixed_observations(KnifeEdgeBeamModel(), 1, seed=5)
    np.save(tmp_path / "scan.npy", x[0].double().numpy())
    metrics, out = _run(tmp_path, [f"data.observed={tmp_path / 'scan.npy'}", "evaluate.sbc=0", "inference.focus=null"])
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["mu_x"].dims == ("chain", "draw") and "constant_data" not in idata.groups()
    assert metrics["n_obs"] == 1 and "coverage90_truth" not in metrics
    cached = list((tmp_path / "cache").rglob("seed0_chunk0.pt"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns
    source = BeamDataSource(n_simulations=600, cache_dir=str(tmp_path / "cache"))
    theta, x = source.training_set(KnifeEdgeBeamModel())
    assert cached[0].stat().st_mtime_ns == before and theta.shape == (600, 7)  # re-used, not simulated again
    theta2, _ = BeamDataSource(n_simulations=12_000, cache_dir=str(tmp_path / "cache")).training_set(KnifeEdgeBeamModel())
    assert torch.equal(theta2[:600], theta) and len(list((tmp_path / "cache").rglob("seed0_chunk*.pt"))) == 2


def test_sequential_rounds_on_an_observed_csv_scan(tmp_path):
    """The documented command: physppl +experiment=beam_sbi inference.rounds=4 data.observed=scan.csv (tiny budget)."""
    from physppl.beam_sbi.data import fixed_observations
    from physppl.models.beam import KnifeEdgeBeamModel

    _, x = fixed_observations(KnifeEdgeBeamModel(), 1, seed=7)
    np.savetxt(tmp_path / "scan.csv", x[0].double().numpy())
    metrics, out = _run(tmp_path, [f"data.observed={tmp_path / 'scan.csv'}", "evaluate.sbc=0", "inference.rounds=2",
                                   "inference.simulations_per_round=300"])
    idata = az.from_netcdf(out / "posterior.nc")
    assert metrics["n_obs"] == 1 and idata.posterior["mu_x"].dims == ("chain", "draw")
    draws = idata.posterior["sig_x"].values.ravel()
    assert np.isfinite(draws).all() and ((draws > 0.1) & (draws < 0.6)).all()  # inside the prior's box


def test_resume_continues_training(tmp_path):
    fast = ["evaluate.sbc=0", "data.n_observations=1", "inference.focus=null", "evaluate.plots=0"]
    _run(tmp_path, fast, "r")
    m, _ = _run(tmp_path, fast + ["inference.amortized.resume=true",
                           "inference.amortized.max_epochs=3"], "r")
    assert m["resumed_from"] == 2 and m["epochs"] == 3


def test_bad_scans_fail_before_training(tmp_path):
    bad = np.full(200, 100.0)
    bad[17] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"bad.npy: scan 0, value 17 \(axis 'x', point 17\) is nan"):
        _run(tmp_path, [f"data.observed={tmp_path / 'bad.npy'}"])
    assert not (tmp_path / "run" / "npe_checkpoint.pt").exists()
    np.save(tmp_path / "short.npy", np.ones(199))
    with pytest.raises(ValueError, match="got shape \\(199,\\)"):
        _run(tmp_path, [f"data.observed={tmp_path / 'short.npy'}"])


def test_input_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    target = out / "posterior.nc"
    np.save(tmp_path / "x.npy", np.ones(200))
    os.replace(tmp_path / "x.npy", target.with_suffix(".npy"))
    target.write_bytes(b"mine")
    with pytest.raises(ValueError, match="refusing to overwrite|unknown scan format"):
        _run(tmp_path, [f"data.observed={target}"])
    assert target.read_bytes() == b"mine"


def test_command_line_reports_bad_scan_without_traceback(tmp_path):
    rows = ["axis,position,signal"] + [f"x,{p},{100}" for p in np.linspace(3, -3, 100)] + \
           [f"y,{p},{100}" for p in np.linspace(-3, 3, 100)]
    (tmp_path / "scan.csv").write_text("\n".join(rows) + "\n")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "physppl.cli", "+experiment=beam_sbi",
                           f"data.observed={tmp_path / 'scan.csv'}", f"hydra.run.dir={tmp_path / 'cli'}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "positions of axis 'x' are not strictly increasing" in proc.stderr
    assert "Traceback" not in proc.stderr
