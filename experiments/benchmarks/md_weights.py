"""Frame weighting: physppl's likelihood + Dirichlet guide against the prototype's CC + Adam method, in one run.

Part 1 (accuracy): one simulated data set with known weights (frames of a toy molecule or of 1AHO with altlocs,
states A / B / decoy C, truth 0.5 / 0.5 / 0 spread evenly over the A and B frames): weight L1 error over frames,
state-mass errors, decoy mass, CC of the fitted diffuse map, effective number of frames, wall time.

Part 2 (speed and memory): synthetic frames (random complex F, the shapes are what matters) for a grid of T frames
x N voxels; each method runs in its own process, so its peak resident memory is its own: the anchor (softmax
weights, x' from complex64 F and |F|^2 formed once, -CC, Adam, full batch), physppl's SVI step (8
vectorised particles, full batch), and physppl's SVI step on minibatches of voxels (contiguous blocks of shuffled
voxels, as `inference.batch_order=blocks`: sliced, not copied). Ratios are physppl / anchor.

    python experiments/benchmarks/md_weights.py                    # both parts, toy molecule
    python experiments/benchmarks/md_weights.py --structure ../shared/data/md/1AHO_untangler_TW.pdb --frames 1000
    python experiments/benchmarks/md_weights.py --part speed --grid 10x10000,1000x117789,100x942228
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial

import numpy as np
import torch

BYTES_PER_ELEMENT = {"anchor": 8 * 2, "physppl": 12 * 1.3, "physppl_minibatch": 12 * 1.3}  # rough peak / (T*N)


def anchor_fit(F: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.05):
    """The prototype's method re-implemented in torch: w = softmax(theta), x' from complex F, loss -CC, Adam."""
    theta = torch.zeros(F.shape[0], requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    power = F.abs().square()  # formed once: XLA hoists it out of the prototype's jitted loss, eager torch would not
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        w = torch.softmax(theta, -1)
        x = w @ power - (w.to(F.dtype) @ F).abs().square()
        xm, ym = x - x.mean(), y - y.mean()
        loss = -(xm * ym).sum() / (xm.square().sum() * ym.square().sum()).sqrt()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return torch.softmax(theta.detach(), -1), times


def _synthetic(T: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    F = torch.complex(torch.randn(T, N, generator=g), torch.randn(T, N, generator=g))
    y = torch.rand(N, generator=g) + 0.5
    return F, y


def speed_case(method: str, T: int, N: int, steps: int, batch: int) -> dict:
    """One (method, T, N) timing in this process: median seconds per step and peak RSS."""
    import pyro
    from pyro.infer import Trace_ELBO

    from physppl.guides.md_weights import DirichletFrameGuide
    from physppl.inference.optim import ClippedAdam
    from physppl.models.md_weights import FrameFactors, FrameWeightsModel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    pyro.enable_validation(False)  # as a job runs (JobSettings.validate=False)
    F, y = _synthetic(T, N)
    if method == "anchor":
        _, times = anchor_fit(F, y, steps + 2)
    else:
        re, im = F.real.T.contiguous(), F.imag.T.contiguous()
        del F
        frames = FrameFactors(re, im, torch.arange(N))
        del re, im
        model = FrameWeightsModel(frames, torch.arange(N) % 10)
        guide = DirichletFrameGuide(model)
        # the SVI engine's step (physppl.inference.svi.SVIEngine.run): the ELBO as a module, a torch optimiser
        elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)(model, guide)
        kwargs = {"y": y, "sigma": torch.full_like(y, 0.1)}
        with torch.no_grad():
            elbo(**kwargs, subsample=None if method == "physppl" else torch.arange(batch))
        optimizer = ClippedAdam(lr=0.05)({"model": model, "guide": guide})
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps + 2):
            # a shuffled contiguous block (inference.batch_order=blocks): the frames are sliced, not copied
            start = int(torch.randint(0, N - batch + 1, (), generator=gen))
            idx = None if method == "physppl" else torch.arange(start, start + batch)
            t0 = time.perf_counter()
            optimizer.zero_grad()
            elbo(**kwargs, subsample=idx).backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
    return {"method": method, "T": T, "N": N, "s_per_step": float(np.median(times[2:])), "peak_gb": _peak_gb()}


def _peak_gb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry over the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        return kib / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def speed_table(grid: list[tuple[int, int]], steps: int, batch: int, memory_gb: float) -> list[dict]:
    rows = []
    for T, N in grid:
        for method in ("anchor", "physppl", "physppl_minibatch"):
            need = BYTES_PER_ELEMENT[method] * T * N / 2**30
            if method == "physppl_minibatch" and batch >= N:
                continue
            if need > memory_gb:
                rows.append({"method": method, "T": T, "N": N, "s_per_step": float("nan"), "peak_gb": float("nan"),
                             "note": f"skipped: needs ~{need:.0f} GB in memory"})
                continue
            cmd = [sys.executable, __file__, "--case", method, str(T), str(N), "--steps", str(steps), "--batch", str(batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"method": method, "T": T, "N": N, "s_per_step": float("nan"), "peak_gb": float("nan"),
                             "note": f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def accuracy_table(structure: str | None, n_frames: int, dmin: float, steps: int) -> list[dict]:
    import pyro

    from physppl.inference.fit import fit
    from physppl.md_weights import analysis
    from physppl.md_weights.api import build_model
    from physppl.md_weights.cc_fit import fit_pearson_cc
    from physppl.md_weights.data import MDWeightsDataSource
    from physppl.md_weights.parts import ENGINES, GUIDES, build_guide, initial_values
    from physppl.models.md_weights import FrameWeightsModel, diffuse_intensity

    torch.set_num_threads(1)
    sim = dict(structure=structure, n_frames=n_frames, dwell=max(10.0, n_frames / 20), truth="frames",
               state_masses=[0.5, 0.5, 0.0], dmin=dmin, progress=True)
    src = MDWeightsDataSource(simulate=sim, use_bragg=False)
    t0 = time.perf_counter()
    frames, kind, diffuse, _, truth = src.load()
    data = src.prepare(frames, kind, diffuse, None, truth)
    print(f"data: {data.n_frames} frames, {data.n_voxels} voxels ({time.perf_counter() - t0:.0f} s to simulate)",
          file=sys.stderr)
    y = analysis.observed(data)

    def row(method, w, seconds):
        with torch.no_grad():
            x = diffuse_intensity(torch.as_tensor(w, dtype=torch.float32), data.frames.block()).double().numpy()
        err = analysis.weight_errors(w, data.labels, truth)
        return {"method": method, "weight_l1": err["weight_l1_error"], "state_mass_max_error": err["state_mass_max_error"],
                "decoy_mass": float(w[data.labels == 2].sum()) if (data.labels == 2).any() else 0.0,
                "cc": analysis.pearson(x, y), "n_eff": float(1 / np.square(w).sum()), "wall_s": seconds}

    rows = []
    t0 = time.perf_counter()
    cc = fit_pearson_cc(data.frames, data.y, steps=steps, lr=0.05)
    rows.append(row("anchor: -CC, softmax, Adam", cc.weights, time.perf_counter() - t0))
    pyro.set_rng_seed(0)
    t0 = time.perf_counter()
    # what physppl.weigh_frames does, on the data prepared above: MAP warm start, the Dirichlet guide grouped by
    # state, the job's SVI settings (pyro validation off, as in a job)
    with pyro.validation_enabled(False):
        model = build_model(partial(FrameWeightsModel), data)
        kwargs = data.model_kwargs()
        guide = build_guide(GUIDES["dirichlet"].build(), model, data.labels, initial_values(model, kwargs))
        engine = ENGINES["svi"].build(max_steps=steps, min_steps=300, progress=False, checkpoint_every=0)
        result = fit(model, guide, kwargs, engine, n_draws=200)
    rows.append(row("physppl: likelihood, Dirichlet guide (posterior mean)", result.flat("w").double().numpy().mean(0),
                    time.perf_counter() - t0))
    return rows


def _markdown(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def _with_ratios(rows: list[dict]) -> list[dict]:
    anchor = {(r["T"], r["N"]): r for r in rows if r["method"] == "anchor"}
    for r in rows:
        a = anchor.get((r["T"], r["N"]))
        if a is not None and r["method"] != "anchor":
            r["time_ratio"] = r["s_per_step"] / a["s_per_step"]
            r["memory_ratio"] = r["peak_gb"] / a["peak_gb"]
        r["ms_per_step"] = 1000 * r["s_per_step"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["accuracy", "speed", "both"], default="both")
    ap.add_argument("--structure", help="PDB with altlocs A/B (default: the toy molecule)")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--dmin", type=float, default=2.5)
    ap.add_argument("--fit-steps", type=int, default=2000)
    ap.add_argument("--grid", default="10x10000,100x10000,1000x10000,5000x10000,100x100000,1000x100000,"
                                      "1000x117789,5000x100000,100x942228,100x1000000,5000x1000000")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per speed case")
    ap.add_argument("--batch", type=int, default=8192, help="voxels per minibatch")
    ap.add_argument("--memory-gb", type=float, default=16.0, help="skip cases expected to need more")
    ap.add_argument("--case", nargs=3, metavar=("METHOD", "T", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(speed_case(args.case[0], int(args.case[1]), int(args.case[2]), args.steps, args.batch)))
        return 0
    print(f"# threads per method: {os.environ.get('BENCH_THREADS', '1')}; torch {torch.__version__}")
    if args.part in ("accuracy", "both"):
        rows = accuracy_table(args.structure, args.frames, args.dmin, args.fit_steps)
        print(f"\n## Accuracy: {args.frames} frames ({'toy molecule' if not args.structure else args.structure}), "
              "truth 0.5 / 0.5 / 0 (A / B / decoy C) spread evenly over the A and B frames\n")
        print(_markdown(rows, ["method", "weight_l1", "state_mass_max_error", "decoy_mass", "cc", "n_eff", "wall_s"]))
    if args.part in ("speed", "both"):
        grid = [tuple(int(float(v)) for v in item.split("x")) for item in args.grid.split(",")]
        rows = _with_ratios(speed_table(grid, args.steps, args.batch, args.memory_gb))
        print(f"\n## Speed and memory per step (minibatch: {args.batch} voxels; ratios physppl / anchor)\n")
        print(_markdown(rows, ["method", "T", "N", "ms_per_step", "peak_gb", "time_ratio", "memory_ratio", "note"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
