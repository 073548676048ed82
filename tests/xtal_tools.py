"""Small crystallographic inputs for tests: toy atomic models of two states and simulated Laue files."""
from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np


def write_toy_models(directory: Path, cell: tuple[float, ...], spacegroup: str, site: str = "LIG",
                     shift: float = 1.5, n_atoms: int = 40, names: tuple[str, str] = ("state0", "state1"),
                     seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Two PDB files of carbon atoms, the second with the first atom (residue ``site``) moved ``shift`` A along x:
    an off and an on state whose difference map has one feature. Returns the paths and the site's position."""
    rng = np.random.default_rng(seed)
    lengths = np.array(cell[:3])
    xyz = rng.uniform(0.15, 0.85, size=(n_atoms, 3)) * lengths
    paths = []
    for name, dx in zip(names, (0.0, shift)):
        st = gemmi.Structure()
        st.cell = gemmi.UnitCell(*cell)
        st.spacegroup_hm = spacegroup
        model = gemmi.Model("1")
        chain = gemmi.Chain("A")
        for i, p in enumerate(xyz):
            res = gemmi.Residue()
            res.name, res.seqid = (site if i == 0 else "ALA"), gemmi.SeqId(i + 1, " ")
            atom = gemmi.Atom()
            atom.name, atom.element = "C1", gemmi.Element("C")
            atom.pos = gemmi.Position(p[0] + (dx if i == 0 else 0.0), p[1], p[2])
            atom.b_iso, atom.occ = 15.0, 1.0
            res.add_atom(atom)
            chain.add_residue(res)
        model.add_chain(chain)
        st.add_model(model)
        path = Path(directory) / f"{name}.pdb"
        st.write_pdb(str(path))
        paths.append(str(path))
    return paths, xyz[0]


def write_laue_pair(directory: Path, names: tuple[str, str] = ("off", "2ms"), seed: int = 1) -> list[str]:
    """Two small simulated Laue files of two related states (``physppl.models.simulators.laue``)."""
    from physppl.models.simulators.laue import simulate_laue

    unmerged, _ = simulate_laue(n_images=4, dmin=3.0, n_states=2, seed=seed)
    paths = []
    for k, name in enumerate(names):
        part = unmerged[unmerged["DATASET"] == k].drop(columns=["DATASET", "N_HARMONICS", "SCALE_TRUE"])
        path = Path(directory) / f"{name}.mtz"
        part.write_mtz(str(path))
        paths.append(str(path))
    return paths
