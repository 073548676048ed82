"""Standard simulation-based inference tasks with tractable likelihoods (Lueckmann et al. 2021, sbibm).

Each task is a :class:`~pyro.nn.PyroModule` that meets the simulator protocol of
:func:`physppl.infer_sbi` (``prior``, ``simulate(theta)``, optionally ``log_likelihood(theta, x)``), so it
can be run with simulation only or with its likelihood, and checked against exact answers.

* :class:`TwoMoons`: 2 parameters, 2 data; a crescent-shaped, bimodal posterior.
* :class:`SLCP`: "simple likelihood, complex posterior": 5 parameters, 8 data (four 2-D points from a Gaussian
  whose mean and covariance the parameters set); the posterior has four symmetric modes (the signs of the
  two scale parameters are not identified).
* :class:`GaussianLinear`: 10-D Gaussian prior and likelihood, an exact Gaussian posterior.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = ["TwoMoons", "SLCP", "GaussianLinear", "TASKS"]


class _Task(PyroModule):
    """Shared Pyro model: ``theta`` from the prior, ``x`` from the likelihood, in plate ``"obs"``.

    Sample sites
    ------------
    theta : Tensor, shape (n, D), plate "obs" (dim -1)
    x : Tensor, shape (n, x_dim), plate "obs", observed when given
    """

    param_names: tuple[str, ...] = ()
    x_dim: int = 0

    @property
    def prior(self) -> dist.Distribution:
        raise NotImplementedError

    def simulate(self, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_likelihood(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | None = None, n: int | None = None):
        n = x.shape[0] if x is not None else int(n or 1)
        with pyro.plate("obs", n, dim=-1):
            theta = pyro.sample("theta", self.prior)
            return pyro.sample("x", _Likelihood(self, theta), obs=x)


class _Likelihood(dist.TorchDistribution):
    """``p(x | theta)`` of a task as a distribution (for the Pyro model's ``x`` site)."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, task: _Task, theta: torch.Tensor):
        self.task, self.theta = task, theta
        super().__init__(batch_shape=theta.shape[:-1], event_shape=(task.x_dim,), validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        th = self.theta.expand(torch.Size(sample_shape) + self.theta.shape)
        return self.task.simulate(th.reshape(-1, th.shape[-1])).reshape(th.shape[:-1] + (self.task.x_dim,))

    def log_prob(self, value):
        return self.task.log_likelihood(self.theta, value)


class TwoMoons(_Task):
    """Two moons (Greenberg et al. 2019): ``theta ~ U(-1, 1)^2``; a crescent of radius ``r ~ N(0.1, 0.01^2)``
    at angle ``a ~ U(-pi/2, pi/2)``, offset by ``(-|theta_1 + theta_2| / sqrt 2, (theta_2 - theta_1) / sqrt 2)``.

    The likelihood is tractable in polar coordinates: ``p(x | theta) = N(r; 0.1, 0.01) / (pi r)`` for the point
    ``q = x - offset - (0.25, 0)`` at radius ``r = |q|`` when ``q_1 > 0`` (zero otherwise).
    """

    param_names = ("theta1", "theta2")
    x_dim = 2

    @property
    def prior(self) -> dist.Distribution:
        return dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)

    def _offset(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.stack([-(theta[..., 0] + theta[..., 1]).abs(), theta[..., 1] - theta[..., 0]], -1) / math.sqrt(2)

    def simulate(self, theta: torch.Tensor) -> torch.Tensor:
        a = (torch.rand(theta.shape[:-1], dtype=theta.dtype) - 0.5) * math.pi
        r = 0.1 + 0.01 * torch.randn(theta.shape[:-1], dtype=theta.dtype)
        p = torch.stack([r * torch.cos(a) + 0.25, r * torch.sin(a)], -1)
        return p + self._offset(theta)

    def log_likelihood(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = x - self._offset(theta)
        q1, q2 = q[..., 0] - 0.25, q[..., 1]
        r = torch.sqrt(q1**2 + q2**2).clamp_min(1e-12)
        lp = dist.Normal(0.1, 0.01).log_prob(r) - math.log(math.pi) - torch.log(r)
        return torch.where(q1 > 0, lp, torch.full_like(lp, -float("inf")))

    def reference_posterior(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact posterior draws: the crescent point ``p`` from its own distribution, then the two parameter
        vectors that put ``x`` at ``p`` (one at random), kept inside the prior box (the prior is uniform, and
        ``theta`` is an affine function of ``p`` given the sign, so ``theta`` has the likelihood's shape)."""
        x = x.reshape(2).double()
        out, have = [], 0
        while have < n:
            m = 4 * (n - have) + 1000
            a = (torch.rand(m, generator=generator, dtype=torch.float64) - 0.5) * math.pi
            r = 0.1 + 0.01 * torch.randn(m, generator=generator, dtype=torch.float64)
            p0, p1 = r * torch.cos(a) + 0.25, r * torch.sin(a)
            s_abs = math.sqrt(2) * (p0 - x[0])  # |theta_1 + theta_2| >= 0 is needed
            sign = torch.where(torch.rand(m, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
            s, d = sign * s_abs, math.sqrt(2) * (x[1] - p1)
            theta = torch.stack([(s - d) / 2, (s + d) / 2], -1)
            keep = (s_abs >= 0) & (theta.abs() <= 1).all(-1)
            out.append(theta[keep])
            have += int(keep.sum())
        return torch.cat(out)[:n].to(torch.get_default_dtype())


class SLCP(_Task):
    """SLCP (Papamakarios et al. 2019): ``theta ~ U(-3, 3)^5``; four points ``x_j ~ N(m, S)`` with
    ``m = (theta_1, theta_2)``, sds ``theta_3^2, theta_4^2`` and correlation ``tanh(theta_5)``; ``x`` (8,)."""

    param_names = ("theta1", "theta2", "theta3", "theta4", "theta5")
    x_dim = 8

    @property
    def prior(self) -> dist.Distribution:
        return dist.Uniform(-3 * torch.ones(5), 3 * torch.ones(5)).to_event(1)

    def _gaussian(self, theta: torch.Tensor) -> dist.MultivariateNormal:
        m = theta[..., :2]
        s1, s2 = theta[..., 2] ** 2, theta[..., 3] ** 2
        rho = torch.tanh(theta[..., 4])
        cov = torch.stack([torch.stack([s1**2, rho * s1 * s2], -1), torch.stack([rho * s1 * s2, s2**2], -1)], -2)
        # a tiny jitter keeps the covariance positive definite at s -> 0 (the prior reaches theta_3 = 0)
        return dist.MultivariateNormal(m, cov + 1e-6 * torch.eye(2, dtype=theta.dtype), validate_args=False)

    def simulate(self, theta: torch.Tensor) -> torch.Tensor:
        points = self._gaussian(theta).sample((4,))  # (4, ..., 2)
        return points.movedim(0, -2).reshape(theta.shape[:-1] + (8,))

    def log_likelihood(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        points = x.reshape(x.shape[:-1] + (4, 2)).movedim(-2, 0)  # (4, *x_batch, 2)
        # one observation against a batch of parameters: the points broadcast over the parameters' batch
        points = points.reshape((4,) + (1,) * max(0, theta.dim() - x.dim()) + points.shape[1:])
        return self._gaussian(theta).log_prob(points).sum(0)


class GaussianLinear(_Task):
    """``theta ~ N(0, 0.1 I_10)``, ``x ~ N(theta, 0.1 I_10)``: the posterior is ``N(x / 2, 0.05 I)``."""

    x_dim = 10
    param_names = tuple(f"theta{i + 1}" for i in range(10))

    @property
    def prior(self) -> dist.Distribution:
        return dist.Normal(torch.zeros(10), math.sqrt(0.1)).to_event(1)

    def simulate(self, theta: torch.Tensor) -> torch.Tensor:
        return theta + math.sqrt(0.1) * torch.randn_like(theta)

    def log_likelihood(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return dist.Normal(theta, math.sqrt(0.1)).log_prob(x).sum(-1)

    def exact_posterior(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Normal(x.reshape(10) / 2, math.sqrt(0.05)).to_event(1)

    def reference_posterior(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact posterior draws."""
        post = self.exact_posterior(x)
        return post.mean + post.stddev * torch.randn((int(n), 10), generator=generator)


TASKS = {"two_moons": TwoMoons, "slcp": SLCP, "gaussian_linear": GaussianLinear}
