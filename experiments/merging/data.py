"""From an unmerged rs.DataSet to the tensors of the merging model: ASU mapping, reflection ids, metadata."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import reciprocalspaceship as rs
import torch

from physppl.io.mtz import MTZInputError, read_unmerged_mtz
from physppl.models.components.wilson import wilson_sigma_by_resolution
from physppl.models.simulators.merging import simulate_unmerged

from .french_wilson import french_wilson_moments
from .weighted_mean import ScaledWeightedMean, weighted_mean

__all__ = ["MergingData", "prepare", "MergingDataSource", "french_wilson", "initial_estimates", "METADATA_CHOICES"]

log = logging.getLogger(__name__)

# Metadata the scale model can use: MTZ columns, plus these derived ones.
METADATA_CHOICES = ("BATCH", "dHKL", "Hobs", "Kobs", "Lobs")
# Used when present, skipped with a warning when not: not every integration program writes them.
OPTIONAL_METADATA = ("XDET", "YDET")


@dataclass
class MergingData:
    """Unmerged observations as tensors, with the per-reflection bookkeeping to write a merged file.

    Observation arrays have shape (n_obs,) (``metadata``: (n_obs, n_features)); reflection arrays (n_refl,).
    Intensities and sigmas are divided by ``norm`` so they are O(1); ``F`` is in units of ``sqrt(norm)``.
    """

    refl: torch.Tensor
    image: torch.Tensor
    metadata: torch.Tensor
    inv_d2: torch.Tensor
    intensity: torch.Tensor
    sigma: torch.Tensor
    centric: torch.Tensor
    epsilon: torch.Tensor
    sigma_n: torch.Tensor
    hkl: np.ndarray  # (n_refl, 3) ASU Miller indices
    friedel: np.ndarray  # (n_refl,) +1 for F(+), -1 for F(-), 0 when Friedel mates are merged
    dhkl: np.ndarray  # (n_refl,)
    half: np.ndarray | None  # (n_refl,) 0/1 when split into half-datasets
    batch_values: np.ndarray  # (n_images,) BATCH number of each image index
    feature_names: list[str]
    norm: float
    anomalous: bool
    spacegroup: object
    cell: object

    @property
    def n_obs(self) -> int:
        return int(self.refl.shape[0])

    @property
    def n_refl(self) -> int:
        return int(self.centric.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.batch_values.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.metadata.shape[1])

    def model_kwargs(self) -> dict:
        """Keyword arguments of :class:`~physppl.models.merging.MergingModel` and its guide."""
        return dict(refl=self.refl, image=self.image, metadata=self.metadata, inv_d2=self.inv_d2,
                    sigma=self.sigma, intensity=self.intensity)

    def model_init(self) -> dict:
        """Constructor arguments of the model that depend on the data."""
        return dict(centric=self.centric, epsilon=self.epsilon, sigma_n=self.sigma_n,
                    n_images=self.n_images, n_features=self.n_features)

    def n_per_refl(self) -> np.ndarray:
        return np.bincount(self.refl.numpy(), minlength=self.n_refl)

    def split_halves(self, seed: int = 0) -> "MergingData":
        """Half-datasets split by image (random halves of the images), each reflection merged per half."""
        rng = np.random.default_rng(seed)
        image_half = rng.permutation(self.n_images) % 2
        obs_half = image_half[self.image.numpy()]
        key = self.refl.numpy() * 2 + obs_half
        uniq, new_refl = np.unique(key, return_inverse=True)
        parent, half = uniq // 2, uniq % 2
        p = torch.as_tensor(parent)
        return replace(
            self, refl=torch.as_tensor(new_refl), centric=self.centric[p], epsilon=self.epsilon[p],
            sigma_n=self.sigma_n[p], hkl=self.hkl[parent], friedel=self.friedel[parent], dhkl=self.dhkl[parent],
            half=half,
        )


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def prepare(
    ds: rs.DataSet,
    anomalous: bool = False,
    metadata: Sequence[str] = ("BATCH", "dHKL", "XDET", "YDET"),
    dmin: float | None = None,
    source: str = "data",
) -> MergingData:
    """Map observations to the ASU, number the unique reflections and build standardised metadata.

    ``ds`` must have I, SIGI, BATCH and the metadata columns (see :func:`read_unmerged_mtz`).
    """
    ds = ds.copy()
    ds.compute_dHKL(inplace=True)
    if dmin is not None:
        ds = ds[ds["dHKL"] >= dmin]
        if len(ds) == 0:
            raise ValueError(f"{source}: no observations at resolution d >= dmin={dmin} A")
    missing = [m for m in metadata if m not in METADATA_CHOICES and m not in ds.columns]
    optional = [m for m in missing if m in OPTIONAL_METADATA]
    if optional:  # e.g. files converted from XDS or merged-then-unmerged data carry no detector positions
        log.warning("%s: metadata %s not in the file; the scale model goes on without them", source, optional)
        metadata = [m for m in metadata if m not in optional]
        missing = [m for m in missing if m not in optional]
    if missing:
        raise MTZInputError(
            f"{source}: metadata column(s) {missing} not found; available: {list(ds.columns)} "
            f"(or derived: {list(METADATA_CHOICES)}). Set data.metadata=[...] accordingly."
        )
    observed_hkl = ds.get_hkls()
    asu = ds.hkl_to_asu()
    hkl_asu = asu.get_hkls()
    sg = ds.spacegroup
    centric_obs = rs.utils.is_centric(hkl_asu, sg)
    if anomalous:
        plus = (asu["M/ISYM"].to_numpy() % 2) == 1
        friedel_obs = np.where(centric_obs, 0, np.where(plus, 1, -1))
    else:
        friedel_obs = np.zeros(len(ds), dtype=int)
    keys = np.column_stack([hkl_asu, friedel_obs])
    uniq, refl = np.unique(keys, axis=0, return_inverse=True)
    refl = refl.reshape(-1)
    hkl, friedel = uniq[:, :3], uniq[:, 3]
    centric = rs.utils.is_centric(hkl, sg)
    epsilon = rs.utils.compute_structurefactor_multiplicity(hkl, sg).astype(float)
    dhkl = rs.utils.compute_dHKL(hkl, ds.cell).astype(float)

    intensity = ds["I"].to_numpy(float)
    sigma = ds["SIGI"].to_numpy(float)
    norm = float(np.mean(intensity))
    if not np.isfinite(norm) or norm <= 0:
        raise MTZInputError(f"{source}: mean intensity is {norm}; expected positive intensities in column I")
    intensity, sigma = intensity / norm, sigma / norm
    batch_values, image = np.unique(ds["BATCH"].to_numpy(), return_inverse=True)
    image = image.reshape(-1)

    d_obs = ds["dHKL"].to_numpy(float)
    columns = []
    for name in metadata:
        if name == "BATCH":
            columns.append(image.astype(float))
        elif name == "dHKL":
            columns.append(1.0 / d_obs**2)
        elif name in ("Hobs", "Kobs", "Lobs"):
            columns.append(observed_hkl[:, "HKL".index(name[0])].astype(float))
        else:
            columns.append(ds[name].to_numpy(float))
    meta = _standardise(np.column_stack(columns)) if columns else np.zeros((len(ds), 0))

    # Wilson scale from a quick unscaled weighted mean; the scale model learns what differs from it.
    mean_i, _ = weighted_mean(intensity, sigma, refl, len(uniq))
    sigma_n = wilson_sigma_by_resolution(mean_i, epsilon, dhkl)

    t = lambda a, dt=torch.get_default_dtype(): torch.as_tensor(np.ascontiguousarray(a), dtype=dt)
    return MergingData(
        refl=t(refl, torch.long), image=t(image, torch.long), metadata=t(meta), inv_d2=t(1.0 / d_obs**2),
        intensity=t(intensity), sigma=t(sigma), centric=t(centric, torch.bool), epsilon=t(epsilon),
        sigma_n=t(sigma_n), hkl=hkl.astype(int), friedel=friedel.astype(int), dhkl=dhkl, half=None,
        batch_values=batch_values, feature_names=list(metadata), norm=norm, anomalous=bool(anomalous),
        spacegroup=ds.spacegroup, cell=ds.cell,
    )


def french_wilson(data: MergingData, mean: np.ndarray, sd: np.ndarray) -> pd.DataFrame:
    """French-Wilson amplitudes from merged intensities in ``data``'s reflection order, under the model's prior
    ``Sigma = epsilon * Sigma_N(d)`` (so the estimates share the merging model's Wilson prior; see
    :mod:`physppl.merging.french_wilson`). Returns a frame with columns F, SIGF, I, SIGI (posterior means and sds).
    """
    sigma = (data.epsilon * data.sigma_n).numpy().astype(float)
    out = french_wilson_moments(mean, sd, sigma, data.centric.numpy())
    return pd.DataFrame(out)


def initial_estimates(data: MergingData, merger: ScaledWeightedMean | None = None) -> pd.DataFrame:
    """Conventional merge (scaled weighted mean, then French-Wilson): the starting point of the guide.

    The per-observation log-scales of that scaling are in ``.attrs["obs_log_scale"]``, to start the model's
    scale from the same place; the number of rejected outliers in ``.attrs["n_outliers"]``.
    """
    merger = merger or ScaledWeightedMean()
    res = merger.fit(data.intensity.numpy(), data.sigma.numpy(), data.refl.numpy(), data.image.numpy(), data.n_refl)
    mean = np.where(np.isfinite(res.mean), res.mean, 0.0)
    sd = np.where(np.isfinite(res.sd), res.sd, np.nanmax(res.sd))
    fw = french_wilson(data, mean, sd)
    fw["N"] = res.n
    fw["I_WM"], fw["SIGI_WM"] = mean, sd
    fw.attrs["obs_log_scale"] = res.log_scale
    fw.attrs["n_outliers"] = int(res.outlier.sum())
    return fw


class MergingDataSource:
    """Where the unmerged data come from: an MTZ file, or (``path: null``) the built-in simulator.

    Parameters mirror :func:`read_unmerged_mtz` and :func:`prepare`. ``simulate``: keyword arguments of
    :func:`simulate_unmerged`, or a function returning ``(unmerged, truth)`` (the command line's
    ``data.simulate``); ``half_datasets``: also merge random halves of the images (CC1/2, CCanom); ``reference``:
    a merged MTZ to compare with.
    """

    def __init__(
        self,
        path: str | None = None,
        columns: dict | None = None,
        partials: str = "auto",
        drop_bad_sigma: bool = False,
        anomalous: bool = False,
        metadata: Sequence[str] = ("BATCH", "dHKL", "XDET", "YDET"),
        dmin: float | None = None,
        half_datasets: bool = True,
        reference: str | None = None,
        simulate: dict | Callable | None = None,
    ):
        self.path = None if path in (None, "") else os.path.abspath(os.path.expanduser(str(path)))
        self.columns = dict(columns or {})
        self.partials = partials
        self.drop_bad_sigma = bool(drop_bad_sigma)
        self.anomalous = bool(anomalous)
        self.metadata = list(metadata)
        if dmin is not None and not float(dmin) > 0:
            raise ValueError(f"dmin must be > 0 (a resolution cutoff in A), got {dmin}")
        self.dmin = dmin
        self.half_datasets = bool(half_datasets)
        self.reference = None if reference in (None, "") else os.path.abspath(os.path.expanduser(str(reference)))
        self.simulate = simulate if callable(simulate) else dict(simulate or {})

    def load(self) -> tuple[rs.DataSet, rs.DataSet | None]:
        """The validated unmerged DataSet, and the ground truth when simulated (else None)."""
        if self.path is None:
            return self.simulate() if callable(self.simulate) else simulate_unmerged(**self.simulate)
        ds = read_unmerged_mtz(
            self.path, intensity=self.columns.get("intensity"), sigma=self.columns.get("sigma"),
            batch=self.columns.get("batch"), partials=self.partials, drop_bad_sigma=self.drop_bad_sigma,
        )
        return ds, None

    def prepare(self, ds: rs.DataSet) -> MergingData:
        return prepare(ds, anomalous=self.anomalous, metadata=self.metadata, dmin=self.dmin,
                       source=self.path or "simulated data")
