"""The beam problem's named plans (how the amortized posterior is trained and used), each defined once."""
from __future__ import annotations

from typing import Any

from pyro.infer import Trace_ELBO

from physppl.guides.beam import knife_edge_estimator
from physppl.inference.fit import ProtocolError
from physppl.inference.npe import NPETrainer, SBIPlan, VariationalFocus
from physppl.inference.optim import ClippedAdam
from physppl.inference.presets import Preset, resolve_named
from physppl.inference.refine import ImportanceRefinement
from physppl.simulation_inference.parts import TRAINER as ENGINE_TRAINER
from physppl.inference.svi import SVIEngine

__all__ = ["PLANS", "NPE_TRAINER", "FOCUS", "BEAM_ESTIMATOR", "resolve_plan"]

# the amortized flow's training on the beam's simulations (measured on 10^4 simulations: the held-out loss stops
# improving within 60 epochs at this rate and decay)
NPE_TRAINER = Preset(NPETrainer, lr=1e-3, batch_size=256, max_epochs=60, patience=10, validation_fraction=0.1,
                     clip_norm=5.0, lr_decay=0.97)
# the general engine's trainer (sbi's settings, no epoch cap) for the best amortized posterior
AMORTIZED_TRAINER = ENGINE_TRAINER
# each scan's posterior refitted against the likelihood, started from the amortized draws
FOCUS = Preset(VariationalFocus, steps=600, particles=128, lr=0.01, final_lr_fraction=0.05, inflate=1.5,
               n_transforms=1, hidden_dims=(32, 32))
# the amortized estimator on the engine's zuko NSF (experiments/benchmarks/beam_sbi.py compares it with sbi and with
# the Pyro flow of guide=beam_flow)
BEAM_ESTIMATOR = Preset(knife_edge_estimator, partial=True, exclude=("low", "high", "positions", "fast"))
# 5,000 draws from 20 independence Metropolis-Hastings moves of 20,000 weighted proposals: ~1 s per scan here
BEAM_REFINE = Preset(ImportanceRefinement, n_proposal=20_000, defensive=0.05, mcmc_steps=20)
PLANS: dict[str, Preset] = {
    # amortized, then a per-scan focus; importance sampling with the focus and the network as proposals
    "npe": Preset(SBIPlan, amortized=NPE_TRAINER, focus=FOCUS, refinement=BEAM_REFINE),
    "npe_amortized": Preset(SBIPlan, amortized=NPE_TRAINER, focus=None),    # one network for every scan
    # the best amortized posterior (guide=beam_estimator): trained to convergence with the engine's trainer
    "amortized": Preset(SBIPlan, amortized=AMORTIZED_TRAINER, focus=None),
    "npe_sequential": Preset(SBIPlan, amortized=NPE_TRAINER, focus=None, rounds=4),  # truncated rounds (TSNPE)
    # the same flow trained against the likelihood over simulated scans (amortized VI), no per-scan fit
    "beam_avi": Preset(SBIPlan, amortized=NPE_TRAINER, objective="vi", focus=None, vi_engine=Preset(
        SVIEngine, optim=Preset(ClippedAdam, lr=1e-3, lrd=0.9995, clip_norm=10.0),
        loss=Preset(Trace_ELBO, num_particles=1), max_steps=3000, min_steps=3000, batch_size=256,
        checkpoint_every=500)),
}


def resolve_plan(value: Any) -> SBIPlan:
    plan = resolve_named(value, PLANS, "plan")
    if not isinstance(plan, SBIPlan):
        raise ProtocolError(f"plan must be an SBIPlan or one of {', '.join(PLANS)}, got {type(plan).__name__}")
    return plan
