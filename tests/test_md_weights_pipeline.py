"""The md_weights job end to end on tiny settings: outputs, user files, Python and the command line agreeing,
units, NUTS, resume, refusing to overwrite inputs, and bad input."""
import json
import sys
from functools import partial
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import reciprocalspaceship as rs
import torch
from hydra import compose, initialize_config_module
from hydra.core.singleton import Singleton
from pyro.infer.autoguide import AutoLowRankMultivariateNormal

import physppl
import physppl.conf  # noqa: F401  (registers the options in Hydra's ConfigStore, before any state is saved below)
from physppl.cli import main, run
from physppl.inference.runner import comparable_metrics
from physppl.md_weights.make_frames import write_example
from physppl.md_weights.parts import ENGINES
from physppl.models.md_weights import FrameWeightsModel

# 6 frames of the toy molecule at 5 A (~340 voxels), short fits; data.n_shells=4 only to keep fit_by_shell.png small
TINY_SIM = dict(labels=[0, 0, 1, 1, 2, 2], truth="frames", dmin=5.0)
TINY = ["data.simulate.labels=[0,0,1,1,2,2]", "data.simulate.truth=frames", "data.simulate.dmin=5.0", "data.n_shells=4",
        "warm_start_steps=40", "cc_steps=60", "n_draws=40", "inference.progress=false"]
SHORT_SVI = ["inference.max_steps=60", "inference.min_steps=60"]
# the user-files run, on the command line and from Python
USER_OPTIONS = ["guide=md_logistic_normal", "model.likelihood=student_t", "data.shell_weighting=equal",
                "data.n_shells=3"]


def _cfg(*overrides, svi=True):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=["+experiment=md_weights", *TINY, *(SHORT_SVI if svi else []), *overrides])


def _files(directory: Path) -> set[str]:
    """Every file a run left in ``directory``, but Hydra's own (.hydra/, logs) and checkpoints."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
            and ".hydra" not in p.parts and p.suffix != ".log" and not p.name.startswith("checkpoint")}


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """User files (frames.npz, diffuse.mtz, bragg.mtz) of 6 frames in 3 states, Bragg intensities for all but every
    tenth reflection, and the files' bytes before any run."""
    paths = write_example(tmp_path_factory.mktemp("md_user") / "in", "npz", labels=[0, 0, 1, 1, 2, 2], truth="frames",
                          dmin=5.0)
    bragg = rs.read_mtz(paths["bragg"])
    bragg.loc[np.arange(len(bragg)) % 10 != 3].copy().write_mtz(paths["bragg"])
    return paths, {p: Path(p).read_bytes() for p in paths.values()}


@pytest.fixture(scope="module")
def cli_user_run(example, tmp_path_factory):
    paths, _ = example
    out = tmp_path_factory.mktemp("md_cli")
    metrics = run(_cfg(f"data.frames={paths['frames']}", f"data.observed={paths['observed']}",
                       f"data.bragg={paths['bragg']}", *USER_OPTIONS), out)
    return out, metrics


@pytest.fixture(scope="module")
def python_user_run(example, tmp_path_factory):
    """The same job as ``cli_user_run`` from Python, saved with ``Result.save``."""
    paths, _ = example
    result = physppl.weigh_frames(
        paths["frames"], paths["observed"], bragg=paths["bragg"], shell_weighting="equal", n_shells=3,
        model=partial(FrameWeightsModel, likelihood="student_t"), guide="logistic_normal",
        engine=ENGINES["svi"].build(max_steps=60, min_steps=60, progress=False), warm_start_steps=40, cc_steps=60,
        n_draws=40, seed=0)
    out = result.save(tmp_path_factory.mktemp("md_python"))
    return result, out


def test_default_run_writes_every_output(tmp_path):
    metrics = run(_cfg(), tmp_path)
    for name in ("weights.csv", "states.csv", "diffuse_fit.mtz", "cc_shells.csv", "posterior.nc", "summary.csv",
                 "metrics.json", "weights.png", "states.png", "fit_by_shell.png", "cc_shells.png", "loss.png", "losses.csv"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    for key in ("cc", "cc_fit_cc", "n_eff", "state_mass_mean", "state_mass_max_error", "cc_fit_state_mass_max_error",
                "min_contraction", "steps", "peak_rss_mb"):
        assert key in saved, key
    assert saved["steps"] == 60 and saved["problem"] == "md_weights"
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
    assert np.isfinite(saved["elpd_loo"]) and saved["elpd_loo"] == pytest.approx(elpd, rel=5e-6)  # 6 digits kept
    assert saved["elpd_loo"] < float(joint.mean("draw").sum())  # LOO costs fit against the in-sample mean
    fit = rs.read_mtz(str(tmp_path / "diffuse_fit.mtz"))
    assert {"IOBS", "SIGIOBS", "IPRED", "SIGIPRED", "XPRED", "XCCFIT"} <= set(fit.columns)
    assert len(fit) == metrics["n_voxels"] and fit.spacegroup.xhm().replace(" ", "") == "P212121"


def test_user_files_and_the_logistic_normal_guide(example, cli_user_run, python_user_run):
    paths, before = example
    _, metrics = cli_user_run
    assert metrics["bragg"] and metrics["n_frames"] == 6 and metrics["engine"] == "svi"
    assert 0.8 * metrics["n_voxels"] < metrics["n_bragg_matched"] < metrics["n_voxels"]
    result, _ = python_user_run
    assert result.data.n_shells == 3 and result.data.y_bragg is not None
    assert isinstance(result.fit.guide, AutoLowRankMultivariateNormal)  # guide=md_logistic_normal
    assert result.fit.model.likelihood == "student_t" and result.fit.model.voxel_weight is not None
    assert {p: Path(p).read_bytes() for p in paths.values()} == before  # inputs untouched by either run


def test_python_and_the_command_line_give_the_same_result(cli_user_run, python_user_run):
    """weigh_frames(...) and physppl +experiment=md_weights with the same settings and seed: the same metrics (but
    timings), the same posterior draws, and Result.save writes what the command line leaves in its run directory."""
    cli_dir, cli_metrics = cli_user_run
    result, py_dir = python_user_run
    assert comparable_metrics(result.metrics) == comparable_metrics(cli_metrics)
    saved = [json.loads((d / "metrics.json").read_text()) for d in (py_dir, cli_dir)]
    assert comparable_metrics(saved[0]) == comparable_metrics(saved[1])
    posteriors = [az.from_netcdf(d / "posterior.nc") for d in (py_dir, cli_dir)]
    np.testing.assert_array_equal(posteriors[0].posterior["w"].values, posteriors[1].posterior["w"].values)
    assert posteriors[0].groups() == posteriors[1].groups()
    for group in posteriors[0].groups():  # posterior, log_likelihood, observed_data: every value
        a, b = posteriors[0][group], posteriors[1][group]
        assert set(a.data_vars) == set(b.data_vars), group
        for name in a.data_vars:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{group}/{name}")
    assert _files(py_dir) == _files(cli_dir)
    assert {"posterior.nc", "metrics.json", "weights.csv", "diffuse_fit.mtz", "loss.png"} <= _files(py_dir)
    assert (cli_dir / "checkpoint.pt").exists() and not (py_dir / "checkpoint.pt").exists()  # no workdir: no files
    for name in sorted(f for f in _files(py_dir) if f.endswith(".csv")):  # weights, states, summary, losses, ...
        pd.testing.assert_frame_equal(pd.read_csv(py_dir / name), pd.read_csv(cli_dir / name), obj=name)


def test_posterior_is_in_the_units_of_the_data(example, python_user_run):
    """posterior.nc's observed y (and y_bragg) are the input's intensities, and scale * x'/m(w) + offset from its
    draws is the prediction diffuse_fit.mtz reports, which fits the observed intensities."""
    paths, _ = example
    result, out = python_user_run
    idata = az.from_netcdf(out / "posterior.nc")
    fit = rs.read_mtz(str(out / "diffuse_fit.mtz"))
    voxel = idata.observed_data["y"]
    hkl = np.stack([voxel["H"].values, voxel["K"].values, voxel["L"].values], 1)
    assert np.array_equal(hkl, fit.get_hkls())  # the same voxels in the same order
    # observed intensities as given in the input files, voxel by voxel; a voxel without a Bragg intensity has none
    for site, path in (("y", paths["observed"]), ("y_bragg", paths["bragg"])):
        given = rs.read_mtz(str(path))
        given_i = given["I"].to_numpy(float)
        lookup = dict(zip(map(tuple, given.get_hkls()), given_i))
        expect = np.array([lookup.get(tuple(h), np.nan) for h in hkl])
        present = np.isfinite(expect)
        assert present.all() if site == "y" else 0.8 < present.mean() < 1.0, site
        observed = idata.observed_data[site].values
        np.testing.assert_allclose(observed[present], expect[present], rtol=1e-5, atol=1e-6 * np.abs(given_i).max())
        assert np.isnan(observed[~present]).all(), site
    # and adds no term to the log-likelihood (the model masks it), so PSIS-LOO of that voxel is its diffuse term's
    missing = np.isnan(idata.observed_data["y_bragg"].values)
    ll_bragg = idata.log_likelihood["y_bragg"].values
    assert (ll_bragg[..., missing] == 0).all() and (ll_bragg[..., ~missing] != 0).all()
    assert np.isfinite(idata.log_likelihood["y"].values).all()
    np.testing.assert_allclose(idata.observed_data["y"].values, fit["IOBS"].to_numpy(float), rtol=1e-5,
                               atol=1e-6 * np.abs(fit["IOBS"].to_numpy(float)).max())
    # the prediction from posterior.nc's draws alone: scale and offset in the data's units, x'/m(w) unitless
    post = idata.posterior.stack(sample=("chain", "draw"))
    w = torch.as_tensor(post["w"].transpose("sample", "frame").values, dtype=torch.float32)
    with torch.no_grad():
        rel, _ = result.fit.model.predictions(w)
    pred = post["scale"].values[:, None] * rel.double().numpy() + post["offset"].values[:, None]
    n = pred.shape[0]
    ipred, sig = fit["IPRED"].to_numpy(float), fit["SIGIPRED"].to_numpy(float)
    assert np.all(np.abs(pred.mean(0) - ipred) <= 3 * sig / np.sqrt(n) + 1e-5 * np.abs(ipred).max())
    y = fit["IOBS"].to_numpy(float)
    assert np.corrcoef(pred.mean(0), y)[0, 1] > 0.9
    assert abs(pred.mean() - y.mean()) < 0.1 * y.std()  # the offset carries the data's level, the scale its spread
    assert 0.5 < pred.mean(0).std() / y.std() < 1.5


def test_nuts_from_the_command_line(tmp_path):
    nuts = run(_cfg("data.simulate.labels=[0,0,0,1,1,1]", "data.use_bragg=false", "inference=nuts",
                    "inference.num_samples=30", "inference.warmup_steps=30", "inference.num_chains=1",
                    "inference.max_tree_depth=3", svi=False), tmp_path)
    assert nuts["engine"] == "nuts" and "max_rhat_w" in nuts and "divergences" in nuts and not nuts["bragg"]
    # the runner's chain diagnostics over every posterior quantity (split halves of the one chain), and the
    # warning that follows from them
    assert nuts["r_hat_max"] > 0.9 and nuts["ess_bulk_min"] > 0
    assert (nuts["r_hat_max"] > 1.01) == any(w.startswith("r_hat_max") for w in nuts["warnings"])
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert idata.posterior.sizes["draw"] == 30 and "diverging" in idata.sample_stats


def test_resume_continues_from_the_checkpoint(tmp_path):
    # a run from Python with a work directory leaves a checkpoint there, which the command line resumes
    first = physppl.weigh_frames(
        simulate=TINY_SIM, n_shells=4, warm_start_steps=40, cc_steps=60, n_draws=40, workdir=tmp_path,
        engine=ENGINES["svi"].build(max_steps=40, min_steps=40, checkpoint_every=20, progress=False))
    assert first.metrics["steps"] == 40 and (tmp_path / "checkpoint.pt").exists()
    resumed = run(_cfg("inference.max_steps=60", "inference.min_steps=60", "inference.resume=true"), tmp_path)
    assert resumed["resumed_from"] == 40 and resumed["steps"] == 60
    losses = pd.read_csv(tmp_path / "losses.csv")
    assert len(losses) == 60 and np.allclose(losses["loss"].to_numpy()[:40], first.losses["loss"].to_numpy())


def test_refuses_to_overwrite_an_input(tmp_path):
    paths = write_example(tmp_path, "npz", labels=[0, 1], truth="frames", dmin=6.0)
    weights = tmp_path / "weights.csv"
    weights.write_text("weight\n1\n1\n")
    with pytest.raises(ValueError, match="refusing to overwrite the input file"):
        run(_cfg(f"data.frames={paths['frames']}", f"data.observed={paths['observed']}",
                 f"data.prior_weights={weights}"), tmp_path)


def test_command_line_reports_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    """``physppl`` (its entry point, in this process): bad input exits with one ``physppl: error:`` line."""
    bad = tmp_path / "amplitudes.npz"
    np.savez(bad, F=np.abs(np.random.randn(3, 4)), hkl=np.eye(4, 3, dtype=int))
    obs = write_example(tmp_path / "ex", "npz", labels=[0, 1], truth="frames", dmin=6.0)["observed"]
    monkeypatch.setattr(sys, "argv", ["physppl", "+experiment=md_weights", f"data.frames={bad}", f"data.observed={obs}",
                                      f"hydra.run.dir={tmp_path / 'out'}",
                                      # leave this process's logging as it is
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    state = Singleton.get_state()  # Hydra's global state, as its own tests restore it
    try:
        with pytest.raises(SystemExit) as stop:
            main()
    finally:
        Singleton.set_state(state)
    message = str(stop.value.code)
    assert message.startswith("physppl: error:") and "look like amplitudes" in message and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
