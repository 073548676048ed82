"""Merging at scale: one simulated serial (XFEL-like) merge per size, each in its own process.

For each number of observations (10^5, 10^6, 10^7, ...) :func:`physppl.models.simulators.merging.simulate_xfel`
makes a data set of still images with ~150 partial reflections each (same crystal, so the same ~8,600 unique
reflections at every size: multiplicity grows with the data), and :func:`physppl.merge` scales and merges it
with minibatch SVI (the per-shot scale ``mlp_shot``, Student-t noise, the Wilson prior), the half-dataset merge
for CC1/2 included, and writes the run directory (posterior.nc, merged.mtz, figures). The table gives the whole
job's wall time, the seconds per SVI step, the steps, whether the convergence test passed, the peak resident
memory (``VmHWM`` of the worker process: its own), the CC of the merged F to the simulated truth and CC1/2.

    python experiments/benchmarks/scale_merging.py --sizes 100000 1000000 10000000
    python experiments/benchmarks/scale_merging.py --sizes 100000 1000000 --threads 1 --json scale.json

:func:`fitted_exponent` gives the slope of log(cost) against log(n_obs): ~0 for the seconds per step (the step
cost does not grow with the data), <= 1 for the wall time and the memory (linear parts: simulation, preparation,
conventional merge, the final passes over all observations).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("n_obs", "wall_s", "s_per_step", "steps", "converged", "peak_gb", "cc_to_truth", "cc_half")
# metadata of the simulated stills: resolution, detector position, the Ewald offset (partiality)
XFEL_METADATA = ("dHKL", "XDET", "YDET", "EWALD_OFFSET")
DEFAULT_BATCH = 32_768  # = physppl.merging.api.AUTO_BATCH_SIZE, also for the sizes "auto" leaves full-batch


def _peak_gb() -> float:
    """Peak resident memory of this process (VmHWM) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def run_one(n_obs: int, threads: int, out: Path, batch_size: int | str | None = DEFAULT_BATCH,
            max_steps: int | None = None, half_datasets: bool = True, n_draws: int = 200, seed: int = 0) -> dict:
    """One merge of a simulated XFEL-like set of ``n_obs`` observations in this process; the row of the table."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(int(threads))
    import physppl  # noqa: F401  (module-local Pyro parameters)
    from physppl.merging.api import merge
    from physppl.merging.data import MergingDataSource
    from physppl.merging.parts import ENGINES
    from physppl.models.simulators.merging import simulate_xfel

    timings: dict = {}

    def simulate():
        t = time.perf_counter()
        out_ = simulate_xfel(n_obs=int(n_obs), seed=seed)
        timings["simulate_s"] = time.perf_counter() - t
        return out_

    overrides = {"progress": False}
    if max_steps is not None:
        overrides.update(max_steps=int(max_steps), min_steps=min(300, int(max_steps)))
    engine = ENGINES["svi"].build(**overrides)
    source = MergingDataSource(simulate=simulate, metadata=XFEL_METADATA, half_datasets=half_datasets)
    result = merge(source, engine=engine, scale="mlp_shot", batch_size=batch_size, initial_merge={"block_size": 1},
                   n_draws=n_draws, threads=threads, seed=seed, workdir=out)
    t_save = time.perf_counter()
    result.save(out)
    m = result.metrics
    steps = int(m.get("steps") or 0)
    train = m.get("train_time")
    row = {
        "n_obs": int(m["n_obs"]), "n_refl": int(m["n_refl"]), "n_images": int(m["n_images"]),
        "job_s": time.perf_counter() - t0, "merge_s": m.get("wall_time_total"), "save_s": time.perf_counter() - t_save,
        "train_s": train, "half_train_s": m.get("half_train_time"),
        "s_per_step": (train / steps) if train and steps else float("nan"), "steps": steps,
        "converged": bool(m.get("converged")), "batch_size": m.get("batch_size"),
        "peak_gb": _peak_gb(), "cc_to_truth": m.get("cc_truth"), "cc_half": m.get("cc_half"),
        "log_likelihood": m.get("log_likelihood", "written"),
        "posterior_nc_mb": (out / "posterior.nc").stat().st_size / 1e6 if (out / "posterior.nc").exists() else None,
        **timings,
    }
    return row


def merging_table(sizes: list[int], threads: int = 1, workdir: Path = REPO / "outputs" / "benchmarks" / "scale_merging",
                  json_path: Path | None = None, batch_size: int | str | None = DEFAULT_BATCH,
                  max_steps: int | None = None, half_datasets: bool = True, timeout: float | None = None) -> list[dict]:
    """One merge per size, each in its own subprocess (its peak memory its own); rows with ``n_obs``, ``wall_s``
    (the whole job, interpreter start included), ``s_per_step``, ``steps``, ``converged``, ``peak_gb``,
    ``cc_to_truth``, ``cc_half`` and more. A worker that fails or runs past ``timeout`` seconds gives a row with
    ``error``. With ``json_path`` the rows are written there after each size."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rows = []
    for n in sizes:
        out = workdir / f"n{int(n)}"
        out.mkdir(parents=True, exist_ok=True)
        row_file = out / "row.json"
        row_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(int(n)), "--threads", str(threads),
               "--workdir", str(out), "--batch-size", str(batch_size)]
        if max_steps is not None:
            cmd += ["--max-steps", str(int(max_steps))]
        if not half_datasets:
            cmd.append("--no-half")
        t0 = time.perf_counter()
        with open(out / "worker.log", "w") as fh:
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.perf_counter() - t0
        if rc == 0 and row_file.exists():
            row = {**json.loads(row_file.read_text()), "wall_s": wall}
        else:
            row = {"n_obs": int(n), "wall_s": wall, "error": f"exit {rc}, see {out / 'worker.log'}"}
        rows.append(row)
        if json_path is not None:
            Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows


def fitted_exponent(rows: list[dict], key: str) -> float:
    """Slope of log(row[key]) against log(n_obs) by least squares (NaN with fewer than two usable rows)."""
    pts = [(float(r["n_obs"]), float(r[key])) for r in rows
           if r.get(key) is not None and isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
           and float(r[key]) > 0 and "error" not in r]
    if len(pts) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def markdown(rows: list[dict], columns=COLUMNS) -> str:
    def fmt(v):
        if isinstance(v, bool) or v is None:
            return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cols = list(columns) + (["error"] if any("error" in r for r in rows) else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "benchmarks" / "scale_merging")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--batch-size", default=str(DEFAULT_BATCH), help="observations per SVI step, 'auto' or 'none'")
    p.add_argument("--max-steps", type=int, default=None, help="SVI step budget (default: the svi engine's)")
    p.add_argument("--no-half", action="store_true", help="skip the half-dataset merge (no CC1/2)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per size before its worker is stopped")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bs = args.batch_size
    batch_size = None if bs.lower() == "none" else (bs if bs == "auto" else int(bs))
    if args.worker is not None:  # one size, in this process
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        row = run_one(args.worker, args.threads, args.workdir, batch_size=batch_size, max_steps=args.max_steps,
                      half_datasets=not args.no_half)
        (args.workdir / "row.json").write_text(json.dumps(row, indent=1))
        return [row]
    rows = merging_table(args.sizes, args.threads, args.workdir, args.json, batch_size=batch_size,
                         max_steps=args.max_steps, half_datasets=not args.no_half, timeout=args.timeout)
    print(f"threads={args.threads}, batch_size={batch_size}")
    print(markdown(rows))
    for key in ("wall_s", "s_per_step", "peak_gb"):
        print(f"fitted exponent of {key} in n_obs: {fitted_exponent(rows, key):.3f}")
    return rows


if __name__ == "__main__":
    main()
