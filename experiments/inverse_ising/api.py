"""``physppl.infer_couplings``: spin samples in; couplings J_ij and fields h_i with a calibrated posterior out.

Convention: ``p(s) ∝ exp(sum_{i<j} J_ij s_i s_j + sum_i h_i s_i)``, J including 1/T. The likelihood is Besag's
pseudo-likelihood (:mod:`physppl.models.inverse_ising`); its posterior is too narrow (a coupling's information is
counted by both of its sites' conditionals), so by default the draws are moved by the sandwich (Godambe) adjustment
of :mod:`physppl.inference.composite` about the pseudo-posterior mode.

Outputs (``Result.save``): ``posterior.nc`` (J with a ``pair`` dim named "i-j" and ``i``, ``j`` coordinates, h with
a ``site`` dim, the spins as observed data and the per-sample log pseudo-likelihood), ``couplings.csv``,
``fields.csv``, ``summary.csv``, ``metrics.json``, ``couplings.png``, ``coupling_matrix.png`` (and ``loss.png`` for
SVI). The command line (``physppl +experiment=inverse_ising``) calls :func:`task`.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.guides.inverse_ising import guide_covariance, pseudo_likelihood_map
from physppl.inference.composite import SandwichAdjustment
from physppl.inference.convert import draws_to_inference_data, summarize
from physppl.inference.fit import Fit, ProtocolError, fit as fit_model
from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.models.inverse_ising import pairs_labels, pseudo_likelihood_curvature, pseudo_log_likelihood

from . import analysis
from .data import ArraySpins, SimulatedSpins, SpinData
from .parts import build_guide, resolve_engine, resolve_guide, resolve_model

__all__ = ["infer_couplings", "CouplingsResult", "task", "OUTPUT_FILES", "CALIBRATIONS"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("posterior.nc", "summary.csv", "metrics.json", "couplings.csv", "fields.csv", "losses.csv",
                "loss.png", "couplings.png", "coupling_matrix.png", "checkpoint.pt")
CALIBRATIONS = ("sandwich", "none")
# what the runner's reliability warnings should advise, in this problem's options
RELIABILITY_HINTS = {"not_converged": "raise inference.max_steps",
                     "coverage": "check calibration (sandwich) and the sampler of the data; more samples help",
                     "map_not_converged": "raise map_steps"}
MAX_LOG_LIKELIHOOD_VALUES = 20_000_000  # draws x samples; beyond it posterior.nc goes without the log-likelihood

DATASETS = {"ferromagnet": lambda: SimulatedSpins(kind="ferromagnet"),
            "spin_glass": lambda: SimulatedSpins(kind="spin_glass")}


@dataclass(repr=False)
class CouplingsResult(Result):
    """:class:`~physppl.inference.runner.Result` of the inverse Ising problem, with

    Attributes
    ----------
    couplings : DataFrame
        ``couplings.csv``: per candidate pair ``pair`` ("i-j"), ``i``, ``j``, posterior ``mean``, ``sd``, ``q05``,
        ``q95``, the pseudo-likelihood MAP, the unadjusted sd, ``nonzero`` (the 90% interval excludes 0),
        ``is_lattice_bond`` and ``true`` when known.
    fields : DataFrame
        ``fields.csv``: the same per site.
    coupling_matrix : ndarray (N, N)
        Posterior-mean couplings as a symmetric matrix.
    data : SpinData
    fit : Fit
        The engine's draws before the adjustment.
    adjustment : SandwichAdjustment or None
    """

    couplings: pd.DataFrame | None = None
    fields: pd.DataFrame | None = None
    coupling_matrix: np.ndarray | None = None
    data: SpinData | None = None
    fit: Fit | None = None
    adjustment: SandwichAdjustment | None = None


def _source(data: Any):
    if isinstance(data, str) and data.strip().lower() in DATASETS:
        return DATASETS[data.strip().lower()]()
    if isinstance(data, (str, os.PathLike)):
        return ArraySpins(path=str(data))
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return ArraySpins(array=data)
    if callable(getattr(data, "load", None)):
        return data
    raise TypeError(f"infer_couplings: data must be 'ferromagnet', 'spin_glass', a .npy/.npz path, an array of spins "
                    f"or a data source with load(); got {type(data).__name__}")


def _flat(fit: Fit) -> np.ndarray:
    """Draws as (chains, draws, n_pairs + N) in the order theta = (J, h), float64."""
    return torch.cat([fit.draws["J"].double(), fit.draws["h"].double()], -1).numpy()


def _log_pseudo_likelihood(s: torch.Tensor, J: np.ndarray, h: np.ndarray, pairs: torch.Tensor,
                           chunk: int = 50) -> np.ndarray:
    """Per-draw, per-sample log pseudo-likelihood (chains, draws, n), a chunk of draws at a time."""
    c, d = J.shape[:2]
    Jf, hf = torch.as_tensor(J.reshape(c * d, -1)), torch.as_tensor(h.reshape(c * d, -1))
    out = [pseudo_log_likelihood(s, Jf[k:k + chunk], hf[k:k + chunk], pairs).numpy()
           for k in range(0, c * d, chunk)]
    return np.concatenate(out).reshape(c, d, -1)


def infer_couplings(
    data: Any = "ferromagnet",
    *,
    model: Any = "normal",
    guide: Any = "mean_field",
    engine: Any = "svi",
    calibration: str = "sandwich",
    n_draws: int = 1000,
    map_steps: int = 500,
    exact_check: bool = True,
    log_likelihood: bool = True,
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
    **model_options: Any,
) -> CouplingsResult:
    """Posterior over the couplings J_ij (i < j, on the model's candidate pairs) and fields h_i of an Ising model
    from spin samples.

    Parameters
    ----------
    data : str, path, array or data source
        ``"ferromagnet"`` (the built-in 4 x 4 periodic ferromagnet at T = 3, 4,000 exact samples), ``"spin_glass"``
        (a 4 x 4 Edwards-Anderson +-1/T glass), a ``.npy``/``.npz`` of spins, an array (n, N) or (n, L, L) of +-1 or
        0/1, or a source (:class:`~physppl.inverse_ising.data.SimulatedSpins`,
        :class:`~physppl.inverse_ising.data.ArraySpins`).
    model : str or factory
        ``"normal"`` (J ~ Normal(0, 1)), ``"laplace"`` (sparse J), or a factory ``model(n_sites=, lattice_side=)``
        such as ``functools.partial(InverseIsing, graph="lattice")``.
    guide : str or factory
        ``"mean_field"`` or ``"low_rank"``, or ``guide(model, init_values=..., init_hessian=...)``; not used by NUTS.
    engine : str or engine
        ``"svi"`` (default), ``"nuts"`` (the reference), or an engine object.
    calibration : {"sandwich", "none"}
        ``sandwich``: adjust the draws so their covariance is the inverse Godambe information (recorded in
        posterior.nc's attrs); ``none``: the pseudo-posterior as it is (too narrow).
    n_draws : int
        Draws kept from a guide (NUTS keeps its own ``num_samples`` per chain).
    map_steps : int
        L-BFGS iterations of the pseudo-posterior mode (the guide's start, NUTS's start and the adjustment's centre).
    exact_check : bool
        For N <= 16 sites, also fit the exact-likelihood MAP (Z by enumeration) and compare.
    log_likelihood : bool
        Per-sample log pseudo-likelihood per draw in posterior.nc.
    **model_options
        Options of :class:`~physppl.models.inverse_ising.InverseIsing` on top of ``model``'s: ``graph`` ("all",
        "lattice", or pairs), ``prior``, ``coupling_scale``, ``field_scale``.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if int(n_draws) < 10:
        raise ValueError(f"n_draws must be >= 10 (90% intervals from the draws), got {n_draws}")
    if int(map_steps) < 1:
        raise ValueError(f"map_steps must be >= 1, got {map_steps}")
    source = _source(data)
    factory = resolve_model(model, **model_options)
    eng = resolve_engine(engine)
    guide_factory = resolve_guide(guide) if getattr(eng, "needs_guide", True) else None
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    with Job("inverse_ising", settings, inputs=[getattr(source, "path", None)], workdir=workdir, outputs=OUTPUT_FILES,
             hints=RELIABILITY_HINTS) as job:
        d = source.load()
        net = factory(n_sites=d.n_sites, lattice_side=d.lattice_side)
        if not isinstance(net, torch.nn.Module) or not hasattr(net, "pairs"):
            raise ProtocolError(f"infer_couplings: model {type(net).__name__} must be an InverseIsing-like PyroModule "
                                "with sites J (plate 'pairs'), h (plate 'sites') and a 'pairs' buffer")
        net = net.double().to(job.device)  # float64: the adjustment needs the curvature to many digits
        s = d.s.to(job.device)
        log.info("data %s: %d samples of %d sites, %d candidate pairs (%s graph), truth %s", d.source, d.n_samples,
                 d.n_sites, net.n_pairs, getattr(net, "graph", "?"), "known" if d.has_truth else "unknown")
        t0 = time.perf_counter()
        mode, map_info = pseudo_likelihood_map(net, s, max_iter=map_steps)
        hessian, _, score_outer = pseudo_likelihood_curvature(s, mode["J"], mode["h"], net.pairs)
        prior_h = net.prior_hessian().double().to(hessian.device)
        hessian = hessian + torch.diag(prior_h)
        map_time = time.perf_counter() - t0
        log.info("pseudo-likelihood MAP: %d L-BFGS iterations, %.2f s", map_info["iterations"], map_time)
        init = {k: v.to(torch.float64) for k, v in mode.items()}
        g = build_guide(guide_factory, net, init, hessian) if guide_factory is not None else None
        n_data = d.n_samples if getattr(eng, "batch_size", None) is not None else None
        fit = fit_model(net, g, {"s": s}, eng, n_draws=int(n_draws), n_data=n_data, workdir=workdir, init=init,
                        sites=["J", "h"])
        return _finish(job, d, net, fit, mode, map_info, map_time, hessian, score_outer, prior_h, calibration,
                       exact_check, log_likelihood)


def _finish(job: Job, d: SpinData, net, fit: Fit, mode, map_info, map_time, hessian, score_outer, prior_h,
            calibration: str, exact_check: bool, log_likelihood: bool) -> CouplingsResult:
    P, N = net.n_pairs, net.n_sites
    pairs = net.pairs.cpu().numpy()
    raw = _flat(fit)
    mode_flat = torch.cat([mode["J"], mode["h"]]).cpu()
    failed: list[str] = []
    adjustment = None
    metrics: dict = {"data": d.info.get("data"), "source": d.source, "n_samples": d.n_samples, "n_sites": N,
                     "n_pairs": P, "graph": getattr(net, "graph", None), "prior": getattr(net, "prior", None),
                     "calibration": calibration, **{k: v for k, v in d.info.items() if k != "data"},
                     "map_iterations": map_info["iterations"], "map_converged": map_info["converged"],
                     "map_time": map_time, **fit.info}
    if not map_info["converged"]:
        failed.append(f"map_not_converged: the pseudo-likelihood MAP stopped with gradient {map_info['grad_norm']:.3g}")
    adjusted = raw
    if calibration == "sandwich":
        # a Gaussian guide's own covariance is what its draws have (a mean field's is narrower than H^-1);
        # a sampler's draws have the pseudo-posterior's, about H^-1 at the mode
        cov = guide_covariance(fit.guide, net) if fit.guide is not None else None
        metrics["sandwich_reference"] = "hessian" if cov is None else "guide_covariance"
        try:
            adjustment = SandwichAdjustment.from_curvature(mode_flat, hessian.cpu(), score_outer.cpu(), prior_h.cpu(),
                                                           draws_covariance=None if cov is None else cov.cpu())
            adjusted = adjustment.apply(raw)
            ratio = adjustment.variance_ratio.numpy()
            metrics.update(sandwich_variance_ratio_J=float(ratio[:P].mean()),
                           sandwich_variance_ratio_h=float(ratio[P:].mean()))
        except ValueError as err:  # curvature not positive definite: keep the unadjusted draws, and say so
            failed.append(f"sandwich_failed: {err}; the draws are not adjusted (too narrow)")
    draws_J, draws_h = adjusted[..., :P], adjusted[..., P:]
    flat_J, flat_h = draws_J.reshape(-1, P), draws_h.reshape(-1, N)
    flat_J_raw = raw[..., :P].reshape(-1, P)

    constant = np.nonzero(np.abs(d.s.mean(0).numpy()) == 1.0)[0]
    metrics["unidentified_sites"] = [int(i) for i in constant]  # a spin that never flips: its field is unbounded

    true_J = analysis.pair_values(d.true_couplings, pairs) if d.has_truth else None
    true_h = d.true_fields
    table = analysis.coupling_table(pairs, flat_J, mode["J"].cpu().numpy(),
                                    flat_J_raw if calibration == "sandwich" else None, true_J, d.lattice_side)
    lo_h, hi_h = np.quantile(flat_h, [0.05, 0.95], axis=0)
    fields = pd.DataFrame({"site": np.arange(N), "mean": flat_h.mean(0), "sd": flat_h.std(0, ddof=1), "q05": lo_h,
                           "q95": hi_h, "map": mode["h"].cpu().numpy()})
    if d.lattice_side is not None:
        fields["row"], fields["col"] = np.arange(N) // d.lattice_side, np.arange(N) % d.lattice_side
    if true_h is not None:
        fields["true"] = true_h
    if true_J is not None:
        nn = table["is_lattice_bond"].to_numpy()
        metrics.update(analysis.interval_metrics(flat_J, true_J, nn, flat_J_raw if calibration == "sandwich" else None,
                                                 flat_h, true_h))
        if d.true_couplings is not None:
            outside = np.abs(d.true_couplings[np.triu_indices(N, 1)]).sum() - np.abs(true_J).sum()
            if outside > 1e-9:
                metrics["true_coupling_mass_outside_graph"] = float(outside)
        cov = metrics["coverage_90"]
        if P >= 20 and cov < analysis.COVERAGE_FLOOR:
            failed.append(f"coverage: the 90% intervals cover {100 * cov:.0f}% of the true couplings (expected about "
                          f"90%); the posterior is too narrow or biased")
    metrics["sd_J_mean"] = float(flat_J.std(0, ddof=1).mean())
    if exact_check and N <= analysis.EXACT_CHECK_MAX_SITES:
        t0 = time.perf_counter()
        checked, _ = analysis.exact_check(net.cpu(), d.s, {k: v.cpu() for k, v in mode.items()},
                                          {"J": flat_J.mean(0), "h": flat_h.mean(0)}, true_J, true_h)
        metrics.update(checked, exact_check_time=time.perf_counter() - t0)
    elif exact_check:
        log.info("exact-likelihood check skipped: N=%d sites is beyond %d (2^N states)", N,
                 analysis.EXACT_CHECK_MAX_SITES)
    metrics["failed_checks"] = failed

    # -- posterior.nc ----------------------------------------------------------------------------------------------
    s_np = d.s.numpy()
    loglik = None
    if log_likelihood:
        if draws_J.shape[0] * draws_J.shape[1] * d.n_samples <= MAX_LOG_LIKELIHOOD_VALUES:
            loglik = {"s": _log_pseudo_likelihood(d.s, draws_J, draws_h, net.pairs.cpu())}
        else:
            log.info("posterior.nc without the log pseudo-likelihood: more than %d values", MAX_LOG_LIKELIHOOD_VALUES)
    coords = {"pair": np.asarray(pairs_labels(pairs)), "site": np.arange(N), "sample": np.arange(d.n_samples)}
    extra = {"pair": {"i": pairs[:, 0], "j": pairs[:, 1], "is_lattice_bond": table["is_lattice_bond"].to_numpy()}}
    if d.lattice_side is not None:
        extra["site"] = {"row": np.arange(N) // d.lattice_side, "col": np.arange(N) % d.lattice_side}
    idata = draws_to_inference_data({"J": draws_J, "h": draws_h}, {"J": ["pair"], "h": ["site"], "s": ["sample", "site"]},
                                    observed_data={"s": s_np}, log_likelihood=loglik, sample_stats=fit.sample_stats,
                                    coords=coords, dim_coords=extra)
    attrs = {"convention": "p(s) propto exp(sum_{i<j} J_ij s_i s_j + sum_i h_i s_i), J includes 1/T",
             "likelihood": "Besag pseudo-likelihood prod_n prod_i sigmoid(2 s_i (h_i + sum_j J_ij s_j))",
             "calibration": calibration if adjustment is not None else "none",
             "sandwich_adjusted": int(adjustment is not None),
             "log_likelihood": "per-sample log pseudo-likelihood (a composite likelihood, not log p(s))"}
    for group in idata.groups():
        idata[group].attrs.update(attrs)
    summary = summarize(idata, var_names=["J", "h"])
    matrix = analysis.posterior_matrix(flat_J, pairs, N)
    log.info("couplings: %s", ", ".join(f"{k} {metrics[k]:.4g}" for k in ("coupling_rmse", "coupling_rmse_nn",
                                                                          "coverage_90", "coverage_90_unadjusted",
                                                                          "graph_precision", "graph_recall")
                                        if isinstance(metrics.get(k), float) and math.isfinite(metrics[k])))

    files = {"couplings.csv": lambda p: table.to_csv(p, index=False),
             "fields.csv": lambda p: fields.to_csv(p, index=False)}

    def figures(out: Path) -> None:
        from . import plots  # matplotlib only when figures are drawn

        plots.plot_couplings(table, out / "couplings.png", title=d.source)
        plots.plot_coupling_matrices(matrix, d.true_couplings, out / "coupling_matrix.png", d.lattice_side)

    return job.result(CouplingsResult, idata=idata, metrics=metrics, losses=fit.losses, summary=summary, files=files,
                      figures=figures, couplings=table, fields=fields, coupling_matrix=matrix, data=d, fit=fit,
                      adjustment=adjustment)


def task(cfg: DictConfig, workdir: str | os.PathLike) -> CouplingsResult:
    """The command line's inverse Ising job: :func:`infer_couplings` with the configuration's values."""
    return infer_couplings(instantiate(cfg.data), model=instantiate(cfg.model), guide=instantiate(cfg.guide),
                           engine=instantiate(cfg.inference), workdir=workdir,
                           **config_options(cfg, infer_couplings, exclude=("model", "guide", "engine")))
