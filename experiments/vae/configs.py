"""The VAE problem's command-line options, generated from its Python definitions."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from physppl.inference.presets import Preset

from .api import train_vae
from .data import ArrayDataSource, DigitsDataSource, IsingDataSource
from .parts import ENGINES, GUIDES, MODELS

__all__ = ["register"]

OPTIONS = ("training", "evaluation", "physics", "n_draws", "log_likelihood")


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="vae", package="_global_",
             node=problem_node("physppl.vae.api.task", train_vae, OPTIONS))
    cs.store(group="data", name="digits", node=Preset(DigitsDataSource).config())
    cs.store(group="data", name="ising", node=Preset(IsingDataSource).config())
    cs.store(group="data", name="array", node=Preset(ArrayDataSource).config())
    cs.store(group="model", name="vae", node=MODELS["mlp"].config())
    cs.store(group="model", name="vae_conv", node=MODELS["conv"].config())
    for name, preset in GUIDES.items():
        cs.store(group="guide", name=f"vae_{name}", node=preset.config())
    cs.store(group="inference", name="vae_svi", node=ENGINES["svi"].config())
