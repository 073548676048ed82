"""``physppl-report``: one table and one set of plots for every run of a Hydra sweep.

Each run directory of a multirun holds ``.hydra/{config,overrides}.yaml``, ``metrics.json``, ``posterior.nc``
and ``losses.csv``. The report reads them all and writes into ``<multirun>/report/`` (or ``--out``):

- ``report.csv`` and ``report.md``: one row per run (failed runs included), a column per swept override,
  the run's objective and the metrics its experiment lists in ``report_metrics``;
- ``compare.csv``: ``az.compare`` (PSIS-LOO) of the runs fitted to the same observed data, where the
  experiment sets ``report_compare`` and the runs saved a pointwise log-likelihood;
- ``report.png`` (metrics by run, training curves, model comparison side by side), ``metrics.png``,
  ``losses.png`` and ``compare.png``.

The module knows nothing of any domain: which metrics matter comes from each run's own config.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from .convert import joint_log_likelihood
from .outputs import LOSSES_FILE, atomic_write

__all__ = ["RunRecord", "find_runs", "load_run", "report_table", "compare_runs", "write_report", "main"]

log = logging.getLogger("physppl.report")


@dataclass
class RunRecord:
    """What one job of a sweep left behind."""

    path: Path
    name: str
    overrides: dict[str, str]
    config: dict
    metrics: dict = field(default_factory=dict)
    losses: pd.DataFrame | None = None

    @property
    def ok(self) -> bool:
        return bool(self.metrics)

    @property
    def posterior(self) -> Path:
        return self.path / "posterior.nc"


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(root: str | Path) -> list[Path]:
    """Job directories under ``root`` (a multirun directory, or a single run): those Hydra wrote a config into."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"physppl-report: {root} is not a directory (give a Hydra multirun directory)")
    found = {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    if (root / "metrics.json").is_file():  # a single run given directly
        found.add(root)
    runs = sorted((p for p in found if "report" not in p.relative_to(root).parts), key=_natural_key)
    if not runs:
        raise FileNotFoundError(f"physppl-report: no runs under {root}: expected job folders with .hydra/config.yaml "
                                "or metrics.json (the output of physppl -m ...)")
    return runs


def _override_key_value(text: str) -> tuple[str, str] | None:
    text = text.strip()
    if "=" not in text or text.startswith("hydra.") or text.startswith("hydra/"):
        return None
    key, value = text.split("=", 1)
    return key.lstrip("+~").strip(), value.strip()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (list, tuple)):
            continue  # curves and per-item lists belong to the run's own files
        else:
            out[key] = v
    return out


def load_run(path: str | Path, root: str | Path | None = None) -> RunRecord:
    """Read one run directory; a run without ``metrics.json`` (a failed job) gets empty metrics."""
    path = Path(path)
    hydra_dir = path / ".hydra"
    overrides: dict[str, str] = {}
    if (hydra_dir / "overrides.yaml").is_file():
        for text in OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")) or []:
            kv = _override_key_value(str(text))
            if kv:
                overrides[kv[0]] = kv[1]
    config: dict = {}
    if (hydra_dir / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
    metrics: dict = {}
    if (path / "metrics.json").is_file():
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"physppl-report: {path / 'metrics.json'} is not valid JSON ({err})") from None
    losses = None
    if (path / LOSSES_FILE).is_file():
        losses = pd.read_csv(path / LOSSES_FILE)
        if not {"step", "loss"} <= set(losses.columns):
            raise ValueError(f"physppl-report: {path / LOSSES_FILE} needs columns step and loss, "
                             f"has {list(losses.columns)}")
    name = str(path.relative_to(root)) if root is not None and path != Path(root) else path.name
    return RunRecord(path, name, overrides, config, metrics, losses)


def _objective(run: RunRecord) -> tuple[str | None, str | None]:
    return run.config.get("objective"), run.config.get("objective_direction")


def report_table(runs: list[RunRecord]) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per run; also the overrides every run shares (they describe the sweep, not a row)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    shared = {k: runs[0].overrides[k] for k in keys if k not in varying and k in runs[0].overrides}
    metric_keys = list(dict.fromkeys(m for r in runs for m in (r.config.get("report_metrics") or [])))
    rows = []
    for r in runs:
        flat = _flatten(r.metrics)
        objective, direction = _objective(r)
        row = {"run": r.name, "status": "ok" if r.ok else "failed (no metrics.json)"}
        row.update({k: r.overrides.get(k) for k in varying})
        row.update({"objective": objective, "direction": direction,
                    "objective_value": flat.get(objective) if objective else None})
        row.update({m: flat.get(m) for m in metric_keys})
        final = r.losses["loss"].iloc[-1] if r.losses is not None and len(r.losses) else flat.get("final_loss")
        row.update({"final_loss": final, "steps": flat.get("steps"), "wall_time_s": flat.get("wall_time_total"),
                    "seed": r.config.get("seed"), "device": flat.get("device", r.config.get("device"))})
        rows.append(row)
    table = pd.DataFrame(rows)
    # rank by the objective when every run agrees on what and which way
    objectives = {(o, d) for o, d in zip(table["objective"], table["direction"]) if o}
    if len(objectives) == 1:
        _, direction = objectives.pop()
        if direction in ("maximize", "minimize"):
            values = pd.to_numeric(table["objective_value"], errors="coerce")
            table["rank"] = values.rank(ascending=direction == "minimize", method="min").astype("Int64")
    return table, shared


def _observed_signature(idata) -> tuple:
    obs = idata.observed_data
    return tuple(sorted((k, obs[k].shape, float(np.nansum(np.asarray(obs[k].values, dtype=float))))
                        for k in obs.data_vars))


def compare_runs(runs: list[RunRecord], ic: str = "loo") -> list[tuple[str, pd.DataFrame]]:
    """``az.compare`` within each group of runs fitted to the same observed data (same task, same values).

    Returns ``[(group label, comparison table)]`` for every group of two or more runs with a log-likelihood.
    """
    import arviz as az

    groups: dict[tuple, dict] = {}
    for r in runs:
        if not (r.ok and r.config.get("report_compare") and r.posterior.is_file()):
            continue
        try:
            idata = az.from_netcdf(r.posterior)
        except (OSError, ValueError) as err:
            log.warning("skipping %s in the comparison: %s", r.posterior, err)
            continue
        if "log_likelihood" not in idata.groups() or "observed_data" not in idata.groups():
            continue
        ll = joint_log_likelihood(idata)  # float64, observed sites on the same points summed
        idata.log_likelihood = ll
        key = (r.config.get("task"), tuple(sorted(idata.log_likelihood.data_vars)), _observed_signature(idata))
        groups.setdefault(key, {})[r.name] = idata
    results = []
    for (task, var_names, _), members in groups.items():
        if len(members) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PSIS k warnings are reported in the table's columns instead
            var_name = var_names[0]  # one site, or the joint built above; else the first site only
            criterion = az.loo if ic == "loo" else az.waic
            # each criterion once, pointwise; az.compare accepts the results, so nothing is computed twice
            estimates = {name: criterion(idata, var_name=var_name, pointwise=True) for name, idata in members.items()}
            table = az.compare(estimates, ic=ic)
            if ic == "loo":
                for name, est in estimates.items():
                    k = np.asarray(est.pareto_k)
                    table.loc[name, "pareto_k_max"] = float(np.nanmax(k))
                    table.loc[name, "pareto_k_above_0.7"] = float(np.mean(k > 0.7))
        # the problem's name from its task (physppl.<problem>.api.task)
        parts = str(task).split(".")
        results.append((f"{parts[-3] if len(parts) >= 3 else task}: {', '.join(var_names)}", table))
    return results


# -- plots ---------------------------------------------------------------------------------------------------

def _short_value(value) -> str:
    """An override's value for a plot label: optuna's floats (0.0012520653814999472) to 4 significant digits."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if len(text) > 8 else text


def _label(row: pd.Series, varying: list[str], short: bool = False) -> str:
    parts = [_short_value(row[k]) if short else f"{k.split('.')[-1]}={_short_value(row[k])}"
             for k in varying if row.get(k) is not None]
    return f"{row['run']}: " + ", ".join(parts) if parts else str(row["run"])


def _plot_metrics(ax_list, table: pd.DataFrame, columns: list[str], varying: list[str]) -> None:
    labels = [_label(r, varying) for _, r in table.iterrows()]
    y = np.arange(len(table))
    for ax, col in zip(ax_list, columns):
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(values)
        ax.plot(values[ok], y[ok], "o", color="C0")
        missing_at = float(values[ok].mean()) if ok.any() else 0.0  # where "n/a" is written
        for yi, v in zip(y, values):
            finite = bool(np.isfinite(v))
            ax.annotate(f"{v:.4g}" if finite else "n/a", (v if finite else missing_at, yi), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(y, labels if ax is ax_list[0] else [""] * len(y), fontsize=8)
        ax.set_ylim(len(y) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.25)
        ax.set_title(col, fontsize=9)


def _plot_losses(ax, runs: list[RunRecord], table: pd.DataFrame, varying: list[str]) -> bool:
    drawn, lows, highs = False, [], []
    for (_, row), r in zip(table.iterrows(), runs):
        if r.losses is None or not len(r.losses):
            continue
        loss = r.losses["loss"].to_numpy(dtype=float)
        window = max(1, len(loss) // 50)  # a running median, so minibatch noise does not hide the trend
        smooth = pd.Series(loss).rolling(window, min_periods=1, center=True).median().to_numpy()
        ax.plot(r.losses["step"], smooth, lw=1.2, label=_label(row, varying, short=True))
        lows.append(np.nanmin(smooth))
        highs.append(smooth[min(len(smooth) - 1, max(1, len(smooth) // 20))])  # skip the first 5% of steps
        drawn = True
    if drawn:
        lo, hi = float(np.nanmin(lows)), float(np.nanmax(highs))
        if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (running median)")
        ax.set_title("training curves (negative ELBO for SVI)", fontsize=9)
        ax.legend(fontsize=7, loc="upper right", title=", ".join(k.split(".")[-1] for k in varying) or None,
                  title_fontsize=7)
    return drawn


def _plot_compare(ax, table: pd.DataFrame, title: str, labels: dict[str, str]) -> None:
    import arviz as az

    az.plot_compare(table.rename(index=labels), ax=ax, insample_dev=False, legend=True, textsize=8)
    ax.set_title(f"az.compare, {title}", fontsize=9)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def write_report(root: str | Path, out: str | Path | None = None, ic: str = "loo", plots: bool = True) -> Path:
    """Gather the runs under ``root`` and write the report files into ``out`` (default ``root/report``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    runs = [load_run(p, root) for p in find_runs(root)]
    table, shared = report_table(runs)
    varying = [c for c in table.columns if c in {k for r in runs for k in r.overrides}]
    comparisons = compare_runs(runs, ic=ic)

    atomic_write(out / "report.csv", lambda p: table.to_csv(p, index=False))
    lines = [f"# Sweep report: {root}", "", f"{len(runs)} runs, {int((table['status'] == 'ok').sum())} with metrics."]
    if shared:
        lines += ["", "Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in shared.items())]
    best = root / "optimization_results.yaml"
    if best.is_file():
        res = OmegaConf.to_container(OmegaConf.load(best))
        lines += ["", f"Optuna: best value {res.get('best_value')} with " +
                  " ".join(f"`{k}={v}`" for k, v in (res.get("best_params") or {}).items())]
    lines += ["", table.to_markdown(index=False, floatfmt=".5g")]
    if comparisons:
        frames = []
        for title, comp in comparisons:
            lines += ["", f"## Model comparison, {title} (az.compare, {ic.upper()})", "",
                      comp.to_markdown(floatfmt=".4g")]
            frames.append(comp.assign(group=title))
        both = pd.concat(frames)
        atomic_write(out / "compare.csv", lambda p: both.to_csv(p, index_label="run"))
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda p: p.write_text(text))
    if not plots:
        return out

    metric_cols = [c for c in ["objective_value", *dict.fromkeys(m for r in runs
                                                                  for m in (r.config.get("report_metrics") or []))]
                   if c in table.columns and pd.to_numeric(table[c], errors="coerce").notna().any()]
    objective_names = {o for o in table["objective"] if o}
    metric_cols = [c for c in metric_cols if c not in objective_names][:4]
    labels = {row["run"]: _label(row, varying, short=True) for _, row in table.iterrows()}
    have_losses = any(r.losses is not None and len(r.losses) for r in runs)
    height = 0.9 + 0.32 * len(table)

    if metric_cols:
        fig, axes = plt.subplots(1, len(metric_cols), figsize=(3.2 * len(metric_cols) + 2, height), squeeze=False)
        _plot_metrics(list(axes[0]), table.rename(columns={"objective_value": _objective_title(table)}),
                      [_objective_title(table) if c == "objective_value" else c for c in metric_cols], varying)
        _save(fig, out / "metrics.png")
    if have_losses:
        fig, ax = plt.subplots(figsize=(6, 4))
        _plot_losses(ax, runs, table, varying)
        _save(fig, out / "losses.png")
    for title, comp in comparisons[:1]:
        fig, ax = plt.subplots(figsize=(6, 0.8 + 0.4 * len(comp)))
        _plot_compare(ax, comp, title, labels)
        _save(fig, out / "compare.png")

    # the main figure: what a user looks at first
    panels = (1 if metric_cols else 0) + int(have_losses) + int(bool(comparisons))
    if panels:
        fig = plt.figure(figsize=(5.2 * panels + 1.5, max(3.8, height)))
        grid = fig.add_gridspec(1, panels)
        k = 0
        if metric_cols:
            ax = fig.add_subplot(grid[0, k]); k += 1
            col = metric_cols[0]
            renamed = table.rename(columns={"objective_value": _objective_title(table)})
            _plot_metrics([ax], renamed, [_objective_title(table) if col == "objective_value" else col], varying)
        if have_losses:
            _plot_losses(fig.add_subplot(grid[0, k]), runs, table, varying); k += 1
        if comparisons:
            _plot_compare(fig.add_subplot(grid[0, k]), comparisons[0][1], comparisons[0][0], labels)
        fig.suptitle(f"{root.name}: {len(runs)} runs", fontsize=10)
        fig.tight_layout()
        _save(fig, out / "report.png")
    return out


def _objective_title(table: pd.DataFrame) -> str:
    names = [o for o in dict.fromkeys(table["objective"]) if o]
    dirs = [d for d in dict.fromkeys(table["direction"]) if d]
    if len(names) == 1:
        arrow = {"maximize": " (higher is better)", "minimize": " (lower is better)"}.get(dirs[0] if dirs else "", "")
        return f"objective: {names[0]}{arrow}"
    return "objective"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="physppl-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun directory (e.g. multirun/2026-11-22/10-00-00)")
    parser.add_argument("--out", help="where to write the report (default: <multirun_dir>/report)")
    parser.add_argument("--ic", choices=["loo", "waic"], default="loo", help="information criterion for az.compare")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        out = write_report(args.multirun_dir, args.out, ic=args.ic, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(str(err) if str(err).startswith("physppl-report") else f"physppl-report: error: {err}")
    table = pd.read_csv(out / "report.csv")
    print(table.to_string(index=False, max_colwidth=40))
    print(f"report written to {out}")


if __name__ == "__main__":
    main()
