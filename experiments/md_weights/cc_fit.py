"""The Pearson-CC objective of the original prototype: maximise CC(x'(w), y) over softmax weights with Adam.

Kept beside the likelihood so both can be compared on one run. CC is scale-free, so it cannot tell a weighting
from any other with the same x' shape (the two-frame split p vs 1-p, look-alike frames): it returns one point,
without uncertainty, wherever Adam stops.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from physppl.models.md_weights import diffuse_intensity, pearson_cc

__all__ = ["CCFit", "fit_pearson_cc"]


@dataclass
class CCFit:
    weights: np.ndarray
    cc: float
    losses: list
    steps: int
    wall_time: float


def fit_pearson_cc(frames, y: torch.Tensor, steps: int = 2000, lr: float = 0.05, weight: torch.Tensor | None = None,
                   init_logits: torch.Tensor | None = None, tol: float = 1e-7, progress: bool = False) -> CCFit:
    """Full-batch Adam on ``-CC(x'(softmax(theta)), y)``; stops when CC changes by less than ``tol`` over 50 steps.

    ``weight`` optionally weights voxels in the CC (resolution weighting).
    """
    block = frames.block()
    theta = torch.zeros(frames.n_frames, dtype=block.mean_re.dtype, device=block.mean_re.device) if init_logits is None \
        else init_logits.detach().clone()
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    for step in tqdm(range(1, steps + 1), disable=not progress, desc="CC fit", mininterval=1.0):
        opt.zero_grad()
        loss = -pearson_cc(diffuse_intensity(torch.softmax(theta, -1), block), y, weight)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"the CC fit diverged at step {step} (CC is {-losses[-1]})")
        if step > 100 and abs(losses[-50] - losses[-1]) < tol:
            break
    with torch.no_grad():
        w = torch.softmax(theta, -1)
        cc = float(pearson_cc(diffuse_intensity(w, block), y, weight))
    return CCFit(w.cpu().double().numpy(), cc, losses, step, time.perf_counter() - t0)
