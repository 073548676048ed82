"""physppl.merge from Python: the same run as the command line, results in the file's units, your own parts."""
import math

import arviz as az
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import reciprocalspaceship as rs
import torch
from hydra import compose, initialize_config_module
from pyro.nn import PyroModule, PyroParam

import physppl
from physppl.cli import run
from physppl.inference.convert import pointwise_log_likelihood
from physppl.inference.fit import ProtocolError
from physppl.inference.runner import comparable_metrics
from physppl.merging.parts import ENGINES

SIM = dict(dmin=4.5, n_images=40, seed=0)
STEPS = 150


def _engine(**kw):
    return ENGINES["svi"].build(max_steps=STEPS, min_steps=STEPS, progress=False, **kw)


@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("python")
    res = physppl.merge(simulate=SIM, engine=_engine(), n_draws=100)
    res.save(out)
    return res, out


def test_python_and_command_line_give_the_same_run(python_run, tmp_path):
    res, out = python_run
    overrides = [f"data.simulate.{k}={v}" for k, v in SIM.items()] + [
        f"inference.max_steps={STEPS}", f"inference.min_steps={STEPS}", "inference.progress=false", "n_draws=100"]
    with initialize_config_module("physppl.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics = run(cfg, tmp_path / "cli")
    assert comparable_metrics(metrics) == comparable_metrics(res.metrics)
    cli = az.from_netcdf(tmp_path / "cli" / "posterior.nc")
    np.testing.assert_array_equal(cli.posterior["F"].values, res.idata.posterior["F"].values)
    ignore = {"checkpoint.pt", "checkpoint_halves.pt", "cli.log"}
    cli_files = {p.name for p in (tmp_path / "cli").iterdir() if p.is_file()} - ignore
    assert cli_files == {p.name for p in out.iterdir()}


def test_posterior_and_merged_mtz_hold_the_same_amplitudes_in_the_files_units(python_run, small_sim):
    res, out = python_run
    idata = az.from_netcdf(out / "posterior.nc")
    merged = rs.read_mtz(str(out / "merged.mtz"))
    post = idata.posterior["F"]
    keys = list(zip(*(post.coords[c].values for c in "HKL")))
    mtz = merged.loc[keys]
    mean, sd = post.mean(("chain", "draw")).values, post.std(("chain", "draw")).values
    # the MTZ has the guide's exact moments, posterior.nc 100 draws of the same q: they agree to Monte Carlo error
    # (the error of a mean of 100 draws is SIGF / 10; 5 of them bounds all 1,000 reflections)
    z = np.abs(mean - mtz["F"].to_numpy(float)) / (mtz["SIGF"].to_numpy(float) / 10)
    assert z.max() < 5
    assert np.median(np.abs(sd / mtz["SIGF"].to_numpy(float) - 1)) < 0.1
    # a reflection by its Miller index, as a user would ask for it
    h, k, l = keys[0]
    assert float(post.sel(refl=f"{h} {k} {l}").mean()) == pytest.approx(float(merged.loc[(h, k, l), "F"]),
                                                                        abs=5 * float(merged.loc[(h, k, l), "SIGF"]) / 10)
    # the observed intensities are the file's, and the recorded factor undoes the model's normalisation
    norm = res.metrics["intensity_norm"]
    assert float(idata.observed_data["I"].mean()) == pytest.approx(res.data.intensity.double().mean().item() * norm,
                                                                   rel=1e-6)
    assert float(idata.observed_data["I"].mean()) == pytest.approx(norm, rel=1e-5)  # the mean intensity of the file
    assert '"F": {"scale": %r' % math.sqrt(res.data.norm) in idata.posterior.attrs["physppl_rescaled"]


def test_log_likelihood_is_the_density_of_the_intensities_in_the_files_units(python_run):
    res, _ = python_run
    fit = res.fit
    internal = pointwise_log_likelihood(fit.model, fit.data, fit.draws)["I"]
    file_units = res.idata.log_likelihood["I"].values
    np.testing.assert_allclose(file_units, internal - math.log(res.data.norm), rtol=1e-10, atol=1e-8)


class CauchyLikelihood:
    """A user's noise model: Cauchy errors with the reported sigma as scale."""

    def __init__(self):
        self.calls = 0

    def __call__(self, loc, sigma):
        self.calls += 1
        return dist.Cauchy(loc, sigma)


class BlockScale(PyroModule):
    """A user's scale model: one log-scale per block of 10 images."""

    def __init__(self, n_images, n_features):
        super().__init__()
        self.log_k = PyroParam(torch.zeros((n_images + 9) // 10))

    def forward(self, image, metadata, inv_d2):
        return self.log_k[image // 10]


def test_a_users_likelihood_and_scale_model_plug_into_merge():
    lik = CauchyLikelihood()
    res = physppl.merge(simulate=SIM, likelihood=lik, scale=BlockScale, error_model=None, engine=_engine(),
                        n_draws=20, half_datasets=False)
    model = res.fit.model
    assert model.likelihood is lik and lik.calls > STEPS and isinstance(model.scale, BlockScale)
    assert model.scale.log_k.shape == (4,) and float(model.scale.log_k.detach().abs().max()) > 0  # it was trained
    assert res.metrics["cc_truth"] > 0.95  # a sensible merge of the simulated data with the user's parts
    assert np.isfinite(res.idata.log_likelihood["I"].values).all()


def test_parts_that_do_not_meet_their_protocol_are_named():
    class NoForward(torch.nn.Module):
        def __init__(self, n_images, n_features):
            super().__init__()

    class NotCallable:
        pass

    class WrongShape(PyroModule):
        def __init__(self, n_images, n_features):
            super().__init__()

        def forward(self, image, metadata, inv_d2):
            return torch.zeros(())

    small = dict(simulate=SIM, engine=_engine(), half_datasets=False)
    with pytest.raises(ProtocolError, match=r"NoForward .*ScaleModel.*missing method forward\(image, metadata, inv_d2\)"):
        physppl.merge(scale=NoForward, **small)
    with pytest.raises(ProtocolError, match=r"NotCallable .*Likelihood.*missing method __call__\(loc, sigma\)"):
        physppl.merge(likelihood=NotCallable(), **small)
    with pytest.raises(ProtocolError, match=r"WrongShape.forward returned \(\) for 4 observations"):
        physppl.merge(scale=WrongShape, **small)
    with pytest.raises(ValueError, match="unknown likelihood 'cauchy': choose one of normal, student_t, laplace"):
        physppl.merge(likelihood="cauchy", **small)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dmn'"):
        physppl.merge(dmn=2.0, **small)


def test_merge_takes_an_unmerged_dataset_and_leaves_the_callers_parameter_store_alone(small_sim):
    pyro.get_param_store().clear()
    pyro.param("users_own", torch.ones(2))
    threads = torch.get_num_threads()
    res = physppl.merge(small_sim[0], engine="weighted_mean", half_datasets=False, threads=1)
    assert list(pyro.get_param_store().keys()) == ["users_own"] and torch.get_num_threads() == threads
    assert res.metrics["engine"] == "weighted_mean" and len(res.mtz) == res.metrics["n_refl"]
    assert "log_likelihood" not in res.idata.groups()  # the weighted mean has no likelihood
    assert isinstance(res.table, pd.DataFrame) and {"H", "K", "L", "F", "SIGF"} <= set(res.table.columns)


def test_merged_mtz_has_history_and_the_asked_free_r_flags(tmp_path):
    """merged.mtz says what wrote it; free_r=0.05 adds new flags (about 5%), free_r=<file> keeps a user's by
    Miller index, and a file without flags is refused before any work."""
    import gemmi

    quick = ENGINES["svi"].build(max_steps=20, min_steps=20, progress=False)
    first = physppl.merge(simulate=SIM, engine=quick, n_draws=5, half_datasets=False, free_r=0.05)
    first.save(tmp_path / "a")
    # 20 steps cannot converge: the run says so, with the option that fixes it
    assert first.metrics["reliable"] is False and first.metrics["converged"] is False
    assert [w for w in first.metrics["warnings"] if w.startswith("not_converged")] == [
        "not_converged: step budget of 20 reached before the loss met the convergence test; raise the engine's "
        "max_steps (inference.max_steps on the command line)"]
    mtz = gemmi.read_mtz_file(str(tmp_path / "a" / "merged.mtz"))
    assert mtz.history[0].startswith("From physppl ") and "merge" in mtz.history[0]
    flags = first.mtz["R-free-flags"].to_numpy()
    assert set(np.unique(flags)) == {0, 1} and 0.03 < flags.mean() < 0.07
    again = physppl.merge(simulate=SIM, engine=quick, n_draws=5, half_datasets=False,
                          free_r=str(tmp_path / "a" / "merged.mtz"))
    np.testing.assert_array_equal(again.mtz["R-free-flags"].to_numpy(), flags)
    with pytest.raises(ValueError, match="no free-R column"):
        physppl.merge(simulate=SIM, engine=_engine(), free_r=str(small_mtz_without_flags(tmp_path)))


def small_mtz_without_flags(tmp_path):
    path = tmp_path / "noflags.mtz"
    ds = rs.DataSet({"H": [1], "K": [0], "L": [0], "F": [1.0]}, cell=[10, 10, 10, 90, 90, 90], spacegroup="P 1")
    ds = ds.astype({"H": "HKL", "K": "HKL", "L": "HKL", "F": "SFAmplitude"}).set_index(["H", "K", "L"])
    ds.write_mtz(str(path))
    return path
