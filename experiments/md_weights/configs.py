"""The frame-weighting problem's command-line options, generated from its Python definitions."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from physppl.inference.presets import Preset, signature_defaults
from physppl.models.md_weights import FrameWeightsModel

from .api import weigh_frames
from .data import MDWeightsDataSource, simulate_example
from .parts import ENGINES, GUIDES

__all__ = ["register"]

# FrameWeightsModel's arguments that come from the data
_FROM_DATA = ("frames", "shell", "concentration", "prior_weights", "groups", "has_sigma", "bragg", "bragg_has_sigma",
              "voxel_weight")
OPTIONS = ("warm_start_steps", "warm_start_lr", "cc_baseline", "cc_steps", "cc_lr", "n_draws", "log_likelihood")


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="md_weights", package="_global_",
             node=problem_node("physppl.md_weights.api.task", weigh_frames, OPTIONS))
    # the simulated example's settings are a plain node with simulate_example's defaults (they key its cache)
    simulate = signature_defaults(simulate_example, exclude=("progress",))
    # columns: every key a user may set (data.columns.intensity=IMEAN), each None = found by MTZ type
    columns = dict.fromkeys(("amplitude", "phase", "intensity", "sigma", "bragg_intensity", "bragg_sigma"))
    cs.store(group="data", name="md_frames", node=Preset(MDWeightsDataSource, simulate=simulate, columns=columns).config())
    cs.store(group="model", name="md_weights", node=Preset(FrameWeightsModel, partial=True, exclude=_FROM_DATA).config())
    for name, preset in GUIDES.items():
        cs.store(group="guide", name=f"md_{name}", node=preset.config())
    cs.store(group="inference", name="md_svi", node=ENGINES["svi"].config())
