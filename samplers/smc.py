r"""The one SMC engine: particle filters, SMC samplers, conditional SMC, on any Feynman-Kac model.

At step 0, \(x_0^i \sim M_0\) and \(w_0^i = G_0(x_0^i)\). At each step \(t \ge 1\):

1. if \(\mathrm{ESS}(W_{t-1}) <\) ``ess_threshold`` \(\cdot N\) (or the schedule says so), draw
   ancestors \(a^i\) with a resampling scheme and set \(W_{t-1} = 1/N\); otherwise \(a^i = i\);
2. \(x_t^i \sim M_t(x_{t-1}^{a^i}, \cdot)\) (finished particles of models with ``done`` stay put);
3. \(w_t^i = W_{t-1}^i\, G_t(x_{t-1}^{a^i}, x_t^i)\) and
   \(\log \hat Z_t = \log \hat Z_{t-1} + \log \sum_i w_t^i\).

\(\hat Z_T\) is an unbiased estimate of \(Z_T\) (Del Moral 2004); log-weights stay normalised so the
increment is exactly ``logsumexp``. With ``reference`` set, slot 0 carries a pinned trajectory
(conditional SMC, Andrieu, Doucet & Holenstein 2010); with ``ancestor_sampling`` its ancestor is
redrawn \(\propto W_{t-1}^i\, m_t(x_{t-1}^i, x_t^{\mathrm{ref}})\) (Lindsten, Jordan & Schön 2014).

:func:`smc` drives the kernel of :mod:`samplers.smc_kernel` (``init``, then ``step`` per step):
a ``lax.scan`` when the horizon is fixed (reverse-mode differentiable; resampling indices carry no
gradient) and a ``lax.while_loop`` with a step cap when the model ends by ``done``. Call the kernel
directly for online filtering.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree
from ppl.feynman_kac import AbstractFeynmanKac
from ppl.random import fast_key
from samplers import sharding, smc_kernel
from samplers.resampling import AbstractResampling, get_resampling
from samplers.smc_kernel import SMCInfo, SMCState

__all__ = ["smc", "SMCResult", "SMCHistory", "SMCState", "SMCInfo"]


class SMCHistory(NamedTuple):
    r"""Stored genealogy of a run (``store_history=True``), one row per step.

    ``particles[t]`` are \(x_t\) (after the move); ``ancestors[t, i]`` is the index at step \(t-1\)
    of the parent of particle \(i\) at step \(t\) (``ancestors[0] = arange(N)``); ``log_weights[t]``
    are the normalised \(\log W_t\). Rows at or beyond ``num_steps`` of a variable-horizon run are padding.
    """

    particles: PyTree
    ancestors: Int[Array, "T N"]
    log_weights: Float[Array, "T N"]


class SMCResult(NamedTuple):
    r"""Output of :func:`smc`.

    Attributes:
        particles: final particles \(x_{T-1}^{1:N}\).
        log_weights: normalised final log-weights \(\log W_{T-1}\).
        log_evidence: \(\log \hat Z_T\) (\(\hat Z_T\) unbiased for \(Z_T\)); \(-\infty\) when every
            particle died.
        ess: ESS of \(W_t\) after weighting at each step, shape [max_steps] (NaN past ``num_steps``).
        resampled: whether step \(t\) resampled before moving (step 0 never does).
        log_evidence_increments: \(\log(\hat Z_t / \hat Z_{t-1})\) per step.
        num_steps: number of steps actually run.
        num_nan_potentials: NaN log-potentials seen (each treated as \(-\infty\), i.e. a killed
            particle).
        extinct: True when at some step every particle had zero weight (failure flag).
        reached_max_steps: a variable-horizon run stopped at the cap before all particles were done.
        history: :class:`SMCHistory` when ``store_history=True``.
        final_ancestors: with ``resample_final=True``, the ancestors of the returned (equally
            weighted) particles among the last step's particles; ``None`` otherwise.
        model: the final model (adaptive models change their leaves along the run).
        model_info: per-step ``model.info()`` (e.g. tempering exponents), or ``None``.
        step_info: per-step ``model.step_info(t, previous, particles)`` (leading axis \(T\); zeros
            past ``num_steps``), or ``None``.
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
    final_ancestors: Int[Array, " N"] | None = None
    step_info: Any = None


def _validate(model, num_particles, ess_threshold, num_steps, max_steps, resample_schedule):
    checks.feynman_kac_model(model)
    checks.positive_int("num_particles", num_particles)
    checks.probability("ess_threshold", ess_threshold)
    checks.optional_positive_int("num_steps", num_steps)
    checks.optional_positive_int("max_steps", max_steps)
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
    resample_final: bool = False,
    mesh: Mesh | None = None,
) -> SMCResult:
    r"""Run SMC on a Feynman-Kac model, compiled end to end.

    Args:
        key: PRNG key. A key of JAX's default implementation runs as
            :data:`ppl.random.threefry_unrolled` on CPU: the same random numbers, drawn faster.
        model: the Feynman-Kac model (batched protocol of :mod:`ppl.feynman_kac`).
        num_particles: \(N \ge 1\) (static).
        resampling: ``"systematic"`` (default), ``"stratified"``, ``"residual"``, ``"multinomial"``
            or an :class:`~samplers.resampling.AbstractResampling`.
        ess_threshold: resample when \(\mathrm{ESS} < \mathrm{threshold} \cdot N\); 1 resamples every step, 0
            never (sequential importance sampling).
        num_steps: horizon \(T\); defaults to ``model.num_steps``. With ``None`` the run is a
            ``while_loop`` that stops when every particle is ``done`` or at ``max_steps``.
        max_steps: step cap of a variable-horizon run (required then).
        resample_schedule: optional boolean array [T]; ``schedule[t]`` forces resampling before
            step \(t\) (combined with the ESS rule by "or"; use ``ess_threshold=0`` for a pure schedule).
        reference: pinned trajectory (pytree, leaves [T, ...] without particle axis) for
            conditional SMC; it occupies slot 0.
        ancestor_sampling: redraw the reference's ancestor (needs ``model.log_transition``).
        store_history: keep particles, ancestors and log-weights of every step.
        resample_final: resample once more after the last step, so that the returned particles
            are equally weighted (``log_weights`` \(= -\log N\); ``final_ancestors`` records the
            draw; \(\log \hat Z\) and the history are unchanged).
        mesh: a :class:`jax.sharding.Mesh` (:func:`samplers.sharding.particle_mesh`): the particle
            axis of every particle leaf and of the log-weights is split over its first axis
            (\(N\) a multiple of its size); moves and potentials run where their particles live,
            \(\log \hat Z\) and the ESS reduce over devices, resampling is global (the one-device
            law) or, with :class:`samplers.sharding.Islands`, local. See :mod:`samplers.sharding`.

    Memory: without history a run holds a few copies of the particles (current, resampled,
    moved) and \(O(N)\) work arrays: measured 40–44 bytes per particle for a scalar float32 state
    (bootstrap filter on stochastic volatility, peak RSS 0.83 GB at \(N = 10^7\) and 1.25 GB at
    \(2 \cdot 10^7\), of which ≈ 0.45 GB is the JAX process itself; see ``docs/scaling.md``).
    ``store_history=True`` keeps every step: \(T \times N \times\) (the bytes of one particle
    \(+ 8\), its ancestor index and log-weight), about twice that at the peak (the stacked steps
    are copied once when step 0 is prepended): measured 27 bytes per particle and step for a
    scalar state (2.7 GB more at \(N = 10^6\), \(T = 100\)). At \(N = 10^7\), \(T = 1000\) that
    is 270 GB: keep the history for smoothing at moderate \(N T\) only.

    Returns:
        :class:`SMCResult`.
    """
    checks.prng_key("key", key)
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
    if mesh is not None:
        sharding.check_divisible(num_particles, mesh)
    if resample_schedule is not None and jnp.shape(resample_schedule)[0] < length:
        raise ValueError(
            f"resample_schedule needs {length} entries, got {jnp.shape(resample_schedule)[0]}"
        )
    result = _smc_jit(
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
        resample_final=bool(resample_final),
        mesh=mesh,
    )
    warn_failures(result)
    return result


# Final ESS below this fraction of N (and below 1.5 particles for N < 150) triggers a warning.
LOW_FINAL_ESS = 0.01


def warn_failures(result: SMCResult) -> None:
    """Warn (after the compiled call) about NaN log-potentials, extinction and a final ESS below
    ``max(1.5, LOW_FINAL_ESS · N)`` recorded in ``result``; silent under a transformation (traced
    values: the caller reads the fields)."""
    fields = (result.extinct, result.ess, result.num_steps, result.num_nan_potentials)
    if any(isinstance(x, jax.core.Tracer) for x in fields) or jnp.ndim(result.extinct) != 0:
        return
    nans = int(result.num_nan_potentials)
    if nans:
        warnings.warn(
            f"SMC: {nans} log-potential(s) were NaN and were treated as -inf (the particles were "
            "killed); check the model's potentials (result.num_nan_potentials)",
            RuntimeWarning, stacklevel=3,
        )
    n = jnp.shape(result.log_weights)[0]
    final_ess = float(jnp.asarray(result.ess)[max(int(result.num_steps) - 1, 0)])
    if n >= 8 and not bool(result.extinct) and final_ess < max(1.5, LOW_FINAL_ESS * n):
        warnings.warn(
            f"SMC: the final effective sample size is {final_ess:.3g} of {n} particles: the "
            "weighted estimates rest on very few particles; use more particles or a better "
            "proposal, or check the model (result.ess)",
            RuntimeWarning, stacklevel=3,
        )
    if bool(result.extinct):
        warnings.warn(
            "SMC: every particle had zero weight at some step (extinction): log_evidence is -inf "
            "(result.extinct); use more particles or a better proposal, or check the model",
            RuntimeWarning, stacklevel=3,
        )


def _constrain(state: SMCState, mesh) -> SMCState:
    """Keep the particle axis of the particles and log-weights split over ``mesh`` (if any)."""
    if mesh is None:
        return state
    return state._replace(particles=sharding.constrain(state.particles, mesh),
                          log_weights=sharding.constrain(state.log_weights, mesh))


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
    resample_final,
    mesh=None,
):
    n = num_particles
    key_init, _, key_loop = jax.random.split(key, 3)
    conditional = reference is not None
    ref0 = tree.row(reference, 0) if conditional else None
    state0 = _constrain(smc_kernel.init(key_init, model, n, reference=ref0), mesh)
    model0 = eqx.combine(state0.model, model) if model.is_adaptive else model
    info0 = model0.info()
    step_info0 = model0.step_info(jnp.asarray(0, jnp.int32), None, state0.particles)

    def kernel_step(state, k, t):
        ref_t = None
        if conditional:
            ref_t = tree.index_time(reference, t)
        force = resample_schedule[t] if resample_schedule is not None else None
        new, info = smc_kernel.step(
            k, state, model, resampling=resampling, ess_threshold=ess_threshold,
            force_resample=force, reference=ref_t, ancestor_sampling=ancestor_sampling,
        )
        return _constrain(new, mesh), info

    def next_key(k):
        return jax.random.split(k, 4)[0]  # the kernel uses the other three of the same split

    if horizon is not None:
        def body(carry, t):
            st, k = carry
            new, info = kernel_step(st, k, t)
            rows = (new.particles, new.log_weights) if store_history else None
            return (new, next_key(k)), (info, rows)

        (state, key_end), (infos, rows) = jax.lax.scan(
            body, (state0, key_loop), jnp.arange(1, horizon, dtype=jnp.int32)
        )
        steps_run = jnp.asarray(horizon, jnp.int32)
        at_cap = jnp.asarray(False)
        ess = tree.prepend(state0.ess, infos.ess)
        resampled = tree.prepend(jnp.asarray(False), infos.resampled)
        increments = tree.prepend(state0.log_evidence, infos.log_evidence_increment)
        model_info = tree.prepend(info0, infos.model_info)
        step_info = tree.prepend(step_info0, infos.step_info)
        if store_history:
            ancestors = tree.prepend(jnp.arange(n, dtype=jnp.int32), infos.ancestors)
            hist_particles, hist_log_w = tree.prepend((state0.particles, state0.log_weights), rows)
    else:
        def all_done(st):
            mdl = eqx.combine(st.model, model) if model.is_adaptive else model
            d = mdl.done(st.particles)
            return jnp.asarray(False) if d is None else jnp.all(d)

        def record(bufs, t, info, st):
            out = {
                "ess": bufs["ess"].at[t].set(info.ess),
                "resampled": bufs["resampled"].at[t].set(info.resampled),
                "increments": bufs["increments"].at[t].set(info.log_evidence_increment),
                "model_info": tree.set_row(bufs["model_info"], t, info.model_info),
                "step_info": tree.set_row(bufs["step_info"], t, info.step_info),
            }
            if store_history:
                out["ancestors"] = bufs["ancestors"].at[t].set(info.ancestors)
                out["rows"] = tree.set_row(bufs["rows"], t, (st.particles, st.log_weights))
            return out

        def first_row(x):  # a [length, ...] buffer holding step 0's value
            return tree.set_row(tree.buffer(x, length), 0, x)

        bufs0 = {
            "ess": jnp.full((length,), jnp.nan).at[0].set(state0.ess),
            "resampled": jnp.zeros((length,), bool),
            "increments": jnp.zeros((length,)).at[0].set(state0.log_evidence),
            "model_info": first_row(info0),
            "step_info": first_row(step_info0),
        }
        if store_history:
            bufs0["ancestors"] = first_row(jnp.arange(n, dtype=jnp.int32))
            bufs0["rows"] = first_row((state0.particles, state0.log_weights))

        def cond(c):
            t, st, _, _ = c
            return (t < length) & ~all_done(st)

        def body(c):
            t, st, k, bufs = c
            new, info = kernel_step(st, k, t)
            return t + 1, new, next_key(k), record(bufs, t, info, new)

        steps_run, state, key_end, bufs = jax.lax.while_loop(
            cond, body, (jnp.asarray(1, jnp.int32), state0, key_loop, bufs0)
        )
        at_cap = ~all_done(state)
        ess, resampled, increments = bufs["ess"], bufs["resampled"], bufs["increments"]
        model_info, step_info = bufs["model_info"], bufs["step_info"]
        if store_history:
            ancestors = bufs["ancestors"]
            hist_particles, hist_log_w = bufs["rows"]

    hist = None
    if store_history:
        hist = SMCHistory(particles=hist_particles, ancestors=ancestors, log_weights=hist_log_w)
    final_ancestors = None
    if resample_final:
        state, final_ancestors = smc_kernel.resample_final(next_key(key_end), state, resampling=resampling)
    log_z = jnp.where(state.extinct, -jnp.inf, state.log_evidence)
    final_model = eqx.combine(state.model, model) if model.is_adaptive else None
    return SMCResult(
        particles=state.particles,
        log_weights=state.log_weights,
        log_evidence=log_z,
        ess=ess,
        resampled=resampled,
        log_evidence_increments=increments,
        num_steps=steps_run,
        num_nan_potentials=state.num_nan_potentials,
        extinct=state.extinct,
        reached_max_steps=at_cap,
        history=hist,
        model=final_model,
        model_info=model_info if info0 is not None else None,
        final_ancestors=final_ancestors,
        step_info=step_info if step_info0 is not None else None,
    )
