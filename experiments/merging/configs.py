"""The merging problem's command-line options, generated from its Python definitions (see :mod:`physppl.configs`)."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from physppl.inference.presets import Preset
from physppl.models.merging import MergingModel
from physppl.models.simulators.merging import simulate_unmerged

from .api import merge
from .data import MergingDataSource
from .parts import ENGINES, ERROR_MODELS, GUIDES, LIKELIHOODS, SCALES

__all__ = ["register"]

# MergingModel's arguments that come from the data
_FROM_DATA = ("centric", "epsilon", "sigma_n", "n_images", "n_features")


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="merging", package="_global_",
             node=problem_node("physppl.merging.api.task", merge, ("n_draws", "log_likelihood", "free_r")))
    # columns: every key a user may set (data.columns.intensity=IPR), each None = found by MTZ type
    cs.store(group="data", name="merging", node=Preset(
        MergingDataSource, simulate=Preset(simulate_unmerged, partial=True),
        columns=dict.fromkeys(("intensity", "sigma", "batch"))).config())
    # scale: a slot the model/scale group fills (MergingModel has no default scale)
    cs.store(group="model", name="merging_schema",
             node=Preset(MergingModel, partial=True, exclude=_FROM_DATA, scale=None).config())
    for group, choices in (("model/scale", SCALES), ("model/likelihood", LIKELIHOODS),
                           ("model/error_model", ERROR_MODELS), ("guide", GUIDES), ("inference", ENGINES)):
        for name, preset in choices.items():
            cs.store(group=group, name=name, node=preset.config())
