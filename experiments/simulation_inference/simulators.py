"""The simulator protocol of :func:`physppl.infer_sbi`, and its checks.

A simulator is any object with

* ``prior``: a torch or Pyro distribution with a support, a dict ``{name: distribution}`` or a list of them
  (anything :func:`~physppl.inference.priors.as_prior` takes), or a method returning one;
* ``simulate(theta)``: parameters (n, D) -> data (n, ...), vectorised, drawing its noise from torch's global
  generator (which the job seeds);

and optionally

* ``log_likelihood(theta, x_o)``: (n, D) and one observation -> (n,) log densities, when tractable: it enables
  the likelihood-based refinement and the posterior's pointwise log-likelihood in ``posterior.nc``;
* ``param_names``: one name per parameter (default: the prior's);
* ``reference_posterior(x_o, n)``: exact posterior draws (n, D) for C2ST, where they exist.

A plain function ``simulate(theta)`` with ``prior=`` given to :func:`physppl.infer_sbi` works too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.distributions import Distribution

from physppl.inference.fit import ProtocolError
from physppl.inference.priors import Prior, as_prior

__all__ = ["Simulator", "as_simulator"]


@dataclass
class Simulator:
    """A checked simulator: the prior, the simulator and what else it offers, with the data's shape."""

    prior: Prior
    simulate_fn: Callable[[torch.Tensor], torch.Tensor]
    x_shape: tuple[int, ...]
    log_likelihood_fn: Callable | None = None
    reference_fn: Callable | None = None
    source: Any = None

    @property
    def x_dim(self) -> int:
        return int(torch.Size(self.x_shape).numel())

    @property
    def names(self) -> tuple[str, ...]:
        return self.prior.names

    @property
    def has_likelihood(self) -> bool:
        return self.log_likelihood_fn is not None

    def simulate(self, theta: torch.Tensor, batch_size: int = 100_000) -> torch.Tensor:
        """Flattened data (n, x_dim) for parameters (n, D), in batches."""
        parts = []
        with torch.no_grad():
            for s in range(0, len(theta), batch_size):
                x = torch.as_tensor(self.simulate_fn(theta[s:s + batch_size]))
                parts.append(x.reshape(len(x), -1).to(torch.get_default_dtype()))
        return torch.cat(parts)

    def log_likelihood(self, theta: torch.Tensor, x_obs: torch.Tensor) -> torch.Tensor:
        return self.log_likelihood_fn(theta, x_obs.reshape(self.x_shape))


def as_simulator(simulator: Any, prior: Any = None, param_names=None) -> Simulator:
    """Check ``simulator`` against the protocol (see the module docstring) on two prior draws, before any long run."""
    name = getattr(simulator, "__name__", type(simulator).__name__)
    if prior is None:
        prior = getattr(simulator, "prior", None)
        if prior is None:
            raise ProtocolError(f"simulator {name}: it has no `prior` attribute; give prior= (a torch or Pyro "
                                "distribution, or a dict of them)")
    if callable(prior) and not isinstance(prior, Distribution):  # a method returning the prior (the beam model's)
        prior = prior()
    names = param_names if param_names is not None else getattr(simulator, "param_names", None)
    try:
        pr = as_prior(prior)
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"simulator {name}: {err}") from None
    if names is not None and len(names) == pr.dim and any(n != m for n, m in zip(names, pr.names)):
        pr.names = tuple(str(n) for n in names)
    elif names is not None and len(names) != pr.dim:
        raise ProtocolError(f"simulator {name}: {len(names)} param_names for a prior with {pr.dim} parameters")
    fn = getattr(simulator, "simulate", None)
    if fn is None:
        if not callable(simulator):
            raise ProtocolError(f"simulator {name}: it needs a simulate(theta) method, or is itself callable")
        fn = simulator
    theta = pr.sample(2, generator=torch.Generator().manual_seed(0))
    try:
        x = fn(theta)
    except Exception as err:  # the user's code: report what it was called with
        raise ProtocolError(f"simulator {name}: simulate(theta) failed on two prior draws of shape "
                            f"{tuple(theta.shape)}: {type(err).__name__}: {err}") from err
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception:
            raise ProtocolError(f"simulator {name}: simulate(theta) returned a {type(x).__name__}, expected a tensor "
                                "of shape (n, ...)") from None
    if x.dim() < 2 or x.shape[0] != 2:
        raise ProtocolError(f"simulator {name}: simulate(theta) for theta of shape (2, {pr.dim}) returned shape "
                            f"{tuple(x.shape)}; expected (2, ...): one simulation per parameter vector")
    ll = getattr(simulator, "log_likelihood", None)
    if ll is not None:
        try:
            lp = ll(theta, x[0])
        except NotImplementedError:
            ll = None
        except Exception as err:
            raise ProtocolError(f"simulator {name}: log_likelihood(theta, x_o) failed for theta (2, {pr.dim}) and "
                                f"x_o {tuple(x.shape[1:])}: {type(err).__name__}: {err}") from err
        else:
            if tuple(torch.as_tensor(lp).shape) != (2,):
                raise ProtocolError(f"simulator {name}: log_likelihood(theta, x_o) returned shape "
                                    f"{tuple(torch.as_tensor(lp).shape)} for 2 parameter vectors; expected (2,)")
    ref = getattr(simulator, "reference_posterior", None)
    return Simulator(prior=pr, simulate_fn=fn, x_shape=tuple(x.shape[1:]), log_likelihood_fn=ll,
                     reference_fn=ref, source=simulator)
