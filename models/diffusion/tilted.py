"""Exact exponential tilts of Gaussian mixtures.

For p(x) = Σ_k w_k N(x; μ_k, Σ_k) and a linear reward r(x) = aᵀx, completing the square gives

    p(x) exp(λ aᵀx) = Σ_k w_k exp(λ aᵀμ_k + ½ λ² aᵀΣ_k a) N(x; μ_k + λ Σ_k a, Σ_k),

so the tilted target p_λ(x) ∝ p(x) exp(λ r(x)) is again a mixture, with the same covariances, means
shifted by λ Σ_k a and weights ∝ w_k exp(λ aᵀμ_k + ½ λ² aᵀΣ_k a); its normaliser is
Z(λ) = E_p[exp(λ aᵀx)] = Σ_k w_k exp(λ aᵀμ_k + ½ λ² aᵀΣ_k a) (the mixture's moment generating
function at λ a). Exact reference for reward-tilted diffusion samplers (e.g. Skreta et al. 2025,
"Feynman-Kac correctors in diffusion").
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
    """The mixture ∝ p(x) exp(λ aᵀx).

    Means μ_k + λ Σ_k a, covariances Σ_k, weights ∝ w_k exp(λ aᵀμ_k + ½ λ² aᵀΣ_k a).
    """
    log_factor, cov_a = _log_tilt_factors(gmm, direction, lam)
    return GaussianMixture.from_log_weights(
        gmm.log_weights + log_factor, gmm.means + lam * cov_a, gmm.covariances
    )


def tilt_log_normaliser(
    gmm: GaussianMixture, direction: Float[Array, " d"], lam: Float[Array, ""]
) -> Float[Array, ""]:
    """log Z(λ) = log E_p[exp(λ aᵀx)] = logsumexp_k (log w_k + λ aᵀμ_k + ½ λ² aᵀΣ_k a)."""
    log_factor, _ = _log_tilt_factors(gmm, direction, lam)
    return jax.nn.logsumexp(gmm.log_weights + log_factor)
