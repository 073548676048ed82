"""Benchmark: amortized neural posterior estimation of beam parameters, physppl against the sbi package.

Both tools train on the same cached simulations (10^3, 10^4, 10^5 by default) of the reference knife-edge
surrogate, in one run, one torch thread each, one after the other; each posterior is scored on the same fixed
observations by C2ST against exact reference draws (validated against NUTS, see the README). physppl's
default job (per-scan variational focus) is scored on the same observations for comparison.

    python experiments/benchmarks/beam_sbi.py                      # table for physppl and sbi (if installed)
    python experiments/benchmarks/beam_sbi.py --budgets 1000 10000 --no-focus
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
from physppl.beam_sbi.parts import FOCUS, NPE_TRAINER
from physppl.beam_sbi.reference import reference_draws
from physppl.guides.beam import knife_edge_flow
from physppl.inference.calibration import c2st
from physppl.models.beam import KnifeEdgeBeamModel

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


def physppl_npe(theta, x, model, max_epochs):
    flow = knife_edge_flow(low=model.low, high=model.high, positions=model.positions)
    # the job's trainer (physppl.beam_sbi.parts.NPE_TRAINER: early stopping, decay) with this epoch budget
    res = NPE_TRAINER.build(max_epochs=max_epochs, progress=False).fit(flow, theta, x)
    return (lambda xo, n: flow.sample(xo, n).numpy()), res.wall_time, f"{res.epochs} epochs"


def sbi_npe(theta, x, model):
    from sbi.inference import NPE
    from sbi.utils import BoxUniform

    prior = BoxUniform(model.low, model.high)
    inference = NPE(prior=prior, density_estimator="nsf", show_progress_bars=False)
    inference.append_simulations(theta, x)
    t0 = time.perf_counter()
    estimator = inference.train()
    wall = time.perf_counter() - t0
    posterior = inference.build_posterior(estimator)

    def sample(xo, n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return posterior.sample((n,), x=xo, show_progress_bars=False).numpy()

    return sample, wall, f"{inference._summary['epochs_trained'][-1]} epochs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--n-obs", type=int, default=10)
    ap.add_argument("--draws", type=int, default=5000, help="posterior and reference draws per observation for C2ST")
    ap.add_argument("--max-epochs", type=int, default=60, help="physppl NPE epoch budget (early stopping as in the job)")
    ap.add_argument("--tools", nargs="+", default=["physppl", "sbi"], choices=["physppl", "sbi"])
    ap.add_argument("--no-focus", action="store_true", help="skip physppl's per-scan variational focus row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model = KnifeEdgeBeamModel()
    cache = SimulationCache()
    _, x_obs = fixed_observations(model, args.n_obs)
    t0 = time.perf_counter()
    refs = [reference_draws(model, x_obs[k], 10_000, cache_dir=cache.directory)[0] for k in range(args.n_obs)]
    log.info("reference draws for %d observations in %.1f s", args.n_obs, time.perf_counter() - t0)
    rows = []
    for budget in args.budgets:
        theta, x = cache.training_set(model, budget, seed=args.seed)
        for tool in args.tools:
            torch.manual_seed(args.seed)
            if tool == "sbi":
                try:
                    sample, wall, note = sbi_npe(theta, x, model)
                except ImportError:
                    log.warning("sbi is not installed (pip install -e '.[sbi]'): skipping it")
                    continue
            else:
                sample, wall, note = physppl_npe(theta, x, model, args.max_epochs)
            scores, t_sample = _score(sample, x_obs, refs, args.draws)
            rows.append({"tool": tool, "method": "NPE (amortized)", "simulations": budget, "train_s": wall,
                         "c2st_mean": float(scores.mean()), "c2st_min": float(scores.min()),
                         "c2st_max": float(scores.max()), "sample_s": t_sample, "note": note,
                         "c2st": scores.tolist()})
            log.info("%s %d: C2ST %.3f (%.3f-%.3f), training %.1f s", tool, budget, scores.mean(), scores.min(),
                     scores.max(), wall)
        if not args.no_focus and "physppl" in args.tools and budget == args.budgets[0]:
            # the default job: amortized draws start a per-scan variational fit against the likelihood
            flow_sample, wall, _ = physppl_npe(*cache.training_set(model, 10_000, seed=args.seed), model, args.max_epochs)
            focus = FOCUS.build(progress=False)  # the default job's per-scan fit
            fits, t_fit = [], 0.0
            for k in range(args.n_obs):
                t1 = time.perf_counter()
                q, _ = focus.fit(lambda th: model.log_likelihood(th, x_obs[k]), model.low, model.high,
                                 torch.as_tensor(flow_sample(x_obs[k], 4000)))
                t_fit += time.perf_counter() - t1
                fits.append(q)
            scores, t_sample = _score(lambda xo, n: fits[[torch.equal(xo, v) for v in x_obs].index(True)].sample(n).numpy(),
                                      x_obs, refs, args.draws)
            rows.append({"tool": "physppl", "method": "NPE 10^4 + variational focus (default job)", "simulations": 10_000,
                         "train_s": wall + t_fit, "c2st_mean": float(scores.mean()), "c2st_min": float(scores.min()),
                         "c2st_max": float(scores.max()), "sample_s": t_sample,
                         "note": f"focus {t_fit / args.n_obs:.1f} s per scan", "c2st": scores.tolist()})
    base = {(r["simulations"]): r for r in rows if r["tool"] == "sbi"}
    print(f"\nC2ST against exact reference draws ({args.n_obs} observations, {args.draws} draws; 0.5 = exact), "
          f"{args.threads} torch thread(s)\n")
    print("| tool | method | simulations | C2ST mean | C2ST range | training s | time / sbi | draws/obs s | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = base.get(r["simulations"])
        ratio = f"{r['train_s'] / ref['train_s']:.2f}" if ref and r["tool"] != "sbi" else ("1" if r["tool"] == "sbi" else "-")
        print(f"| {r['tool']} | {r['method']} | {r['simulations']:,} | {r['c2st_mean']:.3f} | {r['c2st_min']:.3f}-"
              f"{r['c2st_max']:.3f} | {r['train_s']:.1f} | {ratio} | {r['sample_s']:.3f} | {r['note']} |")
    if args.json:
        from physppl.inference.outputs import write_json

        write_json(args.json, {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
