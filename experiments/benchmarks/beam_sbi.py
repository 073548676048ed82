"""Benchmark: amortized posteriors of beam parameters, physppl against the sbi package, with SBC.

Every tool trains on the same cached simulations (10^3, 10^4, 10^5 by default) of the reference knife-edge
surrogate, in one run, one torch thread each, one after the other; each posterior is scored on the same fixed
scans by C2ST against exact reference draws (validated against NUTS, see the README), and calibrated by SBC over
the same fresh prior draws (ranks of the truth among 100 posterior draws; KS test per parameter).

* ``sbi``: sbi's NPE with its default NSF and training settings (z-scored raw scans);
* ``physppl``: physppl's best amortized estimator, ``guide=beam_estimator`` (zuko NSF on the logit of the prior
  box, conditioned on each scan's maximum-likelihood fit and correcting it as a pilot;
  ``physppl.guides.beam.knife_edge_estimator``), trained with the engine's default trainer;
* ``pyro``: physppl's earlier Pyro flow (``guide=beam_flow``, ``inference=npe_amortized``);
* ``job``: the default job at 10^4 (amortized, then a per-scan variational fit against the likelihood).

    python experiments/benchmarks/beam_sbi.py                      # the table, every tool
    python experiments/benchmarks/beam_sbi.py --budgets 1000 10000 --tools physppl sbi
    pip install -e ".[sbi]"                                          # the comparison's optional dependency

Prints a Markdown table (and writes it with the raw numbers as JSON with --json).
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch

from physppl.beam_sbi.data import SimulationCache, fixed_observations
from physppl.beam_sbi.parts import BEAM_ESTIMATOR, FOCUS, NPE_TRAINER
from physppl.beam_sbi.reference import reference_draws
from physppl.guides.beam import knife_edge_flow
from physppl.inference.calibration import c2st, rank_uniformity, sbc_ranks
from physppl.models.beam import PARAM_NAMES, KnifeEdgeBeamModel
from physppl.simulation_inference.parts import TRAINER

log = logging.getLogger("beam_benchmark")


def _score(sample_fn, x_obs, refs, n):
    """C2ST per observation, and the time to draw ``n`` per observation."""
    scores, t_sample = [], 0.0
    for k, ref in enumerate(refs):
        t0 = time.perf_counter()
        draws = sample_fn(x_obs[k], n)
        t_sample += time.perf_counter() - t0
        scores.append(c2st(ref[:n], np.asarray(draws, dtype=float)[:n], max_iter=300))
    return np.array(scores), t_sample / len(refs)


def _sbc(batch_sample, theta, x, n_draws=100):
    """Minimum KS p-value over parameters, and all of them, of SBC ranks."""
    ranks = sbc_ranks(theta, x, batch_sample, n_draws=n_draws)
    p = rank_uniformity(ranks, n_draws)["ks_p"]
    return float(p.min()), p


def physppl_estimator(theta, x, model, max_epochs=None):
    est = BEAM_ESTIMATOR.build()(low=model.low, high=model.high, positions=model.positions)
    cap = {} if max_epochs is None else {"max_epochs": max_epochs}
    res = TRAINER.build(progress=False, **cap).fit(est, theta, x)
    return (lambda xo, n: est.sample(xo, n)), (lambda xb, n: est.sample(xb, n)), res.wall_time, f"{res.epochs} epochs", est


def pyro_flow(theta, x, model, max_epochs=None):
    max_epochs = 60 if max_epochs is None else max_epochs
    flow = knife_edge_flow(low=model.low, high=model.high, positions=model.positions)
    res = NPE_TRAINER.build(max_epochs=max_epochs, progress=False).fit(flow, theta, x)
    return (lambda xo, n: flow.sample(xo, n)), (lambda xb, n: flow.sample(xb, n)), res.wall_time, f"{res.epochs} epochs", flow


def sbi_npe(theta, x, model, max_epochs=None):
    """sbi's NPE with its default NSF on the box ``model.low, model.high``: (sample, batch sample, training s,
    note, None)."""
    from sbi.inference import NPE
    from sbi.utils import BoxUniform

    prior = BoxUniform(model.low, model.high)
    inference = NPE(prior=prior, density_estimator="nsf", show_progress_bars=False)
    inference.append_simulations(theta, x)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = {} if max_epochs is None else {"max_num_epochs": max_epochs}
        estimator = inference.train(**cap)
    wall = time.perf_counter() - t0
    posterior = inference.build_posterior(estimator)

    def sample(xo, n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return posterior.sample((n,), x=xo, show_progress_bars=False)

    def batch(xb, n):  # (n, batch, D), as sbc_ranks wants
        # without rejection: for some prior draws sbi's posterior puts ~0% of its mass inside the box, and its
        # rejection sampler then never returns (measured at 10^3 simulations); ranks need no truncation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return posterior.sample_batched((n,), x=xb, show_progress_bars=False, reject_outside_prior=False)

    return sample, batch, wall, f"{inference._summary['epochs_trained'][-1]} epochs", None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--n-obs", type=int, default=10)
    ap.add_argument("--draws", type=int, default=5000, help="posterior and reference draws per observation for C2ST")
    ap.add_argument("--sbc", type=int, default=500, help="prior draws for SBC (0 skips)")
    ap.add_argument("--tools", nargs="+", default=["physppl", "sbi", "pyro", "job"],
                    choices=["physppl", "sbi", "pyro", "job"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-epochs", type=int, default=None,
                    help="cap every tool's epochs (default: each tool's own stopping rule; the note says when hit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here (after every row)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model = KnifeEdgeBeamModel()
    cache = SimulationCache()
    _, x_obs = fixed_observations(model, args.n_obs)
    t0 = time.perf_counter()
    refs = [reference_draws(model, x_obs[k], 10_000, cache_dir=cache.directory)[0] for k in range(args.n_obs)]
    log.info("reference draws for %d observations in %.1f s", args.n_obs, time.perf_counter() - t0)
    gen = torch.Generator().manual_seed(987_654)
    sbc_theta = model.sample_prior(args.sbc, gen) if args.sbc else None
    sbc_x = model.simulate(sbc_theta, gen) if args.sbc else None
    trainers = {"physppl": ("physppl", "NPE, zuko NSF on per-scan ML fits as pilot (guide=beam_estimator)", physppl_estimator),
                "sbi": ("sbi", "NPE, sbi's default NSF", sbi_npe),
                "pyro": ("physppl", "NPE, Pyro flow (guide=beam_flow)", pyro_flow)}
    rows = []

    def add(row):
        rows.append(row)
        log.info("%s / %s %d: C2ST %.3f (%.3f-%.3f), training %.1f s, SBC KS p min %s", row["tool"], row["method"],
                 row["simulations"], row["c2st_mean"], row["c2st_min"], row["c2st_max"], row["train_s"], row["sbc_p_min"])
        if args.json:
            from physppl.inference.outputs import write_json

            write_json(args.json, {"rows": rows, "args": vars(args)})

    for budget in args.budgets:
        theta, x = cache.training_set(model, budget, seed=args.seed)
        for name in [t for t in args.tools if t in trainers]:
            tool, method, train = trainers[name]
            torch.manual_seed(args.seed)
            try:
                sample, batch, wall, note, _ = train(theta, x, model, max_epochs=args.max_epochs)
                if args.max_epochs is not None and note == f"{args.max_epochs} epochs":
                    note += " (capped)"
            except ImportError:
                log.warning("sbi is not installed (pip install -e '.[sbi]'): skipping it")
                continue
            scores, t_sample = _score(sample, x_obs, refs, args.draws)
            p_min, p = _sbc(batch, sbc_theta, sbc_x) if args.sbc else (None, None)
            add({"tool": tool, "method": method, "simulations": budget, "train_s": wall,
                 "c2st_mean": float(scores.mean()), "c2st_min": float(scores.min()), "c2st_max": float(scores.max()),
                 "sample_s": t_sample, "note": note, "c2st": scores.tolist(), "sbc_p_min": p_min,
                 "sbc_p": None if p is None else dict(zip(PARAM_NAMES, p.tolist()))})
        if "job" in args.tools and budget == 10_000:
            # the default job: amortized draws start a per-scan variational fit against the likelihood
            torch.manual_seed(args.seed)
            _, _, wall, _, est = physppl_estimator(theta, x, model)
            focus = FOCUS.build(progress=False)
            fits, t_fit = [], 0.0
            for k in range(args.n_obs):
                t1 = time.perf_counter()
                q, _ = focus.fit(lambda th: model.log_likelihood(th, x_obs[k]), model.low, model.high,
                                 est.sample(x_obs[k], 4000))
                t_fit += time.perf_counter() - t1
                fits.append(q)
            scores, t_sample = _score(lambda xo, n: fits[[torch.equal(xo, v) for v in x_obs].index(True)].sample(n),
                                      x_obs, refs, args.draws)
            add({"tool": "physppl", "method": "default job: NPE + per-scan variational focus", "simulations": budget,
                 "train_s": wall + t_fit, "c2st_mean": float(scores.mean()), "c2st_min": float(scores.min()),
                 "c2st_max": float(scores.max()), "sample_s": t_sample, "sbc_p_min": None, "sbc_p": None,
                 "note": f"focus {t_fit / args.n_obs:.1f} s per scan", "c2st": scores.tolist()})
    print_table(rows, args)


def print_table(rows, args) -> None:
    base = {r["simulations"]: r for r in rows if r["tool"] == "sbi"}
    print(f"\nC2ST against exact reference draws ({args.n_obs} scans, {args.draws} draws; 0.5 = exact); SBC over "
          f"{args.sbc} prior draws (KS p, min over the 7 parameters; < 0.01 fails); {args.threads} torch thread(s)\n")
    print("| tool | method | simulations | C2ST mean | C2ST range | SBC KS p min | training s | time / sbi | "
          "draws/obs s | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = base.get(r["simulations"])
        ratio = "1" if r["tool"] == "sbi" else (f"{r['train_s'] / ref['train_s']:.2f}" if ref else "-")
        sbc = "-" if r["sbc_p_min"] is None else f"{r['sbc_p_min']:.3g}"
        print(f"| {r['tool']} | {r['method']} | {r['simulations']:,} | {r['c2st_mean']:.3f} | {r['c2st_min']:.3f}-"
              f"{r['c2st_max']:.3f} | {sbc} | {r['train_s']:.1f} | {ratio} | {r['sample_s']:.3f} | {r['note']} |")


if __name__ == "__main__":
    main()
