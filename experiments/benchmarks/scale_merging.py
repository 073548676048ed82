"""Merging at scale: one simulated serial (XFEL-like) merge per size, each in its own process.

For each number of observations (10^5, 10^6, 10^7, ...) :func:`physppl.models.simulators.merging.simulate_xfel`
makes a data set of still images with ~150 partial reflections each (same crystal, so the same ~8,600 unique
reflections at every size: multiplicity grows with the data), and :func:`physppl.merge` scales and merges it
with minibatch SVI (the per-shot scale ``mlp_shot``, Student-t noise, the Wilson prior), the half-dataset merge
for CC1/2 included, and writes the run directory (posterior.nc, merged.mtz, figures). The table gives the whole
job's wall time, the seconds per SVI step, the steps, whether the convergence test passed, the peak resident
memory (``VmHWM`` of the worker process: its own), the CC of the merged F to the simulated truth and CC1/2.

    python experiments/benchmarks/scale_merging.py --sizes 100000 1000000 10000000 --max-steps 10000
    python experiments/benchmarks/scale_merging.py --sizes 100000 1000000 --threads 1 --json scale.json

(``--max-steps 10000``: on minibatches the fits pass the convergence test at 2,036-2,274 steps, just beyond the
engine's default budget of 2,000.)

:func:`fitted_exponent` gives the slope of log(cost) against log(n_obs): ~0 for the seconds per step (the step
cost does not grow with the data), <= 1 for the wall time and the memory (linear parts: simulation, preparation,
conventional merge, the final passes over all observations).

With ``--careless-bin`` (careless installed in its own virtual environment) each size in ``--careless-sizes`` is
also merged by ``careless mono`` as an anchor: the same simulated data set (same seed) written as an unmerged MTZ
(``BATCH``, ``I``, ``SIGI``, ``XDET``, ``YDET``, ``EWALD_OFFSET``; careless computes ``dHKL``), careless given the
same metadata as physppl, Student-t likelihood, one thread, in its own process under a wall-clock limit. It runs
twice, 10 iterations (its start-up, data loading and output: ``startup_s``) and ``--careless-iterations``, so
``s_per_iter = (wall_N - wall_10) / (N - 10)``; a run stopped at the limit reports the rate from its progress bar
(in its log). The careless row (``method = careless``) gives its wall time, s/iteration, peak RSS, the CC of its
merged F to the truth, its projected time to physppl's number of steps and to careless's own default (10,000
iterations), and the ratios careless / physppl (to the same steps, and per step).

    python experiments/benchmarks/scale_merging.py --sizes 1000000 --max-steps 10000 \\
        --careless-bin /tmp/careless-venv/bin/careless --careless-iterations 2000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
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
CARELESS_COLUMNS = ("method", "n_obs", "wall_s", "startup_s", "s_per_step", "steps", "peak_gb", "cc_to_truth",
                    "proj_wall_s_physppl_steps", "wall_ratio", "step_ratio", "proj_wall_s_default")
CARELESS_DEFAULT_ITERATIONS = 10_000  # careless mono --iterations default (careless/args/optimizer.py)
CARELESS_WARMUP_ITERATIONS = 10  # the short run that measures careless's start-up


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


def write_careless_input(n_obs: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """The data set :func:`run_one` merges (same ``n_obs``, same seed) as an unmerged MTZ for careless, and the
    truth (``F``) beside it; returns both paths."""
    from physppl.models.simulators.merging import simulate_xfel

    out.mkdir(parents=True, exist_ok=True)
    ds, truth = simulate_xfel(n_obs=int(n_obs), seed=seed)
    cols = ["BATCH", "I", "SIGI", *(c for c in XFEL_METADATA if c != "dHKL")]  # careless computes dHKL itself
    unmerged, truth_path = out / "unmerged.mtz", out / "truth.mtz"
    ds[cols].copy().write_mtz(str(unmerged))
    truth[["F", "dHKL"]].write_mtz(str(truth_path))
    return unmerged, truth_path


def _progress_rate(log: Path) -> tuple[int, float]:
    """Iterations done and seconds per iteration from the last tqdm update in a careless log (0, NaN if none)."""
    if not log.exists():
        return 0, float("nan")
    hits = re.findall(r"(\d+)/(\d+) \[([\d:]+)<", log.read_text(errors="replace"))
    for done, _, elapsed in reversed(hits):
        secs = sum(int(x) * 60**i for i, x in enumerate(reversed(elapsed.split(":"))))
        if int(done) > 0 and secs > 0:
            return int(done), secs / int(done)
    return 0, float("nan")


def _timed_limited(cmd: list[str], log: Path, env: dict, timeout: float | None) -> tuple[float, float, object]:
    """Run ``cmd`` under GNU time with a wall-clock limit; wall seconds, peak RSS in GB and the exit code
    (``"timeout"`` when stopped)."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    stats = log.with_suffix(".time")
    stats.unlink(missing_ok=True)
    full = [time_bin, "-f", "%e %M", "-o", str(stats)] + cmd if time_bin else cmd
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)  # its own session: GNU time and careless
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    peak = float("nan")
    if time_bin and stats.exists():
        last = stats.read_text().strip().splitlines()[-1].split()
        if len(last) == 2:
            peak = float(last[1]) * 1024 / 1e9
    return wall, peak, rc


def careless_cc(run_dir: Path, truth_path: Path) -> float:
    """CC of careless's merged F (``merge_0.mtz``) to the simulated true F (as physppl's ``cc_truth``)."""
    import reciprocalspaceship as rs

    from physppl.merging.quality import pearson

    merged, truth = rs.read_mtz(str(run_dir / "merge_0.mtz")), rs.read_mtz(str(truth_path))
    j = merged[["F"]].join(truth[["F"]], rsuffix="_true", how="inner")
    ok = np.isfinite(j["F"].to_numpy(float)) & np.isfinite(j["F_true"].to_numpy(float))
    return pearson(j["F"].to_numpy(float)[ok], j["F_true"].to_numpy(float)[ok])


def run_careless(n_obs: int, exe: str, workdir: Path, iterations: int = 300, threads: int = 1,
                 timeout: float | None = None, seed: int = 0, physppl_row: dict | None = None) -> dict:
    """careless mono on the data set physppl merges at ``n_obs``: a 10-iteration run (start-up) and an
    ``iterations`` run, each in its own process under ``timeout`` seconds; the careless row of the table."""
    out = Path(workdir) / f"n{int(n_obs)}" / "careless"
    unmerged, truth_path = write_careless_input(n_obs, out, seed=seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads),
           "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    metadata = ",".join(["BATCH", *XFEL_METADATA])

    def once(n_iter: int):
        run_dir = out / f"it{n_iter}"
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "mono", f"--iterations={n_iter}", "--studentt-likelihood-dof=4", metadata, str(unmerged),
               str(run_dir / "merge")]  # progress bar kept: it goes to the log, the rate of a stopped run
        log = out / f"careless_it{n_iter}.log"
        wall, peak, rc = _timed_limited(cmd, log, env, timeout)
        return run_dir, log, wall, peak, rc

    row: dict = {"method": "careless", "n_obs": int(n_obs), "careless_iterations": int(iterations)}
    warm = min(CARELESS_WARMUP_ITERATIONS, int(iterations))
    _, log0, wall0, peak0, rc0 = once(warm)
    row.update(startup_run_s=wall0, startup_rc=rc0)
    run_dir, log, wall, peak, rc = once(int(iterations))
    row.update(wall_s=wall, peak_gb=peak, steps=int(iterations), startup_peak_gb=peak0)
    row["bar_s_per_step"] = _progress_rate(log)[1]  # careless's own training loop timing (first step: tracing)
    if rc == 0 and rc0 == 0 and iterations > warm:
        row["s_per_step"] = (wall - wall0) / (iterations - warm)
        row["startup_s"] = wall0 - warm * row["s_per_step"]
        row["cc_to_truth"] = careless_cc(run_dir, truth_path)
    else:
        done, rate = _progress_rate(log)
        row.update(s_per_step=rate, steps=done, error=f"exit {rc} (10-iteration run: {rc0}), see {log}",
                   startup_s=wall0 - warm * rate if rc0 == 0 else float("nan"))
    rate, start = row.get("s_per_step", float("nan")), row.get("startup_s", float("nan"))
    row["proj_wall_s_default"] = start + CARELESS_DEFAULT_ITERATIONS * rate
    if physppl_row and "error" not in physppl_row and physppl_row.get("steps"):
        row["proj_wall_s_physppl_steps"] = start + int(physppl_row["steps"]) * rate
        row["wall_ratio"] = row["proj_wall_s_physppl_steps"] / float(physppl_row["wall_s"])
        row["step_ratio"] = rate / float(physppl_row["s_per_step"])
    return row


def print_table(rows: list[dict]) -> None:
    """Print the Markdown table of the physppl rows, the fitted exponents, and the careless rows if any."""
    mine = [r for r in rows if r.get("method", "physppl") == "physppl"]
    other = [r for r in rows if r.get("method", "physppl") != "physppl"]
    print(markdown(mine))
    for key in ("wall_s", "s_per_step", "peak_gb"):
        print(f"fitted exponent of {key} in n_obs: {fitted_exponent(mine, key):.3f}")
    if other:
        print()
        print(markdown(other, CARELESS_COLUMNS))


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
    p.add_argument("--careless-bin", default=None, help="careless executable (its own venv): merge with it too")
    p.add_argument("--careless-iterations", type=int, default=300, help="careless gradient steps (its rate)")
    p.add_argument("--careless-sizes", nargs="+", type=int, default=None,
                   help="sizes careless also merges (default: --sizes)")
    p.add_argument("--careless-timeout", type=float, default=3600.0, help="seconds per careless run")
    p.add_argument("--physppl-json", type=Path, default=None,
                   help="physppl rows of an earlier --json run: reuse them instead of merging again")
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
    if args.physppl_json is not None:
        rows = [r for r in json.loads(args.physppl_json.read_text()) if r.get("method", "physppl") == "physppl"]
    else:
        rows = merging_table(args.sizes, args.threads, args.workdir, args.json, batch_size=batch_size,
                             max_steps=args.max_steps, half_datasets=not args.no_half, timeout=args.timeout)
    if args.careless_bin:
        by_n = {int(r["n_obs"]): r for r in rows}
        for n in args.careless_sizes or args.sizes:
            rows.append(run_careless(n, args.careless_bin, args.workdir, args.careless_iterations, args.threads,
                                     args.careless_timeout, physppl_row=by_n.get(int(n))))
            if args.json is not None:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"threads={args.threads}, batch_size={batch_size}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
