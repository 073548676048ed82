"""Named estimators and plans of :func:`physppl.infer_sbi`, each defined once (Python and command line)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from physppl.inference.estimators import build_estimator
from physppl.inference.fit import ProtocolError
from physppl.inference.npe import NPETrainer, VariationalFocus
from physppl.inference.presets import Preset, resolve_named
from physppl.inference.refine import ImportanceRefinement

__all__ = ["PosteriorPlan", "PLANS", "ESTIMATORS", "TRAINER", "resolve_plan"]


@dataclass
class PosteriorPlan:
    """How :func:`physppl.infer_sbi` gets each observation's posterior.

    Attributes
    ----------
    trainer : NPETrainer
        Trains the amortized estimator on prior simulations (and every APT round).
    rounds : int
        1: amortized only; > 1: that many APT rounds per observation (the first is the amortized training).
    simulations_per_round : int
        Simulations from the current posterior in each later round.
    num_atoms : int
        Atoms of APT's loss.
    refinement : ImportanceRefinement, optional
        With a tractable likelihood: importance sampling with the network's posterior as the proposal,
        diagnosed by Pareto k and ESS (None: the network's draws are the answer).
    focus : VariationalFocus, optional
        A per-observation variational fit (box priors), offered to the refinement as a further proposal; the
        better diagnosed one is used.
    ensemble : int
        Estimators trained from different initialisations and joined into their mixture (1: one network; APT
        rounds train one network, so ``rounds > 1`` needs 1).
    """

    trainer: NPETrainer
    rounds: int = 1
    simulations_per_round: int = 1000
    num_atoms: int = 10
    refinement: ImportanceRefinement | None = None
    focus: VariationalFocus | None = None
    ensemble: int = 1

    def __post_init__(self):
        if int(self.rounds) < 1:
            raise ValueError(f"PosteriorPlan: rounds must be >= 1, got {self.rounds}")
        if int(self.ensemble) < 1:
            raise ValueError(f"PosteriorPlan: ensemble must be >= 1, got {self.ensemble}")
        if int(self.ensemble) > 1 and int(self.rounds) > 1:
            raise ValueError("PosteriorPlan: APT rounds (rounds > 1) retrain one network; use ensemble=1 with them")
        self.rounds, self.ensemble = int(self.rounds), int(self.ensemble)


# measured on two_moons and slcp at 10^3-10^5 simulations (experiments/benchmarks/sbibm.py): sbi's own training
# settings (lr 5e-4, batches of 200, stop 20 epochs after the best held-out loss) with no epoch cap
TRAINER = Preset(NPETrainer, lr=5e-4, batch_size=200, max_epochs=2000, patience=20, validation_fraction=0.1,
                 clip_norm=5.0)
REFINE = Preset(ImportanceRefinement, n_proposal=20_000, defensive=0.05, mcmc_steps=20)

PLANS: dict[str, Preset] = {
    "npe": Preset(PosteriorPlan, trainer=TRAINER, refinement=REFINE),       # amortized, refined where possible
    "npe_amortized": Preset(PosteriorPlan, trainer=TRAINER),                # the network's draws only
    # the best amortized posterior: 5 networks' mixture (sbibm's slcp at 10^4 simulations: C2ST 0.820 against 0.864
    # for one network and 0.848 for sbi's NSF, at 5x the training)
    "npe_ensemble": Preset(PosteriorPlan, trainer=TRAINER, ensemble=5),
    "apt": Preset(PosteriorPlan, trainer=TRAINER, rounds=4, refinement=REFINE),
    "apt_only": Preset(PosteriorPlan, trainer=TRAINER, rounds=4),           # rounds, no likelihood used
}

ESTIMATORS: dict[str, Preset] = {
    # zuko's NSF: 5 transforms of 2 x 64 units, 8 bins (sbi's default shape); on a box prior, z-scored parameters
    # with rejection (two_moons, 10^3 simulations, observations 1-10: C2ST 0.661 against 0.695 on the logit)
    "nsf": Preset(build_estimator, partial=True, exclude=("prior", "x_dim"), kind="nsf", box="truncate"),
    "maf": Preset(build_estimator, partial=True, exclude=("prior", "x_dim"), kind="maf", box="truncate"),
    # the seed talk's conditional invertible network: 8 coupling blocks of 256 units, on the logit of a box (its
    # draws stay inside the prior's support by construction, as in the talk)
    "cinn": Preset(build_estimator, partial=True, exclude=("prior", "x_dim"), kind="cinn", transforms=8,
                   hidden=(256,)),
}


def resolve_plan(value: Any) -> PosteriorPlan:
    plan = resolve_named(value, PLANS, "plan")
    if not isinstance(plan, PosteriorPlan):
        raise ProtocolError(f"plan must be a PosteriorPlan or one of {', '.join(PLANS)}, got {type(plan).__name__}")
    return plan
