"""The ``physppl`` command: a Hydra app that runs the configured problem's task and saves its result.

The task (``task: physppl.<problem>.api.task``, set by the problem's config) calls the problem's Python function
with the configuration's values; the function does the science inside a :class:`~physppl.inference.runner.Job`
(seeds, threads, parameter isolation, device, input protection) and returns a Result, which is saved into the
Hydra run directory. Errors in the input are one ``physppl: error:`` line, not a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig

from physppl.inference.fit import ProtocolError
from physppl.inference.plugins import require_plugins
from physppl.inference.svi import CheckpointError, TrainingDivergedError

__all__ = ["run", "main", "objective_value", "check_sweeper"]

log = logging.getLogger("physppl")
# arviz 0.23 logs at INFO, on import, that its 1.x preview packages are absent: noise in every job's log
logging.getLogger("arviz.preview").setLevel(logging.WARNING)

# what a user can fix, with the command-line option that fixes it
_HINTS = {
    CheckpointError: "to resume, run in the interrupted run's directory: inference.resume=true hydra.run.dir=<that run>",
    TrainingDivergedError: "try a smaller inference.optim.lr, or model/likelihood=student_t",
}


def run(cfg: DictConfig, output_dir: str | os.PathLike | None = None) -> dict:
    """Run ``cfg.task`` with ``output_dir`` as its work directory (default: Hydra's run directory, else the cwd),
    save the result there, and return its metrics."""
    if output_dir is None:
        output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = get_method(cfg.task)(cfg, output_dir)
    result.save(output_dir)
    return result.metrics


def _sweeper_direction() -> str | None:
    """``minimize``/``maximize`` when an optimising sweeper (optuna) drives this job, else None."""
    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    if "optuna" not in str(sweeper.get("_target_", "")).lower():
        return None
    direction = sweeper.get("direction", "minimize")
    if isinstance(direction, ListConfig):  # multi-objective: physppl returns one value, the first direction
        direction = direction[0]
    return str(getattr(direction, "name", direction)).lower()


def objective_value(cfg: DictConfig, metrics: dict, required: bool = True) -> float | None:
    """The metric named by ``cfg.objective``, as the float a sweeper optimises (NaN when the run produced none).

    A metric this run did not compute (e.g. CC1/2 without half datasets) is an error only when ``required``
    (an optimising sweeper waits for it); otherwise None.
    """
    objective = cfg.get("objective")
    if not objective or (objective not in metrics and not required):
        return None
    if objective not in metrics:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ValueError(f"objective={objective!r} is not among this run's metrics; "
                         f"numeric metrics: {', '.join(numeric)}")
    value = metrics[objective]
    return float("nan") if value is None else float(value)


def check_sweeper(cfg: DictConfig, direction: str | None) -> str | None:
    """Before any work, for an optimising sweeper going ``direction``: exit when there is no objective; return a
    warning when the experiment says its objective is better the other way (else None)."""
    if direction is None:
        return None
    if not cfg.get("objective"):
        sys.exit("physppl: error: an optimising sweeper needs a metric to optimise: set objective=<a key of "
                 "metrics.json> (the experiments set one, e.g. +experiment=merging)")
    wanted = cfg.get("objective_direction")
    if wanted and str(wanted).lower() != direction:
        return (f"the sweeper will {direction} {cfg.objective}, but this experiment's objective_direction is {wanted}: "
                f"add hydra.sweeper.direction={wanted}")
    return None


@hydra.main(version_base="1.3", config_path="pkg://physppl.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    direction = _sweeper_direction()
    warning = check_sweeper(cfg, direction)
    if warning:
        log.warning(warning)
    try:
        metrics = run(cfg)
        # a scalar for sweepers (e.g. optuna): the experiment names its objective in cfg.objective
        return objective_value(cfg, metrics, required=direction is not None)
    except (ValueError, ProtocolError, FileNotFoundError, TrainingDivergedError) as err:
        # a clear one-line error for bad input or divergence, instead of a traceback
        hint = next((h for kind, h in _HINTS.items() if isinstance(err, kind)), None)
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(f"physppl: error: {err}" + (f" ({hint})" if hint else ""))


def main() -> None:
    # name the pip package of a missing launcher/sweeper before Hydra fails with a bare "could not find"
    require_plugins(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
