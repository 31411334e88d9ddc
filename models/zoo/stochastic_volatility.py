r"""Stochastic volatility with unknown parameters as a static numpyro model (latent path included).

The model of :mod:`models.stochastic_volatility` (Kim, Shephard & Chib 1998), its \(T = 50\)
log-variances \(x_{1:T}\) sampled together with the parameters \((\mu, \phi, \sigma)\):

\[
\mu \sim \mathcal{N}(-1, 1), \qquad \tfrac{1 + \phi}{2} \sim \mathrm{Beta}(20, 1.5), \qquad
\sigma \sim \mathrm{HalfNormal}(0.5^2),
\]
\[
x_1 \sim \mathcal{N}\big(\mu, \sigma^2 / (1 - \phi^2)\big), \qquad
x_t = \mu + \phi (x_{t-1} - \mu) + \sigma \varepsilon_t, \qquad
y_t \mid x_t \sim \mathcal{N}(0, e^{x_t}).
\]

Non-centred: the sampled site is the standardised innovations
\(\varepsilon_{1:T} \sim \mathcal{N}(0, I)\), and \(h_1 = \varepsilon_1 / \sqrt{1 - \phi^2}\),
\(h_t = \phi h_{t-1} + \varepsilon_t\), \(x = \mu + \sigma h\) (deterministic site ``x``); the
centred form has a funnel in \(\sigma\) that slows NUTS down. Latent sites ``mu``, ``phi``,
``sigma``, ``eps``; deterministic ``x``; observed ``y`` (\(D = T + 3 = 53\)).

Data (:func:`simulate`, numpy seed 20240612): \(\mu = -1\), \(\phi = 0.9\), \(\sigma = 0.4\),
\(T = 50\). Reference: a long NUTS run (:func:`make_reference`, 4 chains × 5000 draws after 2000
warm-up steps, ``target_accept_prob`` 0.99 against divergences), stored in
``models/reference/stochastic_volatility_nuts.json``; see :mod:`models.zoo.reference`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from jaxtyping import Array, Float

from models.stochastic_volatility import LogVarianceNormal
from models.zoo.reference import REFERENCE_DIR, Reference, load_reference, nuts_reference

__all__ = ["name", "stochastic_volatility", "simulate", "args", "SITES", "reference", "make_reference",
           "REFERENCE_PATH"]

name = "stochastic_volatility"
REFERENCE_PATH = os.path.join(REFERENCE_DIR, "stochastic_volatility_nuts.json")
SITES = ("mu", "phi", "sigma", "x")

NUM_STEPS, SEED = 50, 20240612
TRUE_MU, TRUE_PHI, TRUE_SIGMA = -1.0, 0.9, 0.4


def stochastic_volatility(y: Float[Array, " T"]) -> None:
    """The numpyro model (non-centred latent path)."""
    mu = numpyro.sample("mu", dist.Normal(-1.0, 1.0))
    # domain= makes the support (-1, 1) (numpyro's default domain, the real line, would let an
    # unconstrained sampler leave the stationary region)
    to_pm1 = dist.transforms.AffineTransform(-1.0, 2.0, domain=constraints.unit_interval)
    phi = numpyro.sample("phi", dist.TransformedDistribution(dist.Beta(20.0, 1.5), to_pm1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    eps = numpyro.sample("eps", dist.Normal(0.0, 1.0).expand([y.shape[0]]).to_event(1))

    def step(h, e):
        h = phi * h + e
        return h, h

    h1 = eps[0] / jnp.sqrt(1.0 - phi**2)
    _, rest = jax.lax.scan(step, h1, eps[1:])
    x = numpyro.deterministic("x", mu + sigma * jnp.concatenate([h1[None], rest]))
    numpyro.sample("y", LogVarianceNormal(x), obs=y)  # batch shape [T]


def simulate(seed: int = SEED, num_steps: int = NUM_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of length ``num_steps`` from the model at the true parameters (numpy, fixed seed)."""
    rng = np.random.default_rng(seed)
    x = np.empty(num_steps)
    x[0] = TRUE_MU + TRUE_SIGMA / np.sqrt(1 - TRUE_PHI**2) * rng.standard_normal()
    for t in range(1, num_steps):
        x[t] = TRUE_MU + TRUE_PHI * (x[t - 1] - TRUE_MU) + TRUE_SIGMA * rng.standard_normal()
    y = np.exp(x / 2) * rng.standard_normal(num_steps)
    return x, y


def args() -> tuple[Float[Array, " 50"]]:
    """The model's arguments ``(y,)`` (float32)."""
    return (jnp.asarray(simulate()[1], jnp.float32),)


def reference() -> Reference:
    """The stored NUTS reference."""
    return load_reference(REFERENCE_PATH)


def make_reference(seed: int = 0) -> dict:
    """Run the long NUTS reference and write :data:`REFERENCE_PATH`."""
    return nuts_reference(
        name, stochastic_volatility, args(), REFERENCE_PATH, seed=seed, target_accept_prob=0.99,
        description=f"models.zoo.stochastic_volatility.stochastic_volatility(y), T = {NUM_STEPS}, "
                    f"data simulate(seed={SEED})",
    )
