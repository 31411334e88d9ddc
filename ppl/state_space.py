r"""State-space models from numpyro distributions, as Feynman-Kac models.

A state-space model is \(x_0 \sim p_\theta(x_0)\), \(x_t \mid x_{t-1} \sim p_\theta(x_t \mid x_{t-1})\),
\(y_t \mid x_t \sim p_\theta(y_t \mid x_t)\). Two Feynman-Kac views of it share the evidence
\(Z = p_\theta(y_{0:T-1})\):

- **bootstrap** (Gordon, Salmond & Smith 1993): \(M_t\) = transition, \(G_t = p(y_t \mid x_t)\);
- **guided**: \(M_t\) = a user proposal \(q_t(x_t \mid x_{t-1}, y_t)\),
  \(G_t = p(y_t \mid x_t)\, p(x_t \mid x_{t-1}) / q_t(x_t \mid x_{t-1}, y_t)\).

The user writes single-particle functions returning numpyro distributions; they are lifted over
the particle axis by ``vmap``. Parameters θ are a pytree of arrays passed to every function, so that
\(\log \hat Z\) can be differentiated with respect to θ and PMMH can swap them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ppl.functions import static_function
from ppl import checks, tree
from ppl.feynman_kac import AbstractFeynmanKac

__all__ = ["StateSpaceModel", "BootstrapFilter", "OnlineBootstrapFilter", "GuidedFilter"]


class StateSpaceModel(eqx.Module):
    r"""A state-space model given by numpyro distributions.

    Args:
        initial: ``initial(params) -> Distribution`` for \(x_0\).
        transition: ``transition(params, t, x_prev) -> Distribution`` for \(x_t\).
        observation: ``observation(params, t, x) -> Distribution`` for \(y_t\).
        params: pytree of arrays θ (may be ``None``).
        vectorized: ``transition`` and ``observation`` (and a guided proposal) also accept a batch
            of particles (leading axis N) in ``x`` and then return distributions of batch shape
            (N,) — true of elementwise formulas such as ``Normal(mu + rho * (x - mu), sigma)``.
            The filters then draw all particles with one key and evaluate one batched
            ``log_prob`` instead of ``vmap``-ing per-particle draws (several times faster on CPU;
            the draws follow the same law but are not the same numbers). Default ``False``.

    ``t`` is a traced int32 scalar; index per-time covariates with it.
    """

    initial: Callable = eqx.field(static=True, converter=static_function)
    transition: Callable = eqx.field(static=True, converter=static_function)
    observation: Callable = eqx.field(static=True, converter=static_function)
    params: Any = None
    vectorized: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        for name in ("initial", "transition", "observation"):
            if not callable(getattr(self, name)):
                raise TypeError(f"StateSpaceModel.{name} must be callable")

    def with_params(self, params: PyTree) -> "StateSpaceModel":
        """The same model with other parameters θ."""
        return eqx.tree_at(lambda m: m.params, self, params, is_leaf=lambda x: x is None)

    def bootstrap(self, observations: PyTree) -> "BootstrapFilter":
        """Bootstrap Feynman-Kac model for observations with leading time axis T."""
        observations = _as_observations(observations)
        horizon = _horizon(observations)
        _check_observation_shapes(self, observations)
        return BootstrapFilter(self, observations, horizon)

    def bootstrap_online(self, observation: PyTree) -> "OnlineBootstrapFilter":
        r"""The bootstrap filter's model for the one observation \(y_t\) that just arrived (leaves
        without a time axis), for online filtering with :mod:`samplers.smc_kernel`: carry the
        kernel's state between calls and build this model with each new \(y_t\). Every such model
        has the same structure, so a jitted ``step`` compiles once."""
        return OnlineBootstrapFilter(self, observation)

    def guided(self, observations: PyTree, proposal: Callable) -> "GuidedFilter":
        r"""Guided Feynman-Kac model with ``proposal(params, t, x_prev_or_None, y_t) -> Distribution``
        (``x_prev`` is ``None`` at \(t = 0\), where the proposal replaces the initial law)."""
        if not callable(proposal):
            raise TypeError("proposal must be callable: proposal(params, t, x_prev, y_t)")
        observations = _as_observations(observations)
        horizon = _horizon(observations)
        _check_observation_shapes(self, observations)
        return GuidedFilter(self, observations, horizon, proposal)

    def simulate(self, key, num_steps: int) -> tuple[PyTree, PyTree]:
        r"""Draw \((x_{0:T-1}, y_{0:T-1})\) from the model."""
        checks.positive_int("num_steps", num_steps)
        k0, ky0, key = jax.random.split(key, 3)
        x0 = self.initial(self.params).sample(k0)
        y0 = self.observation(self.params, jnp.asarray(0), x0).sample(ky0)

        def body(x, inp):
            t, k = inp
            kx, ky = jax.random.split(k)
            x = self.transition(self.params, t, x).sample(kx)
            y = self.observation(self.params, t, x).sample(ky)
            return x, (x, y)

        keys = jax.random.split(key, num_steps - 1)
        _, (xs, ys) = jax.lax.scan(body, x0, (jnp.arange(1, num_steps), keys))
        return tree.prepend(x0, xs), tree.prepend(y0, ys)


def _as_observations(observations) -> PyTree:
    r"""A plain list of numbers (or of equal-shape rows) becomes one array with the time axis
    first; concrete float leaves with NaN or \(\pm\infty\) are an error (a NaN \(y_t\) would make every
    particle's potential NaN: the engine would kill them all, or weight them silently wrong)."""
    if isinstance(observations, list) and observations and all(
        isinstance(v, (int, float, np.number, np.ndarray, list)) for v in observations
    ):
        observations = np.asarray(observations)
    for path, leaf in jax.tree_util.tree_leaves_with_path(observations):
        if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        bad = ~np.isfinite(np.asarray(leaf))
        if bad.any():
            where = np.argwhere(bad)[0]
            raise ValueError(
                f"observations{jax.tree_util.keystr(path)} contain {int(bad.sum())} non-finite "
                f"value(s) (NaN or inf; the first at index {tuple(int(i) for i in where)}, time "
                f"step {int(where[0]) if where.size else 0}): remove or impute them (a missing "
                "y_t needs an observation law that allows it)"
            )
    return observations


def _horizon(observations) -> int:
    leaves = jax.tree.leaves(observations)
    if not leaves:
        raise ValueError("observations must contain at least one array with a leading time axis")
    lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in lengths:
        raise ValueError("observations need a leading time axis; got a scalar")
    if len(lengths) != 1:
        raise ValueError(f"observation leaves disagree on the number of time steps: {lengths}")
    (t,) = lengths
    if t < 1:
        raise ValueError("observations are empty (T = 0)")
    return int(t)


def _check_observation_shapes(ssm: StateSpaceModel, observations) -> None:
    r"""Each \(y_t\) must have the shape of a draw of the observation law (checked abstractly, no
    compute): a mismatch would otherwise broadcast inside ``log_prob`` and be summed silently."""

    def draw():
        x0 = ssm.initial(ssm.params).sample(jax.random.key(0))
        return ssm.observation(ssm.params, jnp.asarray(0, jnp.int32), x0).sample(jax.random.key(1))

    expected = jax.eval_shape(draw)
    exp_leaves, exp_tree = jax.tree.flatten(expected)
    got_leaves, got_tree = jax.tree.flatten(observations)
    exp_shapes = [tuple(x.shape) for x in exp_leaves]
    got_shapes = [tuple(jnp.shape(y)[1:]) for y in got_leaves]
    if exp_tree != got_tree or exp_shapes != got_shapes:
        raise ValueError(
            "observations do not match the observation distribution: each y_t should have "
            f"shape {jax.tree.unflatten(exp_tree, exp_shapes)}, got "
            f"{jax.tree.unflatten(got_tree, got_shapes)} (observations have the time axis first)"
        )


def _y(observations, t):
    return tree.index_time(observations, t)


class BootstrapFilter(AbstractFeynmanKac):
    """Bootstrap filter: move with the transition, weight with the observation density."""

    ssm: StateSpaceModel
    observations: PyTree
    num_steps: int = eqx.field(static=True)

    def init(self, key, num_particles):
        d = self.ssm.initial(self.ssm.params)
        return d.sample(key, (num_particles,))

    def move(self, key, t, particles):
        if self.ssm.vectorized:
            d = self.ssm.transition(self.ssm.params, t, particles)
            return _sample_batched(d, key, particles)
        keys = jax.random.split(key, tree.num_particles(particles))
        return jax.vmap(lambda k, x: self.ssm.transition(self.ssm.params, t, x).sample(k))(
            keys, particles
        )

    def log_potential(self, t, previous, particles) -> Float[Array, " N"]:
        y = _y(self.observations, t)
        if self.ssm.vectorized:
            return _logp_batched(self.ssm.observation(self.ssm.params, t, particles), y, particles)
        return jax.vmap(lambda x: _logp(self.ssm.observation(self.ssm.params, t, x), y))(particles)

    def log_transition(self, t, previous, particles):
        if self.ssm.vectorized:
            d = self.ssm.transition(self.ssm.params, t, previous)
            return _logp_batched(d, particles, particles)
        return jax.vmap(lambda xp, x: _logp(self.ssm.transition(self.ssm.params, t, xp), x))(
            previous, particles
        )


class OnlineBootstrapFilter(BootstrapFilter):
    r"""Bootstrap filter whose ``observations`` is the current \(y_t\) alone (no time axis): each
    kernel step is given the model of the observation that just arrived
    (:meth:`StateSpaceModel.bootstrap_online`). The step index \(t\) still reaches the transition."""

    num_steps: None = eqx.field(static=True, default=None)

    def __init__(self, ssm: StateSpaceModel, observation: PyTree):
        self.ssm = ssm
        self.observations = observation
        self.num_steps = None

    def log_potential(self, t, previous, particles) -> Float[Array, " N"]:
        y = self.observations
        if self.ssm.vectorized:
            return _logp_batched(self.ssm.observation(self.ssm.params, t, particles), y, particles)
        return jax.vmap(lambda x: _logp(self.ssm.observation(self.ssm.params, t, x), y))(particles)


class GuidedFilter(BootstrapFilter):
    r"""Guided filter with proposal \(q_t\);
    \(G_t = p(y_t \mid x_t)\, p(x_t \mid x_{t-1}) / q_t(x_t \mid x_{t-1}, y_t)\)."""

    proposal: Callable = eqx.field(static=True, converter=static_function)

    def init(self, key, num_particles):
        y0 = _y(self.observations, 0)
        d = self.proposal(self.ssm.params, jnp.asarray(0), None, y0)
        return d.sample(key, (num_particles,))

    def move(self, key, t, particles):
        y = _y(self.observations, t)
        if self.ssm.vectorized:
            d = self.proposal(self.ssm.params, t, particles, y)
            return _sample_batched(d, key, particles)
        keys = jax.random.split(key, tree.num_particles(particles))
        return jax.vmap(lambda k, x: self.proposal(self.ssm.params, t, x, y).sample(k))(
            keys, particles
        )

    def log_potential(self, t, previous, particles):
        y = _y(self.observations, t)
        p = self.ssm.params
        if self.ssm.vectorized:
            obs = _logp_batched(self.ssm.observation(p, t, particles), y, particles)
            if previous is None:
                prior = _logp_batched(self.ssm.initial(p), particles, particles)
                prop = _logp_batched(self.proposal(p, t, None, y), particles, particles)
            else:
                prior = _logp_batched(self.ssm.transition(p, t, previous), particles, particles)
                prop = _logp_batched(self.proposal(p, t, previous, y), particles, particles)
            return obs + prior - prop
        obs = jax.vmap(lambda x: _logp(self.ssm.observation(p, t, x), y))(particles)
        if previous is None:
            prior = jax.vmap(lambda x: _logp(self.ssm.initial(p), x))(particles)
            prop = jax.vmap(lambda x: _logp(self.proposal(p, t, None, y), x))(particles)
        else:
            prior = jax.vmap(lambda xp, x: _logp(self.ssm.transition(p, t, xp), x))(
                previous, particles
            )
            prop = jax.vmap(lambda xp, x: _logp(self.proposal(p, t, xp, y), x))(previous, particles)
        return obs + prior - prop


def _logp(dist, value) -> Float[Array, ""]:
    """log density summed over event and any leftover batch dimensions (one scalar per particle)."""
    lp = dist.log_prob(value)
    return jnp.sum(lp)


def _not_vectorized(what: str, got, want) -> ValueError:
    return ValueError(
        f"vectorized=True but {what} has shape {got} for a batch of particles, expected {want}: "
        "the model functions must broadcast over a leading particle axis of x (or use "
        "vectorized=False, the per-particle vmap)"
    )


def _sample_batched(dist, key, particles):
    """One draw for all particles from a distribution whose batch shape is (N,)."""
    x = dist.sample(key)
    want = jax.tree.map(jnp.shape, particles)
    if jax.tree.map(jnp.shape, x) != want:
        raise _not_vectorized("a draw", jax.tree.map(jnp.shape, x), want)
    return x


def _logp_batched(dist, value, particles) -> Float[Array, " N"]:
    """Batched :func:`_logp`: one log density per particle, summed over any trailing axes."""
    n = tree.num_particles(particles)
    lp = dist.log_prob(value)
    if jnp.ndim(lp) < 1 or jnp.shape(lp)[0] != n:
        raise _not_vectorized("log_prob", jnp.shape(lp), f"({n}, ...)")
    return jnp.sum(jnp.reshape(lp, (n, -1)), axis=1)
