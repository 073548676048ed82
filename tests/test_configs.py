"""Every experiment composes and builds; every option of every group instantiates; the command line's defaults are
the Python functions' defaults; a user's model class plugs in by ``model._target_``."""
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

import physppl
from physppl.configs import register
from physppl.inference.presets import Preset
from physppl.models.merging import MergingModel

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
ANALYSES = {"difference_map"}
register()
GROUPS = ("data", "model", "model/scale", "model/likelihood", "model/error_model", "guide", "inference")
OPTIONS = sorted(f"{g}={name[:-5]}" for g in GROUPS for name in ConfigStore.instance().list(g)
                 if name.endswith(".yaml") and not name.endswith("_schema.yaml"))


class CountingMergingModel(MergingModel):
    """A user's model class: the reference model that counts its calls."""

    calls = 0

    def forward(self, *args, **kwargs):
        CountingMergingModel.calls += 1
        return super().forward(*args, **kwargs)


def _compose(overrides):
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_experiments_and_options_are_found():
    assert {"merging", "merging_anomalous", "merging_baseline", "merging_nuts", "merging_laue", "difference_map",
            "md_weights", "md_weights_nuts", "beam_sbi", "vae_digits", "vae_ising", "rbm_digits", "rbm_ising"} <= set(EXPERIMENTS)
    assert {"model/scale=mlp_image", "model/likelihood=student_t", "guide=folded_normal", "inference=svi",
            "inference=md_svi", "inference=npe", "inference=vae_svi", "data=ising", "guide=md_dirichlet"} <= set(OPTIONS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_its_parts_instantiate(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    task = get_method(cfg.task)
    assert task.__name__ == "task" and task.__module__.startswith("physppl.")
    built = {key: instantiate(node) for key, node in cfg.items() if OmegaConf.is_dict(node) and "_target_" in node}
    if experiment in ANALYSES:  # works on a fit's outputs: no model of its own
        assert not built
        return
    # a guide too where the problem has one; simulation-based inference has no data group (its data are simulated,
    # its observations a top-level option)
    assert {"model", "inference"} | ({"data"} if "data" in cfg else set()) <= set(built)
    assert (callable(getattr(built["inference"], "fit", None)) or hasattr(built["inference"], "amortized")
            or hasattr(built["inference"], "trainer"))


@pytest.mark.parametrize("option", OPTIONS)
def test_group_option_instantiates(option):
    group, name = option.split("=")
    cfg = _compose([option])
    node = OmegaConf.select(cfg, group.replace("/", "."))
    obj = instantiate(node)
    assert obj is not None and (callable(obj) or hasattr(obj, "__dict__"))


def test_command_line_defaults_are_the_python_defaults():
    """The default run chooses, for every part, the option the Python function names as its default."""
    from physppl.merging import parts

    cfg = _compose([])
    defaults = {k: p.default for k, p in inspect.signature(physppl.merge).parameters.items()}
    for key, registry in (("scale", parts.SCALES), ("likelihood", parts.LIKELIHOODS),
                          ("error_model", parts.ERROR_MODELS)):
        assert OmegaConf.to_container(cfg.model[key]) == OmegaConf.to_container(
            OmegaConf.structured(registry[defaults[key]].config())), key
    assert OmegaConf.to_container(cfg.guide) == OmegaConf.to_container(
        OmegaConf.structured(parts.GUIDES[defaults["guide"]].config()))
    assert OmegaConf.to_container(cfg.inference) == OmegaConf.to_container(
        OmegaConf.structured(parts.ENGINES[defaults["engine"]].config()))
    assert cfg.n_draws == defaults["n_draws"] and cfg.log_likelihood == defaults["log_likelihood"]
    assert cfg.seed == defaults["seed"] and cfg.threads == defaults["threads"] and cfg.device == defaults["device"]
    # one value per default: the yaml files choose options and set experiment choices, never restate a default
    assert cfg.data.simulate.n_images == inspect.signature(
        physppl.merging.data.simulate_unmerged).parameters["n_images"].default


def test_presets_build_what_their_config_instantiates():
    from physppl.merging import parts

    engine_py = parts.ENGINES["svi"].build()
    engine_cli = instantiate(OmegaConf.structured(parts.ENGINES["svi"].config()))
    assert repr(engine_py) == repr(engine_cli)
    assert engine_py.optim.module_lr == {"scale": 0.002, "error_model": 0.002, "lambda_curve?": 0.01,
                                         "prior?": 0.002} == engine_cli.optim.module_lr
    scale = parts.SCALES["image_b"].build()(n_images=7, n_features=2)
    assert scale.use_b and scale.log_k.shape == (7,)
    with pytest.raises(ValueError, match="unknown scale model 'mlp_imag'"):
        from physppl.inference.presets import resolve_named

        resolve_named("mlp_imag", parts.SCALES, "scale model")
    assert isinstance(parts.SCALES["mlp"], Preset)


def test_a_users_model_class_replaces_the_models_target(tmp_path):
    from physppl.cli import run

    CountingMergingModel.calls = 0
    cfg = _compose([f"model._target_={__name__}.CountingMergingModel", "model/scale=bfactor",
                    "data.simulate.dmin=5.0", "data.simulate.n_images=20", "inference.max_steps=30",
                    "inference.min_steps=30", "inference.progress=false", "data.half_datasets=false", "n_draws=5"])
    metrics = run(cfg, tmp_path / "run")
    assert CountingMergingModel.calls >= 30 and metrics["steps"] == 30


def test_model_options_reach_the_model():
    cfg = _compose(["+experiment=md_weights", "model.likelihood=student_t", "model.dof=6.0"])
    factory = instantiate(cfg.model)
    assert factory.keywords["likelihood"] == "student_t" and factory.keywords["dof"] == 6.0
    cfg = _compose(["model.likelihood.dof=8.0"])
    assert instantiate(cfg.model.likelihood).dof == 8.0
    cfg = _compose(["model.likelihood=laplace"])  # a name, as sweeps give it
    model = instantiate(cfg.model)
    assert model.keywords["likelihood"] == "laplace"
    assert torch.get_default_dtype() == torch.float32
