"""The beam job: scans in, beam-parameter posteriors out, with calibration checks.

Called by the ``physppl`` app as ``run(cfg, output_dir)``; returns the headline metrics. Steps:

1. read and validate the observed scans (or simulate fixed test scans with known parameters);
2. train (or resume) the amortized posterior ``q(theta | x)`` on cached simulations, save it as ``posterior.pt``;
3. per observation: optional sequential rounds (truncated proposals), then optional variational focus against
   the likelihood, and posterior draws;
4. write ``posterior.nc`` (named parameters, posterior-predictive scans, log-likelihood), plots, and check the
   posteriors: C2ST against exact reference draws, error and coverage against the truth (simulated scans),
   SBC of the amortized posterior over prior draws.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyro
import torch
import xarray as xr
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from physppl.guides.beam import KnifeEdgeFlowGuide
from physppl.inference.calibration import c2st, coverage, rank_uniformity, sbc_ranks
from physppl.inference.convert import draws_to_inference_data
from physppl.inference.npe import AmortizedPosterior, SBIPlan, TruncatedSequentialNPE
from physppl.inference.outputs import atomic_write, protect_inputs, write_json, write_losses
from physppl.models.beam import PARAM_NAMES, KnifeEdgeBeamModel

from . import plots
from .data import BeamDataSource
from .reference import reference_draws

__all__ = ["run", "train_amortized", "infer_observation", "DEFAULT_EVALUATE", "OUTPUT_FILES"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("posterior.nc", "posterior.pt", "metrics.json", "calibration.json", "summary.csv", "losses.csv")
DEFAULT_EVALUATE = {"reference": True, "n_reference": 10_000, "c2st_draws": 5000, "max_c2st": 10, "sbc": 200,
                    "sbc_draws": 100, "plots": 3, "predictive_draws": 200}


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
        pyro.clear_param_store()
        res = plan.vi_engine.run(model, guide, n_data=len(x), workdir=workdir, x=x)
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
    if plan.focus is not None:
        init = flow.sample(x_obs, 4000)
        q, res = plan.focus.fit(lambda th: model.log_likelihood(th, x_obs), model.low, model.high, init, desc=label)
        draws = q.sample(n_draws)
        info.update(focus_pareto_k=res.pareto_k, focus_ess=res.ess_fraction, focus_losses=res.losses)
    else:
        draws = flow.sample(x_obs, n_draws)
    info["time"] = time.perf_counter() - t0
    return draws, info


def _inference_data(draws: np.ndarray, x_obs: np.ndarray, loglik: np.ndarray, predictive: np.ndarray,
                    truth: np.ndarray | None):
    """draws (n_obs, n_draws, 7); x_obs (n_obs, x_dim); loglik (n_obs, n_draws); predictive (n_obs, m, x_dim)."""
    n_obs = draws.shape[0]
    several = n_obs > 1
    post = {name: (draws[:, :, i].T[None] if several else draws[0, :, i][None]) for i, name in enumerate(PARAM_NAMES)}
    dims = {name: (["obs"] if several else []) for name in PARAM_NAMES}
    dims["x"] = ["obs"] if several else []
    loglik_arr = loglik.T[None] if several else loglik[0][None]
    idata = draws_to_inference_data(post, dims, log_likelihood={"x": loglik_arr}, coords={"obs": np.arange(n_obs)})
    if not several:
        idata.log_likelihood["x"] = idata.log_likelihood["x"].expand_dims(obs=1, axis=-1)
    obs_ds = xr.Dataset({"x": (("obs", "point"), x_obs)}, coords={"obs": np.arange(n_obs), "point": np.arange(x_obs.shape[1])})
    pp = xr.Dataset({"x": (("chain", "draw", "obs", "point"), np.transpose(predictive, (1, 0, 2))[None])},
                    coords={"obs": np.arange(n_obs), "point": np.arange(x_obs.shape[1])})
    groups = {"observed_data": obs_ds, "posterior_predictive": pp}
    if truth is not None:
        groups["constant_data"] = xr.Dataset({f"{name}_true": (("obs",), truth[:, i]) for i, name in enumerate(PARAM_NAMES)},
                                             coords={"obs": np.arange(n_obs)})
    idata.add_groups(groups)
    return idata


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    """The beam job; writes posterior.nc, posterior.pt, calibration.json, summary.csv and plots into output_dir."""
    out = Path(output_dir)
    evaluate = {**DEFAULT_EVALUATE, **OmegaConf.to_container(cfg.get("evaluate") or {}, resolve=True)}
    model: KnifeEdgeBeamModel = instantiate(cfg.model)
    source: BeamDataSource = instantiate(cfg.data)
    observed = source.load_observed(model)  # bad scans fail here, before any training
    protect = protect_inputs(source.observed)
    for name in OUTPUT_FILES:
        if (out / name).resolve() in protect:
            raise ValueError(f"refusing to overwrite the input file {out / name}: choose another hydra.run.dir")
    plan: SBIPlan = instantiate(cfg.inference)
    make_flow = instantiate(cfg.guide)
    n_draws = int(cfg.get("n_draws", 1000))
    log.info("observed: %s; %d simulations for the amortized posterior", observed.source, source.n_simulations)

    theta, x = source.training_set(model)
    posterior, train_info = train_amortized(plan, make_flow, model, theta, x, workdir=out)
    posterior.save(out / "posterior.pt")
    metrics: dict = {"n_obs": int(observed.x.shape[0]), "n_simulations": source.n_simulations,
                     "objective": plan.objective, "rounds": plan.rounds, "focus": plan.focus is not None,
                     # where the amortized flow trained; the per-scan steps run on the CPU
                     "device": str(getattr(plan.amortized, "device", None) or "cpu"),
                     **{k: v for k, v in train_info.items() if not k.endswith("losses")}}
    t_sample = time.perf_counter()
    posterior.sample(observed.x[0], 1000)
    metrics["sample_1000_ms"] = 1000 * (time.perf_counter() - t_sample)

    draws, infos = [], []
    for k in range(observed.x.shape[0]):
        d, info = infer_observation(plan, posterior, make_flow, model, observed.x[k], n_draws, theta, x,
                                    label=f"obs {k}", workdir=out / f"obs{k}" if plan.rounds > 1 else None)
        draws.append(d)
        infos.append(info)
    draws_t = torch.stack(draws)  # (n_obs, n_draws, 7)
    metrics["infer_time"] = float(sum(i["time"] for i in infos))
    if plan.focus is not None:
        metrics["focus_pareto_k_max"] = float(max(i["focus_pareto_k"] for i in infos))
        metrics["focus_ess_min"] = float(min(i["focus_ess"] for i in infos))

    with torch.no_grad():
        loglik = model.log_likelihood(draws_t, observed.x.unsqueeze(1)).numpy()
        m = min(int(evaluate["predictive_draws"]), n_draws)
        predictive = model.simulate(draws_t[:, :m]).numpy()
    truth = None if observed.truth is None else observed.truth.numpy()
    idata = _inference_data(draws_t.numpy(), observed.x.numpy(), loglik, predictive, truth)
    atomic_write(out / "posterior.nc", lambda p: idata.to_netcdf(str(p), engine="h5netcdf"), protect=protect)
    summary = _summary(draws_t.numpy())
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False), protect=protect)
    print(summary.head(2 * len(PARAM_NAMES)).to_string(index=False))

    calibration: dict = {"per_observation": [{k: v for k, v in i.items() if not k.endswith("losses")} for i in infos]}
    pos = model.positions.numpy()
    for k in range(min(int(evaluate["plots"]), len(draws))):
        plots.plot_predictive(observed.x[k].numpy(), predictive[k], pos, out / f"predictive_obs{k}.png",
                              title=f"observation {k}: posterior-predictive scans")
    ref_draws = {}
    if evaluate["reference"]:
        cache_dir = source.cache.directory if source.cache.enabled else None
        scores, ref_times = [], []
        for k in range(min(int(evaluate["max_c2st"]), len(draws))):
            t0 = time.perf_counter()
            try:
                ref, rinfo = reference_draws(model, observed.x[k], int(evaluate["n_reference"]), cache_dir=cache_dir)
            except RuntimeError as err:  # the rejection sampler's acceptance can collapse at a face of the box
                log.warning("observation %d: no exact reference draws (%s); C2ST skipped for it", k, err)
                calibration["per_observation"][k]["reference_error"] = str(err)
                continue
            ref_times.append(time.perf_counter() - t0)
            ref_draws[k] = ref
            n_c = min(int(evaluate["c2st_draws"]), len(ref))
            ours = draws_t[k].numpy() if n_draws >= n_c else infer_observation(
                plan, posterior, make_flow, model, observed.x[k], n_c, theta, x)[0].numpy()
            scores.append(c2st(ref[:n_c], ours[:n_c], max_iter=300))
            mean_err = np.abs(ours.mean(0) - ref.mean(0)) / ref.std(0)
            calibration["per_observation"][k].update(c2st=scores[-1], mean_error_ref_sd=dict(zip(PARAM_NAMES, mean_err)),
                                                     sd_ratio=dict(zip(PARAM_NAMES, ours.std(0) / ref.std(0))))
            log.info("observation %d: C2ST against exact reference draws %.3f", k, scores[-1])
        if scores:
            metrics.update(c2st_mean=float(np.mean(scores)), c2st_max=float(np.max(scores)),
                           c2st_min=float(np.min(scores)), c2st_n=len(scores), reference_time=float(sum(ref_times)))
    for k in range(min(int(evaluate["plots"]), len(draws))):
        plots.plot_pair(draws_t[k].numpy(), PARAM_NAMES, out / f"pair_obs{k}.png",
                        truth=None if truth is None else truth[k], reference=ref_draws.get(k),
                        title=f"observation {k}" + (f", C2ST {calibration['per_observation'][k]['c2st']:.3f}" if k in ref_draws else ""))
    if truth is not None:
        d = draws_t.numpy()
        sd = d.std(1)
        err = np.abs(d.mean(1) - truth) / sd  # (n_obs, 7), in posterior sds
        cov = coverage(np.transpose(d, (1, 0, 2)), truth)
        metrics.update({f"z_error_{n}": float(err[:, i].mean()) for i, n in enumerate(PARAM_NAMES)})
        metrics.update({f"abs_error_{n}": float(np.abs(d.mean(1) - truth)[:, i].mean()) for i, n in enumerate(PARAM_NAMES)})
        metrics["coverage90_truth"] = float(cov[0.9].mean())
        calibration["truth_coverage"] = {str(l): dict(zip(PARAM_NAMES, v)) for l, v in cov.items()}
    if int(evaluate["sbc"]) > 0:
        metrics.update(_sbc(posterior, model, int(evaluate["sbc"]), int(evaluate["sbc_draws"]), out, calibration))
    focus_losses = {k: i["focus_losses"] for k, i in enumerate(infos) if "focus_losses" in i}
    train, val = train_info["train_losses"], train_info["val_losses"]
    if train:  # NPE: mean -log q(theta | x) per epoch, on training and held-out pairs
        write_losses(out, train, **({"val_loss": val} if len(val) == len(train) else {}))
    plots.plot_training(train_info["train_losses"], train_info["val_losses"], out / "training.png", focus_losses or None)
    write_json(out / "calibration.json", calibration)
    metrics = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}
    log.info("metrics: %s", metrics)
    return metrics


def _summary(draws: np.ndarray):
    import pandas as pd

    rows = []
    for k in range(draws.shape[0]):
        for i, name in enumerate(PARAM_NAMES):
            v = draws[k, :, i]
            q = np.quantile(v, [0.05, 0.5, 0.95])
            rows.append({"obs": k, "parameter": name, "mean": v.mean(), "sd": v.std(), "q05": q[0], "median": q[1], "q95": q[2]})
    return pd.DataFrame(rows)


def _sbc(posterior: AmortizedPosterior, model: KnifeEdgeBeamModel, n: int, n_draws: int, out: Path,
         calibration: dict) -> dict:
    """SBC and coverage of the amortized posterior over ``n`` prior draws (their own seed, not the training set's)."""
    gen = torch.Generator().manual_seed(987_654)
    theta = model.sample_prior(n, gen)
    x = model.simulate(theta, gen)
    t0 = time.perf_counter()
    ranks = sbc_ranks(theta, x, lambda xb, m: posterior.flow.sample(xb, m), n_draws=n_draws)
    tests = rank_uniformity(ranks, n_draws)
    with torch.no_grad():
        d = torch.cat([posterior.flow.sample(x[s:s + 100], 200) for s in range(0, n, 100)], dim=1)
    cov = coverage(d, theta)
    plots.plot_sbc(ranks, n_draws, PARAM_NAMES, out / "sbc_ranks.png", ks_p=tests["ks_p"])
    plots.plot_coverage(cov, PARAM_NAMES, out / "coverage.png", n)
    calibration["sbc"] = {"n": n, "n_draws": n_draws, "ks_p": dict(zip(PARAM_NAMES, tests["ks_p"])),
                          "chi2_p": dict(zip(PARAM_NAMES, tests["chi2_p"])), "time": time.perf_counter() - t0}
    calibration["sbc_coverage"] = {str(l): dict(zip(PARAM_NAMES, v)) for l, v in cov.items()}
    return {"sbc_ks_p_min": float(tests["ks_p"].min()), "sbc_coverage90_mean": float(cov[0.9].mean())}
