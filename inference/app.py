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
from omegaconf import DictConfig

from .outputs import write_metrics
from .svi import TrainingDivergedError

__all__ = ["run", "main"]

log = logging.getLogger("physppl")


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


@hydra.main(version_base="1.3", config_path="pkg://physppl.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except (ValueError, FileNotFoundError, TrainingDivergedError) as err:
        # a clear one-line error for bad input or divergence, instead of a traceback
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(f"physppl: error: {err}")
    # a scalar for sweepers (e.g. optuna): the task names its objective in cfg.objective
    objective = cfg.get("objective")
    return metrics.get(objective) if objective else None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
