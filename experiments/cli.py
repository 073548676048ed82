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
from hydra.errors import InstantiationException
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig

from physppl.inference.fit import ProtocolError
from physppl.inference.interrupt import Interrupted
from physppl.inference.plugins import require_plugins
from physppl.inference.svi import CheckpointError, TrainingDivergedError
from physppl.inference.validate import check_node

__all__ = ["run", "main", "objective_value", "check_sweeper", "experiments"]

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
    for key in cfg:  # option types, before any work (Hydra checks only what its structured configs declare)
        check_node(cfg[key], str(key))
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
        try:
            metrics = run(cfg)
        except InstantiationException as err:  # hydra wraps a constructor's error: report the error itself
            cause = err.__cause__
            if isinstance(cause, (ValueError, ProtocolError, FileNotFoundError)):
                raise cause from None
            raise
        # a scalar for sweepers (e.g. optuna): the experiment names its objective in cfg.objective
        return objective_value(cfg, metrics, required=direction is not None)
    except Interrupted as err:
        # one line and the shell's status for the signal (130 SIGINT, 143 SIGTERM), not a traceback
        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
        how = (f"; resume with the same command and inference.resume=true hydra.run.dir={run_dir}"
               if err.checkpoint is not None else "")
        log.warning("interrupted by %s", err)
        print(f"physppl: interrupted by {err}{how}", file=sys.stderr, flush=True)
        sys.exit(err.exit_status)
    except (ValueError, ProtocolError, FileNotFoundError, TrainingDivergedError) as err:
        # a clear one-line error for bad input or divergence, instead of a traceback
        hint = next((h for kind, h in _HINTS.items() if isinstance(err, kind)), None)
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(f"physppl: error: {err}" + (f" ({hint})" if hint else ""))


def experiments() -> dict[str, str]:
    """Each built-in experiment with its one-line description (the first comment of its yaml)."""
    from importlib.resources import files

    out = {}
    for path in sorted(files("physppl.conf").joinpath("experiment").iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yaml"):
            continue
        comments = [ln.lstrip("# ").strip() for ln in path.read_text().splitlines()
                    if ln.startswith("#") and "@package" not in ln]
        out[path.name.removesuffix(".yaml")] = comments[0].split(": physppl ")[0] if comments else ""
    return out


def _help() -> str:
    width = max(len(n) for n in experiments()) + len("+experiment=")
    lines = ["usage: physppl +experiment=<name> [key=value ...]      (Hydra overrides; -m for a sweep)", "",
             "experiments:"]
    lines += [f"  {'+experiment=' + name:<{width}}  {text}" for name, text in experiments().items()]
    lines += ["", "  physppl +experiment=<name> --cfg job    print the configuration that would run",
              "  physppl --hydra-help                    Hydra's own options (launchers, sweepers, logging)",
              "  physppl --version                       physppl's version",
              "", "Every option is described in README.md and in each problem's experiments/<problem>/README.md."]
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if "--version" in args:
        from importlib.metadata import version

        print(f"physppl {version('physppl')}")
        return
    if "--help" in args or "-h" in args:  # Hydra's --help would describe Hydra; this lists what physppl runs
        print(_help())
        return
    # name the pip package of a missing launcher/sweeper before Hydra fails with a bare "could not find"
    require_plugins(args)
    _hydra_main()


if __name__ == "__main__":
    main()
