"""``physppl.rbm_thermodynamics``: learning thermodynamics with Boltzmann machines (Torlai & Melko 2016).

One RBM per temperature on Monte Carlo configurations of the 2-D
Ising model; block-Gibbs samples of each give energy, |m|, specific heat and susceptibility against T beside the
Monte Carlo values, with jackknife error bars over independent chains; exact KL and exact observables when L <= 4.
Outputs: ``posterior.nc`` (the RBM chains' observables per temperature, for ArviZ's R-hat and ESS),
``thermodynamics.csv``, ``metrics.json``, ``rbm_T*.pt``, ``observables.png``, ``filters.png``, ``samples.png``.

The command line ``physppl +experiment=rbm_ising`` calls :func:`task`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import arviz as az
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from physppl.inference.presets import Preset, resolve_named
from physppl.inference.runner import Job, JobSettings, Result, config_options
from physppl.models.rbm import BernoulliRBM, to_binary
from physppl.models.simulators.ising import T_C, enumerate_states, magnetization
from physppl.models.simulators.ising import energy as ising_energy
from physppl.vae.data import IsingDataSource

from .api import log_likelihood, log_odds, save_model
from .observables import OBSERVABLES, enumerated_observables, exact_boltzmann, observables
from .options import Evaluation, Sampling
from .parts import MODELS, resolve_engine

__all__ = ["rbm_thermodynamics", "ThermodynamicsResult", "Sampling", "task", "OUTPUT_FILES"]

log = logging.getLogger(__name__)
OUTPUT_FILES = ("posterior.nc", "metrics.json", "thermodynamics.csv", "observables.png", "filters.png", "samples.png")
RELIABILITY_HINTS = {"max_rhat_rbm_energy": "raise sampling.burn_in or sampling.n_samples x sampling.thin",
                     "rbm_vs_monte_carlo": "train longer (inference.epochs) or add hidden units (model.n_hidden)"}
# an RBM observable this many combined error bars from Monte Carlo is flagged (4x4 defaults: at most 4.0 measured)
Z_LIMIT = 5.0
SHARE_LIMIT = 0.2  # |RBM - data| share of m > 0 flagged on enumerated lattices (CD at T = 1.5: 0.997 vs 0.481)
# Torlai & Melko's sweep on a lattice small enough to enumerate: exact KL and exact observables at every T
DEFAULT_DATA = Preset(IsingDataSource, L=4, temperatures=[1.5, 2.0, 2.27, 2.5, 3.0, 3.5], n_per_temperature=5000)


@dataclass(repr=False)
class ThermodynamicsResult(Result):
    """:class:`~physppl.inference.runner.Result` of :func:`rbm_thermodynamics`, with ``table`` (thermodynamics.csv:
    one row per temperature and hidden-layer size) and ``models`` ({(T, n_hidden): BernoulliRBM})."""

    table: pd.DataFrame | None = None
    models: dict | None = None


def _plus_share(weights: np.ndarray, m: np.ndarray) -> float:
    return float(weights @ ((m > 0) + 0.5 * (m == 0)) / weights.sum())


def _spins(v: np.ndarray, L: int) -> np.ndarray:
    return (2 * np.asarray(v) - 1).astype(np.int8).reshape(-1, L, L)


def _exact_log_q(rbm: BernoulliRBM, states01: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return rbm.log_prob_exact(states01).cpu().numpy()


def rbm_thermodynamics(
    data: IsingDataSource | dict | None = None,
    *,
    model: Any = "rbm",
    engine: Any = "cd",
    hidden_units: Sequence[int] | None = None,
    sampling: Sampling | dict = Sampling(),
    evaluation: Evaluation | dict = Evaluation(),
    seed: int = JobSettings.seed,
    threads: int | None = JobSettings.threads,
    device: str = JobSettings.device,
    validate: bool = JobSettings.validate,
    workdir: str | os.PathLike | None = None,
) -> ThermodynamicsResult:
    """Torlai & Melko's experiment: an RBM per temperature on 2-D Ising Monte Carlo data, and its thermodynamics.

    Parameters
    ----------
    data : IsingDataSource or dict
        The Monte Carlo configurations (default :data:`DEFAULT_DATA`: L = 4 at T = 1.5, 2.0, 2.27, 2.5, 3.0, 3.5,
        5,000 configurations each); each temperature's RBM trains on its train and validation splits and is
        scored on its test split (whole Monte Carlo chains per split).
    model, engine : as :func:`train_rbm`
    hidden_units : list of int, optional
        Hidden-layer sizes to train at every temperature (how many each temperature needs); default the model's.
    sampling : Sampling or dict
        Block-Gibbs chains of each trained RBM for its observables.
    evaluation : Evaluation or dict
        Held-out log-likelihood (exact for L <= 4, AIS otherwise).
    """
    sp = Sampling(**sampling) if isinstance(sampling, dict) else sampling
    ev = Evaluation(**evaluation) if isinstance(evaluation, dict) else evaluation
    if data is None:
        data = DEFAULT_DATA.build()
    source = IsingDataSource(**data) if isinstance(data, dict) else data
    if not isinstance(source, IsingDataSource):
        raise TypeError(f"rbm_thermodynamics: data must be an IsingDataSource (or its options as a dict), got "
                        f"{type(data).__name__}")
    if min(sp.n_chains, sp.n_samples, sp.thin) < 1 or sp.burn_in < 0 or sp.n_chains < 2:
        raise ValueError(f"sampling: need n_chains >= 2, n_samples >= 1, thin >= 1, burn_in >= 0; got {sp}")
    factory = resolve_named(model, MODELS, "model")
    sizes = [int(n) for n in hidden_units] if hidden_units else [None]
    if any(n is not None and n < 1 for n in sizes):
        raise ValueError(f"hidden_units must be positive, got {list(hidden_units)}")
    settings = JobSettings(seed=seed, threads=threads, device=device, validate=validate)
    with Job("rbm_thermodynamics", settings, workdir=workdir, outputs=OUTPUT_FILES,
             hints=RELIABILITY_HINTS) as job:
        d = source.load()
        L = source.L
        v_all = to_binary(d.x, d.source)
        temps = np.unique(d.labels["temperature"])
        chain = d.labels["chain"]
        train_rows = np.concatenate([d.split["train"], d.split["val"]])
        exact = L <= 4
        states01 = to_binary(torch.as_tensor(enumerate_states(L))) if exact else None
        state_m = magnetization(enumerate_states(L)) if exact else None
        rows, models, energy_draws, absm_draws, samples_shown = [], {}, [], [], {}
        for ti, t in enumerate(temps):
            at_t = d.labels["temperature"] == t
            mc_spins = d.x.numpy()[at_t].reshape(-1, L, L) * 2 - 1
            mc = observables(mc_spins, float(t), chain[at_t])
            tr = np.sort(train_rows[at_t[train_rows]])
            te = np.sort(d.split["test"][at_t[d.split["test"]]])
            v_train, v_test = v_all[tr].to(job.device), v_all[te].to(job.device)
            log_p, exact_obs = exact_boltzmann(L, float(t)) if exact else (None, None)
            e_row, m_row = [], []
            for n_hidden in sizes:
                kwargs = {} if n_hidden is None else {"n_hidden": n_hidden}
                rbm = factory(n_visible=v_all.shape[1], seed=job.seed, **kwargs).to(job.device).init_from_data(v_train)
                eng = resolve_engine(engine)
                tag = f"T{t:.4f}_h{rbm.n_hidden}"
                ckpt = None if workdir is None else Path(workdir) / f"checkpoint_{tag}.pt"
                log.info("T = %.4f: %d training configurations, RBM with %d hidden units", t, len(v_train), rbm.n_hidden)
                res = eng.run(rbm, v_train, checkpoint=ckpt)
                ll = log_likelihood(rbm, v_test, ev, seed=job.seed, base=log_odds(v_train))
                gen = torch.Generator(device=job.device).manual_seed(job.seed + 7 * ti + 1)
                chain_v = rbm.sample(sp.n_chains, sp.burn_in, generator=gen)
                kept = []
                for _ in range(sp.n_samples):
                    chain_v = rbm.gibbs(chain_v, sp.thin, generator=gen)
                    kept.append(chain_v.cpu().numpy())
                draws = np.stack(kept, 1)  # (chain, draw, N)
                spins = _spins(draws.reshape(-1, draws.shape[-1]), L)
                groups = np.repeat(np.arange(sp.n_chains), sp.n_samples)
                rbm_obs = observables(spins, float(t), groups)
                e_row.append(ising_energy(spins).reshape(sp.n_chains, sp.n_samples) / (L * L))
                m_row.append(np.abs(magnetization(spins)).reshape(sp.n_chains, sp.n_samples))
                row = {"temperature": float(t), "n_hidden": rbm.n_hidden, "n_train": len(v_train),
                       "test_log_likelihood": ll["mean"], "test_log_likelihood_se": ll["se"],
                       "log_z_method": ll["method"], "train_time": res.wall_time}
                for k in OBSERVABLES:
                    row[f"mc_{k}"], row[f"mc_{k}_err"] = mc[k]
                    row[f"rbm_{k}"], row[f"rbm_{k}_err"] = rbm_obs[k]
                    row[f"z_{k}"] = (rbm_obs[k][0] - mc[k][0]) / math.hypot(rbm_obs[k][1], mc[k][1])
                if exact:
                    log_q = _exact_log_q(rbm, states01.to(job.device))
                    row["exact_kl"] = float(np.exp(log_p) @ (log_p - log_q))
                    row["exact_log_likelihood"] = float(np.exp(log_p) @ log_p)  # minus the Boltzmann entropy
                    # the RBM's own exact observables: separate what training got wrong from Gibbs sampling error
                    rbm_exact = enumerated_observables(log_q, L, float(t))
                    # the weight of the m > 0 half (m = 0 split evenly): CD's chains never cross between the ordered
                    # phase's two magnetisations, so nothing in its gradient keeps this at the data's value
                    row["mc_plus_share"] = _plus_share(np.full(int(at_t.sum()), 1.0 / at_t.sum()),
                                                       magnetization(mc_spins))
                    row["rbm_exact_plus_share"] = _plus_share(np.exp(log_q), state_m)
                    for k in OBSERVABLES:
                        row[f"exact_{k}"] = exact_obs[k]
                        row[f"rbm_exact_{k}"] = rbm_exact[k]
                rows.append(row)
                models[(float(t), rbm.n_hidden)] = rbm
                samples_shown[(float(t), rbm.n_hidden)] = spins[:: max(1, len(spins) // 8)][:8]
            energy_draws.append(np.stack(e_row, -1))
            absm_draws.append(np.stack(m_row, -1))
        table = pd.DataFrame(rows)
        n_list = sorted({r["n_hidden"] for r in rows})
        # (chain, draw, temperature, n_hidden): the RBM chains' observables, for R-hat / ESS of the sampler
        idata = az.from_dict(posterior_predictive={"energy": np.stack(energy_draws, 2),
                                                   "abs_magnetization": np.stack(absm_draws, 2)},
                             coords={"temperature": temps, "n_hidden": n_list},
                             dims={"energy": ["temperature", "n_hidden"], "abs_magnetization": ["temperature",
                                                                                                 "n_hidden"]})
        idata.posterior_predictive.attrs["physppl_note"] = ("block-Gibbs chains of each temperature's RBM: energy per "
                                                            "site and |m| (J = k_B = 1)")
        rhat = az.rhat(idata.posterior_predictive)
        metrics: dict = {"data": d.name, "L": L, "T_c": T_C, "temperatures": temps.tolist(), "hidden_units": n_list,
                         "engine": "contrastive", "negative_phase": getattr(eng, "negative", None),
                         "n_chains": sp.n_chains, "burn_in": sp.burn_in, "n_samples": sp.n_samples, "thin": sp.thin,
                         "max_rhat_rbm_energy": float(rhat["energy"].max()),
                         "mean_test_log_likelihood": float(table["test_log_likelihood"].mean()),
                         "train_time": float(table["train_time"].sum())}
        failed = []
        for k in OBSERVABLES:
            metrics[f"max_abs_z_{k}"] = float(table[f"z_{k}"].abs().max())
            for _, r in table[table[f"z_{k}"].abs() > Z_LIMIT].iterrows():
                failed.append(f"rbm_vs_monte_carlo: {k} at T = {r['temperature']:.4g} (n_h = {int(r['n_hidden'])}) is "
                              f"{r[f'z_{k}']:+.1f} error bars from Monte Carlo ({r[f'rbm_{k}']:.4g} vs "
                              f"{r[f'mc_{k}']:.4g})")
        if exact:
            for _, r in table[(table["rbm_exact_plus_share"] - table["mc_plus_share"]).abs() > SHARE_LIMIT].iterrows():
                failed.append(f"magnetisation_balance: at T = {r['temperature']:.4g} (n_h = {int(r['n_hidden'])}) the "
                              f"RBM puts {100 * r['rbm_exact_plus_share']:.1f}% of its weight on m > 0, the data "
                              f"{100 * r['mc_plus_share']:.1f}% (exact KL {r['exact_kl']:.3g}); persistent chains with "
                              "tempering cross between the two magnetisations: inference=rbm_pt")
        if failed:
            metrics["failed_checks"] = failed
        if exact:
            metrics["max_exact_kl"] = float(table["exact_kl"].max())
            metrics["mean_exact_kl"] = float(table["exact_kl"].mean())

        def figures(out: Path) -> None:
            from . import plots

            if not ev.figures:
                return
            plots.plot_observables(table, out / "observables.png", T_C, L)
            key = min(models, key=lambda k: (abs(k[0] - T_C), -k[1]))
            plots.plot_filters(models[key].W.detach().cpu().numpy(), (L, L), out / "filters.png",
                               title=f"weights of the RBM at T = {key[0]:.3g} (n_h = {key[1]})")
            plots.plot_ising_samples(samples_shown, out / "samples.png")

        files = {"thermodynamics.csv": lambda p: table.to_csv(p, index=False)}
        for (t, n_h), rbm in models.items():
            files[f"rbm_T{t:.4f}_h{n_h}.pt"] = save_model(rbm, {"temperature": t})
        return job.result(ThermodynamicsResult, idata=idata, metrics=metrics, files=files, figures=figures,
                          table=table, models=models)


def task(cfg: DictConfig, workdir: str | os.PathLike) -> ThermodynamicsResult:
    """The command line's Torlai-Melko job: :func:`rbm_thermodynamics` with the configuration's values."""
    return rbm_thermodynamics(instantiate(cfg.data), model=instantiate(cfg.model), engine=instantiate(cfg.inference),
                              workdir=workdir, **config_options(cfg, rbm_thermodynamics, exclude=("model", "engine")))
