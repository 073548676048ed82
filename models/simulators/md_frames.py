"""Simulated MD-like frames of a crystal and the diffuse (and Bragg) intensities of a known weighting of them.

A structure is given in two or more conformational states (coordinates per state). A frame is the crystal's P1
unit cell: every symmetry copy of the molecule in the frame's state, each copy with its own rigid-body jitter and
per-atom thermal jitter. Structure factors of each frame come from gemmi (electron density on a grid, FFT). The
observed diffuse intensity of weights w is ``x'(h) = sum_t w_t |F(h,t)|^2 - |sum_t w_t F(h,t)|^2``, averaged over
the symmetry mates of each reflection of the crystal's asymmetric unit, scaled, offset and made noisy; the Bragg
intensity is ``|sum_t w_t F(h,t)|^2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import gemmi
import numpy as np
import reciprocalspaceship as rs

__all__ = ["ConformationalStates", "FrameSet", "ObservedIntensities", "toy_states", "states_from_structure",
           "state_trajectory", "simulate_frames", "simulate_observed", "asu_index"]


@dataclass
class ConformationalStates:
    """One molecule (the crystal's asymmetric unit) in S states: Cartesian coordinates (S, n_atoms, 3)."""

    coords: np.ndarray
    elements: list[str]
    b_iso: np.ndarray
    cell: tuple[float, ...]
    spacegroup: str
    names: list[str] = field(default_factory=list)

    @property
    def n_states(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class FrameSet:
    """Structure factors of T frames at N P1 reflections: F (T, N) complex64, hkl (N, 3)."""

    F: np.ndarray
    hkl: np.ndarray
    cell: tuple[float, ...]
    spacegroup: str  # the crystal's space group (frames themselves are P1)
    state: np.ndarray  # (T,) state label of each frame
    state_names: list[str] = field(default_factory=list)


@dataclass
class ObservedIntensities:
    """Diffuse (and Bragg) intensities on the crystal's asymmetric unit, with sigmas and the generating truth."""

    hkl: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    bragg: np.ndarray
    sigma_bragg: np.ndarray
    x_true: np.ndarray
    cell: tuple[float, ...]
    spacegroup: str
    scale: float
    offset: float


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def _rotate_part(coords: np.ndarray, part: np.ndarray, pivot: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    out = coords.copy()
    out[part] = (coords[part] - pivot) @ _rotation(axis, degrees).T + pivot
    return out


def toy_states(n_atoms: int = 240, hinge_degrees: float = 20.0, seed: int = 0) -> ConformationalStates:
    """A two-domain toy molecule in P 21 21 21 and three states: A, B (domain 2 rotated about the hinge) and a
    decoy C (domain 1 rotated instead). Small enough for tests and the built-in example."""
    rng = np.random.default_rng(seed)
    half = n_atoms // 2
    centres = np.array([[-6.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    coords = np.empty((n_atoms, 3))
    for d, (lo, hi) in enumerate(((0, half), (half, n_atoms))):
        pos = centres[d].copy()
        for i in range(lo, hi):  # a chain folded inside a sphere: steps of 1.5 A, rejected outside 7 A
            while True:
                step = rng.normal(size=3)
                cand = pos + 1.5 * step / np.linalg.norm(step)
                if np.linalg.norm(cand - centres[d]) < 7.0:
                    break
            coords[i] = pos = cand
    elements = list(rng.choice(["C", "C", "C", "N", "O"], size=n_atoms))
    pivot = np.zeros(3)
    a = coords
    b = _rotate_part(coords, np.arange(half, n_atoms), pivot, [0.2, 1.0, 0.3], hinge_degrees)
    c = _rotate_part(coords, np.arange(0, half), pivot, [0.1, 0.3, 1.0], -hinge_degrees)
    cell = (36.0, 40.0, 44.0, 90.0, 90.0, 90.0)
    centre = np.array(cell[:3]) * 0.25  # away from the symmetry axes of P 21 21 21
    states = np.stack([a, b, c]) + centre
    return ConformationalStates(states, elements, np.full(n_atoms, 15.0), cell, "P 21 21 21", ["A", "B", "C"])


def states_from_structure(st: gemmi.Structure, domain_degrees: float = 10.0, seed: int = 0) -> ConformationalStates:
    """States from a model whose atoms have alternate conformers A and B (e.g. 1AHO): state A = altloc A,
    state B = altloc B with its C-terminal half rotated about the middle residue, decoy C = altloc A with its
    N-terminal half rotated. Hydrogens are dropped; atoms without altloc belong to every state."""
    st = st.clone()
    st.remove_hydrogens()
    model = st[0]
    rows: dict[tuple, dict[str, tuple]] = {}
    order: list[tuple] = []
    for chain in model:
        for res in chain:
            for atom in res:
                key = (chain.name, res.seqid.num, res.seqid.icode, atom.name)
                if key not in rows:
                    rows[key] = {}
                    order.append(key)
                rows[key][atom.altloc if atom.altloc != "\0" else "*"] = (
                    np.array(atom.pos.tolist()), atom.element.name, atom.b_iso)
    if not any("A" in r and "B" in r for r in rows.values()):
        raise ValueError("the structure has no atoms with alternate conformers A and B: give one that does "
                         "(e.g. 1AHO_untangler_TW.pdb) or use the built-in toy states")
    pick = lambda r, alt: r.get(alt, r.get("*", next(iter(r.values()))))  # noqa: E731
    a = np.array([pick(rows[k], "A")[0] for k in order])
    b = np.array([pick(rows[k], "B")[0] for k in order])
    elements = [pick(rows[k], "A")[1] for k in order]
    b_iso = np.array([pick(rows[k], "A")[2] for k in order])
    resnum = np.array([k[1] for k in order])
    mid = np.median(resnum)
    pivot = a[np.argmin(np.abs(resnum - mid))]
    rng = np.random.default_rng(seed)
    b = _rotate_part(b, np.where(resnum > mid)[0], pivot, rng.normal(size=3), domain_degrees)
    c = _rotate_part(a, np.where(resnum <= mid)[0], pivot, rng.normal(size=3), domain_degrees)
    cell = tuple(st.cell.parameters)
    return ConformationalStates(np.stack([a, b, c]), elements, b_iso, cell, st.spacegroup_hm, ["A", "B", "C"])


def state_trajectory(n_frames: int, populations=(1 / 3, 1 / 3, 1 / 3), dwell: float = 10.0, seed: int = 0) -> np.ndarray:
    """State label of each frame along a trajectory: a Markov chain with mean dwell time ``dwell`` frames whose
    stationary distribution is ``populations``; every state with positive population appears at least once."""
    p = np.asarray(populations, float) / np.sum(populations)
    rng = np.random.default_rng(seed)
    labels = np.empty(n_frames, dtype=np.int64)
    state = rng.choice(len(p), p=p)
    for t in range(n_frames):
        if t and rng.random() < 1.0 / dwell:
            state = rng.choice(len(p), p=p)
        labels[t] = state
    for s in np.where(p > 0)[0]:  # short trajectories might miss a state
        if not (labels == s).any():
            labels[rng.integers(n_frames)] = s
    return labels


def _symmetry_copies(frac: np.ndarray, spacegroup: str) -> np.ndarray:
    """Fractional coordinates (n, 3) of the asymmetric unit -> (n_ops, n, 3) of the unit cell."""
    ops = list(gemmi.SpaceGroup(spacegroup).operations())
    den = float(gemmi.Op.DEN)
    return np.stack([frac @ (np.array(op.rot, float) / den).T + np.array(op.tran, float) / den for op in ops])


class _FrameCalculator:
    """gemmi structure factors of a P1 cell whose atom positions change from frame to frame."""

    def __init__(self, elements: list[str], b_iso: np.ndarray, n_copies: int, cell: tuple, dmin: float):
        self.st = gemmi.Structure()
        self.st.cell = gemmi.UnitCell(*cell)
        self.st.spacegroup_hm = "P 1"
        model = gemmi.Model("1")
        for copy in range(n_copies):
            chain = gemmi.Chain(chr(ord("A") + copy % 26))
            for start in range(0, len(elements), 50):
                res = gemmi.Residue()
                res.name, res.seqid = "UNK", gemmi.SeqId(start // 50 + 1, " ")
                for i in range(start, min(start + 50, len(elements))):
                    atom = gemmi.Atom()
                    atom.name, atom.element, atom.b_iso, atom.occ = elements[i], gemmi.Element(elements[i]), float(b_iso[i]), 1.0
                    res.add_atom(atom)
                chain.add_residue(res)
            model.add_chain(chain)
        self.st.add_model(model)
        self.atoms = [atom for ch in self.st[0] for res in ch for atom in res]
        self.dmin = dmin
        self.dc = gemmi.DensityCalculatorX()
        self.dc.d_min = dmin
        self.dc.rate = 1.5
        self.dc.grid.setup_from(self.st)
        self.hkl = None

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        for atom, p in zip(self.atoms, xyz):
            atom.pos = gemmi.Position(*p)
        model = self.st[0]
        self.dc.set_refmac_compatible_blur(model)
        self.dc.put_model_density_on_grid(model)
        grid = gemmi.transform_map_to_f_phi(self.dc.grid)
        asu = grid.prepare_asu_data(dmin=self.dmin, with_000=False)
        hkl = np.asarray(asu.miller_array)
        if self.hkl is None:
            self.hkl = hkl
            self.inv_d2 = np.asarray(self.st.cell.calculate_1_d2_array(hkl.astype(float)) if hasattr(
                self.st.cell, "calculate_1_d2_array") else [self.st.cell.calculate_1_d2(h) for h in hkl.tolist()])
        elif hkl.shape != self.hkl.shape or not np.array_equal(hkl, self.hkl):
            raise RuntimeError("gemmi returned another reflection set for this frame")
        # undo the blur gemmi adds to sample the density on a coarser grid
        mult = np.array([self.dc.reciprocal_space_multiplier(s) for s in self.inv_d2]) if self.dc.blur else 1.0
        return (np.asarray(asu.value_array) * mult).astype(np.complex64)


def simulate_frames(
    states: ConformationalStates,
    labels: np.ndarray,
    dmin: float = 2.5,
    atom_jitter: float = 0.3,
    rigid_degrees: float = 1.5,
    rigid_shift: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> FrameSet:
    """Structure factors of one frame per label: the unit cell with every copy in that state, jittered."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= states.n_states:
        raise ValueError(f"state labels must be in 0..{states.n_states - 1}")
    rng = np.random.default_rng(seed)
    cell = gemmi.UnitCell(*states.cell)
    frac_m = np.array(cell.frac.mat.tolist())
    orth_m = np.array(cell.orth.mat.tolist())
    copies = [_symmetry_copies(states.coords[s] @ frac_m.T, states.spacegroup) @ orth_m.T for s in range(states.n_states)]
    n_copies = copies[0].shape[0]
    calc = _FrameCalculator(states.elements, states.b_iso, n_copies, states.cell, dmin)
    iterator = range(len(labels))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="frames", mininterval=1.0)
    out = None
    for t in iterator:
        xyz = []
        for copy in copies[labels[t]]:
            centre = copy.mean(0)
            rot = _rotation(rng.normal(size=3), rng.normal() * rigid_degrees)
            moved = (copy - centre) @ rot.T + centre + rng.normal(scale=rigid_shift, size=3)
            xyz.append(moved + rng.normal(scale=atom_jitter, size=moved.shape))
        f = calc(np.concatenate(xyz))
        if out is None:
            out = np.empty((len(labels), f.shape[0]), dtype=np.complex64)
        out[t] = f
    return FrameSet(out, calc.hkl.astype(np.int32), states.cell, states.spacegroup, labels, list(states.names))


def asu_index(hkl: np.ndarray, spacegroup: str) -> tuple[np.ndarray, np.ndarray]:
    """Map P1 Miller indices to the space group's asymmetric unit: (unique ASU hkl (M, 3), index (N,) into it)."""
    asu, _ = rs.utils.hkl_to_asu(np.asarray(hkl), gemmi.SpaceGroup(spacegroup))
    unique, index = np.unique(asu, axis=0, return_inverse=True)
    return unique.astype(np.int32), index.reshape(-1)


def _ensemble_intensities(F: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(weights, np.float64)
    F = F.astype(np.complex128)
    mean = w @ F
    diffuse = w @ (F.real ** 2 + F.imag ** 2) - np.abs(mean) ** 2
    return diffuse, np.abs(mean) ** 2


def simulate_observed(
    frames: FrameSet,
    weights: np.ndarray,
    noise: float = 0.05,
    bragg_noise: float = 0.03,
    scale: float = 1.0e-3,
    offset: float = 5.0,
    seed: int = 0,
) -> ObservedIntensities:
    """Diffuse and Bragg intensities of the ensemble ``weights`` over ``frames`` on the crystal's ASU.

    sigma(h) = noise * (x'(h) + median x') / 2 in the diffuse units: relative noise on strong voxels and a floor on
    weak ones; likewise for Bragg with ``bragg_noise``.
    """
    w = np.asarray(weights, np.float64)
    if w.shape != (frames.F.shape[0],) or (w < 0).any() or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"weights must be {frames.F.shape[0]} non-negative numbers summing to 1")
    diffuse, bragg = _ensemble_intensities(frames.F, w)
    hkl, index = asu_index(frames.hkl, frames.spacegroup)
    count = np.bincount(index)
    x = np.bincount(index, weights=diffuse) / count
    ib = np.bincount(index, weights=bragg) / count
    rng = np.random.default_rng(seed)
    sigma = noise * scale * (x + np.median(x)) / 2
    sigma_b = bragg_noise * (ib + np.median(ib)) / 2
    y = scale * x + offset + rng.normal(size=x.shape) * sigma
    yb = ib + rng.normal(size=ib.shape) * sigma_b
    return ObservedIntensities(hkl, y, sigma, yb, sigma_b, x, frames.cell, frames.spacegroup, scale, offset)
