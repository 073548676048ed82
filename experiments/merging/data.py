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

from .datasets import combine_datasets, dataset_names
from .french_wilson import french_wilson_moments
from .harmonics import expand_harmonics
from .weighted_mean import ScaledWeightedMean, weighted_mean

__all__ = ["MergingData", "prepare", "LAUE_METADATA", "MergingDataSource", "french_wilson", "initial_estimates", "METADATA_CHOICES"]

log = logging.getLogger(__name__)

# Metadata the scale model can use: MTZ columns, plus these derived ones.
# (DATASET: the data set of each observation, for a scale surface of its own per data set in a joint merge)
METADATA_CHOICES = ("BATCH", "dHKL", "Hobs", "Kobs", "Lobs", "DATASET")
# careless's Laue metadata (its PYP example) without the wavelength, which the Laue model's own curve takes
LAUE_METADATA = ("X", "Y", "dHKL", "Hobs", "Kobs", "Lobs")
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
    # several data sets (data.paths): the data set of each reflection and of each image, and their names
    dataset: np.ndarray | None = None  # (n_refl,)
    image_dataset: np.ndarray | None = None  # (n_images,)
    dataset_names: list[str] | None = None
    separate: bool = True
    # Laue data (data.wavelength): each spot's wavelength in A and, when spots are multiplets, its components
    wavelength: torch.Tensor | None = None  # (n_obs,)
    band: tuple[float, float] | None = None  # (lambda_min, lambda_max) in A
    harmonic_refl: torch.Tensor | None = None  # (n_obs, H) long, -1 where a spot has fewer components
    harmonic_wavelength: torch.Tensor | None = None  # (n_obs, H)
    metadata_mean: np.ndarray | None = None  # (n_features,) what standardising the metadata took off ...
    metadata_sd: np.ndarray | None = None  # ... and divided by

    @property
    def n_datasets(self) -> int:
        return 1 if self.dataset_names is None else len(self.dataset_names)

    @property
    def refl_key(self) -> np.ndarray:
        """(n_refl, 4): ASU H, K, L and Friedel sign (and the half, for half-datasets): what makes two data sets'
        reflections the same one."""
        cols = [self.hkl, self.friedel] + ([self.half] if self.half is not None else [])
        return np.column_stack(cols)

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
        out = dict(refl=self.refl, image=self.image, metadata=self.metadata, inv_d2=self.inv_d2,
                   sigma=self.sigma, intensity=self.intensity)
        if self.wavelength is not None:
            out["wavelength"] = self.wavelength
        if self.harmonic_refl is not None:
            out.update(harmonic_refl=self.harmonic_refl, harmonic_wavelength=self.harmonic_wavelength)
        return out

    def model_init(self) -> dict:
        """Constructor arguments of the model that depend on the data."""
        out = dict(centric=self.centric, epsilon=self.epsilon, sigma_n=self.sigma_n,
                   n_images=self.n_images, n_features=self.n_features)
        if self.n_datasets > 1 and self.separate:
            out.update(dataset=torch.as_tensor(self.dataset), refl_key=self.refl_key)
        if self.band is not None:
            out["wavelength_range"] = self.band
        return out

    def n_per_refl(self) -> np.ndarray:
        return np.bincount(self.refl.numpy(), minlength=self.n_refl)

    def split_halves(self, seed: int = 0) -> "MergingData":
        """Half-datasets split by image (random halves of the images), each reflection merged per half."""
        rng = np.random.default_rng(seed)
        image_half = rng.permutation(self.n_images) % 2
        if self.image_dataset is not None:  # each data set's images in halves of their own
            for k in np.unique(self.image_dataset):
                own = np.flatnonzero(self.image_dataset == k)
                image_half[own] = rng.permutation(len(own)) % 2
        obs_half = image_half[self.image.numpy()]
        refl = self.refl.numpy()
        comps = [refl * 2 + obs_half]
        if self.harmonic_refl is not None:
            h = self.harmonic_refl.numpy()
            comps.append(np.where(h >= 0, h * 2 + obs_half[:, None], -1).reshape(-1))
        allkeys = np.concatenate(comps)
        valid_keys = allkeys[allkeys >= 0]
        uniq, inverse = unique_rows(valid_keys[:, None])  # linear in the observations (np.unique sorts them)
        uniq = uniq[:, 0]
        first = comps[0]
        new_refl = inverse[:len(first)] if (first >= 0).all() else np.searchsorted(uniq, first)
        parent, half = uniq // 2, uniq % 2
        p = torch.as_tensor(parent)
        extra = {}
        if self.harmonic_refl is not None:
            h = comps[1].reshape(self.harmonic_refl.shape)
            extra["harmonic_refl"] = torch.as_tensor(np.where(h >= 0, np.searchsorted(uniq, np.maximum(h, 0)), -1))
        return replace(
            self, refl=torch.as_tensor(new_refl), centric=self.centric[p], epsilon=self.epsilon[p],
            sigma_n=self.sigma_n[p], hkl=self.hkl[parent], friedel=self.friedel[parent], dhkl=self.dhkl[parent],
            half=half, dataset=None if self.dataset is None else self.dataset[parent], **extra,
        )

    def select_dataset(self, k: int) -> np.ndarray:
        """Boolean mask of the reflections of data set ``k``."""
        return np.ones(self.n_refl, bool) if self.dataset is None else self.dataset == k


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0, return_inverse=True)`` for integer rows, in time linear in the number of rows.

    Each row is coded as one integer in mixed radix (the first column most significant, so codes sort as the rows
    do); when the codes' range is small (Miller indices, image numbers: at most a few times the number of rows) the
    distinct ones are found with a presence table instead of a sort. Same result as ``np.unique``, row order
    included; 10^7 rows in ~1 s instead of ~12 s.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] == 0 or not np.issubdtype(rows.dtype, np.integer):
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        return uniq, inverse.reshape(-1)
    lows = rows.min(axis=0).astype(np.int64)
    sizes = rows.max(axis=0).astype(np.int64) - lows + 1
    total = float(np.prod(sizes.astype(float)))
    if total >= 2.0**62:
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        return uniq, inverse.reshape(-1)
    code = np.zeros(rows.shape[0], np.int64)
    for j in range(rows.shape[1]):
        code *= sizes[j]
        code += rows[:, j].astype(np.int64) - lows[j]
    if total <= max(4 * rows.shape[0], 1 << 22):
        present = np.zeros(int(total), bool)
        present[code] = True
        ucode = np.flatnonzero(present)
        rank = np.cumsum(present, dtype=np.int64) - 1
        inverse = rank[code]
    else:
        ucode, inverse = np.unique(code, return_inverse=True)
    uniq = np.empty((len(ucode), rows.shape[1]), np.int64)
    rest = ucode.copy()
    for j in range(rows.shape[1] - 1, -1, -1):
        uniq[:, j] = rest % sizes[j] + lows[j]
        rest //= sizes[j]
    return uniq.astype(rows.dtype), inverse.reshape(-1)


def prepare(
    ds: rs.DataSet,
    anomalous: bool = False,
    metadata: Sequence[str] = ("BATCH", "dHKL", "XDET", "YDET"),
    dmin: float | None = None,
    source: str = "data",
    wavelength: str | None = None,
    band: Sequence[float] | None = None,
    harmonics: bool = True,
    separate: bool = True,
    dataset_names: Sequence[str] | None = None,
) -> MergingData:
    """Map observations to the ASU, number the unique reflections and build standardised metadata.

    ``ds`` must have I, SIGI, BATCH and the metadata columns (see :func:`read_unmerged_mtz`); a ``DATASET`` column
    (0, 1, ...) marks several data sets (:func:`~physppl.merging.datasets.combine_datasets`): with ``separate`` each
    has its own reflections (careless's ``--separate-files``), else they are merged into one. ``wavelength`` names
    the column of each spot's wavelength (Laue data); with ``harmonics`` the spots' harmonic overlaps within
    ``band`` (default: the wavelengths' range) are found (:mod:`physppl.merging.harmonics`).
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
    lam = None
    if wavelength is not None:
        if wavelength not in ds.columns:
            real = [c for c in ds.columns if c not in ("I", "SIGI", "BATCH", "dHKL", "DATASET")]
            raise MTZInputError(f"{source}: Laue data need each spot's wavelength, but there is no column "
                                f"{wavelength!r}; columns: {real}. Set data.wavelength=<column>.")
        lam = ds[wavelength].to_numpy(float)
        if not (np.isfinite(lam).all() and (lam > 0).all()):
            bad = int((~(np.isfinite(lam) & (lam > 0))).sum())
            raise MTZInputError(f"{source}: column {wavelength!r} has {bad} wavelength(s) that are not positive "
                                "finite numbers (A expected)")
    set_obs = ds["DATASET"].to_numpy(np.int64) if "DATASET" in ds.columns else np.zeros(len(ds), np.int64)
    n_sets = int(set_obs.max()) + 1 if len(set_obs) else 1
    observed_hkl = ds.get_hkls()
    sg = ds.spacegroup

    # the components of each spot: itself, plus its harmonic overlaps in Laue data
    comp = None
    if lam is not None:
        lo, hi = (float(lam.min()), float(lam.max())) if band is None else (float(band[0]), float(band[1]))
        if not 0 < lo < hi:
            raise ValueError(f"{source}: wavelength band {band} must be (lambda_min, lambda_max) with 0 < min < max")
        if harmonics:
            comp = expand_harmonics(observed_hkl, lam, ds.cell, (lo, hi), float(ds["dHKL"].min()) * (1 - 1e-6))
            log.info("%s: %d of %d spots are harmonic multiplets (band %.3f-%.3f A, up to %d components)", source,
                     comp.n_multiplets, len(ds), lo, hi, comp.max_order)
            if comp.max_order == 1:
                comp = None
        else:
            log.info("%s: Laue spots treated as singlets (harmonics off)", source)
        band = (lo, hi)
    if comp is not None:
        comp_hkl = comp.hkl.reshape(-1, 3)
        comp_set = np.repeat(set_obs, comp.max_order)
        valid = comp.mask.reshape(-1)
    else:
        comp_hkl, comp_set, valid = observed_hkl, set_obs, np.ones(len(ds), bool)
    # each distinct observed index is mapped once (serial data: 10^7 spots, ~10^5 distinct indices)
    distinct, which = unique_rows(np.asarray(comp_hkl))
    distinct_asu, distinct_isym = rs.utils.hkl_to_asu(distinct, sg)
    hkl_asu, isym = distinct_asu[which], distinct_isym[which]
    if comp is not None:  # a harmonic that is systematically absent adds nothing to its spot
        extra_order = np.tile(np.arange(comp.max_order) > 0, len(ds))
        valid = valid & ~(extra_order & rs.utils.is_absent(hkl_asu, sg))
    centric_c = rs.utils.is_centric(distinct_asu, sg)[which]
    if anomalous:
        friedel_c = np.where(centric_c, 0, np.where(isym % 2 == 1, 1, -1))
    else:
        friedel_c = np.zeros(len(hkl_asu), dtype=int)
    key_set = comp_set if separate else np.zeros_like(comp_set)
    keys = np.column_stack([key_set, hkl_asu, friedel_c])
    uniq, refl_c = unique_rows(keys[valid])
    refl_all = np.full(len(keys), -1, dtype=np.int64)
    refl_all[valid] = refl_c.reshape(-1)
    refl_set, hkl, friedel = uniq[:, 0], uniq[:, 1:4], uniq[:, 4]
    if comp is not None:
        refl2d = refl_all.reshape(len(ds), comp.max_order)
        refl = refl2d[:, 0]
    else:
        refl2d, refl = None, refl_all
    centric = rs.utils.is_centric(hkl, sg)
    epsilon = rs.utils.compute_structurefactor_multiplicity(hkl, sg).astype(float)
    dhkl = rs.utils.compute_dHKL(hkl, ds.cell).astype(float)

    intensity = ds["I"].to_numpy(float)
    sigma = ds["SIGI"].to_numpy(float)
    norm = float(np.mean(intensity))
    if not np.isfinite(norm) or norm <= 0:
        raise MTZInputError(f"{source}: mean intensity is {norm}; expected positive intensities in column I")
    intensity, sigma = intensity / norm, sigma / norm
    # images are numbered within each data set: the same BATCH in two files is two images
    image_keys, image = unique_rows(np.column_stack([set_obs, ds["BATCH"].to_numpy()]))
    image = image.reshape(-1)
    batch_values, image_set = image_keys[:, 1], image_keys[:, 0]

    d_obs = ds["dHKL"].to_numpy(float)
    columns = []
    for name in metadata:
        if name == "BATCH":
            columns.append(image.astype(float))
        elif name == "dHKL":
            columns.append(1.0 / d_obs**2)
        elif name in ("Hobs", "Kobs", "Lobs"):
            columns.append(observed_hkl[:, "HKL".index(name[0])].astype(float))
        elif name == "DATASET":
            columns.append(set_obs.astype(float))
        else:
            columns.append(ds[name].to_numpy(float))
    raw = np.column_stack(columns) if columns else np.zeros((len(ds), 0))
    meta_mean, meta_sd = raw.mean(axis=0), raw.std(axis=0)
    meta_sd = np.where(meta_sd > 0, meta_sd, 1.0)
    meta = (raw - meta_mean) / meta_sd

    # Wilson scale of each data set from a quick unscaled weighted mean; the scale model learns what differs
    mean_i, _ = weighted_mean(intensity, sigma, refl, len(uniq))
    sigma_n = np.ones(len(uniq))
    for k in np.unique(refl_set):
        sel = refl_set == k
        seen = sel & np.isfinite(mean_i)
        est = wilson_sigma_by_resolution(mean_i[seen], epsilon[seen], dhkl[seen])
        s2 = 1.0 / dhkl**2
        order = np.argsort(s2[seen])
        # reflections seen only as harmonics: interpolate in 1/d^2
        sigma_n[sel] = np.exp(np.interp(s2[sel], s2[seen][order], np.log(est[order])))

    t = lambda a, dt=torch.get_default_dtype(): torch.as_tensor(np.ascontiguousarray(a), dtype=dt)
    extra: dict = {}
    if n_sets > 1:
        names = list(dataset_names) if dataset_names is not None else [str(k) for k in range(n_sets)]
        extra.update(dataset=refl_set.astype(int) if separate else np.zeros(len(uniq), int), image_dataset=image_set,
                     dataset_names=names if separate else ["+".join(names)], separate=bool(separate))
    if lam is not None:
        extra.update(wavelength=t(lam), band=tuple(band))
        if comp is not None:
            extra.update(harmonic_refl=t(refl2d, torch.long), harmonic_wavelength=t(comp.wavelength))
    return MergingData(
        refl=t(refl, torch.long), image=t(image, torch.long), metadata=t(meta), inv_d2=t(1.0 / d_obs**2),
        intensity=t(intensity), sigma=t(sigma), centric=t(centric, torch.bool), epsilon=t(epsilon),
        sigma_n=t(sigma_n), hkl=hkl.astype(int), friedel=friedel.astype(int), dhkl=dhkl, half=None,
        batch_values=batch_values, feature_names=list(metadata), norm=norm, anomalous=bool(anomalous),
        spacegroup=ds.spacegroup, cell=ds.cell, metadata_mean=meta_mean, metadata_sd=meta_sd, **extra,
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
    seen = np.isfinite(res.mean) & np.isfinite(res.sd)
    # reflections never observed on their own (only inside Laue multiplets) start from the prior
    prior_sd = 10.0 * np.sqrt((data.epsilon * data.sigma_n).numpy().astype(float))
    mean = np.where(seen, res.mean, 0.0)
    sd = np.where(seen, res.sd, prior_sd)
    fw = french_wilson(data, mean, sd)
    fw["N"] = res.n
    fw["I_WM"], fw["SIGI_WM"] = mean, sd
    fw.attrs["obs_log_scale"] = res.log_scale
    fw.attrs["n_outliers"] = int(res.outlier.sum())
    return fw


class MergingDataSource:
    """Where the unmerged data come from: an MTZ file, several (``paths``), or (``path: null``) the simulator.

    Parameters mirror :func:`read_unmerged_mtz` and :func:`prepare`. ``paths``: several unmerged files merged in
    one model with shared scaling, each with its own structure factors when ``separate`` (careless's
    ``--separate-files``), else merged into one; ``wavelength``: the column of each spot's wavelength (Laue data),
    with ``band`` (lambda_min, lambda_max in A; default the data's range) and ``harmonics`` (find harmonic overlaps
    from the cell and the band). ``simulate``: keyword arguments of :func:`simulate_unmerged`, or a function
    returning ``(unmerged, truth)`` (the command line's ``data.simulate``); ``half_datasets``: also merge random
    halves of the images (CC1/2, CCanom); ``reference``: a merged MTZ to compare with.
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
        paths: Sequence[str] | None = None,
        separate: bool = True,
        wavelength: str | None = None,
        band: Sequence[float] | None = None,
        harmonics: bool = True,
    ):
        expand = lambda p: os.path.abspath(os.path.expanduser(str(p)))
        self.path = None if path in (None, "") else expand(path)
        self.paths = None if not paths else [expand(p) for p in paths]
        if self.path is not None and self.paths is not None:
            raise ValueError("give data.path (one file) or data.paths (several), not both")
        if self.paths is not None and len(self.paths) == 1:
            self.path, self.paths = self.paths[0], None
        self.columns = dict(columns or {})
        self.partials = partials
        self.drop_bad_sigma = bool(drop_bad_sigma)
        self.anomalous = bool(anomalous)
        self.metadata = list(metadata)
        if dmin is not None and not float(dmin) > 0:
            raise ValueError(f"dmin must be > 0 (a resolution cutoff in A), got {dmin}")
        self.dmin = dmin
        self.half_datasets = bool(half_datasets)
        self.reference = None if reference in (None, "") else expand(reference)
        self.simulate = simulate if callable(simulate) else dict(simulate or {})
        self.separate = bool(separate)
        self.wavelength = None if wavelength in (None, "") else str(wavelength)
        if band is not None and (len(band) != 2 or not 0 < float(band[0]) < float(band[1])):
            raise ValueError(f"data.band must be [lambda_min, lambda_max] in A with 0 < min < max, got {list(band)}")
        self.band = None if band is None else (float(band[0]), float(band[1]))
        self.harmonics = bool(harmonics)
        self.names: list[str] | None = dataset_names(self.paths) if self.paths else None

    @property
    def inputs(self) -> list[str]:
        """The files this source reads (for the run's provenance; never written)."""
        return [p for p in ([self.path] + (self.paths or [])) if p is not None]

    def _read(self, path: str) -> rs.DataSet:
        return read_unmerged_mtz(
            path, intensity=self.columns.get("intensity"), sigma=self.columns.get("sigma"),
            batch=self.columns.get("batch"), partials=self.partials, drop_bad_sigma=self.drop_bad_sigma,
        )

    def load(self) -> tuple[rs.DataSet, rs.DataSet | None]:
        """The validated unmerged DataSet, and the ground truth when simulated (else None)."""
        if self.paths is not None:
            return combine_datasets(self._read, self.paths), None
        if self.path is None:
            ds, truth = self.simulate() if callable(self.simulate) else simulate_unmerged(**self.simulate)
            if "DATASET" in ds.columns and self.names is None:
                self.names = [f"state{k}" for k in range(int(ds["DATASET"].max()) + 1)]
            return ds, truth
        return self._read(self.path), None

    def prepare(self, ds: rs.DataSet) -> MergingData:
        names = self.names
        if names is None and "DATASET" in ds.columns:
            names = [f"set{k}" for k in range(int(ds["DATASET"].max()) + 1)]
        return prepare(ds, anomalous=self.anomalous, metadata=self.metadata, dmin=self.dmin,
                       source=self.path or (", ".join(self.paths) if self.paths else "simulated data"),
                       wavelength=self.wavelength, band=self.band, harmonics=self.harmonics, separate=self.separate,
                       dataset_names=names)
