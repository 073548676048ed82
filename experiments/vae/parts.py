"""The VAE problem's named parts (decoders, encoders, the engine), each defined once for Python and the command line."""
from __future__ import annotations

from typing import Any

from pyro.infer import TraceMeanField_ELBO

from physppl.guides.vae import VAEGuide
from physppl.inference.fit import ProtocolError
from physppl.inference.optim import ClippedAdam
from physppl.inference.presets import Preset, resolve_named
from physppl.inference.svi import SVIEngine
from physppl.models.vae import VAEModel

__all__ = ["MODELS", "GUIDES", "ENGINES", "resolve_engine"]

MODELS: dict[str, Preset] = {
    # Pyro's example architecture: one hidden layer of 400, latent 50
    "mlp": Preset(VAEModel, partial=True, exclude=("event_shape",), latent_dim=50, hidden=(400,)),
    "conv": Preset(VAEModel, partial=True, exclude=("event_shape",), latent_dim=8, decoder="conv", hidden=(128,)),
}
_FROM_MODEL = ("event_shape", "latent_dim")
GUIDES: dict[str, Preset] = {
    "encoder": Preset(VAEGuide, partial=True, exclude=_FROM_MODEL),
    "conv_encoder": Preset(VAEGuide, partial=True, exclude=_FROM_MODEL, encoder="conv", hidden=(128,)),
    "iaf": Preset(VAEGuide, partial=True, exclude=_FROM_MODEL, flow="iaf"),
}
ENGINES: dict[str, Preset] = {
    # plain Adam as in Pyro's VAE example: no per-module rates, no decay, no clipping (the loss sums over the data
    # set, so gradients are large by design); analytic KL where it exists (Monte Carlo for a flow head)
    "svi": Preset(SVIEngine, optim=Preset(ClippedAdam, lr=1e-3, lrd=1.0, clip_norm=1e10, betas=(0.9, 0.999)),
                  loss=Preset(TraceMeanField_ELBO, num_particles=1), batch_size=128, checkpoint_every=500),
}


def resolve_engine(value: Any) -> SVIEngine:
    engine = resolve_named(value, ENGINES, "engine")
    if not isinstance(engine, SVIEngine):
        raise ProtocolError(f"the VAE is trained by stochastic variational inference: give an SVIEngine, got "
                            f"{type(engine).__name__}")
    return engine
