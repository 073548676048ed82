"""Laue merging, several data sets, the double-Wilson prior and difference maps: densities, bookkeeping, errors."""
from __future__ import annotations

import math

import gemmi
import numpy as np
import pyro
import pytest
import reciprocalspaceship as rs
import scipy.integrate as si
import scipy.stats as st
import torch

import physppl
from physppl.io.mtz import MTZInputError
from physppl.merging.data import LAUE_METADATA, MergingDataSource
from physppl.merging.harmonics import expand_harmonics
from physppl.models.components.double_wilson import DoubleWilson, DoubleWilsonPrior, parent_reflections
from physppl.models.components.wavelength import WavelengthCurve
from physppl.models.components.wilson import Wilson
from physppl.models.simulators.laue import simulate_laue
from xtal_tools import write_laue_pair, write_toy_models


# -- the double-Wilson prior ---------------------------------------------------------------------------------------
def _pair(r: float, centric: bool, sigma=(2.0, 3.0)):
    return DoubleWilson(torch.tensor(sigma, dtype=torch.float64), torch.tensor([centric, centric]),
                        torch.tensor([-1, 0]), torch.tensor([0.0, r], dtype=torch.float64))


@pytest.mark.parametrize("r", [0.3, 0.9, 0.99])
def test_acentric_child_is_the_rice_distribution(r):
    d = _pair(r, False)
    fp, sig_p, sig_c = 1.3, 2.0, 3.0
    s = math.sqrt(sig_c * (1 - r * r) / 2)
    nu = r * fp * math.sqrt(sig_c / sig_p)
    for fc in (0.2, 1.1, 2.5):
        lp = d.log_prob(torch.tensor([fp, fc], dtype=torch.float64))[1].item()
        assert lp == pytest.approx(st.rice.logpdf(fc, nu / s, scale=s), abs=1e-9)


@pytest.mark.parametrize("centric", [False, True])
@pytest.mark.parametrize("r", [0.0, 0.5, 0.95])
def test_child_density_integrates_to_one_and_keeps_the_wilson_variance(r, centric):
    d = _pair(r, centric)

    def density(fc, fp=1.7):
        return math.exp(d.log_prob(torch.tensor([fp, fc], dtype=torch.float64))[1].item())

    total, _ = si.quad(density, 0, 40, limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)
    # F_p from Wilson, F_c given F_p: E[F_c^2] = Sigma_c (the chain keeps Wilson marginals)
    torch.manual_seed(0)
    x = d.rsample((200_000,))
    assert x[:, 1].square().mean().item() == pytest.approx(3.0, rel=0.02)
    assert x[:, 0].square().mean().item() == pytest.approx(2.0, rel=0.02)
    if r > 0:  # the draws are correlated as the prior says: corr(F_p^2, F_c^2) = r^2 (acentric), r^2 (centric)
        c = np.corrcoef(x[:, 0].square().numpy(), x[:, 1].square().numpy())[0, 1]
        assert c == pytest.approx(r * r, abs=0.02)


def test_zero_correlation_is_wilson():
    d = _pair(0.0, False)
    v = torch.tensor([0.8, 1.9], dtype=torch.float64)
    w = Wilson(torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([False, False])).log_prob(v)
    assert torch.allclose(d.log_prob(v), w, atol=1e-9)


def test_parents_are_found_by_miller_index_and_bad_parents_are_named():
    dataset = np.array([0, 0, 1, 1, 1])
    keys = np.array([[1, 2, 3, 0], [1, 1, 1, 0], [1, 1, 1, 0], [2, 2, 2, 0], [1, 2, 3, 0]])
    assert parent_reflections(dataset, keys, [None, 0]).tolist() == [-1, -1, 1, -1, 0]
    with pytest.raises(ValueError, match="parent 5 of data set 1 is out of range"):
        parent_reflections(dataset, keys, [None, 5])
    with pytest.raises(ValueError, match="parents has 3 entries for 2 data sets"):
        parent_reflections(dataset, keys, [None, 0, 1])
    with pytest.raises(ValueError, match=r"r must be in \[0, 1\)"):
        DoubleWilsonPrior(r=1.2)


def test_the_paired_guide_is_a_normalised_correlated_density():
    from physppl.guides.merging import PairedFoldedNormal

    loc = torch.tensor([1.0, 0.8], dtype=torch.float64)
    scale = torch.tensor([0.7, 0.5], dtype=torch.float64)
    d = PairedFoldedNormal(loc, scale, torch.tensor([0.0, 0.7], dtype=torch.float64), torch.tensor([-1, 0]))

    def joint(b, a):
        return math.exp(d.log_prob(torch.tensor([a, b], dtype=torch.float64)).sum().item())

    total, _ = si.dblquad(joint, 0, 8, 0, 8)
    assert total == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(0)
    x = d.rsample((100_000,))
    # the draws follow the density: E[F_c] by quadrature against the Monte Carlo mean
    mean_c, _ = si.dblquad(lambda b, a: b * joint(b, a), 0, 8, 0, 8)
    assert x[:, 1].mean().item() == pytest.approx(mean_c, abs=0.01)
    assert np.corrcoef(x[:, 0].numpy(), x[:, 1].numpy())[0, 1] > 0.5


# -- harmonics -------------------------------------------------------------------------------------------------------
def test_harmonics_of_a_ray_from_the_band_and_the_resolution_limit():
    cell = gemmi.UnitCell(50, 50, 50, 90, 90, 90)
    # (1,2,0) at 1.6 A: its second order (2,4,0) diffracts at 0.8 A, inside the band; the third (0.53 A) is not
    h = expand_harmonics(np.array([[1, 2, 0], [2, 4, 0], [1, 0, 0]]), np.array([1.6, 0.8, 1.0]), cell,
                         (0.75, 1.7), dmin=2.0)
    assert h.mask.sum(1).tolist() == [2, 2, 1]
    assert h.hkl[0, 0].tolist() == [1, 2, 0] and h.hkl[0, 1].tolist() == [2, 4, 0]  # the observed order first
    assert h.hkl[1, 0].tolist() == [2, 4, 0] and h.hkl[1, 1].tolist() == [1, 2, 0]
    assert h.wavelength[1].tolist() == pytest.approx([0.8, 1.6])
    # a band narrower than a factor 2 keeps low orders apart
    narrow = expand_harmonics(np.array([[1, 2, 0]]), np.array([1.1]), cell, (1.02, 1.18), dmin=2.0)
    assert narrow.max_order == 1


def test_harmonics_found_from_cell_and_band_are_the_simulated_ones():
    unmerged, _ = simulate_laue(n_images=3, dmin=2.5, seed=3)
    data = MergingDataSource(wavelength="Wavelength", metadata=list(LAUE_METADATA)).prepare(unmerged)
    found = (data.harmonic_refl >= 0).sum(1).numpy()
    true = unmerged["N_HARMONICS"].to_numpy()
    assert (true > 1).sum() > 50  # the test means something
    assert (found == true).mean() > 0.995
    assert data.band == pytest.approx((0.6, 1.6), abs=0.01)


def test_wavelength_curve_is_piecewise_linear_and_smooth():
    curve = WavelengthCurve((1.0, 2.0), n_knots=3)
    with torch.no_grad():
        curve.values.copy_(torch.tensor([0.0, 1.0, 0.0]))
    x = torch.tensor([1.0, 1.25, 1.5, 2.0, 3.0])
    with pyro.poutine.trace() as tr:
        y = curve(x)
    assert "wavelength_smoothness" in tr.trace.nodes  # the curve's prior on its second differences
    assert torch.allclose(y, torch.tensor([0.0, 0.5, 1.0, 0.0, 0.0]), atol=1e-6)


# -- several data sets ---------------------------------------------------------------------------------------------
def _write(ds: rs.DataSet, path) -> str:
    ds.write_mtz(str(path))
    return str(path)


@pytest.fixture(scope="module")
def two_states(tmp_path_factory):
    """Two small simulated Laue data sets of two related states, as the files a user would have."""
    return write_laue_pair(tmp_path_factory.mktemp("laue"), names=("state0", "state1")), None


def test_two_files_share_images_apart_and_keep_their_reflections(two_states):
    (a, b), _ = two_states
    src = MergingDataSource(paths=[a, b], wavelength="Wavelength", metadata=list(LAUE_METADATA))
    data = src.prepare(src.load()[0])
    assert data.dataset_names == ["state0", "state1"] and data.n_datasets == 2
    assert data.n_images == 4 and sorted(set(data.image_dataset.tolist())) == [0, 1]
    # each data set has its own reflections, the same Miller indices in both
    k0 = {tuple(x) for x in data.refl_key[data.dataset == 0]}
    k1 = {tuple(x) for x in data.refl_key[data.dataset == 1]}
    assert len(k0 & k1) > 100
    merged = MergingDataSource(paths=[a, b], separate=False, wavelength="Wavelength",
                               metadata=list(LAUE_METADATA))
    assert merged.prepare(merged.load()[0]).n_refl < data.n_refl


def test_incompatible_files_and_missing_wavelengths_fail_before_training(two_states, tmp_path):
    (a, b), _ = two_states
    other = rs.read_mtz(b)
    other.spacegroup = gemmi.SpaceGroup("P 1")
    wrong_sg = _write(other, tmp_path / "p1.mtz")
    with pytest.raises(MTZInputError, match="p1.mtz: space group P 1 differs from .*state0.mtz"):
        physppl.merge(paths=[a, wrong_sg], wavelength="Wavelength", metadata=list(LAUE_METADATA))
    stretched = rs.read_mtz(b)
    stretched.cell = gemmi.UnitCell(40.0, 45.0, 52.0, 90, 90, 90)
    wrong_cell = _write(stretched, tmp_path / "cell.mtz")
    with pytest.raises(MTZInputError, match="cell.mtz: cell .* is incompatible with"):
        physppl.merge(paths=[a, wrong_cell], wavelength="Wavelength", metadata=list(LAUE_METADATA))
    with pytest.raises(MTZInputError, match="no column 'LAMBDA'"):
        physppl.merge(paths=[a, b], wavelength="LAMBDA", metadata=list(LAUE_METADATA))
    with pytest.raises(ValueError, match="parent 2 of data set 1 is out of range"):
        physppl.merge(paths=[a, b], wavelength="Wavelength", metadata=list(LAUE_METADATA),
                      prior=DoubleWilsonPrior(parents=[None, 2]))


def test_a_joint_merge_writes_one_mtz_per_data_set_and_names_reflections_by_data_set(two_states, tmp_path):
    (a, b), _ = two_states
    engine = physppl.merging.parts.ENGINES["svi"].build(max_steps=20, min_steps=20, progress=False)
    res = physppl.merge(paths=[a, b], wavelength="Wavelength", metadata=list(LAUE_METADATA), scale="mlp",
                        prior="double_wilson", guide="paired_folded_normal", engine=engine, half_datasets=False,
                        n_draws=4)
    res.save(tmp_path / "run")
    assert {"merged.mtz", "merged_state0.mtz", "merged_state1.mtz"} <= {p.name for p in (tmp_path / "run").iterdir()}
    both = rs.read_mtz(str(tmp_path / "run" / "merged.mtz"))
    assert {"F_state0", "SIGF_state0", "F_state1", "SIGF_state1"} <= set(both.columns)
    refl = res.idata.posterior["F"].coords["refl"].values
    assert refl[0].startswith("state0: ") and any(r.startswith("state1: ") for r in refl)
    assert type(res.data).__name__ == "MergingData" and res.data.harmonic_refl is not None


# -- difference maps -------------------------------------------------------------------------------------------------
def test_difference_map_finds_the_moved_atom(tmp_path):
    from physppl.merging.difference_map import difference_map, model_structure_factors

    (off_pdb, on_pdb), site = write_toy_models(tmp_path, (24.0, 26.0, 28.0, 90.0, 90.0, 90.0), "P 1")
    cell = gemmi.UnitCell(24.0, 26.0, 28.0, 90, 90, 90)
    hkl = rs.utils.generate_reciprocal_asu(cell, gemmi.SpaceGroup("P 1"), 2.0, anomalous=False)
    rng = np.random.default_rng(1)
    files = []
    for k, pdb in enumerate((off_pdb, on_pdb)):
        f = np.abs(model_structure_factors(pdb, hkl))
        sig = 0.02 * f.mean() * np.ones_like(f)
        ds = rs.DataSet({"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "F": f + sig * rng.standard_normal(len(f)),
                         "SIGF": sig}, cell=cell, spacegroup=gemmi.SpaceGroup("P 1"), merged=True)
        ds = ds.astype({"H": "HKL", "K": "HKL", "L": "HKL", "F": "SFAmplitude", "SIGF": "Stddev"}).set_index(
            ["H", "K", "L"])
        files.append(_write(ds, tmp_path / f"merged{k}.mtz"))
    res = difference_map(files, phases=off_pdb, compare_model=on_pdb, site="LIG", site_radius=2.5)
    m = res.metrics
    assert m["site_rank"] == 1 and m["site_peak_sigma"] > 5
    top = res.peaks.iloc[:2]
    assert set(np.sign(top["height"])) == {1.0, -1.0}  # a positive peak where it went, a negative where it was
    assert m["cc_dF_dFc"] > 0.9
    assert res.idata.posterior["dF"].shape[-1] == m["n_reflections"]
    res.save(tmp_path / "dm")
    out = rs.read_mtz(str(tmp_path / "dm" / "difference.mtz"))
    assert {"DF", "SIGDF", "WDF", "PHIC"} <= set(out.columns)
    assert (tmp_path / "dm" / "peaks.csv").exists() and (tmp_path / "dm" / "difference_histogram.png").exists()
    # the command line runs the same call
    from hydra import compose, initialize_config_module

    from physppl.cli import run

    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=difference_map", f"merged=[{files[0]},{files[1]}]",
                                           f"phases={off_pdb}", "site=LIG", "site_radius=2.5", "weighting=none"])
    metrics = run(cfg, tmp_path / "cli")
    assert metrics["site_rank"] == 1 and metrics["weighting"] == "none"
