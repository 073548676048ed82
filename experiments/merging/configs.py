"""The merging problem's command-line options, generated from its Python definitions (see :mod:`physppl.configs`)."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from physppl.inference.presets import Preset
from physppl.models.merging import LaueMergingModel, MergingModel
from physppl.models.simulators.laue import simulate_laue
from physppl.models.simulators.merging import simulate_unmerged

from .api import merge
from .data import LAUE_METADATA, MergingDataSource
from .difference_map import difference_map
from .parts import ENGINES, ERROR_MODELS, GUIDES, LIKELIHOODS, PRIORS, SCALES

__all__ = ["register"]

# MergingModel's arguments that come from the data
_FROM_DATA = ("centric", "epsilon", "sigma_n", "n_images", "n_features", "dataset", "refl_key")


def register(cs: ConfigStore, problem_node) -> None:
    cs.store(group="problem", name="merging", package="_global_",
             node=problem_node("physppl.merging.api.task", merge, ("n_draws", "log_likelihood", "batch_size",
                                                                 "max_log_likelihood_values", "free_r")))
    cs.store(group="problem", name="difference_map", package="_global_", node=problem_node(
        "physppl.merging.difference_map.task", difference_map,
        ("merged", "phases", "names", "columns", "weighting", "alpha", "dmin", "dmax", "compare_model", "site",
         "site_radius", "peak_cutoff", "sample_rate", "scale")))
    # columns: every key a user may set (data.columns.intensity=IPR), each None = found by MTZ type
    cs.store(group="data", name="merging", node=Preset(
        MergingDataSource, simulate=Preset(simulate_unmerged, partial=True),
        columns=dict.fromkeys(("intensity", "sigma", "batch"))).config())
    # Laue data: the spots' wavelengths, and careless's Laue metadata less the wavelength (the model's curve has it)
    cs.store(group="data", name="merging_laue", node=Preset(
        MergingDataSource, simulate=Preset(simulate_laue, partial=True), wavelength="Wavelength",
        metadata=LAUE_METADATA, columns=dict.fromkeys(("intensity", "sigma", "batch"))).config())
    # scale: a slot the model/scale group fills (MergingModel has no default scale)
    cs.store(group="model", name="merging_schema",
             node=Preset(MergingModel, partial=True, exclude=_FROM_DATA, scale=None).config())
    cs.store(group="model", name="merging_laue_schema",
             node=Preset(LaueMergingModel, partial=True, exclude=(*_FROM_DATA, "wavelength_range"),
                         scale=None).config())
    for group, choices in (("model/scale", SCALES), ("model/likelihood", LIKELIHOODS),
                           ("model/error_model", ERROR_MODELS), ("model/prior", PRIORS), ("guide", GUIDES), ("inference", ENGINES)):
        for name, preset in choices.items():
            cs.store(group=group, name=name, node=preset.config())
