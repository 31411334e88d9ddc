"""The one SMC engine: particle filters, SMC samplers, conditional SMC, on any Feynman-Kac model.

At step 0, x_0^i ~ M_0 and w_0^i = G_0(x_0^i). At each step t ≥ 1:

1. if ESS(W_{t-1}) < ``ess_threshold`` · N (or the schedule says so), draw ancestors a^i with a
   resampling scheme and set W_{t-1} = 1/N; otherwise a^i = i;
2. x_t^i ~ M_t(x_{t-1}^{a^i}, ·) (finished particles of models with ``done`` stay put);
3. w_t^i = W_{t-1}^i G_t(x_{t-1}^{a^i}, x_t^i); log Ẑ_t = log Ẑ_{t-1} + log Σ_i w_t^i.

Ẑ_T is an unbiased estimate of Z_T (Del Moral 2004); log-weights stay normalised so the increment
is exactly ``logsumexp``. With ``reference`` set, slot 0 carries a pinned trajectory (conditional
SMC, Andrieu, Doucet & Holenstein 2010); with ``ancestor_sampling`` its ancestor is redrawn
∝ W_{t-1}^i m_t(x_{t-1}^i, x_t^ref) (Lindsten, Jordan & Schön 2014).

The loop is a ``lax.scan`` when the horizon is fixed (reverse-mode differentiable; resampling
indices carry no gradient) and a ``lax.while_loop`` with a step cap when the model ends by ``done``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl.feynman_kac import AbstractFeynmanKac
from ppl.random import fast_key
from samplers.gather import resample_rows
from samplers.resampling import AbstractResampling, get_resampling, normalise

__all__ = ["smc", "SMCResult", "SMCHistory"]


class SMCHistory(NamedTuple):
    """Stored genealogy of a run (``store_history=True``), one row per step.

    ``particles[t]`` are x_t (after the move); ``ancestors[t, i]`` is the index at step t−1 of the
    parent of particle i at step t (``ancestors[0] = arange(N)``); ``log_weights[t]`` are the
    normalised log W_t. Rows at or beyond ``num_steps`` of a variable-horizon run are padding.
    """

    particles: PyTree
    ancestors: Int[Array, "T N"]
    log_weights: Float[Array, "T N"]


class SMCResult(NamedTuple):
    """Output of :func:`smc`.

    Attributes:
        particles: final particles x_{T-1}^{1:N}.
        log_weights: normalised final log-weights log W_{T-1}.
        log_evidence: log Ẑ_T (Ẑ_T unbiased for Z_T); −inf when every particle died.
        ess: ESS of W_t after weighting at each step, shape [max_steps] (NaN past ``num_steps``).
        resampled: whether step t resampled before moving (step 0 never does).
        log_evidence_increments: log(Ẑ_t / Ẑ_{t-1}) per step.
        num_steps: number of steps actually run.
        num_nan_potentials: NaN log-potentials seen (each treated as −inf, i.e. a killed particle).
        extinct: True when at some step every particle had zero weight (failure flag).
        reached_max_steps: a variable-horizon run stopped at the cap before all particles were done.
        history: :class:`SMCHistory` when ``store_history=True``.
        model: the final model (adaptive models change their leaves along the run).
        model_info: per-step ``model.info()`` (e.g. tempering exponents), or ``None``.
    """

    particles: PyTree
    log_weights: Float[Array, " N"]
    log_evidence: Float[Array, ""]
    ess: Float[Array, " T"]
    resampled: Bool[Array, " T"]
    log_evidence_increments: Float[Array, " T"]
    num_steps: Int[Array, ""]
    num_nan_potentials: Int[Array, ""]
    extinct: Bool[Array, ""]
    reached_max_steps: Bool[Array, ""]
    history: SMCHistory | None
    model: Any
    model_info: Any


def _gather(tree: PyTree, idx: Int[Array, " N"]) -> PyTree:
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def _where_rows(mask: Bool[Array, " N"], a: PyTree, b: PyTree) -> PyTree:
    def sel(x, y):
        m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        return jnp.where(m, x, y)

    return jax.tree.map(sel, a, b)


def _set_row0(tree: PyTree, row: PyTree) -> PyTree:
    return jax.tree.map(lambda x, r: x.at[0].set(r), tree, row)


def _index_time(tree: PyTree, t) -> PyTree:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, t, 0, keepdims=False), tree)


def _check_potential(log_g: Array, n: int, where: str) -> Array:
    if log_g.shape != (n,):
        raise ValueError(
            f"log_potential must return shape ({n},) (one value per particle) at {where}, "
            f"got {log_g.shape}"
        )
    return log_g


def _reweight(log_w_prev, log_g):
    """Return normalised log W_t, the log-evidence increment, an extinction flag, ESS(W_t) and the
    number of NaN log-potentials (each treated as −inf, a killed particle; +inf stays and is
    reported through the weights).

    One max and one exp pass serve everything: with e_i = exp(u_i − max u), the increment is
    log Σ e + max u (the same operations as ``jax.nn.logsumexp``) and ESS = (Σ e)² / Σ e²
    (Kong 1992); a dead population is reset to uniform weights, ESS = N. ``e`` is materialised
    once (an optimisation barrier): otherwise XLA re-fuses the exponential into each reduction.
    """
    nan = jnp.isnan(log_g)
    num_nan = jnp.sum(nan.astype(jnp.float32)).astype(jnp.int32)
    unnorm = log_w_prev + jnp.where(nan, -jnp.inf, log_g)
    m = jnp.max(unnorm)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
    e = jax.lax.optimization_barrier(jnp.exp(unnorm - m))
    sum_e = jnp.sum(e)
    inc = jnp.log(sum_e) + m
    dead = ~jnp.isfinite(inc)
    n = log_w_prev.shape[0]
    log_w = jnp.where(dead, -jnp.log(n) * jnp.ones_like(unnorm), unnorm - jnp.where(dead, 0.0, inc))
    inc = jnp.where(jnp.isnan(inc) | (inc == jnp.inf), -jnp.inf, inc)
    ess = jnp.where(dead, jnp.asarray(n, sum_e.dtype), sum_e * sum_e / jnp.sum(e * e))
    return log_w, inc, dead, ess, num_nan


def _validate(model, num_particles, ess_threshold, num_steps, max_steps, resample_schedule):
    if not isinstance(model, AbstractFeynmanKac):
        raise TypeError(
            f"model must be an AbstractFeynmanKac (see ppl.feynman_kac), got {type(model).__name__}"
        )
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
    if not (isinstance(ess_threshold, (int, float)) and 0.0 <= float(ess_threshold) <= 1.0):
        raise ValueError(f"ess_threshold must be a number in [0, 1], got {ess_threshold!r}")
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if resample_schedule is not None:
        sched = jnp.asarray(resample_schedule)
        if sched.dtype != jnp.bool_ or sched.ndim != 1:
            raise ValueError("resample_schedule must be a 1-D boolean array (one flag per step)")


def smc(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    num_particles: int,
    *,
    resampling: str | AbstractResampling = "systematic",
    ess_threshold: float = 0.5,
    num_steps: int | None = None,
    max_steps: int | None = None,
    resample_schedule: Bool[Array, " T"] | None = None,
    reference: PyTree | None = None,
    ancestor_sampling: bool = False,
    store_history: bool = False,
) -> SMCResult:
    """Run SMC on a Feynman-Kac model, compiled end to end.

    Args:
        key: PRNG key. A key of JAX's default implementation runs as
            :data:`ppl.random.threefry_unrolled` on CPU: the same random numbers, drawn faster.
        model: the Feynman-Kac model (batched protocol of :mod:`ppl.feynman_kac`).
        num_particles: N ≥ 1 (static).
        resampling: ``"systematic"`` (default), ``"stratified"``, ``"residual"``, ``"multinomial"``
            or an :class:`~samplers.resampling.AbstractResampling`.
        ess_threshold: resample when ESS < threshold · N; 1 resamples every step, 0 never
            (sequential importance sampling).
        num_steps: horizon T; defaults to ``model.num_steps``. With ``None`` the run is a
            ``while_loop`` that stops when every particle is ``done`` or at ``max_steps``.
        max_steps: step cap of a variable-horizon run (required then).
        resample_schedule: optional boolean array [T]; ``schedule[t]`` forces resampling before
            step t (combined with the ESS rule by "or"; use ``ess_threshold=0`` for a pure schedule).
        reference: pinned trajectory (pytree, leaves [T, ...] without particle axis) for
            conditional SMC; it occupies slot 0.
        ancestor_sampling: redraw the reference's ancestor (needs ``model.log_transition``).
        store_history: keep particles, ancestors and log-weights of every step.

    Returns:
        :class:`SMCResult`.
    """
    model_horizon = getattr(model, "num_steps", None)
    horizon = model_horizon if num_steps is None else num_steps
    _validate(model, num_particles, ess_threshold, horizon, max_steps, resample_schedule)
    if num_steps is not None and model_horizon is not None and num_steps > model_horizon:
        raise ValueError(
            f"num_steps={num_steps} exceeds the model's horizon of {model_horizon} steps (e.g. its "
            "number of observations); indexing past it would silently reuse the last step"
        )
    if horizon is None and max_steps is None:
        raise ValueError(
            "the model has no fixed horizon (num_steps is None): pass max_steps to cap the "
            "variable-horizon run"
        )
    if ancestor_sampling and reference is None:
        raise ValueError("ancestor_sampling=True needs a reference trajectory (conditional SMC)")
    length = horizon if horizon is not None else max_steps
    if reference is not None:
        for leaf in jax.tree.leaves(reference):
            if jnp.shape(leaf)[0] < length:
                raise ValueError(
                    f"reference trajectory leaves need a leading time axis of length >= {length}, "
                    f"got shape {jnp.shape(leaf)}"
                )
    if resample_schedule is not None and jnp.shape(resample_schedule)[0] < length:
        raise ValueError(
            f"resample_schedule needs {length} entries, got {jnp.shape(resample_schedule)[0]}"
        )
    return _smc_jit(
        fast_key(key),  # the same random streams, an unrolled (fusable) threefry on CPU
        model,
        reference,
        resample_schedule,
        num_particles=num_particles,
        resampling=get_resampling(resampling),
        ess_threshold=float(ess_threshold),
        horizon=horizon,
        length=length,
        ancestor_sampling=bool(ancestor_sampling),
        store_history=bool(store_history),
    )


@eqx.filter_jit
def _smc_jit(
    key,
    model,
    reference,
    resample_schedule,
    *,
    num_particles,
    resampling,
    ess_threshold,
    horizon,
    length,
    ancestor_sampling,
    store_history,
):
    n = num_particles
    log_n = math.log(n)
    key_init, key_g0, key_loop = jax.random.split(key, 3)
    del key_g0
    conditional = reference is not None

    # ---- step 0 -------------------------------------------------------------------------------
    particles = model.init(key_init, n)
    leaves = jax.tree.leaves(particles)
    if not leaves or any(jnp.shape(x)[:1] != (n,) for x in leaves):
        raise ValueError(
            f"model.init must return a pytree whose leaves have leading axis {n}, got shapes "
            f"{[jnp.shape(x) for x in leaves]}"
        )
    if conditional:
        particles = _set_row0(particles, _index_time(reference, 0))
    t0 = jnp.asarray(0, jnp.int32)
    if model.is_adaptive:
        model = model.adapt(t0, particles, jnp.full((n,), -log_n))
    log_g = _check_potential(model.log_potential(t0, None, particles), n, "t=0")
    log_w, inc0, dead, ess0, nan_count = _reweight(jnp.full((n,), -log_n), log_g)

    info0 = model.info()
    ess_buf = jnp.full((length,), jnp.nan).at[0].set(ess0)
    res_buf = jnp.zeros((length,), bool)
    inc_buf = jnp.zeros((length,)).at[0].set(inc0)
    info_buf = jax.tree.map(lambda x: jnp.zeros((length,) + jnp.shape(x), jnp.result_type(x)).at[0].set(x), info0)
    if store_history:
        hist = SMCHistory(
            particles=jax.tree.map(
                lambda x: jnp.zeros((length,) + x.shape, x.dtype).at[0].set(x), particles
            ),
            ancestors=jnp.zeros((length, n), jnp.int32).at[0].set(jnp.arange(n, dtype=jnp.int32)),
            log_weights=jnp.zeros((length, n)).at[0].set(log_w),
        )
    else:
        hist = None

    # Only adaptive models travel in the loop carry; others are closed over (constants).
    dyn_model, static_model = eqx.partition(model, eqx.is_array)
    carry_model = dyn_model if model.is_adaptive else None

    def step(carry, t):
        (particles, log_w, log_z, nan_count, extinct, ess_buf, res_buf, inc_buf, info_buf, hist,
         cm, k) = carry
        mdl = eqx.combine(cm, static_model) if model.is_adaptive else model
        k, k_res, k_move, k_as = jax.random.split(k, 4)

        # 1. resampling (ess_buf[t-1] is the ESS of the current weights, computed last step)
        flag = ess_buf[t - 1] < ess_threshold * n
        if ess_threshold >= 1.0:
            flag = jnp.asarray(True)
        if resample_schedule is not None:
            flag = flag | resample_schedule[t]
        flag = jax.lax.stop_gradient(flag)
        sg_log_w = jax.lax.stop_gradient(log_w)
        if conditional:
            ref_t = _index_time(reference, t)
            if ancestor_sampling:
                ref_batch = jax.tree.map(lambda r: jnp.broadcast_to(r, (n,) + r.shape), ref_t)
                log_m = mdl.log_transition(t, particles, ref_batch)
                pin = jax.random.categorical(k_as, jax.lax.stop_gradient(sg_log_w + log_m))
            else:
                pin = jnp.asarray(0, jnp.int32)
            ancestors = jax.lax.cond(
                flag,
                lambda: resampling.conditional(k_res, sg_log_w, pin),
                lambda: jnp.arange(n, dtype=jnp.int32).at[0].set(pin),
            )
            # slot 0 may switch ancestor without resampling (ancestor sampling): always gather
            previous = _gather(particles, ancestors)
            # After resampling W = 1/N in value; the ancestor's log-weight is kept as a zero-valued
            # term log W_a − sg(log W_a) so that gradients see the weights' dependence on θ
            # (Ścibior & Wood 2021), giving a consistent score estimate (Poyiadjis et al. 2011).
            log_w_anc = jnp.take(log_w, ancestors)
            log_w = jnp.where(flag, -log_n + log_w_anc - jax.lax.stop_gradient(log_w_anc), log_w)
            if ancestor_sampling:
                # without resampling, slot 0 keeps the weight of its (re-drawn) ancestor
                log_w = jnp.where(flag, log_w, log_w.at[0].set(log_w[pin]))
                log_w = normalise(log_w)
        else:
            # One branch runs: the gathers of particles and weights only happen when resampling.
            def resample(p, lw):
                # big particles (LLM KV caches): survivors keep their slots and only the dead
                # particles' rows are overwritten, in place (samplers.gather)
                moved_p, a = resample_rows(p, resampling(k_res, sg_log_w, n))
                lw_a = jnp.take(lw, a)
                # W = 1/N in value, with the zero-valued term log W_a − sg(log W_a) (see above)
                return a, moved_p, -log_n + lw_a - jax.lax.stop_gradient(lw_a)

            def keep(p, lw):
                return jnp.arange(n, dtype=jnp.int32), p, lw

            ancestors, previous, log_w = jax.lax.cond(flag, resample, keep, particles, log_w)

        # 2. move (finished particles stay)
        moved = mdl.move(k_move, t, previous)
        done = mdl.done(previous)
        if done is not None:
            moved = _where_rows(done, previous, moved)
        if conditional:
            moved = _set_row0(moved, ref_t)

        # 3. adapt, weight
        if model.is_adaptive:
            mdl = mdl.adapt(t, moved, log_w)
        log_g = _check_potential(mdl.log_potential(t, previous, moved), n, "step t")
        if done is not None:
            log_g = jnp.where(done, 0.0, log_g)
        log_w, inc, dead, ess, nans = _reweight(log_w, log_g)

        ess_buf = ess_buf.at[t].set(ess)
        res_buf = res_buf.at[t].set(flag)
        inc_buf = inc_buf.at[t].set(inc)
        info_buf = jax.tree.map(lambda b, x: b.at[t].set(x), info_buf, mdl.info())
        if store_history:
            hist = SMCHistory(
                particles=jax.tree.map(lambda b, x: b.at[t].set(x), hist.particles, moved),
                ancestors=hist.ancestors.at[t].set(ancestors),
                log_weights=hist.log_weights.at[t].set(log_w),
            )
        cm = eqx.partition(mdl, eqx.is_array)[0] if model.is_adaptive else None
        return (moved, log_w, log_z + inc, nan_count + nans, extinct | dead, ess_buf, res_buf,
                inc_buf, info_buf, hist, cm, k)

    carry = (particles, log_w, inc0, nan_count, dead, ess_buf, res_buf, inc_buf, info_buf, hist,
             carry_model, key_loop)

    if horizon is not None:
        def scan_step(c, t):
            return step(c, t), None

        carry, _ = jax.lax.scan(scan_step, carry, jnp.arange(1, horizon, dtype=jnp.int32))
        steps_run = jnp.asarray(horizon, jnp.int32)
        at_cap = jnp.asarray(False)
    else:
        def all_done(c):
            mdl = eqx.combine(c[10], static_model) if model.is_adaptive else model
            d = mdl.done(c[0])
            if d is None:
                return jnp.asarray(False)
            return jnp.all(d)

        def cond(state):
            t, c = state
            return (t < length) & ~all_done(c)

        def body(state):
            t, c = state
            return t + 1, step(c, t)

        steps_run, carry = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), carry))
        at_cap = ~all_done(carry)

    (particles, log_w, log_z, nan_count, extinct, ess_buf, res_buf, inc_buf, info_buf, hist, cm,
     _) = carry
    final_model = eqx.combine(cm, static_model) if model.is_adaptive else model
    log_z = jnp.where(extinct, -jnp.inf, log_z)
    return SMCResult(
        particles=particles,
        log_weights=log_w,
        log_evidence=log_z,
        ess=ess_buf,
        resampled=res_buf,
        log_evidence_increments=inc_buf,
        num_steps=steps_run,
        num_nan_potentials=nan_count,
        extinct=extinct,
        reached_max_steps=at_cap,
        history=hist,
        model=final_model if model.is_adaptive else None,
        model_info=info_buf if info0 is not None else None,
    )
