r"""A static conjugate Bayesian model with exact evidence and posterior: the Gaussian mean.

\[
\mu \sim \mathcal{N}(m_0, S_0) \text{ on } \mathbb{R}^d, \qquad
y_i \mid \mu \sim \mathcal{N}(\mu, \Sigma) \text{ i.i.d.}, \quad i = 1..n, \quad \Sigma \text{ known}.
\]

Posterior (Bishop 2006, §2.3.3; Murphy 2007, "Conjugate Bayesian analysis of the Gaussian
distribution"): \(S_n^{-1} = S_0^{-1} + n \Sigma^{-1}\),
\(m_n = S_n (S_0^{-1} m_0 + \Sigma^{-1} \sum_i y_i)\). Evidence, from Bayes' rule at any \(\mu\) (we
take \(\mu = m_n\)):

\[
\log p(y) = \sum_i \log \mathcal{N}(y_i; m_n, \Sigma) + \log \mathcal{N}(m_n; m_0, S_0) -
\log \mathcal{N}(m_n; m_n, S_n).
\]

These are the exact references for tempered SMC on a numpyro model.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["gaussian_mean_model", "ConjugateGaussianMean"]


def gaussian_mean_model(
    y: Float[Array, "n d"] | None,
    prior_mean: Float[Array, " d"],
    prior_cov: Float[Array, "d d"],
    noise_cov: Float[Array, "d d"],
    num_obs: int | None = None,
) -> None:
    """numpyro model: latent site ``"mu"``, observed site ``"y"`` (n rows); ``y=None`` with
    ``num_obs`` simulates."""
    mu = numpyro.sample("mu", dist.MultivariateNormal(prior_mean, covariance_matrix=prior_cov))
    n = y.shape[0] if y is not None else num_obs
    with numpyro.plate("obs", n):
        numpyro.sample("y", dist.MultivariateNormal(mu, covariance_matrix=noise_cov), obs=y)


class ConjugateGaussianMean(eqx.Module):
    r"""Gaussian prior \(\mathcal{N}(m_0, S_0)\) on a \(d\)-dimensional mean, Gaussian likelihood
    \(\mathcal{N}(\mu, \Sigma)\)."""

    prior_mean: Float[Array, " d"]
    prior_cov: Float[Array, "d d"]
    noise_cov: Float[Array, "d d"]

    def __check_init__(self):
        d = jnp.shape(self.prior_mean)
        if len(d) != 1 or jnp.shape(self.prior_cov) != d * 2 or jnp.shape(self.noise_cov) != d * 2:
            raise ValueError(
                "prior_mean must be [d] and prior_cov, noise_cov [d, d]; got shapes "
                f"{jnp.shape(self.prior_mean)}, {jnp.shape(self.prior_cov)}, "
                f"{jnp.shape(self.noise_cov)}"
            )

    @property
    def model(self):
        """The numpyro model callable; call it with :meth:`model_args`."""
        return gaussian_mean_model

    def model_args(self, y: Float[Array, "n d"]) -> tuple:
        """Positional arguments of :func:`gaussian_mean_model` for data ``y``."""
        return (self._check_y(y), self.prior_mean, self.prior_cov, self.noise_cov)

    def _check_y(self, y):
        y = jnp.asarray(y)
        d = self.prior_mean.shape[0]
        if y.ndim != 2 or y.shape[1] != d or y.shape[0] < 1:
            raise ValueError(f"y must have shape [n, {d}] with n >= 1, got {y.shape}")
        return y

    def simulate(
        self, key: PRNGKeyArray, num_obs: int
    ) -> tuple[Float[Array, " d"], Float[Array, "n d"]]:
        r"""Draw \((\mu, y_{1:n})\) from the model."""
        if not isinstance(num_obs, int) or num_obs < 1:
            raise ValueError(f"num_obs must be an int >= 1, got {num_obs!r}")
        k_mu, k_y = jax.random.split(key)
        mu = dist.MultivariateNormal(self.prior_mean, covariance_matrix=self.prior_cov).sample(k_mu)
        y = dist.MultivariateNormal(mu, covariance_matrix=self.noise_cov).sample(k_y, (num_obs,))
        return mu, y

    def posterior(self, y: Float[Array, "n d"]) -> tuple[Float[Array, " d"], Float[Array, "d d"]]:
        r"""Exact posterior mean \(m_n\) and covariance \(S_n\) of \(\mu\) given \(y\)."""
        y = self._check_y(y)
        p0 = jnp.linalg.inv(self.prior_cov)
        pn = jnp.linalg.inv(self.noise_cov)
        cov = jnp.linalg.inv(p0 + y.shape[0] * pn)
        cov = 0.5 * (cov + cov.T)
        mean = cov @ (p0 @ self.prior_mean + pn @ y.sum(0))
        return mean, cov

    def log_evidence(self, y: Float[Array, "n d"]) -> Float[Array, ""]:
        r"""Exact \(\log p(y_{1:n})\) (Bayes' rule evaluated at the posterior mean)."""
        y = self._check_y(y)
        m, s = self.posterior(y)
        lik = dist.MultivariateNormal(m, covariance_matrix=self.noise_cov).log_prob(y).sum()
        prior_dist = dist.MultivariateNormal(self.prior_mean, covariance_matrix=self.prior_cov)
        prior = prior_dist.log_prob(m)
        post = dist.MultivariateNormal(m, covariance_matrix=s).log_prob(m)
        return lik + prior - post
