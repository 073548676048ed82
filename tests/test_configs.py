"""Every experiment and every group option composes, and its objects instantiate on tiny data."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from physppl.inference.nuts import NUTSEngine
from physppl.inference.svi import SVIEngine
from physppl.inference.weighted_mean import ScaledWeightedMean
from physppl.models.merging import MergingModel

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
OPTIONS = [f"{g}={p.stem}" for g in ("guide", "inference", "model") for p in (CONF / g).glob("*.yaml")]
OPTIONS += [f"model/{g}={p.stem}" for g in ("scale", "likelihood", "error_model") for p in (CONF / "model" / g).glob("*.yaml")]


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def _instantiate_all(cfg, data):
    source = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if isinstance(model, ScaledWeightedMean):
        return source, model, None, None
    built = model(**data.model_init())
    assert isinstance(built, MergingModel)
    guide = instantiate(cfg.guide)(init_mean=[1.0] * data.n_refl, init_sd=[0.1] * data.n_refl)
    engine = instantiate(cfg.inference)
    assert isinstance(engine, (SVIEngine, NUTSEngine))
    return source, built, guide, engine


@pytest.fixture(scope="module")
def tiny(small_sim):
    from physppl.experiments.merging.data import prepare

    return prepare(small_sim[0])


def test_experiments_found():
    assert {"merging", "merging_anomalous", "merging_baseline", "merging_nuts"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tiny):
    cfg = _compose([f"+experiment={experiment}"])
    _instantiate_all(cfg, tiny)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_group_option_instantiates(option, tiny):
    cfg = _compose([option])
    _instantiate_all(cfg, tiny)


def test_model_target_is_swappable(tiny):
    cfg = _compose(["model._target_=physppl.models.merging.MergingModel", "model/scale=bfactor"])
    source, model, guide, engine = _instantiate_all(cfg, tiny)
    assert type(model.scale).__name__ == "BFactorScale"


def test_default_is_svi_on_simulated_data():
    cfg = _compose([])
    assert cfg.data.path is None and cfg.inference._target_.endswith("SVIEngine")
    assert cfg.optim.lr_by_prefix.scale < cfg.optim.lr
