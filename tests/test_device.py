"""``device=auto|cpu|cuda`` for every experiment: CPU runs are unchanged by the setting, a GPU run matches the CPU run
within float tolerance (skipped without CUDA), and asking for CUDA where there is none fails before any work."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from physppl.cli import run

# tiny settings per experiment, and the figures a GPU run must reproduce (name, relative tolerance)
JOBS = {
    "merging": (["+experiment=merging", "data.simulate.dmin=5.0", "data.simulate.n_images=30", "inference.max_steps=60",
                 "inference.min_steps=60", "inference.progress=false", "n_draws=20", "data.half_datasets=false"],
                [("cc_truth", 1e-3), ("final_loss", 1e-3)]),
    "md_weights": (["+experiment=md_weights", "data.simulate.labels=[0,0,1,1,2,2]", "data.simulate.truth=frames",
                    "data.simulate.dmin=5.0", "warm_start_steps=40", "cc_steps=60", "n_draws=40",
                    "inference.progress=false", "inference.max_steps=120", "inference.min_steps=120"],
                   [("cc", 1e-3)]),
    "beam_sbi": (["+experiment=beam_sbi", "data.n_simulations=600", "data.n_observations=2",
                  "inference.amortized.max_epochs=2", "inference.amortized.progress=false", "inference.focus.steps=40",
                  "inference.focus.progress=false", "inference.focus.particles=32", "evaluate.sbc=0",
                  "evaluate.reference=false", "evaluate.plots=0", "n_draws=300", "guide.n_transforms=1",
                  "guide.hidden_dims=[16]", "guide.embedding_dims=[32]", "guide.context_dim=16"],
                 [("best_val_loss", 1e-2)]),
    "vae": (["+experiment=vae_digits", "model.latent_dim=4", "inference.progress=false", "training.epochs=2",
             "training.eval_particles=1", "evaluation.iwae_particles=20", "evaluation.max_points=60",
             "evaluation.gap_points=0", "evaluation.posterior_batch=8", "n_draws=10", "model.hidden=[32]",
             "guide.hidden=[32]", "evaluation.figures=false"],
            [("test_elbo", 1e-3)]),
}


def _cfg(job: str, device: str, tmp_path):
    overrides = [*JOBS[job][0], f"device={device}"]
    if job == "beam_sbi":
        overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
    with initialize_config_module("physppl.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_merging_runs_the_same_with_device_cpu_and_auto_on_a_cpu_machine(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("auto means CUDA here")
    a = run(_cfg("merging", "cpu", tmp_path), tmp_path / "cpu")
    b = run(_cfg("merging", "auto", tmp_path), tmp_path / "auto")
    assert a["device"] == b["device"] == "cpu"
    assert a["final_loss"] == b["final_loss"] and a["cc_truth"] == b["cc_truth"]


@pytest.mark.parametrize("job", ["merging", "md_weights", "vae"])
def test_asking_for_cuda_without_a_gpu_fails_before_training(job, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        run(_cfg(job, "cuda", tmp_path), tmp_path / "out")
    assert not (tmp_path / "out" / "posterior.nc").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("job", sorted(JOBS))
def test_gpu_run_matches_cpu_run(job, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = run(_cfg(job, "cpu", tmp_path), tmp_path / "cpu")
    gpu = run(_cfg(job, "cuda", tmp_path), tmp_path / "gpu")
    saved = json.loads((tmp_path / "gpu" / "metrics.json").read_text())
    assert saved.get("device", "cuda").startswith("cuda") or job == "beam_sbi"
    for name, rtol in JOBS[job][1]:
        assert gpu[name] == pytest.approx(cpu[name], rel=rtol), name
