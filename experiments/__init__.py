"""physppl: probabilistic models for inverse problems in the physical sciences, in Pyro.

One call per problem, each returning a :class:`~physppl.inference.runner.Result` (``.idata``, ``.metrics``,
``.save(directory)``) and each the function the command line runs:

* :func:`merge` -- scaling and merging unmerged X-ray diffraction intensities, monochromatic or Laue, one data set or
  several in one model (``physppl +experiment=merging``, ``+experiment=merging_laue``)
* :func:`difference_map` -- an isomorphous difference map between two merged data sets (``+experiment=difference_map``)
* :func:`weigh_frames` -- weights of MD frames against diffuse scattering (``+experiment=md_weights``)
* :func:`infer_sbi` -- posteriors of any simulator's parameters by simulation-based inference: NPE with a spline
  flow or a conditional invertible network, APT rounds, likelihood-based refinement, SBC (``+experiment=sbi``)
* :func:`infer_beam` -- beam parameters from knife-edge scans by simulation-based inference (``+experiment=beam_sbi``)
* :func:`train_vae` -- a variational autoencoder on Ising configurations, digits or your arrays (``+experiment=vae_*``)
* :func:`train_rbm` -- a restricted Boltzmann machine on digits, Ising configurations or your arrays (``+experiment=rbm_digits``)
* :func:`rbm_thermodynamics` -- one RBM per temperature on Ising Monte Carlo data, and its observables (``+experiment=rbm_ising``)
* :func:`infer_couplings` -- couplings and fields of an Ising model from spin samples, with posteriors (``+experiment=inverse_ising``)

and below them, for your own model and guide: :func:`fit` (SVI, NUTS or MAP; any engine with a ``fit`` method)
and :func:`to_inference_data`.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

import pyro

# Parameters live in each PyroModule, not in Pyro's global parameter store: two fits in one process share nothing,
# a checkpoint is a state_dict, and the training loop is a plain torch optimiser over module.parameters(). Set on
# import, before any physppl module is built (a PyroModule built in the other mode cannot be used in this one).
pyro.settings.set(module_local_params=True)

try:
    __version__ = version("physppl")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

# name -> module that defines it; imported on first use, so `import physppl` stays cheap
_API = {
    "merge": "physppl.merging.api",
    "MergeResult": "physppl.merging.api",
    "difference_map": "physppl.merging.difference_map",
    "DifferenceMapResult": "physppl.merging.difference_map",
    "weigh_frames": "physppl.md_weights.api",
    "FrameWeightsResult": "physppl.md_weights.api",
    "infer_sbi": "physppl.simulation_inference.api",
    "SBIResult": "physppl.simulation_inference.api",
    "infer_beam": "physppl.beam_sbi.api",
    "BeamResult": "physppl.beam_sbi.api",
    "train_vae": "physppl.vae.api",
    "VAEResult": "physppl.vae.api",
    "train_rbm": "physppl.rbm.api",
    "RBMResult": "physppl.rbm.api",
    "rbm_thermodynamics": "physppl.rbm.thermodynamics",
    "ThermodynamicsResult": "physppl.rbm.thermodynamics",
    "infer_couplings": "physppl.inverse_ising.api",
    "CouplingsResult": "physppl.inverse_ising.api",
    "fit": "physppl.inference.fit",
    "Fit": "physppl.inference.fit",
    "to_inference_data": "physppl.inference.convert",
    "Rescale": "physppl.inference.convert",
    "summarize": "physppl.inference.convert",
    "Result": "physppl.inference.runner",
    "JobSettings": "physppl.inference.runner",
    "SVIEngine": "physppl.inference.svi",
    "NUTSEngine": "physppl.inference.nuts",
    "MAPEngine": "physppl.inference.map",
    "ClippedAdam": "physppl.inference.optim",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'physppl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
