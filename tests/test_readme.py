"""Every Python snippet of README.md runs exactly as printed.

The snippets run in a folder holding the files they name (a small simulated unmerged MTZ, MD frames and observed
intensities, knife-edge scans). Only the training budgets behind the defaults are cut (fewer steps, epochs and
simulations, a small Ising set), by patching the presets the functions read; the code itself is the README's.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import physppl
from physppl.beam_sbi import api as beam_api
from physppl.beam_sbi import parts as beam_parts
from physppl.md_weights import api as md_api
from physppl.md_weights import parts as md_parts
from physppl.merging import parts as merging_parts
from physppl.inverse_ising import api as couplings_api
from physppl.inverse_ising import parts as couplings_parts
from physppl.inverse_ising.data import SimulatedSpins
from physppl.rbm import api as rbm_api
from physppl.rbm import parts as rbm_parts
from physppl.rbm import thermodynamics as rbm_thermo
from physppl.simulation_inference import api as sbi_api
from physppl.simulation_inference import parts as sbi_parts
from physppl.vae import api as vae_api
from xtal_tools import write_laue_pair, write_toy_models

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.fixture
def small_budgets(monkeypatch, tmp_path):
    """The defaults' budgets, cut: the same code paths in seconds."""
    monkeypatch.setenv("PHYSPPL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PHYSPPL_CACHE_DIR", str(tmp_path / "cache"))
    for preset in (merging_parts.ENGINES["svi"], merging_parts.ENGINES["svi_long"], md_parts.ENGINES["svi"]):
        for key, value in (("max_steps", 60), ("min_steps", 60), ("progress", False)):
            monkeypatch.setitem(preset.kwargs, key, value)
    for key, value in (("cc_steps", 50), ("warm_start_steps", 30), ("n_draws", 40)):
        monkeypatch.setitem(md_api.weigh_frames.__kwdefaults__, key, value)
    for key, value in (("max_epochs", 2), ("progress", False)):
        monkeypatch.setitem(beam_parts.NPE_TRAINER.kwargs, key, value)
    for key, value in (("steps", 20), ("particles", 32), ("progress", False)):
        monkeypatch.setitem(beam_parts.FOCUS.kwargs, key, value)
    monkeypatch.setitem(beam_api.infer_beam.__kwdefaults__, "n_draws", 300)
    monkeypatch.setitem(beam_api.infer_beam.__kwdefaults__, "evaluate",
                        beam_api.Evaluation(reference=False, sbc=20, sbc_draws=20, plots=1, predictive_draws=20))
    for key, value in (("max_epochs", 2), ("progress", False)):
        monkeypatch.setitem(sbi_parts.TRAINER.kwargs, key, value)
    for key, value in (("n_proposal", 2000), ("mcmc_steps", 2), ("max_mcmc_steps", 5), ("smc_particles", 1000),
                       ("smc_max_moves", 8)):
        monkeypatch.setitem(sbi_parts.REFINE.kwargs, key, value)
        monkeypatch.setitem(beam_parts.BEAM_REFINE.kwargs, key, value)
    monkeypatch.setitem(sbi_api.infer_sbi.__kwdefaults__, "n_draws", 300)
    monkeypatch.setitem(sbi_api.infer_sbi.__kwdefaults__, "evaluate", sbi_api.Calibration(sbc=20, sbc_draws=10, plots=0))
    small_training = dict(epochs=2)
    small_evaluation = dict(iwae_particles=20, max_points=40, gap_points=0, posterior_batch=8)
    monkeypatch.setitem(vae_api.train_vae.__kwdefaults__, "training", vae_api.Training(**small_training))
    monkeypatch.setitem(vae_api.train_vae.__kwdefaults__, "evaluation", vae_api.Evaluation(**small_evaluation))
    # a snippet that sets these itself (the Ising run) gets the same cuts on top of its own values
    real_training, real_evaluation = vae_api.Training, vae_api.Evaluation
    monkeypatch.setattr(vae_api, "Training", lambda **kw: real_training(**{**kw, **small_training}))
    monkeypatch.setattr(vae_api, "Evaluation", lambda **kw: real_evaluation(**{**kw, **small_evaluation}))
    small_ising = lambda: vae_api.IsingDataSource(L=8, n_temperatures=6, n_per_temperature=30, n_chains=10,  # noqa: E731
                                                  thermalize=20, every=2, cache=False, progress=False)
    monkeypatch.setitem(vae_api.DATASETS, "ising", small_ising)
    for key, value in (("epochs", 2), ("progress", False)):
        monkeypatch.setitem(rbm_parts.ENGINES["cd"].kwargs, key, value)
    monkeypatch.setitem(rbm_api.train_rbm.__kwdefaults__, "evaluation", rbm_api.Evaluation(ais_chains=20, ais_betas=200))
    for key, value in (("temperatures", [2.27]), ("n_per_temperature", 200), ("n_chains", 4), ("thermalize", 20),
                       ("every", 2), ("cache", False), ("progress", False)):
        monkeypatch.setitem(rbm_thermo.DEFAULT_DATA.kwargs, key, value)
    monkeypatch.setitem(rbm_thermo.rbm_thermodynamics.__kwdefaults__, "sampling",
                        rbm_thermo.Sampling(n_chains=4, burn_in=10, n_samples=5, thin=1))
    for key, value in (("max_steps", 60), ("min_steps", 60), ("progress", False)):
        monkeypatch.setitem(couplings_parts.ENGINES["svi"].kwargs, key, value)
    monkeypatch.setitem(couplings_api.DATASETS, "ferromagnet", lambda: SimulatedSpins(n_samples=300))
    # the user's own run asks for these budgets explicitly: cut them where the snippet's code reads them
    real_svi, real_nuts = physppl.SVIEngine, physppl.NUTSEngine
    monkeypatch.setattr(physppl, "SVIEngine", lambda **kw: real_svi(**{**kw, "max_steps": 200, "progress": False}))
    monkeypatch.setattr(physppl, "NUTSEngine", lambda **kw: real_nuts(**{**kw, "num_samples": 30, "warmup_steps": 30,
                                                                         "progress": False}))


@pytest.fixture
def user_files(tmp_path, small_sim):
    """The files the snippets name, in the folder they run in."""
    from physppl.beam_sbi.data import fixed_observations, save_scans_npy
    from physppl.md_weights.data import MDWeightsDataSource
    from physppl.models.beam import KnifeEdgeBeamModel

    small_sim[0].write_mtz(str(tmp_path / "unmerged.mtz"))
    source = MDWeightsDataSource(simulate={"n_frames": 12, "dmin": 4.0, "seed": 1})
    frames, diffuse, bragg, _ = source._simulated()
    source.write(frames, diffuse, bragg, tmp_path)
    save_scans_npy(tmp_path / "scans.npy", fixed_observations(KnifeEdgeBeamModel(), 2, seed=3)[1])
    # a time-resolved Laue pair and toy models of its two states (the chromophore: residue HC4)
    write_laue_pair(tmp_path, names=("off", "2ms"))
    write_toy_models(tmp_path, (34.0, 45.0, 52.0, 90.0, 90.0, 90.0), "P 21 21 21", site="HC4", names=("off", "2ms"))
    return tmp_path


def test_readme_has_a_python_snippet_for_every_problem():
    text = "\n".join(SNIPPETS)
    for call in ("physppl.merge(", "physppl.weigh_frames(", "physppl.infer_beam(", "physppl.infer_sbi(", "physppl.train_vae(",
                 "physppl.train_rbm(", "physppl.rbm_thermodynamics(", "physppl.infer_couplings(",
                 "physppl.fit(", "physppl.to_inference_data("):
        assert call in text, call


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs_as_printed(index, small_budgets, user_files, monkeypatch):
    monkeypatch.chdir(user_files)
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index + 1}", "exec"), namespace)
    results = [v for v in namespace.values() if isinstance(v, physppl.Result)]
    fits = [v for v in namespace.values() if isinstance(v, physppl.Fit)]
    from physppl.models.rbm import BernoulliRBM

    rbms = [v for v in namespace.values() if isinstance(v, BernoulliRBM)]
    assert results or fits or rbms, "a snippet shows a run"
    for rbm in rbms:  # two patterns (entropy log 2 = 0.69 nats): far below the untrained 8 log 2 = 5.5
        assert float(-rbm.log_prob_exact(namespace["data"]).mean()) < 1.5
    for res in results:
        # draws of the latents, or (the RBMs' thermodynamics) of the model's own Gibbs chains
        assert {"posterior", "posterior_predictive"} & set(res.idata.groups()) and res.metrics["problem"]
    if "res" in namespace and isinstance(namespace["res"], physppl.MergeResult):
        res = namespace["res"]
        f = res.idata.posterior["F"]
        # in the file's units: F^2 is on the scale of the file's intensities, not of intensities over their mean
        assert float((f.mean(("chain", "draw")) ** 2).mean()) == pytest.approx(float(res.mtz["I"].mean()), rel=0.1)
        assert res.metrics["intensity_norm"] > 10
    if "idata" in namespace and "fit" in namespace:
        idata = namespace["idata"]
        assert set(idata.posterior.data_vars) == {"a", "tau"} and idata.log_likelihood["y"].dims[-1] == "obs"
        assert float(idata.posterior["a"].mean()) == pytest.approx(2.0, abs=0.3)
    if (user_files / "merged_run").exists():
        assert {"merged.mtz", "posterior.nc", "summary.csv", "metrics.json"} <= {
            p.name for p in (user_files / "merged_run").iterdir()}
    assert np.isfinite(torch.zeros(1).numpy()).all()


def test_readme_command_lines_compose():
    """Every ``physppl`` command line of README.md is a valid configuration (no option renamed away)."""
    from readme_tools import composed_configs

    configs = composed_configs(README)
    assert len(configs) >= 10
    for overrides, cfg in configs:
        assert cfg.task.startswith("physppl.") and cfg.task.endswith(".task"), overrides
