"""``physppl.infer_beam``: knife-edge scans in, beam-parameter posteriors out, with calibration checks.

Steps:

1. read and validate the observed scans (or simulate fixed test scans with known parameters);
2. train (or resume) the amortized posterior ``q(theta | x)`` on cached simulations (``posterior.pt``);
3. per observation: optional sequential rounds (truncated proposals), then optional variational focus against
   the likelihood, and posterior draws;
4. ``posterior.nc`` (named parameters, posterior-predictive scans, log-likelihood), plots, and checks of the
   posteriors: C2ST against exact reference draws, error and coverage against the truth (simulated scans),
   SBC of the amortized posterior over prior draws.

The command line (``physppl +experiment=beam_sbi``) calls :func:`task`, which calls :func:`infer_beam`.
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
import xarray as xr
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.guides.beam import KnifeEdgeFlowGuide, knife_edge_flow
from physppl.inference.convert import summarize, to_inference_data
from physppl.inference.fit import Fit
from physppl.inference.npe import AmortizedPosterior, SBIPlan, TruncatedSequentialNPE
from physppl.inference.outputs import write_json
from physppl.inference.refine import ConditionedEstimator, refine, refinement_metrics
from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.models.beam import PARAM_NAMES, PARAM_UNITS, KnifeEdgeBeamModel

from .data import BeamDataSource
from .parts import resolve_plan
from .reference import reference_draws

__all__ = ["infer_beam", "BeamResult", "Evaluation", "task", "train_amortized", "infer_observation", "OUTPUT_FILES"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("posterior.nc", "posterior.pt", "metrics.json", "calibration.json", "summary.csv", "losses.csv",
                "npe_checkpoint.pt")


@dataclass(frozen=True)
class Evaluation:
    """Checks of the posteriors (the command line's ``evaluate.*``).

    reference : exact reference draws per scan (a rejection sampler validated against NUTS; cached) and C2ST
    n_reference, c2st_draws : reference draws per scan, and draws of each sample the C2ST classifier sees
    max_c2st : scans checked by C2ST
    sbc, sbc_draws : prior draws for SBC and coverage of the amortized posterior (0 skips), posterior draws each
    plots : pair and posterior-predictive plots for the first scans
    predictive_draws : posterior-predictive scans per observation in posterior.nc
    """

    reference: bool = True
    n_reference: int = 10_000
    c2st_draws: int = 5000
    max_c2st: int = 10
    sbc: int = 200
    sbc_draws: int = 100
    plots: int = 3
    predictive_draws: int = 200


@dataclass(repr=False)
class BeamResult(Result):
    """:class:`~physppl.inference.runner.Result` of beam inference, with

    Attributes
    ----------
    posterior : AmortizedPosterior
        The amortized posterior (``posterior.pt``): ``posterior.sample(x, n)`` for any new scan.
    draws : Tensor, shape (n_obs, n_draws, 7)
        Posterior draws per scan, in the order of :data:`~physppl.models.beam.PARAM_NAMES`, in mm, counts, mrad.
    calibration : dict
        ``calibration.json``: per-scan diagnostics, C2ST, SBC and coverage.
    """

    posterior: AmortizedPosterior | None = None
    draws: torch.Tensor | None = None
    calibration: dict | None = None


def train_amortized(plan: SBIPlan, make_flow, model: KnifeEdgeBeamModel, theta: torch.Tensor, x: torch.Tensor,
                    workdir: Path | None = None) -> tuple[AmortizedPosterior, dict]:
    """Train the amortized flow by NPE (pairs) or amortized VI (likelihood over the simulated scans)."""
    t0 = time.perf_counter()
    if plan.objective == "npe":
        flow = make_flow(low=model.low, high=model.high, positions=model.positions)
        res = plan.amortized.fit(flow, theta, x, workdir=workdir, name="npe_checkpoint")
        info = {"objective": "npe", "epochs": res.epochs, "steps": res.steps, "best_val_loss": res.best_val_loss,
                "stop_reason": res.stop_reason, "resumed_from": res.resumed_from, "train_losses": res.train_losses,
                "val_losses": res.val_losses}
    else:
        flow = make_flow(low=model.low, high=model.high, positions=model.positions, fast="sampling")
        flow.fit_standardization(theta, x)
        guide = KnifeEdgeFlowGuide(flow)
        res = plan.vi_engine.run(model, guide, {"x": x}, n_data=len(x), workdir=workdir)
        flow.eval()
        info = {"objective": "vi", "steps": res.steps, "final_loss": res.final_loss, "stop_reason": res.stop_reason,
                "resumed_from": res.resumed_from, "train_losses": [], "val_losses": []}
    info["n_simulations"] = int(len(theta))
    info["train_time"] = time.perf_counter() - t0
    return AmortizedPosterior(flow, PARAM_NAMES, {k: v for k, v in info.items() if not k.endswith("losses")}), info


def infer_observation(plan: SBIPlan, posterior: AmortizedPosterior, make_flow, model: KnifeEdgeBeamModel,
                      x_obs: torch.Tensor, n_draws: int, theta: torch.Tensor, x: torch.Tensor, label: str = "obs",
                      workdir: Path | None = None) -> tuple[torch.Tensor, dict]:
    """Posterior draws (n_draws, 7) for one scan: amortized, then rounds and/or variational focus if planned."""
    info: dict = {}
    t0 = time.perf_counter()
    flow = posterior.flow
    if plan.rounds > 1:
        snpe = TruncatedSequentialNPE(lambda lo, hi: make_flow(low=lo, high=hi, positions=model.positions),
                                      plan.amortized, plan.simulations_per_round, plan.rounds,
                                      plan.truncation_quantile, plan.truncation_expand)
        flow, record = snpe.run(x_obs, lambda th: model.simulate(th), model.low, model.high, theta=theta, x=x,
                                flow=flow, workdir=workdir)
        info.update(rounds=plan.rounds, round_simulations=record["simulations"], round_boxes=record["boxes"][-1])
    loglik = lambda th: model.log_likelihood(th, x_obs)  # noqa: E731
    proposals: dict = {}
    if plan.focus is not None:
        init = flow.sample(x_obs, 4000)
        q, res = plan.focus.fit(loglik, model.low, model.high, init, desc=label)
        proposals["variational"] = q
        info.update(focus_pareto_k=res.pareto_k, focus_ess=res.ess_fraction, focus_losses=res.losses)
    if plan.refinement is not None:
        # the focused fit and the amortized flow compete as importance proposals; the diagnostics choose
        proposals["network"] = ConditionedEstimator(flow, x_obs)
        out = refine(proposals, loglik, model.prior(), n_draws, plan.refinement)
        draws = out.draws
        info.update(out.info())
    elif "variational" in proposals:
        draws = proposals["variational"].sample(n_draws)
    else:
        draws = flow.sample(x_obs, n_draws)
    info["time"] = time.perf_counter() - t0
    return draws, info


def _inference_data(model: KnifeEdgeBeamModel, x_obs: torch.Tensor, draws: torch.Tensor, predictive: np.ndarray,
                    truth: np.ndarray | None, log_likelihood: bool):
    """The generic conversion of the per-scan draws (n_obs, n_draws, 7), with the posterior-predictive scans
    (n_obs, m, x_dim) and the true parameters (simulated scans) as extra groups."""
    n_obs = draws.shape[0]
    fit = Fit(model=model, guide=None, data={"x": x_obs},
              draws={name: draws[:, :, i].T[None].contiguous() for i, name in enumerate(PARAM_NAMES)})
    coords = {"obs": np.arange(n_obs), "point": np.arange(x_obs.shape[1])}
    idata = to_inference_data(fit, log_likelihood=log_likelihood, coords=coords, dims={"x": ["obs", "point"]},
                              attrs={"units": ", ".join(f"{k}: {v or 'unitless'}" for k, v in PARAM_UNITS.items())})
    pp = xr.Dataset({"x": (("chain", "draw", "obs", "point"), np.transpose(predictive, (1, 0, 2))[None])},
                    coords={"obs": np.arange(n_obs), "point": np.arange(x_obs.shape[1])})
    groups = {"posterior_predictive": pp}
    if truth is not None:
        groups["constant_data"] = xr.Dataset({f"{name}_true": (("obs",), truth[:, i]) for i, name in enumerate(PARAM_NAMES)},
                                             coords={"obs": np.arange(n_obs)})
    idata.add_groups(groups)
    return idata


def infer_beam(
    scans: str | os.PathLike | BeamDataSource | None = None,
    *,
    model: Callable[..., KnifeEdgeBeamModel] | KnifeEdgeBeamModel = KnifeEdgeBeamModel,
    flow: Callable = knife_edge_flow,
    plan: Any = "npe",
    n_draws: int = 5000,
    log_likelihood: bool = True,
    evaluate: Evaluation | dict = Evaluation(),
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
    **data_options: Any,
) -> BeamResult:
    """Posteriors of the seven beam parameters for each knife-edge scan, by simulation-based inference.

    Parameters
    ----------
    scans : path or BeamDataSource, optional
        Observed scans (``.npy`` of shape (200,) or (n, 200), or ``.csv``); ``None`` simulates ``n_observations``
        fixed test scans from the prior (known truth).
    model : class, factory or KnifeEdgeBeamModel
        The simulator and likelihood (blade ``positions``, ``background``, ``read_noise``, prior ``bounds``).
    flow : factory
        The conditional density estimator, ``flow(low=, high=, positions=[, fast=])``.
    plan : str or SBIPlan
        ``"npe"`` (amortized NPE, then each scan's posterior refitted against the likelihood), ``"npe_amortized"``,
        ``"npe_sequential"`` (truncated sequential rounds per scan), ``"beam_avi"`` (amortized VI), or your plan.
    n_draws : int
        Posterior draws per scan kept in ``posterior.nc``.
    evaluate : Evaluation or dict
        Which checks run (C2ST against exact draws, SBC, plots); see :class:`Evaluation`.
    **data_options
        Options of :class:`~physppl.beam_sbi.data.BeamDataSource` (``n_observations``, ``n_simulations``,
        ``cache_dir``, ...).
    """
    ev = Evaluation(**evaluate) if isinstance(evaluate, dict) else (evaluate or Evaluation())
    source = scans if isinstance(scans, BeamDataSource) else BeamDataSource(observed=scans, **data_options)
    sim = model if isinstance(model, KnifeEdgeBeamModel) else model()
    plan = copy.copy(resolve_plan(plan))
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    with Job("beam_sbi", settings, inputs=[source.observed], workdir=workdir, outputs=OUTPUT_FILES) as job:
        observed = source.load_observed(sim)  # bad scans fail here, before any training
        if plan.amortized.device is None:  # the flow trains on the job's device; the per-scan steps run on the CPU
            plan.amortized = copy.copy(plan.amortized)
            plan.amortized.device = job.device
        log.info("observed: %s; %d simulations for the amortized posterior", observed.source, source.n_simulations)
        theta, x = source.training_set(sim)
        posterior, train_info = train_amortized(plan, flow, sim, theta, x, workdir=workdir)
        metrics: dict = {"n_obs": int(observed.x.shape[0]), "n_simulations": source.n_simulations,
                         "objective": plan.objective, "rounds": plan.rounds, "focus": plan.focus is not None,
                         "flow_device": str(plan.amortized.device),
                         **{k: v for k, v in train_info.items() if not k.endswith("losses")}}
        t_sample = time.perf_counter()
        posterior.sample(observed.x[0], 1000)
        metrics["sample_1000_ms"] = 1000 * (time.perf_counter() - t_sample)

        draws, infos = [], []
        for k in range(observed.x.shape[0]):
            obs_dir = Path(workdir) / f"obs{k}" if (plan.rounds > 1 and workdir is not None) else None
            d, info = infer_observation(plan, posterior, flow, sim, observed.x[k], n_draws, theta, x,
                                        label=f"obs {k}", workdir=obs_dir)
            draws.append(d)
            infos.append(info)
        draws_t = torch.stack(draws)  # (n_obs, n_draws, 7)
        metrics["infer_time"] = float(sum(i["time"] for i in infos))
        if plan.focus is not None:
            # with refinement the refined draws are what the job returns, so their diagnostics decide reliability
            # (a focused fit that failed its check and lost to the network is no warning): a name the check skips
            key = "focus_pareto_k_max" if plan.refinement is None else "focus_pareto_k_worst"
            metrics[key] = float(max(i["focus_pareto_k"] for i in infos))
            metrics["focus_ess_min"] = float(min(i["focus_ess"] for i in infos))
        if plan.refinement is not None:
            refined = refinement_metrics(infos)
            if refined.get("failed_checks"):
                metrics.setdefault("failed_checks", []).extend(refined.pop("failed_checks"))
            metrics.update(refined)
            metrics["refined_with"] = sorted({i["refined_with"] for i in infos})

        with torch.no_grad():
            m = min(int(ev.predictive_draws), n_draws)
            predictive = sim.simulate(draws_t[:, :m]).numpy()
        truth = None if observed.truth is None else observed.truth.numpy()
        idata = _inference_data(sim, observed.x, draws_t, predictive, truth, log_likelihood)
        summary = summarize(idata)
        calibration: dict = {"per_observation": [{k: v for k, v in i.items() if not k.endswith("losses")}
                                                 for i in infos]}
        ref_draws = _reference_checks(ev, source, sim, observed, draws_t, n_draws, plan, posterior, flow, theta, x,
                                      calibration, metrics)
        if truth is not None:
            from physppl.inference.calibration import coverage

            d = draws_t.numpy()
            err = np.abs(d.mean(1) - truth) / d.std(1)  # (n_obs, 7), in posterior sds
            cov = coverage(np.transpose(d, (1, 0, 2)), truth)
            metrics.update({f"z_error_{n}": float(err[:, i].mean()) for i, n in enumerate(PARAM_NAMES)})
            metrics.update({f"abs_error_{n}": float(np.abs(d.mean(1) - truth)[:, i].mean())
                            for i, n in enumerate(PARAM_NAMES)})
            metrics["coverage90_truth"] = float(cov[0.9].mean())
            calibration["truth_coverage"] = {str(lv): dict(zip(PARAM_NAMES, v)) for lv, v in cov.items()}
        sbc = _sbc(posterior, sim, int(ev.sbc), int(ev.sbc_draws), calibration) if int(ev.sbc) > 0 else None
        if sbc is not None:
            metrics.update(sbc["metrics"])
        train, val = train_info["train_losses"], train_info["val_losses"]
        losses = None
        if train:  # NPE: mean -log q(theta | x) per epoch, on training and held-out pairs
            losses = pd.DataFrame({"step": np.arange(1, len(train) + 1), "loss": train,
                                   **({"val_loss": val} if len(val) == len(train) else {})})
        focus_losses = {k: i["focus_losses"] for k, i in enumerate(infos) if "focus_losses" in i}
        files = {"posterior.pt": lambda p: torch.save(posterior, p),
                 "calibration.json": lambda p: write_json(p, calibration)}

        def figures(out: Path) -> None:
            from . import plots  # matplotlib only when figures are drawn

            pos = sim.positions.numpy()
            for k in range(min(int(ev.plots), len(draws))):
                plots.plot_predictive(observed.x[k].numpy(), predictive[k], pos, out / f"predictive_obs{k}.png",
                                      title=f"observation {k}: posterior-predictive scans")
                score = calibration["per_observation"][k].get("c2st")
                plots.plot_pair(draws_t[k].numpy(), PARAM_NAMES, out / f"pair_obs{k}.png",
                                truth=None if truth is None else truth[k], reference=ref_draws.get(k),
                                title=f"observation {k}" + (f", C2ST {score:.3f}" if score is not None else ""))
            if sbc is not None:
                plots.plot_sbc(sbc["ranks"], int(ev.sbc_draws), PARAM_NAMES, out / "sbc_ranks.png", ks_p=sbc["ks_p"])
                plots.plot_coverage(sbc["coverage"], PARAM_NAMES, out / "coverage.png", int(ev.sbc))
                plots.plot_expected_coverage(sbc["hpd"]["levels"], sbc["hpd"]["empirical"], int(ev.sbc),
                                             out / "expected_coverage.png")
            plots.plot_training(train, val, out / "training.png", focus_losses or None)

        # training.png holds the loss curves (NPE per epoch, held out, and each focused fit): no generic loss.png
        return job.result(BeamResult, idata=idata, metrics=metrics, losses=losses, summary=summary, files=files,
                          figures=figures, plot_losses=False, posterior=posterior, draws=draws_t,
                          calibration=calibration)


def _reference_checks(ev: Evaluation, source, sim, observed, draws_t, n_draws, plan, posterior, flow, theta, x,
                      calibration: dict, metrics: dict) -> dict[int, np.ndarray]:
    """C2ST of each checked scan's draws against exact reference draws; returns the reference draws by scan."""
    from physppl.inference.calibration import c2st  # scipy and scikit-learn: imported when the checks run
    ref_draws: dict[int, np.ndarray] = {}
    if not ev.reference:
        return ref_draws
    cache_dir = source.cache.directory if source.cache.enabled else None
    scores, ref_times = [], []
    for k in range(min(int(ev.max_c2st), len(draws_t))):
        t0 = time.perf_counter()
        try:
            ref, _ = reference_draws(sim, observed.x[k], int(ev.n_reference), cache_dir=cache_dir)
        except RuntimeError as err:  # the rejection sampler's acceptance can collapse at a face of the box
            log.warning("observation %d: no exact reference draws (%s); C2ST skipped for it", k, err)
            calibration["per_observation"][k]["reference_error"] = str(err)
            continue
        ref_times.append(time.perf_counter() - t0)
        ref_draws[k] = ref
        n_c = min(int(ev.c2st_draws), len(ref))
        ours = draws_t[k].numpy() if n_draws >= n_c else infer_observation(
            plan, posterior, flow, sim, observed.x[k], n_c, theta, x)[0].numpy()
        scores.append(c2st(ref[:n_c], ours[:n_c], max_iter=300))
        mean_err = np.abs(ours.mean(0) - ref.mean(0)) / ref.std(0)
        calibration["per_observation"][k].update(c2st=scores[-1], mean_error_ref_sd=dict(zip(PARAM_NAMES, mean_err)),
                                                 sd_ratio=dict(zip(PARAM_NAMES, ours.std(0) / ref.std(0))))
        log.info("observation %d: C2ST against exact reference draws %.3f", k, scores[-1])
    if scores:
        metrics.update(c2st_mean=float(np.mean(scores)), c2st_max=float(np.max(scores)),
                       c2st_min=float(np.min(scores)), c2st_n=len(scores), reference_time=float(sum(ref_times)))
    return ref_draws


def _sbc(posterior: AmortizedPosterior, model: KnifeEdgeBeamModel, n: int, n_draws: int, calibration: dict) -> dict:
    """SBC and coverage of the amortized posterior over ``n`` prior draws (their own seed, not the training set's)."""
    from physppl.inference.calibration import coverage, expected_coverage, rank_uniformity, sbc_ranks
    gen = torch.Generator().manual_seed(987_654)
    theta = model.sample_prior(n, gen)
    x = model.simulate(theta, gen)
    t0 = time.perf_counter()
    ranks = sbc_ranks(theta, x, lambda xb, m: posterior.flow.sample(xb, m), n_draws=n_draws)
    tests = rank_uniformity(ranks, n_draws)
    with torch.no_grad():
        d = torch.cat([posterior.flow.sample(x[s:s + 100], 200) for s in range(0, n, 100)], dim=1)
    cov = coverage(d, theta)
    flow = posterior.flow
    hpd = expected_coverage(theta, x, lambda xb, m: flow.sample_and_log_prob(xb, m),
                            lambda tb, xb: flow.log_prob(tb, xb), n_draws=n_draws)
    calibration["sbc"] = {"n": n, "n_draws": n_draws, "ks_p": dict(zip(PARAM_NAMES, tests["ks_p"])),
                          "chi2_p": dict(zip(PARAM_NAMES, tests["chi2_p"])), "time": time.perf_counter() - t0,
                          "expected_coverage": {"levels": hpd["levels"].tolist(), "empirical": hpd["empirical"].tolist()}}
    calibration["sbc_coverage"] = {str(lv): dict(zip(PARAM_NAMES, v)) for lv, v in cov.items()}
    return {"ranks": ranks, "ks_p": tests["ks_p"], "coverage": cov, "hpd": hpd,
            "metrics": {"sbc_ks_p_min": float(tests["ks_p"].min()), "sbc_coverage90_mean": float(cov[0.9].mean()),
                        "hpd_coverage_error_max": float(np.abs(hpd["empirical"] - hpd["levels"]).max())}}


def task(cfg: DictConfig, workdir: str | os.PathLike) -> BeamResult:
    """The command line's beam job: :func:`infer_beam` with the configuration's values."""
    return infer_beam(instantiate(cfg.data), model=instantiate(cfg.model), flow=instantiate(cfg.guide),
                      plan=instantiate(cfg.inference), workdir=workdir,
                      **config_options(cfg, infer_beam, exclude=("model", "flow", "plan")))
