"""Bayesian logistic regression on scikit-learn's breast-cancer data, with a stored NUTS reference.

    β₀ ~ N(0, 5²),   β_j ~ N(0, 1) (j = 1..30),   y_i ~ Bernoulli(σ(β₀ + x_iᵀ β)),

on the 569 standardised rows of ``sklearn.datasets.load_breast_cancer`` (a 31-dimensional
posterior, strongly correlated: the features are). The posterior has no closed form; the reference
is a long NUTS run (:func:`make_reference`: 4 chains × 5000 draws after 2000 warm-up steps,
numpyro), whose posterior means, standard deviations and effective sample sizes are stored in
``models/reference/logistic_breast_cancer_nuts.json`` and read by :func:`nuts_reference`.
Regenerate it with ``python -m models.logistic_regression``.

Used as an exact-style check of tempered SMC's defaults (a random walk with a fixed small number
of moves gets this posterior visibly wrong while reporting a healthy acceptance rate).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float

__all__ = ["breast_cancer_data", "logistic_regression", "nuts_reference", "make_reference",
           "REFERENCE_PATH"]

REFERENCE_PATH = os.path.join(os.path.dirname(__file__), "reference", "logistic_breast_cancer_nuts.json")


def breast_cancer_data() -> tuple[Float[Array, "569 30"], Float[Array, " 569"]]:
    """Standardised features (zero mean, unit variance per column) and 0/1 labels (float32)."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("breast_cancer_data needs scikit-learn (pip install scikit-learn)") from e
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def logistic_regression(x: Float[Array, "n d"], y: Float[Array, " n"] | None = None) -> None:
    """The numpyro model (sites ``b0`` and ``b``; ``y`` observed)."""
    b0 = numpyro.sample("b0", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=b0 + x @ b), obs=y)


def nuts_reference() -> dict[str, np.ndarray]:
    """The stored reference: ``mean``, ``sd`` and ``ess`` of the 31 coordinates (β₀ first, then
    β), and ``num_draws``."""
    with open(REFERENCE_PATH) as fh:
        ref = json.load(fh)
    return {k: np.asarray(v) if isinstance(v, list) else v for k, v in ref.items()}


def make_reference(seed: int = 0, num_chains: int = 4, num_warmup: int = 2000,
                   num_samples: int = 5000) -> dict:
    """Run NUTS (numpyro) and write :data:`REFERENCE_PATH`; returns what was written."""
    import jax
    from numpyro.diagnostics import effective_sample_size
    from numpyro.infer import MCMC, NUTS

    x, y = breast_cancer_data()
    mcmc = MCMC(NUTS(logistic_regression), num_warmup=num_warmup, num_samples=num_samples,
                num_chains=num_chains, chain_method="sequential", progress_bar=False)
    mcmc.run(jax.random.key(seed), x, y)
    s = mcmc.get_samples(group_by_chain=True)
    draws = np.concatenate([np.asarray(s["b0"])[..., None], np.asarray(s["b"])], axis=-1)  # [C, S, 31]
    flat = draws.reshape(-1, draws.shape[-1]).astype(np.float64)
    ref = {
        "model": "models.logistic_regression.logistic_regression on breast_cancer_data()",
        "method": f"numpyro NUTS, {num_chains} chains x {num_samples} draws, {num_warmup} warm-up, seed {seed}",
        "num_draws": int(flat.shape[0]),
        "mean": flat.mean(0).tolist(),
        "sd": flat.std(0, ddof=1).tolist(),
        "ess": np.asarray(effective_sample_size(draws.astype(np.float64))).tolist(),
    }
    os.makedirs(os.path.dirname(REFERENCE_PATH), exist_ok=True)
    with open(REFERENCE_PATH, "w") as fh:
        json.dump(ref, fh, indent=1)
    return ref


if __name__ == "__main__":
    r = make_reference()
    print(f"wrote {REFERENCE_PATH}: {r['num_draws']} draws, min ESS {min(r['ess']):.0f}")
