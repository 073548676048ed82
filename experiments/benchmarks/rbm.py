"""RBM benchmark: physppl's RBM against scikit-learn's ``BernoulliRBM`` (persistent CD, SGD), side by side in one run.

Both train the same number of hidden units on the same training split; scikit-learn gets the same wall time as
physppl's training (its ``n_iter`` is set from a timed first epoch, then checked), so the held-out log-likelihoods
compare at equal time. Both are scored by physppl's evaluation (scikit-learn's weights are copied into a
``BernoulliRBM``): exact log Z on 4x4 Ising (16 visible units), AIS with its error bar on the 8x8 digits, on the same
test split. Gibbs throughput: block-Gibbs sweeps of 1,000 chains per second for each (scikit-learn's ``gibbs`` is one
sweep per call). Last, the RBM against physppl's VAE on the same digits split (held-out AIS log-likelihood vs IWAE,
nats per image).

    python experiments/benchmarks/rbm.py                       # all three tables
    python experiments/benchmarks/rbm.py --skip-vae --epochs 100
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from functools import partial

import numpy as np
import pandas as pd
import torch

import physppl
from physppl.inference.contrastive import ContrastiveDivergence
from physppl.models.rbm import BernoulliRBM, to_binary
from physppl.rbm.api import log_likelihood
from physppl.rbm.options import Evaluation
from physppl.vae.data import DigitsDataSource, IsingDataSource


def _split(source):
    d = source.load()
    v = to_binary(d.x, d.source)
    return d, v[np.sort(np.concatenate([d.split["train"], d.split["val"]]))], v[d.split["test"]]


def _sklearn_rbm(n_hidden: int, n_iter: int, seed: int, lr: float, batch_size: int):
    from sklearn.neural_network import BernoulliRBM as SkRBM

    return SkRBM(n_components=n_hidden, learning_rate=lr, batch_size=batch_size, n_iter=n_iter, random_state=seed)


def _as_physppl(sk, n_visible: int) -> BernoulliRBM:
    rbm = BernoulliRBM(n_visible, sk.components_.shape[0])
    with torch.no_grad():
        rbm.W.copy_(torch.as_tensor(sk.components_.T, dtype=torch.float64))
        rbm.a.copy_(torch.as_tensor(sk.intercept_visible_, dtype=torch.float64))
        rbm.b.copy_(torch.as_tensor(sk.intercept_hidden_, dtype=torch.float64))
    return rbm


def equal_time(name: str, v_train: torch.Tensor, v_test: torch.Tensor, n_hidden: int, engine: ContrastiveDivergence,
               ev: Evaluation, sk_lrs: tuple[float, ...], sk_batch: int, seed: int = 0) -> list[dict]:
    rbm = BernoulliRBM(v_train.shape[1], n_hidden, seed=seed).init_from_data(v_train)
    t0 = time.perf_counter()
    engine.run(rbm, v_train)
    t_physppl = time.perf_counter() - t0
    ll = log_likelihood(rbm, v_test, ev, seed=seed, base=None)
    rows = [{"data": name, "method": f"physppl {engine.negative}-{engine.k} ({engine.epochs} epochs)",
             "train_s": t_physppl, "test_ll": ll["mean"], "se": ll["se"], "log_z": ll["method"]}]
    x = v_train.numpy()
    _sklearn_rbm(n_hidden, 1, seed, sk_lrs[0], sk_batch).fit(x)  # warm-up: the first call pays for imports
    for lr in sk_lrs:
        n_iter, t_sk, sk = 2, 0.0, None
        for _ in range(4):  # scale n_iter until scikit-learn's training time is within 10% of physppl's
            sk = _sklearn_rbm(n_hidden, n_iter, seed, lr, sk_batch)
            t0 = time.perf_counter()
            sk.fit(x)
            t_sk = time.perf_counter() - t0
            if abs(t_sk / t_physppl - 1) < 0.1:
                break
            n_iter = max(1, int(round(n_iter * t_physppl / t_sk)))
        ll_sk = log_likelihood(_as_physppl(sk, v_train.shape[1]), v_test, ev, seed=seed)
        rows.append({"data": name, "method": f"sklearn PCD, lr {lr:g} ({n_iter} iterations)", "train_s": t_sk,
                     "test_ll": ll_sk["mean"], "se": ll_sk["se"], "log_z": ll_sk["method"]})
    return rows


def gibbs_throughput(n_visible: int, n_hidden: int, chains: int = 1000, sweeps: int = 200, seed: int = 0) -> dict:
    from sklearn.neural_network import BernoulliRBM as SkRBM

    rng = np.random.default_rng(seed)
    v = (rng.random((chains, n_visible)) < 0.5).astype(np.float64)
    sk = SkRBM(n_components=n_hidden, n_iter=1, random_state=seed).fit(v[:100])
    rbm = _as_physppl(sk, n_visible)
    out = {}
    for name, sweep in (("physppl", lambda x: rbm.gibbs(x, sweeps)),
                        ("sklearn", lambda x: [x := sk.gibbs(x) for _ in range(sweeps)][-1])):
        x = torch.as_tensor(v) if name == "physppl" else v
        sweep(x)  # warm-up
        t0 = time.perf_counter()
        sweep(x)
        out[name] = sweeps * chains / (time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="physppl's epoch budget (default: its engine's)")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    engine = ContrastiveDivergence(progress=False, seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    ev = Evaluation()
    rows = []
    ising = IsingDataSource(L=4, temperatures=[2.27], n_per_temperature=5000, progress=False)
    _, tr, te = _split(ising)
    # scikit-learn's defaults (lr 0.1, batch 10), as a user would reach for them, and a smaller rate
    rows += equal_time("Ising 4x4, T=2.27 (exact)", tr, te, 32, engine, ev, sk_lrs=(0.1, 0.01), sk_batch=10,
                       seed=args.seed)
    _, tr, te = _split(DigitsDataSource())
    rows += equal_time("digits 8x8 (AIS)", tr, te, 64, engine, ev, sk_lrs=(0.1, 0.01), sk_batch=10, seed=args.seed)
    table = pd.DataFrame(rows)
    ratio = []
    for name, g in table.groupby("data", sort=False):
        best = g.iloc[1:]["test_ll"].idxmax()  # scikit-learn's better learning rate
        ratio.append({"data": name, "delta_ll (physppl - best sklearn, nats)": g["test_ll"].iloc[0] - g.loc[best, "test_ll"],
                      "time ratio (sklearn / physppl)": g.loc[best, "train_s"] / g["train_s"].iloc[0]})
    print("\n## Held-out log-likelihood at equal training time (nats per sample)\n")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print()
    print(pd.DataFrame(ratio).to_markdown(index=False, floatfmt=".3g"))
    print("\n## Block-Gibbs sweeps x chains per second (1,000 chains)\n")
    g_rows = []
    for nv, nh in ((16, 32), (64, 64), (784, 500)):
        g = gibbs_throughput(nv, nh)
        g_rows.append({"visible x hidden": f"{nv} x {nh}", "physppl": g["physppl"], "sklearn": g["sklearn"],
                       "ratio (physppl / sklearn)": g["physppl"] / g["sklearn"]})
    print(pd.DataFrame(g_rows).to_markdown(index=False, floatfmt=".3g"))
    if not args.skip_vae:
        print("\n## RBM vs VAE on the digits test split (nats per image)\n")
        t0 = time.perf_counter()
        rbm = physppl.train_rbm("digits", model=partial(BernoulliRBM, n_hidden=64), seed=args.seed,
                                threads=args.threads, engine=engine)
        t_rbm = time.perf_counter() - t0
        t0 = time.perf_counter()
        vae = physppl.train_vae("digits", seed=args.seed, threads=args.threads)
        t_vae = time.perf_counter() - t0
        m, mv = rbm.metrics, vae.metrics
        print(pd.DataFrame([
            {"model": "RBM, 64 hidden (CD-10)", "held-out log-likelihood": m["test_log_likelihood"],
             "se": m["test_log_likelihood_se"], "estimator": f"AIS ({m['ais_chains']} x {m['ais_betas']})",
             "n_test": m["n_test"], "wall_s": t_rbm},
            {"model": f"VAE, latent {mv['latent_dim']} (Pyro example)", "held-out log-likelihood": mv["test_iwae"],
             "se": mv["test_iwae_sem"], "estimator": f"IWAE ({mv['iwae_particles']} particles, a lower bound)",
             "n_test": mv["iwae_points"], "wall_s": t_vae},
        ]).to_markdown(index=False, floatfmt=".4g"))
        print(f"\nRBM - VAE: {m['test_log_likelihood'] - mv['test_iwae']:+.3f} nats per image "
              f"(standard error {math.hypot(m['test_log_likelihood_se'], mv['test_iwae_sem']):.3f})")


if __name__ == "__main__":
    main()
