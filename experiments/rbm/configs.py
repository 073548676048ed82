"""The RBM problems' command-line options, generated from their Python definitions."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from .api import train_rbm
from .thermodynamics import DEFAULT_DATA, rbm_thermodynamics
from .parts import ENGINES, GUIDES, MODELS

__all__ = ["register"]


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="rbm", package="_global_",
             node=problem_node("physppl.rbm.api.task", train_rbm, ("evaluation", "n_draws")))
    cs.store(group="problem", name="rbm_thermodynamics", package="_global_",
             node=problem_node("physppl.rbm.thermodynamics.task", rbm_thermodynamics,
                               ("hidden_units", "sampling", "evaluation")))
    cs.store(group="data", name="rbm_ising", node=DEFAULT_DATA.config())
    cs.store(group="model", name="rbm", node=MODELS["rbm"].config())
    cs.store(group="guide", name="rbm_exact", node=GUIDES["exact"].config())
    for name, preset in ENGINES.items():
        cs.store(group="inference", name=f"rbm_{name}", node=preset.config())
