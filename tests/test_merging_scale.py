"""The merging path for large (serial / XFEL-like) data sets: the vectorised simulator, linear-time preparation,
minibatch SVI, and posterior.nc without the pointwise log-likelihood when it would not fit. Quick (a few seconds
each); the sizes themselves are measured by experiments/benchmarks/scale_merging.py."""
from __future__ import annotations

import logging

import arviz as az
import numpy as np
import pytest
import torch

from physppl.merging import api
from physppl.merging.api import merge
from physppl.merging.data import MergingDataSource, prepare, unique_rows
from physppl.merging.parts import ENGINES
from physppl.models.simulators.merging import simulate_xfel

METADATA = ("dHKL", "XDET", "YDET", "EWALD_OFFSET")
# small crystal, low resolution: ~2,600 unique reflections, ~8 observations each from 20,000 spots on 133 stills
SMALL = dict(n_obs=20_000, dmin=3.0, seed=1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _source(**kw):
    return MergingDataSource(simulate=lambda: simulate_xfel(**SMALL), metadata=METADATA, half_datasets=False, **kw)


def _engine(steps=400):
    return ENGINES["svi"].build(progress=False, max_steps=steps, min_steps=steps)


def test_simulate_xfel_shapes_and_truth():
    ds, truth = simulate_xfel(n_obs=5000, refl_per_image=100, seed=3)
    assert len(ds) == 5000
    assert ds["BATCH"].nunique() == pytest.approx(50, abs=2)
    for c in ("I", "SIGI", "XDET", "YDET", "EWALD_OFFSET", "PARTIALITY_TRUE", "SCALE_TRUE"):
        assert c in ds.columns
    p = ds["PARTIALITY_TRUE"].to_numpy(float)
    assert (p > 0).all() and (p <= 1).all() and p.min() < 0.1  # partials, some very partial
    assert truth["N_OBS"].sum() == 5000
    # an observation's expected intensity is SCALE_TRUE * F^2 of its ASU reflection
    asu = ds.hkl_to_asu()
    f = truth["F"].reindex(asu.index).to_numpy(float)
    ratio = ds["I"].to_numpy(float) / (ds["SCALE_TRUE"].to_numpy(float) * f**2)
    strong = ds["I"].to_numpy(float) > 10 * ds["SIGI"].to_numpy(float)
    assert np.median(ratio[strong]) == pytest.approx(1.0, abs=0.05)


def test_unique_rows_is_numpys_unique():
    rng = np.random.default_rng(0)
    for rows in (rng.integers(-40, 40, (2000, 3)), rng.integers(-3, 3, (500, 5)),
                 np.column_stack([np.zeros(50, int), rng.integers(0, 10**12, 50)])):  # sparse: the sorting path
        u, inv = np.unique(rows, axis=0, return_inverse=True)
        u2, inv2 = unique_rows(rows)
        np.testing.assert_array_equal(u, u2)
        np.testing.assert_array_equal(inv.reshape(-1), inv2)


def test_prepare_maps_xfel_spots_to_their_reflections():
    ds, truth = simulate_xfel(n_obs=20_000, seed=2)
    data = prepare(ds, metadata=METADATA)
    assert data.n_obs == 20_000 and data.n_images == ds["BATCH"].nunique()
    seen = truth[truth["N_OBS"] > 0]
    assert data.n_refl == len(seen)
    np.testing.assert_array_equal(data.n_per_refl(), seen.sort_index()["N_OBS"].to_numpy())


def test_auto_batch_size_minibatches_only_large_data(monkeypatch):
    engine = _engine()
    assert api._minibatched(engine, 10_000, "auto") is engine  # small data: full batch, as before
    assert api._minibatched(engine, api.AUTO_FULL_BATCH + 1, "auto").batch_size == api.AUTO_BATCH_SIZE
    assert api._minibatched(engine, 10_000, 512).batch_size == 512
    assert api._minibatched(engine, 10_000, None) is engine
    assert engine.batch_size is None  # the caller's engine is not changed


def test_minibatched_merge_recovers_truth():
    """Minibatches of 2,048 of 20,000 observations (10% a step, 400 steps = 40 epochs) with the per-shot scale:
    CC of the merged F to the truth measured 0.926 for simulation seeds 1 and 2 (full batch, same steps: 0.963 and
    0.966; the conventional weighted-mean merge: 0.848), so 0.9 leaves room for other platforms while a minibatch
    path that does not learn (a wrongly scaled ELBO, a scale that never moves) stays near the conventional merge."""
    res = merge(_source(), engine=_engine(), scale="mlp_shot", batch_size=2048, initial_merge={"block_size": 1},
                n_draws=20, threads=1)
    assert res.metrics["batch_size"] == 2048
    assert res.metrics["steps"] == 400
    assert res.metrics["cc_truth"] > 0.9
    assert "log_likelihood" in res.idata.groups()  # 20 draws x 20,000 observations: within the limit


def test_log_likelihood_skipped_with_a_note(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="physppl.merging.api"):
        res = merge(_source(), engine=_engine(60), scale="mlp_shot", batch_size=4096, n_draws=10, threads=1,
                    max_log_likelihood_values=100_000, workdir=tmp_path)
    notes = [r.getMessage() for r in caplog.records if "without the pointwise log-likelihood" in r.getMessage()]
    assert notes and "max_log_likelihood_values=100000" in notes[0]
    assert res.metrics["log_likelihood"] == "skipped"
    res.save(tmp_path, figures=False)
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert "log_likelihood" not in idata.groups()
    assert idata.posterior["F"].shape[-1] == res.metrics["n_refl"]
    assert idata.observed_data["I"].shape[-1] == 20_000


def _scale_merging():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "scale_merging.py"
    spec = importlib.util.spec_from_file_location("scale_merging", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_careless_anchor_input_rate_and_table(tmp_path, capsys):
    """The careless anchor's pieces that need no careless: its unmerged MTZ (the data set physppl merges, the
    metadata columns careless reads), the rate from a stopped run's progress bar, and the printed table."""
    import reciprocalspaceship as rs

    sm = _scale_merging()
    unmerged, truth_path = sm.write_careless_input(3000, tmp_path, seed=4)
    ds, truth = rs.read_mtz(str(unmerged)), rs.read_mtz(str(truth_path))
    sim, sim_truth = simulate_xfel(n_obs=3000, seed=4)
    assert {"BATCH", "I", "SIGI", "XDET", "YDET", "EWALD_OFFSET"} <= set(ds.columns) and len(ds) == 3000
    np.testing.assert_allclose(ds["I"].to_numpy(float), sim["I"].to_numpy(float))
    assert len(truth) == len(sim_truth) and "F" in truth.columns
    log = tmp_path / "careless.log"
    log.write_text("Training:  5%|| 50/1000 [01:40<31:40, 2.00s/it]\rTraining:  6%|| 60/1000 [02:00<31:20, 2.00s/it]")
    assert sm._progress_rate(log) == (60, 2.0)
    assert sm._progress_rate(tmp_path / "missing.log")[0] == 0
    rows = [{"n_obs": 10**5, "wall_s": 40.0, "s_per_step": 0.08, "steps": 2000, "peak_gb": 1.0},
            {"n_obs": 10**6, "wall_s": 350.0, "s_per_step": 0.08, "steps": 2000, "peak_gb": 3.0},
            {"method": "careless", "n_obs": 10**6, "wall_s": 900.0, "s_per_step": 4.0, "steps": 200}]
    sm.print_table(rows)
    out = capsys.readouterr().out
    assert "fitted exponent of wall_s" in out and "| careless | 1000000 |" in out
