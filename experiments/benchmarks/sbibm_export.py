"""Export what experiments/benchmarks/sbibm.py needs from sbibm, once, in sbibm's own venv.

sbibm pins an old sbi and downgrades matplotlib, so it is not installed beside physppl:

    python3 -m venv /tmp/sbibm-venv && /tmp/sbibm-venv/bin/pip install torch==2.13.0 sbibm future
    /tmp/sbibm-venv/bin/python experiments/benchmarks/sbibm_export.py --out /tmp/sbibm_refs

For each task, ``<out>/<task>.npz`` (float32) holds ``observations`` (10, x_dim), ``true_parameters`` (10, D),
``reference_samples`` (10, 10000, D) (sbibm's reference posteriors), ``theta_train``/``x_train`` (10^5 pairs from
sbibm's own prior and simulator, ``torch.manual_seed(0)``) and the prior box ``prior_low``/``prior_high``.
(``future`` is an undeclared dependency of ``sbibm.metrics``.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# this folder holds the benchmark sbibm.py, which would shadow the sbibm package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch


def export(name: str, out: Path, n_train: int) -> None:
    import sbibm

    t0 = time.time()
    task = sbibm.get_task(name)
    obs, truth, ref = [], [], []
    for k in range(1, 11):
        obs.append(task.get_observation(num_observation=k).numpy()[0])
        truth.append(task.get_true_parameters(num_observation=k).numpy()[0])
        ref.append(task.get_reference_posterior_samples(num_observation=k).numpy())
    torch.manual_seed(0)
    theta = task.get_prior()(num_samples=n_train)
    x = task.get_simulator()(theta)
    if not (torch.isfinite(theta).all() and torch.isfinite(x).all()):
        raise SystemExit(f"{name}: sbibm's simulator returned non-finite values")
    params = task.get_prior_params()
    arrays = {"observations": np.stack(obs), "true_parameters": np.stack(truth), "reference_samples": np.stack(ref),
              "theta_train": theta.numpy(), "x_train": x.numpy(), "prior_low": params["low"].numpy(),
              "prior_high": params["high"].numpy()}
    np.savez(out / f"{name}.npz", **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    print(f"{name}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()) + f" ({time.time() - t0:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", nargs="+", default=["two_moons", "slcp"])
    ap.add_argument("--n-train", type=int, default=100_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        export(name, args.out, args.n_train)


if __name__ == "__main__":
    main()
