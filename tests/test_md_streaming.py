"""Frames that do not fit in memory: the frame store, streamed fits, the low-rank compression and its error bound."""
from __future__ import annotations

import h5py
import numpy as np
import pyro
import pytest
import torch

from physppl.guides.md_weights import DirichletFrameGuide
from physppl.inference.fit import fit as fit_model
from physppl.io.frame_store import FrameStoreWriter, open_frame_store
from physppl.io.frames import FrameInputError
from physppl.md_weights.data import MDWeightsDataSource
from physppl.md_weights.make_frames import write_trajectory_store
from physppl.md_weights.parts import ENGINES
from physppl.md_weights.streaming import LowRankFrames, StreamedFrames
from physppl.models.md_weights import FrameFactors, FrameWeightsModel, diffuse_intensity
from physppl.models.simulators.md_trajectory import SyntheticTrajectory


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    # 200-voxel chunks: the 2,000 voxels span 10 chunks, so minibatches and reads cross chunk boundaries
    sim = dict(n_frames=60, n_voxels=2000, state_masses=(0.2, 0.5, 0.3), seed=3)
    paths = write_trajectory_store(out, block_voxels=500, **sim)
    return out, paths, sim


def _engine(steps=120):
    return ENGINES["svi"].build(max_steps=steps, min_steps=steps, batch_size=400, batch_order="blocks",
                                checkpoint_every=0, progress=False)


def _fit(frames, data, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = FrameWeightsModel(frames, data.shell, groups=data.labels, has_sigma=True)
    guide = DirichletFrameGuide(model, groups=data.labels)
    fit = fit_model(model, guide, data.model_kwargs(), _engine(), n_draws=100, n_data=data.n_voxels)
    return fit.flat("w").double().numpy()


def test_streamed_fit_equals_in_memory_fit(small_store):
    """From disk as from memory: the same frame blocks to float32 rounding, and with the same numbers in memory the
    same model, guide, seeds and minibatches give the same posterior."""
    _, paths, _ = small_store
    source = MDWeightsDataSource(frames=paths["frames"], observed=paths["observed"], read_ahead=True)
    data = source.prepare(*source.load())
    assert isinstance(data.frames, StreamedFrames)
    store = data.frames.store
    # the in-memory path's preparation (centre, then scale to model units) of the same rows
    re, im = store.read(0, store.n_rows)
    memory = FrameFactors(torch.from_numpy(re.copy()), torch.from_numpy(im.copy()), torch.arange(store.n_voxels))
    for part in (memory.re, memory.im, memory.mean_re, memory.mean_im):
        part /= data.x_scale ** 0.5
    memory.power /= data.x_scale
    for idx in (torch.arange(0, 400), torch.arange(1300, 2000), torch.tensor([5, 6, 7, 900, 1999])):
        disk, mem = data.frames.block(idx), memory.block(idx)
        for name in ("re", "im", "power", "mean_re", "mean_im"):
            torch.testing.assert_close(getattr(disk, name), getattr(mem, name), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(disk.local, mem.local)
    # Dirichlet draws are rejection samplers: a rounding-level change in a concentration can shift the random stream,
    # so the trajectory is compared on identical numbers held in memory
    full = data.frames.block(torch.arange(store.n_voxels))
    twin = FrameFactors.__new__(FrameFactors)
    twin.re, twin.im, twin.power, twin.mean_re, twin.mean_im = full.re, full.im, full.power, full.mean_re, full.mean_im
    twin.voxel, twin.count = full.local, full.count
    twin.offsets = torch.cat([full.count.new_zeros(1), full.count.cumsum(0)])
    twin.n_voxels, twin.n_frames, twin.sequential = store.n_voxels, store.n_frames, True
    w_disk, w_mem = _fit(data.frames, data), _fit(twin, data)
    assert data.frames.stats.bytes > 20 * store.nbytes  # 120 minibatches of a fifth of the store
    np.testing.assert_allclose(w_disk, w_mem, rtol=1e-5, atol=1e-7)


def test_streamed_job_recovers_state_masses(small_store, tmp_path):
    from physppl.md_weights.api import weigh_frames

    out, paths, sim = small_store
    result = weigh_frames(paths["frames"], paths["observed"], labels=str(out / "states.csv"), workdir=tmp_path,
                          engine=ENGINES["svi"].build(batch_size=400, progress=False), n_draws=200)
    masses = result.states.set_index("state")["mean"]
    for k, truth in enumerate(sim["state_masses"]):
        assert abs(masses[f"state{k}"] - truth) < 0.03, (masses, sim["state_masses"])
    m = result.metrics
    assert m["frames_store"] == paths["frames"] and "cc_fit_cc" not in m
    result.save(tmp_path)
    for name in ("posterior.nc", "weights.csv", "states.csv", "metrics.json", "diffuse_fit.mtz"):
        assert (tmp_path / name).is_file()


def test_command_line_low_rank_run(small_store, tmp_path):
    """``physppl +experiment=md_weights data.frames=store.h5 data.low_rank=K``: compressed in one pass, the x' error
    bound reported, masses recovered."""
    from hydra import compose, initialize_config_module

    import physppl.conf  # noqa: F401
    from physppl.cli import run

    out, paths, sim = small_store
    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=md_weights", f"data.frames={paths['frames']}",
                                           f"data.observed={paths['observed']}", f"data.labels={out / 'states.csv'}",
                                           "data.low_rank=24", "inference.progress=false", "cc_steps=200",
                                           "n_draws=100", "inference.max_steps=400", "inference.min_steps=100",
                                           "warm_start_steps=150"])
    metrics = run(cfg, tmp_path)
    assert metrics["low_rank_rank"] == 24 and 0 < metrics["low_rank_x_error_mean_rel"] < 0.05
    assert metrics["low_rank_x_error_max_rel"] <= metrics["low_rank_x_error_bound_max_rel"]
    assert not any(w.startswith("low_rank_error") for w in metrics["warnings"])
    for k, truth in enumerate(sim["state_masses"]):
        assert abs(metrics["state_mass_mean"][f"state{k}"] - truth) < 0.03
    assert (tmp_path / "posterior.nc").is_file() and (tmp_path / "weights.csv").is_file()


def test_low_rank_bound_holds_and_tightens(small_store):
    """The reported bound is above the measured x' error at every voxel, for any weights; more rank, less error."""
    _, paths, _ = small_store
    store = open_frame_store(paths["frames"])
    exact = StreamedFrames(store, scale=1.0, read_ahead=False)
    torch.manual_seed(0)
    weights = [torch.full((store.n_frames,), 1.0 / store.n_frames)]
    weights += [torch.distributions.Dirichlet(torch.full((store.n_frames,), a)).sample() for a in (0.1, 1.0, 10.0)]
    full = exact.block(torch.arange(store.n_voxels))
    errors = {}
    for rank in (2, 6, 20):
        lr = LowRankFrames.from_stream(exact, rank=rank, seed=1)
        block = lr.block()
        worst = []
        for w in weights:
            err = (diffuse_intensity(w, full).double() - diffuse_intensity(w, block).double()).abs()
            bound = lr.error_bound(w).double()
            assert bool((err <= bound * (1 + 1e-4) + 1e-6).all()), (rank, float((err - bound).max()))
            worst.append(float(err.mean() / diffuse_intensity(w, full).double().mean()))
        errors[rank] = worst
        assert lr.info["rank"] == rank and lr.info["build_read_gb"] > 0
        assert worst[0] < 1e-5  # uniform weights: the centred parts sum to zero, the mean of |F|^2 is kept exactly
    for k in (1, 2, 3):
        assert errors[20][k] < errors[6][k] < errors[2][k]
    # 3 states x 8 modes + independent noise: at rank 20, weights spread like Dirichlet(10) keep x' to 1% on
    # average (measured 0.5%); weights on a handful of frames see their incompressible noise (measured 10%)
    assert errors[20][3] < 0.01


def _raw_store(path, T=10, R=100, chunk=20, skip=None, dtype="f4", shape=None, complete=True):
    with h5py.File(path, "w") as fh:
        fh.attrs.update({"format": "physppl-frame-store", "version": 1, "n_frames": T, "cell": np.ones(6),
                         "spacegroup": "P 1", "complete": complete})
        shape = shape or (R, T)
        d = fh.create_dataset("re", shape=shape, dtype=dtype, chunks=(chunk, shape[1]), fillvalue=np.nan)
        for lo in range(0, R, chunk):
            if skip is None or lo != skip:
                d[lo:lo + chunk] = np.ones((min(chunk, R - lo), shape[1]))
        fh.create_dataset("offsets", data=np.arange(R + 1))
        fh.create_dataset("hkl", data=np.stack([np.arange(1, R + 1), np.zeros(R), np.zeros(R)], 1).astype(np.int32))
        fh.create_dataset("row_variance", data=np.ones(R))
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing_chunk", "'re' has 4 of 5 chunks; missing rows 40..59"),
    ("dtype", "'re' has dtype float64, expected float32"),
    ("shape", "'re' has shape (100, 9), expected (rows, 10)"),
    ("incomplete", "the store is incomplete"),
])
def test_bad_store_is_refused_on_opening(tmp_path, kind, message):
    args = {"missing_chunk": dict(skip=40), "dtype": dict(dtype="f8"), "shape": dict(shape=(100, 9)),
            "incomplete": dict(complete=False)}[kind]
    path = _raw_store(tmp_path / "bad.h5", **args)
    with pytest.raises(FrameInputError) as err:
        open_frame_store(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_nan_block_is_named_before_the_fit(small_store, tmp_path):
    import shutil

    _, paths, _ = small_store
    bad = tmp_path / "nan.h5"
    shutil.copy(paths["frames"], bad)
    with h5py.File(bad, "r+") as fh:
        fh["im"][700:705, 3] = np.nan
    source = MDWeightsDataSource(frames=str(bad), observed=paths["observed"])
    with pytest.raises(FrameInputError, match=r"dataset 'im' has non-finite values in rows 700\.\.704 \(5 rows"):
        source.load()


def test_nan_block_is_named_when_read_ahead_reaches_it(small_store, tmp_path):
    """Without the read-through (``check_store=false``) the reader threads check each block through its row means:
    a NaN is named by rows and dataset when its minibatch is read, announced or not; clean blocks pass."""
    import shutil

    _, paths, _ = small_store
    bad = tmp_path / "nan.h5"
    shutil.copy(paths["frames"], bad)
    with h5py.File(bad, "r+") as fh:
        fh["re"][1210, 7] = np.nan
    frames = StreamedFrames(open_frame_store(bad))
    assert frames.prefetch_depth == 2
    clean, dirty = torch.arange(0, 400), torch.arange(1200, 1600)
    frames.prefetch(dirty)
    assert frames.block(clean).n_voxels == 400
    with pytest.raises(FrameInputError, match=r"dataset 're' has non-finite values in rows 1210\.\.1210 \(1 rows"):
        frames.block(dirty)  # from the reader thread's future
    with pytest.raises(FrameInputError, match=r"rows 1210\.\.1210"):
        StreamedFrames(open_frame_store(bad), read_ahead=False).block(dirty)  # read in this thread


def test_store_and_observed_must_match(small_store, tmp_path):
    from physppl.io.frames import read_observed, write_intensity_mtz

    _, paths, _ = small_store
    obs = read_observed(paths["observed"])
    keep = np.arange(len(obs.intensity)) != 17
    write_intensity_mtz(tmp_path / "short.mtz", obs.hkl[keep], {"I": (obs.intensity[keep], "Intensity"),
                        "SIGI": (obs.sigma[keep], "Stddev")}, obs.cell, obs.spacegroup)
    source = MDWeightsDataSource(frames=paths["frames"], observed=str(tmp_path / "short.mtz"), check_store=False)
    with pytest.raises(FrameInputError, match="1 of the store's 2000 voxels have no observed intensity"):
        source.prepare(*source.load())
    with pytest.raises(FrameInputError, match="data.dmin cannot be used"):
        MDWeightsDataSource(frames=paths["frames"], observed=paths["observed"], dmin=3.0).load()


def test_writer_refuses_nan_and_leaves_no_partial_store(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(FrameInputError, match="non-finite structure factor in 're' at row 3"):
        with FrameStoreWriter(path, 4, np.ones((10, 3)), np.ones(10, dtype=int), complex_=False) as w:
            block = np.ones((10, 4))
            block[3, 1] = np.inf
            w.append(block)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_synthetic_trajectory_blocks_are_reproducible():
    sim = SyntheticTrajectory(n_frames=30, n_voxels=1000, seed=5)
    a, b = sim.block(500, 1000, 500), SyntheticTrajectory(n_frames=30, n_voxels=1000, seed=5).block(500, 1000, 500)
    np.testing.assert_array_equal(a.re, b.re)
    np.testing.assert_allclose(sim.true_weights.sum(), 1.0)
    assert len({tuple(h) for h in sim.hkl}) == 1000


def test_synthetic_cell_grows_so_large_maps_stay_within_d_min():
    """60 A while N voxels stay within d_min; beyond, the cell grows so the map's edge is d_min exactly (a 10^6-voxel
    map at 0.77 A would carry signals of exp(-9) and vanishing sigmas)."""
    small = SyntheticTrajectory(n_frames=10, n_voxels=1000)
    assert small.cell_edge == 60.0 and small.dhkl.min() > 1.4
    grown = SyntheticTrajectory(n_frames=10, n_voxels=1000, d_min=10.0)
    assert grown.cell_edge > 60.0
    assert grown.dhkl.min() == pytest.approx(10.0)
    assert SyntheticTrajectory(n_frames=10, n_voxels=1000, cell_edge=30.0).dhkl.min() == pytest.approx(30 / 8.544, rel=1e-3)


def test_engine_announces_each_next_minibatch():
    """A model with ``prefetch`` hears of every minibatch ``prefetch_depth`` steps (default one) before it is used."""
    from physppl.inference.svi import _announced

    heard = []
    stream = _announced(iter([torch.tensor([k]) for k in range(4)]), heard.append)
    assert int(next(stream)) == 0 and [int(h) for h in heard] == [1]
    assert int(next(stream)) == 1 and [int(h) for h in heard] == [1, 2]
    heard.clear()  # two ahead (the frame store's read-ahead): each minibatch announced two steps before its use
    stream = _announced(iter([torch.tensor([k]) for k in range(5)]), heard.append, depth=2)
    assert int(next(stream)) == 0 and [int(h) for h in heard] == [1, 2]
    assert int(next(stream)) == 1 and [int(h) for h in heard] == [1, 2, 3]
    assert int(next(stream)) == 2 and [int(h) for h in heard] == [1, 2, 3, 4]


@pytest.mark.parametrize("fmt", ["npz", "h5"])
def test_converted_store_matches_the_in_memory_preparation(tmp_path, fmt):
    """User frames stacked into a store (symmetry mates grouped by observed voxel, in the fit's order) give the
    model the same voxels, observations, normalisation and frame blocks as the in-memory path."""
    from physppl.md_weights.make_frames import convert_to_store, main, write_example

    paths = write_example(tmp_path / "in", fmt, labels=[0, 0, 1, 1, 2, 2], truth="frames", dmin=5.0)
    before = {p: open(p, "rb").read() for p in (paths["frames"], paths["observed"])}
    assert main(["--convert", paths["frames"], "--observed", paths["observed"], str(tmp_path / "store.h5")]) == 0
    assert {p: open(p, "rb").read() for p in before} == before  # inputs untouched
    mem_src = MDWeightsDataSource(frames=paths["frames"], observed=paths["observed"], use_bragg=False)
    disk_src = MDWeightsDataSource(frames=str(tmp_path / "store.h5"), observed=paths["observed"])
    mem, disk = mem_src.prepare(*mem_src.load()), disk_src.prepare(*disk_src.load())
    assert mem.n_voxels == disk.n_voxels and mem.info["n_frame_rows_used"] == disk.info["n_frame_rows_used"] > mem.n_voxels
    np.testing.assert_array_equal(mem.hkl, disk.hkl)
    torch.testing.assert_close(mem.y, disk.y)
    assert disk.x_scale == pytest.approx(mem.x_scale, rel=1e-5)
    idx = torch.arange(mem.n_voxels)
    a, b = mem.frames.block(idx), disk.frames.block(idx)
    torch.testing.assert_close(diffuse_intensity(torch.full((6,), 1 / 6), a),
                               diffuse_intensity(torch.full((6,), 1 / 6), b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="would overwrite an input"):
        convert_to_store(paths["frames"], paths["observed"], paths["frames"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_and_low_rank_fits_run_on_the_gpu(small_store, tmp_path):
    """``device=cuda``: blocks read from disk go to the GPU; the state masses agree with the CPU's."""
    from physppl.md_weights.api import weigh_frames

    out, paths, _ = small_store
    masses = {}
    for device in ("cpu", "cuda"):
        for rank in (None, 24):
            res = weigh_frames(paths["frames"], paths["observed"], labels=str(out / "states.csv"), low_rank=rank,
                               device=device, engine=ENGINES["svi"].build(batch_size=None if rank else 400,
                                                                         progress=False), n_draws=100)
            assert res.metrics["device"].startswith(device)
            masses[device, rank] = np.array(list(res.metrics["state_mass_mean"].values()))
    for rank in (None, 24):
        np.testing.assert_allclose(masses["cuda", rank], masses["cpu", rank], atol=0.01)
