"""Sweeps end to end: Hydra's basic launcher, joblib, submitit (local), the optuna sweeper, and physppl-report.

Every sweep runs the merging job on a tiny simulated dataset (30 images at 5 A, 40 SVI steps, a few s a job).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import arviz as az
import numpy as np
import pandas as pd
import pyro
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from physppl import cli as app
from physppl.inference.plugins import PLUGINS, missing_plugins, require_plugins
from physppl.inference.report import find_runs, load_run, report_table, write_report

TINY = ["+experiment=merging", "data.simulate.dmin=5.0", "data.simulate.n_images=30", "inference.max_steps=40",
        "inference.min_steps=40", "inference.progress=false", "inference.checkpoint_every=0", "n_draws=40"]
GRID = ["model.likelihood=normal,student_t", "guide=folded_normal,truncated_normal"]
REPORT_COLUMNS = {"run", "status", "model.likelihood", "guide", "objective", "objective_value", "cc_half", "cc_truth",
                  "coverage90", "final_loss", "rank", "wall_time_s"}


def _physppl(*args, timeout=600, check=True):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "-c", "from physppl.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _report(sweep, command=False):
    """The sweep's report table: by the physppl-report command, or in this process (no figures)."""
    if command:
        proc = subprocess.run([sys.executable, "-m", "physppl.inference.report", str(sweep)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        write_report(sweep, plots=False)
    return pd.read_csv(sweep / "report" / "report.csv")


def _posterior_f(run_dir):
    return az.from_netcdf(run_dir / "posterior.nc").posterior["F"].values


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """The issue's 2x2 grid (likelihood x guide) with Hydra's basic launcher: four jobs in one process."""
    sweep = tmp_path_factory.mktemp("basic") / "sweep"
    _physppl("-m", *TINY, *GRID, f"hydra.sweep.dir={sweep}")
    return sweep


def test_basic_launcher_grid_gives_four_runs_and_a_report(basic_sweep):
    runs = sorted(p for p in basic_sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    for run in runs:
        for name in ("metrics.json", "posterior.nc", "losses.csv", "merged.mtz"):
            assert (run / name).is_file(), run / name
    table = _report(basic_sweep, command=True)
    assert len(table) == 4 and REPORT_COLUMNS <= set(table.columns)
    assert (table["status"] == "ok").all() and (table["objective"] == "cc_half").all()
    assert sorted(zip(table["model.likelihood"], table["guide"])) == sorted(
        (lik, g) for lik in ("normal", "student_t") for g in ("folded_normal", "truncated_normal"))
    np.testing.assert_allclose(table["objective_value"], table["cc_half"])
    # rank 1 is the highest CC1/2 (the merging objective is maximised)
    assert table.loc[table["rank"] == 1, "cc_half"].item() == table["cc_half"].max()
    for name in ("report.md", "report.png", "metrics.png", "losses.png", "compare.png", "compare.csv"):
        assert (basic_sweep / "report" / name).is_file(), name
    assert "| model.likelihood" in (basic_sweep / "report" / "report.md").read_text()


def test_report_compare_prefers_the_robust_likelihood_on_data_with_outliers(basic_sweep):
    """The simulated data carry 1% outliers: PSIS-LOO must rank both Student-t fits above both Normal fits."""
    write_report(basic_sweep, basic_sweep / "report_inproc", plots=False)
    compare = pd.read_csv(basic_sweep / "report_inproc" / "compare.csv", dtype={"run": str})
    assert len(compare) == 4
    likelihood = {r: load_run(basic_sweep / r).overrides["model.likelihood"] for r in compare["run"]}
    ranked = [likelihood[r] for r in compare.sort_values("rank")["run"]]
    assert ranked[:2] == ["student_t", "student_t"], compare


@pytest.mark.slow  # 30 s; the basic launcher test above covers the grid and the report in the default run
def test_joblib_launcher_runs_the_grid_in_parallel_with_the_same_posteriors(basic_sweep, tmp_path):
    sweep = tmp_path / "joblib"
    # half the grid (the folded-normal guide with each likelihood): jobs 0 and 1 here are jobs 0 and 2 there
    _physppl("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, GRID[0], "guide=folded_normal",
             f"hydra.sweep.dir={sweep}")
    table = _report(sweep)
    assert len(table) == 2 and (table["status"] == "ok").all()
    # worker processes and the one-process basic launcher agree job by job (same seed, config and thread count)
    for job, basic in (("0", "0"), ("1", "2")):
        assert load_run(sweep / job).overrides["model.likelihood"] == load_run(basic_sweep / basic).overrides["model.likelihood"]
        np.testing.assert_allclose(_posterior_f(sweep / job), _posterior_f(basic_sweep / basic), rtol=1e-5, atol=1e-6)


def _tiny_cfg(*extra):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=[*TINY, "data.half_datasets=false", *extra])


def test_jobs_in_one_process_share_no_parameters(tmp_path):
    """Two identical jobs in one process agree exactly and leave Pyro's global parameter store as it was; the
    control: the same job with another seed differs (so the agreement is not vacuous)."""
    pyro.get_param_store().clear()
    first, second = app.run(_tiny_cfg(), tmp_path / "a"), app.run(_tiny_cfg(), tmp_path / "b")
    assert first["final_loss"] == second["final_loss"] and first["cc_truth"] == second["cc_truth"]
    assert len(pyro.get_param_store()) == 0
    third = app.run(_tiny_cfg("seed=1"), tmp_path / "c")
    assert third["final_loss"] != pytest.approx(first["final_loss"], rel=1e-4)


def test_optuna_sweeper_runs_three_trials_on_the_objective(tmp_path):
    sweep = tmp_path / "optuna"
    _physppl("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
             "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0", *TINY, "inference.optim.lr=interval(0.005,0.05)",
             f"hydra.sweep.dir={sweep}")
    table = _report(sweep)
    assert len(table) == 3 and (table["status"] == "ok").all()
    lrs = [float(load_run(sweep / str(j)).overrides["inference.optim.lr"]) for j in range(3)]
    assert len(set(lrs)) == 3 and all(0.005 <= lr <= 0.05 for lr in lrs)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(table["cc_half"].max(), rel=1e-6)
    assert "Optuna: best value" in (sweep / "report" / "report.md").read_text()


def test_submitit_local_launcher_runs_one_job(tmp_path):
    sweep = tmp_path / "submitit"
    _physppl("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
             *TINY, "data.half_datasets=false", f"hydra.sweep.dir={sweep}")
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["cc_truth"] > 0.9
    assert (sweep / ".submitit").is_dir()


def test_submitit_slurm_launcher_config_composes():
    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=merging", "hydra/launcher=submitit_slurm",
                                           "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1"],
                      return_hydra_config=True)
    assert "SlurmLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.partition == "gpu"


def test_a_missing_plugin_names_what_to_install(tmp_path):
    proc = _physppl("-m", "hydra/launcher=ray", *TINY, f"hydra.sweep.dir={tmp_path / 'x'}", check=False)
    assert proc.returncode != 0
    assert "hydra-ray-launcher" in proc.stderr and "pip install" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_missing_sweep_extra_is_named(monkeypatch):
    monkeypatch.setattr("physppl.inference.plugins._installed", lambda module: False)
    assert [m[:2] for m in missing_plugins(["+experiment=vae_digits", "hydra/launcher=joblib",
                                            "hydra/sweeper=optuna"])] == [("launcher", "joblib"), ("sweeper", "optuna")]
    with pytest.raises(SystemExit, match=r"hydra-joblib-launcher.*\.\[sweep\]"):
        require_plugins(["hydra/launcher=joblib"])
    require_plugins(["hydra/launcher=basic", "model.likelihood=normal"])  # Hydra's own and plain overrides pass


def test_every_plugin_of_the_sweep_extra_is_installed_here():
    """The test extra brings the sweep extra, so the sweep tests above run rather than skip."""
    assert not missing_plugins([f"hydra/{g}={o}" for (g, o), p in PLUGINS.items() if p.extra == "sweep"])


def test_objective_value_names_the_metrics_when_the_objective_is_missing():
    cfg = OmegaConf.create({"objective": "cc_halff"})
    with pytest.raises(ValueError, match="cc_halff.*cc_half"):
        app.objective_value(cfg, {"cc_half": 0.9, "engine": "svi"})
    assert app.objective_value(OmegaConf.create({"objective": "cc_half"}), {"cc_half": None}) != \
        app.objective_value(OmegaConf.create({"objective": "cc_half"}), {"cc_half": None})  # NaN for optuna
    assert app.objective_value(OmegaConf.create({"objective": None}), {"cc_half": 0.9}) is None
    assert app.objective_value(cfg, {"cc_half": 0.9}, required=False) is None  # no optimising sweeper waits


# -- the report on hand-made run folders -------------------------------------------------------------------------

def _fake_run(path, overrides, metrics=None, losses=None):
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"task": "physppl.toy.api.task", "objective": "score",
                                     "objective_direction": "minimize", "report_metrics": ["score", "other"],
                                     "seed": 0}), path / ".hydra" / "config.yaml")
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if losses is not None:
        pd.DataFrame({"step": np.arange(1, len(losses) + 1), "loss": losses}).to_csv(path / "losses.csv", index=False)


def test_report_lists_failed_runs_and_ranks_by_the_objective_direction(tmp_path):
    root = tmp_path / "multirun"
    _fake_run(root / "0", ["+experiment=toy", "lr=0.1"], {"score": 2.0, "other": 1.0, "steps": 10}, [3.0, 2.0, 1.5])
    _fake_run(root / "1", ["+experiment=toy", "lr=0.01"], {"score": 1.0, "other": {"nested": 3}}, [4.0, 3.0])
    _fake_run(root / "2", ["+experiment=toy", "lr=1.0"])  # crashed: no metrics.json
    runs = [load_run(p, root) for p in find_runs(root)]
    table, shared = report_table(runs)
    assert list(table["run"]) == ["0", "1", "2"] and shared == {"experiment": "toy"}
    assert list(table["lr"]) == ["0.1", "0.01", "1.0"]
    assert list(table["status"]) == ["ok", "ok", "failed (no metrics.json)"]
    assert list(table["rank"].astype("float")[:2]) == [2.0, 1.0]  # minimised: the smaller score ranks first
    assert table["final_loss"].tolist()[:2] == [1.5, 3.0]
    out = write_report(root)
    assert (out / "report.png").is_file() and (out / "losses.png").is_file() and not (out / "compare.csv").exists()


def test_report_errors_are_specific(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_runs(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no runs under"):
        find_runs(tmp_path)
    _fake_run(tmp_path / "0", ["a=1"])
    (tmp_path / "0" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"0/metrics.json is not valid JSON"):
        load_run(tmp_path / "0")


def test_report_compares_runs_with_two_observed_sites_on_their_joint_log_likelihood(tmp_path):
    """Diffuse + Bragg per voxel: LOO of the joint per point; the model nearer the data generator ranks first."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    root = tmp_path / "multirun"
    for job, (shift, name) in enumerate([(0.0, "good"), (1.5, "bad")]):
        path = root / str(job)
        _fake_run(path, [f"model={name}"], {"score": 1.0})
        cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
        cfg.report_compare = True
        OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
        mu = shift + rng.normal(scale=0.1, size=(1, 200, 1))
        ll = -0.5 * (y - mu) ** 2 - 0.5 * np.log(2 * np.pi)
        az.from_dict(posterior={"mu": mu[..., 0]}, log_likelihood={"y": ll, "y_bragg": ll},
                     observed_data={"y": y, "y_bragg": y}, dims={"y": ["voxel"], "y_bragg": ["voxel"]}
                     ).to_netcdf(str(path / "posterior.nc"))
    write_report(root, plots=False)
    compare = pd.read_csv(root / "report" / "compare.csv", dtype={"run": str})
    assert list(compare.sort_values("rank")["run"]) == ["0", "1"]
    assert (compare["group"] == "toy: y+y_bragg").all()


@pytest.mark.slow  # a second optuna sweep (12 s); the fast suite runs one with the objective
def test_optuna_direction_that_contradicts_the_experiment_is_warned_about(tmp_path):
    cfg = _tiny_cfg("objective=cc_truth")  # optuna minimises by default; merging maximises
    assert app.check_sweeper(cfg, "minimize") == ("the sweeper will minimize cc_truth, but this experiment's "
                                                  "objective_direction is maximize: add hydra.sweeper.direction=maximize")
    assert app.check_sweeper(cfg, "maximize") is None and app.check_sweeper(cfg, None) is None
    # the whole command: no objective with an optimising sweeper stops before any job runs
    proc = _physppl("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", *TINY, "objective=null",
                    f"hydra.sweep.dir={tmp_path / 'none'}", check=False)
    assert proc.returncode != 0 and "an optimising sweeper needs a metric to optimise" in proc.stderr
    assert not list((tmp_path / "none").glob("*/metrics.json"))
