"""Tests for physppl.io.mtz: readers, validators, partials and writing."""

from __future__ import annotations

import pathlib
import warnings

import gemmi
import numpy as np
import pytest
import reciprocalspaceship as rs

from physppl.io.mtz import (
    MTZInputError,
    read_merged_mtz,
    read_unmerged_mtz,
    write_mtz_atomic,
)

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xtal"
SPACEGROUP = "P 21 21 21"
CELL = (30.0, 40.0, 50.0, 90.0, 90.0, 90.0)


# ----------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------


def _asu_hkls(n: int) -> np.ndarray:
    """First ``n`` distinct acentric-rich ASU reflections of the test cell."""
    sg = gemmi.SpaceGroup(SPACEGROUP)
    grid = np.array(
        [(h, k, l) for h in range(1, 9) for k in range(1, 9) for l in range(1, 9)], dtype=np.int32
    )
    asu = np.unique(rs.utils.hkl_to_asu(grid, sg)[0], axis=0)
    return asu[:n]


def make_unmerged(n_hkl: int = 60, n_obs: int = 4, seed: int = 0, **extra) -> rs.DataSet:
    """Unmerged DataSet: each ASU reflection observed ``n_obs`` times under random symops."""
    rng = np.random.default_rng(seed)
    sg = gemmi.SpaceGroup(SPACEGROUP)
    ops = list(sg.operations())
    asu = np.repeat(_asu_hkls(n_hkl), n_obs, axis=0)
    observed = np.array([ops[rng.integers(len(ops))].apply_to_hkl(list(h)) for h in asu])
    n = len(observed)
    ds = rs.DataSet(
        {
            "H": observed[:, 0],
            "K": observed[:, 1],
            "L": observed[:, 2],
            "BATCH": rng.integers(1, 100, n),
            "I": rng.gamma(2.0, 50.0, n),
            "SIGI": rng.uniform(1.0, 5.0, n),
            "FRACTIONCALC": np.ones(n),
            "XDET": rng.uniform(0, 2000, n),
            "YDET": rng.uniform(0, 2000, n),
            **extra,
        },
        spacegroup=SPACEGROUP,
        cell=gemmi.UnitCell(*CELL),
        merged=False,
    )
    dtypes = {"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity", "SIGI": "Stddev"}
    for c in ds.columns:
        ds[c] = ds[c].astype(dtypes.get(c, "Stddev" if c.startswith("SIG") else
                                        ("Intensity" if c.startswith("I") else "MTZReal")))
    return ds.set_index(["H", "K", "L"])


def write(ds: rs.DataSet, path: pathlib.Path) -> pathlib.Path:
    ds.write_mtz(str(path))
    return path


def patch_header(path: pathlib.Path, prefix: bytes, record: str) -> None:
    """Overwrite every 80-byte header record starting with ``prefix``."""
    raw = bytearray(path.read_bytes())
    start = raw.find(b"VERS MTZ:")
    assert start > 0
    hits = 0
    for pos in range(start, len(raw) - 79, 80):
        if raw[pos : pos + len(prefix)] == prefix:
            raw[pos : pos + 80] = record.ljust(80).encode()
            hits += 1
        if raw[pos : pos + 15] == b"MTZENDOFHEADERS":
            break
    assert hits, prefix
    path.write_bytes(bytes(raw))


def sorted_frame(ds: rs.DataSet):
    return ds.reset_index().sort_values(["H", "K", "L", "BATCH"]).reset_index(drop=True)


# ----------------------------------------------------------------------------
# File level errors
# ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mtz"
    with pytest.raises(FileNotFoundError, match="nope.mtz"):
        read_unmerged_mtz(missing)
    with pytest.raises(FileNotFoundError, match="nope.mtz"):
        read_merged_mtz(missing)


def test_text_file_is_not_mtz(tmp_path):
    fake = tmp_path / "notes.mtz"
    fake.write_text("H K L I SIGI\n1 2 3 10 1\n")
    with pytest.raises(MTZInputError, match=r"notes\.mtz.*not a readable MTZ file"):
        read_unmerged_mtz(fake)
    with pytest.raises(MTZInputError, match="not a readable MTZ file"):
        read_merged_mtz(fake)


def test_merged_file_rejected_by_unmerged_reader(tmp_path):
    ds = make_unmerged(n_obs=1).drop(columns=["BATCH"])
    ds.merged = True
    path = write(ds, tmp_path / "merged.mtz")
    with pytest.raises(MTZInputError, match=r"merged\.mtz.*looks like a merged.*BATCH"):
        read_unmerged_mtz(path)


def test_unmerged_file_rejected_by_merged_reader(tmp_path):
    path = write(make_unmerged(), tmp_path / "unmerged.mtz")
    with pytest.raises(MTZInputError, match="looks like an unmerged"):
        read_merged_mtz(path)


def test_missing_space_group(tmp_path):
    # gemmi refuses to write such a file, so strip the symmetry records.
    path = write(make_unmerged(), tmp_path / "nosg.mtz")
    patch_header(path, b"SYMINF", "TITLE")
    patch_header(path, b"SYMM ", "TITLE")
    assert gemmi.read_mtz_file(str(path)).spacegroup is None
    with pytest.raises(MTZInputError, match=r"nosg\.mtz.*no space group"):
        read_unmerged_mtz(path)


def test_missing_cell(tmp_path):
    path = write(make_unmerged(), tmp_path / "nocell.mtz")
    zero = "    0.0000    0.0000    0.0000   90.0000   90.0000   90.0000"
    patch_header(path, b"CELL ", "CELL" + zero)
    raw = path.read_bytes()
    start = raw.find(b"VERS MTZ:")
    for pos in range(start, len(raw) - 79, 80):
        if raw[pos : pos + 5] == b"DCELL":
            patch_header(path, raw[pos : pos + 16], raw[pos : pos + 16].decode() + zero)
    with pytest.raises(MTZInputError, match=r"nocell\.mtz.*no valid unit cell"):
        read_unmerged_mtz(path)


def test_no_intensity_column(tmp_path):
    path = write(make_unmerged().drop(columns=["I"]), tmp_path / "noi.mtz")
    with pytest.raises(MTZInputError, match=r"intensity column.*SIGI \(Q\).*data\.columns\.intensity"):
        read_unmerged_mtz(path)


def test_no_sigma_column(tmp_path):
    path = write(make_unmerged().drop(columns=["SIGI"]), tmp_path / "nosig.mtz")
    with pytest.raises(MTZInputError, match=r"sigma column.*I \(J\).*data\.columns\.sigma"):
        read_unmerged_mtz(path)


def test_no_batch_column(tmp_path):
    path = write(make_unmerged().drop(columns=["BATCH"]), tmp_path / "nobatch.mtz")
    with pytest.raises(MTZInputError, match=r"batch column.*data\.columns\.batch"):
        read_unmerged_mtz(path)


def test_wrong_column_name(tmp_path):
    path = write(make_unmerged(), tmp_path / "x.mtz")
    with pytest.raises(MTZInputError, match=r"no column 'IMEAN'.*I \(J\), SIGI \(Q\)"):
        read_unmerged_mtz(path, intensity="IMEAN")
    with pytest.raises(MTZInputError, match="no column 'SIGX'"):
        read_unmerged_mtz(path, sigma="SIGX")


def test_invalid_partials_option(tmp_path):
    path = write(make_unmerged(), tmp_path / "x.mtz")
    with pytest.raises(ValueError, match="partials"):
        read_unmerged_mtz(path, partials="sometimes")


# ----------------------------------------------------------------------------
# Bad values
# ----------------------------------------------------------------------------


def _with_sigmas(values: dict[int, float]) -> rs.DataSet:
    ds = make_unmerged()
    sig = ds["SIGI"].to_numpy(dtype=float).copy()
    for row, v in values.items():
        sig[row] = v
    ds["SIGI"] = rs.DataSeries(sig, index=ds.index, dtype="Stddev")
    return ds


def test_nan_sigma_counted(tmp_path):
    ds = _with_sigmas({0: np.nan, 5: np.nan, 9: np.nan})
    path = write(ds, tmp_path / "nan.mtz")
    with pytest.raises(MTZInputError, match=rf"3 of {len(ds)} rows.*'SIGI': 3 NaN.*drop_bad_sigma=true"):
        read_unmerged_mtz(path)


def test_nonpositive_sigma_counted(tmp_path):
    ds = _with_sigmas({1: 0.0, 2: -1.0})
    path = write(ds, tmp_path / "neg.mtz")
    with pytest.raises(MTZInputError, match=rf"2 of {len(ds)} rows.*2 zero or negative"):
        read_unmerged_mtz(path)


def test_nan_intensity_counted(tmp_path):
    ds = make_unmerged()
    i = ds["I"].to_numpy(dtype=float).copy()
    i[3] = np.nan
    ds["I"] = rs.DataSeries(i, index=ds.index, dtype="Intensity")
    path = write(ds, tmp_path / "nani.mtz")
    with pytest.raises(MTZInputError, match=r"1 of \d+ rows.*'I': 1 NaN"):
        read_unmerged_mtz(path)


def test_all_sigmas_unusable_asks_for_another_column_not_for_dropping(tmp_path):
    ds = _with_sigmas({k: np.nan for k in range(len(make_unmerged()))})
    path = write(ds, tmp_path / "allnan.mtz")
    for drop in (False, True):  # dropping every row is no fix, so the advice is the same either way
        with pytest.raises(MTZInputError, match=r"none of its \d+ rows is usable.*data.columns.sigma") as err:
            read_unmerged_mtz(path, drop_bad_sigma=drop)
        assert "drop_bad_sigma" not in str(err.value)


def test_drop_bad_sigma_warns_and_drops(tmp_path):
    ds = _with_sigmas({0: np.nan, 1: 0.0, 2: -3.0})
    path = write(ds, tmp_path / "bad.mtz")
    with pytest.warns(UserWarning, match="dropped 3 of"):
        out = read_unmerged_mtz(path, drop_bad_sigma=True)
    assert len(out) == len(ds) - 3
    assert (out["SIGI"].to_numpy(dtype=float) > 0).all()


# ----------------------------------------------------------------------------
# Column choice and round trip
# ----------------------------------------------------------------------------


def test_prefers_i_over_ipr_and_ipr_on_request(tmp_path):
    n = 240
    rng = np.random.default_rng(1)
    ds = make_unmerged(IPR=rng.normal(500, 10, n), SIGIPR=rng.uniform(6, 7, n))
    path = write(ds, tmp_path / "both.mtz")
    out = read_unmerged_mtz(path)
    ref = sorted_frame(ds)
    got = sorted_frame(out)
    np.testing.assert_allclose(got["I"], ref["I"], rtol=1e-6)
    np.testing.assert_allclose(got["SIGI"], ref["SIGI"], rtol=1e-6)
    assert "IPR" in out.columns

    out = read_unmerged_mtz(path, intensity="IPR")
    got = sorted_frame(out)
    np.testing.assert_allclose(got["I"], ref["IPR"], rtol=1e-6)
    np.testing.assert_allclose(got["SIGI"], ref["SIGIPR"], rtol=1e-6)
    np.testing.assert_allclose(got["I_FILE"], ref["I"], rtol=1e-6)


def test_columns_found_by_type_with_other_names(tmp_path):
    ds = make_unmerged().rename(columns={"I": "INT", "SIGI": "SIGINT", "BATCH": "IMAGE"})
    path = write(ds, tmp_path / "named.mtz")
    out = read_unmerged_mtz(path)
    assert {"I", "SIGI", "BATCH"} <= set(out.columns)
    assert not {"INT", "SIGINT", "IMAGE"} & set(out.columns)


def test_round_trip_preserves_data(tmp_path):
    ds = make_unmerged()
    path = write_mtz_atomic(ds, tmp_path / "rt.mtz")
    out = read_unmerged_mtz(path)
    assert out.merged is False
    assert out.spacegroup.xhm() == gemmi.SpaceGroup(SPACEGROUP).xhm()
    np.testing.assert_allclose(out.cell.parameters, CELL, rtol=1e-5)
    assert list(out.index.names) == ["H", "K", "L"]
    assert str(out["I"].dtype) == "Intensity" and str(out["SIGI"].dtype) == "Stddev"
    assert str(out["BATCH"].dtype) == "Batch"
    ref, got = sorted_frame(ds), sorted_frame(out)
    np.testing.assert_array_equal(got[["H", "K", "L", "BATCH"]], ref[["H", "K", "L", "BATCH"]])
    np.testing.assert_allclose(got["I"], ref["I"], rtol=1e-6)
    np.testing.assert_allclose(got["SIGI"], ref["SIGI"], rtol=1e-6)
    np.testing.assert_allclose(got["XDET"], ref["XDET"], rtol=1e-6)
    # Observed (not ASU) indices come back: several symmetry mates are present.
    assert len(np.unique(got[["H", "K", "L"]].to_numpy(), axis=0)) > 60


def test_unique_observations_with_batch_are_unmerged(tmp_path):
    # Every reflection once but with a BATCH column: still an unmerged file.
    ds = make_unmerged(n_obs=1)
    path = write(ds, tmp_path / "single.mtz")
    out = read_unmerged_mtz(path)
    assert out.merged is False and len(out) == 60
    ref, got = sorted_frame(ds), sorted_frame(out)
    np.testing.assert_array_equal(got[["H", "K", "L", "BATCH"]], ref[["H", "K", "L", "BATCH"]])


# ----------------------------------------------------------------------------
# Partials
# ----------------------------------------------------------------------------


def make_partials() -> tuple[rs.DataSet, dict]:
    """Full rows plus parts: one 3-part sum, a tie (middle batch), an incomplete
    sum, and one reflection recorded twice (two separate runs of batches)."""
    base = make_unmerged(n_hkl=20, n_obs=2, seed=3)
    flat = base.reset_index()
    hkl = _asu_hkls(30)[20:]
    rows = [
        # (hkl, batch, I, SIGI, fraction)
        (hkl[0], 10, 20.0, 2.0, 0.2), (hkl[0], 11, 60.0, 3.0, 0.6), (hkl[0], 12, 20.0, 2.0, 0.2),
        (hkl[1], 40, 10.0, 1.0, 1 / 3), (hkl[1], 41, 10.0, 1.0, 1 / 3), (hkl[1], 42, 10.0, 1.0, 1 / 3),
        (hkl[2], 20, 5.0, 1.0, 0.3), (hkl[2], 21, 5.0, 1.0, 0.4),
        (hkl[3], 30, 7.0, 1.0, 0.5), (hkl[3], 31, 9.0, 1.0, 0.5),
        (hkl[3], 70, 1.0, 1.0, 0.6), (hkl[3], 71, 2.0, 1.0, 0.4),
    ]
    parts = {
        "H": [r[0][0] for r in rows], "K": [r[0][1] for r in rows], "L": [r[0][2] for r in rows],
        "BATCH": [r[1] for r in rows], "I": [r[2] for r in rows], "SIGI": [r[3] for r in rows],
        "FRACTIONCALC": [r[4] for r in rows], "XDET": [100.0 + i for i in range(len(rows))],
        "YDET": np.zeros(len(rows)),
    }
    part_ds = rs.DataSet(parts, spacegroup=SPACEGROUP, cell=gemmi.UnitCell(*CELL))
    flat["PARTIAL"] = False
    part_ds["PARTIAL"] = True
    both = rs.concat([flat, part_ds], ignore_index=True)
    for c, t in {"H": "HKL", "K": "HKL", "L": "HKL", "BATCH": "Batch", "I": "Intensity",
                 "SIGI": "Stddev", "FRACTIONCALC": "MTZReal", "XDET": "MTZReal", "YDET": "MTZReal"}.items():
        both[c] = both[c].astype(t)
    both = both.set_index(["H", "K", "L"])
    both.spacegroup, both.cell, both.merged = SPACEGROUP, gemmi.UnitCell(*CELL), False
    return both, {"n_full": len(flat), "hkl": hkl}


def _row(out: rs.DataSet, hkl, batch: int):
    f = out.reset_index()
    sel = f[(f.H == hkl[0]) & (f.K == hkl[1]) & (f.L == hkl[2]) & (f.BATCH == batch)]
    assert len(sel) == 1, (hkl, batch, f[(f.H == hkl[0]) & (f.K == hkl[1]) & (f.L == hkl[2])])
    return sel.iloc[0]


@pytest.mark.parametrize("mode", ["auto", "sum"])
def test_partials_summed(tmp_path, mode):
    ds, info = make_partials()
    path = write(ds, tmp_path / "parts.mtz")
    with pytest.warns(UserWarning, match=r"dropped 1 of 5 summed partial.*min_fraction=0\.95"):
        out = read_unmerged_mtz(path, partials=mode)
    hkl = info["hkl"]
    assert len(out) == info["n_full"] + 4
    assert not out["PARTIAL"].any()
    three = _row(out, hkl[0], 11)  # batch of the part with the largest fraction
    assert three["I"] == pytest.approx(100.0)
    assert three["SIGI"] == pytest.approx(np.sqrt(4 + 9 + 4), rel=1e-6)
    assert three["FRACTIONCALC"] == pytest.approx(1.0, rel=1e-6)
    assert three["XDET"] == pytest.approx(101.0)  # metadata averaged
    tie = _row(out, hkl[1], 41)  # equal fractions: middle batch
    assert tie["I"] == pytest.approx(30.0)
    first, second = _row(out, hkl[3], 30), _row(out, hkl[3], 70)  # two passes, not one sum
    assert first["I"] == pytest.approx(16.0) and second["I"] == pytest.approx(3.0)
    f = out.reset_index()
    assert not ((f.H == hkl[2][0]) & (f.K == hkl[2][1]) & (f.L == hkl[2][2])).any()  # incomplete


def test_partials_full_only_drops_parts(tmp_path):
    ds, info = make_partials()
    path = write(ds, tmp_path / "parts.mtz")
    with pytest.warns(UserWarning, match=r"dropped 12 of .*partially recorded"):
        out = read_unmerged_mtz(path, partials="full_only")
    assert len(out) == info["n_full"]


def test_partials_ignore_keeps_rows(tmp_path):
    ds, _ = make_partials()
    path = write(ds, tmp_path / "parts.mtz")
    out = read_unmerged_mtz(path, partials="ignore")
    assert len(out) == len(ds) and int(out["PARTIAL"].sum()) == 12


def test_partials_without_fraction_cannot_be_summed(tmp_path):
    ds, _ = make_partials()
    path = write(ds.drop(columns=["FRACTIONCALC"]), tmp_path / "nofrac.mtz")
    with pytest.raises(MTZInputError, match=r"no FRACTIONCALC.*full_only"):
        read_unmerged_mtz(path)


def test_mpart_flags_parts(tmp_path):
    ds, _ = make_partials()
    mpart = np.where(ds["PARTIAL"].to_numpy(), 21, 0)
    ds = ds.drop(columns=["PARTIAL"])
    ds["MPART"] = rs.DataSeries(mpart, index=ds.index, dtype="MTZInt")
    path = write(ds, tmp_path / "mpart.mtz")
    with pytest.warns(UserWarning, match="dropped 12 of"):
        read_unmerged_mtz(path, partials="full_only")


def test_all_full_is_unchanged(tmp_path):
    ds = make_unmerged()
    ds["PARTIAL"] = False
    path = write(ds, tmp_path / "full.mtz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_unmerged_mtz(path, partials="sum")
    assert len(out) == len(ds)


# ----------------------------------------------------------------------------
# Merged reader
# ----------------------------------------------------------------------------


def _merged_friedel(hkls: np.ndarray, ip, sp, im, sm) -> rs.DataSet:
    ds = rs.DataSet(
        {"H": hkls[:, 0], "K": hkls[:, 1], "L": hkls[:, 2],
         "Iplus": ip, "SIGIplus": sp, "Iminus": im, "SIGIminus": sm},
        spacegroup=SPACEGROUP, cell=gemmi.UnitCell(*CELL), merged=True,
    )
    types = {"H": "HKL", "K": "HKL", "L": "HKL", "Iplus": "K", "Iminus": "K",
             "SIGIplus": "M", "SIGIminus": "M"}
    for c, t in types.items():
        ds[c] = ds[c].astype(t)
    return ds.set_index(["H", "K", "L"])


def test_merged_friedel_only_inverse_variance_mean(tmp_path):
    acentric = _asu_hkls(3)
    hkls = np.vstack([acentric, [[0, 0, 4]]])  # 0 0 4 is centric in P 21 21 21
    ds = _merged_friedel(hkls, [10.0, 4.0, np.nan, 50.0], [1.0, 2.0, np.nan, 5.0],
                         [20.0, np.nan, np.nan, 50.0], [2.0, np.nan, np.nan, 5.0])
    path = write(ds, tmp_path / "friedel.mtz")
    out = read_merged_mtz(path, anomalous=True)
    assert out.merged is True
    assert {"I", "SIGI", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)"} <= set(out.columns)
    assert len(out) == 3  # the reflection with no measurement is dropped
    first = out.loc[tuple(acentric[0])]
    assert first["I"] == pytest.approx((10 / 1 + 20 / 4) / (1 + 1 / 4), rel=1e-6)
    assert first["SIGI"] == pytest.approx(1 / np.sqrt(1 + 1 / 4), rel=1e-6)
    assert out.loc[tuple(acentric[1])]["I"] == pytest.approx(4.0)
    centric = out.loc[(0, 0, 4)]
    assert centric["I"] == pytest.approx(50.0) and centric["SIGI"] == pytest.approx(5.0)


def test_merged_friedel_mate_mapped_to_asu(tmp_path):
    hkl = _asu_hkls(1)
    ds = _merged_friedel(-hkl, [10.0], [1.0], [20.0], [2.0])
    path = write(ds, tmp_path / "mate.mtz")
    out = read_merged_mtz(path, anomalous=True)
    row = out.loc[tuple(hkl[0])]
    assert row["I(+)"] == pytest.approx(20.0) and row["I(-)"] == pytest.approx(10.0)


def test_merged_imean_preferred_and_amplitudes(tmp_path):
    hkls = _asu_hkls(5)
    ds = rs.DataSet(
        {"H": hkls[:, 0], "K": hkls[:, 1], "L": hkls[:, 2], "IMEAN": np.arange(5.0) + 1,
         "SIGIMEAN": np.ones(5), "F": np.arange(5.0) + 2, "SIGF": np.ones(5) * 0.5},
        spacegroup=SPACEGROUP, cell=gemmi.UnitCell(*CELL), merged=True,
    )
    for c, t in {"H": "HKL", "K": "HKL", "L": "HKL", "IMEAN": "J", "SIGIMEAN": "Q",
                 "F": "F", "SIGF": "Q"}.items():
        ds[c] = ds[c].astype(t)
    path = write(ds.set_index(["H", "K", "L"]), tmp_path / "imean.mtz")
    out = read_merged_mtz(path)
    assert list(out.columns) == ["I", "SIGI", "F", "SIGF"]
    np.testing.assert_allclose(out["I"].to_numpy(dtype=float), np.arange(5.0) + 1)
    with pytest.raises(MTZInputError, match=r"no Friedel intensity columns.*anomalous=True"):
        read_merged_mtz(path, anomalous=True)


def test_merged_without_intensities(tmp_path):
    hkls = _asu_hkls(5)
    ds = rs.DataSet({"H": hkls[:, 0], "K": hkls[:, 1], "L": hkls[:, 2], "FOM": np.ones(5)},
                    spacegroup=SPACEGROUP, cell=gemmi.UnitCell(*CELL), merged=True)
    ds = ds.infer_mtz_dtypes().set_index(["H", "K", "L"])
    path = write(ds, tmp_path / "noint.mtz")
    with pytest.raises(MTZInputError, match=r"noint\.mtz.*no intensity columns.*FOM"):
        read_merged_mtz(path)


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def test_write_refuses_protected_input(tmp_path):
    ds = make_unmerged()
    src = write(ds, tmp_path / "input.mtz")
    before = src.read_bytes()
    with pytest.raises(MTZInputError, match="input.mtz.*must not be overwritten"):
        write_mtz_atomic(ds, src, protect=[src])
    # Same file reached through another spelling or a symbolic link.
    with pytest.raises(MTZInputError):
        write_mtz_atomic(ds, tmp_path / "sub" / ".." / "input.mtz", protect=[str(src)])
    link = tmp_path / "link.mtz"
    link.symlink_to(src)
    with pytest.raises(MTZInputError):
        write_mtz_atomic(ds, link, protect=[src])
    assert src.read_bytes() == before


def test_write_is_atomic(tmp_path, monkeypatch):
    ds = make_unmerged()
    out_path = tmp_path / "out.mtz"
    result = write_mtz_atomic(ds, out_path, protect=[tmp_path / "input.mtz"])
    assert result == out_path.absolute() and out_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mtz"]
    before = out_path.read_bytes()

    def crash(self, path, *args, **kwargs):
        pathlib.Path(path).write_bytes(b"MTZ half written")
        raise OSError("disk full")

    monkeypatch.setattr(rs.DataSet, "write_mtz", crash)
    with pytest.raises(OSError, match="disk full"):
        write_mtz_atomic(ds, out_path)
    assert out_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mtz"]


def test_write_does_not_modify_dataset(tmp_path):
    ds = make_unmerged()
    frame = ds.reset_index().copy()
    write_mtz_atomic(ds, tmp_path / "out.mtz")
    np.testing.assert_array_equal(ds.reset_index()[["H", "K", "L"]], frame[["H", "K", "L"]])
    assert list(ds.columns) == list(frame.columns[3:])


def test_write_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_mtz_atomic(make_unmerged(), tmp_path / "no" / "out.mtz")


# ----------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real MTZ files not found at {DATA}"
)


@needs_data
def test_real_hewl_unmerged():
    ds = read_unmerged_mtz(DATA / "hewl_ssad_unmerged_5pct.mtz")
    assert len(ds) == 20597
    assert {"I", "SIGI", "BATCH", "XDET", "YDET"} <= set(ds.columns)
    assert ds.spacegroup.hm == "P 43 21 2" and ds.merged is False
    raw = rs.read_mtz(str(DATA / "hewl_ssad_unmerged_5pct.mtz"))
    # I (not the profile-fitted IPR) became the canonical intensity.
    np.testing.assert_array_equal(ds["I"].to_numpy(), raw["I"].to_numpy())
    assert not np.array_equal(ds["I"].to_numpy(), raw["IPR"].to_numpy())
    assert "I_FILE" not in ds.columns


@needs_data
def test_real_gamma_unmerged():
    ds = read_unmerged_mtz(DATA / "gamma_xe_aimless_unmerged.mtz")
    assert len(ds) == 44990
    assert {"I", "SIGI", "BATCH", "NPART", "FRACTIONCALC"} <= set(ds.columns)


@needs_data
@pytest.mark.parametrize(
    "name, rows",
    # gamma: 12,214 rows in the file, 31 of them without any measurement.
    [("hewl_ssad_24idc_aimless_merged.mtz", 12542), ("gamma_xe_aimless_merged.mtz", 12183)],
)
def test_real_merged(name, rows):
    ds = read_merged_mtz(DATA / name, anomalous=True)
    assert {"I", "SIGI", "I(+)", "I(-)", "SIGI(+)", "SIGI(-)"} <= set(ds.columns)
    assert ds.merged is True
    assert len(ds) == rows
    assert np.isfinite(ds["I"].to_numpy(dtype=float)).all()
    assert (ds["SIGI"].to_numpy(dtype=float) > 0).all()


@needs_data
def test_real_gamma_merged_values():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rs: HKL_base wavelength differs
        raw = rs.read_mtz(str(DATA / "gamma_xe_aimless_merged.mtz")).dropna()
    ds = read_merged_mtz(DATA / "gamma_xe_aimless_merged.mtz", anomalous=True)
    ds = ds.loc[raw.index]
    measured = raw["SIGIplus"].to_numpy(dtype=float) > 0
    np.testing.assert_array_equal(ds["I(+)"].to_numpy()[measured], raw["Iplus"].to_numpy()[measured])
    centric = raw.label_centrics()["CENTRIC"].to_numpy()
    sig = ds["SIGI"].to_numpy(dtype=float)
    sp = raw["SIGIplus"].to_numpy(dtype=float)
    sm = raw["SIGIminus"].to_numpy(dtype=float)
    # A missing mate is written as I=0, SIGI=0: it must become NaN, not a measurement.
    assert np.isnan(ds["I(-)"].to_numpy(dtype=float)[sm == 0]).all()
    assert (sm == 0).sum() > 100
    # Centrics keep their single measurement; acentric pairs get a smaller combined sigma.
    np.testing.assert_allclose(sig[centric], sp[centric])
    both = ~centric & (sp > 0) & (sm > 0)
    assert (sig[both] < np.minimum(sp, sm)[both]).all()
    one = ~centric & ((sp > 0) != (sm > 0))
    np.testing.assert_allclose(sig[one], np.maximum(sp, sm)[one])


@needs_data
def test_real_merged_rejected_as_unmerged():
    with pytest.raises(MTZInputError, match="looks like a merged"):
        read_unmerged_mtz(DATA / "hewl_ssad_24idc_aimless_merged.mtz")
    with pytest.raises(MTZInputError, match="looks like an unmerged"):
        read_merged_mtz(DATA / "gamma_xe_aimless_unmerged.mtz")
