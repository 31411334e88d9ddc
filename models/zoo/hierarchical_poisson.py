r"""Hierarchical Poisson regression: counts by group with a log-normal hierarchy on the rates.

\(G = 10\) groups, \(K = 5\) counts per group with known exposures \(e_{gk}\):

\[
\mu \sim \mathcal{N}(0, 2^2), \qquad \sigma \sim \mathrm{HalfNormal}(1), \qquad
\eta_g \sim \mathcal{N}(0, 1), \qquad
\log r_g = \mu + \sigma \eta_g, \qquad
n_{gk} \mid r_g \sim \mathrm{Poisson}(e_{gk} r_g),
\]

non-centred (\(\eta\) is sampled, the log-rates are deterministic). Latent sites ``mu``,
``sigma``, ``eta``; deterministic ``log_rate``; observed ``counts`` (one likelihood term per group,
summed over its \(K\) counts).

Data (:func:`simulate`, numpy seed 20240611): \(\mu = 1\), \(\sigma = 0.6\), exposures uniform on
\([0.5, 2]\). Reference: a long NUTS run (:func:`make_reference`, 4 chains × 5000 draws after 2000
warm-up steps, ``target_accept_prob`` 0.95 against divergences), stored in
``models/reference/hierarchical_poisson_nuts.json``; see :mod:`models.zoo.reference`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float

from models.zoo.reference import REFERENCE_DIR, Reference, load_reference, nuts_reference

__all__ = ["name", "hierarchical_poisson", "simulate", "args", "SITES", "reference", "make_reference",
           "REFERENCE_PATH"]

name = "hierarchical_poisson"
REFERENCE_PATH = os.path.join(REFERENCE_DIR, "hierarchical_poisson_nuts.json")
SITES = ("mu", "sigma", "eta", "log_rate")

NUM_GROUPS, PER_GROUP, SEED = 10, 5, 20240611
TRUE_MU, TRUE_SIGMA = 1.0, 0.6


def hierarchical_poisson(exposure: Float[Array, "G K"], counts: Float[Array, "G K"] | None = None) -> None:
    """The numpyro model; ``counts=None`` samples the prior predictive."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    eta = numpyro.sample("eta", dist.Normal(0.0, 1.0).expand([exposure.shape[0]]).to_event(1))
    log_rate = numpyro.deterministic("log_rate", mu + sigma * eta)
    rate = exposure * jnp.exp(log_rate)[:, None]
    numpyro.sample("counts", dist.Poisson(rate).to_event(1), obs=counts)  # batch [G], event [K]


def simulate(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""``(exposure [G, K], counts [G, K], true log-rates [G])`` from the generative model at the
    true \(\mu, \sigma\) (numpy, fixed seed)."""
    rng = np.random.default_rng(seed)
    log_rate = TRUE_MU + TRUE_SIGMA * rng.standard_normal(NUM_GROUPS)
    exposure = rng.uniform(0.5, 2.0, size=(NUM_GROUPS, PER_GROUP))
    counts = rng.poisson(exposure * np.exp(log_rate)[:, None])
    return exposure, counts, log_rate


def args() -> tuple[Float[Array, "10 5"], Float[Array, "10 5"]]:
    """The model's arguments ``(exposure, counts)`` (float32)."""
    exposure, counts, _ = simulate()
    return jnp.asarray(exposure, jnp.float32), jnp.asarray(counts, jnp.float32)


def reference() -> Reference:
    """The stored NUTS reference."""
    return load_reference(REFERENCE_PATH)


def make_reference(seed: int = 0) -> dict:
    """Run the long NUTS reference and write :data:`REFERENCE_PATH`."""
    return nuts_reference(
        name, hierarchical_poisson, args(), REFERENCE_PATH, seed=seed, target_accept_prob=0.95,
        description=f"models.zoo.hierarchical_poisson.hierarchical_poisson(exposure, counts), "
                    f"data simulate(seed={SEED})",
    )
