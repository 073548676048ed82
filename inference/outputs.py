"""Writing run outputs atomically, and the run-directory conventions every job follows."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "write_json", "write_metrics", "write_losses", "protect_inputs", "LOSSES_FILE"]

LOSSES_FILE = "losses.csv"  # the training curve of a run, read back by physppl-report


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], protect: tuple = ()) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``: readers never see a partial file.

    Refuses to write onto any path in ``protect`` (the user's inputs). A replaced file keeps its permissions;
    a new one gets 0644 (mkstemp's 0600 would hide outputs from collaborators).
    """
    path = Path(path)
    for p in protect:
        if p is not None and Path(p).resolve() == path.resolve():
            raise ValueError(f"refusing to overwrite the input file {p}: choose another output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN/inf
    return x


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=True)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def write_metrics(output_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write ``metrics.json``: the run's headline figures, so sweeps compare without re-reading posteriors."""
    return write_json(Path(output_dir) / "metrics.json", metrics)


def write_losses(output_dir: str | os.PathLike, losses, step=None, **columns) -> Path | None:
    """Write the training curve as ``losses.csv`` (columns ``step``, ``loss`` and any extra equal-length columns).

    ``loss`` is the quantity the run minimised (negative ELBO for SVI); ``step`` defaults to 1..n.
    Nothing is written for an empty curve (NUTS runs).
    """
    import numpy as np
    import pandas as pd

    loss = np.asarray(losses, dtype=float).reshape(-1)
    if loss.size == 0:
        return None
    table = {"step": np.arange(1, loss.size + 1) if step is None else np.asarray(step), "loss": loss}
    for name, values in columns.items():
        values = np.asarray(values, dtype=float).reshape(-1)
        if values.size != loss.size:
            raise ValueError(f"write_losses: column {name!r} has {values.size} values for {loss.size} losses")
        table[name] = values
    frame = pd.DataFrame(table)
    return atomic_write(Path(output_dir) / LOSSES_FILE, lambda p: frame.to_csv(p, index=False))


def protect_inputs(*paths: str | os.PathLike | None) -> tuple[Path, ...]:
    return tuple(Path(p).resolve() for p in paths if p is not None)
