"""The default VAE experiments at full size (minutes each): held-out likelihoods and the Ising phase transition."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from physppl.cli import run as app_run
from physppl.models.simulators.ising import T_C

pytestmark = pytest.mark.slow


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_ising_experiment_finds_the_phase_transition(tmp_path):
    """Default vae_ising (L = 32, 26 temperatures, latent 2): the latent mean is the magnetisation, and a classifier
    trained only on T <= 1.8 and T >= 2.8 switches within 0.15 of Onsager's T_c."""
    m = app_run(_compose(["+experiment=vae_ising", "inference.progress=false", "data.progress=false"]), tmp_path)
    assert m["corr_latent_m"] > 0.97 and m["corr_abs_latent_abs_m"] > 0.95
    assert abs(m["switch_temperature"] - T_C) < 0.15
    assert m["classifier_accuracy_far"] > 0.98
    assert m["test_iwae"] >= m["test_elbo"]
    assert m["test_elbo"] > -420.0


def test_digits_experiment_reaches_the_reference_likelihood(tmp_path):
    """Default vae_digits (Pyro's example architecture): held-out ELBO and IWAE in the range measured for the
    reference implementations (ELBO about -19 to -20 nats, IWAE about -18 to -19)."""
    m = app_run(_compose(["+experiment=vae_digits", "inference.progress=false"]), tmp_path)
    assert m["test_elbo"] > -21.0
    assert m["test_iwae"] > -20.0 and m["test_iwae"] > m["test_elbo"]
    assert 0.0 < m["amortization_gap"] < 3.0
