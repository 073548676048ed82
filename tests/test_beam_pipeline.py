"""The beam job end to end on a tiny budget: outputs, formats, reload, resume, bad input before any training; the
Python function against the command line; the README's Python examples."""
import functools
import json
import os
import re
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

import physppl
from physppl.beam_sbi import parts
from physppl.beam_sbi.api import Evaluation
from physppl.cli import run
from physppl.guides.beam import knife_edge_flow
from physppl.inference.npe import SBIPlan, load_posterior
from physppl.inference.runner import comparable_metrics
from physppl.models.beam import PARAM_NAMES
from readme_tools import composed_configs

REPO = Path(__file__).resolve().parents[1]

TINY = ["+experiment=beam_sbi", "data.n_simulations=600", "data.n_observations=2", "inference.amortized.max_epochs=2",
        "inference.amortized.progress=false", "inference.focus.steps=40", "inference.focus.progress=false",
        "inference.focus.particles=32", "evaluate.sbc=20", "evaluate.sbc_draws=20", "evaluate.reference=false",
        "evaluate.plots=1", "n_draws=300", "evaluate.predictive_draws=50", "guide.n_transforms=1",
        "guide.hidden_dims=[16]", "guide.embedding_dims=[32]", "guide.context_dim=16",
        "inference.refinement.n_proposal=2000", "inference.refinement.mcmc_steps=5",
        "inference.refinement.max_mcmc_steps=10", "inference.refinement.smc_particles=1000",
        "inference.refinement.smc_max_moves=8"]


# what the command line writes besides Result.save: Hydra's records, the log, the checkpoints of a resumable run
NOT_SAVED = ("npe_checkpoint.pt",)


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def _run(tmp_path, overrides, name="run"):
    cfg = _compose(TINY + [f"data.cache_dir={tmp_path / 'cache'}"] + overrides)
    return run(cfg, tmp_path / name), tmp_path / name


def _tiny_python(cache_dir, **kwargs):
    """``physppl.infer_beam`` with the TINY + LEAN settings spelled in Python: the presets the command line uses,
    shrunk; no SBC and no plots (they are checked by test_default_job_writes_every_output)."""
    plan = parts.PLANS["npe"].build(amortized=parts.NPE_TRAINER.build(max_epochs=2, progress=False),
                                    focus=parts.FOCUS.build(steps=40, particles=32, progress=False),
                                    refinement=parts.BEAM_REFINE.build(n_proposal=2000, mcmc_steps=5, max_mcmc_steps=10,
                                                                       smc_particles=1000, smc_max_moves=8))
    flow = functools.partial(knife_edge_flow, n_transforms=1, hidden_dims=[16], embedding_dims=[32], context_dim=16)
    evaluate = Evaluation(sbc=0, sbc_draws=20, reference=False, plots=0, predictive_draws=50)
    return physppl.infer_beam(None, flow=flow, plan=plan, n_draws=300, evaluate=evaluate, n_simulations=600,
                              n_observations=2, cache_dir=str(cache_dir), **kwargs)


LEAN = ["evaluate.sbc=0", "evaluate.plots=0"]


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file() and not p.name.endswith(".log")
            and p.name not in NOT_SAVED}


def test_default_job_writes_every_output(tmp_path):
    metrics, out = _run(tmp_path, [])
    for f in ("posterior.nc", "posterior.pt", "metrics.json", "calibration.json", "summary.csv", "pair_obs0.png", "expected_coverage.png",
              "predictive_obs0.png", "sbc_ranks.png", "coverage.png", "training.png", "losses.csv", "npe_checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert not (out / "loss.png").exists()  # the loss curves are in training.png
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("n_obs", "train_time", "infer_time", "coverage90_truth", "sbc_ks_p_min", "sample_1000_ms", "z_error_mu_x"):
        assert saved.get(key) is not None, key
    assert "focus_pareto_k_worst" in saved and "refine_pareto_k_max" in saved  # null (JSON for NaN) when far off
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
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert {f"{n}[{k}]" for n in PARAM_NAMES for k in range(2)} == set(summary.index)
    assert summary.loc["mu_x[1]", "obs"] == 1 and summary.loc["flux[0]", "obs"] == 0
    mean = float(idata.posterior["mu_x"].isel(obs=1).mean())
    assert summary.loc["mu_x[1]", "mean"] == pytest.approx(mean, rel=0.01, abs=1e-3)


def test_python_function_matches_the_command_line(tmp_path):
    """physppl.infer_beam with the TINY + LEAN settings and the same seed gives the command line's metrics (timings
    aside) and posterior draws, and Result.save writes the files of the command line's run directory."""
    cli_metrics, cli_out = _run(tmp_path, LEAN, "cli")
    res = _tiny_python(tmp_path / "cache")
    assert comparable_metrics(res.metrics) == comparable_metrics(cli_metrics)
    cli_post = az.from_netcdf(cli_out / "posterior.nc")
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(res.idata.posterior[name].values, cli_post.posterior[name].values)
    np.testing.assert_array_equal(res.idata.posterior_predictive["x"].values, cli_post.posterior_predictive["x"].values)
    assert res.draws.shape == (2, 300, 7)
    np.testing.assert_array_equal(res.draws[1, :, 0].numpy(), cli_post.posterior["mu_x"].isel(chain=0, obs=1).values)
    out = res.save(tmp_path / "py")
    assert _files(out) == _files(cli_out)
    assert json.loads((out / "metrics.json").read_text()) == res.metrics
    assert json.loads((out / "calibration.json").read_text()).keys() == res.calibration.keys()


def test_observed_file_single_scan_and_simulation_cache(tmp_path):
    from physppl.beam_sbi.data import BeamDataSource, fixed_observations
    from physppl.models.beam import KnifeEdgeBeamModel

    _, x = fixed_observations(KnifeEdgeBeamModel(), 1, seed=5)
    np.save(tmp_path / "scan.npy", x[0].double().numpy())
    # (the plots are checked by test_default_job_writes_every_output)
    metrics, out = _run(tmp_path, [f"data.observed={tmp_path / 'scan.npy'}", "evaluate.sbc=0", "inference.focus=null",
                                   "evaluate.plots=0"])
    idata = az.from_netcdf(out / "posterior.nc")
    # one scan keeps the obs dim (size 1): the same layout whatever the number of scans
    assert idata.posterior["mu_x"].dims == ("chain", "draw", "obs") and idata.posterior["mu_x"].shape == (1, 300, 1)
    assert "constant_data" not in idata.groups() and idata.observed_data["x"].shape == (1, 200)
    np.testing.assert_allclose(idata.observed_data["x"].values[0], x[0].double().numpy(), rtol=1e-6)
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
                                   "inference.simulations_per_round=300", "evaluate.plots=0"])
    idata = az.from_netcdf(out / "posterior.nc")
    assert metrics["n_obs"] == 1 and idata.posterior["mu_x"].dims == ("chain", "draw", "obs")
    assert metrics["rounds"] == 2 and idata.posterior["mu_x"].sizes["obs"] == 1
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


def test_command_line_reports_bad_scan_without_traceback(tmp_path, monkeypatch, capfd):
    """The ``physppl`` command (its entry point, run in-process) exits with one line naming the problem."""
    from physppl import cli

    rows = ["axis,position,signal"] + [f"x,{p},{100}" for p in np.linspace(3, -3, 100)] + \
           [f"y,{p},{100}" for p in np.linspace(-3, 3, 100)]
    (tmp_path / "scan.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["physppl", "+experiment=beam_sbi", f"data.observed={tmp_path / 'scan.csv'}",
                                      f"hydra.run.dir={tmp_path / 'cli'}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    message = str(exit_info.value.code)
    assert message.startswith("physppl: error:") and "\n" not in message
    assert "positions of axis 'x' are not strictly increasing" in message and "scan.csv" in message
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "cli" / "npe_checkpoint.pt").exists()  # stopped before any training


# -- the README's Python examples, as printed, with the budgets shrunk by monkeypatching -----------------------------

def _readme_snippets(path: Path) -> list[str]:
    text = path.read_text().split("## From Python")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Each Python example of experiments/beam_sbi/README.md runs as printed; ``physppl.infer_beam`` is wrapped
    so that the README's (minutes-long) budgets become tiny ones: 600 simulations, 1 epoch, 20 focus steps, at
    most 2 scans, no exact reference, SBC or plots. Everything else (paths, plans, options) is the README's."""
    from physppl.beam_sbi.data import fixed_observations
    from physppl.models.beam import KnifeEdgeBeamModel

    real = physppl.infer_beam
    calls = []

    def shrink(plan):
        plan = parts.resolve_plan(plan)
        amortized = plan.amortized
        amortized.max_epochs, amortized.progress = 1, False
        if plan.focus is not None:
            plan.focus.steps, plan.focus.particles, plan.focus.progress = 20, 32, False
        if plan.refinement is not None:
            plan.refinement.n_proposal, plan.refinement.mcmc_steps, plan.refinement.max_mcmc_steps = 2000, 5, 10
            plan.refinement.smc_particles, plan.refinement.smc_max_moves = 1000, 8
        return plan

    def quick(scans=None, *, plan="npe", evaluate=Evaluation(), **kwargs):
        ev = evaluate if isinstance(evaluate, Evaluation) else Evaluation(**evaluate)
        calls.append({"scans": scans, "plan": plan, "evaluate": ev, **kwargs})
        kwargs.update(n_simulations=min(kwargs.get("n_simulations", 10_000), 600), cache_dir=str(tmp_path / "cache"),
                      n_observations=min(kwargs.get("n_observations", 10), 2), n_draws=300,
                      flow=functools.partial(knife_edge_flow, n_transforms=1, hidden_dims=[16], embedding_dims=[32],
                                             context_dim=16))
        small = Evaluation(reference=False, sbc=0, plots=0, predictive_draws=50)
        return real(scans, plan=shrink(plan), evaluate=small, **kwargs)

    monkeypatch.setattr(physppl, "infer_beam", quick)
    monkeypatch.chdir(tmp_path)
    _, x = fixed_observations(KnifeEdgeBeamModel(), 2, seed=3)
    np.save(tmp_path / "scans.npy", x.double().numpy())
    snippets = _readme_snippets(REPO / "experiments" / "beam_sbi" / "README.md")
    assert len(snippets) == 2
    for k, code in enumerate(snippets):
        namespace: dict = {}
        exec(compile(code, f"experiments/beam_sbi/README.md, Python example {k + 1}", "exec"), namespace)
        if k == 0:
            assert (tmp_path / "out" / "posterior.nc").is_file() and (tmp_path / "out" / "posterior.pt").is_file()
            assert namespace["draws"].shape == (1000, 2, 7) and namespace["res"].draws.shape == (2, 300, 7)
            assert namespace["posterior"].sample(x[0], 5).shape == (5, 7)
        else:
            assert isinstance(namespace["plan"], SBIPlan) and namespace["res"].metrics["n_obs"] == 2
    assert calls[0]["scans"] == "scans.npy" and len(calls) == 3
    assert calls[1]["plan"] == "npe_amortized" and calls[2]["n_simulations"] == 3000


def test_readme_command_lines_compose():
    """Every command line of the README's Run section is a valid configuration (no option renamed away)."""
    configs = composed_configs(REPO / "experiments" / "beam_sbi" / "README.md", "## Run")
    assert len(configs) == 8
    for overrides, cfg in configs:
        assert cfg.task == "physppl.beam_sbi.api.task", overrides
