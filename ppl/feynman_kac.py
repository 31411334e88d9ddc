r"""The Feynman-Kac protocol.

A Feynman-Kac model on steps \(t = 0, \dots, T-1\) is a Markov chain with initial law \(M_0\) and
kernels \(M_t\), together with potentials \(G_t\). Its (unnormalised) path measure is

\[
\mathbb{Q}_T(\mathrm{d}x_{0:T-1}) \propto M_0(\mathrm{d}x_0)\, G_0(x_0)
\prod_{t \ge 1} M_t(x_{t-1}, \mathrm{d}x_t)\, G_t(x_{t-1}, x_t)
\]

with normalising constant \(Z_T\). A sampler (`samplers.smc`) only ever sees this interface; a model
never contains a resampling loop.

Every method is *batched*: ``particles`` is a pytree whose leaves all have a leading particle axis
of size N. Single-particle code is lifted with :class:`VmappedFeynmanKac` /
:func:`from_single_particle`.

Reference: Chopin & Papaspiliopoulos (2020), *An Introduction to Sequential Monte Carlo*, ch. 5.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl.functions import static_function
from ppl import checks, tree

Particles = PyTree  # leaves with leading axis N
Particle = PyTree  # leaves without the particle axis

__all__ = [
    "AbstractFeynmanKac",
    "VmappedFeynmanKac",
    "from_single_particle",
    "Particles",
    "Particle",
]


class AbstractFeynmanKac(eqx.Module):
    """Abstract Feynman-Kac model: batched ``init``, ``move``, ``log_potential``.

    Optional methods (override to enable):

    - ``log_transition(t, previous, particles)``: log density of M_t, for backward and ancestor
      sampling. ``previous`` and ``particles`` are batched with equal leading axes.
    - ``done(particles)``: absorbing states (e.g. a finished LLM answer). A done particle is not
      moved and receives log-potential 0. Return ``None`` (default) for models without absorption.
    - ``adapt(t, particles, log_weights)``: for adaptive models (``is_adaptive = True``), return a
      new model (same pytree structure) chosen from the current weighted population, after the move
      of step t and before its potential is computed. Tempering chooses λ_t here.
    - ``info()``: a pytree recorded at every step (e.g. the tempering exponent).
    - ``previous_view(particles)``: the part of x_{t−1} that ``log_potential`` needs (default: all
      of it). Models with big particles (an LLM's KV cache) return a small view, so that the move
      can update the particles in place instead of keeping x_{t−1} beside x_t.
    - ``move_keeps_done`` (class variable): the model's own ``move`` leaves ``done`` particles
      unchanged in everything the model can ever read of them, so the engine skips its row-select
      over every leaf (scratch storage that is never read, e.g. KV-cache slots past a finished
      sequence's length, may change).
    - ``supports_conditional_smc`` (default true): whether conditional SMC (particle Gibbs) may pin
      a reference path in this model; false for a model whose ``move`` also changes the previous
      particles (resample-move), which a pinned reference would not see.
    - ``step_info(t, previous, particles)``: per-step statistics of the move from ``previous`` to
      ``particles`` (e.g. tokens generated, reward calls), recorded by the engine in
      ``SMCInfo.step_info`` without making the model adaptive. ``previous`` is ``None`` at t = 0.

    Attributes: ``num_steps`` (a static field or class attribute: the horizon T, or ``None`` /
    absent for a variable horizon ended by ``done``) and the class variable ``is_adaptive``.
    """

    is_adaptive: ClassVar[bool] = False
    move_keeps_done: ClassVar[bool] = False
    supports_conditional_smc: ClassVar[bool] = True

    @abc.abstractmethod
    def init(self, key: PRNGKeyArray, num_particles: int) -> Particles:
        """Draw ``num_particles`` particles from M_0."""

    @abc.abstractmethod
    def move(self, key: PRNGKeyArray, t: Int[Array, ""], particles: Particles) -> Particles:
        """Draw x_t ~ M_t(x_{t-1}, ·) for every particle (t ≥ 1)."""

    @abc.abstractmethod
    def log_potential(
        self, t: Int[Array, ""], previous: Particles | None, particles: Particles
    ) -> Float[Array, " N"]:
        """log G_t(x_{t-1}, x_t) per particle; ``previous`` is ``None`` at t = 0. −inf kills."""

    def log_transition(
        self, t: Int[Array, ""], previous: Particles, particles: Particles
    ) -> Float[Array, " N"]:
        """log m_t(x_{t-1}, x_t) per pair; needed by ancestor and backward sampling."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define log_transition, which ancestor sampling and "
            "backward smoothing need"
        )

    def done(self, particles: Particles) -> Bool[Array, " N"] | None:
        """Absorbing-state flags, or ``None`` when the model has none."""
        return None

    def adapt(
        self, t: Int[Array, ""], particles: Particles, log_weights: Float[Array, " N"]
    ) -> "AbstractFeynmanKac":
        """Return the model to use for step ``t``'s potential (adaptive models only)."""
        return self

    def info(self) -> PyTree:
        """A pytree recorded at every step (``None``: nothing recorded)."""
        return None

    def previous_view(self, particles: Particles) -> PyTree:
        """What ``log_potential`` and ``step_info`` read of x_{t−1} (default: the particles)."""
        return particles

    def step_info(self, t: Int[Array, ""], previous: Particles | None, particles: Particles) -> PyTree:
        """Per-step statistics of the move ``previous → particles`` (``None``: nothing recorded).
        ``previous`` is ``None`` at t = 0 (the draw from M_0)."""
        return None


class VmappedFeynmanKac(AbstractFeynmanKac):
    """Lift single-particle functions to a batched Feynman-Kac model with ``vmap``.

    ``init_one(key)``, ``move_one(key, t, x)``, ``log_potential_one(t, x_prev, x)`` (``x_prev`` is
    ``None`` at t = 0) and optional ``log_transition_one(t, x_prev, x)``, ``done_one(x)``.
    ``params`` is a pytree of arrays passed as first argument to every function (so that log Ẑ can
    be differentiated with respect to it); the functions themselves are static.
    """

    init_one: Callable = eqx.field(static=True, converter=static_function)
    move_one: Callable = eqx.field(static=True, converter=static_function)
    log_potential_one: Callable = eqx.field(static=True, converter=static_function)
    log_transition_one: Callable | None = eqx.field(static=True, converter=static_function, default=None)
    done_one: Callable | None = eqx.field(static=True, converter=static_function, default=None)
    params: Any = None
    num_steps: int | None = eqx.field(static=True, default=None)

    def init(self, key, num_particles):
        keys = jax.random.split(key, num_particles)
        return jax.vmap(lambda k: self.init_one(self.params, k))(keys)

    def move(self, key, t, particles):
        keys = jax.random.split(key, tree.num_particles(particles))
        return jax.vmap(lambda k, x: self.move_one(self.params, k, t, x))(keys, particles)

    def log_potential(self, t, previous, particles):
        if previous is None:
            return jax.vmap(lambda x: self.log_potential_one(self.params, t, None, x))(particles)
        return jax.vmap(lambda xp, x: self.log_potential_one(self.params, t, xp, x))(
            previous, particles
        )

    def log_transition(self, t, previous, particles):
        if self.log_transition_one is None:
            return super().log_transition(t, previous, particles)
        return jax.vmap(lambda xp, x: self.log_transition_one(self.params, t, xp, x))(
            previous, particles
        )

    def done(self, particles):
        if self.done_one is None:
            return None
        return jax.vmap(lambda x: self.done_one(self.params, x))(particles)


def from_single_particle(
    init: Callable,
    move: Callable,
    log_potential: Callable,
    *,
    log_transition: Callable | None = None,
    done: Callable | None = None,
    params: Any = None,
    num_steps: int | None = None,
) -> VmappedFeynmanKac:
    """Build a batched model from single-particle functions (each takes ``params`` first).

    Signatures: ``init(params, key)``, ``move(params, key, t, x)``,
    ``log_potential(params, t, x_prev_or_None, x)``, ``log_transition(params, t, x_prev, x)``,
    ``done(params, x)``.
    """
    for name, fn in (("init", init), ("move", move), ("log_potential", log_potential)):
        if not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
    checks.optional_positive_int("num_steps", num_steps)
    return VmappedFeynmanKac(
        init_one=init,
        move_one=move,
        log_potential_one=log_potential,
        log_transition_one=log_transition,
        done_one=done,
        params=params,
        num_steps=num_steps,
    )

