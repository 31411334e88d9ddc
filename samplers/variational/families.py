r"""Variational families on the flat unconstrained space \(\mathbb{R}^D\) of a numpyro model.

A family is an :class:`equinox.Module` whose inexact array leaves are the variational parameters
\(\phi\); it draws \(z \sim q_\phi\) by reparameterisation and evaluates \(\log q_\phi(z)\):

- :class:`MeanFieldGaussian`: \(q_\phi(z) = \prod_d \mathcal{N}(z_d; \mu_d, \sigma_d^2)\),
  \(z = \mu + \sigma \odot \varepsilon\), \(\phi = (\mu, \log \sigma)\);
- :class:`FullRankGaussian`: \(q_\phi(z) = \mathcal{N}(z; \mu, L L^\top)\), \(z = \mu + L
  \varepsilon\), \(L\) lower triangular with a positive diagonal (\(\exp\) of a free diagonal);
- :class:`FlowFamily`: a normalising flow \(z = f_\phi(\varepsilon)\) of flowjax (Rezende &
  Mohamed 2015), \(\log q_\phi(z) = \log \mathcal{N}(\varepsilon; 0, I) - \log |\det \partial
  f_\phi / \partial \varepsilon|\); :func:`coupling_flow` builds a RealNVP-style affine coupling
  flow that samples and evaluates densities in one pass each.

Map draws to the model's constrained latents with ``target.constrain(z)``
(:meth:`ppl.numpyro_model.NumpyroModel.constrain`).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ppl import checks

__all__ = [
    "AbstractFamily",
    "MeanFieldGaussian",
    "FullRankGaussian",
    "FlowFamily",
    "coupling_flow",
    "stop_gradient",
]

_LOG_2PI = math.log(2.0 * math.pi)


def stop_gradient(module: Any) -> Any:
    r"""The same pytree with every inexact array leaf under ``lax.stop_gradient`` (the parameters
    seen as constants: the \(\log q_{\perp(\phi)}\) of sticking-the-landing)."""
    return jax.tree.map(lambda x: jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, module)


class AbstractFamily(eqx.Module):
    r"""A reparameterisable density \(q_\phi\) on \(\mathbb{R}^D\)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """D."""

    @abc.abstractmethod
    def sample_and_log_prob(
        self, key: PRNGKeyArray, num_samples: int
    ) -> tuple[Float[Array, "n D"], Float[Array, " n"]]:
        r"""``num_samples`` draws \(z = g_\phi(\varepsilon)\) (differentiable in \(\phi\)) and their
        \(\log q_\phi(z)\)."""

    @abc.abstractmethod
    def log_prob(self, z: Float[Array, "n D"]) -> Float[Array, " n"]:
        r"""\(\log q_\phi(z)\) for a batch of points."""

    def sample(self, key: PRNGKeyArray, num_samples: int) -> Float[Array, "n D"]:
        """``num_samples`` draws (reparameterised)."""
        return self.sample_and_log_prob(key, num_samples)[0]

    def _check_z(self, z):
        z = jnp.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape [n, {self.dim}], got {z.shape}")
        return z


def _check_dim(dim) -> int:
    return checks.positive_int("dim", dim)


class MeanFieldGaussian(AbstractFamily):
    r"""\(q(z) = \prod_d \mathcal{N}(z_d; \mu_d, \sigma_d^2)\) with \(\phi = (\mu, \log \sigma)\)."""

    loc: Float[Array, " D"]
    log_scale: Float[Array, " D"]

    def __check_init__(self):
        if jnp.ndim(self.loc) != 1 or jnp.shape(self.log_scale) != jnp.shape(self.loc):
            raise ValueError(
                "MeanFieldGaussian needs loc and log_scale of equal shape [D]; got "
                f"{jnp.shape(self.loc)} and {jnp.shape(self.log_scale)}"
            )

    @classmethod
    def init(cls, dim: int, *, loc: float = 0.0, scale: float = 1.0) -> "MeanFieldGaussian":
        r"""A standard (or given) Gaussian on \(\mathbb{R}^{D}\)."""
        d = _check_dim(dim)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        return cls(jnp.full((d,), float(loc), jnp.float32), jnp.full((d,), math.log(scale), jnp.float32))

    @property
    def dim(self) -> int:
        return int(self.loc.shape[0])

    @property
    def scale(self) -> Float[Array, " D"]:
        r"""\(\sigma\)."""
        return jnp.exp(self.log_scale)

    def sample_and_log_prob(self, key, num_samples):
        n = checks.positive_int("num_samples", num_samples)
        eps = jax.random.normal(key, (n, self.dim), self.loc.dtype)
        z = self.loc + self.scale * eps
        log_q = -0.5 * jnp.sum(eps**2, axis=-1) - jnp.sum(self.log_scale) - 0.5 * self.dim * _LOG_2PI
        return z, log_q

    def log_prob(self, z):
        z = self._check_z(z)
        eps = (z - self.loc) / self.scale
        return -0.5 * jnp.sum(eps**2, axis=-1) - jnp.sum(self.log_scale) - 0.5 * self.dim * _LOG_2PI

    def log_prob_terms(self, z: Float[Array, "n D"]) -> Float[Array, "n D"]:
        r"""\(\log \mathcal{N}(z_d; \mu_d, \sigma_d^2)\) per coordinate (they sum to :meth:`log_prob`)."""
        z = self._check_z(z)
        eps = (z - self.loc) / self.scale
        return -0.5 * eps**2 - self.log_scale - 0.5 * _LOG_2PI


class FullRankGaussian(AbstractFamily):
    r"""\(q(z) = \mathcal{N}(z; \mu, L L^\top)\); ``raw_scale_tril`` holds \(L\) below the diagonal
    and \(\log L_{dd}\) on it."""

    loc: Float[Array, " D"]
    raw_scale_tril: Float[Array, "D D"]

    def __check_init__(self):
        d = jnp.shape(self.loc)
        if len(d) != 1 or jnp.shape(self.raw_scale_tril) != d * 2:
            raise ValueError(
                "FullRankGaussian needs loc [D] and raw_scale_tril [D, D]; got "
                f"{jnp.shape(self.loc)} and {jnp.shape(self.raw_scale_tril)}"
            )

    @classmethod
    def init(cls, dim: int, *, loc: float = 0.0, scale: float = 1.0) -> "FullRankGaussian":
        r"""\(\mathcal{N}(\text{loc}, \text{scale}^2 I)\) on \(\mathbb{R}^D\)."""
        d = _check_dim(dim)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        return cls(jnp.full((d,), float(loc), jnp.float32), math.log(scale) * jnp.eye(d, dtype=jnp.float32))

    @classmethod
    def from_moments(cls, loc: Float[Array, " D"], cov: Float[Array, "D D"]) -> "FullRankGaussian":
        """The family member with mean ``loc`` and covariance ``cov`` (symmetric positive definite)."""
        loc = jnp.asarray(loc, jnp.float32)
        chol = jnp.linalg.cholesky(jnp.asarray(cov, jnp.float32))
        if not bool(jnp.all(jnp.isfinite(chol))):
            raise ValueError("cov must be symmetric positive definite")
        raw = jnp.tril(chol, -1) + jnp.diag(jnp.log(jnp.diag(chol)))
        return cls(loc, raw)

    @property
    def dim(self) -> int:
        return int(self.loc.shape[0])

    @property
    def scale_tril(self) -> Float[Array, "D D"]:
        r"""\(L\) (lower triangular, positive diagonal)."""
        raw = self.raw_scale_tril
        return jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diag(raw)))

    def _log_det(self):
        return jnp.sum(jnp.diag(self.raw_scale_tril))

    def sample_and_log_prob(self, key, num_samples):
        n = checks.positive_int("num_samples", num_samples)
        eps = jax.random.normal(key, (n, self.dim), self.loc.dtype)
        z = self.loc + eps @ self.scale_tril.T
        log_q = -0.5 * jnp.sum(eps**2, axis=-1) - self._log_det() - 0.5 * self.dim * _LOG_2PI
        return z, log_q

    def log_prob(self, z):
        z = self._check_z(z)
        eps = jax.scipy.linalg.solve_triangular(self.scale_tril, (z - self.loc).T, lower=True).T
        return -0.5 * jnp.sum(eps**2, axis=-1) - self._log_det() - 0.5 * self.dim * _LOG_2PI


class FlowFamily(AbstractFamily):
    r"""A flowjax distribution (e.g. a normalising flow) on \(\mathbb{R}^D\) as a family.

    ``flow`` is any ``flowjax.distributions.AbstractDistribution`` with shape ``(D,)`` and no
    condition; its trainable leaves are the parameters (``paramax.NonTrainable`` leaves stay fixed
    in :func:`samplers.variational.fit`).
    """

    flow: Any

    def __check_init__(self):
        shape = getattr(self.flow, "shape", None)
        if shape is None or len(shape) != 1 or getattr(self.flow, "cond_shape", None) is not None:
            raise ValueError(
                "FlowFamily needs an unconditional flowjax distribution of shape (D,), got "
                f"{type(self.flow).__name__} with shape {shape}"
            )

    @property
    def dim(self) -> int:
        return int(self.flow.shape[0])

    def sample_and_log_prob(self, key, num_samples):
        n = checks.positive_int("num_samples", num_samples)
        return self.flow.sample_and_log_prob(key, (n,))

    def log_prob(self, z):
        return self.flow.log_prob(self._check_z(z))


def coupling_flow(
    key: PRNGKeyArray,
    dim: int,
    *,
    flow_layers: int = 4,
    nn_width: int = 32,
    nn_depth: int = 1,
) -> FlowFamily:
    r"""An affine coupling flow (Dinh, Sohl-Dickstein & Bengio 2017) of flowjax on a standard normal
    base, built for sampling (``invert=False``: \(z = f_\phi(\varepsilon)\) in one forward pass)."""
    import flowjax.bijections as fb
    import flowjax.distributions as fd
    import flowjax.flows as ff

    d = _check_dim(dim)
    if d < 2:
        raise ValueError("a coupling flow needs dim >= 2 (it conditions one block on the other)")
    flow = ff.coupling_flow(
        key,
        base_dist=fd.Normal(jnp.zeros(d)),
        transformer=fb.Affine(),
        flow_layers=checks.positive_int("flow_layers", flow_layers),
        nn_width=checks.positive_int("nn_width", nn_width),
        nn_depth=checks.positive_int("nn_depth", nn_depth, minimum=0),
        invert=False,
    )
    return FlowFamily(flow)
