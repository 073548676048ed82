"""Benchmark: physppl's simulation-based inference on sbibm's two_moons and slcp, against the sbi package.

sbibm pulls an old sbi and downgrades matplotlib, so it lives in its own venv and only exports, once, what this
script reads (`experiments/benchmarks/sbibm_export.py`): for each task its observations 1-10, sbibm's reference
posterior draws (10,000 each), and 10^5 training simulations from sbibm's own prior and simulator.

    python3 -m venv /tmp/sbibm-venv && /tmp/sbibm-venv/bin/pip install torch==2.13.0 sbibm future
    /tmp/sbibm-venv/bin/python experiments/benchmarks/sbibm_export.py --out /tmp/sbibm_refs
    python experiments/benchmarks/sbibm.py --refs /tmp/sbibm_refs               # this venv: physppl and sbi

Every method trains on the same first ``n`` simulations, one torch thread each, one after the other; each
posterior is scored on the same observations by C2ST against sbibm's reference draws (physppl's classifier,
which follows sbibm's: an MLP of two layers of 10 x dim units, z-scored by the reference, 5-fold; early stopping
on a held-out tenth). Methods:

* ``sbi``: sbi's NPE with its default NSF (its own training defaults);
* ``npe``: physppl's amortized NSF (zuko), its default trainer;
* ``ensemble``: ``--ensemble`` NSFs from different initialisations, trained on the same simulations and
  joined into their mixture (``PosteriorPlan(ensemble=...)``);
* ``cinn``: physppl's conditional invertible network, amortized;
* ``refined``: physppl's default job: the amortized NSF as the proposal of importance refinement against the
  task's likelihood (both tasks have one), with its tempered-SMC fallback where the proposal fails its check;
* ``apt``: physppl's APT: two rounds per observation, half the budget each (same total simulations).

Prints a Markdown table (mean and range of C2ST over the observations, training time, ratio to sbi).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from physppl.inference.calibration import c2st
from physppl.inference.apt import SequentialAPT
from physppl.inference.npe import fit_ensemble
from physppl.inference.priors import as_prior
from physppl.inference.refine import ConditionedEstimator, refine
from physppl.models.simulators.sbi_tasks import SLCP, TwoMoons
from physppl.simulation_inference.parts import ESTIMATORS, REFINE, TRAINER

from beam_sbi import sbi_npe  # noqa: E402 (this folder is on the path of a script run here)

log = logging.getLogger("sbibm_benchmark")

TASKS = {"two_moons": TwoMoons, "slcp": SLCP}
# sbibm's published C2ST, mean over observations 1-10 at 10^3, 10^4, 10^5 simulations (Lueckmann et al. 2021;
# github.com/sbi-benchmark/results, benchmarking_sbi/results/main_paper.csv): NPE and SNPE (APT, 10 rounds)
PUBLISHED_NPE = {"two_moons": (0.7251, 0.6064, 0.5417), "slcp": (0.9752, 0.9006, 0.8315)}
PUBLISHED_SNPE = {"two_moons": (0.6434, 0.5539, 0.5298), "slcp": (0.9652, 0.8445, 0.6656)}


def _trainer(max_epochs=None):
    """The engine's trainer, quiet, with the benchmark's epoch cap when one is given."""
    return TRAINER.build(progress=False, **({} if max_epochs is None else {"max_epochs": max_epochs}))


def _train_physppl(kind: str, prior, theta, x, max_epochs=None):
    est = ESTIMATORS[kind].build()(prior=prior, x_dim=x.shape[1])
    res = _trainer(max_epochs).fit(est, theta, x)
    return est, res.wall_time, _note(res.epochs, max_epochs)


def _note(epochs: int, cap) -> str:
    return f"{epochs} epochs" + (" (capped)" if cap is not None and epochs >= cap else "")


def _train_sbi(prior, theta, x, max_epochs=None):
    # the beam benchmark's sbi runner (the same NPE defaults), on this task's prior box
    sample, _, wall, note, _ = sbi_npe(theta, x, prior, max_epochs=max_epochs)
    return sample, wall, _note(int(note.split()[0]), max_epochs)


def run_task(name: str, refs: dict, args) -> list[dict]:
    task = TASKS[name]()
    prior = as_prior(task.prior)
    obs = torch.as_tensor(refs["observations"])[: args.n_obs]
    ref = refs["reference_samples"][: args.n_obs]
    rows = []

    def score(method, budget, sample_fn, train_s, note, extra=None):
        scores, t_inf = [], 0.0
        for k in range(len(obs)):
            t0 = time.perf_counter()
            d = np.asarray(sample_fn(k), dtype=float)
            t_inf += time.perf_counter() - t0
            scores.append(c2st(ref[k][: args.draws], d[: args.draws]))
        s = np.array(scores)
        row = {"task": name, "method": method, "simulations": budget, "train_s": train_s, "infer_s": t_inf / len(obs),
               "c2st_mean": float(s.mean()), "c2st_min": float(s.min()), "c2st_max": float(s.max()),
               "c2st": s.tolist(), "note": note, **(extra or {})}
        rows.append(row)
        log.info("%s %s %d: C2ST %.3f (%.3f-%.3f), training %.1f s, %s", name, method, budget, s.mean(), s.min(),
                 s.max(), train_s, note)
        if args.json:
            _write(args.json, rows_all + rows)

    for budget in args.budgets:
        theta = torch.as_tensor(refs["theta_train"][:budget])
        x = torch.as_tensor(refs["x_train"][:budget])
        torch.manual_seed(args.seed)
        if "sbi" in args.methods:
            sample, wall, note = _train_sbi(prior, theta, x, args.max_epochs)
            score("sbi NPE (NSF)", budget, lambda k: sample(obs[k], args.draws), wall, note)
        if "npe" in args.methods or "refined" in args.methods:
            torch.manual_seed(args.seed)
            est, wall, note = _train_physppl("nsf", prior, theta, x, args.max_epochs)
            if "npe" in args.methods:
                score("physppl NPE (NSF)", budget, lambda k: est.sample(obs[k], args.draws), wall, note)
            if "refined" in args.methods:
                infos = []

                def refined(k):
                    out = refine({"network": ConditionedEstimator(est, obs[k])},
                                 lambda th: task.log_likelihood(th, obs[k]), prior, args.draws, REFINE.build())
                    infos.append(out)
                    return out.draws
                score("physppl NPE + importance refinement", budget, refined, wall, note)
                rows[-1].update(pareto_k_max=max(o.pareto_k for o in infos), ess_min=min(o.ess for o in infos),
                                unreliable=sum(not o.reliable for o in infos),
                                smc_fallbacks=sum(o.smc is not None for o in infos),
                                methods=[o.method for o in infos])
                if rows[-1]["smc_fallbacks"] or rows[-1]["unreliable"]:
                    rows[-1]["note"] += (f"; SMC fallback on {rows[-1]['smc_fallbacks']}, flagged "
                                         f"{rows[-1]['unreliable']} of {len(infos)}")
        if "ensemble" in args.methods:
            torch.manual_seed(args.seed)
            make = lambda: ESTIMATORS["nsf"].build()(prior=prior, x_dim=x.shape[1])  # noqa: E731
            ens, results = fit_ensemble(_trainer(args.max_epochs), make, theta, x, args.ensemble, seed=args.seed)
            score(f"physppl NPE ensemble of {args.ensemble} (NSF)", budget, lambda k: ens.sample(obs[k], args.draws),
                  sum(r.wall_time for r in results), _note(sum(r.epochs for r in results), None) + " in all")
        if "cinn" in args.methods:
            torch.manual_seed(args.seed)
            est_c, wall, note = _train_physppl("cinn", prior, theta, x, args.max_epochs)
            score("physppl cINN", budget, lambda k: est_c.sample(obs[k], args.draws), wall, note)
        if "apt" in args.methods and budget in args.apt_budgets:
            torch.manual_seed(args.seed)
            half = budget // 2
            est0, wall0, _ = _train_physppl("nsf", prior, theta[:half], x[:half], args.max_epochs)
            walls, records = [], []

            def apt_draws(k):
                net = ESTIMATORS["nsf"].build()(prior=prior, x_dim=x.shape[1])
                net.load_state_dict(est0.state_dict())
                t0 = time.perf_counter()
                runner = SequentialAPT(_trainer(args.max_epochs), rounds=2, simulations_per_round=budget - half,
                                       seed=args.seed + k, stop_when_stalled=False)
                net, record = runner.run(net, prior, task.simulate, obs[k], theta=theta[:half], x=x[:half],
                                         trained=True)
                walls.append(time.perf_counter() - t0)
                records.append(record)
                return net.sample(obs[k], args.draws)
            score("physppl APT (2 rounds)", budget, apt_draws, wall0, "round 2 per observation: see infer_s")
            rows[-1]["train_s"] = wall0 + float(np.mean(walls))
    return rows


def _write(path, rows):
    from physppl.inference.outputs import write_json

    write_json(path, {"rows": rows})


rows_all: list[dict] = []


def print_table(rows_all: list[dict], n_obs: int, draws: int, threads: int) -> None:
    print(f"\nC2ST against sbibm's reference posteriors (observations 1-{n_obs}, {draws} draws; 0.5 = exact), "
          f"{threads} torch thread(s)\n")
    print("| task | method | simulations | C2ST mean | C2ST range | published (NPE; SNPE for APT) | training s | time / sbi | "
          "inference s per obs | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = {(r["task"], r["simulations"]): r for r in rows_all if r["method"].startswith("sbi")}
    budgets = [1000, 10_000, 100_000]
    for r in rows_all:
        b = base.get((r["task"], r["simulations"]))
        ratio = f"{r['train_s'] / b['train_s']:.2f}" if b else "-"
        pub = (PUBLISHED_SNPE if "APT" in r["method"] else PUBLISHED_NPE).get(r["task"])
        pub = pub[budgets.index(r["simulations"])] if pub and r["simulations"] in budgets else "-"
        print(f"| {r['task']} | {r['method']} | {r['simulations']:,} | {r['c2st_mean']:.3f} | {r['c2st_min']:.3f}-"
              f"{r['c2st_max']:.3f} | {pub} | {r['train_s']:.0f} | {ratio} | {r['infer_s']:.2f} | {r['note']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=Path, help="folder with two_moons.npz, slcp.npz (sbibm_export.py)")
    ap.add_argument("--table", default=None, help="print the table of an earlier run's --json file and stop")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--budgets", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--apt-budgets", type=int, nargs="+", default=[1000, 10_000])
    ap.add_argument("--methods", nargs="+", default=["sbi", "npe", "refined", "cinn", "apt"],
                    choices=["sbi", "npe", "ensemble", "refined", "cinn", "apt"])
    ap.add_argument("--ensemble", type=int, default=5, help="members of the ensemble method")
    ap.add_argument("--n-obs", type=int, default=10)
    ap.add_argument("--draws", type=int, default=5000, help="posterior and reference draws per observation for C2ST")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-epochs", type=int, default=None,
                    help="cap every method's epochs (default: each its own stopping rule; the note says when hit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows here (after every row)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print_table(saved["rows"], args.n_obs, args.draws, args.threads)
        return
    if args.refs is None:
        ap.error("--refs is required (or --table)")
    for name in args.tasks:
        path = args.refs / f"{name}.npz"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run experiments/benchmarks/sbibm_export.py in the sbibm venv first")
        rows_all.extend(run_task(name, dict(np.load(path)), args))
    print_table(rows_all, args.n_obs, args.draws, args.threads)
    if args.json:
        _write(args.json, rows_all)
        print(json.dumps({"written": args.json}))


if __name__ == "__main__":
    main()
