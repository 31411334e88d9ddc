r"""Exact exponential tilts of Gaussian mixtures.

For \(p(x) = \sum_k w_k\, \mathcal{N}(x; \mu_k, \Sigma_k)\) and a linear reward \(r(x) = a^\top x\),
completing the square gives

\[
p(x)\, e^{\lambda a^\top x} = \sum_k w_k \exp\big(\lambda a^\top \mu_k + \tfrac12 \lambda^2 a^\top \Sigma_k
a\big) \, \mathcal{N}(x; \mu_k + \lambda \Sigma_k a, \Sigma_k),
\]

so the tilted target \(p_\lambda(x) \propto p(x) \exp(\lambda r(x))\) is again a mixture, with the
same covariances, means shifted by \(\lambda \Sigma_k a\) and weights
\(\propto w_k \exp(\lambda a^\top \mu_k + \frac12 \lambda^2 a^\top \Sigma_k a)\); its normaliser (the
mixture's moment generating function at \(\lambda a\)) is

\[
Z(\lambda) = \mathbb{E}_p\big[e^{\lambda a^\top x}\big]
= \sum_k w_k \exp\big(\lambda a^\top \mu_k + \tfrac12 \lambda^2 a^\top \Sigma_k a\big).
\]

Exact reference for reward-tilted diffusion samplers (e.g. Skreta et al. 2025, "Feynman-Kac
correctors in diffusion").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from models.diffusion.gaussian_mixture import GaussianMixture

__all__ = ["tilt", "tilt_log_normaliser"]


def _log_tilt_factors(gmm: GaussianMixture, direction, lam):
    direction = jnp.asarray(direction)
    if direction.shape != (gmm.dim,):
        raise ValueError(f"direction must have shape [{gmm.dim}], got {direction.shape}")
    cov_a = gmm.covariances @ direction  # [K, d]
    log_factor = lam * gmm.means @ direction + 0.5 * lam**2 * cov_a @ direction
    return log_factor, cov_a


def tilt(
    gmm: GaussianMixture, direction: Float[Array, " d"], lam: Float[Array, ""]
) -> GaussianMixture:
    r"""The mixture \(\propto p(x) \exp(\lambda a^\top x)\).

    Means \(\mu_k + \lambda \Sigma_k a\), covariances \(\Sigma_k\), weights
    \(\propto w_k \exp(\lambda a^\top \mu_k + \frac12 \lambda^2 a^\top \Sigma_k a)\).
    """
    log_factor, cov_a = _log_tilt_factors(gmm, direction, lam)
    return GaussianMixture.from_log_weights(
        gmm.log_weights + log_factor, gmm.means + lam * cov_a, gmm.covariances
    )


def tilt_log_normaliser(
    gmm: GaussianMixture, direction: Float[Array, " d"], lam: Float[Array, ""]
) -> Float[Array, ""]:
    r"""\(\log Z(\lambda) = \log \mathbb{E}_p[\exp(\lambda a^\top x)]\).

    Computed as
    \(\operatorname{logsumexp}_k (\log w_k + \lambda a^\top \mu_k + \frac12 \lambda^2 a^\top \Sigma_k a)\).
    """
    log_factor, _ = _log_tilt_factors(gmm, direction, lam)
    return jax.nn.logsumexp(gmm.log_weights + log_factor)
