"""The command line's configuration, generated from the Python definitions so that every default lives once.

Each problem registers its options (``physppl.<problem>.configs``): group options built by hydra-zen from the
:class:`~physppl.inference.presets.Preset`s its Python function uses, and a ``problem`` node at the top level
holding the task and the function's own options with the defaults of its signature. The YAML files in ``conf/``
only choose among these options (``config.yaml``, ``experiment/*.yaml``, ``model/merging.yaml``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from hydra.core.config_store import ConfigStore

from physppl.inference.presets import signature_defaults
from physppl.inference.runner import JobSettings

__all__ = ["register", "problem_node"]

_REGISTERED = False


def problem_node(task: str, fn: Callable, options: tuple[str, ...]):
    """Top-level config of a problem: ``task`` (what the runner calls) and ``fn``'s ``options`` with their defaults."""
    defaults = signature_defaults(fn)
    missing = [o for o in options if o not in defaults]
    if missing:
        raise ValueError(f"problem_node: {fn.__name__} has no default for {missing}")
    # a plain node, not a dataclass: Hydra cannot merge two structured configs of different types at the root
    node = {"task": task}
    for o in options:
        value = defaults[o]
        node[o] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return node


def register() -> None:
    """Put every option of every problem in Hydra's ConfigStore (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    cs.store(name="physppl_base", node={f.name: f.default for f in dataclasses.fields(JobSettings)})
    from physppl.beam_sbi import configs as beam_sbi
    from physppl.md_weights import configs as md_weights
    from physppl.merging import configs as merging
    from physppl.inverse_ising import configs as inverse_ising
    from physppl.rbm import configs as rbm
    from physppl.simulation_inference import configs as simulation_inference
    from physppl.vae import configs as vae

    merging.register(cs, problem_node)
    md_weights.register(cs, problem_node)
    beam_sbi.register(cs, problem_node)
    simulation_inference.register(cs, problem_node)
    vae.register(cs, problem_node)
    rbm.register(cs, problem_node)
    inverse_ising.register(cs, problem_node)
    _REGISTERED = True
