"""Merging benchmark on real data: physppl (variational), the weighted-mean baseline and, if installed, careless.

Each method runs as its own process (so peak memory is its own), on the same CPU threads, and the table gives
wall time, peak memory, CC to the reference merge, CCanom to the reference, CC1/2 and CCanom between
half-datasets, with time ratios to the weighted mean (and to careless when it ran).

    python experiments/benchmarks/merging.py                      # HEWL 5% subset and gamma
    python experiments/benchmarks/merging.py --datasets hewl --careless-iterations 10000

Data: ``../shared/data/xtal`` beside the repository (``--data-dir`` to change). Which comparison means what:
on HEWL the 5% subset is compared with the AIMLESS merge of the full data (20x more observations), an
independent better estimate; on gamma the reference merges the same observations (agreement, not superiority).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
DATASETS = {
    "hewl": ("hewl_ssad_unmerged_5pct.mtz", "hewl_ssad_24idc_aimless_merged.mtz"),
    "gamma": ("gamma_xe_aimless_unmerged.mtz", "gamma_xe_aimless_merged.mtz"),
}


def _timed(cmd: list[str], log: Path, env: dict) -> tuple[float, float, int]:
    """Run ``cmd``; return wall seconds, peak RSS in MB (GNU time when present) and the exit code."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    stats = log.with_suffix(".time")
    full = [time_bin, "-f", "%e %M", "-o", str(stats)] + cmd if time_bin else cmd
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    peak = float("nan")
    if time_bin and stats.exists():
        last = stats.read_text().strip().splitlines()[-1].split()
        peak = float(last[1]) / 1024
    return wall, peak, rc


def _physppl(name: str, overrides: list[str], unmerged: Path, ref: Path, out: Path, env: dict) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "physppl.cli", f"data.path={unmerged}", f"data.reference={ref}",
           f"hydra.run.dir={run_dir}", *overrides]
    wall, peak, rc = _timed(cmd, out / f"{name}.log", env)
    if rc != 0:
        return {"method": name, "error": f"exit {rc}, see {out / (name + '.log')}"}
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"method": name, "wall_s": wall, "peak_mb": peak, "cc_ref": m.get("cc_ref"),
            "cc_anom_ref": m.get("cc_anom_ref"), "cc_half": m.get("cc_half"), "cc_anom_half": m.get("cc_anom_half"),
            "steps": m.get("steps")}


def _careless_intensities(merged):
    """I(+), I(-) and their mean from careless's anomalous amplitudes: E[F^2] = F^2 + SigF^2 (as careless's own I)."""
    import reciprocalspaceship as rs

    ip = merged["F(+)"].to_numpy(float) ** 2 + merged["SigF(+)"].to_numpy(float) ** 2
    im = merged["F(-)"].to_numpy(float) ** 2 + merged["SigF(-)"].to_numpy(float) ** 2
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(np.stack([ip, im]), axis=0)
    return rs.DataSet({"I(+)": ip, "I(-)": im, "I": mean}, index=merged.index, spacegroup=merged.spacegroup,
                      cell=merged.cell, merged=True)


def _careless(unmerged: Path, ref: Path, out: Path, env: dict, iterations: int, exe: str = "careless") -> dict:
    """careless mono with settings comparable to physppl's default: anomalous, Student-t, same metadata."""
    import reciprocalspaceship as rs

    from physppl.merging.quality import pearson
    from physppl.io.mtz import read_merged_mtz

    run_dir = out / "careless"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "mono", "--anomalous", "--merge-half-datasets", f"--iterations={iterations}",
           "--studentt-likelihood-dof=4", "--disable-progress-bar", "BATCH,dHKL,XDET,YDET", str(unmerged),
           str(run_dir / "merge")]
    wall, peak, rc = _timed(cmd, out / "careless.log", env)
    if rc != 0:
        return {"method": "careless", "error": f"exit {rc}, see {out / 'careless.log'}"}
    merged = rs.read_mtz(str(run_dir / "merge_0.mtz"))
    row = {"method": "careless", "wall_s": wall, "peak_mb": peak, "steps": iterations}
    mine = _careless_intensities(merged)
    reference = read_merged_mtz(ref, anomalous=True)
    j = mine.join(reference[["I", "I(+)", "I(-)"]], rsuffix="_ref", how="inner")
    row["cc_ref"] = pearson(j["I"].to_numpy(float), j["I_ref"].to_numpy(float))
    row["cc_anom_ref"] = pearson((j["I(+)"] - j["I(-)"]).to_numpy(float), (j["I(+)_ref"] - j["I(-)_ref"]).to_numpy(float))
    xval = run_dir / "merge_xval_0.mtz"
    if xval.exists():
        x = rs.read_mtz(str(xval))
        x = x[x["repeat"] == 0]
        halves = [_careless_intensities(x[x["half"] == h].drop(columns=["repeat", "half"])) for h in (0, 1)]
        both = halves[0].join(halves[1], rsuffix="_2", how="inner")
        row["cc_half"] = pearson(both["I"].to_numpy(float), both["I_2"].to_numpy(float))
        row["cc_anom_half"] = pearson((both["I(+)"] - both["I(-)"]).to_numpy(float),
                                      (both["I(+)_2"] - both["I(-)_2"]).to_numpy(float))
    return row


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "xtal")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "merging")
    p.add_argument("--threads", type=int, default=1, help="torch / TF intra-op threads for every method")
    p.add_argument("--careless-iterations", type=int, default=10_000)
    p.add_argument("--no-careless", action="store_true", help="skip careless even when installed")
    p.add_argument("--careless-bin", default=shutil.which("careless"),
                   help="careless executable (e.g. from its own virtual environment; default: on PATH)")
    p.add_argument("--physppl-overrides", nargs="*", default=[], help="extra Hydra overrides for physppl")
    args = p.parse_args(argv)
    if not args.data_dir.is_dir():
        sys.exit(f"benchmark data not found at {args.data_dir}: pass --data-dir")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TF_NUM_INTRAOP_THREADS": str(args.threads),
           "HYDRA_FULL_ERROR": "1"}
    rows = []
    for ds in args.datasets:
        unmerged, ref = (args.data_dir / f for f in DATASETS[ds])
        out = args.out / ds
        out.mkdir(parents=True, exist_ok=True)
        common = [f"threads={args.threads}"]
        results = [
            _physppl("physppl", ["+experiment=merging_anomalous", "inference.progress=false", *common,
                                 *args.physppl_overrides], unmerged, ref, out, env),
            _physppl("weighted_mean", ["+experiment=merging_baseline", "data.anomalous=true", *common], unmerged, ref, out, env),
        ]
        if args.careless_bin and not args.no_careless:
            results.append(_careless(unmerged, ref, out, env, args.careless_iterations, args.careless_bin))
        for r in results:
            rows.append({"data": ds, **r})
    table = pd.DataFrame(rows)
    for anchor in ("weighted_mean", "careless"):
        if anchor in set(table["method"]):
            base = table[table["method"] == anchor].set_index("data")["wall_s"]
            table[f"time_vs_{anchor}"] = table["wall_s"] / table["data"].map(base)
    pd.set_option("display.width", 200)
    print(f"threads={args.threads}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "merging_benchmark.csv", index=False)
    return table


if __name__ == "__main__":
    main()
