"""``physppl.infer_sbi``: any simulator and prior in, calibrated posteriors out.

Steps:

1. check the simulator against its protocol (:mod:`.simulators`) and read the observations (or simulate test
   observations with known parameters);
2. simulate the training set from the prior and train the amortized posterior ``q(theta | x)`` (NSF, MAF or the
   cINN; checkpoints and resume);
3. per observation: optional APT rounds, then, with a tractable likelihood, importance refinement with the
   network's posterior (and optionally a variational fit) as the proposal, diagnosed by Pareto k;
4. calibration of the amortized posterior over fresh prior draws: SBC ranks with a uniformity test per
   parameter, marginal coverage and the expected coverage of highest-density regions; C2ST against exact
   reference draws where the simulator has them; coverage of the truth for simulated observations;
5. ``posterior.nc`` (named parameters, ``obs`` dim, the observations, pointwise log-likelihood), ``posterior.pt``,
   ``metrics.json``, ``calibration.json``, ``summary.csv``, ``losses.csv`` and figures.

The command line (``physppl +experiment=sbi model._target_=mylab.MySimulator``) calls :func:`task`.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.inference.apt import SequentialAPT
from physppl.inference.convert import summarize
from physppl.inference.npe import fit_ensemble
from physppl.inference.outputs import write_json
from physppl.inference.refine import ConditionedEstimator, refine, refinement_metrics
from physppl.inference.runner import Job, JobSettings, Result, config_options

from .parts import ESTIMATORS, PosteriorPlan, resolve_plan
from .simulators import Simulator, as_simulator

__all__ = ["infer_sbi", "SBIResult", "Calibration", "task", "OUTPUT_FILES"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("posterior.nc", "posterior.pt", "metrics.json", "calibration.json", "summary.csv", "losses.csv",
                "npe_checkpoint.pt")

SBC_KS_LIMIT = 0.01  # an SBC rank test below this p-value flags the parameter as miscalibrated


@dataclass(frozen=True)
class Calibration:
    """Checks of the posteriors (the command line's ``evaluate.*``).

    sbc : prior draws for SBC and coverage of the amortized posterior (0 skips); sbc_draws: posterior draws each
    reference : C2ST against ``simulator.reference_posterior`` where it exists; c2st_draws: draws per sample
    plots : pair plots for the first observations
    """

    sbc: int = 500
    sbc_draws: int = 100
    reference: bool = True
    c2st_draws: int = 5000
    plots: int = 3


@dataclass(repr=False)
class SBIResult(Result):
    """:class:`~physppl.inference.runner.Result` of :func:`infer_sbi`, with

    posterior : PosteriorEstimator, the amortized posterior (``posterior.pt``): ``posterior.sample(x, n)``
    draws : Tensor (n_obs, n_draws, D), each observation's final draws in the prior's units
    calibration : dict, ``calibration.json``
    """

    posterior: Any = None
    draws: torch.Tensor | None = None
    calibration: dict | None = None


def _observations(observed, sim: Simulator, n_observations: int, gen: torch.Generator):
    """(x (n, x_dim), truth (n, D) or None, label) from an array, a file or simulated test observations."""
    if observed is None:
        truth = sim.prior.sample(int(n_observations), generator=gen)
        return sim.simulate(truth), truth, f"{n_observations} simulated observations"
    label = "observed"
    if isinstance(observed, (str, os.PathLike)):
        path = Path(observed)
        if not path.exists():
            raise FileNotFoundError(f"observed: {path} does not exist")
        label = str(path)
        if path.suffix == ".npy":
            observed = np.load(path)
        elif path.suffix in (".csv", ".txt"):
            observed = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
        else:
            raise ValueError(f"observed: {path}: expected a .npy or .csv file of shape (x_dim,) or (n, x_dim)")
    x = torch.as_tensor(np.asarray(observed, dtype=float), dtype=torch.get_default_dtype())
    if x.numel() == sim.x_dim:
        x = x.reshape(1, sim.x_dim)
    elif x.dim() >= 2 and x[0].numel() == sim.x_dim:
        x = x.reshape(len(x), sim.x_dim)
    else:
        raise ValueError(f"observed: {label}: shape {tuple(x.shape)}, but the simulator makes observations of shape "
                         f"{sim.x_shape} ({sim.x_dim} values); give one observation or a stack (n, {sim.x_dim})")
    bad = ~torch.isfinite(x)
    if bad.any():
        row, col = [int(v) for v in bad.nonzero()[0]]
        raise ValueError(f"observed: {label}: observation {row}, value {col} is {x[row, col].item()}; the data must "
                         "be finite")
    return x, None, label


def _training_set(sim: Simulator, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    theta = sim.prior.sample(int(n), generator=gen)
    x = sim.simulate(theta)
    finite = torch.isfinite(x).all(-1)
    dropped = int((~finite).sum())
    if dropped > 0.1 * n:
        raise ValueError(f"simulator: {dropped} of {n} simulations are NaN or infinite; check the simulator over the "
                         "prior's range")
    if dropped:
        log.warning("simulator: %d of %d simulations are not finite and are left out of training", dropped, n)
    return theta[finite], x[finite], dropped


def _refine_observation(plan: PosteriorPlan, sim: Simulator, estimator, x_obs: torch.Tensor, n_draws: int,
                        label: str) -> tuple[torch.Tensor, dict]:
    proposals: dict = {"network": ConditionedEstimator(estimator, x_obs)}
    info: dict = {}
    loglik = lambda th: sim.log_likelihood(th, x_obs)  # noqa: E731
    if plan.focus is not None:
        if sim.prior.low is None:
            log.warning("%s: the variational focus needs a box prior; skipped", label)
        else:
            init = estimator.sample(x_obs, 4000)
            q, res = plan.focus.fit(loglik, sim.prior.low, sim.prior.high, init, desc=label)
            proposals["variational"] = q
            info["focus_pareto_k"] = res.pareto_k
    out = refine(proposals, loglik, sim.prior, n_draws, plan.refinement)
    info.update(out.info())
    return out.draws, info


def _sbc(estimator, sim: Simulator, n: int, n_draws: int, seed: int) -> dict:
    """SBC ranks, marginal coverage and HPD expected coverage of the amortized posterior over fresh prior draws."""
    from physppl.inference.calibration import coverage, expected_coverage, rank_uniformity, sbc_ranks

    gen = torch.Generator().manual_seed(seed + 7919)
    theta = sim.prior.sample(n, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 7919)
        x = sim.simulate(theta)
        keep = torch.isfinite(x).all(-1)
        theta, x = theta[keep], x[keep]
        t0 = time.perf_counter()
        ranks = sbc_ranks(theta, x, lambda xb, m: estimator.sample(xb, m), n_draws=n_draws)
        tests = rank_uniformity(ranks, n_draws)
        d = torch.cat([estimator.sample(x[s:s + 100], 200) for s in range(0, len(x), 100)], dim=1)
        cov = coverage(d, theta)
        hpd = expected_coverage(theta, x, lambda xb, m: estimator.sample_and_log_prob(xb, m),
                                lambda tb, xb: estimator.log_prob(tb, xb), n_draws=n_draws)
    names = sim.names
    return {"ranks": ranks, "ks_p": tests["ks_p"], "coverage": cov, "hpd": hpd, "time": time.perf_counter() - t0,
            "json": {"n": int(len(theta)), "n_draws": n_draws, "ks_p": dict(zip(names, tests["ks_p"])),
                     "chi2_p": dict(zip(names, tests["chi2_p"])),
                     "marginal_coverage": {str(lv): dict(zip(names, v)) for lv, v in cov.items()},
                     "expected_coverage": {"levels": hpd["levels"].tolist(), "empirical": hpd["empirical"].tolist()}}}


def _inference_data(sim: Simulator, x_obs: torch.Tensor, draws: torch.Tensor, truth: torch.Tensor | None):
    """posterior (chain 1, draw, obs) per parameter in the prior's units, observed data, the log-likelihood of
    each observation as a whole (its values need not be independent) and the true parameters."""
    import arviz as az
    import xarray as xr

    n_obs = x_obs.shape[0]
    safe = [n.replace("[", "_").replace("]", "") for n in sim.names]
    obs = {"obs": np.arange(n_obs)}
    idata = az.from_dict(posterior={n: draws[:, :, i].T.numpy()[None] for i, n in enumerate(safe)},
                         observed_data={"x": x_obs.numpy()},
                         coords={**obs, "point": np.arange(sim.x_dim)},
                         dims={**{n: ["obs"] for n in safe}, "x": ["obs", "point"]})
    groups = {}
    if sim.has_likelihood:
        with torch.no_grad():
            ll = torch.stack([sim.log_likelihood(draws[k], x_obs[k]) for k in range(n_obs)], -1)  # (draw, obs)
        groups["log_likelihood"] = xr.Dataset({"x": (("chain", "draw", "obs"), ll.double().numpy()[None])}, coords=obs)
    if truth is not None:
        groups["constant_data"] = xr.Dataset({f"{n}_true": (("obs",), truth[:, i].numpy()) for i, n in enumerate(safe)},
                                             coords=obs)
    if groups:
        idata.add_groups(groups)
    idata.posterior.attrs["parameter_names"] = ", ".join(sim.names)
    return idata


def infer_sbi(
    simulator: Any,
    observed: Any = None,
    *,
    prior: Any = None,
    estimator: Callable | str = "nsf",
    plan: Any = "npe",
    n_simulations: int = 10_000,
    n_observations: int = 5,
    n_draws: int = 5000,
    evaluate: Calibration | dict = Calibration(),
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
) -> SBIResult:
    """Posteriors of a simulator's parameters for each observation, by simulation-based inference.

    Parameters
    ----------
    simulator : object or callable
        Meets the protocol of :mod:`physppl.simulation_inference.simulators` (``prior``, ``simulate(theta)``,
        optionally ``log_likelihood(theta, x_o)`` and ``reference_posterior(x_o, n)``), or is a function
        ``simulate(theta)`` with ``prior=`` given.
    observed : array, path or None
        One observation or a stack (n, ...), a ``.npy`` or ``.csv`` file; None simulates ``n_observations`` test
        observations from the prior (known truth).
    prior : distribution, dict or list, optional
        Overrides ``simulator.prior``: any torch or Pyro distribution with a support, or a product of them.
    estimator : str or factory
        ``"nsf"`` (zuko's neural spline flow), ``"maf"``, ``"cinn"`` (conditional invertible network), or a factory
        ``estimator(prior=, x_dim=)`` returning a :class:`~physppl.inference.estimators.PosteriorEstimator`.
    plan : str or PosteriorPlan
        ``"npe"`` (amortized, then importance refinement where the likelihood is tractable), ``"npe_amortized"``,
        ``"npe_ensemble"`` (the mixture of 5 networks, amortized only), ``"apt"`` (4 APT rounds per observation,
        then refinement), ``"apt_only"``, or your plan.
    n_simulations : int
        Prior simulations for the amortized posterior.
    n_draws : int
        Posterior draws per observation kept in ``posterior.nc``.
    evaluate : Calibration or dict
        SBC, coverage and C2ST settings.
    """
    ev = Calibration(**evaluate) if isinstance(evaluate, dict) else (evaluate or Calibration())
    plan = copy.copy(resolve_plan(plan))
    make = ESTIMATORS[estimator].build() if isinstance(estimator, str) and estimator in ESTIMATORS else estimator
    if isinstance(make, str):
        raise ValueError(f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)} or pass a factory")
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    inputs = [observed] if isinstance(observed, (str, os.PathLike)) else []
    with Job("sbi", settings, inputs=inputs, workdir=workdir, outputs=OUTPUT_FILES) as job:
        sim = as_simulator(simulator, prior)  # protocol errors before any simulation
        gen = torch.Generator().manual_seed(job.seed)
        x_obs, truth, label = _observations(observed, sim, n_observations, torch.Generator().manual_seed(job.seed + 1))
        if job.device.type != "cpu":
            # the prior's distributions and bijections hold CPU tensors (torch distributions have no .to()):
            # the estimator trains where they are
            log.info("simulation-based inference trains on the CPU; device=%s is not used by it", job.device)
        t0 = time.perf_counter()
        theta, x, dropped = _training_set(sim, n_simulations, gen)
        sim_time = time.perf_counter() - t0
        log.info("%s; %d simulations (%.1f s); prior %s", label, len(theta), sim_time, sim.prior.describe())
        if plan.ensemble > 1:
            est, results = fit_ensemble(plan.trainer, lambda: make(prior=sim.prior, x_dim=sim.x_dim), theta, x,
                                        plan.ensemble, seed=job.seed, workdir=workdir)
        else:
            est = make(prior=sim.prior, x_dim=sim.x_dim)
            results = [plan.trainer.fit(est, theta, x, workdir=workdir, name="npe_checkpoint")]
        res = results[0]
        stops = sorted({r.stop_reason for r in results})
        metrics: dict = {"n_obs": int(x_obs.shape[0]), "n_simulations": int(n_simulations),
                         "simulations_dropped": dropped, "simulation_time": sim_time, "estimator": est.kind,
                         "rounds": plan.rounds, "ensemble": plan.ensemble, "likelihood": sim.has_likelihood,
                         "refinement": plan.refinement is not None and sim.has_likelihood,
                         "train_time": float(sum(r.wall_time for r in results)),
                         "epochs": int(sum(r.epochs for r in results)),
                         "best_val_loss": float(np.mean([r.best_val_loss for r in results])),
                         "stop_reason": "; ".join(stops), "converged": all("budget" not in r for r in stops)}
        if plan.ensemble > 1:
            metrics.update(member_epochs=[r.epochs for r in results],
                           member_best_val_loss=[r.best_val_loss for r in results])
        failed: list[str] = []
        draws, infos = [], []
        for k in range(x_obs.shape[0]):
            t1 = time.perf_counter()
            info: dict = {}
            net = est
            if plan.rounds > 1:
                net = copy.deepcopy(est)
                apt = SequentialAPT(plan.trainer, rounds=plan.rounds, simulations_per_round=plan.simulations_per_round,
                                    num_atoms=plan.num_atoms, seed=job.seed + k)
                net, record = apt.run(net, sim.prior, sim.simulate, x_obs[k], theta=theta, x=x, trained=True,
                                      workdir=None if workdir is None else Path(workdir) / f"obs{k}")
                info.update(apt_simulations=record.simulations[-1], apt_change=record.change,
                            apt_val_loss=record.val_loss, apt_stalled_at=record.stalled_at)
                if record.note:
                    info["apt_note"] = record.note
            if plan.refinement is not None and sim.has_likelihood:
                d, rinfo = _refine_observation(plan, sim, net, x_obs[k], n_draws, f"observation {k}")
                info.update(rinfo)
            else:
                d = net.sample(x_obs[k], n_draws)
            info["time"] = time.perf_counter() - t1
            draws.append(d)
            infos.append(info)
        draws_t = torch.stack(draws)
        metrics["infer_time"] = float(sum(i["time"] for i in infos))
        if plan.refinement is not None and sim.has_likelihood:
            refined = refinement_metrics(infos)
            failed.extend(refined.pop("failed_checks", []))
            metrics.update(refined)
        calibration: dict = {"per_observation": infos}
        ref_draws = _reference_c2st(ev, sim, x_obs, draws_t, calibration, metrics, job.seed)
        if truth is not None:
            from physppl.inference.calibration import coverage

            cov = coverage(draws_t.transpose(0, 1), truth)
            metrics["coverage90_truth"] = float(cov[0.9].mean())
            calibration["truth_coverage"] = {str(lv): dict(zip(sim.names, v)) for lv, v in cov.items()}
        sbc = _sbc(est, sim, int(ev.sbc), int(ev.sbc_draws), job.seed) if int(ev.sbc) > 0 else None
        if sbc is not None:
            calibration["sbc"] = sbc["json"]
            metrics.update(sbc_ks_p_min=float(sbc["ks_p"].min()), sbc_coverage90_mean=float(sbc["coverage"][0.9].mean()),
                           hpd_coverage_error_max=float(np.abs(sbc["hpd"]["empirical"] - sbc["hpd"]["levels"]).max()),
                           sbc_time=sbc["time"])
            bad = [n for n, p in zip(sim.names, sbc["ks_p"]) if p < SBC_KS_LIMIT]
            if bad:
                failed.append(f"sbc_miscalibrated: the amortized posterior's SBC ranks are not uniform for "
                              f"{', '.join(bad)} (KS p < {SBC_KS_LIMIT}); do not trust its draws without refinement")
        if failed:
            metrics["failed_checks"] = failed
        idata = _inference_data(sim, x_obs, draws_t, truth)
        summary = summarize(idata)
        # one row per epoch (and member of an ensemble)
        losses = pd.concat([pd.DataFrame({"member": m, "step": np.arange(1, len(r.train_losses) + 1),
                                          "loss": r.train_losses, "val_loss": r.val_losses})
                            for m, r in enumerate(results) if r.train_losses]) if res.train_losses else None
        if losses is not None and plan.ensemble == 1:
            losses = losses.drop(columns="member")
        files = {"posterior.pt": lambda p: torch.save(est, p),
                 "calibration.json": lambda p: write_json(p, calibration)}

        def figures(out: Path) -> None:
            from physppl.inference import plots

            for k in range(min(int(ev.plots), len(draws_t))):
                plots.plot_pair(draws_t[k].numpy(), sim.names, out / f"pair_obs{k}.png",
                                truth=None if truth is None else truth[k].numpy(), reference=ref_draws.get(k),
                                title=f"observation {k}")
            if sbc is not None:
                plots.plot_sbc(sbc["ranks"], int(ev.sbc_draws), sim.names, out / "sbc_ranks.png", ks_p=sbc["ks_p"])
                plots.plot_coverage(sbc["coverage"], sim.names, out / "coverage.png", int(ev.sbc))
                plots.plot_expected_coverage(sbc["hpd"]["levels"], sbc["hpd"]["empirical"], len(sbc["ranks"]),
                                             out / "expected_coverage.png")

        return job.result(SBIResult, idata=idata, metrics=metrics, losses=losses, summary=summary, files=files,
                          figures=figures, loss_label="-log q(theta | x) per epoch", posterior=est, draws=draws_t,
                          calibration=calibration)


def _reference_c2st(ev: Calibration, sim: Simulator, x_obs, draws_t, calibration: dict, metrics: dict,
                    seed: int) -> dict[int, np.ndarray]:
    if not ev.reference or sim.reference_fn is None:
        return {}
    from physppl.inference.calibration import c2st

    scores, refs = [], {}
    n = min(int(ev.c2st_draws), draws_t.shape[1])
    for k in range(x_obs.shape[0]):
        ref = sim.reference_fn(x_obs[k].reshape(sim.x_shape), n, torch.Generator().manual_seed(seed + 100 + k))
        refs[k] = np.asarray(ref, dtype=float)
        scores.append(c2st(refs[k][:n], draws_t[k, :n].numpy()))
        calibration["per_observation"][k]["c2st"] = scores[-1]
    metrics.update(c2st_mean=float(np.mean(scores)), c2st_max=float(np.max(scores)))
    return refs


def task(cfg: DictConfig, workdir: str | os.PathLike) -> SBIResult:
    """The command line's job: :func:`infer_sbi` with the configuration's values."""
    return infer_sbi(instantiate(cfg.model), cfg.get("observed"),
                     prior=None if cfg.get("prior") is None else instantiate(cfg.prior),
                     estimator=instantiate(cfg.guide), plan=instantiate(cfg.inference), workdir=workdir,
                     **config_options(cfg, infer_sbi, exclude=("simulator", "observed", "prior", "estimator", "plan")))
