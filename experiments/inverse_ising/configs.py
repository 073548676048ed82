"""Command-line options of this problem, generated from its Python definitions."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from physppl.inference.presets import Preset

from .api import infer_couplings
from .data import ArraySpins, SimulatedSpins
from .parts import ENGINES, GUIDES, MODELS

__all__ = ["register"]

OPTIONS = ("calibration", "n_draws", "map_steps", "exact_check", "log_likelihood")


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="inverse_ising", package="_global_",
             node=problem_node("physppl.inverse_ising.api.task", infer_couplings, OPTIONS))
    cs.store(group="data", name="ising_ferromagnet", node=Preset(SimulatedSpins, kind="ferromagnet").config())
    cs.store(group="data", name="ising_spin_glass", node=Preset(SimulatedSpins, kind="spin_glass").config())
    # a user's file; the in-memory array is for Python only
    cs.store(group="data", name="ising_spins", node=Preset(ArraySpins, exclude=("array",)).config())
    cs.store(group="model", name="inverse_ising", node=MODELS["normal"].config())
    cs.store(group="model", name="inverse_ising_laplace", node=MODELS["laplace"].config())
    for name, preset in GUIDES.items():
        cs.store(group="guide", name=f"ising_{name}", node=preset.config())
    for name, preset in ENGINES.items():
        cs.store(group="inference", name=f"ising_{name}", node=preset.config())
