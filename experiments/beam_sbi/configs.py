"""The beam problem's command-line options, generated from its Python definitions."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from physppl.guides.beam import knife_edge_flow
from physppl.inference.presets import Preset
from physppl.models.beam import KnifeEdgeBeamModel

from .api import infer_beam
from .data import BeamDataSource
from .parts import BEAM_ESTIMATOR, PLANS

__all__ = ["register"]


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="beam_sbi", package="_global_",
             node=problem_node("physppl.beam_sbi.api.task", infer_beam, ("n_draws", "log_likelihood", "evaluate")))
    cs.store(group="data", name="beam", node=Preset(BeamDataSource).config())
    cs.store(group="model", name="beam", node=Preset(KnifeEdgeBeamModel).config())
    cs.store(group="guide", name="beam_flow", node=Preset(knife_edge_flow, partial=True,
                                                          exclude=("low", "high", "positions", "fast")).config())
    cs.store(group="guide", name="beam_estimator", node=BEAM_ESTIMATOR.config())
    for name, preset in PLANS.items():
        cs.store(group="inference", name=name, node=preset.config())
