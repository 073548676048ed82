"""Merges of real diffraction data (../shared/data/xtal), against the conventional merge and AIMLESS.

Slow (about a minute per merge on one CPU thread): run with ``pytest -m slow``.
"""
import pytest
from hydra import compose, initialize_config_module

from physppl.cli import run

pytestmark = pytest.mark.slow

FAST = ["data.half_datasets=false", "log_likelihood=false", "n_draws=20"]


def _merge(xtal_dir, tmp_path, name, unmerged, reference, overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=merging_anomalous", f"data.path={xtal_dir / unmerged}",
                                           f"data.reference={xtal_dir / reference}", *FAST, *overrides])
    return run(cfg, tmp_path / name)


def test_hewl_subset_beats_weighted_mean_against_full_data_merge(xtal_dir, tmp_path):
    """The 5% subset merged by VI agrees better with the merge of all the data than the weighted mean does."""
    files = ("hewl_ssad_unmerged_5pct.mtz", "hewl_ssad_24idc_aimless_merged.mtz")
    vi = _merge(xtal_dir, tmp_path, "vi", *files, ["inference.progress=false"])
    wm = _merge(xtal_dir, tmp_path, "wm", *files, ["inference=weighted_mean"])
    print("VI", vi, "WM", wm)
    assert wm["cc_ref"] > 0.98  # the baseline itself is sound (0.985 measured independently)
    assert vi["cc_ref"] > wm["cc_ref"]
    assert vi["cc_anom_ref"] > wm["cc_anom_ref"]


def test_gamma_merges_without_divergence_and_agrees_with_aimless(xtal_dir, tmp_path):
    m = _merge(xtal_dir, tmp_path, "gamma", "gamma_xe_aimless_unmerged.mtz", "gamma_xe_aimless_merged.mtz",
               ["inference.progress=false"])
    print(m)
    assert m["cc_ref"] > 0.99
    assert m["cc_anom_ref"] > 0.9
