"""Stochastic volatility model (Kim, Shephard & Chib 1998), the standard particle-filter benchmark.

x_0 ~ N(μ, σ² / (1 − ρ²)), x_t = μ + ρ (x_{t-1} − μ) + σ ε_t, y_t | x_t ~ N(0, exp(x_t)).

No closed-form likelihood: used for benchmarks and the PMMH tutorial.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array, Float

from ppl.state_space import StateSpaceModel

__all__ = ["SVParams", "stochastic_volatility"]


class SVParams(NamedTuple):
    """θ = (μ, ρ, σ): mean log-volatility, persistence, volatility of volatility."""

    mu: Float[Array, ""]
    rho: Float[Array, ""]
    sigma: Float[Array, ""]

    @classmethod
    def default(cls) -> "SVParams":
        return cls(jnp.asarray(-1.0), jnp.asarray(0.95), jnp.asarray(0.3))


def _initial(p: SVParams):
    return dist.Normal(p.mu, p.sigma / jnp.sqrt(1.0 - p.rho**2))


def _transition(p: SVParams, t, x):
    return dist.Normal(p.mu + p.rho * (x - p.mu), p.sigma)


def _observation(p: SVParams, t, x):
    return dist.Normal(0.0, jnp.exp(0.5 * x))


def stochastic_volatility(params: SVParams | None = None) -> StateSpaceModel:
    """The SV model as a :class:`~ppl.state_space.StateSpaceModel` (scalar state and observation)."""
    return StateSpaceModel(
        _initial, _transition, _observation, params or SVParams.default(), vectorized=True
    )
