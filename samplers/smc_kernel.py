r"""The SMC kernel: one ``init`` and one ``step`` over any Feynman-Kac model (blackjax/optax style).

A run of SMC is ``state = init(key, model, N)`` followed by ``state, info = step(key_t, state,
model)`` for t = 1, 2, ...; :func:`samplers.smc` is a ``lax.scan`` (fixed horizon) or a
``lax.while_loop`` (models ended by ``done``) over :func:`step`. Call the kernel yourself for online
filtering (data arriving one at a time, the state carried between calls), inside variational
objectives, or nested in SMC².

At step 0, ``init`` draws \(x_0^i \sim M_0\) and weights \(w_0^i = G_0(x_0^i)\). A step \(t \ge 1\):

1. if \(\mathrm{ESS}(W_{t-1}) <\) ``ess_threshold`` \(\cdot N\) (or ``force_resample``), draw
   ancestors \(a^i\) with the resampling scheme and set \(W_{t-1} = 1/N\); otherwise \(a^i = i\);
2. \(x_t^i \sim M_t(x_{t-1}^{a^i}, \cdot)\) (finished particles of models with ``done`` stay put);
3. \(w_t^i = W_{t-1}^i\, G_t(x_{t-1}^{a^i}, x_t^i)\) and
   \(\log \hat Z_t = \log \hat Z_{t-1} + \log \sum_i w_t^i\).

\(\hat Z_t\) is unbiased for \(Z_t\) (Del Moral 2004). Log-weights stay normalised, so the increment
is exactly ``logsumexp``. With ``reference`` (the pinned particle \(x^*_t\)) slot 0 carries a fixed
trajectory (conditional SMC, Andrieu, Doucet & Holenstein 2010); with ``ancestor_sampling`` its
ancestor is redrawn \(\propto W_{t-1}^i\, m_t(x_{t-1}^i, x^*_t)\) (Lindsten, Jordan & Schön 2014).

Resampling under ``vmap``: a ``lax.cond`` on a batched predicate becomes a select that runs both
branches, so vmapped chains (PMMH) would all resample at every step. The ancestors are therefore
drawn by a ``custom_vmap`` rule: vmapped, it loops over the chains whose flag is set (CPU) or draws
for all chains only when any flag is set (accelerators), and leaves the identity elsewhere; the
cost follows the resampling rate. Resampled particles are gathered from the ancestors (big rows
in place, :mod:`samplers.gather`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.gather import IN_PLACE_MIN_ROW_BYTES, resample_rows, row_bytes
from samplers.resampling import AbstractResampling, get_resampling, normalise
from samplers.resampling import ess as ess_of

__all__ = ["SMCState", "SMCInfo", "init", "step", "resample_final"]


class SMCState(NamedTuple):
    r"""State of the SMC kernel after weighting step ``step``.

    Attributes:
        particles: \(x_t^{1:N}\) (a pytree, leaves with the particle axis first).
        log_weights: normalised \(\log W_t\) (uniform after extinction).
        log_evidence: \(\log \hat Z_t\) (\(-\infty\) once ``extinct``).
        ess: \(\mathrm{ESS}(W_t)\), which decides whether the next step resamples.
        step: \(t\), the index of the last weighting (0 after :func:`init`).
        num_nan_potentials: NaN log-potentials seen so far (each treated as \(-\infty\), a killed
            particle).
        extinct: at some step every particle had zero weight (failure flag).
        model: for adaptive models (``model.is_adaptive``), the array leaves of the model adapted at
            this step (combined with the static part of the model passed to :func:`step`);
            ``None`` otherwise.
    """

    particles: PyTree
    log_weights: Float[Array, " N"]
    log_evidence: Float[Array, ""]
    ess: Float[Array, ""]
    step: Int[Array, ""]
    num_nan_potentials: Int[Array, ""]
    extinct: Bool[Array, ""]
    model: Any


class SMCInfo(NamedTuple):
    r"""What one :func:`step` did.

    Attributes:
        ancestors: \(a^{1:N}\), the index at \(t-1\) of each particle's parent (the identity when not
            resampled; with big particle rows a stable permutation, see :mod:`samplers.gather`).
        ess: \(\mathrm{ESS}(W_t)\) after weighting.
        resampled: whether the step resampled before moving.
        log_evidence_increment: \(\log(\hat Z_t / \hat Z_{t-1}) = \log \sum_i W_{t-1}^{a^i} G_t^i\).
        num_nan_potentials: NaN log-potentials at this step.
        model_info: ``model.info()`` after the step (e.g. a tempering exponent), or ``None``.
        step_info: ``model.step_info(t, previous, particles)`` (statistics of the move, e.g.
            tokens generated), or ``None``.
    """

    ancestors: Int[Array, " N"]
    ess: Float[Array, ""]
    resampled: Bool[Array, ""]
    log_evidence_increment: Float[Array, ""]
    num_nan_potentials: Int[Array, ""]
    model_info: Any
    step_info: Any = None


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _check_potential(log_g: Array, n: int, where: str) -> Array:
    if jnp.shape(log_g) != (n,):
        raise ValueError(
            f"log_potential must return shape ({n},) (one value per particle) at {where}, "
            f"got {jnp.shape(log_g)}"
        )
    return log_g


def reweight(log_w_prev: Float[Array, " N"], log_g: Float[Array, " N"]):
    r"""Return normalised \(\log W_t\), the log-evidence increment, an extinction flag,
    \(\mathrm{ESS}(W_t)\) and the number of NaN log-potentials (each treated as \(-\infty\), a killed
    particle; \(+\infty\) stays and is reported through the weights).

    One max and one exp pass serve everything: with \(e_i = \exp(u_i - \max u)\), the increment is
    \(\log \sum_i e_i + \max u\) (the same operations as ``jax.nn.logsumexp``) and
    \(\mathrm{ESS} = (\sum_i e_i)^2 / \sum_i e_i^2\) (Kong 1992); a dead population is reset to uniform
    weights, \(\mathrm{ESS} = N\). ``e`` is materialised once (an optimisation barrier): otherwise
    XLA re-fuses the exponential into each reduction.
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


def _ancestors_fn(resampling: AbstractResampling, n: int, conditional: bool):
    """``draw(flag, key, log_w, pin) -> a``: the scheme's ancestors when ``flag``, else the
    identity (with ``a_0 = pin`` when conditional). A ``lax.cond`` unbatched; a ``custom_vmap``
    rule batched, so that vmapped chains only pay for the chains that resample."""

    def identity(pin):
        a = jnp.arange(n, dtype=jnp.int32)
        return a.at[0].set(pin) if conditional else a

    def draw_one(key, log_w, pin):
        if conditional:
            return resampling.conditional(key, log_w, pin).astype(jnp.int32)
        return resampling(key, log_w, n).astype(jnp.int32)

    @custom_vmap
    def draw(flag, key, log_w, pin):
        return jax.lax.cond(flag, lambda: draw_one(key, log_w, pin), lambda: identity(pin))

    @draw.def_vmap
    def draw_batched(axis_size, in_batched, flag, key, log_w, pin):
        def full(x, batched):
            return x if batched else jax.tree.map(
                lambda y: jnp.broadcast_to(y, (axis_size,) + jnp.shape(y)), x)

        flag, key, log_w, pin = (full(x, b) for x, b in zip((flag, key, log_w, pin), in_batched))
        ident = jax.vmap(identity)(pin)
        if jax.default_backend() == "cpu":
            # one chain at a time, only the chains that resample: cost ∝ their number
            which = jnp.nonzero(flag, size=axis_size, fill_value=0)[0]
            count = jnp.sum(flag.astype(jnp.int32))

            def body(c):
                k, a = c
                b = which[k]
                return k + 1, a.at[b].set(draw_one(key[b], log_w[b], pin[b]))

            _, a = jax.lax.while_loop(lambda c: c[0] < count, body, (jnp.asarray(0, jnp.int32), ident))
        else:
            # all chains in one vectorised draw, skipped when no chain resamples
            a = jax.lax.cond(
                jnp.any(flag),
                lambda: jnp.where(flag[:, None], jax.vmap(draw_one)(key, log_w, pin), ident),
                lambda: ident,
            )
        return a, True

    return draw


# ------------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------------


def init(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    num_particles: int,
    *,
    reference: PyTree | None = None,
) -> SMCState:
    r"""Draw \(x_0^{1:N} \sim M_0\), weight them by \(G_0\) and return the state at step 0.

    Args:
        key: PRNG key (used by ``model.init``).
        model: a Feynman-Kac model (:mod:`ppl.feynman_kac`).
        num_particles: \(N \ge 1\) (static).
        reference: conditional SMC: the pinned particle \(x^*_0\) (leaves without the particle axis),
            placed in slot 0.
    """
    checks.feynman_kac_model(model)
    n = checks.positive_int("num_particles", num_particles)
    log_n = math.log(n)
    particles = model.init(key, n)
    leaves = jax.tree.leaves(particles)
    if not leaves or any(jnp.shape(x)[:1] != (n,) for x in leaves):
        raise ValueError(
            f"model.init must return a pytree whose leaves have leading axis {n}, got shapes "
            f"{[jnp.shape(x) for x in leaves]}"
        )
    if reference is not None:
        particles = tree.set_row(particles, 0, reference)
    t0 = jnp.asarray(0, jnp.int32)
    if model.is_adaptive:
        model = model.adapt(t0, particles, jnp.full((n,), -log_n))
    log_g = _check_potential(model.log_potential(t0, None, particles), n, "t=0")
    log_w, inc, dead, ess, nans = reweight(jnp.full((n,), -log_n), log_g)
    return SMCState(
        particles=particles,
        log_weights=log_w,
        log_evidence=inc,
        ess=ess,
        step=t0,
        num_nan_potentials=nans,
        extinct=dead,
        model=eqx.filter(model, eqx.is_array) if model.is_adaptive else None,
    )


def step(
    key: PRNGKeyArray,
    state: SMCState,
    model: AbstractFeynmanKac,
    *,
    resampling: str | AbstractResampling = "systematic",
    ess_threshold: float = 0.5,
    force_resample: Bool[Array, ""] | None = None,
    reference: PyTree | None = None,
    ancestor_sampling: bool = False,
) -> tuple[SMCState, SMCInfo]:
    r"""One SMC step \(t\) = ``state.step + 1``: resample if due, move, weight.

    Args:
        key: PRNG key of this step.
        state: the state after step \(t - 1\).
        model: the Feynman-Kac model (for adaptive models, its static part; the array leaves
            come from ``state.model``).
        resampling: scheme name or :class:`~samplers.resampling.AbstractResampling`.
        ess_threshold: resample when \(\mathrm{ESS} < \mathrm{threshold} \cdot N\) (1: every step, 0: never).
        force_resample: optional boolean (a schedule), or-ed with the ESS rule.
        reference: conditional SMC: the pinned particle \(x^*_t\) (leaves without the particle axis).
        ancestor_sampling: redraw the reference's ancestor (needs ``model.log_transition``).

    Returns:
        ``(new_state, info)``.
    """
    checks.feynman_kac_model(model)
    threshold = checks.probability("ess_threshold", ess_threshold)
    if ancestor_sampling and reference is None:
        raise ValueError("ancestor_sampling=True needs a reference particle (conditional SMC)")
    resampling = get_resampling(resampling)
    particles, log_w = state.particles, state.log_weights
    n = log_w.shape[0]
    log_n = math.log(n)
    t = state.step + 1
    conditional = reference is not None
    if conditional and not getattr(model, "supports_conditional_smc", True):
        raise ValueError(f"{type(model).__name__} does not support conditional SMC (particle Gibbs): its move "
                         "also changes the previous particles (e.g. resample-move), which the pinned "
                         "reference path would not see")
    mdl = eqx.combine(state.model, model) if model.is_adaptive else model
    # the key is split in four (the first unused) so that smc()'s streams match earlier versions
    _, k_res, k_move, k_as = jax.random.split(key, 4)

    # 1. resampling
    flag = jnp.asarray(True) if threshold >= 1.0 else state.ess < threshold * n
    if force_resample is not None:
        flag = flag | jnp.asarray(force_resample, bool)
    flag = jax.lax.stop_gradient(flag)
    sg_log_w = jax.lax.stop_gradient(log_w)
    if conditional:
        if ancestor_sampling:
            ref_batch = tree.broadcast_rows(reference, n)
            log_m = mdl.log_transition(t, particles, ref_batch)
            pin = jax.random.categorical(k_as, jax.lax.stop_gradient(sg_log_w + log_m)).astype(jnp.int32)
        else:
            pin = jnp.asarray(0, jnp.int32)
        ancestors = _ancestors_fn(resampling, n, True)(flag, k_res, sg_log_w, pin)
        # slot 0 may switch ancestor without resampling (ancestor sampling): always gather
        previous = tree.gather(particles, ancestors)
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
        if threshold >= 1.0 and force_resample is None:
            ancestors = resampling(k_res, sg_log_w, n).astype(jnp.int32)
        else:
            no_pin = jnp.asarray(0, jnp.int32)
            ancestors = _ancestors_fn(resampling, n, False)(flag, k_res, sg_log_w, no_pin)
        if row_bytes(particles) >= IN_PLACE_MIN_ROW_BYTES and not getattr(
                resampling, "gathers_rows_itself", False):
            # big rows (LLM KV caches): survivors keep their slots and only the dead particles'
            # rows are overwritten, in place; with the identity nothing is copied (a scheme that
            # moves its rows itself, samplers.sharded_gather, takes the gather below instead)
            previous, ancestors = resample_rows(particles, ancestors)
        else:
            previous = jax.lax.cond(
                flag, lambda p: resampling.gather(p, ancestors), lambda p: p, particles)
        log_w_anc = resampling.gather(log_w, ancestors)
        after = resampling.log_weights_after(sg_log_w)  # -log N, or islands' masses
        log_w = jnp.where(flag, after + log_w_anc - jax.lax.stop_gradient(log_w_anc), log_w)

    # 2. move (finished particles stay); only the model's view of x_{t-1} outlives the move
    done = mdl.done(previous)
    view = mdl.previous_view(previous)
    moved = mdl.move(k_move, t, previous)
    if done is not None and not mdl.move_keeps_done:
        moved = tree.where_rows(done, previous, moved)
    if conditional:
        moved = tree.set_row(moved, 0, reference)

    # 3. adapt, weight
    if model.is_adaptive:
        mdl = mdl.adapt(t, moved, log_w)
    log_g = _check_potential(mdl.log_potential(t, view, moved), n, "step t")
    if done is not None:
        log_g = jnp.where(done, 0.0, log_g)
    log_w, inc, dead, ess, nans = reweight(log_w, log_g)

    new_state = SMCState(
        particles=moved,
        log_weights=log_w,
        log_evidence=state.log_evidence + inc,
        ess=ess,
        step=t,
        num_nan_potentials=state.num_nan_potentials + nans,
        extinct=state.extinct | dead,
        model=eqx.filter(mdl, eqx.is_array) if model.is_adaptive else None,
    )
    info = SMCInfo(
        ancestors=ancestors,
        ess=ess,
        resampled=flag,
        log_evidence_increment=inc,
        num_nan_potentials=nans,
        model_info=mdl.info(),
        step_info=mdl.step_info(t, view, moved),
    )
    return new_state, info


def resample_final(
    key: PRNGKeyArray,
    state: SMCState,
    *,
    resampling: str | AbstractResampling = "systematic",
) -> tuple[SMCState, Int[Array, " N"]]:
    """Resample the final population so that it is equally weighted: ``(state, ancestors)``.

    The particles become x^{a^i} with a drawn from W; the log-weights are −log N in value (with the
    zero-valued term log W_a − sg(log W_a) for gradients). log Ẑ is unchanged.
    """
    resampling = get_resampling(resampling)
    n = state.log_weights.shape[0]
    sg_log_w = jax.lax.stop_gradient(state.log_weights)
    a = resampling(key, sg_log_w, n).astype(jnp.int32)
    lw_a = resampling.gather(state.log_weights, a)
    after = resampling.log_weights_after(sg_log_w)  # -log N (islands: each island's mass)
    ess = jnp.asarray(n, state.ess.dtype) if isinstance(after, float) else ess_of(after)
    return state._replace(
        particles=resampling.gather(state.particles, a),
        log_weights=after + lw_a - jax.lax.stop_gradient(lw_a),
        ess=ess,
    ), a
