"""Reading observed knife-edge scans: accepted layouts, and a clear error for every kind of bad file."""
import numpy as np
import pytest

from physppl.io.scans import ScanInputError, read_scans
from physppl.models.beam import KnifeEdgeBeamModel, blade_positions

POS = blade_positions().double().numpy()


@pytest.fixture(scope="module")
def scans():
    import torch

    model = KnifeEdgeBeamModel()
    return model.simulate(model.sample_prior(3, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1)).double().numpy()


def _long_csv(path, scan, positions=POS):
    lines = ["axis,position,signal"]
    for a, name in enumerate("xy"):
        lines += [f"{name},{float(p)!r},{float(v)!r}" for p, v in zip(positions, scan[a * 100:(a + 1) * 100])]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_npy_one_and_several(tmp_path, scans):
    np.save(tmp_path / "one.npy", scans[0])
    np.save(tmp_path / "many.npy", scans)
    assert read_scans(tmp_path / "one.npy").x.shape == (1, 200)
    many = read_scans(tmp_path / "many.npy")
    assert many.n == 3 and np.allclose(many.x, scans)


def test_csv_layouts(tmp_path, scans):
    long = read_scans(_long_csv(tmp_path / "long.csv", scans[1]), positions=POS)
    assert np.allclose(long.x[0], scans[1]) and long.positions.shape == (2, 100)
    rows = ["position_x,signal_x,position_y,signal_y"] + [
        f"{float(POS[i])!r},{float(scans[2][i])!r},{float(POS[i])!r},{float(scans[2][100 + i])!r}" for i in range(100)]
    (tmp_path / "wide.csv").write_text("\n".join(rows) + "\n")
    assert np.allclose(read_scans(tmp_path / "wide.csv", positions=POS).x[0], scans[2])
    (tmp_path / "plain.csv").write_text("\n".join(repr(float(v)) for v in scans[0]) + "\n")
    assert np.allclose(read_scans(tmp_path / "plain.csv").x[0], scans[0])
    (tmp_path / "rows.csv").write_text("\n".join(",".join(repr(float(v)) for v in s) for s in scans) + "\n")
    assert read_scans(tmp_path / "rows.csv").x.shape == (3, 200)


def test_wrong_length(tmp_path, scans):
    np.save(tmp_path / "short.npy", scans[0][:150])
    with pytest.raises(ScanInputError, match=r"short.npy: expected one scan of 200 values .* got shape \(150,\)"):
        read_scans(tmp_path / "short.npy")


def test_nan_is_located(tmp_path, scans):
    bad = scans.copy()
    bad[1, 130] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ScanInputError, match=r"scan 1, value 130 \(axis 'y', point 30\) is nan"):
        read_scans(tmp_path / "nan.npy")


def test_non_monotone_positions(tmp_path, scans):
    pos = POS.copy()
    pos[[10, 11]] = pos[[11, 10]]
    with pytest.raises(ScanInputError, match=r"positions of axis 'x' are not strictly increasing: point 11"):
        read_scans(_long_csv(tmp_path / "swapped.csv", scans[0], pos))


def test_positions_must_match_the_model(tmp_path, scans):
    with pytest.raises(ScanInputError, match=r"axis 'x' position 0 is -6, expected -3"):
        read_scans(_long_csv(tmp_path / "wide_range.csv", scans[0], POS * 2), positions=POS)


def test_csv_problems(tmp_path, scans):
    (tmp_path / "text.csv").write_text("a,b\n1,oops\n")
    with pytest.raises(ScanInputError, match="expected numbers only"):
        read_scans(tmp_path / "text.csv")
    path = _long_csv(tmp_path / "noy.csv", scans[0])
    path.write_text("\n".join(l for l in path.read_text().splitlines() if not l.startswith("y,")) + "\n")
    with pytest.raises(ScanInputError, match=r"missing \['y'\]"):
        read_scans(path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ScanInputError, match="empty file"):
        read_scans(tmp_path / "empty.csv")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        read_scans(tmp_path / "nope.npy")
    (tmp_path / "scan.h5").write_text("x")
    with pytest.raises(ScanInputError, match="unknown scan format '.h5'"):
        read_scans(tmp_path / "scan.h5")
    (tmp_path / "broken.npy").write_text("not numpy")
    with pytest.raises(ScanInputError, match="broken.npy: not a readable .npy"):
        read_scans(tmp_path / "broken.npy")


def test_a_bad_value_in_a_plain_csv_is_named_by_its_line(tmp_path, scans):
    lines = [repr(float(v)) for v in scans[0]]
    lines[10] = "4.29x"
    (tmp_path / "bad.csv").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")  # a blank line
    with pytest.raises(ScanInputError, match=r"line 12, column '1': '4.29x' is not a number"):
        read_scans(tmp_path / "bad.csv")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(ScanInputError, match="line 2 has 2 values, line 1 has 3"):
        read_scans(tmp_path / "ragged.csv")
