"""Benchmark: frame weighting and merging at scale, each case in its own process (its peak memory is its own).

MD frame weights (``--md``), for each T frames x N voxels: a synthetic trajectory (states + collective modes +
independent noise, :mod:`physppl.models.simulators.md_trajectory`) written once as a frame store, then

* ``disk``: the disk's own sequential read rate on that file (page cache dropped first), before and after the exact
  job (their mean is the figure): the exact path's limit;
* ``exact``: ``physppl.weigh_frames(store.h5, diffuse.mtz)`` streaming minibatches of voxels from disk with
  read-ahead (page cache dropped first; a store smaller than memory is cached after its first epoch);
* ``low_rank``: the same job with ``low_rank=K``: one pass compresses the frames, then SVI on N x K;
* ``prototype``: the original in-memory CC + Adam (``experiments/benchmarks/md_weights.py``'s anchor) where the
  frames fit in memory.

Reported: seconds per SVI step, wall time of the whole job (to a converged posterior with all outputs), peak RSS,
read rate (bytes read / the SVI's wall time, beside the disk's rate), and the worst state-mass error against the
generator's truth. Merging (``--merging``): the built-in simulator at XFEL-like shapes (many images, few
reflections each), minibatch SVI, for 10^5-10^7 observations: wall time, peak RSS, seconds per step, CC to the
simulated truth, and the fitted exponent of cost against size.

    python experiments/benchmarks/scale.py --md --sizes 1000x100000 5000x100000 1000x1000000 5000x1000000
    python experiments/benchmarks/scale.py --md --sizes 1000x100000 --workdir /scratch/physppl-scale --keep
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STATE_MASSES = (0.2, 0.5, 0.3)
PROTOTYPE_BUDGET_S = 600  # the prototype runs to its step count only within this


def _peak_gb() -> float:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 2**20


def _drop_cache(path: Path) -> None:
    """Evict ``path`` from the page cache (its pages are clean), so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_rate(path: Path, max_bytes: int = 8 << 30, block: int = 64 << 20) -> float:
    """Sequential read rate of ``path`` in GB/s, uncached, over at most ``max_bytes``."""
    _drop_cache(path)
    buf = bytearray(block)
    view = memoryview(buf)
    n, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while n < max_bytes:
            got = fh.readinto(view)
            if not got:
                break
            n += got
    return n / (time.perf_counter() - t0) / 1e9


def make_store(T: int, N: int, folder: Path) -> tuple[dict, float]:
    from physppl.md_weights.make_frames import write_trajectory_store

    if (folder / "frames.h5").is_file() and (folder / "diffuse.mtz").is_file():
        return {"frames": str(folder / "frames.h5"), "observed": str(folder / "diffuse.mtz")}, 0.0
    t0 = time.perf_counter()
    paths = write_trajectory_store(folder, n_frames=T, n_voxels=N, state_masses=STATE_MASSES, seed=0)
    return paths, time.perf_counter() - t0


def _mass_error(masses: dict) -> float:
    return max(abs(masses[f"state{k}"] - m) for k, m in enumerate(STATE_MASSES))


def case_job(folder: Path, low_rank: int | None, threads: int, batch: int, device: str = "cpu") -> dict:
    """The frame-weighting job on a store, in this process."""
    import logging

    from physppl.md_weights.api import weigh_frames
    from physppl.md_weights.parts import ENGINES

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    _drop_cache(folder / "frames.h5")
    # minibatches on both paths: N x K per step on the low-rank path is still N (10^6) times 3 K per particle
    engine = ENGINES["svi"].build(progress=False, batch_size=batch)
    t0 = time.perf_counter()
    result = weigh_frames(str(folder / "frames.h5"), str(folder / "diffuse.mtz"), labels=str(folder / "states.csv"),
                          low_rank=low_rank, engine=engine, threads=threads, check_store=False, cc_baseline=False,
                          log_likelihood=False, device=device)
    out = folder / ("run_low_rank" if low_rank else "run_exact")
    result.save(out)
    wall = time.perf_counter() - t0
    m = result.metrics
    frames = result.data.frames
    stats = getattr(frames, "stats", None) or getattr(getattr(frames, "source", None), "stats", None)
    row = {"wall_s": wall, "svi_s": m["train_time"], "steps": m["steps"], "s_per_step": m["train_time"] / m["steps"],
           "converged": m["converged"], "peak_gb": _peak_gb(), "mass_error": _mass_error(m["state_mass_mean"]),
           "read_gb": stats.bytes / 1e9 if stats else None}
    if low_rank is None:  # what the SVI itself read: every step one minibatch of rows
        row["svi_read_gb"] = m["steps"] * batch * frames.n_frames * 8 / 1e9
        row["read_wait_frac"] = m.get("stream_read_wait_s", 0.0) / m["train_time"]
    else:
        row.update({k: m[k] for k in ("low_rank_build_s", "low_rank_x_error_mean_rel", "low_rank_x_error_bound_mean_rel",
                                      "low_rank_memory_gb") if k in m})
    return row


def case_prototype(folder: Path, threads: int, steps: int) -> dict:
    """The prototype's in-memory CC + Adam on the same frames and data."""
    import torch

    from physppl.io.frame_store import open_frame_store
    from physppl.io.frames import read_observed
    from physppl.md_weights.data import MDWeightsDataSource

    sys.path.insert(0, str(HERE))
    from md_weights import anchor_fit  # noqa: E402 (the md_weights benchmark's anchor, one copy)

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    store = open_frame_store(folder / "frames.h5")
    re, im = store.read(0, store.n_rows)
    F = torch.complex(torch.from_numpy(re), torch.from_numpy(im)).T.contiguous()  # (T, N) as the prototype holds it
    del re, im
    source = MDWeightsDataSource(frames=str(folder / "frames.h5"), observed=str(folder / "diffuse.mtz"), check_store=False)
    obs = read_observed(folder / "diffuse.mtz")
    data = source._prepare_store(store, obs, None, torch.float32)
    # its step rate from a short run, then the full run only if it fits the time budget
    _, probe = anchor_fit(F, data.y, 5)
    rate = float(np.median(probe))
    labels = np.asarray(store.state)
    row = {"s_per_step": rate, "peak_gb": None, "converged": None}
    if rate * steps <= PROTOTYPE_BUDGET_S:
        w, times = anchor_fit(F, data.y, steps)
        masses = {f"state{k}": float(w[torch.as_tensor(labels == k)].sum()) for k in range(len(STATE_MASSES))}
        row.update(steps=steps, s_per_step=float(np.median(times)), mass_error=_mass_error(masses))
    else:
        row["note"] = f"{steps} steps would take {rate * steps:.0f} s: step rate from 5 steps"
    row.update(wall_s=time.perf_counter() - t0, peak_gb=_peak_gb())
    return row


def _child(args: list[str], log: Path) -> dict:
    cmd = [sys.executable, __file__, "--case", *args]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [str(proc.returncode)]
        return {"note": f"failed: {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def md_table(sizes: list[tuple[int, int]], workdir: Path, threads: int, batch: int, rank: int, keep: bool,
             memory_gb: float, proto_steps: int, json_path: Path | None, device: str = "cpu") -> list[dict]:
    rows = []

    def add(row):
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if json_path:
            json_path.write_text(json.dumps(rows, indent=1))

    for T, N in sizes:
        folder = workdir / f"md_{T}x{N}"
        paths, t_make = make_store(T, N, folder)
        size_gb = Path(paths["frames"]).stat().st_size / 1e9
        before = disk_rate(Path(paths["frames"]))
        base = {"T": T, "N": N, "store_gb": size_gb}
        exact = _child(["job", str(folder), "none", str(threads), str(batch), device], folder / "exact.log")
        # the virtual disk's rate drifts (0.2-1.4 GB/s seen minutes apart): measured before and after the exact job,
        # whose read rate is compared with their mean
        after = disk_rate(Path(paths["frames"]))
        rate = (before + after) / 2
        add({**base, "method": "disk", "read_gb_per_s": rate,
             "note": f"before {before:.2f}, after {after:.2f} GB/s" + (f"; store written in {t_make:.0f} s" if t_make else "")})
        if "svi_s" in exact:
            exact["read_gb_per_s"] = exact["svi_read_gb"] / exact["svi_s"]
            exact["read_vs_disk"] = exact["read_gb_per_s"] / rate
        add({**base, "method": "exact (streamed)", **exact})
        low = _child(["job", str(folder), str(rank), str(threads), str(batch), device], folder / "low_rank.log")
        add({**base, "method": f"low rank K={rank}", **low})
        need = T * N * 8 * 3 / 1e9  # complex64 F, |F|^2 and the autograd temporaries
        if need < memory_gb:
            add({**base, "method": "prototype CC + Adam (in memory)",
                 **_child(["prototype", str(folder), str(threads), str(proto_steps)], folder / "prototype.log")})
        else:
            add({**base, "method": "prototype CC + Adam (in memory)", "note": f"skipped: needs ~{need:.0f} GB in memory"})
        if not keep:
            Path(paths["frames"]).unlink()
    return rows


def print_md(rows: list[dict]) -> None:
    cols = ["T", "N", "method", "store_gb", "s_per_step", "steps", "wall_s", "peak_gb", "read_gb_per_s",
            "read_vs_disk", "mass_error", "low_rank_x_error_mean_rel", "low_rank_build_s", "note"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else
                         (f"{v:.3g}" if isinstance(v, float) else str(v if v is not None else "")))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--md", action="store_true", help="frame weighting at scale")
    ap.add_argument("--sizes", nargs="+", default=["1000x100000", "5000x100000", "1000x1000000", "5000x1000000"],
                    help="T x N cases for --md")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/physppl/scale"),
                    help="where stores are written (the largest takes 40 GB)")
    ap.add_argument("--keep", action="store_true", help="keep each store after its cases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096, help="voxels per minibatch on the exact path")
    ap.add_argument("--rank", type=int, default=64, help="rank of the low-rank path")
    ap.add_argument("--memory-gb", type=float, default=16.0, help="largest in-memory prototype case to run")
    ap.add_argument("--prototype-steps", type=int, default=2000)
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for the physppl jobs")
    ap.add_argument("--merging", action="store_true", help="merging at scale (experiments/benchmarks/scale_merging.py)")
    ap.add_argument("--merging-sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    # minibatch merges pass the convergence test at ~2,000-2,300 steps, just past the engine's default budget
    ap.add_argument("--merging-max-steps", type=int, default=10_000, help="SVI step budget of each merge")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.case:
        kind, *rest = args.case
        if kind == "job":
            folder, rank, threads, batch, *device = rest
            row = case_job(Path(folder), None if rank == "none" else int(rank), int(threads), int(batch),
                           *device)
        else:
            folder, threads, steps = rest
            row = case_prototype(Path(folder), int(threads), int(steps))
        print(json.dumps(row))
        return 0
    if not (args.md or args.merging):
        ap.error("choose --md and/or --merging")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else None
    if args.md:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
        rows = md_table(sizes, workdir, args.threads, args.batch, args.rank, args.keep, args.memory_gb,
                        args.prototype_steps, json_path, args.device)
        print(f"\nMD frame weights at scale ({args.threads} threads; minibatches of {args.batch} voxels on the exact "
              f"path; state masses {STATE_MASSES})\n")
        print_md(rows)
    if args.merging:
        sys.path.insert(0, str(HERE))
        import scale_merging  # noqa: E402 (this folder's merging half of the benchmark)

        merged = scale_merging.merging_table(args.merging_sizes, args.threads, workdir / "merging",
                                             json_path.with_name(json_path.stem + "_merging.json") if json_path else None,
                                             max_steps=args.merging_max_steps)
        print("\nMerging at scale\n")
        scale_merging.print_table(merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
