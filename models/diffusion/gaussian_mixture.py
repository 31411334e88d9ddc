r"""Gaussian mixtures in d dimensions and their exact noised marginals under a VP diffusion.

\(p(x) = \sum_k w_k\, \mathcal{N}(x; \mu_k, \Sigma_k)\). Under the forward VP SDE the state at noise
level \(s\) is \(x_s = \alpha_s x_0 + \sigma_s \varepsilon\) with \(\varepsilon \sim \mathcal{N}(0, I)\),
so the marginal is again a mixture,

\[
p_s(x) = \sum_k w_k\, \mathcal{N}(x; \alpha_s \mu_k, \alpha_s^2 \Sigma_k + \sigma_s^2 I),
\]

and its score
\(\nabla \log p_s(x) = \sum_k \gamma_k(x) (\alpha_s^2 \Sigma_k + \sigma_s^2 I)^{-1} (\alpha_s \mu_k - x)\),
with responsibilities
\(\gamma_k(x) \propto w_k\, \mathcal{N}(x; \alpha_s \mu_k, \alpha_s^2 \Sigma_k + \sigma_s^2 I)\), is
available in closed form. This makes the mixture the exact reference for score-based samplers (Song et al.
2021, "Score-based generative modeling through stochastic differential equations", ICLR).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["GaussianMixture", "DiffusedMixture"]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class GaussianMixture(eqx.Module):
    r"""Mixture \(\sum_k w_k\, \mathcal{N}(\mu_k, \Sigma_k)\) with \(K\) components in \(d\) dimensions.

    Build with ``GaussianMixture(weights, means, covariances)`` (weights need not be normalised) or
    ``GaussianMixture.from_log_weights(log_weights, means, covariances)``. ``log_weights`` are
    stored normalised. Density methods accept any leading batch shape ``[..., d]``.
    """

    log_weights: Float[Array, " K"]
    means: Float[Array, "K d"]
    covariances: Float[Array, "K d d"]

    def __init__(
        self,
        weights: Float[Array, " K"],
        means: Float[Array, "K d"],
        covariances: Float[Array, "K d d"],
    ):
        weights = jnp.asarray(weights)
        if weights.ndim != 1:
            raise ValueError(f"weights must have shape [K], got {weights.shape}")
        if _is_concrete(weights) and not bool(jnp.all(weights >= 0) & (jnp.sum(weights) > 0)):
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.log_weights, self.means, self.covariances = _checked(
            jnp.log(weights) - jnp.log(jnp.sum(weights)), means, covariances
        )

    @classmethod
    def from_log_weights(
        cls,
        log_weights: Float[Array, " K"],
        means: Float[Array, "K d"],
        covariances: Float[Array, "K d d"],
    ) -> "GaussianMixture":
        """Build from (unnormalised) log-weights, stable for extreme weights."""
        log_weights = jnp.asarray(log_weights)
        if log_weights.ndim != 1:
            raise ValueError(f"log_weights must have shape [K], got {log_weights.shape}")
        obj = object.__new__(cls)
        lw, m, c = _checked(log_weights - jax.nn.logsumexp(log_weights), means, covariances)
        object.__setattr__(obj, "log_weights", lw)
        object.__setattr__(obj, "means", m)
        object.__setattr__(obj, "covariances", c)
        return obj

    # ---- shape information ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def weights(self) -> Float[Array, " K"]:
        return jnp.exp(self.log_weights)

    # ---- moments ------------------------------------------------------------------------------
    def mean(self) -> Float[Array, " d"]:
        r"""\(\mathbb{E}[x] = \sum_k w_k \mu_k\)."""
        return self.weights @ self.means

    def covariance(self) -> Float[Array, "d d"]:
        r"""\(\mathrm{Cov}[x] = \sum_k w_k (\Sigma_k + \mu_k \mu_k^\top) - m m^\top\),
        \(m = \mathbb{E}[x]\)."""
        m = self.mean()
        second = jnp.einsum("k,kij->ij", self.weights, self.covariances) + jnp.einsum(
            "k,ki,kj->ij", self.weights, self.means, self.means
        )
        return second - jnp.outer(m, m)

    # ---- density and score --------------------------------------------------------------------
    def _component_terms(self, x):
        r"""Per-component \(\log w_k \mathcal{N}(x; \mu_k, \Sigma_k)\) and \(P_k (x - \mu_k)\),
        \(P_k = \Sigma_k^{-1}\), batched over \(x\).

        The precisions are formed once per call (not per point): for the small \(d\) this module
        targets, matrix products are much faster than batched triangular solves.
        """
        chol = jnp.linalg.cholesky(self.covariances)  # [K, d, d]
        eye = jnp.eye(self.dim, dtype=chol.dtype)
        prec = jax.vmap(lambda c: jax.scipy.linalg.cho_solve((c, True), eye))(chol)
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        const = self.log_weights - half_logdet - 0.5 * self.dim * math.log(2 * math.pi)
        diff = x[..., None, :] - self.means  # [..., K, d]
        sol = jnp.einsum("kij,...kj->...ki", prec, diff)
        return const - 0.5 * jnp.sum(diff * sol, axis=-1), sol

    def _check_x(self, x):
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., {self.dim}], got {x.shape}")
        return x

    def log_prob(self, x: Float[Array, "... d"]) -> Float[Array, "..."]:
        r"""\(\log p(x) = \operatorname{logsumexp}_k [\log w_k + \log \mathcal{N}(x; \mu_k, \Sigma_k)]\)."""
        log_terms, _ = self._component_terms(self._check_x(x))
        return jax.nn.logsumexp(log_terms, axis=-1)

    def score(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        r"""\(\nabla \log p(x) = -\sum_k \gamma_k(x)\, \Sigma_k^{-1} (x - \mu_k)\), in closed form."""
        log_terms, sol = self._component_terms(self._check_x(x))
        gamma = jax.nn.softmax(log_terms, axis=-1)
        return -jnp.einsum("...k,...kd->...d", gamma, sol)

    def sample(self, key: PRNGKeyArray, num_samples: int) -> Float[Array, "n d"]:
        r"""Draw ``num_samples`` iid points: \(k \sim \mathrm{Cat}(w)\), \(x = \mu_k + L_k z\)."""
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.categorical(k_comp, self.log_weights, shape=(num_samples,))
        chol = jnp.linalg.cholesky(self.covariances)
        z = jax.random.normal(k_noise, (num_samples, self.dim), self.means.dtype)
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)

    # ---- diffusion ----------------------------------------------------------------------------
    def noised(self, alpha: Float[Array, ""], sigma: Float[Array, ""]) -> "GaussianMixture":
        r"""Law of \(\alpha x + \sigma \varepsilon\) (\(x \sim p\), \(\varepsilon \sim \mathcal{N}(0, I)\)):
        means \(\alpha \mu_k\), covariances \(\alpha^2 \Sigma_k + \sigma^2 I\)."""
        eye = jnp.eye(self.dim, dtype=self.covariances.dtype)
        return GaussianMixture.from_log_weights(
            self.log_weights, alpha * self.means, alpha**2 * self.covariances + sigma**2 * eye
        )


def _checked(log_weights, means, covariances):
    means = jnp.asarray(means)
    covariances = jnp.asarray(covariances)
    if means.ndim != 2:
        raise ValueError(f"means must have shape [K, d], got {means.shape}")
    k, d = means.shape
    if log_weights.shape != (k,):
        raise ValueError(f"weights must have shape [{k}] to match means {means.shape}")
    if covariances.shape != (k, d, d):
        raise ValueError(f"covariances must have shape [{k}, {d}, {d}], got {covariances.shape}")
    if _is_concrete(covariances):
        sym = bool(jnp.allclose(covariances, jnp.swapaxes(covariances, -1, -2), atol=1e-6))
        pd = bool(jnp.all(jnp.linalg.eigvalsh(covariances) > 0)) if sym else False
        if not (sym and pd):
            raise ValueError("every covariance must be symmetric positive definite")
    return log_weights, means, covariances


class DiffusedMixture(eqx.Module):
    r"""A Gaussian-mixture data distribution diffused by a VP SDE: the exact marginals \(p_s\).

    ``sde`` needs ``alpha(s)`` and ``sigma(s)`` (see :class:`~models.diffusion.vp_sde.VPSDE`).
    Calling the module returns the exact score \(\nabla \log p_s(x)\), so it can be passed wherever a
    score network ``score_fn(x [..., d], s) -> [..., d]`` is expected.
    """

    data: GaussianMixture
    sde: eqx.Module

    def marginal(self, s: Float[Array, ""]) -> GaussianMixture:
        r"""\(p_s\), the law of \(x_s = \alpha_s x_0 + \sigma_s \varepsilon\)."""
        return self.data.noised(self.sde.alpha(s), self.sde.sigma(s))

    def log_prob(self, x: Float[Array, "... d"], s: Float[Array, ""]) -> Float[Array, "..."]:
        return self.marginal(s).log_prob(x)

    def score(self, x: Float[Array, "... d"], s: Float[Array, ""]) -> Float[Array, "... d"]:
        r"""Closed-form \(\nabla_x \log p_s(x)\)."""
        return self.marginal(s).score(x)

    def __call__(self, x: Float[Array, "... d"], s: Float[Array, ""]) -> Float[Array, "... d"]:
        return self.score(x, s)
