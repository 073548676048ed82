"""Data sources of the VAE job: user arrays (every bad input gets a specific error), the Ising cache, splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from physppl.vae.data import ArrayDataSource, DigitsDataSource, IsingDataSource, cache_dir, split_indices
from physppl.io.arrays import load_array

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    good = (rng.random((40, 6, 6)) < 0.5).astype(np.uint8)
    np.save(tmp_path / "good.npy", good)
    files["good"] = tmp_path / "good.npy"
    np.savez(tmp_path / "labelled.npz", x=good, temperature=np.linspace(1, 3, 40), other=np.zeros(3))
    files["labelled"] = tmp_path / "labelled.npz"
    np.savez(tmp_path / "two.npz", a=good, b=good)
    files["two"] = tmp_path / "two.npz"
    np.save(tmp_path / "spins.npy", 2 * good.astype(np.int8) - 1)
    files["spins"] = tmp_path / "spins.npy"
    np.save(tmp_path / "flat.npy", good.reshape(-1))
    files["flat"] = tmp_path / "flat.npy"
    np.save(tmp_path / "complex.npy", good.astype(np.complex64))
    files["complex"] = tmp_path / "complex.npy"
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]] * 20))
    files["strings"] = tmp_path / "strings.npy"
    np.save(tmp_path / "objects.npy", np.array([[1, None]] * 20, dtype=object), allow_pickle=True)
    files["objects"] = tmp_path / "objects.npy"
    nan = good.astype(float)
    nan[7, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    files["nan"] = tmp_path / "nan.npy"
    np.save(tmp_path / "few.npy", good[:4])
    files["few"] = tmp_path / "few.npy"
    np.save(tmp_path / "deep.npy", good.reshape(40, 1, 2, 3, 6))
    files["deep"] = tmp_path / "deep.npy"
    (tmp_path / "table.csv").write_text("1,2\n")
    files["csv"] = tmp_path / "table.csv"
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    files["broken"] = tmp_path / "broken.npz"
    return files


def test_load_array_and_labels(arrays):
    a = load_array(arrays["labelled"])
    assert a.key == "x" and a.data.shape == (40, 6, 6)
    assert set(a.labels) == {"temperature"}  # 'other' has the wrong length
    assert load_array(arrays["two"], key="b").key == "b"


@pytest.mark.parametrize("name,kwargs,error,match", [
    ("two", {}, ValueError, r"two.npz: the archive holds several arrays \['a', 'b'\]; choose one with data.key"),
    ("two", {"key": "c"}, ValueError, r"no array 'c' in the archive"),
    ("good", {"key": "x"}, ValueError, r"data.key='x' is only for .npz"),
    ("flat", {}, ValueError, r"flat.npy: expected shape \(n, ...\) with one sample per row, got shape \(1440,\)"),
    ("complex", {}, ValueError, r"complex.npy: dtype complex64 is not supported"),
    ("strings", {}, ValueError, r"strings.npy: dtype <U1 is not supported"),
    ("objects", {}, ValueError, r"objects.npy: holds Python objects"),
    ("nan", {}, ValueError, r"nan.npy: non-finite value nan at index \(7, 2, 3\) \(row 7\)"),
    ("few", {"min_rows": 10}, ValueError, r"few.npy: 4 samples, need at least 10"),
    ("deep", {}, ValueError, r"at most 3 dimensions per sample"),
    ("csv", {}, ValueError, r"table.csv: unsupported file type '.csv'"),
    ("broken", {}, ValueError, r"broken.npz: not a readable NumPy .npz file"),
])
def test_load_array_errors(arrays, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_array(arrays[name], **kwargs)


def test_missing_and_unset_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="array file not found"):
        load_array(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match=r"set data.path="):
        ArrayDataSource(path=None).load()


def test_array_source_spins_rescale_and_labels(arrays):
    d = ArrayDataSource(path=str(arrays["spins"]), spins=True).load()
    assert set(torch.unique(d.x).tolist()) == {0.0, 1.0} and d.event_shape == (6, 6)
    with pytest.raises(ValueError, match=r"data.spins=true needs values in \{-1, \+1\}"):
        ArrayDataSource(path=str(arrays["labelled"]), spins=True).load()
    d = ArrayDataSource(path=str(arrays["labelled"]), rescale="minmax").load()
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    assert "temperature" in d.labels and d.image_shape == (6, 6)
    assert sum(len(v) for v in d.split.values()) == 40
    with pytest.raises(ValueError, match="image_shape"):
        ArrayDataSource(path=str(arrays["good"]), image_shape=[5, 5]).load()
    with pytest.raises(ValueError, match="rescale"):
        ArrayDataSource(path=str(arrays["good"]), rescale="zscore")


def test_split_keeps_groups_together_and_strata_balanced():
    strata = np.repeat(np.arange(5), 40)
    groups = np.arange(200) // 4  # 10 chains of 4 per stratum
    s = split_indices(200, 0.1, 0.2, seed=0, strata=strata, groups=groups)
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(200))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(groups[s[a]]) & set(groups[s[b]])
    for k in range(5):
        assert (strata[s["test"]] == k).sum() == 8 and (strata[s["val"]] == k).sum() == 4
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 0.0, 0.2, seed=0)


def test_ising_source_simulates_once_then_reads_the_cache(tmp_path, monkeypatch):
    src = IsingDataSource(L=4, temperatures=[1.5, 3.0], n_per_temperature=12, n_chains=6, thermalize=20, every=2,
                          cache_dir=str(tmp_path), progress=False)
    first = src.load()
    assert src.cache_path().exists() and src.cache_path().parent == tmp_path / "ising"
    assert first.x.shape == (24, 4, 4) and first.image_shape == (4, 4)
    assert set(first.labels) >= {"temperature", "magnetization", "abs_magnetization", "energy", "phase"}
    monkeypatch.setattr(IsingDataSource, "simulate", lambda self: pytest.fail("simulated despite the cache"))
    second = src.load()
    assert torch.equal(first.x, second.x)
    # low temperature: nearly ordered; labels consistent with the pixels
    m = first.labels["magnetization"]
    assert np.allclose(m, (2 * first.x - 1).mean((1, 2)).numpy())
    other = IsingDataSource(L=4, temperatures=[1.5, 3.0], n_per_temperature=12, n_chains=6, seed=1,
                            cache_dir=str(tmp_path))
    assert other.cache_path() != src.cache_path()


def test_cache_is_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("PHYSPPL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "physppl"
    monkeypatch.setenv("PHYSPPL_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert REPO not in IsingDataSource().cache_path().parents


def test_ising_temperature_grid_errors():
    with pytest.raises(ValueError, match="t_max >= data.t_min"):
        IsingDataSource(t_min=3.0, t_max=1.0).temperature_grid()
    assert IsingDataSource(t_min=1.0, t_max=2.0, n_temperatures=3).temperature_grid().tolist() == [1.0, 1.5, 2.0]
    with pytest.raises(ValueError, match="positive"):
        IsingDataSource(temperatures=[1.0, -2.0]).temperature_grid()


def test_digits_source():
    d = DigitsDataSource().load()
    assert d.x.shape == (1797, 8, 8) and set(torch.unique(d.x).tolist()) == {0.0, 1.0}
    assert set(np.unique(d.labels["digit"])) == set(range(10))
    grey = DigitsDataSource(binarize=False).load()
    assert 0.0 <= float(grey.x.min()) and float(grey.x.max()) == 1.0 and len(torch.unique(grey.x)) == 17
