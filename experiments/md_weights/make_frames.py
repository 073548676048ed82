"""``physppl-make-frames``: write MD-like frames and observed intensities with a known truth, as user files.

Frames of a structure in conformational states (a built-in toy molecule, or a PDB whose atoms have alternate
conformers A/B, e.g. 1AHO) with rigid-body and thermal jitter; structure factors by gemmi; observed diffuse and
Bragg intensities of a known weighting plus noise. Output folder: ``frames.npz`` (or ``frames.npy`` +
``frames_hkl.npy``, ``frames.h5``, or ``frames/`` with one MTZ per frame), ``diffuse.mtz``, ``bragg.mtz``,
``states.csv`` (state of each frame) and ``truth.json``. With ``--store``: a synthetic trajectory of any size
(:mod:`physppl.models.simulators.md_trajectory`) written as a frame store ``frames.h5`` for streaming. With
``--convert FRAMES --observed MTZ OUT.h5``: user frames stacked once into a frame store.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from physppl.io.frames import write_frames, write_intensity_mtz
from physppl.inference.outputs import atomic_write, write_json

from .data import simulate_example

__all__ = ["main", "write_example", "write_trajectory_store", "convert_to_store"]


def _write_h5(path: pathlib.Path, frames) -> None:
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("F", data=frames.F, chunks=(frames.F.shape[0], min(4096, frames.F.shape[1])))
            fh.create_dataset("hkl", data=frames.hkl)
            fh.create_dataset("state", data=frames.state)
            fh.attrs["cell"] = np.asarray(frames.cell)
            fh.attrs["spacegroup"] = frames.spacegroup

    atomic_write(path, write)


def _write_mtz_folder(folder: pathlib.Path, frames) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(frames.F.shape[0] - 1))
    for t, f in enumerate(frames.F):
        write_intensity_mtz(folder / f"frame_{t:0{width}d}.mtz", frames.hkl,
                            {"FC": (np.abs(f), "SFAmplitude"), "PHIC": (np.rad2deg(np.angle(f)), "Phase")},
                            frames.cell, "P 1")


def write_example(out: str | pathlib.Path, fmt: str = "npz", **settings) -> dict:
    """Simulate (``settings`` as :func:`~physppl.md_weights.data.simulate_example`) and write files;
    returns their paths under the data config's names (frames, observed, bragg)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames, diffuse, bragg, truth = simulate_example(**settings)
    paths = {}
    if fmt in ("npz", "npy"):
        paths["frames"] = write_frames(out / f"frames.{fmt}", frames)
    elif fmt == "h5":
        paths["frames"] = out / "frames.h5"
        _write_h5(paths["frames"], frames)
    elif fmt == "mtz":
        paths["frames"] = out / "frames"
        _write_mtz_folder(paths["frames"], frames)
    else:
        raise ValueError(f"format must be npz, npy, h5 or mtz, got {fmt!r}")
    for key, name, table in (("observed", "diffuse", diffuse), ("bragg", "bragg", bragg)):
        paths[key] = write_intensity_mtz(out / f"{name}.mtz", table.hkl, {
            "I": (table.intensity, "Intensity"), "SIGI": (table.sigma, "Stddev")}, table.cell, table.spacegroup)
    names = truth["state_names"]
    states = "state\n" + "\n".join(names[k] for k in frames.state) + "\n"
    atomic_write(out / "states.csv", lambda p: p.write_text(states))
    write_json(out / "truth.json", {k: v for k, v in truth.items()})
    return {k: str(v) for k, v in paths.items()}


def write_trajectory_store(out: str | pathlib.Path, block_voxels: int = 4096, progress: bool = False,
                           **settings) -> dict:
    """A synthetic trajectory at scale (``settings`` as
    :class:`~physppl.models.simulators.md_trajectory.SyntheticTrajectory`) written as a frame store
    ``frames.h5`` beside ``diffuse.mtz``, ``states.csv`` and ``truth.json``, in bounded memory (one block of
    ``block_voxels`` voxels at a time). Returns the paths under the data config's names."""
    import logging

    from physppl.io.frame_store import FrameStoreWriter
    from physppl.models.simulators.md_trajectory import SyntheticTrajectory

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sim = SyntheticTrajectory(**settings)
    N = sim.n_voxels
    y, sigma = np.empty(N), np.empty(N)
    cell = (sim.cell_edge, sim.cell_edge, sim.cell_edge, 90.0, 90.0, 90.0)
    with FrameStoreWriter(out / "frames.h5", sim.n_frames, sim.hkl, np.ones(N, dtype=np.int64), cell=cell,
                          spacegroup="P 1", state=sim.labels) as writer:
        for b in sim.blocks(block_voxels):
            writer.append(b.re, b.im)
            y[b.start:b.stop], sigma[b.start:b.stop] = b.y, b.sigma
            if progress and (b.stop // block_voxels) % 25 == 0:
                logging.getLogger(__name__).info("frame store: %d / %d voxels", b.stop, N)
    paths = {"frames": str(out / "frames.h5")}
    paths["observed"] = str(write_intensity_mtz(out / "diffuse.mtz", sim.hkl, {"I": (y, "Intensity"),
                                                "SIGI": (sigma, "Stddev")}, cell, "P 1"))
    states = "state\n" + "\n".join(sim.state_names[k] for k in sim.labels) + "\n"
    atomic_write(out / "states.csv", lambda p: p.write_text(states))
    write_json(out / "truth.json", {"state_masses": sim.state_masses.tolist(), "state_names": sim.state_names,
                                    "scale": sim.scale, "offset": sim.offset, "n_frames": sim.n_frames,
                                    "n_voxels": N})
    return paths


def convert_to_store(frames: str | pathlib.Path, observed: str | pathlib.Path, out: str | pathlib.Path,
                     block_bytes: int = 256 << 20, **options) -> pathlib.Path:
    """Stack frames (a folder of per-frame MTZ, .npz, .npy or .h5 of shape (frames, reflections)) once into a frame
    store ``out`` for streaming: their reflections mapped onto ``observed``'s asymmetric unit, grouped by observed
    voxel in the fit's (shuffled) order. ``options`` as :class:`~physppl.md_weights.data.MDWeightsDataSource`
    (``hkl``, ``frames_kind``, ``columns``, ``dmin``, ``min_overlap``). Reads a block of columns at a time (memory
    maps and HDF5 are not loaded whole; a folder of MTZ is)."""
    from physppl.io.frame_store import FrameStoreWriter

    from .data import MDWeightsDataSource

    out = pathlib.Path(out)
    if out.resolve() in {pathlib.Path(frames).resolve(), pathlib.Path(observed).resolve()}:
        raise ValueError(f"{out}: the store would overwrite an input")
    source = MDWeightsDataSource(frames=str(frames), observed=str(observed), **options)
    fs, kind, diffuse, _, _ = source.load()
    match = source.match_voxels(fs, kind, diffuse)
    rows, row_voxel, F = match["rows"], match["row_voxel"], match["F"]
    voxel_of_row = row_voxel[rows]
    order = np.argsort(voxel_of_row, kind="stable")
    columns, voxels = rows[order], voxel_of_row[order]
    counts = np.bincount(voxels, minlength=len(match["hkl"]))
    T = int(F.shape[0])
    step = max(1, block_bytes // (8 * T))
    state = None if fs.state is None or not np.any(fs.state) else fs.state
    with FrameStoreWriter(out, T, match["hkl"], counts, complex_=(kind == "complex"), cell=diffuse.cell,
                          spacegroup=diffuse.spacegroup, state=state) as writer:
        for a in range(0, len(columns), step):
            cols = columns[a:a + step]
            ascending = np.argsort(cols)
            block = np.empty((T, len(cols)), dtype=np.complex64 if kind == "complex" else np.float32)
            # increasing indices: HDF5 and memory maps read in order
            block[:, ascending] = np.asarray(F[:, np.sort(cols)])
            writer.append(block.real.T, block.imag.T if kind == "complex" else None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="physppl-make-frames", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder")
    ap.add_argument("--structure", help="PDB/mmCIF with alternate conformers A/B (default: built-in toy molecule)")
    ap.add_argument("--n-frames", type=int, default=90)
    ap.add_argument("--state-masses", type=float, nargs=3, default=None, metavar=("A", "B", "C"),
                    help="true state masses (default 0.5 0.5 0; with --store 0.2 0.5 0.3)")
    ap.add_argument("--truth", choices=["states", "frames", "subset"], default="states")
    ap.add_argument("--subset", type=int, nargs=2, metavar=("FIRST", "STOP"))
    ap.add_argument("--dmin", type=float, default=None, help="resolution limit in A (simulation default 2.5; "
                    "--convert: none)")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--bragg-noise", type=float, default=0.03)
    ap.add_argument("--format", choices=["npz", "npy", "h5", "mtz"], default="npz")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", action="store_true",
                    help="a synthetic trajectory at scale, written as a frame store (frames.h5) for streaming")
    ap.add_argument("--n-voxels", type=int, default=100_000, help="with --store: observed voxels")
    ap.add_argument("--convert", metavar="FRAMES", help="stack these frames (MTZ folder, .npz, .npy, .h5) into a "
                    "frame store OUT for streaming, mapped onto --observed")
    ap.add_argument("--observed", metavar="MTZ", help="with --convert: the observed diffuse intensities")
    args = ap.parse_args(argv)
    try:
        if args.convert:
            if not args.observed:
                ap.error("--convert needs --observed MTZ (the voxels the store is laid out for)")
            store = convert_to_store(args.convert, args.observed, args.out, dmin=args.dmin)
            print(json.dumps({"frames": str(store), "observed": args.observed}, indent=2))
            return 0
        if args.store:
            masses = {} if args.state_masses is None else {"state_masses": args.state_masses}
            paths = write_trajectory_store(args.out, n_frames=args.n_frames, n_voxels=args.n_voxels, noise=args.noise,
                                           seed=args.seed, progress=True, **masses)
            print(json.dumps(paths, indent=2))
            return 0
        paths = write_example(args.out, args.format, structure=args.structure, n_frames=args.n_frames,
                              state_masses=args.state_masses or [0.5, 0.5, 0.0], truth=args.truth, subset=args.subset,
                              dmin=2.5 if args.dmin is None else args.dmin,
                              noise=args.noise, bragg_noise=args.bragg_noise, seed=args.seed, progress=True)
    except (ValueError, FileNotFoundError) as err:
        print(f"physppl-make-frames: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
