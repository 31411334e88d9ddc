"""Named parameters θ with a prior of numpyro distributions, and their unconstrained space.

A prior is a dict ``{name: numpyro Distribution}``. Each site is mapped to an unconstrained vector
by numpyro's ``biject_to(d.support)``: θ = T(u). Random-walk and gradient MCMC then work on the flat
vector u ∈ R^d with the density

    log p_U(u) = log p(T(u)) + log |det ∂T/∂u|   (change of variables; the Jacobian term).

Used by PMMH (:mod:`samplers.pmmh`) and by the θ-steps of particle Gibbs
(:mod:`samplers.particle_gibbs`).
"""

from __future__ import annotations

import math

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree
from numpyro.distributions.transforms import biject_to

from ppl import checks

__all__ = ["ParameterSpace", "place_params", "check_placeable", "make_params_fn"]


class ParameterSpace(eqx.Module):
    """The prior's sites and the bijection between named θ and a flat unconstrained vector u.

    Args:
        prior: ``{name: numpyro Distribution}``; every site is one (possibly vector) parameter.
    """

    prior: dict

    def __init__(self, prior: Mapping[str, dist.Distribution]):
        if not isinstance(prior, Mapping) or not prior:
            raise TypeError("prior must be a non-empty dict {name: numpyro Distribution}")
        for name, d in prior.items():
            if not isinstance(name, str):
                raise TypeError(f"prior keys must be parameter names (str), got {name!r}")
            if not isinstance(d, dist.Distribution):
                raise TypeError(
                    f"prior[{name!r}] must be a numpyro Distribution, got {type(d).__name__}"
                )
        self.prior = dict(prior)

    def _unravel(self, u):
        unc = {
            k: jnp.zeros(biject_to(d.support).inverse_shape(d.batch_shape + d.event_shape))
            for k, d in self.prior.items()
        }
        return ravel_pytree(unc)[1](u)

    @property
    def dim(self) -> int:
        """Dimension d of the unconstrained space."""
        return sum(
            math.prod(biject_to(d.support).inverse_shape(d.batch_shape + d.event_shape))
            for d in self.prior.values()
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.prior)

    def shape(self, name: str) -> tuple[int, ...]:
        d = self.prior[name]
        return tuple(d.batch_shape + d.event_shape)

    def constrain(self, u: Float[Array, " d"]) -> dict:
        """θ = T(u) as a dict of constrained values."""
        tree = self._unravel(u)
        return {k: biject_to(d.support)(tree[k]) for k, d in self.prior.items()}

    def unconstrain(self, theta: Mapping[str, Any]) -> Float[Array, " d"]:
        """u = T^{-1}(θ) flattened."""
        missing = set(self.prior) - set(theta)
        if missing:
            raise ValueError(f"parameter values missing for {sorted(missing)}")
        tree = {
            k: biject_to(d.support).inv(jnp.asarray(theta[k], jnp.result_type(float)))
            for k, d in self.prior.items()
        }
        return ravel_pytree(tree)[0]

    def log_prior(self, theta: Mapping[str, Any]) -> Float[Array, ""]:
        """log p(θ) (−inf outside the support)."""
        total = jnp.asarray(0.0)
        for k, d in self.prior.items():
            x = jnp.asarray(theta[k])
            lp = jnp.where(d.support(x), d.log_prob(x), -jnp.inf)
            total = total + jnp.sum(lp)
        return total

    def log_density_unconstrained(self, u: Float[Array, " d"]) -> tuple[Array, dict]:
        """log p(T(u)) + log|det J_T(u)| and θ = T(u)."""
        tree = self._unravel(u)
        theta, total = {}, jnp.asarray(0.0)
        for k, d in self.prior.items():
            t = biject_to(d.support)
            x = t(tree[k])
            theta[k] = x
            total = total + jnp.sum(d.log_prob(x)) + jnp.sum(t.log_abs_det_jacobian(tree[k], x))
        return total, theta

    def sample(self, key: PRNGKeyArray, shape: tuple[int, ...] = ()) -> dict:
        """θ ~ prior (with leading ``shape``)."""
        keys = jax.random.split(key, len(self.prior))
        return {k: d.sample(kk, shape) for kk, (k, d) in zip(keys, self.prior.items())}

    def broadcast_init(self, theta: Mapping[str, Any] | None, key, num_chains: int) -> dict:
        """Initial values for ``num_chains`` chains: prior draws when ``theta`` is ``None``; a leaf
        of the site's shape is shared by all chains, a leaf with a leading ``num_chains`` axis is
        used per chain."""
        if theta is None:
            return self.sample(key, (num_chains,))
        if not isinstance(theta, Mapping):
            raise TypeError("init_params must be a dict {name: value} (or None: prior draws)")
        extra = set(theta) - set(self.prior)
        if extra:
            raise ValueError(f"init_params has names without a prior: {sorted(extra)}")
        out = {}
        for k in self.prior:
            if k not in theta:
                raise ValueError(f"init_params lacks {k!r}")
            x = jnp.asarray(theta[k], jnp.result_type(float))
            shp = self.shape(k)
            if x.shape == shp:
                x = jnp.broadcast_to(x, (num_chains,) + shp)
            elif x.shape != (num_chains,) + shp:
                raise ValueError(
                    f"init_params[{k!r}] must have shape {shp} or {(num_chains,) + shp}, "
                    f"got {x.shape}"
                )
            ok = self.prior[k].support(x)
            if not bool(jnp.all(ok)):
                raise ValueError(f"init_params[{k!r}] lies outside the prior's support")
            out[k] = x
        return out


def check_placeable(base: PyTree, names: tuple[str, ...]) -> None:
    """Raise a clear error when θ's names cannot replace fields of the model params ``base``."""
    if base is None:
        return
    if isinstance(base, tuple) and hasattr(base, "_fields"):
        fields = base._fields
    elif isinstance(base, Mapping):
        fields = tuple(base)
    else:
        raise TypeError(
            f"cannot place θ into model params of type {type(base).__name__}: pass "
            "params_fn(theta) -> model params"
        )
    unknown = set(names) - set(fields)
    if unknown:
        raise ValueError(
            f"prior names {sorted(unknown)} are not fields of the model's params {tuple(fields)}; "
            "pass params_fn(theta) -> model params"
        )


def place_params(base: PyTree, theta: Mapping[str, Any]) -> PyTree:
    """Model params with the named fields of ``base`` (NamedTuple or dict) replaced by θ; the
    other fields stay fixed. ``base=None`` gives θ itself (a dict)."""
    if base is None:
        return dict(theta)
    if isinstance(base, tuple) and hasattr(base, "_fields"):
        return base._replace(**{k: _cast(theta[k], getattr(base, k)) for k in theta})
    return {**base, **{k: _cast(theta[k], base[k]) for k in theta}}


def make_params_fn(base: PyTree, names: tuple[str, ...], params_fn: Callable | None):
    """``params_fn`` if given, else θ ↦ :func:`place_params` (base, θ) (checked now)."""
    if params_fn is not None:
        checks.function("params_fn", params_fn, "params_fn(theta) -> model params")
        return params_fn
    check_placeable(base, names)
    return None


def _cast(value, like):
    like = jnp.asarray(like)
    value = jnp.asarray(value, like.dtype)
    return jnp.reshape(value, like.shape) if value.size == like.size else value
