"""The ``physppl`` command: a Hydra app that seeds, runs the configured task and writes metrics.json.

The task (``task: dotted.path.to.run``) does the science; this module only sets up every job the same way,
so jobs in one multirun cannot leak state into each other.
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path

import hydra
import pyro
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig

from .outputs import write_metrics
from .plugins import require_plugins
from .svi import TrainingDivergedError

__all__ = ["run", "main"]

log = logging.getLogger("physppl")
# arviz 0.23 logs at INFO, on import, that its 1.x preview packages are absent: noise in every job's log
logging.getLogger("arviz.preview").setLevel(logging.WARNING)


def prepare_job(cfg: DictConfig) -> None:
    """Per-job global state: threads, a clean Pyro parameter store, seeds, validation."""
    torch.set_num_threads(int(cfg.get("threads", 1)))
    # Pyro's parameter store is global: without this a second job in one process starts from the first's fit.
    pyro.clear_param_store()
    pyro.set_rng_seed(int(cfg.get("seed", 0)))
    pyro.enable_validation(bool(cfg.get("validate", False)))


def run(cfg: DictConfig, output_dir: str | os.PathLike | None = None) -> dict:
    """Run the configured task in ``output_dir`` (default: Hydra's run directory, else the cwd)."""
    if output_dir is None:
        output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prepare_job(cfg)
    task = get_method(cfg.task)
    t0 = time.perf_counter()
    metrics = task(cfg, output_dir)
    metrics = {**metrics, "wall_time_total": round(time.perf_counter() - t0, 3), "seed": int(cfg.get("seed", 0)),
               "threads": torch.get_num_threads(), "output_dir": str(output_dir),
               # peak resident memory of this process so far (Linux reports KiB)
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    write_metrics(output_dir, metrics)
    log.info("outputs in %s", output_dir)
    return metrics


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


@hydra.main(version_base="1.3", config_path="pkg://physppl.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    direction = _sweeper_direction()
    if direction is not None:
        if not cfg.get("objective"):
            sys.exit("physppl: error: an optimising sweeper needs a metric to optimise: set objective=<a key of "
                     "metrics.json> (the experiments set one, e.g. +experiment=merging)")
        wanted = cfg.get("objective_direction")
        if wanted and str(wanted).lower() != direction:
            log.warning("the sweeper will %s %s, but this experiment's objective_direction is %s: "
                        "add hydra.sweeper.direction=%s", direction, cfg.objective, wanted, wanted)
    try:
        metrics = run(cfg)
        # a scalar for sweepers (e.g. optuna): the experiment names its objective in cfg.objective
        return objective_value(cfg, metrics, required=direction is not None)
    except (ValueError, FileNotFoundError, TrainingDivergedError) as err:
        # a clear one-line error for bad input or divergence, instead of a traceback
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(f"physppl: error: {err}")


def main() -> None:
    # name the pip package of a missing launcher/sweeper before Hydra fails with a bare "could not find"
    require_plugins(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
