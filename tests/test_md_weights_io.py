"""Frames and observed intensities in every supported format, and a clear error for each kind of bad input."""
import numpy as np
import pytest
import reciprocalspaceship as rs
import torch
from pyro.infer import Trace_ELBO

from physppl.guides.md_weights import DirichletFrameGuide
from physppl.io.frames import (FrameInputError, read_frames, read_labels, read_observed, read_weights, write_frames,
                               write_intensity_mtz)
from physppl.md_weights.api import build_model
from physppl.md_weights.data import MDWeightsDataSource
from physppl.md_weights.make_frames import main as make_frames_main
from physppl.md_weights.make_frames import write_example
from physppl.models.md_weights import FrameWeightsModel
from physppl.models.simulators.md_frames import FrameSet

SMALL = dict(n_frames=6, dmin=5.0, n_truth_frames=6, seed=3)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("md_example")
    return out, write_example(out, "npz", **SMALL)


@pytest.mark.parametrize("fmt", ["npz", "npy", "h5", "mtz"])
def test_every_frames_format_reads_back_the_same(fmt, tmp_path, example):
    ref, _ = read_frames(example[1]["frames"])
    paths = write_example(tmp_path, fmt, **SMALL)
    frames, kind = read_frames(paths["frames"])
    assert kind == "complex" and frames.F.shape == ref.F.shape == (6, ref.hkl.shape[0])
    order = np.lexsort(frames.hkl.T[::-1])
    ref_order = np.lexsort(ref.hkl.T[::-1])
    assert np.array_equal(frames.hkl[order], ref.hkl[ref_order])
    # MTZ stores amplitude and phase in single precision
    np.testing.assert_allclose(np.asarray(frames.F)[:, order], ref.F[:, ref_order], rtol=2e-4, atol=2e-3)
    if fmt in ("npz", "h5"):  # labels travel with these; the others take them from data.labels (states.csv)
        assert np.array_equal(frames.state, ref.state)


def test_npy_frames_are_memory_mapped(tmp_path, example):
    paths = write_example(tmp_path, "npy", **SMALL)
    frames, _ = read_frames(paths["frames"])
    assert isinstance(frames.F, np.memmap)


def test_simulation_settings_are_checked_before_simulating(monkeypatch):
    """Frames of a real structure take minutes: a bad setting is reported before any is simulated."""
    import physppl.md_weights.data as data

    monkeypatch.setattr(data, "simulate_frames", lambda *a, **k: pytest.fail("simulated before checking settings"))
    with pytest.raises(ValueError, match="needs subset"):
        data.simulate_example(truth="subset")
    with pytest.raises(ValueError, match="truth must be"):
        data.simulate_example(truth="ensemble")
    with pytest.raises(ValueError, match="toy molecule only"):
        data.simulate_example(structure="no_such.pdb", observed_hinge_degrees=12.0)
    with pytest.raises(ValueError, match="state_masses"):
        data.simulate_example(state_masses=[0.5, 0.6, 0.0])


def test_make_frames_command(tmp_path, capsys):
    assert make_frames_main([str(tmp_path / "ex"), "--n-frames", "4", "--dmin", "6", "--format", "npz"]) == 0
    assert (tmp_path / "ex" / "frames.npz").exists() and (tmp_path / "ex" / "bragg.mtz").exists()
    assert make_frames_main([str(tmp_path / "bad"), "--truth", "subset"]) == 2
    assert "subset" in capsys.readouterr().err


def _stack(tmp_path, F, hkl, name="f.npz"):
    path = tmp_path / name
    np.savez(path, F=F, hkl=hkl)
    return path


def test_amplitudes_without_phases_are_refused(tmp_path):
    hkl = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(FrameInputError, match="look like amplitudes"):
        read_frames(_stack(tmp_path, np.abs(np.random.randn(3, 3)), hkl))
    frames, kind = read_frames(_stack(tmp_path, np.random.randn(3, 3), hkl), kind="real")
    assert kind == "real"
    with pytest.raises(FrameInputError, match="frames_kind=complex but the array has real dtype"):
        read_frames(_stack(tmp_path, np.random.randn(3, 3), hkl), kind="complex")


def test_mtz_frames_without_phase_column(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    hkl = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    for t in range(2):
        write_intensity_mtz(folder / f"frame_{t}.mtz", hkl, {"FC": (np.ones(3), "SFAmplitude")}, (10, 10, 10, 90, 90, 90), "P 1")
    with pytest.raises(FrameInputError, match="no phase column"):
        read_frames(folder)


def test_frames_with_different_reflection_sets(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cols = lambda n: {"FC": (np.ones(n), "SFAmplitude"), "PHIC": (np.zeros(n), "Phase")}  # noqa: E731
    write_intensity_mtz(folder / "frame_0.mtz", np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]), cols(3), (10, 10, 10, 90, 90, 90), "P 1")
    write_intensity_mtz(folder / "frame_1.mtz", np.array([[1, 0, 0], [0, 2, 0]]), cols(2), (10, 10, 10, 90, 90, 90), "P 1")
    with pytest.raises(FrameInputError, match=r"frame_1.mtz has 2 reflections, frame_0.mtz has 3, 1 in common"):
        read_frames(folder)


def test_non_finite_structure_factors_name_the_frame(tmp_path):
    F = np.ones((4, 3), complex)
    F[2, 1] = np.nan
    with pytest.raises(FrameInputError, match="first at frame 2, reflection 1"):
        read_frames(_stack(tmp_path, F, np.eye(3, dtype=int)))


@pytest.mark.parametrize("bad, message", [
    (dict(F=np.ones(3, complex)), r"shape \(frames, reflections\)"),
    (dict(hkl=np.ones((3, 2), int)), r"shape \(reflections, 3\)"),
    (dict(hkl=np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]])), "Miller indices repeat"),
])
def test_malformed_stacks(tmp_path, bad, message):
    args = {"F": np.ones((2, 3), complex), "hkl": np.eye(3, dtype=int), **bad}
    with pytest.raises(FrameInputError, match=message):
        read_frames(_stack(tmp_path, args["F"], args["hkl"]))


def test_missing_files_and_companions(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_frames(tmp_path / "nothing.npz")
    np.save(tmp_path / "f.npy", np.ones((2, 3), complex))
    with pytest.raises(FrameInputError, match="needs its Miller indices"):
        read_frames(tmp_path / "f.npy")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FrameInputError, match="folder of MTZ files, .npz, .npy or .h5"):
        read_frames(tmp_path / "f.txt")
    np.savez(tmp_path / "g.npz", G=np.ones(2))
    with pytest.raises(FrameInputError, match="needs arrays 'F'"):
        read_frames(tmp_path / "g.npz")


def test_labels_and_prior_weights(tmp_path):
    (tmp_path / "s.csv").write_text("state\nA\nB\nA\n")
    labels, names = read_labels(tmp_path / "s.csv", 3)
    assert labels.tolist() == [0, 1, 0] and names == ["A", "B"]
    with pytest.raises(FrameInputError, match="3 labels for 4 frames"):
        read_labels(tmp_path / "s.csv", 4)
    (tmp_path / "w.csv").write_text("weight\n1\n3\n")
    assert read_weights(tmp_path / "w.csv", 2).tolist() == [0.25, 0.75]
    (tmp_path / "w0.csv").write_text("weight\n1\n0\n")
    with pytest.raises(FrameInputError, match="finite and positive"):
        read_weights(tmp_path / "w0.csv", 2)


def test_observed_without_sigma_is_accepted(tmp_path):
    path = write_intensity_mtz(tmp_path / "y.mtz", np.array([[1, 0, 0], [0, 1, 0]]), {"I": (np.array([1.0, 2.0]), "Intensity")},
                               (10, 11, 12, 90, 90, 90), "P 21 21 21")
    table = read_observed(path)
    assert table.sigma is None and table.intensity.tolist() == [1.0, 2.0]


def _source_for(example_dir, **kw):
    paths = {"frames": str(example_dir / "frames.npz"), "observed": str(example_dir / "diffuse.mtz")}
    paths.update(kw)
    return MDWeightsDataSource(**paths)


def test_overlap_checks(tmp_path, example):
    out, paths = example
    src = _source_for(out)
    frames, kind, diffuse, bragg, truth = src.load()
    # observed reflections beyond the frames' resolution: fewer matches than asked for
    sparse = FrameSet(frames.F[:, ::4], frames.hkl[::4], frames.cell, frames.spacegroup, frames.state)
    strict = _source_for(out, min_overlap=0.9)
    with pytest.raises(FrameInputError, match=r"only \d+ of \d+ observed reflections .* data.min_overlap=0.9"):
        strict.prepare(sparse, kind, diffuse)
    data = src.prepare(sparse, kind, diffuse)  # the default (half) accepts it and fits the overlap
    assert data.info["n_matched"] < data.info["n_observed"] and data.n_voxels == data.info["n_matched"]
    # an index set that shares nothing with the data
    far = FrameSet(frames.F[:, :5], frames.hkl[:5] + 100, frames.cell, frames.spacegroup, frames.state)
    with pytest.raises(FrameInputError, match="no observed reflection is among the frames' reflections"):
        src.prepare(far, kind, diffuse)


def test_bragg_intensities_for_some_voxels_only(tmp_path, example):
    out, paths = example
    bragg = rs.read_mtz(paths["bragg"])
    part = tmp_path / "bragg_part.mtz"
    bragg.loc[np.arange(len(bragg)) % 4 != 0].copy().write_mtz(str(part))
    src = _source_for(out, bragg=str(part))
    data = src.prepare(*src.load())
    missing = ~torch.isfinite(data.y_bragg)
    assert 0.15 < float(missing.double().mean()) < 0.35 and bool(torch.isfinite(data.sigma_bragg).all())
    # the missing ones are masked out of the likelihood, and their gradients stay finite (a NaN sigma behind the
    # mask made the Bragg noise factor's gradient NaN, and SVI's parameters with it)
    model = build_model(FrameWeightsModel, data)
    guide = DirichletFrameGuide(model, groups=data.labels)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    elbo.differentiable_loss(model, guide, **data.model_kwargs()).backward()
    grads = [p.grad for p in guide.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_data_source_argument_errors():
    with pytest.raises(ValueError, match="data.observed is not"):
        MDWeightsDataSource(frames="x.npz")
    with pytest.raises(ValueError, match="shell_weighting"):
        MDWeightsDataSource(shell_weighting="some")


def test_write_frames_rejects_other_suffixes(tmp_path):
    fs = FrameSet(np.ones((2, 1), complex), np.zeros((1, 3), int), (1, 1, 1, 90, 90, 90), "P 1", np.zeros(2, int))
    with pytest.raises(ValueError, match=".npz or .npy"):
        write_frames(tmp_path / "f.h5", fs)
