"""Every experiment and every group option composes and instantiates; merging's objects also build on tiny data."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from physppl.inference.nuts import NUTSEngine
from physppl.inference.svi import SVIEngine
from physppl.merging.weighted_mean import ScaledWeightedMean
from physppl.models.merging import MergingModel

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "__pycache__"))
OPTIONS = [f"{g}={p.stem}" for g in GROUPS for p in (CONF / g).glob("*.yaml")]
MERGING_OPTIONS = [f"model/{g}={p.stem}" for g in ("scale", "likelihood", "error_model")
                   for p in (CONF / "model" / g).glob("*.yaml")]
MERGING_TASK = "physppl.merging.pipeline.run"


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def _instantiate_merging(cfg, data):
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
    from physppl.merging.data import prepare

    return prepare(small_sim[0])


def test_experiments_found():
    assert {"merging", "merging_anomalous", "merging_baseline", "merging_nuts"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_its_parts_instantiate(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    assert callable(get_method(cfg.task)), f"{experiment}: task {cfg.task} is not importable"
    for key, node in cfg.items():
        if OmegaConf.is_dict(node) and "_target_" in node:
            instantiate(node)  # a factory (_partial_) or an object; either way it must build without data


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("merging")])
def test_merging_experiment_builds_on_tiny_data(experiment, tiny):
    cfg = _compose([f"+experiment={experiment}"])
    assert cfg.task == MERGING_TASK
    _instantiate_merging(cfg, tiny)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_group_option_instantiates(option):
    group = option.split("=")[0]
    cfg = _compose([option])
    instantiate(cfg[group])


def _target(option: str) -> str:
    group, name = option.split("=")
    return str(OmegaConf.load(CONF / group / f"{name}.yaml").get("_target_", ""))


@pytest.mark.parametrize("option", sorted(MERGING_OPTIONS + [o for o in OPTIONS if o.startswith(("guide=", "model="))
                                                              and ("merging" in _target(o) or "weighted_mean" in _target(o))]))
def test_merging_option_builds_on_tiny_data(option, tiny):
    cfg = _compose([option])
    _instantiate_merging(cfg, tiny)


def test_model_target_is_swappable(tiny):
    cfg = _compose(["model._target_=physppl.models.merging.MergingModel", "model/scale=bfactor"])
    source, model, guide, engine = _instantiate_merging(cfg, tiny)
    assert type(model.scale).__name__ == "BFactorScale"


def test_default_is_svi_on_simulated_data():
    cfg = _compose([])
    assert cfg.data.path is None and cfg.inference._target_.endswith("SVIEngine")
    assert cfg.optim.lr_by_prefix.scale < cfg.optim.lr
    assert cfg.task == MERGING_TASK and cfg.device == "auto"
