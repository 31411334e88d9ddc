r"""Auto-encoding variational Bayes: variational autoencoders trained with the ELBO or IWAE bound.

A latent-variable model \(p_\theta(x, z) = p_\theta(x \mid z)\, \mathcal{N}(z; 0, I)\) (the
*decoder*) is fitted together with an *amortised* variational posterior \(q_\phi(z \mid x) =
\mathcal{N}(z; \mu_\phi(x), \operatorname{diag} \sigma_\phi^2(x))\) (the *encoder*, one network
for every data point; Kingma & Welling 2014, Rezende, Mohamed & Wierstra 2014). For one image
\(x\), the importance weights \(w_k = p_\theta(x, z_k) / q_\phi(z_k \mid x)\),
\(z_{1:K} \sim q_\phi(\cdot \mid x)\) i.i.d., give the bounds of
:mod:`samplers.variational.objectives`,

\[
\mathcal{L}_K(x) = \mathbb{E}\Big[\log \tfrac1K \textstyle\sum_{k=1}^K w_k\Big] \le \log
p_\theta(x), \qquad \mathcal{L}_1 = \text{ELBO} \le \mathcal{L}_K \le \mathcal{L}_{K+1}
\]

(Burda, Grosse & Salakhutdinov 2016, Thm. 1), and training maximises their average over the
data, \(\frac1n \sum_i \mathcal{L}_K(x_i)\), jointly in \((\theta, \phi)\) with reparameterised
gradients \(z_k = \mu_\phi(x) + \sigma_\phi(x) \odot \varepsilon_k\) (``IWAE(K)`` trains an IWAE,
``ELBO()`` a VAE).

**As a Feynman-Kac model.** :class:`AmortisedImportance` is a one-step model: \(M_0\) draws an
image index \(i\) uniformly (and, for grey-level data, a binarisation \(x \sim
\mathrm{Bernoulli}(\text{intensities}_i)\), Salakhutdinov & Murray 2008), then the particles
\(z_{1:K} \sim q_\phi(\cdot \mid x)\), all \(K\) sharing the image; \(G_0 = w\). So
:func:`samplers.variational.objectives.bound` with ``IWAE(K, num_samples=B)`` on it is the IWAE
bound averaged over a minibatch of \(B\) images drawn with replacement, and :func:`train` is
:func:`samplers.variational.optimise.fit` on it (compiled ``lax.scan`` chunks, progress bar,
stop at the first non-finite loss or gradient).

**Held-out log-likelihood** (Burda et al. 2016, §5): \(\log p_\theta(x)\) of each test image is
estimated by \(\log \hat Z_K(x) = \log \frac1K \sum_k w_k\) with a large \(K\)
(:func:`heldout_log_likelihood`), a lower bound in expectation that converges to \(\log
p_\theta(x)\). By the delta method, with \(v = \mathrm{Var}_q(w) / p_\theta(x)^2\) the relative
variance of the weights, its bias is \(-v / (2K) + O(K^{-2})\) and its standard deviation
\(\sqrt{v / K}\); \(v\) is estimated by \(K / \mathrm{ESS} - 1\) from the same weights.

**Exact reference.** With a linear-Gaussian decoder :class:`LinearGaussianDecoder`,
\(p(x \mid z) = \mathcal{N}(x; Wz + b, \sigma^2 I)\), the model is probabilistic PCA (Tipping &
Bishop 1999): \(p(x) = \mathcal{N}(x; b, W W^\top + \sigma^2 I)\) and \(p(z \mid x) =
\mathcal{N}(M^{-1} W^\top (x - b), \sigma^2 M^{-1})\), \(M = W^\top W + \sigma^2 I\), both exact.

References: D. P. Kingma and M. Welling, *Auto-encoding variational Bayes*, ICLR 2014;
Y. Burda, R. Grosse and R. Salakhutdinov, *Importance weighted autoencoders*, ICLR 2016;
M. E. Tipping and C. M. Bishop, *Probabilistic principal component analysis*, JRSS B 1999.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from ppl import checks
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.variational.objectives import ELBO, IWAE, AbstractObjective, RenyiBound
from samplers.variational.optimise import VIResult, fit

__all__ = [
    "GaussianEncoder",
    "AbstractDecoder",
    "BernoulliDecoder",
    "LinearGaussianDecoder",
    "VAE",
    "AmortisedImportance",
    "AmortisedTarget",
    "amortised_bound",
    "train",
    "HeldOutLogLikelihood",
    "heldout_log_weights",
    "heldout_log_likelihood",
    "load_digits_split",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _standard_normal_log_prob(z: Float[Array, "K L"]) -> Float[Array, " K"]:
    return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * z.shape[-1] * _LOG_2PI


# ------------------------------------------------------------------------------------------------
# encoder and decoders
# ------------------------------------------------------------------------------------------------


class GaussianEncoder(eqx.Module):
    r"""\(q_\phi(z \mid x) = \mathcal{N}(z; \mu_\phi(x), \operatorname{diag} \sigma_\phi^2(x))\):
    an MLP \(x \mapsto (\mu, \log \sigma)\) (its last layer has \(2L\) outputs).

    ``depth=0`` is an affine map (the exact posterior mean of probabilistic PCA is affine in
    \(x\); with ``depth=0`` the weights from \(x\) to \(\log\sigma\) may be set to zero for a
    constant scale)."""

    mlp: eqx.nn.MLP
    latent_dim: int = eqx.field(static=True)

    @classmethod
    def init(
        cls,
        key: PRNGKeyArray,
        data_dim: int,
        latent_dim: int,
        *,
        width: int = 128,
        depth: int = 2,
        activation: Callable = jax.nn.tanh,
    ) -> "GaussianEncoder":
        """An MLP encoder with ``depth`` hidden layers of ``width`` units (equinox's default
        initialisation)."""
        d = checks.positive_int("data_dim", data_dim)
        lat = checks.positive_int("latent_dim", latent_dim)
        mlp = eqx.nn.MLP(d, 2 * lat, checks.positive_int("width", width),
                         checks.positive_int("depth", depth, minimum=0), activation=activation,
                         key=key)
        return cls(mlp, lat)

    def __call__(self, x: Float[Array, " D"]) -> tuple[Float[Array, " L"], Float[Array, " L"]]:
        r"""\((\mu_\phi(x), \log \sigma_\phi(x))\)."""
        out = self.mlp(x)
        return out[: self.latent_dim], out[self.latent_dim:]

    def sample_and_log_prob(
        self, key: PRNGKeyArray, x: Float[Array, " D"], num_samples: int
    ) -> tuple[Float[Array, "K L"], Float[Array, " K"]]:
        r"""\(K\) reparameterised draws \(z_k = \mu + \sigma \odot \varepsilon_k\) and
        \(\log q_\phi(z_k \mid x)\)."""
        loc, log_scale = self(x)
        eps = jax.random.normal(key, (num_samples, self.latent_dim), loc.dtype)
        z = loc + jnp.exp(log_scale) * eps
        log_q = (-0.5 * jnp.sum(eps**2, axis=-1) - jnp.sum(log_scale)
                 - 0.5 * self.latent_dim * _LOG_2PI)
        return z, log_q

    def log_prob(self, x: Float[Array, " D"], z: Float[Array, "K L"]) -> Float[Array, " K"]:
        r"""\(\log q_\phi(z_k \mid x)\) for a batch of \(z\)."""
        loc, log_scale = self(x)
        eps = (z - loc) * jnp.exp(-log_scale)
        return -0.5 * jnp.sum(eps**2, axis=-1) - jnp.sum(log_scale) - 0.5 * self.latent_dim * _LOG_2PI


class AbstractDecoder(eqx.Module):
    r"""The likelihood \(p_\theta(x \mid z)\) of a VAE."""

    @abc.abstractmethod
    def log_prob(self, x: Float[Array, " D"], z: Float[Array, "K L"]) -> Float[Array, " K"]:
        r"""\(\log p_\theta(x \mid z_k)\) for one data point and a batch of latents."""

    @abc.abstractmethod
    def mean(self, z: Float[Array, "K L"]) -> Float[Array, "K D"]:
        r"""\(\mathbb{E}_\theta[x \mid z_k]\) (pixel probabilities for a Bernoulli decoder)."""


class BernoulliDecoder(AbstractDecoder):
    r"""\(p_\theta(x \mid z) = \prod_d \mathrm{Bernoulli}(x_d; \mathrm{sigmoid}(f_\theta(z)_d))\)
    for binary data, \(f_\theta\) an MLP giving the logits:
    \(\log p = \sum_d x_d f_d - \operatorname{softplus}(f_d)\)."""

    mlp: eqx.nn.MLP

    @classmethod
    def init(
        cls,
        key: PRNGKeyArray,
        latent_dim: int,
        data_dim: int,
        *,
        width: int = 128,
        depth: int = 2,
        activation: Callable = jax.nn.tanh,
        data_mean: Float[Array, " D"] | None = None,
    ) -> "BernoulliDecoder":
        r"""An MLP decoder; ``data_mean`` (pixel frequencies of the training set) sets the output
        bias to their logits, a common initialisation (Burda et al. 2016)."""
        mlp = eqx.nn.MLP(checks.positive_int("latent_dim", latent_dim),
                         checks.positive_int("data_dim", data_dim),
                         checks.positive_int("width", width),
                         checks.positive_int("depth", depth, minimum=0), activation=activation,
                         key=key)
        if data_mean is not None:
            p = jnp.clip(jnp.asarray(data_mean, jnp.float32), 1e-3, 1 - 1e-3)
            mlp = eqx.tree_at(lambda m: m.layers[-1].bias, mlp, jnp.log(p) - jnp.log1p(-p))
        return cls(mlp)

    def logits(self, z: Float[Array, "K L"]) -> Float[Array, "K D"]:
        """\\(f_\\theta(z_k)\\)."""
        return jax.vmap(self.mlp)(z)

    def log_prob(self, x, z):
        f = self.logits(z)
        return jnp.sum(x * f - jax.nn.softplus(f), axis=-1)

    def mean(self, z):
        return jax.nn.sigmoid(self.logits(z))


class LinearGaussianDecoder(AbstractDecoder):
    r"""Probabilistic PCA: \(p(x \mid z) = \mathcal{N}(x; W z + b, \sigma^2 I)\), with the exact
    marginal \(p(x) = \mathcal{N}(x; b, W W^\top + \sigma^2 I)\) and posterior (module
    docstring)."""

    weight: Float[Array, "D L"]
    bias: Float[Array, " D"]
    log_scale: Float[Array, ""]

    def __check_init__(self):
        w = jnp.shape(self.weight)
        if len(w) != 2 or jnp.shape(self.bias) != w[:1] or jnp.shape(self.log_scale) != ():
            raise ValueError(
                "LinearGaussianDecoder needs weight [D, L], bias [D] and a scalar log_scale; got "
                f"{jnp.shape(self.weight)}, {jnp.shape(self.bias)}, {jnp.shape(self.log_scale)}"
            )

    @property
    def scale(self) -> Float[Array, ""]:
        r"""\(\sigma\)."""
        return jnp.exp(self.log_scale)

    def log_prob(self, x, z):
        d = self.bias.shape[0]
        r = x - self.mean(z)
        return (-0.5 * jnp.sum(r**2, axis=-1) * jnp.exp(-2 * self.log_scale)
                - d * self.log_scale - 0.5 * d * _LOG_2PI)

    def mean(self, z):
        return z @ self.weight.T + self.bias

    def exact_log_marginal(self, x: Float[Array, "n D"]) -> Float[Array, " n"]:
        r"""\(\log \mathcal{N}(x_i; b, W W^\top + \sigma^2 I)\) per row."""
        d = self.bias.shape[0]
        cov = self.weight @ self.weight.T + jnp.exp(2 * self.log_scale) * jnp.eye(d)
        chol = jnp.linalg.cholesky(cov)
        r = jax.scipy.linalg.solve_triangular(chol, (x - self.bias).T, lower=True)
        return (-0.5 * jnp.sum(r**2, axis=0) - jnp.sum(jnp.log(jnp.diag(chol)))
                - 0.5 * d * _LOG_2PI)

    def exact_posterior(self, x: Float[Array, "n D"]) -> tuple[Float[Array, "n L"], Float[Array, "L L"]]:
        r"""\(p(z \mid x_i) = \mathcal{N}(M^{-1} W^\top (x_i - b), \sigma^2 M^{-1})\),
        \(M = W^\top W + \sigma^2 I\): the means [n, L] and the (shared) covariance [L, L]."""
        s2 = jnp.exp(2 * self.log_scale)
        m = self.weight.T @ self.weight + s2 * jnp.eye(self.weight.shape[1])
        mean = jnp.linalg.solve(m, self.weight.T @ (x - self.bias).T).T
        cov = s2 * jnp.linalg.inv(m)
        return mean, 0.5 * (cov + cov.T)


class VAE(eqx.Module):
    r"""An encoder \(q_\phi(z \mid x)\) and a decoder \(p_\theta(x \mid z)\) with the prior
    \(p(z) = \mathcal{N}(0, I)\); its inexact array leaves are \((\theta, \phi)\)."""

    encoder: GaussianEncoder
    decoder: AbstractDecoder

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def log_joint(self, x: Float[Array, " D"], z: Float[Array, "K L"]) -> Float[Array, " K"]:
        r"""\(\log p_\theta(x \mid z_k) + \log \mathcal{N}(z_k; 0, I)\)."""
        return self.decoder.log_prob(x, z) + _standard_normal_log_prob(z)

    def log_weights(self, key: PRNGKeyArray, x: Float[Array, " D"], num_particles: int) -> Float[Array, " K"]:
        r"""\(\log w_k = \log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)\),
        \(z_{1:K} \sim q_\phi(\cdot \mid x)\) (reparameterised)."""
        z, log_q = self.encoder.sample_and_log_prob(key, x, num_particles)
        return self.log_joint(x, z) - log_q

    def sample(self, key: PRNGKeyArray, num_samples: int) -> Float[Array, "n D"]:
        r"""Decoder means \(\mathbb{E}[x \mid z]\) at \(z \sim \mathcal{N}(0, I)\)."""
        z = jax.random.normal(key, (checks.positive_int("num_samples", num_samples), self.latent_dim))
        return self.decoder.mean(z)

    def reconstruct(self, x: Float[Array, "n D"]) -> Float[Array, "n D"]:
        r"""Decoder means at the encoder means \(\mu_\phi(x_i)\)."""
        loc = jax.vmap(lambda xi: self.encoder(xi)[0])(x)
        return self.decoder.mean(loc)


# ------------------------------------------------------------------------------------------------
# the amortised bound as a Feynman-Kac model
# ------------------------------------------------------------------------------------------------


def _prepare(data, binarise):
    data = jnp.asarray(data)
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"data must have shape [n, D] with n >= 1, got {data.shape}")
    if binarise and not bool(jnp.all((data >= 0) & (data <= 1))):
        raise ValueError("binarise=True needs intensities in [0, 1] (they are Bernoulli means)")
    return data


class AmortisedImportance(AbstractFeynmanKac):
    r"""One step: \(M_0\) draws an image \(x\) (uniform index; a Bernoulli binarisation of its
    intensities when ``binarise``) and \(z_{1:K} \sim q_\phi(\cdot \mid x)\) sharing it;
    \(\log G_0 = \log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)\). Then \(\log \hat Z\) of the
    \(K\) particles is the importance estimate of \(\log p_\theta(x)\) of that image."""

    vae: VAE
    data: Float[Array, "n D"]
    binarise: bool = eqx.field(static=True, default=False)
    num_steps: int = eqx.field(static=True, default=1)

    def init(self, key, num_particles):
        k_i, k_b, k_z = jax.random.split(key, 3)
        i = jax.random.randint(k_i, (), 0, self.data.shape[0])
        x = self.data[i]
        if self.binarise:
            x = jax.random.bernoulli(k_b, x).astype(self.data.dtype)
        z, log_q = self.vae.encoder.sample_and_log_prob(k_z, x, num_particles)
        return {"x": jnp.broadcast_to(x, (num_particles,) + x.shape), "z": z, "log_q": log_q}

    def move(self, key, t, particles):
        return particles

    def log_potential(self, t, previous, particles):
        return self.vae.log_joint(particles["x"][0], particles["z"]) - particles["log_q"]


class AmortisedTarget(eqx.Module):
    r"""``target(vae) -> AmortisedImportance(vae, data, binarise)``: the Feynman-Kac target of
    :func:`samplers.variational.objectives.bound` / :func:`~samplers.variational.optimise.fit`
    whose parameters are the VAE."""

    data: Float[Array, "n D"]
    binarise: bool = eqx.field(static=True, default=False)

    def __call__(self, vae: VAE) -> AmortisedImportance:
        return AmortisedImportance(vae, self.data, self.binarise)


def _check_objective(objective):
    checks.instance("objective", objective, AbstractObjective)
    if not isinstance(objective, (ELBO, IWAE, RenyiBound)):
        raise TypeError(
            "an amortised bound needs an importance-weighted objective (ELBO, IWAE or RenyiBound), "
            f"got {type(objective).__name__}"
        )


def amortised_bound(
    key: PRNGKeyArray,
    objective: AbstractObjective,
    vae: VAE,
    x: Float[Array, "n D"],
) -> Float[Array, " n"]:
    r"""One estimate per data point of ``objective`` (``objective.log_z`` of
    ``objective.num_particles`` log-weights \(\log w_k\), \(z_k \sim q_\phi(\cdot \mid x_i)\)),
    averaged over ``objective.num_samples`` independent estimates; differentiable in ``vae``
    (reparameterisation)."""
    checks.prng_key("key", key)
    _check_objective(objective)
    x = _prepare(x, False)
    m, k = objective.num_samples, objective.num_particles
    keys = jax.random.split(key, (x.shape[0], m))

    def one(ks, xi):
        return jnp.mean(jax.vmap(lambda kk: objective.log_z(vae.log_weights(kk, xi, k)))(ks))

    return jax.vmap(one)(keys, x)


def train(
    key: PRNGKeyArray,
    vae: VAE,
    data: Float[Array, "n D"],
    objective: AbstractObjective,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    *,
    batch_size: int = 64,
    binarise: bool = False,
    chunk_size: int = 100,
    progress: bool = True,
) -> VIResult:
    r"""Maximise the data-averaged bound \(\frac1n \sum_i \mathcal{L}(x_i)\) of ``objective``
    (``ELBO()``: a VAE; ``IWAE(K)``: an IWAE) over the encoder and decoder.

    Each step is one ``optimizer`` step on ``batch_size`` images drawn with replacement (their
    estimates are the ``num_samples`` of the objective, which is replaced by ``batch_size``),
    reparameterised gradients: :func:`samplers.variational.optimise.fit` on
    :class:`AmortisedTarget`. It stops at the first non-finite loss or gradient (``RuntimeWarning``,
    ``nan_stopped=True``, the parameters of before that step returned).

    Args:
        key: PRNG key (step \(s\) uses ``fold_in(key, s)``).
        vae: the initial :class:`VAE`.
        data: [n, D] training data (intensities in [0, 1] when ``binarise``).
        objective: ``ELBO()``, ``IWAE(K)`` or ``RenyiBound(alpha, K)``.
        optimizer: any optax ``GradientTransformation`` (e.g. ``optax.adam(1e-3)``).
        num_steps: optimiser steps.
        batch_size: images per step.
        binarise: draw \(x \sim \mathrm{Bernoulli}(\text{data}_i)\) afresh at every use
            (dynamic binarisation).
        chunk_size: steps per compiled ``lax.scan``.
        progress: a progress bar (stderr).

    Returns:
        :class:`~samplers.variational.optimise.VIResult`: ``params`` is the trained VAE and
        ``losses`` the minibatch estimates of minus the bound, per step.
    """
    checks.prng_key("key", key)
    checks.instance("vae", vae, VAE)
    _check_objective(objective)
    b = checks.positive_int("batch_size", batch_size)
    data = _prepare(data, binarise)
    obj = dataclasses.replace(objective, num_samples=b)
    return fit(key, vae, obj, AmortisedTarget(data, bool(binarise)), optimizer, num_steps,
               chunk_size=chunk_size, progress=progress)


# ------------------------------------------------------------------------------------------------
# held-out log-likelihood
# ------------------------------------------------------------------------------------------------


class HeldOutLogLikelihood(NamedTuple):
    r"""Output of :func:`heldout_log_likelihood`.

    Attributes:
        log_likelihood: [n] \(\log \hat Z_K(x_i)\), the estimates of \(\log p_\theta(x_i)\).
        ess: [n] effective sample size of each image's \(K\) weights.
        mean: the held-out log-likelihood, \(\frac1n \sum_i \log \hat Z_K(x_i)\) (nats per data point).
        sem: standard error of ``mean`` over the test images (their spread).
        mc_error: its Monte Carlo standard error given the images, \(\sqrt{\sum_i \hat v_i / K} / n\),
            \(\hat v_i = K / \mathrm{ESS}_i - 1\) (delta method, module docstring).
        bias: the delta-method bias of ``mean``, \(-\frac1n \sum_i \hat v_i / (2K)\).
        num_particles: K.
    """

    log_likelihood: Float[Array, " n"]
    ess: Float[Array, " n"]
    mean: float
    sem: float
    mc_error: float
    bias: float
    num_particles: int


@eqx.filter_jit
def _heldout_log_weights(key, vae, x, num_particles, chunk_size, batch_size):
    chunks = num_particles // chunk_size

    def one(inp):
        k, xi = inp
        ks = jax.random.split(k, chunks)
        lw = jax.lax.map(lambda kk: vae.log_weights(kk, xi, chunk_size), ks)
        return lw.reshape(-1)

    keys = jax.random.split(key, x.shape[0])
    return jax.lax.map(one, (keys, x), batch_size=batch_size)


def heldout_log_weights(
    key: PRNGKeyArray,
    vae: VAE,
    x: Float[Array, "n D"],
    num_particles: int = 1000,
    *,
    chunk_size: int | None = None,
    batch_size: int = 8,
) -> Float[Array, "n K"]:
    r"""\(\log w_{ik}\), \(K\) importance log-weights per data point (compiled; the particles in
    chunks of ``chunk_size``, ``batch_size`` data points at a time, to bound the memory)."""
    checks.prng_key("key", key)
    checks.instance("vae", vae, VAE)
    x = _prepare(x, False)
    k = checks.positive_int("num_particles", num_particles)
    c = min(k, 500) if chunk_size is None else checks.positive_int("chunk_size", chunk_size)
    if k % c:
        raise ValueError(f"num_particles={k} must be a multiple of chunk_size={c}")
    return _heldout_log_weights(key, vae, x, k, c, checks.positive_int("batch_size", batch_size))


def heldout_log_likelihood(
    key: PRNGKeyArray,
    vae: VAE,
    x: Float[Array, "n D"],
    num_particles: int = 1000,
    *,
    chunk_size: int | None = None,
    batch_size: int = 8,
) -> HeldOutLogLikelihood:
    r"""The importance-sampling estimate \(\log \hat Z_K(x_i) = \log \frac1K \sum_k w_{ik}\) of
    \(\log p_\theta(x_i)\) for held-out data, with the encoder as proposal (Burda et al. 2016;
    \(K = 5000\) there), and its mean, spread and Monte Carlo error (module docstring).
    Arguments as :func:`heldout_log_weights`."""
    lw = heldout_log_weights(key, vae, x, num_particles, chunk_size=chunk_size,
                             batch_size=batch_size)
    k = lw.shape[1]
    log_z = jax.nn.logsumexp(lw, axis=1) - math.log(k)
    norm = jnp.exp(lw - jax.nn.logsumexp(lw, axis=1, keepdims=True))
    ess = 1.0 / jnp.sum(norm**2, axis=1)
    lz, v = np.asarray(log_z, np.float64), np.asarray(k / ess - 1.0, np.float64)
    n = lz.size
    sem = float(lz.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return HeldOutLogLikelihood(log_z, ess, float(lz.mean()), sem,
                                float(math.sqrt(v.sum() / k) / n), float(-v.mean() / (2 * k)), k)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def load_digits_split(
    key: PRNGKeyArray, test_fraction: float = 0.2
) -> tuple[Float[Array, "n_train 64"], Float[Array, "n_test 64"]]:
    r"""scikit-learn's ``load_digits`` (1797 images of 8 x 8 pixels, grey levels 0..16, bundled:
    no download) split at random: the training intensities in [0, 1] (to binarise dynamically in
    :func:`train`) and a held-out set binarised once, \(x \sim \mathrm{Bernoulli}(\text{intensity})\)
    (the stochastic binarisation of Salakhutdinov & Murray 2008)."""
    from sklearn.datasets import load_digits

    checks.prng_key("key", key)
    f = float(test_fraction)
    if not 0.0 < f < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x = jnp.asarray(load_digits().data / 16.0, jnp.float32)
    k_perm, k_bin = jax.random.split(key)
    x = x[jax.random.permutation(k_perm, x.shape[0])]
    n_test = max(1, int(round(f * x.shape[0])))
    test = jax.random.bernoulli(k_bin, x[:n_test]).astype(jnp.float32)
    return x[n_test:], test
