r"""Eight schools (Rubin 1981; Gelman et al., *Bayesian Data Analysis*, §5.5), non-centred.

Estimated coaching effects \(y_j\) with known standard errors \(\sigma_j\) in \(J = 8\) schools,

\[
\mu \sim \mathcal{N}(0, 5^2), \qquad \tau \sim \mathrm{HalfCauchy}(5), \qquad
\tilde\theta_j \sim \mathcal{N}(0, 1), \qquad
\theta_j = \mu + \tau \tilde\theta_j, \qquad
y_j \mid \theta_j \sim \mathcal{N}(\theta_j, \sigma_j^2),
\]

with the classic data \(y = (28, 8, -3, 7, -1, 1, 18, 12)\),
\(\sigma = (15, 10, 16, 11, 9, 11, 10, 18)\). The non-centred form (sampling \(\tilde\theta\), not
\(\theta\)) removes the funnel between \(\tau\) and \(\theta\) that makes the centred form hard for
HMC. Latent sites ``mu``, ``tau``, ``theta_tilde``; deterministic ``theta``; observed ``y``.

Reference: a long NUTS run (:func:`make_reference`, 4 chains × 5000 draws after 2000 warm-up
steps, ``target_accept_prob`` 0.95 to keep divergences rare), stored in
``models/reference/eight_schools_nuts.json``; see :mod:`models.zoo.reference`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float

from models.zoo.reference import REFERENCE_DIR, Reference, load_reference, nuts_reference

__all__ = ["name", "eight_schools", "args", "SITES", "reference", "make_reference", "REFERENCE_PATH"]

name = "eight_schools"
REFERENCE_PATH = os.path.join(REFERENCE_DIR, "eight_schools_nuts.json")
#: the sites compared with the reference (constrained values)
SITES = ("mu", "tau", "theta_tilde", "theta")

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma: Float[Array, " J"], y: Float[Array, " J"] | None = None) -> None:
    """The numpyro model (non-centred); ``y=None`` samples the prior predictive."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0).expand([sigma.shape[0]]).to_event(1))
    theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)  # batch shape [J]: one term per school


def args() -> tuple[Float[Array, " 8"], Float[Array, " 8"]]:
    """The model's arguments ``(sigma, y)`` (float32)."""
    return jnp.asarray(SIGMA, jnp.float32), jnp.asarray(Y, jnp.float32)


def reference() -> Reference:
    """The stored NUTS reference."""
    return load_reference(REFERENCE_PATH)


def make_reference(seed: int = 0) -> dict:
    """Run the long NUTS reference and write :data:`REFERENCE_PATH`."""
    return nuts_reference(
        name, eight_schools, args(), REFERENCE_PATH, seed=seed, target_accept_prob=0.95,
        description="models.zoo.eight_schools.eight_schools(sigma, y), classic data (non-centred)",
    )
