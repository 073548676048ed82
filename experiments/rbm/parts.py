"""The RBM problem's named parts (the model, its exact guide, the training engines), defined once for Python and the
command line."""
from __future__ import annotations

from typing import Any

from physppl.guides.rbm import RBMGuide
from physppl.inference.contrastive import ContrastiveDivergence
from physppl.inference.fit import ProtocolError
from physppl.inference.presets import Preset, resolve_named
from physppl.models.rbm import BernoulliRBM

__all__ = ["MODELS", "GUIDES", "ENGINES", "resolve_engine"]

MODELS: dict[str, Preset] = {
    # as many hidden units as visible ones on a 4x4 or 8x8 lattice (Torlai & Melko); 16 is the 4x4 default
    "rbm": Preset(BernoulliRBM, partial=True, exclude=("n_visible", "visible_bias", "seed"), n_hidden=16),
}
GUIDES: dict[str, Preset] = {"exact": Preset(RBMGuide, partial=True, exclude=("model",))}
ENGINES: dict[str, Preset] = {
    # CD-10 with Adam: the best exact KL on 4x4 Ising data of the three negative phases (contrastive.py says why)
    "cd": Preset(ContrastiveDivergence),
    "pcd": Preset(ContrastiveDivergence, negative="pcd", k=1),
    "pt": Preset(ContrastiveDivergence, negative="pt", k=1),
}


def resolve_engine(value: Any) -> ContrastiveDivergence:
    engine = resolve_named(value, ENGINES, "engine")
    if not callable(getattr(engine, "run", None)):
        raise ProtocolError(f"an RBM is trained by a contrastive engine with run(model, v, callback, checkpoint); "
                            f"got {type(engine).__name__}")
    return engine
