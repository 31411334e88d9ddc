r"""A numpyro model as a tempering target: log prior, log likelihood and prior draws in \(\mathbb{R}^D\).

For a numpyro model with latent sites θ (continuous) and observed sites y (``obs=``), tempered
samplers need, in the unconstrained space \(z = T^{-1}(\theta) \in \mathbb{R}^D\)
(\(T\) = ``biject_to(support)``):

\[
\begin{aligned}
\log \pi_0(z) &= \log p(T(z)) + \log \left|\det \partial T(z)/\partial z\right|, \\
\log L(z) &= \sum_{\text{observed sites}} \log p(y \mid T(z))
\end{aligned}
\]

(``log_prior``: the prior with its log-Jacobian; ``log_likelihood``), so that the tempered targets are
\(\pi_\lambda(z) \propto \pi_0(z)\, L(z)^\lambda\), \(\lambda \in [0, 1]\), and \(\pi_1\) is the posterior in
unconstrained coordinates. Latent values are flattened to one vector \(z\) of dimension \(D\)
(``jax.flatten_util.ravel_pytree`` order); ``unravel``/``constrain`` map back.

Everything model-specific is numpyro's (``numpyro.infer.util``): ``unconstrain_fn`` gives the
unconstrained layout (found by abstract evaluation, so building a model compiles nothing); the
substitute-and-unconstrain handler of ``potential_energy`` adds the log-Jacobian factors, so
\(\log \pi_0 + \log L = -\)``potential_energy``; ``compute_log_probs`` scores every site (honouring
``scale``/``mask`` handlers); ``unconstrain_fn``/``constrain_fn`` transform.

Reference: Del Moral, Doucet & Jasra (2006), "Sequential Monte Carlo samplers", JRSS B.
"""

from __future__ import annotations

import math
from functools import partial
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import (
    _unconstrain_reparam,  # the handler potential_energy uses (adds the log-Jacobian factors)
    compute_log_probs,
    constrain_fn,
    unconstrain_fn,
)

from ppl.functions import static_function
from ppl import checks

__all__ = ["NumpyroModel", "from_numpyro"]


class NumpyroModel(eqx.Module):
    r"""A numpyro model seen as prior \(\pi_0\) and likelihood \(L\) on the flat unconstrained space
    \(\mathbb{R}^D\).

    Build it with :func:`from_numpyro`. Data passed as model arguments are array leaves (traced
    under ``jit``, not baked in); the model callable and the site layout are static.
    """

    model: Callable = eqx.field(static=True, converter=static_function)
    model_args: tuple
    model_kwargs: dict
    latent_sites: tuple[str, ...] = eqx.field(static=True)
    likelihood_sites: tuple[str, ...] = eqx.field(static=True)
    # (name, unconstrained shape, dtype name) per latent site, in ravel order
    layout: tuple[tuple[str, tuple[int, ...], str], ...] = eqx.field(static=True)

    @property
    def dim(self) -> int:
        """D, the dimension of the flat unconstrained parameter."""
        return sum(math.prod(shape) for _, shape, _ in self.layout)

    # ---- flat <-> pytree --------------------------------------------------------------------
    def _prototype(self) -> dict:
        return {name: jnp.zeros(shape, dtype) for name, shape, dtype in self.layout}

    def ravel(self, params: dict) -> Float[Array, " D"]:
        r"""Flatten a dict of unconstrained latent values into \(z \in \mathbb{R}^D\)."""
        return ravel_pytree({name: params[name] for name, _, _ in self.layout})[0]

    def unravel(self, z: Float[Array, " D"]) -> dict:
        r"""The dict of unconstrained latent values of a flat \(z \in \mathbb{R}^D\)."""
        return ravel_pytree(self._prototype())[1](z)

    # ---- densities --------------------------------------------------------------------------
    def log_densities(self, z: Float[Array, " D"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
        r"""\((\log \pi_0(z), \log L(z))\) from one trace of the model (see the module docstring)."""
        params = self.unravel(z)
        model = substitute(self.model, substitute_fn=partial(_unconstrain_reparam, params))
        log_probs, _ = compute_log_probs(model, self.model_args, self.model_kwargs, {})
        log_lik = sum((log_probs[name] for name in self.likelihood_sites), start=jnp.zeros(()))
        log_joint = sum(log_probs.values(), start=jnp.zeros(()))
        return log_joint - log_lik, log_lik

    def pointwise_log_likelihood(self, z: Float[Array, " D"]) -> Float[Array, " n"]:
        r"""\(\ell_j(z) = \log p(y_j \mid \theta = T(z))\) per observation \(j\): each likelihood site's
        elementwise log-probability, summed over its trailing axes, the sites' contributions
        added. Every likelihood site's log-probability must have the same leading (data) axis
        ``n``; \(\sum_j \ell_j = \log L(z)\)."""
        params = self.unravel(z)
        model = substitute(self.model, substitute_fn=partial(_unconstrain_reparam, params))
        tr = trace(model).get_trace(*self.model_args, **self.model_kwargs)
        total = None
        for name in self.likelihood_sites:
            site = tr[name]
            lp = site["fn"].log_prob(site["value"])
            if "scale" in site and site["scale"] is not None:
                lp = site["scale"] * lp
            if jnp.ndim(lp) == 0:
                raise ValueError(f"likelihood site {name!r} has no data axis (a scalar log-probability)")
            lp = lp.reshape(lp.shape[0], -1).sum(axis=1)
            if total is not None and total.shape != lp.shape:
                raise ValueError(
                    f"likelihood sites disagree on the data axis: {total.shape[0]} and {lp.shape[0]}"
                )
            total = lp if total is None else total + lp
        return total

    def log_prior(self, z: Float[Array, " D"]) -> Float[Array, ""]:
        r"""\(\log \pi_0(z)\): log prior of \(T(z)\) plus the log-Jacobian of \(T\)."""
        return self.log_densities(z)[0]

    def log_likelihood(self, z: Float[Array, " D"]) -> Float[Array, ""]:
        r"""\(\log L(z)\): sum of the observed sites' log-probabilities at \(\theta = T(z)\)."""
        return self.log_densities(z)[1]

    def log_joint(self, z: Float[Array, " D"]) -> Float[Array, ""]:
        r"""\(\log \pi_0(z) + \log L(z)\) (\(= -\)numpyro ``potential_energy``)."""
        lp, ll = self.log_densities(z)
        return lp + ll

    # ---- prior draws and constraining --------------------------------------------------------
    def sample_prior(self, key: PRNGKeyArray, num_samples: int) -> Float[Array, "n D"]:
        r"""``num_samples`` i.i.d. draws of \(z \sim \pi_0\) (prior draws of θ mapped by \(T^{-1}\))."""
        checks.positive_int("num_samples", num_samples)

        def one(k):
            tr = trace(seed(self.model, k)).get_trace(*self.model_args, **self.model_kwargs)
            theta = {name: tr[name]["value"] for name in self.latent_sites}
            u = unconstrain_fn(self.model, self.model_args, self.model_kwargs, theta)
            return self.ravel(u)

        return jax.vmap(one)(jax.random.split(key, num_samples))

    def constrain(self, z: Float[Array, "... D"], *, deterministic: bool = True) -> dict:
        r"""Constrained latent values \(\theta = T(z)\) (and ``deterministic`` sites) for \(z\) of shape
        [..., D]; every leaf keeps the leading batch axes of ``z``."""
        z = jnp.asarray(z)
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"z must have shape [..., {self.dim}], got {z.shape}")
        batch_ndims = z.ndim - 1
        flat = z.reshape((-1, self.dim))
        params = jax.vmap(self.unravel)(flat)
        out = constrain_fn(
            self.model,
            self.model_args,
            self.model_kwargs,
            params,
            return_deterministic=deterministic,
            batch_ndims=1,
        )
        batch = z.shape[:batch_ndims]
        return jax.tree.map(lambda x: x.reshape(batch + x.shape[1:]), out)


def _check_no_nan(model_args, model_kwargs) -> None:
    """NaN in data passed to the model (observations, covariates) is an error here: inside the
    sampler it would make the likelihood NaN, which the engine treats as a killed particle."""
    named = [(f"model_args[{i}]", a) for i, a in enumerate(model_args)]
    named += [(f"model_kwargs[{k!r}]", v) for k, v in model_kwargs.items()]
    for name, value in named:
        for path, leaf in jax.tree_util.tree_leaves_with_path(value):
            if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "dtype"):
                continue
            if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                continue
            nan = np.isnan(np.asarray(leaf))
            if nan.any():
                raise ValueError(
                    f"{name}{jax.tree_util.keystr(path)} contains {int(nan.sum())} NaN value(s) "
                    f"(the first at index {tuple(int(i) for i in np.argwhere(nan)[0])}): remove or "
                    "impute them, or model the missing values explicitly"
                )


def from_numpyro(
    model: Callable,
    *model_args: Any,
    likelihood_sites: tuple[str, ...] | None = None,
    **model_kwargs: Any,
) -> NumpyroModel:
    r"""Build the tempering view of a numpyro model called as ``model(*model_args, **model_kwargs)``.

    Args:
        model: a numpyro model (Python callable); observed sites carry ``obs=``.
        *model_args, **model_kwargs: its arguments (data arrays become traced leaves).
        likelihood_sites: names of the observed sites forming \(L\) (default: every observed sample
            site, ``numpyro.factor`` sites included); the other sites form the prior.

    Raises:
        TypeError: ``model`` is not callable.
        ValueError: the model has no latent or no observed sites, has discrete latent sites, or
            ``likelihood_sites`` names something that is not an observed site.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable numpyro model, got {type(model).__name__}")
    model_args = tuple(jax.tree.map(_as_jax, a) for a in model_args)
    model_kwargs = {k: jax.tree.map(_as_jax, v) for k, v in model_kwargs.items()}
    _check_no_nan(model_args, model_kwargs)

    # Structure discovery by abstract evaluation (no compilation): site kinds from one seeded
    # trace, the unconstrained layout from numpyro's unconstrain_fn. The key does not matter.
    sites: dict[str, tuple[bool, bool]] = {}

    def probe(key):
        tr = trace(seed(model, key)).get_trace(*model_args, **model_kwargs)
        for n, s in tr.items():
            if s["type"] == "sample":
                sites[n] = (bool(s["is_observed"]), bool(s["fn"].support.is_discrete))
        theta = {n: s["value"] for n, s in tr.items() if n in sites and not sites[n][0]}
        if any(sites[n][1] for n in theta):
            return {}
        return unconstrain_fn(model, model_args, model_kwargs, theta)

    shapes = jax.eval_shape(probe, jax.random.PRNGKey(0))
    latent = tuple(n for n, (obs, _) in sites.items() if not obs)
    observed = tuple(n for n, (obs, _) in sites.items() if obs)
    name = getattr(model, "__name__", type(model).__name__)
    if not latent:
        raise ValueError(
            f"numpyro model {name!r} has no latent sample sites (every sample site has obs=): "
            "there is nothing to infer"
        )
    discrete = [n for n in latent if sites[n][1]]
    if discrete:
        raise ValueError(
            f"numpyro model {name!r} has discrete latent sites {discrete}; tempered SMC with "
            "gradient/random-walk moves needs continuous latents (marginalise them out)"
        )
    if likelihood_sites is None:
        likelihood_sites = observed
    else:
        likelihood_sites = tuple(likelihood_sites)
        bad = [n for n in likelihood_sites if n not in observed]
        if bad:
            raise ValueError(
                f"likelihood_sites {bad} are not observed sample sites of {name!r} "
                f"(observed sites: {list(observed)})"
            )
    if not likelihood_sites:
        raise ValueError(
            f"numpyro model {name!r} has no observed sites (pass data through `obs=`): the "
            "likelihood, and so the tempering path, would be empty"
        )
    layout = tuple((n, tuple(shapes[n].shape), shapes[n].dtype.name) for n in latent)
    return NumpyroModel(
        model=model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        latent_sites=latent,
        likelihood_sites=likelihood_sites,
        layout=layout,
    )


def _as_jax(x):
    """numpy arrays become jax arrays (so that they are traced leaves); the rest is untouched."""
    if hasattr(x, "__array__") and not isinstance(x, jax.Array):
        return jnp.asarray(x)
    return x
