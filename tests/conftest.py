"""Shared fixtures: fixed seeds, a clean Pyro parameter store, one torch thread, paths to real data."""
from __future__ import annotations

import logging
import pathlib

import pyro
import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
XTAL = REPO.parent / "shared" / "data" / "xtal"


@pytest.fixture(autouse=True)
def _clean_pyro():
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _restore_logging():
    """Hydra run in this process attaches handlers to the root logger that write to this test's captured streams;
    a later test's log line would go to a closed stream. Each test gets the root logger back as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def xtal_dir() -> pathlib.Path:
    if not XTAL.is_dir():
        pytest.skip(f"real diffraction data not found at {XTAL} (the shared data folder beside the repo)")
    return XTAL


@pytest.fixture(scope="session")
def small_sim():
    """A small simulated unmerged dataset and its truth (P 43 21 2, 4 A, ~1k reflections)."""
    from physppl.models.simulators.merging import simulate_unmerged

    return simulate_unmerged(dmin=3.5, n_images=60, multiplicity=3.0, seed=1)
