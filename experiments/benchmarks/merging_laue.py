"""Time-resolved Laue benchmark on PYP: dark and 2 ms merged, the 2 ms - dark difference map, the chromophore.

Each method merges ``off.mtz`` and ``2ms.mtz`` (photoactive yellow protein, BioCARS, 20 + 20 Laue images), then
the same difference-map code (``physppl.difference_map``: dark-model phases from ``off.pdb``, reflections to 1.6 A)
reports the strongest map value within 2 A of the chromophore (residue HC4) in map sd, its rank among all peaks,
the strongest peak elsewhere, CC of dF with the models' dFc and CC1/2 per data set. Methods:

* ``weighted_mean``: physppl's conventional merge (scaled inverse-variance weighted mean, French-Wilson), per file;
* ``physppl``: one Laue model for both files (shared scale, learned wavelength curve, harmonics), Wilson prior;
* ``physppl_dw``: the same with the double-Wilson prior between dark and 2 ms (r = 0.99, careless's usage);
* ``careless``: ``careless poly`` as in its PYP example (``--separate-files --disable-image-scales``, metadata X, Y,
  Wavelength, dHKL, Hobs, Kobs, Lobs), run in its own environment (``--careless-bin``), or an earlier run of it
  reused with ``--careless-output DIR`` (its ``pyp_0.mtz``, ``pyp_1.mtz`` and the wall time in ``DIR/careless.time``).

Every merge runs as its own process (wall time and peak memory its own) with the same threads::

    python experiments/benchmarks/merging_laue.py --careless-bin /path/to/careless-venv/bin/careless
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from merging import _timed  # the merging benchmark's runner (this folder is on the path of a script run here)

REPO = Path(__file__).resolve().parents[2]
LAUE_METADATA = "X,Y,Wavelength,dHKL,Hobs,Kobs,Lobs"  # careless's PYP example


def _difference(run_or_files, data: Path, out: Path, name: str, env: dict, weighting: str, columns=None) -> dict:
    merged = f"merged={run_or_files}" if isinstance(run_or_files, Path) else \
        "merged=[" + ",".join(str(p) for p in run_or_files) + "]"
    run_dir = out / f"{name}_dmap_{weighting}"
    cmd = [sys.executable, "-m", "physppl.cli", "+experiment=difference_map", merged, f"phases={data / 'off.pdb'}",
           f"compare_model={data / '2ms.pdb'}", "site=HC4", "dmin=1.6", f"weighting={weighting}",
           f"hydra.run.dir={run_dir}"]
    if columns:
        cmd.append("columns=[" + ",".join(columns) + "]")
    if isinstance(run_or_files, Path):
        cmd.append("names=[off,2ms]")
    _, _, rc = _timed(cmd, out / f"{name}_dmap_{weighting}.log", env)
    if rc != 0:
        return {"error": f"difference map exit {rc}, see {out / (name + '_dmap_' + weighting + '.log')}"}
    m = json.loads((run_dir / "metrics.json").read_text())
    return {f"{weighting}_site_sd": m["site_peak_sigma"], f"{weighting}_rank": m["site_rank"],
            f"{weighting}_elsewhere_sd": m["max_elsewhere_sigma"],
            f"{weighting}_elsewhere_general_sd": m["max_elsewhere_general_sigma"],
            f"{weighting}_cc_dFc": m["cc_wdF_dFc"], "n_refl": m["n_reflections"], "cc_Foff_Fc": m["cc_F_off_Fc"]}


def _physppl(name: str, data: Path, out: Path, env: dict, overrides: list[str]) -> tuple[dict, Path | None]:
    run_dir = out / name
    cmd = [sys.executable, "-m", "physppl.cli", "+experiment=merging_laue",
           f"data.paths=[{data / 'off.mtz'},{data / '2ms.mtz'}]", f"hydra.run.dir={run_dir}", *overrides]
    wall, peak, rc = _timed(cmd, out / f"{name}.log", env)
    if rc != 0:
        return {"method": name, "error": f"exit {rc}, see {out / (name + '.log')}"}, None
    m = json.loads((run_dir / "metrics.json").read_text())
    row = {"method": name, "wall_s": wall, "peak_mb": peak, "steps": m.get("steps"),
           "cc_half_off": m.get("cc_half_off"), "cc_half_2ms": m.get("cc_half_2ms")}
    return row, run_dir


def _careless(data: Path, out: Path, env: dict, exe: str | None, iterations: int, reuse: Path | None,
              wait_min: float = 0.0):
    if reuse is not None:
        files = [reuse / "pyp_0.mtz", reuse / "pyp_1.mtz"]
        deadline = time.time() + 60 * wait_min  # a careless run still going (started beside this one)
        while time.time() < deadline and not (all(p.exists() for p in files) and (reuse / "careless.time").exists()):
            time.sleep(20)
        if not all(p.exists() for p in files):
            return {"method": "careless", "error": f"{reuse} has no pyp_0.mtz / pyp_1.mtz"}, None
        timing = reuse / "careless.time"
        wall = float(timing.read_text().split()[0]) if timing.exists() else float("nan")
        peak = float(timing.read_text().split()[1]) / 1024 if timing.exists() else float("nan")
        return {"method": "careless", "wall_s": wall, "peak_mb": peak, "steps": iterations,
                "note": f"reused run in {reuse}"}, files
    if exe is None:
        return {"method": "careless", "error": "not run (no --careless-bin)"}, None
    run = out / "careless"
    run.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "poly", "--separate-files", "--disable-image-scales", f"--iterations={iterations}",
           "--wavelength-key=Wavelength", LAUE_METADATA, str(data / "off.mtz"), str(data / "2ms.mtz"),
           str(run / "pyp")]
    wall, peak, rc = _timed(cmd, out / "careless.log", env)
    if rc != 0:
        return {"method": "careless", "error": f"exit {rc}, see {out / 'careless.log'}"}, None
    return {"method": "careless", "wall_s": wall, "peak_mb": peak, "steps": iterations}, \
        [run / "pyp_0.mtz", run / "pyp_1.mtz"]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "xtal" / "pyp")
    p.add_argument("--out", type=Path, default=Path("bench_merging_laue"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="physppl's SVI step budget (default: the experiment's)")
    p.add_argument("--careless-bin", default=shutil.which("careless"))
    p.add_argument("--careless-iterations", type=int, default=30_000)
    p.add_argument("--careless-output", type=Path, default=None,
                   help="reuse a finished careless poly run (a folder with pyp_0.mtz, pyp_1.mtz, careless.time)")
    p.add_argument("--wait-careless", type=float, default=0.0, metavar="MIN",
                   help="with --careless-output: wait up to MIN minutes for that run to finish")
    p.add_argument("--methods", default="weighted_mean,physppl,physppl_dw,careless")
    args = p.parse_args(argv)
    data = args.data_dir
    if not (data / "off.mtz").exists():
        sys.exit(f"PYP data not found in {data} (--data-dir)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    common = [f"threads={args.threads}", "inference.progress=false"]
    if args.steps is not None:
        common += [f"inference.max_steps={args.steps}", f"inference.min_steps={min(args.steps, 300)}"]
    methods = args.methods.split(",")
    rows = []
    for name in methods:
        if name == "weighted_mean":
            row, target = _physppl(name, data, out, env, [f"threads={args.threads}", "inference=weighted_mean"])
        elif name == "physppl":
            row, target = _physppl(name, data, out, env, common)
        elif name == "physppl_dw":
            row, target = _physppl(name, data, out, env, common + ["model/prior=double_wilson",
                                                                   "model.prior.r=[0.0,0.99]"])
        elif name == "careless":
            row, target = _careless(data, out, env, args.careless_bin, args.careless_iterations, args.careless_output,
                                    args.wait_careless)
        else:
            raise SystemExit(f"unknown method {name}")
        if target is not None:
            columns = ["F", "SigF"] if name == "careless" else None
            for w in ("none", "q"):
                row.update(_difference(target, data, out, name, env, w, columns))
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    if "careless" in set(table["method"]) and "wall_s" in table:
        ref = table.loc[table["method"] == "careless", "wall_s"].iloc[0]
        table["time_vs_careless"] = table["wall_s"] / ref
    pd.set_option("display.width", 250)
    print("\nPYP 2 ms - dark, dark-model phases, to 1.6 A; 'none' = unweighted dF, 'q' = q-weighted; site = HC4")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    table.to_csv(out / "merging_laue.csv", index=False)
    return table


if __name__ == "__main__":
    main()
