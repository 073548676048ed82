"""Weights of molecular-dynamics frames from diffuse scattering (and, optionally, Bragg intensities).

Generative story: an ensemble is a weighting ``w`` of the T frames on the simplex, ``w ~ Dirichlet(c T w0)``; its
diffuse intensity at reciprocal-space voxel h is the weighted variance of the frames' structure factors,
``x'(h) = sum_t w_t |F(h,t)|^2 - |sum_t w_t F(h,t)|^2``, averaged over the symmetry mates of h that the P1 frames
hold separately. Observed ``y(h) ~ Normal(a x'(h) / m(w) + b, s_k sigma(h))`` (or Student-t) with offset ``b``,
a noise factor ``s_k`` per resolution shell k, and the scale written relative to the ensemble's mean diffuse
intensity ``m(w)`` (over a fixed set of voxels): ``a`` is then the observed-to-predicted ratio of mean intensities,
which the data pin down whatever w is, instead of trading off against w along a ridge (``a x'`` is what the data
see). With two frames ``x'/m(w)`` does not depend on the split at all: the diffuse data say nothing about it, and
the posterior of the split is its prior, as it should be. Bragg intensities, when given, see the ensemble mean:
``y_B(h) ~ Normal(a_B |sum_t w_t F(h,t)|^2 / m_B(w), s_B sigma_B(h))``; they break the symmetry ``w <-> 1 - w`` that
leaves two-frame diffuse data unidentified (``x' = w1 w2 |F_A - F_B|^2``).

The Dirichlet is the maximum-entropy prior of ensemble reweighting: ``log Dir(w; 1 + c T w0) = -c T KL(w0 || w) +
const`` exactly, so ``c`` plays the role of BME/BioEn's confidence parameter theta (0: the flat Dirichlet, the data
alone decide) and ``c T`` is the prior's weight in frames.
Frames inside one conformational state are exchangeable: the data identify state masses, not the split inside a
state, which the posterior then leaves near the prior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from .components.nested_dirichlet import NestedDirichlet
from .components.simplex import CentredDirichlet

__all__ = ["FrameBlock", "LowRankBlock", "FrameFactors", "diffuse_intensity", "diffuse_error_bound", "bragg_intensity", "FrameWeightsModel",
           "dirichlet_concentration", "pearson_cc", "effective_frames"]


@dataclass
class FrameBlock:
    """Structure factors of the P1 voxels behind a set of B observed (asymmetric-unit) voxels.

    ``re``/``im``: (R, T) centred real/imaginary parts (each voxel's mean over frames removed: x' is the weighted
    variance, shift-invariant, and centring avoids float32 cancellation where the mean dominates); ``im`` is None
    for real F. ``power``: (R, T) ``re^2 + im^2``, kept so a step makes no (R, T) temporaries. ``mean_re``/``mean_im``: (R,) the removed means (needed for Bragg intensities). ``local``: (R,) the
    observed voxel (0..B-1) each row belongs to; ``count``: (B,) rows per observed voxel.
    """

    re: torch.Tensor
    im: torch.Tensor | None
    power: torch.Tensor
    mean_re: torch.Tensor
    mean_im: torch.Tensor | None
    local: torch.Tensor
    count: torch.Tensor

    @property
    def n_voxels(self) -> int:
        return int(self.count.shape[0])

    @property
    def has_im(self) -> bool:
        return self.im is not None

    def weighted(self, wm: torch.Tensor, part: str) -> torch.Tensor:
        """``wm @ part.T``: (W, T) weights against the (R, T) rows of ``re``, ``im`` or ``power`` -> (W, R)."""
        return wm @ getattr(self, part).T


@dataclass
class LowRankBlock:
    """A :class:`FrameBlock` with each (R, T) part compressed over frames: ``part ~ coef[part] @ basis[part].T``
    (coef (R, K), basis (T, K) orthonormal, plus ``offset[part]`` when given), so a weighting costs R x K instead of R x T. ``residual[part]`` (R,)
    is each row's exact approximation error ``||part_r - coef_r basis^T||_2``, which bounds the error of any
    weighted sum (see :func:`diffuse_error_bound`)."""

    coef: dict
    basis: dict
    residual: dict
    mean_re: torch.Tensor
    mean_im: torch.Tensor | None
    local: torch.Tensor
    count: torch.Tensor
    offset: dict | None = None  # part -> (R,) exact row constant over frames (|F|^2's row mean), outside the basis

    @property
    def n_voxels(self) -> int:
        return int(self.count.shape[0])

    @property
    def has_im(self) -> bool:
        return "im" in self.coef

    def weighted(self, wm: torch.Tensor, part: str) -> torch.Tensor:
        out = (wm @ self.basis[part]) @ self.coef[part].T
        if self.offset and part in self.offset:
            out = out + wm.sum(-1, keepdim=True) * self.offset[part]
        return out


class FrameFactors:
    """Frame structure factors in memory, rows grouped by the observed voxel they map to.

    Parameters
    ----------
    re, im : Tensor, shape (R, T)
        Real and imaginary parts of F(h, t) for R P1 voxels (``im=None`` for real F); centred here.
    voxel : LongTensor, shape (R,)
        Observed voxel (0..N-1) of each row, e.g. its asymmetric-unit reflection; every voxel needs a row.
    """

    def __init__(self, re: torch.Tensor, im: torch.Tensor | None, voxel: torch.Tensor):
        voxel = torch.as_tensor(voxel, dtype=torch.long)
        order = torch.argsort(voxel, stable=True)
        re = torch.as_tensor(re)[order]
        im = None if im is None else torch.as_tensor(im)[order]
        self._finish(re, im, voxel[order])

    @classmethod
    def from_stack(cls, F, columns, voxel, dtype: torch.dtype = torch.float32, chunk_bytes: int = 2**28) -> "FrameFactors":
        """From a (T, N) array of F (NumPy, or a memory map / HDF5 dataset read a column block at a time): the
        columns ``columns`` (R,) feed observed voxels ``voxel`` (R,). Peak memory is the result plus one block."""
        columns, voxel = np.asarray(columns), np.asarray(voxel)
        order = np.argsort(voxel, kind="stable")
        position = np.empty(len(columns), dtype=np.int64)
        position[order] = np.arange(len(columns))  # row of each wanted column in the result
        T, R = int(F.shape[0]), len(columns)
        is_complex = np.iscomplexobj(F) if not hasattr(F, "dtype") else np.issubdtype(F.dtype, np.complexfloating)
        re = torch.empty(R, T, dtype=dtype)
        im = torch.empty(R, T, dtype=dtype) if is_complex else None
        by_column = np.argsort(columns, kind="stable")
        step = max(1, chunk_bytes // max(1, T * 8))
        for start in range(0, R, step):  # ascending file columns: contiguous reads
            pick = by_column[start:start + step]
            lo, hi = int(columns[pick[0]]), int(columns[pick[-1]]) + 1
            block = np.asarray(F[:, lo:hi])[:, columns[pick] - lo]
            rows = torch.as_tensor(position[pick])
            re[rows] = torch.as_tensor(np.ascontiguousarray(block.real.T), dtype=dtype)
            if im is not None:
                im[rows] = torch.as_tensor(np.ascontiguousarray(block.imag.T), dtype=dtype)
        obj = cls.__new__(cls)
        obj._finish(re, im, torch.as_tensor(voxel[order], dtype=torch.long))
        return obj

    def _finish(self, re: torch.Tensor, im: torch.Tensor | None, voxel: torch.Tensor) -> None:
        """Centre in place (each row's mean over frames removed), precompute |F|^2, index rows by voxel."""
        self.voxel = voxel
        self.mean_re = re.mean(-1)
        self.re = re.sub_(self.mean_re[:, None]) if re.is_contiguous() else (re - self.mean_re[:, None]).contiguous()
        if im is not None:
            self.mean_im = im.mean(-1)
            self.im = im.sub_(self.mean_im[:, None]) if im.is_contiguous() else (im - self.mean_im[:, None]).contiguous()
        else:
            self.im = self.mean_im = None
        self.power = self.re.square()
        if self.im is not None:
            self.power.addcmul_(self.im, self.im)
        self.n_voxels = int(self.voxel.max()) + 1 if len(self.voxel) else 0
        count = torch.bincount(self.voxel, minlength=self.n_voxels)
        if bool((count == 0).any()):
            raise ValueError(f"{int((count == 0).sum())} observed voxels have no frame structure factor")
        self.count = count
        self.offsets = torch.cat([count.new_zeros(1), count.cumsum(0)])
        self.n_frames = int(self.re.shape[1])

    @property
    def device(self) -> torch.device:
        return self.re.device

    def to(self, device) -> "FrameFactors":
        for name in ("voxel", "re", "im", "power", "mean_re", "mean_im", "count", "offsets"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def rows(self, idx: torch.Tensor | None) -> tuple[torch.Tensor | slice | None, torch.Tensor, torch.Tensor]:
        """Rows (indices, or a slice for a contiguous range), local voxel index and row count for observed voxels
        ``idx`` (None: all, in order)."""
        if idx is None:
            return None, self.voxel, self.count
        idx = idx.to(self.offsets.device)
        first, last = int(idx[0]), int(idx[-1])
        if last - first + 1 == len(idx) and bool((idx[1:] > idx[:-1]).all()):
            # a contiguous range of voxels is a contiguous range of rows: a view, no copy
            lo, hi = int(self.offsets[first]), int(self.offsets[last + 1])
            return slice(lo, hi), self.voxel[lo:hi] - first, self.count[first:last + 1]
        count = self.count[idx]
        starts = self.offsets[idx]
        local = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), count)
        first = torch.repeat_interleave(count.cumsum(0) - count, count)
        rows = torch.repeat_interleave(starts, count) + torch.arange(int(count.sum()), device=idx.device) - first
        return rows, local, count

    def block(self, idx: torch.Tensor | None = None) -> FrameBlock:
        rows, local, count = self.rows(idx)
        take = (lambda t: t) if rows is None else (lambda t: None if t is None else t[rows])
        return FrameBlock(take(self.re), take(self.im), take(self.power), take(self.mean_re), take(self.mean_im),
                          local, count)


def _weights_matrix(w: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Flatten the batch dims of w (..., T) for one matrix product; remember them for the result."""
    return w.reshape(-1, w.shape[-1]), w.shape[:-1]


def _unflatten(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    # w's batch dims are right-aligned with the model's plates; its last batch dim is the (size-1) slot of the
    # voxel plate, which the voxel axis of the result takes over.
    x = x.reshape(batch + x.shape[-1:])
    return x.squeeze(-2) if len(batch) else x


def _symmetry_mean(x: torch.Tensor, block: FrameBlock) -> torch.Tensor:
    out = x.new_zeros(x.shape[:-1] + (block.n_voxels,)).index_add(-1, block.local, x)
    return out / block.count.to(x.dtype)


def diffuse_intensity(w: torch.Tensor, block: FrameBlock) -> torch.Tensor:
    """``x'(h) = sum_t w_t |F(h,t)|^2 - |sum_t w_t F(h,t)|^2`` averaged over symmetry mates; (..., T) -> (..., B)."""
    wm, batch = _weights_matrix(w.to(block.mean_re.dtype))
    x = block.weighted(wm, "power") - block.weighted(wm, "re").square()
    if block.has_im:
        x = x - block.weighted(wm, "im").square()
    return _unflatten(_symmetry_mean(x, block), batch)


def diffuse_error_bound(w: torch.Tensor, block: LowRankBlock) -> torch.Tensor:
    """An upper bound on ``|x'(h) - x'_lowrank(h)|`` for weights w, (..., T) -> (..., B).

    For any weighting, ``|sum_t w_t e_t| <= ||w||_2 ||e||_2`` (Cauchy-Schwarz), so the power term errs by at most
    ``||w|| r_P`` and each squared mean ``(u + e)^2`` by ``|e| (2 |u| + |e|)`` with ``|e| <= ||w|| r``; the
    symmetry mean of the bounds bounds the mean of the errors.
    """
    wm, batch = _weights_matrix(w.to(block.mean_re.dtype))
    norm = wm.norm(dim=-1, keepdim=True)
    bound = norm * block.residual["power"]
    for part in ("re", "im") if block.has_im else ("re",):
        e = norm * block.residual[part]
        bound = bound + e * (2 * block.weighted(wm, part).abs() + e)
    return _unflatten(_symmetry_mean(bound, block), batch)


def bragg_intensity(w: torch.Tensor, block: FrameBlock) -> torch.Tensor:
    """``|sum_t w_t F(h,t)|^2`` (the ensemble-mean structure factor) averaged over symmetry mates."""
    wm, batch = _weights_matrix(w.to(block.mean_re.dtype))
    x = (block.mean_re + block.weighted(wm, "re")).square()
    if block.has_im:
        x = x + (block.mean_im + block.weighted(wm, "im")).square()
    return _unflatten(_symmetry_mean(x, block), batch)


def dirichlet_concentration(n_frames: int, strength: float = 0.0, prior_weights=None) -> torch.Tensor:
    """Concentration ``1 + c T w0`` of the maximum-entropy prior: ``log Dir(w; 1 + c T w0) = -c T KL(w0 || w) + const``.

    ``strength`` c plays the role of BME/BioEn's theta: 0 is the flat Dirichlet (the data alone decide), larger c
    pulls the weights towards ``prior_weights`` w0 (uniform when None) with the weight of ``c T`` frames.
    """
    if not strength >= 0:
        raise ValueError(f"the Dirichlet strength c must be >= 0, got {strength}")
    if prior_weights is None:
        w0 = torch.full((n_frames,), 1.0 / n_frames)
    else:
        w0 = torch.as_tensor(prior_weights, dtype=torch.get_default_dtype()).flatten()
        if w0.shape[0] != n_frames:
            raise ValueError(f"prior weights have {w0.shape[0]} entries but there are {n_frames} frames")
        if not bool(torch.isfinite(w0).all()) or bool((w0 <= 0).any()):
            raise ValueError("prior weights must be finite and positive (a zero weight removes a frame: drop it instead)")
        w0 = w0 / w0.sum()
    return 1.0 + strength * n_frames * w0


def pearson_cc(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) Pearson correlation of x and y along the last dim."""
    if weight is None:
        weight = torch.ones_like(y)
    weight = weight / weight.sum()
    xm = x - (weight * x).sum(-1, keepdim=True)
    ym = y - (weight * y).sum(-1, keepdim=True)
    cov = (weight * xm * ym).sum(-1)
    return cov / ((weight * xm.square()).sum(-1) * (weight * ym.square()).sum(-1)).clamp_min(1e-30).sqrt()


def effective_frames(w: torch.Tensor) -> torch.Tensor:
    """Kish's effective number of frames ``1 / sum_t w_t^2`` along the last dim."""
    return 1.0 / w.square().sum(-1)


SEQUENTIAL_NORM_VOXELS = 1024


class FrameWeightsModel(PyroModule):
    """Dirichlet frame weights, a scaled and offset diffuse prediction and a noise model per resolution shell.

    Work in normalised units (y of unit rms, F such that x' of uniform weights has unit rms), so the priors
    below are weakly informative whatever the data's units (see :mod:`physppl.md_weights.data`).

    Sample sites
    ------------
    w : Tensor, shape (T,), no plate (event dim 1)
        Frame weights (unconstrained by a centred softmax for NUTS and autoguides): ``Dirichlet(concentration)``, or
        with ``groups`` (states or clusters) and ``prior="nested"`` the nested Dirichlet, flat over state masses
        (``state_concentration`` each) and ``Dirichlet(concentration)`` inside each state. A flat Dirichlet over
        1,000 frames is a strong prior on state masses (a state of 333 frames weighs as 333 pseudo-counts); the
        nested one is not, whatever the number of frames per state.
    scale : Tensor, shape (), ``LogNormal(0, scale_prior_sd)``
        ``a``: observed diffuse intensity per unit of ``x'/m(w)``, the prediction relative to its mean.
    offset : Tensor, shape (), ``Normal(0, offset_prior_sd)``; only with ``offset=True``
        ``b``: constant background.
    noise : Tensor, shape (n_shells,), plate "shell" (dim -1); only with ``noise="shell"``
        ``s_k``: factor on the data's sigmas per resolution shell (``LogNormal(0, 1)``), or the noise sd itself
        when the data have no sigmas (``LogNormal(log 0.3, 1.5)``).
    y : Tensor, shape (N,) or (batch,), plate "voxel" (dim -1), observed
        Diffuse intensity, ``Normal`` or ``StudentT(dof)`` around ``a x'/m(w) + b`` with sd ``s_k sigma``;
        subsampled by ``subsample`` (indices of voxels), each voxel's log-likelihood times ``voxel_weight``.
    bragg_scale : Tensor, shape (); bragg_noise : Tensor, shape (); only with ``bragg=True``
        ``a_B`` (``LogNormal(0, scale_prior_sd)``) and the Bragg noise factor (``LogNormal(0, 1)``).
    y_bragg : Tensor, shape (N,) or (batch,), plate "voxel", observed, masked where missing; only with ``bragg=True``
        Bragg intensity, ``Normal(a_B |sum_t w_t F|^2 / m_B(w), s_B sigma_B)``.

    Parameters
    ----------
    frames : FrameFactors
        The frames' structure factors (or any object with ``block(idx) -> FrameBlock`` and ``n_frames``,
        e.g. a store that streams them from disk).
    shell : LongTensor, shape (N,)
        Resolution shell of each voxel.
    concentration : Tensor, shape (T,), optional
        Dirichlet concentration; default ``1 + c T w0`` from ``strength`` (c) and ``prior_weights`` (w0, uniform
        when None), see :func:`dirichlet_concentration`.
    groups : array-like of int, shape (T,), optional
        State or cluster of each frame, for the nested prior.
    voxel_weight : Tensor, shape (N,), optional
        Resolution weighting: multiplies each voxel's log-likelihood (e.g. equal total weight per shell).
    n_norm_voxels : int
        Size of the fixed random voxel set over which ``m(w)`` is averaged (all voxels when there are fewer), so
        minibatches see the same normaliser; for frames with ``sequential = True`` (streamed from disk, voxels
        shuffled when stored) the first ``min(n_norm_voxels, 1024)`` voxels.
    """

    def __init__(
        self,
        frames,
        shell: torch.Tensor,
        concentration: torch.Tensor | None = None,
        strength: float = 0.0,
        prior_weights=None,
        groups=None,
        prior: str = "nested",
        state_concentration: float = 1.0,
        likelihood: str = "normal",
        dof: float = 4.0,
        noise: str = "shell",
        has_sigma: bool = True,
        offset: bool = True,
        bragg: bool = False,
        bragg_has_sigma: bool = True,
        voxel_weight: torch.Tensor | None = None,
        scale_prior_sd: float = 1.5,
        offset_prior_sd: float = 3.0,
        n_norm_voxels: int = 4096,
    ):
        super().__init__()
        if likelihood not in ("normal", "student_t"):
            raise ValueError(f"likelihood must be 'normal' or 'student_t', got {likelihood!r}")
        if noise not in ("shell", "data"):
            raise ValueError(f"noise must be 'shell' (learned per resolution shell) or 'data', got {noise!r}")
        if noise == "data" and not has_sigma:
            raise ValueError("noise='data' needs sigmas in the observed data; use noise='shell' to learn them")
        self.frames = frames
        if concentration is None:
            concentration = dirichlet_concentration(frames.n_frames, strength, prior_weights)
        self.register_buffer("concentration", torch.as_tensor(concentration, dtype=torch.get_default_dtype()))
        if self.concentration.shape != (frames.n_frames,):
            raise ValueError(f"concentration has shape {tuple(self.concentration.shape)}, expected ({frames.n_frames},)")
        if prior not in ("nested", "dirichlet"):
            raise ValueError(f"prior must be 'nested' (flat over states and within each) or 'dirichlet', got {prior!r}")
        group = None
        if prior == "nested" and groups is not None:
            group = torch.unique(torch.as_tensor(groups, dtype=torch.long), return_inverse=True)[1]
            if group.shape != (frames.n_frames,):
                raise ValueError(f"groups must give one label per frame ({frames.n_frames}), got shape {tuple(group.shape)}")
            if int(group.max()) == 0:
                group = None  # one state: the nested prior is the Dirichlet
        if not state_concentration > 0:
            raise ValueError(f"state_concentration must be positive, got {state_concentration}")
        self.register_buffer("group", group)
        self.state_concentration = float(state_concentration)
        self.register_buffer("shell", torch.as_tensor(shell, dtype=torch.long))
        self.n_shells = int(self.shell.max()) + 1
        self.register_buffer("voxel_weight", None if voxel_weight is None else torch.as_tensor(voxel_weight))
        self.likelihood, self.dof, self.noise = likelihood, float(dof), noise
        self.has_sigma, self.offset, self.bragg, self.bragg_has_sigma = has_sigma, offset, bragg, bragg_has_sigma
        self.scale_prior_sd, self.offset_prior_sd = float(scale_prior_sd), float(offset_prior_sd)
        n = self.n_voxels
        k = min(n, int(n_norm_voxels))
        if getattr(frames, "sequential", False):
            # frames read from disk in voxel order (already shuffled): the first k voxels are a random sample, read
            # in one contiguous range (never all voxels at once, even when there are fewer); at most 1,024, since
            # every step computes them beside its minibatch (any fixed set defines the scale equally well)
            norm = torch.arange(min(k, SEQUENTIAL_NORM_VOXELS))
        elif k >= n:
            norm = None
        else:
            norm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values
        self.register_buffer("norm_voxels", norm)
        self._norm_block = None
        if callable(getattr(frames, "prefetch", None)):
            # frames on disk: the SVI engine announces the coming minibatches of voxels so they are read during
            # this step, as many steps ahead as the frames ask
            self.prefetch = frames.prefetch
            self.prefetch_depth = int(getattr(frames, "prefetch_depth", 1))

    @property
    def n_frames(self) -> int:
        return int(self.concentration.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.shell.shape[0])

    def weights_prior(self):
        """Dirichlet(concentration), or with state groups the nested Dirichlet: state masses ~ Dir(state_concentration)
        and the split inside each state ~ Dir(concentration of its frames)."""
        if self.group is None:
            return CentredDirichlet(self.concentration)
        n_groups = int(self.group.max()) + 1
        a = self.concentration.new_full((n_groups,), self.state_concentration)
        return NestedDirichlet(a, self.concentration, self.group)

    def state_mass_prior(self, labels, n_states: int) -> tuple[np.ndarray, np.ndarray]:
        """Prior mean and sd of the summed weight of each state in ``labels`` (Beta marginals)."""
        labels = np.asarray(labels)
        conc = self.concentration.cpu().double().numpy()
        if self.group is None:
            a = np.array([conc[labels == s].sum() for s in range(n_states)])
        else:
            group = self.group.cpu().numpy()
            if not all(len(np.unique(group[labels == s])) == 1 and np.all(labels[group == group[labels == s][0]] == s)
                       for s in range(n_states) if (labels == s).any()):
                raise ValueError("state_mass_prior: the labels must be the model's groups")
            a = np.full(n_states, self.state_concentration)
        mean = a / a.sum()
        return mean, np.sqrt(mean * (1 - mean) / (a.sum() + 1))

    @staticmethod
    def _noise_prior(zero: torch.Tensor, has_sigma: bool):
        # a factor on reported sigmas is near 1; an absolute sd is a fraction of the (unit-rms) normalised data
        return dist.LogNormal(zero, 1.0) if has_sigma else dist.LogNormal(zero + math.log(0.3), 1.5)

    def _noise_dist(self, loc: torch.Tensor, sd: torch.Tensor):
        if self.likelihood == "student_t":
            return dist.StudentT(self.dof, loc, sd)
        return dist.Normal(loc, sd)

    def forward(
        self,
        y: torch.Tensor,
        sigma: torch.Tensor | None = None,
        y_bragg: torch.Tensor | None = None,
        sigma_bragg: torch.Tensor | None = None,
        subsample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        zero = self.concentration.new_zeros(())
        w = pyro.sample("w", self.weights_prior())
        a = pyro.sample("scale", dist.LogNormal(zero, self.scale_prior_sd))
        b = pyro.sample("offset", dist.Normal(zero, self.offset_prior_sd)) if self.offset else zero
        if self.noise == "shell":
            with pyro.plate("shell", self.n_shells, dim=-1):
                s = pyro.sample("noise", self._noise_prior(zero, self.has_sigma))
        if self.bragg:
            a_b = pyro.sample("bragg_scale", dist.LogNormal(zero, self.scale_prior_sd))
            s_b = pyro.sample("bragg_noise", self._noise_prior(zero, self.bragg_has_sigma))
        idx = subsample
        take = (lambda t: t) if idx is None else (lambda t: None if t is None else t[idx])
        x, ib = self.predictions(w, idx, bragg=self.bragg)
        with pyro.plate("voxel", self.n_voxels, dim=-1, subsample=idx):
            shell = take(self.shell)
            if self.noise == "shell":
                sd = s[..., shell] * take(sigma) if self.has_sigma else s[..., shell]
            else:
                sd = take(sigma)
            weight = take(self.voxel_weight)
            with pyro.poutine.scale(scale=weight if weight is not None else 1.0):
                # global sites carry a trailing size-1 slot for this plate, so they broadcast over voxels as is
                pyro.sample("y", self._noise_dist(a * x + b, sd), obs=take(y))
                if self.bragg:
                    yb = take(y_bragg)
                    present = torch.isfinite(yb)
                    # missing voxels get sigma 1 before the product: a NaN there would make NaN gradients even
                    # though the masked term is not used (torch.where differentiates both branches)
                    sig_b = torch.where(present, take(sigma_bragg), torch.ones_like(yb)) if self.bragg_has_sigma \
                        else torch.ones_like(yb)
                    sd_b = s_b * sig_b
                    with pyro.poutine.mask(mask=present):
                        pyro.sample("y_bragg", dist.Normal(a_b * ib, sd_b),
                                    obs=torch.where(present, yb, torch.zeros_like(yb)))
        return x

    def predictions(self, w: torch.Tensor, idx: torch.Tensor | None = None, bragg: bool = False):
        """Diffuse (and Bragg) intensity of weights w at voxels idx, relative to their mean over the model's
        normalisation voxels: ``(x'/m(w), I_B/m_B(w) or None)``, shapes (..., B)."""
        if idx is None and callable(getattr(self.frames, "voxel_ranges", None)):
            return self._predictions_by_range(w, bragg)
        x, ib, m, mb = self.intensities(w, idx, bragg)
        return x / m, (None if ib is None else ib / mb)

    def intensities(self, w: torch.Tensor, idx: torch.Tensor | None = None, bragg: bool = False):
        """``(x', I_B or None, m(w), m_B(w) or None)`` at voxels idx in frame units, with the normalisers that
        :meth:`predictions` divides by ((..., 1) each): for callers that need both, at the cost of one pass."""
        block = self.frames.block(idx)
        x = diffuse_intensity(w, block)
        ib = bragg_intensity(w, block) if bragg else None
        if self.norm_voxels is None and idx is None:  # full batch: the normalisation set is the whole map
            m, mb = x.mean(-1, keepdim=True), (None if ib is None else ib.mean(-1, keepdim=True))
        else:
            if self._norm_block is None:
                self._norm_block = self.frames.block(self.norm_voxels)
            m = diffuse_intensity(w, self._norm_block).mean(-1, keepdim=True)
            mb = bragg_intensity(w, self._norm_block).mean(-1, keepdim=True) if bragg else None
        return x, ib, m, mb

    def _predictions_by_range(self, w: torch.Tensor, bragg: bool):
        """All voxels of frames read from disk, one range at a time (the next read while one is computed); without
        gradients only: a differentiable full pass would keep every range's frames alive."""
        if torch.is_grad_enabled():
            raise ValueError("frames streamed from disk are differentiated a minibatch at a time: give the engine a "
                             "batch_size (inference.batch_size=...)")
        ranges = self.frames.voxel_ranges()
        xs, ibs = [], []
        for k, r in enumerate(ranges):
            if k + 1 < len(ranges):
                self.frames.prefetch(ranges[k + 1])
            x, ib = self.predictions(w, r, bragg)
            xs.append(x)
            ibs.append(ib)
        return torch.cat(xs, -1), (torch.cat(ibs, -1) if bragg else None)
