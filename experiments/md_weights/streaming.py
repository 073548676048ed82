"""Frames that do not fit in memory: streamed from a frame store, or compressed over frames.

* :class:`StreamedFrames` reads a minibatch of voxels as one contiguous range of a
  :mod:`frame store <physppl.io.frame_store>`, centring and squaring on the fly. A reader thread fetches the next
  minibatch while the current one is computed (the SVI engine announces it through the model's ``prefetch``).
* :class:`LowRankFrames` compresses each part (re, im, centred |F|^2) over frames to rank K with a randomized
  range finder on a sample of stored chunks, then one pass over the store projects every row onto that basis
  and records its exact residual norm. A step then costs N x K instead of N x T, and
  :func:`~physppl.models.md_weights.diffuse_error_bound` turns the residuals into a bound on the error of x'.

Both give the model the same ``block(idx)`` it gets from in-memory :class:`~physppl.models.md_weights.FrameFactors`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from physppl.io.frame_store import FrameStore
from physppl.models.md_weights import FrameBlock, LowRankBlock

__all__ = ["StreamedFrames", "LowRankFrames", "ReadStats"]

log = logging.getLogger(__name__)

# Minibatches announced this many steps ahead, read by as many threads, so one block's read overlaps another's
# centring (measured at 5,000 x 10^6 with one reader and one step ahead: the step waited 45% of the time for
# it, at 39% of the disk's rate). Pending reads are held at most one more (each ~ batch x T x 12 bytes).
READ_AHEAD = 2
MAX_PENDING = READ_AHEAD + 1


class ReadStats:
    """Bytes read from the store, seconds spent reading, and seconds the computation waited for a read."""

    def __init__(self) -> None:
        self.bytes = 0
        self.read_s = 0.0
        self.wait_s = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes += nbytes
            self.read_s += seconds

    def as_dict(self) -> dict:
        rate = self.bytes / self.read_s / 1e6 if self.read_s > 0 else float("nan")
        return {"read_gb": self.bytes / 1e9, "read_s": self.read_s, "read_wait_s": self.wait_s, "read_mb_per_s": rate}


def _centre(re: np.ndarray, im: np.ndarray | None, scale: float, dtype, device, on_bad_mean=None):
    """Rows as tensors in model units: each row's mean over frames removed, then scaled; plus |F - mean|^2.

    A value that is not finite makes its row's mean so: ``on_bad_mean(name, raw block)`` is then called before the
    block is changed (the store's own check, which names the rows), so the reads need no separate pass for it."""
    out = []
    for name, part in (("re", re), ("im", im)):
        if part is None:
            out += [None, None]
            continue
        t = torch.from_numpy(part).to(device=device, dtype=dtype)
        mean = t.mean(-1)
        if on_bad_mean is not None and not bool(torch.isfinite(mean).all()):
            on_bad_mean(name, part)  # raises unless the mean merely overflowed
        mean.mul_(scale)
        # (t - mean) * scale in one pass over the block: t * scale + (-mean * scale), written over t
        torch.addcmul(-mean[:, None], t, t.new_tensor(scale), out=t)
        out += [t, mean]
    re_c, mean_re, im_c, mean_im = out
    power = re_c.square()
    if im_c is not None:
        power.addcmul_(im_c, im_c)
    return re_c, mean_re, im_c, mean_im, power


class StreamedFrames:
    """Frame structure factors read from a :class:`~physppl.io.frame_store.FrameStore` a minibatch at a time.

    Parameters
    ----------
    store : FrameStore
    scale : float
        Factor on F (model units: x' of uniform weights with mean 1 is ``scale = 1 / sqrt(x_scale)``).
    read_ahead : bool
        Read the announced next minibatch in a background thread.
    """

    sequential = True  # voxels are read in ranges: the model normalises over the first voxels (shuffled on write)

    def __init__(self, store: FrameStore, scale: float = 1.0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", read_ahead: bool = True):
        self.store, self.scale, self.dtype, self.device = store, float(scale), dtype, torch.device(device)
        self.offsets = torch.as_tensor(store.offsets)
        self.count = self.offsets.diff()
        self.stats = ReadStats()
        self._pool = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="frame-store") if read_ahead else None
        self.prefetch_depth = READ_AHEAD if read_ahead else 0  # for the engine: announce minibatches this far ahead
        # reads in flight by row range: the engine announces minibatch k + READ_AHEAD before it uses minibatch k
        self._pending: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._last: tuple[tuple[int, int], FrameBlock] | None = None  # repeated reads of one range (a MAP start)

    @property
    def n_frames(self) -> int:
        return self.store.n_frames

    @property
    def n_voxels(self) -> int:
        return self.store.n_voxels

    def to(self, device) -> "StreamedFrames":
        self.device = torch.device(device)
        return self

    def _read(self, lo: int, hi: int, check: bool = True):
        t0 = time.perf_counter()
        re, im = self.store.read(lo, hi, check=check)
        self.stats.add(re.nbytes + (0 if im is None else im.nbytes), time.perf_counter() - t0)
        return re, im

    def _load(self, lo: int, hi: int):
        """Rows lo:hi in model units, centred, with their |F|^2: (re, mean_re, im, mean_im, power). Run in the
        reader thread for an announced minibatch, so centring and squaring overlap the step as well as the read
        (torch releases the GIL in its kernels)."""
        re, im = self._read(lo, hi, check=False)  # checked by _centre through the row means, for free
        return _centre(re, im, self.scale, self.dtype, self.device,
                       on_bad_mean=lambda name, block: self.store.check_finite(name, block, lo))

    def _range(self, idx: torch.Tensor) -> tuple[int, int] | None:
        first, last = int(idx[0]), int(idx[-1])
        if last - first + 1 == len(idx) and bool((idx[1:] > idx[:-1]).all()):
            return first, last + 1
        return None

    def prefetch(self, idx: torch.Tensor | None) -> None:
        """Start reading the voxels ``idx`` (a contiguous range) in the background."""
        if self._pool is None or idx is None:
            return
        span = self._range(idx)
        if span is None:
            return
        lo, hi = int(self.offsets[span[0]]), int(self.offsets[span[1]])
        if (lo, hi) in self._pending:
            return
        while len(self._pending) >= MAX_PENDING:  # announced but never used: drop the oldest
            self._pending.popitem(last=False)[1].cancel()
        self.store.will_need(lo, hi)  # the kernel starts reading now, with many requests in flight
        self._pending[(lo, hi)] = self._pool.submit(self._load, lo, hi)

    def _rows(self, lo: int, hi: int):
        future = self._pending.pop((lo, hi), None)
        if future is not None and not future.cancelled():
            t0 = time.perf_counter()
            arrays = future.result()
            self.stats.wait_s += time.perf_counter() - t0
            return arrays
        t0 = time.perf_counter()
        arrays = self._load(lo, hi)
        self.stats.wait_s += time.perf_counter() - t0
        return arrays

    def block(self, idx: torch.Tensor | None = None) -> FrameBlock:
        """Voxels ``idx`` (a contiguous range; anything else is read range by range, slowly)."""
        if idx is None:
            raise ValueError(f"{self.store.path}: streamed frames ({self.store.nbytes / 1e9:.1f} GB) are read a "
                             "minibatch at a time: give the engine a batch_size (inference.batch_size=...) with "
                             "batch_order=blocks, or use full passes (iter_blocks)")
        idx = idx.cpu()
        span = self._range(idx)
        if span is not None:
            lo, hi = int(self.offsets[span[0]]), int(self.offsets[span[1]])
            if self._last is not None and self._last[0] == (lo, hi):
                return self._last[1]
            re_c, mean_re, im_c, mean_im, power = self._rows(lo, hi)
            counts = self.count[span[0]:span[1]]
        else:  # e.g. a random normalisation set: one read per run of consecutive voxels (rows centre independently)
            counts = self.count[idx]
            runs = np.split(idx.numpy(), np.where(np.diff(idx.numpy()) != 1)[0] + 1)
            parts = [self._rows(int(self.offsets[run[0]]), int(self.offsets[run[-1] + 1])) for run in runs]
            re_c, mean_re, im_c, mean_im, power = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
        local = torch.repeat_interleave(torch.arange(len(counts)), counts).to(self.device)
        block = FrameBlock(re_c, im_c, power, mean_re, mean_im, local, counts.to(self.device))
        if span is not None:
            self._last = ((lo, hi), block)
        return block

    def voxel_ranges(self, voxels_per_block: int | None = None) -> list[torch.Tensor]:
        """Every voxel once, as contiguous index ranges of about 256 MB of stored rows each."""
        if voxels_per_block is None:
            voxels_per_block = max(1, (256 << 20) // (4 * self.n_frames * (2 if self.store.is_complex else 1)))
        return [torch.arange(v0, min(self.n_voxels, v0 + int(voxels_per_block)))
                for v0 in range(0, self.n_voxels, int(voxels_per_block))]

    def iter_blocks(self, voxels_per_block: int | None = None) -> Iterator[tuple[int, int, FrameBlock]]:
        """Every voxel once, in order, as ``(first, stop, block)``, reading the next block while one is used."""
        ranges = self.voxel_ranges(voxels_per_block)
        for k, idx in enumerate(ranges):
            if k + 1 < len(ranges):
                self.prefetch(ranges[k + 1])
            yield int(idx[0]), int(idx[-1]) + 1, self.block(idx)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class LowRankFrames:
    """Frames compressed over frames to rank ``K`` per part; ``block(idx)`` returns a
    :class:`~physppl.models.md_weights.LowRankBlock` (in memory: (R, K) coefficients per part, the (T, K) bases).

    Build with :meth:`from_stream`. ``info`` reports the rank, the build's time and reads, and the residuals.
    """

    sequential = True  # same normalisation voxels as the exact streamed path

    def __init__(self, coef: dict, basis: dict, residual: dict, offset: dict, mean_re, mean_im, offsets,
                 info: dict | None = None):
        self.coef, self.basis, self.residual, self.offset = coef, basis, residual, offset
        self.mean_re, self.mean_im = mean_re, mean_im
        self.offsets = torch.as_tensor(offsets)
        self.count = self.offsets.diff()
        self.voxel = torch.repeat_interleave(torch.arange(len(self.count)), self.count)
        self.info = dict(info or {})
        self.source: StreamedFrames | None = None  # the exact frames, for measuring the error

    @property
    def n_frames(self) -> int:
        return int(self.basis["re"].shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.count.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis["re"].shape[1])

    def to(self, device) -> "LowRankFrames":
        for d in (self.coef, self.basis, self.residual, self.offset):
            for k in d:
                d[k] = d[k].to(device)
        self.mean_re = self.mean_re.to(device)
        self.mean_im = None if self.mean_im is None else self.mean_im.to(device)
        self.count, self.voxel = self.count.to(device), self.voxel.to(device)
        return self

    def block(self, idx: torch.Tensor | None = None) -> LowRankBlock:
        if idx is None:
            rows, local, count = slice(None), self.voxel, self.count
        else:
            idx = idx.to(self.count.device)
            count = self.count[idx]
            starts = self.offsets.to(idx.device)[idx]
            local = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), count)
            first = torch.repeat_interleave(count.cumsum(0) - count, count)
            rows = torch.repeat_interleave(starts, count) + torch.arange(int(count.sum()), device=idx.device) - first
        take = lambda d: {k: v[rows] for k, v in d.items()}  # noqa: E731
        return LowRankBlock(take(self.coef), self.basis, take(self.residual), self.mean_re[rows],
                            None if self.mean_im is None else self.mean_im[rows], local, count, offset=take(self.offset))

    @classmethod
    def from_stream(cls, frames: StreamedFrames, rank: int = 64, sample_rows: int | None = None, oversample: int = 16,
                    seed: int = 0, progress: bool = False) -> "LowRankFrames":
        """Rank-``rank`` bases from a random sample of the store's chunks (randomized SVD), then one pass over the
        store for every row's coefficients and exact residual norm."""
        store = frames.store
        t0 = time.perf_counter()
        read0 = frames.stats.bytes
        R, T = store.n_rows, store.n_frames
        rank = int(min(rank, T))
        sample_rows = int(sample_rows or max(8 * (rank + oversample), 4096))
        per = store.rows_per_chunk
        n_chunks = -(-R // per)
        pick = np.sort(np.random.default_rng(seed).choice(n_chunks, size=min(n_chunks, -(-sample_rows // per)),
                                                         replace=False))
        sample: dict[str, list] = {"re": [], "im": [], "power": []}
        for c in pick:
            re, im = frames._read(int(c) * per, min(R, (int(c) + 1) * per))
            re_c, _, im_c, _, power = _centre(re, im, frames.scale, frames.dtype, frames.device)
            sample["re"].append(re_c)
            sample["power"].append(power - power.mean(-1, keepdim=True))
            if im_c is not None:
                sample["im"].append(im_c)
        parts = [k for k in ("re", "im", "power") if sample[k]]
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # svd_lowrank draws its test matrix from the global generator
        basis = {}
        for k in parts:
            A = torch.cat(sample[k])
            _, _, V = torch.svd_lowrank(A, q=min(rank + oversample, min(A.shape)), niter=2)
            basis[k] = V[:, :rank].contiguous()
        torch.random.set_rng_state(gen_state)
        t_basis = time.perf_counter() - t0
        coef = {k: torch.empty(R, rank, dtype=frames.dtype) for k in parts}
        residual = {k: torch.empty(R, dtype=frames.dtype) for k in parts}
        offset = {k: torch.zeros(R, dtype=frames.dtype) for k in parts}
        mean_re = torch.empty(R, dtype=frames.dtype)
        mean_im = torch.empty(R, dtype=frames.dtype) if store.is_complex else None
        for v0, v1, blk in frames.iter_blocks():
            lo, hi = int(frames.offsets[v0]), int(frames.offsets[v1])
            values = {"re": blk.re, "im": blk.im, "power": blk.power}
            p_mean = blk.power.mean(-1)
            values["power"] = blk.power - p_mean[:, None]
            offset["power"][lo:hi] = p_mean.cpu()
            for k in parts:
                A = values[k]
                c = A @ basis[k]
                coef[k][lo:hi] = c.cpu()
                residual[k][lo:hi] = (A - c @ basis[k].T).norm(dim=-1).cpu()
            mean_re[lo:hi] = blk.mean_re.cpu()
            if mean_im is not None:
                mean_im[lo:hi] = blk.mean_im.cpu()
            if progress:
                log.info("low-rank pass: %d / %d voxels", v1, frames.n_voxels)
        info = {"rank": rank, "sample_rows": int(sum(len(s) for s in sample["re"])), "basis_s": t_basis,
                "build_s": time.perf_counter() - t0, "build_read_gb": (frames.stats.bytes - read0) / 1e9,
                "memory_gb": sum(v.numel() * v.element_size() for d in (coef, residual, offset) for v in d.values()) / 1e9}
        out = cls(coef, basis, residual, offset, mean_re, mean_im, store.offsets, info)
        out.source = frames
        return out

    def measured_error(self, w: torch.Tensor) -> torch.Tensor | None:
        """The exact ``|x'(h) - x'_lowrank(h)|`` of weights w (T,) at every voxel (N,), from one pass over the store
        it was built from (None without one)."""
        from physppl.models.md_weights import diffuse_intensity

        if self.source is None:
            return None
        out = []
        for v0, v1, blk in self.source.iter_blocks():
            idx = torch.arange(v0, v1, device=self.count.device)
            out.append((diffuse_intensity(w, blk).double() - diffuse_intensity(w, self.block(idx)).double()).abs())
        return torch.cat(out, -1)

    def error_bound(self, w: torch.Tensor, voxels_per_block: int = 65536) -> torch.Tensor:
        """:func:`~physppl.models.md_weights.diffuse_error_bound` of weights w (T,) at every voxel (N,)."""
        from physppl.models.md_weights import diffuse_error_bound

        out = []
        for v0 in range(0, self.n_voxels, voxels_per_block):
            idx = torch.arange(v0, min(self.n_voxels, v0 + voxels_per_block), device=self.count.device)
            out.append(diffuse_error_bound(w, self.block(idx)))
        return torch.cat(out, -1)
