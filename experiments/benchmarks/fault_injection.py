"""Fault injection: each problem's job is sent SIGTERM at a random moment of its training, resumed, and its
posterior compared with an uninterrupted run of the same configuration.

    python experiments/benchmarks/fault_injection.py [--problems merging md_weights vae_digits beam_sbi] [--seed 0]

For each problem: run A straight through; run B until its first checkpoint exists, then wait a random 0-2 s and
send SIGTERM; B must exit 143 with a checkpoint, and ``inference.resume=true`` in B's directory must finish it.
The table gives where B stopped, its exit status, whether the resume finished, and the largest absolute difference
between A's and B's posterior draws (every variable of ``posterior.nc``; 0 means bit for bit). Small budgets keep
each problem to a minute or two on a laptop CPU.
"""
from __future__ import annotations

import argparse
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import arviz as az
import numpy as np

SVI_QUIET = ["inference.checkpoint_every=50", "inference.progress=false"]
PROBLEMS: dict[str, list[str]] = {
    "merging": ["+experiment=merging", "data.simulate.dmin=3.5", "data.simulate.n_images=80",
                "inference.max_steps=800", "inference.min_steps=800", *SVI_QUIET],
    "md_weights": ["+experiment=md_weights", "inference.max_steps=600", "inference.min_steps=600",
                   "cc_baseline=false", *SVI_QUIET],
    "vae_digits": ["+experiment=vae_digits", "training.epochs=30", "evaluation.gap_points=0",
                   "evaluation.iwae_particles=50", *SVI_QUIET],
    "beam_sbi": ["+experiment=beam_sbi", "data.n_simulations=3000", "data.n_observations=2", "evaluate.sbc=0",
                 "evaluate.reference=false", "n_draws=500", "inference.amortized.max_epochs=15",
                 "inference.amortized.progress=false"],
}
RESUME = {"beam_sbi": "inference.amortized.resume=true"}  # the others: inference.resume=true


def _command(args: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "physppl.cli", *args, f"hydra.run.dir={run_dir}"]


def _posterior(run_dir: Path) -> dict[str, np.ndarray]:
    post = az.from_netcdf(run_dir / "posterior.nc").posterior
    return {k: post[k].values for k in post.data_vars}


def _max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in a)


def inject(name: str, args: list[str], root: Path, rng: random.Random) -> dict:
    straight = subprocess.run(_command(args, root / "a"), capture_output=True, text=True)
    if straight.returncode != 0:
        return {"problem": name, "error": straight.stdout[-500:] + straight.stderr[-500:]}
    run_dir = root / "b"
    proc = subprocess.Popen(_command(args, run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None and not any(run_dir.glob("*checkpoint*.pt")):
        time.sleep(0.05)
    delay = rng.uniform(0.0, 2.0)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate()
    match = re.search(r"SIGTERM at (step|epoch) (\d+)", out)
    row = {"problem": name, "signal after first checkpoint (s)": round(delay, 2), "exit": proc.returncode,
           "interrupted at": f"{match.group(1)} {match.group(2)}" if match else "after training (finished)"}
    if proc.returncode == 143:
        resume = RESUME.get(name, "inference.resume=true")
        resumed = subprocess.run(_command([*args, resume], run_dir), capture_output=True, text=True)
        row["resumed ok"] = resumed.returncode == 0
        if resumed.returncode != 0:
            row["error"] = resumed.stdout[-500:] + resumed.stderr[-500:]
            return row
    else:
        row["resumed ok"] = proc.returncode == 0  # the signal came after training: the run finished normally
    row["max abs difference"] = _max_difference(_posterior(root / "a"), _posterior(run_dir))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random signal times")
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = args.out or Path(tempfile.mkdtemp(prefix="physppl-faults-"))
    rows = []
    for name in args.problems:
        t0 = time.perf_counter()
        row = inject(name, PROBLEMS[name], root / name, rng)
        row["wall s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr, flush=True)
    cols = ["problem", "interrupted at", "exit", "resumed ok", "max abs difference", "wall s"]
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for row in rows:
        print("| " + " | ".join(str(row.get(c, row.get("error", "")[:60])) for c in cols) + " |")
    print(f"\nrun directories: {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
