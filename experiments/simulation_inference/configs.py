"""The command-line options of :func:`physppl.infer_sbi`, generated from its Python definitions."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from physppl.inference.presets import Preset
from physppl.models.simulators.sbi_tasks import TASKS

from .api import infer_sbi
from .parts import ESTIMATORS, PLANS

__all__ = ["register"]


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="sbi", package="_global_",
             node=problem_node("physppl.simulation_inference.api.task", infer_sbi,
                               ("n_simulations", "n_observations", "n_draws", "evaluate", "observed")))
    for name, cls in TASKS.items():
        cs.store(group="model", name=name, node=Preset(cls).config())
    for name, preset in ESTIMATORS.items():
        cs.store(group="guide", name=name, node=preset.config())
    for name, preset in PLANS.items():
        cs.store(group="inference", name=f"sbi_{name}", node=preset.config())
