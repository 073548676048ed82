"""VAE benchmark: physppl's Pyro VAE against the same network in plain PyTorch, trained side by side in one run.

Every method trains the same architecture (Pyro's example: one hidden layer of 400 softplus units, latent 50,
Bernoulli pixels) from the same initial weights on the same minibatches and with the same random draws (the
global RNG is re-seeded per step), one step of each in turn (the order alternates), so step times are measured
under the same machine load and the held-out figures differ only by implementation. The table gives held-out
ELBO and IWAE (k importance samples) on the test split, the IWAE difference to plain PyTorch on the same test
samples (paired, with its standard error), the median CPU time per step (this process's CPU time: robust to other
processes on a shared machine) and wall time per step, throughput and the step-time ratio to plain PyTorch.

    python experiments/benchmarks/vae.py                                   # digits (200 epochs), Ising L=32 (25)
    python experiments/benchmarks/vae.py --datasets digits --epochs 50 --threads 1 2

Methods: ``torch`` (hand-written ELBO with analytic KL, ``torch.optim.Adam``); ``pyro`` (``VAEModel`` +
``VAEGuide`` with Pyro's ``TraceMeanField_ELBO`` as a module and a torch optimiser over both modules' parameters,
the step :class:`SVIEngine` takes, with the optimiser of the experiment configs: physppl's ``ClippedAdam``, lr
1e-3, no decay, no clipping); ``pyro_iaf`` (the guide with a two-layer IAF head: the richer posterior);
optionally ``pyro_adam`` (the same ELBO with ``torch.optim.Adam``).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from physppl.vae.data import DigitsDataSource, IsingDataSource
from physppl.vae.torch_baseline import TorchVAE
from physppl.guides.vae import VAEGuide
from physppl.inference.iwae import importance_log_weights
from physppl.inference.optim import ClippedAdam
from physppl.models.vae import VAEModel

REPO = Path(__file__).resolve().parents[2]
EPOCHS = {"digits": 200, "ising": 25}
METHODS = ("torch", "pyro", "pyro_adam", "pyro_iaf")
DEFAULT_METHODS = ("torch", "pyro", "pyro_iaf")


def load(name: str, ising_l: int):
    if name == "digits":
        d = DigitsDataSource().load()
    else:
        d = IsingDataSource(L=ising_l, progress=True).load()
    train = np.concatenate([d.split["train"], d.split["val"]])  # no early stopping here: fixed epochs
    return d.x[train], d.x[d.split["test"]], d.event_shape


class PyroMethod:
    def __init__(self, shape, latent: int, hidden: int, lr: float, flow=None, optim="clipped_adam"):
        self.model = VAEModel(shape, latent, hidden=[hidden])
        self.guide = VAEGuide(shape, latent, hidden=[hidden], flow=flow)
        # the step SVIEngine takes: the ELBO as a module, a torch optimiser over the modules' own parameters
        self.loss = TraceMeanField_ELBO()(self.model, self.guide)
        if optim == "clipped_adam":
            self.opt = ClippedAdam(lr=lr, lrd=1.0, clip_norm=1e10)({"model": self.model, "guide": self.guide})
        else:
            self.opt = torch.optim.Adam(self.loss.parameters(), lr=lr)

    def step(self, x, idx):
        self.opt.zero_grad()
        loss = self.loss(x=x, subsample=idx)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def log_weights(self, x, k):
        return importance_log_weights(self.model, self.guide, x.shape[0], k, {"x": x}, batch_size=32)


class TorchMethod:
    def __init__(self, shape, latent: int, hidden: int, lr: float):
        self.vae = TorchVAE(shape, latent, hidden=[hidden])
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=lr)

    def step(self, x, idx):
        loss = self.vae.loss(x[idx], n_data=x.shape[0])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss)

    def log_weights(self, x, k):
        out = [self.vae.log_weights(x[i:i + 32], k, chunk=100) for i in range(0, x.shape[0], 32)]
        return torch.cat(out, 1)


def bench(name: str, args, threads: int, batch_size: int) -> list[dict]:
    torch.set_num_threads(threads)
    pyro.set_rng_seed(args.seed)
    pyro.enable_validation(False)  # as the physppl app runs by default
    x_train, x_test, shape = load(name, args.ising_l)
    if args.max_test and len(x_test) > args.max_test:
        x_test = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[: args.max_test]]
    methods = {}
    for m in args.methods:
        if m == "torch":
            methods[m] = TorchMethod(shape, args.latent, args.hidden, args.lr)
        else:
            methods[m] = PyroMethod(shape, args.latent, args.hidden, args.lr,
                                    flow="iaf" if m == "pyro_iaf" else None,
                                    optim="adam" if m == "pyro_adam" else "clipped_adam")
    # identical initial weights for the shared architecture (the IAF head has its own extra layers)
    ref = next((v.vae for v in methods.values() if isinstance(v, TorchMethod)), None)
    for v in methods.values():
        if isinstance(v, PyroMethod) and ref is not None:
            v.model.decoder.load_state_dict(ref.decoder.state_dict())
            v.guide.encoder.load_state_dict(ref.encoder.state_dict())
    epochs = args.epochs or EPOCHS[name]
    n, b = x_train.shape[0], batch_size
    gen = torch.Generator().manual_seed(args.seed)
    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    last_loss = {m: float("nan") for m in methods}
    order = list(methods)
    t_start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(n // b):
            idx = perm[s * b:(s + 1) * b]
            order.reverse()  # alternate which method goes first
            step += 1
            for m in order:
                torch.manual_seed(args.seed * 1_000_003 + step)  # the same draws for every method
                c0, t0 = time.process_time(), time.perf_counter()
                last_loss[m] = methods[m].step(x_train, idx)
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
        if (epoch + 1) % max(1, epochs // 10) == 0:
            losses = ", ".join(f"{m} {last_loss[m] / n:.2f}" for m in methods)
            print(f"[{name}, batch {b}] epoch {epoch + 1}/{epochs}: {losses} ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)
    rows = []
    cpu_torch, wall_torch = float(np.median(cpu["torch"])), float(np.median(times["torch"]))
    iwae_torch = None
    for m, meth in methods.items():
        pyro.set_rng_seed(args.seed + 1)
        t0 = time.perf_counter()
        lw = meth.log_weights(x_test, args.iwae_particles)
        iwae = torch.logsumexp(lw, 0) - math.log(lw.shape[0])
        if m == "torch":
            iwae_torch = iwae
        diff = iwae - iwae_torch
        step_cpu, step_wall = float(np.median(cpu[m])), float(np.median(times[m]))
        rows.append({"data": name, "method": m, "threads": threads, "epochs": epochs, "steps": len(times[m]),
                     "batch": b, "n_train": n, "n_test": len(x_test),
                     "heldout_elbo": float(lw.mean()), "iwae": float(iwae.mean()),
                     "iwae_sem": float(iwae.std() / math.sqrt(len(iwae))),
                     "iwae_minus_torch": float(diff.mean()),
                     "iwae_minus_torch_sem": float(diff.std() / math.sqrt(len(diff))),
                     "cpu_ms": 1e3 * step_cpu, "wall_ms": 1e3 * step_wall,
                     "overhead_cpu_ms": 1e3 * (step_cpu - cpu_torch),
                     "samples_per_s": b / step_wall, "cpu_ratio_to_torch": step_cpu / cpu_torch,
                     "wall_ratio_to_torch": step_wall / wall_torch,
                     "train_s": float(np.sum(times[m])), "eval_s": time.perf_counter() - t0})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "ising"], choices=["digits", "ising"])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=None, help="default: 200 for digits, 25 for Ising")
    p.add_argument("--batch-size", type=int, nargs="+", default=[128], help="each a full run")
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--latent", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--iwae-particles", type=int, default=1000)
    p.add_argument("--max-test", type=int, default=None, help="score at most this many test samples")
    p.add_argument("--ising-l", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch intra-op threads (each a full run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "vae")
    args = p.parse_args()
    args.methods = ["torch", *[m for m in args.methods if m != "torch"]]  # the reference comes first
    rows = []
    for threads in args.threads:
        for name in args.datasets:
            for batch in args.batch_size:
                rows += bench(name, args, threads, batch)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "vae_benchmark.csv", index=False)
    meta = {"torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(), "args": vars(args)}
    (args.out / "vae_benchmark.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    cols = ["data", "method", "threads", "batch", "epochs", "heldout_elbo", "iwae", "iwae_minus_torch",
            "iwae_minus_torch_sem", "cpu_ms", "overhead_cpu_ms", "cpu_ratio_to_torch", "wall_ms", "wall_ratio_to_torch",
            "samples_per_s"]
    shown = table[cols]
    print(shown.to_markdown(index=False, floatfmt=".3f"))
    print(f"\ntorch {torch.__version__}, pyro {pyro.__version__}; held-out ELBO = mean log-weight over "
          f"{args.iwae_particles} draws; IWAE k={args.iwae_particles}; cpu_ms / wall_ms = median CPU / wall time "
          "per training step; ratios to plain torch measured in the same run")


if __name__ == "__main__":
    main()
