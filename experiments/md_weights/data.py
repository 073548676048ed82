"""Frame-weighting data: frames and observed intensities in, symmetry-mapped and normalised tensors out.

``MDWeightsDataSource`` is what ``conf/data/md_frames.yaml`` instantiates: it reads user files, or simulates the
built-in example (frames of a toy two-domain molecule, or of a structure with alternate conformers), then
``prepare`` maps the P1 frames onto the observed asymmetric unit, checks the overlap, and puts everything in
normalised units where the data have the mean and spread of the uniform weighting's prediction ``x'/mean(x')``
(what the model predicts, see :class:`~physppl.models.md_weights.FrameWeightsModel`), so scale and offset of any
reasonable fit are of order 1 and 0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from dataclasses import dataclass, field

import numpy as np
import torch

from physppl.io.frames import FrameInputError, ObservedTable, read_frames, read_labels, read_observed, write_frames
from physppl.inference.outputs import atomic_write
from physppl.inference.presets import signature_defaults
from physppl.models.components.wilson import resolution_shells
from physppl.models.md_weights import FrameFactors
from physppl.models.simulators.md_frames import (FrameSet, asu_index, simulate_frames, simulate_observed,
                                                 state_trajectory, states_from_structure, toy_states)

__all__ = ["MDData", "MDWeightsDataSource", "simulate_example", "cluster_frames"]

log = logging.getLogger(__name__)


@dataclass
class MDData:
    """Everything the model needs, in normalised units, plus what it takes to report in the data's units."""

    frames: FrameFactors
    y: torch.Tensor
    sigma: torch.Tensor | None
    y_bragg: torch.Tensor | None
    sigma_bragg: torch.Tensor | None
    shell: torch.Tensor
    shell_edges: np.ndarray
    hkl: np.ndarray
    dhkl: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    cell: tuple
    spacegroup: str
    x_scale: float  # x'(frames' units) = x_scale * x'(normalised); x'(normalised) of uniform weights has mean 1
    y_scale: float  # y(original) = y_shift + y_scale * y(normalised)
    y_shift: float
    bragg_scale: float = 1.0
    truth: dict | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return self.frames.n_frames

    @property
    def n_voxels(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_shells(self) -> int:
        return int(self.shell.max()) + 1

    def model_kwargs(self) -> dict:
        return {"y": self.y, "sigma": self.sigma, "y_bragg": self.y_bragg, "sigma_bragg": self.sigma_bragg}

    def to(self, device) -> "MDData":
        self.frames.to(device)
        for name in ("y", "sigma", "y_bragg", "sigma_bragg", "shell"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def cluster_frames(F, n_clusters: int, n_voxels: int = 2000, seed: int = 0) -> np.ndarray:
    """Group frames by structural similarity: k-means on the leading principal components of each frame's
    |F|^2 over a random subset of reflections (frames of one conformational state land together)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    cols = np.sort(rng.choice(F.shape[1], size=min(n_voxels, F.shape[1]), replace=False))
    power = np.abs(np.asarray(F[:, cols])).astype(np.float64) ** 2
    power = np.log1p(power / np.median(power))
    n_comp = min(10, power.shape[0] - 1, power.shape[1])
    feats = PCA(n_components=n_comp, random_state=seed).fit_transform(power)
    k = min(n_clusters, power.shape[0])
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(feats).astype(np.int64)


def simulate_example(
    structure: str | None = None,
    n_frames: int = 90,
    state_masses=(0.5, 0.5, 0.0),
    truth: str = "states",
    subset: tuple[int, int] | None = None,
    labels: list[int] | None = None,
    dwell: float = 10.0,
    n_truth_frames: int | None = None,
    dmin: float = 2.5,
    atom_jitter: float = 0.3,
    rigid_degrees: float = 1.5,
    rigid_shift: float = 0.2,
    noise: float = 0.05,
    bragg_noise: float = 0.03,
    hinge_degrees: float = 20.0,
    observed_hinge_degrees: float | None = None,
    seed: int = 0,
    progress: bool = False,
):
    """Frames and observed data with known truth.

    ``truth="states"``: the observed data come from an independent ensemble of ``n_truth_frames`` frames whose
    states follow ``state_masses`` (truth is known per state); ``"frames"``: from the frames themselves with
    uniform weight inside each state (truth per frame); ``"subset"``: all weight uniformly on frames
    ``subset[0]:subset[1]``. ``labels`` fixes the state of each frame (e.g. ``[0, 1]`` for the two-frame case).
    ``observed_hinge_degrees`` (toy molecule, ``truth="states"``) generates the observed data from states whose
    hinge angle differs from the frames': a true structure that is not among the frames.
    Returns (FrameSet, diffuse ObservedTable, Bragg ObservedTable, truth dict).
    """
    # argument errors before any simulation (frames of a real structure take minutes)
    if truth not in ("states", "frames", "subset"):
        raise ValueError(f"truth must be 'states', 'frames' or 'subset', got {truth!r}")
    if truth == "subset" and subset is None:
        raise ValueError("truth='subset' needs subset=[first, stop) frame indices")
    if observed_hinge_degrees is not None and structure is not None:
        raise ValueError("observed_hinge_degrees applies to the toy molecule only")
    if structure is None:
        states = toy_states(hinge_degrees=hinge_degrees, seed=seed)
    else:
        import gemmi

        states = states_from_structure(gemmi.read_structure(str(structure)), seed=seed)
    masses = np.asarray(state_masses, float)
    if masses.shape != (states.n_states,) or (masses < 0).any() or not np.isclose(masses.sum(), 1.0):
        raise ValueError(f"state_masses must be {states.n_states} non-negative numbers summing to 1, got {state_masses}")
    if labels is not None:
        lab = np.asarray(labels, dtype=np.int64)
    else:
        lab = state_trajectory(n_frames, populations=np.full(states.n_states, 1.0 / states.n_states), dwell=dwell, seed=seed)
    jitter = dict(dmin=dmin, atom_jitter=atom_jitter, rigid_degrees=rigid_degrees, rigid_shift=rigid_shift)
    frames = simulate_frames(states, lab, seed=seed, progress=progress, **jitter)
    out_truth: dict = {"state_masses": masses, "state_names": list(states.names), "mode": truth}
    if truth == "states":
        n_truth = n_truth_frames or max(len(lab), 60)
        counts = np.round(masses * n_truth).astype(int)
        truth_lab = np.repeat(np.arange(states.n_states), counts)
        truth_states = states
        if observed_hinge_degrees is not None:
            truth_states = toy_states(hinge_degrees=observed_hinge_degrees, seed=seed)
        source = simulate_frames(truth_states, truth_lab, seed=seed + 1, progress=progress, **jitter)
        w_source = np.full(len(truth_lab), 1.0 / len(truth_lab))
        per_frame = None
    elif truth in ("frames", "subset"):
        if truth == "frames":
            present = np.bincount(lab, minlength=states.n_states)
            per_frame = np.where(present[lab] > 0, masses[lab] / np.maximum(present[lab], 1), 0.0)
        else:
            per_frame = np.zeros(len(lab))
            per_frame[subset[0]:subset[1]] = 1.0
        per_frame = per_frame / per_frame.sum()
        out_truth["weights"] = per_frame
        out_truth["state_masses"] = np.bincount(lab, weights=per_frame, minlength=states.n_states)
        source, w_source = frames, per_frame
    obs = simulate_observed(source, w_source, noise=noise, bragg_noise=bragg_noise, seed=seed + 2)
    frames.state_names = list(states.names)
    diffuse = ObservedTable(obs.hkl, obs.intensity, obs.sigma, obs.cell, obs.spacegroup)
    bragg = ObservedTable(obs.hkl, obs.bragg, obs.sigma_bragg, obs.cell, obs.spacegroup)
    out_truth["weights"] = out_truth.get("weights")
    out_truth["scale"], out_truth["offset"] = obs.scale, obs.offset
    return frames, diffuse, bragg, out_truth


def _cache_path(cache_dir: str | None, settings: dict) -> pathlib.Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return pathlib.Path(os.path.expanduser(cache_dir)) / f"md_example_{key}.npz"


class MDWeightsDataSource:
    """Frames + observed diffuse (+ Bragg) intensities, from files or simulated.

    Parameters
    ----------
    frames : path, optional
        Folder of per-frame MTZ files, or a stacked .npz/.npy/.h5 (see :mod:`physppl.io.frames`);
        ``None`` simulates the built-in example (``simulate``).
    observed : path, optional
        MTZ of observed diffuse intensities (with sigmas, or without: then the noise is learned per shell).
    bragg : path, optional
        MTZ of observed Bragg intensities on the same crystal; enables the Bragg term.
    labels : path or "auto", optional
        State/cluster of each frame (CSV or .npy); ``"auto"`` clusters the frames (``n_clusters``); ``None`` uses
        labels stored with the frames, else one group.
    prior_weights : path, optional
        Prior weight per frame (CSV or .npy), the w0 of the Dirichlet prior (uniform when None).
    low_rank : int, optional
        For a frame store (``frames=store.h5``, see :mod:`physppl.io.frame_store`): compress the frames to this
        rank over frames in one pass (:class:`~physppl.md_weights.streaming.LowRankFrames`, held in memory)
        instead of streaming them exactly from disk at every step.
    read_ahead : bool
        For a frame store read exactly: read the next minibatch while the current one is computed.
    check_store : bool
        Read a frame store through once before fitting, so a block of NaN is named before any long run (one
        sequential pass at disk speed); shapes, dtypes and missing chunks are checked on opening either way.
    """

    def __init__(
        self,
        frames: str | None = None,
        observed: str | None = None,
        bragg: str | None = None,
        hkl: str | None = None,
        labels: str | None = None,
        prior_weights: str | None = None,
        n_clusters: int = 8,
        frames_kind: str = "auto",
        columns: dict | None = None,
        dmin: float | None = None,
        n_shells: int = 10,
        shell_weighting: str = "none",
        use_sigma: bool = True,
        min_overlap: float = 0.5,
        use_bragg: bool = True,
        simulate: dict | None = None,
        cache_dir: str | None = "~/.cache/physppl",
        low_rank: int | None = None,
        read_ahead: bool = True,
        check_store: bool = True,
    ):
        if shell_weighting not in ("none", "equal"):
            raise ValueError(f"data.shell_weighting must be none or equal, got {shell_weighting!r}")
        if frames is not None and observed is None:
            raise ValueError("data.frames is set but data.observed is not: give the observed diffuse intensities (MTZ)")
        if frames is None and observed is not None:
            raise ValueError("data.observed is set but data.frames is not: give the frames to weight")
        self.frames, self.observed, self.bragg, self.hkl, self.labels = frames, observed, bragg, hkl, labels
        self.prior_weights = prior_weights
        self.n_clusters, self.frames_kind, self.columns = int(n_clusters), frames_kind, dict(columns or {})
        self.dmin, self.n_shells, self.shell_weighting = dmin, int(n_shells), shell_weighting
        self.use_sigma, self.min_overlap, self.use_bragg = bool(use_sigma), float(min_overlap), bool(use_bragg)
        self.simulate = dict(simulate or {})
        self.cache_dir = cache_dir
        if low_rank is not None and int(low_rank) < 1:
            raise ValueError(f"data.low_rank must be a positive rank or null (exact), got {low_rank}")
        self.low_rank = None if low_rank is None else int(low_rank)
        self.read_ahead = bool(read_ahead)
        self.check_store = bool(check_store)

    @property
    def streamed(self) -> bool:
        """Whether the frames are a frame store, read a minibatch at a time (or compressed in one pass)."""
        from physppl.io.frame_store import is_frame_store

        return self.frames is not None and is_frame_store(self.frames)

    @property
    def inputs(self) -> tuple:
        return tuple(p for p in (self.frames, self.observed, self.bragg, self.hkl, self.labels, self.prior_weights)
                     if p not in (None, "auto"))

    # -- loading -------------------------------------------------------------------------------------
    def load(self) -> tuple[FrameSet, str, ObservedTable, ObservedTable | None, dict | None]:
        """(frames, "complex"|"real", diffuse, bragg or None, truth or None)."""
        if self.frames is None:
            frames, diffuse, bragg, truth = self._simulated()
            return frames, "complex", diffuse, (bragg if self.use_bragg else None), truth
        if self.streamed:
            from physppl.io.frame_store import open_frame_store

            unsupported = {"data.bragg": self.bragg, "data.labels=auto": self.labels == "auto" or None,
                           "data.dmin": self.dmin, "data.hkl": self.hkl}
            given = [k for k, v in unsupported.items() if v]
            if given:
                raise FrameInputError(f"{self.frames} is a frame store: {', '.join(given)} cannot be used with it "
                                      "(the store's voxels are fixed when it is written; Bragg data need the in-memory "
                                      "path)")
            store = open_frame_store(self.frames)
            diffuse = read_observed(self.observed, self.columns.get("intensity"), self.columns.get("sigma"))
            if self.check_store and self.low_rank is None:  # (the low-rank build reads every row anyway)
                log.info("checking %s (%.1f GB) for non-finite values", store.path, store.nbytes / 1e9)
                log.info("frame store checked in %.1f s", store.scan())
            return store, "store", diffuse, None, None
        frames, kind = read_frames(self.frames, hkl=self.hkl, kind=self.frames_kind,
                                   amplitude=self.columns.get("amplitude"), phase=self.columns.get("phase"))
        diffuse = read_observed(self.observed, self.columns.get("intensity"), self.columns.get("sigma"))
        bragg = None
        if self.bragg is not None and self.use_bragg:
            bragg = read_observed(self.bragg, self.columns.get("bragg_intensity"), self.columns.get("bragg_sigma"))
            if bragg.spacegroup.replace(" ", "") != diffuse.spacegroup.replace(" ", ""):
                raise FrameInputError(f"{self.bragg}: space group {bragg.spacegroup} differs from the diffuse data's "
                                      f"{diffuse.spacegroup} ({self.observed})")
        return frames, kind, diffuse, bragg, None

    def _simulated(self):
        # every setting, given or default, keys the cache: the same simulation has one key however it was asked for
        settings = {**signature_defaults(simulate_example), **self.simulate}
        progress = bool(settings.pop("progress", False))
        path = _cache_path(self.cache_dir, settings) if settings.get("structure") else None
        if path is not None and path.exists():
            with np.load(path, allow_pickle=True) as z:
                return tuple(z["bundle"].item())
        bundle = simulate_example(progress=progress, **settings)
        if path is not None:  # frames of a real structure take minutes: keep them for the next run
            bundle_arr = np.empty((), dtype=object)
            bundle_arr[()] = bundle

            def write(p: pathlib.Path) -> None:
                with open(p, "wb") as fh:  # a file object: np.savez would append .npz to a bare path
                    np.savez(fh, bundle=bundle_arr)

            atomic_write(path, write)
        return bundle

    # -- preparation ---------------------------------------------------------------------------------
    def prepare(self, frames: FrameSet, kind: str, diffuse: ObservedTable, bragg: ObservedTable | None = None,
                truth: dict | None = None, dtype=torch.float32) -> MDData:
        if kind == "store":
            return self._prepare_store(frames, diffuse, truth, dtype)
        match = self.match_voxels(frames, kind, diffuse)
        info, obs_rows, hkl, dhkl, rows, row_voxel, F = (match[k] for k in ("info", "obs_rows", "hkl", "dhkl", "rows",
                                                                             "row_voxel", "F"))
        key = lambda h: (h[:, 0].astype(np.int64) * 4096 + h[:, 1]) * 4096 + h[:, 2]  # noqa: E731
        ff = FrameFactors.from_stack(F, rows, row_voxel[rows], dtype=dtype)
        y = diffuse.intensity[obs_rows]
        sigma = diffuse.sigma[obs_rows] if (diffuse.sigma is not None and self.use_sigma) else None
        # normalisation: the model predicts x'/mean(x'); y is put on the same footing
        from physppl.models.md_weights import bragg_intensity, diffuse_intensity

        uniform = torch.full((ff.n_frames,), 1.0 / ff.n_frames, dtype=dtype)
        x_u = diffuse_intensity(uniform, ff.block()).double().numpy()
        x_scale = float(np.mean(x_u))
        if not x_scale > 0:
            raise FrameInputError("the frames' diffuse intensity is zero everywhere: all frames are identical")
        # moments, not a regression on the uniform prediction: that slope collapses when uniform weights fit badly,
        # and the priors on scale and offset would then sit far from any good fit
        x_rel = x_u / x_scale
        a0 = float(np.std(y) / np.std(x_rel)) if np.std(y) > 0 and np.std(x_rel) > 0 else 1.0
        b0 = float(np.mean(y) - a0 * np.mean(x_rel))
        for part in (ff.re, ff.mean_re, ff.im, ff.mean_im):  # F in units where x' of uniform weights has mean 1
            if part is not None:
                part /= x_scale ** 0.5
        ff.power /= x_scale
        to_t = lambda a: None if a is None else torch.as_tensor(a, dtype=dtype)  # noqa: E731
        y_n, s_n = (y - b0) / a0, (None if sigma is None else sigma / a0)
        if sigma is None:
            log.info("observed diffuse data have no sigmas: the model learns the noise sd per resolution shell")
        yb = sb = None
        bragg_scale = 1.0
        if bragg is not None:
            bkey = key(bragg.hkl.astype(np.int64) + 1024)
            bpos = {k: i for i, k in enumerate(bkey)}
            bidx = np.array([bpos.get(k, -1) for k in key(hkl.astype(np.int64) + 1024)])
            n_b = int((bidx >= 0).sum())
            info["n_bragg_matched"] = n_b
            if n_b == 0:
                raise FrameInputError(f"{bragg.path or 'Bragg data'}: none of its reflections is among the fitted diffuse voxels")
            yb = np.where(bidx >= 0, bragg.intensity[np.maximum(bidx, 0)], np.nan)
            sb = None if bragg.sigma is None else np.where(bidx >= 0, bragg.sigma[np.maximum(bidx, 0)], np.nan)
            # a voxel without a usable Bragg intensity is NaN in y_bragg (the model masks it) and gets a placeholder
            # sigma of 1: the masked term's sd still enters the graph, and a NaN there would make the gradient of
            # the Bragg noise factor NaN (0 * NaN)
            usable = np.isfinite(yb) if sb is None else np.isfinite(yb) & np.isfinite(sb) & (sb > 0)
            if not usable.any():
                raise FrameInputError(f"{bragg.path or 'Bragg data'}: no Bragg intensity with a finite, positive sigma "
                                      "among the fitted diffuse voxels")
            yb = np.where(usable, yb, np.nan)
            sb = None if sb is None else np.where(usable, sb, 1.0)
            ib_u = bragg_intensity(uniform, ff.block()).double().numpy()
            ib_u = ib_u / ib_u.mean()
            ok = np.isfinite(yb)
            bragg_scale = float(np.sum(yb[ok] * ib_u[ok]) / np.sum(ib_u[ok] ** 2))
            if bragg_scale <= 0:
                raise FrameInputError(f"{bragg.path or 'Bragg data'}: Bragg intensities do not rise with |<F>|^2 of "
                                      "the frames (wrong file or column?)")
            yb, sb = yb / bragg_scale, (None if sb is None else sb / bragg_scale)
        shell, edges = resolution_shells(dhkl, min(self.n_shells, max(1, len(dhkl) // 20)))
        labels, names = self._labels(frames)
        info["normalisation"] = {"x_scale": x_scale, "y_scale": a0, "y_shift": b0, "bragg_scale": bragg_scale}
        return MDData(ff, to_t(y_n), to_t(s_n), to_t(yb), to_t(sb), torch.as_tensor(shell, dtype=torch.long), edges,
                      hkl, dhkl, labels, names, tuple(diffuse.cell), diffuse.spacegroup, x_scale, a0, b0, bragg_scale, truth, info)

    def match_voxels(self, frames: FrameSet, kind: str, diffuse: ObservedTable) -> dict:
        """Map the P1 frame reflections onto the observed asymmetric unit: the observed rows fitted (``obs_rows``, in
        a fixed random order, with ``hkl`` and ``dhkl``), the frame columns used (``rows``) and the observed voxel of
        every frame column (``row_voxel``, -1 when unobserved); checks the overlap."""
        sg = diffuse.spacegroup
        asu_hkl, index = asu_index(frames.hkl, sg)
        info = {"n_frames": int(frames.F.shape[0]), "n_frame_reflections": int(frames.F.shape[1]),
                "n_observed": int(len(diffuse.intensity)), "spacegroup": sg}
        # observed voxel of every frame reflection, by joining on the ASU Miller index
        key = lambda h: (h[:, 0].astype(np.int64) * 4096 + h[:, 1]) * 4096 + h[:, 2]  # noqa: E731
        obs_key, frame_key = key(diffuse.hkl.astype(np.int64) + 1024), key(asu_hkl.astype(np.int64) + 1024)
        covered = np.isin(obs_key, frame_key)
        n_match = int(covered.sum())
        info["n_matched"] = n_match
        if n_match == 0:
            raise FrameInputError(
                f"no observed reflection is among the frames' reflections after mapping both to the asymmetric unit "
                f"of {sg}: {len(obs_key)} observed (e.g. {diffuse.hkl[:3].tolist()}), {len(asu_hkl)} from the frames "
                f"(e.g. {asu_hkl[:3].tolist()}). Check the space group and cell of {diffuse.path or 'the observed data'} "
                f"and the frames' Miller indices.")
        if n_match < self.min_overlap * len(obs_key):
            raise FrameInputError(
                f"only {n_match} of {len(obs_key)} observed reflections ({100 * n_match / len(obs_key):.1f}%) are "
                f"among the frames' {len(asu_hkl)} asymmetric-unit reflections; below data.min_overlap="
                f"{self.min_overlap}. Check resolution limits and indexing, or lower data.min_overlap to fit the overlap.")
        if n_match < len(obs_key):
            log.warning("%d of %d observed reflections have no frame structure factor; fitting the %d that do",
                        len(obs_key) - n_match, len(obs_key), n_match)
        # voxels in a fixed random order: a contiguous block of them is then a random sample (minibatches by slicing)
        obs_rows = np.random.default_rng(0).permutation(np.where(covered)[0])
        hkl = diffuse.hkl[obs_rows]
        dhkl = _dhkl(hkl, diffuse.cell)
        if self.dmin is not None:
            keep = dhkl >= self.dmin
            obs_rows, hkl, dhkl = obs_rows[keep], hkl[keep], dhkl[keep]
            if len(obs_rows) == 0:
                raise ValueError(f"no observed reflection left at data.dmin={self.dmin} A")
        # frame rows -> observed voxel (rows whose ASU reflection is not observed are not needed)
        pos = {k: i for i, k in enumerate(key(hkl.astype(np.int64) + 1024))}
        voxel_of_asu = np.array([pos.get(k, -1) for k in frame_key])
        row_voxel = voxel_of_asu[index]
        rows = np.where(row_voxel >= 0)[0]
        info["n_frame_rows_used"] = int(len(rows))
        F = frames.F
        if kind == "real" and np.iscomplexobj(F):
            F = np.asarray(F).real
        return {"info": info, "obs_rows": obs_rows, "hkl": hkl, "dhkl": dhkl, "rows": rows, "row_voxel": row_voxel,
                "F": F}

    def _prepare_store(self, store, diffuse: ObservedTable, truth: dict | None, dtype) -> MDData:
        """The observed data aligned to a frame store's voxels; frames streamed (or compressed), never loaded."""
        import reciprocalspaceship as rs

        from .streaming import LowRankFrames, StreamedFrames

        if store.spacegroup.replace(" ", "") != diffuse.spacegroup.replace(" ", ""):
            raise FrameInputError(f"{store.path}: the store's space group {store.spacegroup} differs from the observed "
                                  f"data's {diffuse.spacegroup} ({self.observed})")
        key = lambda h: (h[:, 0].astype(np.int64) * 4096 + h[:, 1]) * 4096 + h[:, 2]  # noqa: E731
        asu, _ = rs.utils.hkl_to_asu(store.hkl, diffuse.spacegroup)
        store_key, obs_key = key(asu.astype(np.int64) + 1024), key(diffuse.hkl.astype(np.int64) + 1024)
        order = np.argsort(obs_key)
        pos = np.searchsorted(obs_key[order], store_key)
        found = (pos < len(order)) & (obs_key[order][np.minimum(pos, len(order) - 1)] == store_key)
        if not found.all():
            miss = np.where(~found)[0]
            raise FrameInputError(
                f"{self.observed}: {len(miss)} of the store's {store.n_voxels} voxels have no observed intensity "
                f"(first: hkl {store.hkl[miss[0]].tolist()}); write the store from the same observed reflections "
                f"({store.path})")
        obs_rows = order[pos]
        info = {"n_frames": store.n_frames, "n_frame_reflections": store.n_rows, "n_observed": int(len(diffuse.intensity)),
                "n_matched": store.n_voxels, "spacegroup": diffuse.spacegroup, "n_frame_rows_used": store.n_rows,
                "frames_store": str(store.path), "frames_store_gb": store.nbytes / 1e9}
        if len(diffuse.intensity) > store.n_voxels:
            log.warning("%d observed reflections are not in the store %s; fitting its %d voxels",
                        len(diffuse.intensity) - store.n_voxels, store.path, store.n_voxels)
        y = diffuse.intensity[obs_rows]
        sigma = diffuse.sigma[obs_rows] if (diffuse.sigma is not None and self.use_sigma) else None
        hkl = diffuse.hkl[obs_rows]
        dhkl = _dhkl(hkl, diffuse.cell)
        # x' of uniform weights is each row's variance over frames (stored with the rows), averaged over mates
        counts = np.diff(store.offsets)
        x_u = np.add.reduceat(store.row_variance, store.offsets[:-1]) / counts
        x_scale = float(np.mean(x_u))
        if not x_scale > 0:
            raise FrameInputError(f"{store.path}: the frames' diffuse intensity is zero everywhere: all frames are identical")
        x_rel = x_u / x_scale
        a0 = float(np.std(y) / np.std(x_rel)) if np.std(y) > 0 and np.std(x_rel) > 0 else 1.0
        b0 = float(np.mean(y) - a0 * np.mean(x_rel))
        frames = StreamedFrames(store, scale=x_scale ** -0.5, dtype=dtype, read_ahead=self.read_ahead)
        if self.low_rank is not None:
            frames = LowRankFrames.from_stream(frames, rank=self.low_rank)
            info.update({f"low_rank_{k}": v for k, v in frames.info.items()})
            log.info("frames compressed to rank %d in %.1f s (%.2f GB read, %.2f GB held)", frames.rank,
                     frames.info["build_s"], frames.info["build_read_gb"], frames.info["memory_gb"])
        to_t = lambda a: None if a is None else torch.as_tensor(a, dtype=dtype)  # noqa: E731
        shell, edges = resolution_shells(dhkl, min(self.n_shells, max(1, len(dhkl) // 20)))
        if self.labels is not None:
            labels, names = read_labels(self.labels, store.n_frames)
        elif store.state is not None:
            used, labels = np.unique(store.state, return_inverse=True)
            labels, names = labels.astype(np.int64), [f"state{u}" for u in used]
        else:
            labels, names = np.zeros(store.n_frames, dtype=np.int64), ["state0"]
        info["normalisation"] = {"x_scale": x_scale, "y_scale": a0, "y_shift": b0, "bragg_scale": 1.0}
        return MDData(frames, to_t((y - b0) / a0), to_t(None if sigma is None else sigma / a0), None, None,
                      torch.as_tensor(shell, dtype=torch.long), edges, hkl, dhkl, labels, names, tuple(diffuse.cell),
                      diffuse.spacegroup, x_scale, a0, b0, 1.0, truth, info)

    def _labels(self, frames: FrameSet) -> tuple[np.ndarray, list[str]]:
        T = frames.F.shape[0]
        if self.labels == "auto":
            lab = cluster_frames(frames.F, self.n_clusters)
            return lab, [f"cluster{k}" for k in range(int(lab.max()) + 1)]
        if self.labels is not None:
            return read_labels(self.labels, T)
        lab = np.asarray(frames.state, dtype=np.int64)
        names = list(frames.state_names) or [f"state{k}" for k in range(int(lab.max()) + 1)]
        # keep only labels in use, in order, so every group is non-empty
        used, lab = np.unique(lab, return_inverse=True)
        return lab.astype(np.int64), [names[u] if u < len(names) else f"state{u}" for u in used]

    def voxel_weight(self, data: MDData) -> torch.Tensor | None:
        """Resolution weighting: ``equal`` gives every shell the same total weight in the likelihood."""
        if self.shell_weighting == "none":
            return None
        counts = torch.bincount(data.shell).to(data.y.dtype)
        return (data.n_voxels / (len(counts) * counts))[data.shell]

    def write(self, frames: FrameSet, diffuse: ObservedTable, bragg: ObservedTable | None, folder) -> dict:
        """Write a (simulated) example as user files: frames.npz, diffuse.mtz, bragg.mtz."""
        from physppl.io.frames import write_intensity_mtz

        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"frames": write_frames(folder / "frames.npz", frames)}
        paths["observed"] = write_intensity_mtz(folder / "diffuse.mtz", diffuse.hkl, {
            "I": (diffuse.intensity, "Intensity"), "SIGI": (diffuse.sigma, "Stddev")}, diffuse.cell, diffuse.spacegroup)
        if bragg is not None:
            paths["bragg"] = write_intensity_mtz(folder / "bragg.mtz", bragg.hkl, {
                "I": (bragg.intensity, "Intensity"), "SIGI": (bragg.sigma, "Stddev")}, bragg.cell, bragg.spacegroup)
        return paths


def _dhkl(hkl: np.ndarray, cell) -> np.ndarray:
    import gemmi

    uc = gemmi.UnitCell(*cell)
    return 1.0 / np.sqrt(np.asarray(uc.calculate_1_d2_array(hkl.astype(float))))


