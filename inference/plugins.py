"""Hydra launcher and sweeper plugins: which package provides each, and a clear message when one is missing.

Hydra's own message for a missing plugin ("Could not find 'hydra/launcher/joblib'") does not say what to install,
so the command line is checked before Hydra starts.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["HydraPlugin", "PLUGINS", "missing_plugins", "require_plugins"]


@dataclass(frozen=True)
class HydraPlugin:
    module: str        # the importable module that registers the plugin with Hydra
    package: str       # what pip installs
    extra: str | None  # physppl's optional extra that brings it, if any


_JOBLIB = HydraPlugin("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "sweep")
_SUBMITIT = HydraPlugin("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "sweep")
_OPTUNA = HydraPlugin("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "sweep")
# Not in the sweep extra: the ray launcher downgrades cloudpickle and python-dateutil.
_RAY = HydraPlugin("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher", None)

PLUGINS: dict[tuple[str, str], HydraPlugin] = {
    ("launcher", "joblib"): _JOBLIB,
    ("launcher", "submitit_local"): _SUBMITIT,
    ("launcher", "submitit_slurm"): _SUBMITIT,
    ("launcher", "ray"): _RAY,
    ("launcher", "ray_aws"): _RAY,
    ("launcher", "rq"): HydraPlugin("hydra_plugins.hydra_rq_launcher", "hydra-rq-launcher", None),
    ("sweeper", "optuna"): _OPTUNA,
    ("sweeper", "ax"): HydraPlugin("hydra_plugins.hydra_ax_sweeper", "hydra-ax-sweeper", None),
    ("sweeper", "nevergrad"): HydraPlugin("hydra_plugins.hydra_nevergrad_sweeper", "hydra-nevergrad-sweeper", None),
}

_CHOICE = re.compile(r"^(?:override\s+)?[+~]*hydra/(launcher|sweeper)=([A-Za-z0-9_]+)\s*$")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_plugins(overrides: Iterable[str]) -> list[tuple[str, str, HydraPlugin]]:
    """The ``(group, option, plugin)`` of every ``hydra/launcher=...`` or ``hydra/sweeper=...`` override whose
    plugin is not importable. Options physppl does not know (Hydra's own ``basic``, user plugins) are left to Hydra."""
    missing = []
    for arg in overrides:
        m = _CHOICE.match(arg.strip())
        if not m:
            continue
        plugin = PLUGINS.get((m.group(1), m.group(2)))
        if plugin is not None and not _installed(plugin.module):
            missing.append((m.group(1), m.group(2), plugin))
    return missing


def require_plugins(overrides: Iterable[str]) -> None:
    """Raise ``SystemExit`` with install instructions when a chosen launcher or sweeper plugin is not installed."""
    lines = []
    for group, option, plugin in missing_plugins(overrides):
        how = (f"pip install -e '.[{plugin.extra}]' in a physppl checkout, or pip install {plugin.package}"
               if plugin.extra else f"pip install {plugin.package} (not in physppl's extras: it pins other packages)")
        lines.append(f"hydra/{group}={option} needs the Hydra plugin {plugin.package}, which is not installed: {how}")
    if lines:
        raise SystemExit("physppl: error: " + "\n".join(lines))
