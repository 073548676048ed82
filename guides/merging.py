"""Mean-field variational posterior over structure-factor amplitudes, one distribution per reflection."""
from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam

from .truncated_normal import PositiveTruncatedNormal

__all__ = ["MergingGuide", "PairedMergingGuide", "PairedFoldedNormal", "FoldedNormal", "FAMILIES"]

FAMILIES = ("folded_normal", "truncated_normal", "lognormal", "gamma")


class FoldedNormal(dist.FoldedDistribution):
    """``|Normal(loc, scale)|``; Pyro's version declares F > 0, but a float32 draw can be exactly 0."""

    support = dist.constraints.nonnegative

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        super().__init__(dist.Normal(loc, scale), validate_args=validate_args)


def _folded_normal_moments(loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Raw moments E F, E F^2, E F^4 of |Normal(loc, scale)| (even moments equal the Normal's)."""
    r = loc / scale
    m1 = scale * math.sqrt(2 / math.pi) * torch.exp(-0.5 * r.square()) + loc * (1 - 2 * torch.special.ndtr(-r))
    m2 = loc.square() + scale.square()
    m4 = loc.pow(4) + 6 * loc.square() * scale.square() + 3 * scale.pow(4)
    return m1, m2, m4


class MergingGuide(PyroModule):
    """``q(F) = prod_r q_r(F_r)`` with ``q_r`` from one positive family, initialised from data.

    Sample sites
    ------------
    F : Tensor, shape (n_refl,), plate "refl" (dim -1)

    Parameters
    ----------
    init_mean, init_sd : array-like, shape (n_refl,)
        Initial posterior mean and sd of each amplitude (e.g. French-Wilson estimates from a weighted
        mean); each family's parameters are set by matching these two moments.
    family : {"folded_normal", "truncated_normal", "lognormal", "gamma"}
        ``folded_normal`` (careless's default) and ``truncated_normal`` put mass near F = 0 for weak
        reflections; ``lognormal`` and ``gamma`` are positive-skewed alternatives.
    """

    def __init__(self, init_mean, init_sd, family: str = "folded_normal", min_sd: float = 1e-3):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"MergingGuide: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        mean = torch.as_tensor(np.asarray(init_mean), dtype=torch.get_default_dtype())
        sd = torch.as_tensor(np.asarray(init_sd), dtype=torch.get_default_dtype())
        if mean.shape != sd.shape or mean.dim() != 1:
            raise ValueError(f"MergingGuide: init_mean {tuple(mean.shape)} and init_sd {tuple(sd.shape)} must be equal 1-D shapes")
        if not (torch.isfinite(mean).all() and torch.isfinite(sd).all()):
            raise ValueError("MergingGuide: init_mean/init_sd contain NaN or inf")
        mean = mean.clamp(min=min_sd)
        sd = sd.clamp(min=min_sd)
        self.family = family
        self.n_refl = int(mean.shape[0])
        # Whitened parameters: location and log-scale are offsets in units of each reflection's initial posterior
        # sd. With raw parameters an Adam step of ~lr is a large fraction of a strong reflection's sd (1% of F)
        # and the loss only falls as fast as the learning rate decays; whitened, every reflection moves in the
        # same small steps of its own sd.
        if family in ("folded_normal", "truncated_normal"):
            loc0, step = mean, sd
            scale0 = sd
        elif family == "lognormal":
            s2 = torch.log1p(sd.square() / mean.square())
            loc0, step = mean.log() - 0.5 * s2, s2.sqrt()
            scale0 = s2.sqrt()
        else:  # gamma, parametrised by log-mean and sd
            loc0, step = mean.log(), sd / mean
            scale0 = sd
        self.register_buffer("loc0", loc0)
        self.register_buffer("step", step)
        self.register_buffer("scale0", scale0)
        self.u = PyroParam(torch.zeros(self.n_refl))
        self.v = PyroParam(torch.zeros(self.n_refl))

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own parameters (loc, scale) / (mu, s) / (concentration, rate)."""
        loc = self.loc0 + self.step * self.u
        scale = self.scale0 * self.v.exp()
        if self.family == "gamma":
            mean = loc.exp()
            return (mean / scale).square(), mean / scale.square()
        return loc, scale

    def distribution(self) -> dist.Distribution:
        """The current ``q(F)`` with batch shape (n_refl,)."""
        a, b = self._params()
        if self.family == "folded_normal":
            return FoldedNormal(a, b)
        if self.family == "truncated_normal":
            return PositiveTruncatedNormal(a, b)
        if self.family == "lognormal":
            return dist.LogNormal(a, b)
        return dist.Gamma(a, b)

    def forward(self, *args, subsample: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        with pyro.plate("refl", self.n_refl, dim=-1):
            return pyro.sample("F", self.distribution())

    @torch.no_grad()
    def moments(self) -> dict[str, torch.Tensor]:
        """Exact posterior mean and sd of ``F`` and of ``I = F^2`` under ``q``, each shape (n_refl,)."""
        a, b = self._params()
        if self.family == "folded_normal":
            m1, m2, m4 = _folded_normal_moments(a, b)
        elif self.family == "truncated_normal":
            m1, m2, _, m4 = PositiveTruncatedNormal(a, b).raw_moments(4)
        elif self.family == "lognormal":
            m1, m2, m4 = (torch.exp(k * a + 0.5 * k * k * b.square()) for k in (1, 2, 4))
        else:
            k, rate = a, b
            m1 = k / rate
            m2 = k * (k + 1) / rate**2
            m4 = k * (k + 1) * (k + 2) * (k + 3) / rate**4
        return {
            "F_mean": m1,
            "F_sd": (m2 - m1.square()).clamp(min=0).sqrt(),
            "I_mean": m2,
            "I_sd": (m4 - m2.square()).clamp(min=0).sqrt(),
        }


def _log_normal(x: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mu) / sd).square() - sd.log() - 0.5 * math.log(2 * math.pi)


class PairedFoldedNormal(dist.TorchDistribution):
    """``F = |X|`` with ``X`` Gaussian, each child element correlated with its parent element (``corr[c]``).

    The density of the whole vector factorises along the parents: a root is a folded Normal, a child given its
    parent is the folded bivariate Normal's conditional, summed over the four sign combinations.
    """

    arg_constraints = {"loc": dist.constraints.real, "scale": dist.constraints.positive}
    support = dist.constraints.nonnegative
    has_rsample = True

    def __init__(self, loc, scale, corr, parent, validate_args=None):
        self.loc, self.scale, self.corr = loc, scale, corr
        self.parent = parent
        self.has_parent = parent >= 0
        self._p = parent.clamp(min=0)
        super().__init__(loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(PairedFoldedNormal, _instance)
        for name in ("loc", "scale", "corr", "parent", "has_parent", "_p"):
            setattr(new, name, getattr(self, name))
        super(PairedFoldedNormal, new).__init__(batch_shape, validate_args=False)
        return new

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        z = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        rho = torch.where(self.has_parent, self.corr, torch.zeros_like(self.corr))
        mixed = rho * z[..., self._p] + (1 - rho.square()).clamp(min=0).sqrt() * z
        return (self.loc + self.scale * mixed).abs()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        mu, sd = self.loc, self.scale
        folded = torch.logaddexp(_log_normal(value, mu, sd), _log_normal(-value, mu, sd))
        fp = value[..., self._p]
        mp, sp = mu[self._p], sd[self._p]
        rho = self.corr.clamp(-0.999, 0.999)
        cond_sd = sd * (1 - rho.square()).sqrt()
        terms = []
        for s1 in (1.0, -1.0):
            xp = s1 * fp
            mean_c = mu + rho * sd * (xp - mp) / sp
            c = torch.logaddexp(_log_normal(value, mean_c, cond_sd), _log_normal(-value, mean_c, cond_sd))
            terms.append(_log_normal(xp, mp, sp) + c)
        joint = torch.logaddexp(terms[0], terms[1])
        parent_marginal = torch.logaddexp(_log_normal(fp, mp, sp), _log_normal(-fp, mp, sp))
        return torch.where(self.has_parent, joint - parent_marginal, folded)


class PairedMergingGuide(MergingGuide):
    """A folded-Normal guide that correlates each reflection of a child data set with the same reflection of its
    parent data set (the pairs of the double-Wilson prior), so the posterior of a difference ``F_c - F_p`` has the
    correlation the data and the prior give it rather than the mean-field's none.

    Sample sites
    ------------
    F : Tensor, shape (n_refl,), plate "refl" (dim -1)

    Parameters
    ----------
    init_mean, init_sd : array-like (n_refl,)
        As :class:`MergingGuide`.
    parent : array-like of int (n_refl,), optional
        Index of each reflection's parent reflection, ``-1`` for none (the model's ``prior.parent``); without it
        the guide is the mean-field folded Normal.
    init_corr : float
        Starting correlation of each pair.
    """

    def __init__(self, init_mean, init_sd, parent=None, init_corr: float = 0.5, min_sd: float = 1e-3):
        super().__init__(init_mean, init_sd, family="folded_normal", min_sd=min_sd)
        p = torch.full((self.n_refl,), -1, dtype=torch.long) if parent is None else torch.as_tensor(parent).long()
        if p.shape != (self.n_refl,):
            raise ValueError(f"PairedMergingGuide: parent has shape {tuple(p.shape)}, expected ({self.n_refl},)")
        self.register_buffer("parent", p)
        self.w = PyroParam(torch.full((self.n_refl,), math.atanh(init_corr)))

    def distribution(self) -> dist.Distribution:
        loc, scale = self._params()
        return PairedFoldedNormal(loc, scale, torch.tanh(self.w), self.parent)

    @torch.no_grad()
    def moments(self) -> dict[str, torch.Tensor]:
        """Each reflection's own moments are the folded Normal's (its marginal)."""
        loc, scale = self._params()
        m1, m2, m4 = _folded_normal_moments(loc, scale)
        return {"F_mean": m1, "F_sd": (m2 - m1.square()).clamp(min=0).sqrt(), "I_mean": m2,
                "I_sd": (m4 - m2.square()).clamp(min=0).sqrt()}
