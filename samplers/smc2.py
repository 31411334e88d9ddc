r"""SMC² for state-space models with unknown parameters (Chopin, Jacob & Papaspiliopoulos 2013).

\(N_\theta\) θ-particles each carry a particle filter of \(N_x\) x-particles for the model
\(p_\theta\). At each time \(t\) every filter assimilates \(y_t\) (one step of the SMC kernel of
:mod:`samplers.smc_kernel`, vmapped over θ) and the θ-weights are multiplied by its incremental
likelihood estimate,

\[
\omega_t^i = \omega_{t-1}^i\, \hat p(y_t \mid y_{0:t-1}, \theta^i), \qquad
\hat p(y_t \mid y_{0:t-1}) = \sum_i W_{t-1}^i\, \hat p(y_t \mid y_{0:t-1}, \theta^i),
\]

so that \(\log \hat p(y_{0:T-1}) = \sum_t \log \hat p(y_t \mid y_{0:t-1})\) (\(t = 0\):
\(\hat p(y_0 \mid \theta^i)\) under uniform \(W_{-1}\)). The pairs (θ, filter) are an SMC sampler on
the extended targets \(\pi_t(\theta, x^{1:N_x}_{0:t}, a) \propto p(\theta)\, \psi_\theta(x, a)\,
\hat Z_t(\theta, x, a)\), whose θ-marginal is \(p(\theta \mid y_{0:t})\) for any \(N_x\) (the
pseudo-marginal argument). When the θ-ESS falls below ``ess_threshold`` \(\cdot N_\theta\), the
θ-particles are resampled (with their whole filters) and rejuvenated by ``num_mcmc_steps`` PMMH
moves invariant for \(\pi_t\): a Gaussian random walk \(u' = u + L\varepsilon\) on the
unconstrained \(u = T^{-1}(\theta)\) (:mod:`samplers.parameters`, Jacobian included),
\(LL^\top = s^2 (2.38^2/d)\, \hat C\) with \(\hat C\) the weighted covariance of the θ-population
before resampling; the proposal's \(\hat Z_t(\theta')\) is a fresh particle filter on \(y_{0:t}\),
accepted with probability

\[
\min\left(1, \frac{p_U(u')\, \hat Z_t(\theta')}{p_U(u)\, \hat Z_t(\theta)}\right),
\]

and an accepted θ' takes the fresh filter's state (particles, log-weights, \(\hat Z_t\)) to continue
from \(t\). The fresh filter is a ``lax.while_loop`` over the steps \(1..t\) with \(t\) traced: its
cost is proportional to \(t\), not to the horizon \(T\).

Growing \(N_x\). The pseudo-marginal moves mix badly when \(\hat Z_t\) gets noisy (its variance
grows with \(t\)); when a rejuvenation's acceptance rate falls below ``acceptance_threshold``,
\(N_x\) is doubled by the **exchange step**: every θ-particle gets a fresh filter with \(2N_x\)
particles on \(y_{0:t}\) and its weight is multiplied by \(\hat Z^{2N_x}_t(\theta) / \hat
Z^{N_x}_t(\theta)\), a generalised importance sampling step from \(\pi_t^{N_x}\) to
\(\pi_t^{2N_x}\). Both have the normalising constant \(p(y_{0:t})\), so the step's factor \(\sum_i
W^i \hat Z^{2N_x}_i / \hat Z^{N_x}_i\) estimates 1; it enters the log-evidence increment of \(t\),
so that the evidence estimate stays an SMC sampler's product of increments. Array shapes depend on
\(N_x\), so this cannot happen inside one compiled program: the Python driver of :func:`smc2` runs a
compiled loop over \(t\) (one program per \(N_x\)) that stops after a rejuvenation whose acceptance
is below the threshold, runs the (compiled) exchange step with \(2N_x\), and resumes with the
program compiled for \(2N_x\). \(N_x\) never exceeds ``max_num_x_particles``, and is not doubled
after the last observation.

Reference: N. Chopin, P. E. Jacob, O. Papaspiliopoulos (2013). SMC²: an efficient algorithm for
sequential analysis of state space models. *JRSS B* 75(3), 397–426.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree
from ppl import progress as progress_bar
from ppl.random import fast_key
from ppl.state_space import StateSpaceModel, _as_observations, _horizon
from samplers import smc_kernel
from samplers.parameters import ParameterSpace, make_params_fn, place_params
from samplers.pmmh import STUCK_ACCEPTANCE
from samplers.resampling import AbstractResampling, get_resampling
from samplers.smc import LOW_FINAL_ESS
from samplers.smc_kernel import SMCState
from samplers.tempering import population_scale

__all__ = ["SMC2State", "SMC2Result", "smc2", "warn_failures"]


class SMC2State(NamedTuple):
    r"""The θ-population of SMC² after assimilating \(y_{0:t-1}\) (``t`` is the next time).

    Attributes:
        u: unconstrained θ-particles \(u^i = T^{-1}(\theta^i)\), [Nθ, d].
        log_prior: \(\log p_U(u^i)\), prior density of \(u\) (Jacobian included), [Nθ].
        log_weights: normalised θ-log-weights \(\log W^i\), [Nθ].
        filters: the θ-particles' filters, an :class:`~samplers.smc_kernel.SMCState` whose leaves
            have a leading θ axis (particles [Nθ, Nx, ...]; ``log_evidence`` is
            \(\log \hat Z_{t-1}(\theta^i)\)).
        t: index of the next observation to assimilate.
        num_nan_potentials: NaN log-potentials met by the θ-particles' filters (each treated as
            \(-\infty\) by the kernel).
        num_nonfinite: likelihood estimates (incremental, proposals', exchange) that were
            \(-\infty\) or NaN (the θ-particle gets weight 0; the proposal is rejected).
        extinct: at some time every θ-particle had zero weight.
    """

    u: Float[Array, "Ntheta d"]
    log_prior: Float[Array, " Ntheta"]
    log_weights: Float[Array, " Ntheta"]
    filters: SMCState
    t: Int[Array, ""]
    num_nan_potentials: Int[Array, ""]
    num_nonfinite: Int[Array, ""]
    extinct: Bool[Array, ""]


class SMC2Result(NamedTuple):
    r"""Output of :func:`smc2` (per-time arrays have length \(T\), the number of observations).

    Attributes:
        params: final θ-particles, dict of constrained values, leaves [Nθ, ...], weighted by
            ``exp(log_weights)``: they approximate \(p(\theta \mid y_{0:T-1})\).
        log_weights: their normalised log-weights, [Nθ].
        log_evidence: \(\log \hat p(y_{0:T-1}) = \sum_t\) ``log_evidence_increments[t]``.
        log_evidence_increments: \(\log \hat p(y_t \mid y_{0:t-1})\) per \(t\) (where \(N_x\) was
            doubled at \(t\), including the exchange factor, an estimate of 1).
        ess: θ-ESS after the reweighting at each \(t\) (before any resampling).
        resampled: whether the θ-particles were resampled and rejuvenated at \(t\).
        acceptance_rate: PMMH acceptance rate of the rejuvenation at \(t\) (NaN where none).
        num_x_particles: \(N_x\) of the filters after time \(t\).
        exchanged: whether \(N_x\) was doubled (exchange step) after the rejuvenation at \(t\).
        num_nan_potentials: NaN log-potentials met by the θ-particles' filters.
        num_nonfinite: likelihood estimates that were \(-\infty\) or NaN (weight 0 / rejected).
        extinct: at some time every θ-particle had zero weight (``log_evidence`` is \(-\infty\)).
        filters: the final filters (leaves [Nθ, Nx, ...]), e.g. to continue filtering or predict.
    """

    params: dict
    log_weights: Float[Array, " Ntheta"]
    log_evidence: Float[Array, ""]
    log_evidence_increments: Float[Array, " T"]
    ess: Float[Array, " T"]
    resampled: Bool[Array, " T"]
    acceptance_rate: Float[Array, " T"]
    num_x_particles: Int[Array, " T"]
    exchanged: Bool[Array, " T"]
    num_nan_potentials: Int[Array, ""]
    num_nonfinite: Int[Array, ""]
    extinct: Bool[Array, ""]
    filters: SMCState

    def to_inference_data(self, key: PRNGKeyArray | None = None):
        """arviz ``InferenceData``: ``posterior`` holds the Nθ θ-particles resampled to equal
        weights (one chain; systematic, with ``key``, default ``jax.random.key(0)``), and the
        group ``smc_path`` the per-time θ-ESS, log-evidence increments, rejuvenations, their
        acceptance rates and \\(N_x\\) (dimension ``step`` = observation index), with
        ``log_evidence`` and the failure counts as attributes. Not under ``jit``."""
        from samplers.mcmc_output import smc_inference_data

        path = {"ess": self.ess, "log_evidence_increment": self.log_evidence_increments,
                "resampled": self.resampled, "acceptance_rate": self.acceptance_rate,
                "num_x_particles": self.num_x_particles, "exchanged": self.exchanged}
        return smc_inference_data(
            jax.random.key(0) if key is None else key, self.params, self.log_weights, path,
            {"log_evidence": float(self.log_evidence),
             "num_nan_potentials": int(self.num_nan_potentials),
             "num_nonfinite": int(self.num_nonfinite), "extinct": int(bool(self.extinct))})


class _Records(NamedTuple):
    ess: Array
    increments: Array
    resampled: Array
    acceptance: Array


class _Config(NamedTuple):
    num_theta: int
    num_x: int
    num_mcmc_steps: int
    ess_threshold: float
    x_ess_threshold: float
    resampling: AbstractResampling
    x_resampling: AbstractResampling
    horizon: int
    progress: bool


class _Hooks(NamedTuple):
    """Dynamic settings of the rejuvenation (arrays: changing them recompiles nothing); only the
    tests change ``jacobian``, to build a broken variant."""

    jacobian: Array  # weight of log|det J| in the walk's target (1: correct)
    scale: Array  # the factor s of the random walk's covariance


# ------------------------------------------------------------------------------------------------
# pieces of the compiled programs
# ------------------------------------------------------------------------------------------------


def _model(ssm, observations, to_params, theta):
    params = place_params(ssm.params, theta) if to_params is None else to_params(theta)
    return ssm.with_params(params).bootstrap(observations)


def _finite_or_neg_inf(x):
    return jnp.where(jnp.isfinite(x) | (x == -jnp.inf), x, -jnp.inf)


def _log_target(space: ParameterSpace, hooks: _Hooks, u):
    r"""\(\log p(T(u)) + w \log|\det J_T(u)|\) (\(w = 1\) unless a test breaks it) and θ."""
    lp_u, theta = space.log_density_unconstrained(u)
    lp_theta = space.log_prior(theta)
    return _finite_or_neg_inf(lp_theta + hooks.jacobian * (lp_u - lp_theta)), theta


def _filter_to(key, model, t, cfg: _Config) -> SMCState:
    r"""A fresh bootstrap filter with ``cfg.num_x`` particles on \(y_{0:t}\) (``t`` traced):
    ``init`` then a ``while_loop`` of kernel steps \(1..t\)."""
    k0, k_loop = jax.random.split(key)
    state = smc_kernel.init(k0, model, cfg.num_x)

    def body(c):
        s, st = c
        st, _ = smc_kernel.step(jax.random.fold_in(k_loop, s), st, model,
                                resampling=cfg.x_resampling, ess_threshold=cfg.x_ess_threshold)
        return s + 1, st

    _, state = jax.lax.while_loop(lambda c: c[0] <= t, body, (jnp.asarray(1, jnp.int32), state))
    return state


def _fresh_filters(key, thetas, t, ssm, observations, to_params, cfg):
    n = jax.tree.leaves(thetas)[0].shape[0]

    def run(k, theta):
        return _filter_to(k, _model(ssm, observations, to_params, theta), t, cfg)

    return jax.vmap(run)(jax.random.split(key, n), thetas)


def _log_z(filters: SMCState):
    return _finite_or_neg_inf(jnp.where(filters.extinct, -jnp.inf, filters.log_evidence))


def _rejuvenate(key, t, u, log_prior, filters, log_w, ssm, observations, space, to_params,
                hooks: _Hooks, cfg: _Config):
    """Resample the θ-particles (with their filters) and apply ``num_mcmc_steps`` PMMH moves."""
    n, d = u.shape
    k_res, k_mcmc = jax.random.split(key)
    cov, _ = population_scale(u, log_w, 0.01 * jnp.eye(d, dtype=u.dtype), jnp.ones((), u.dtype),
                              jnp.full((), jnp.nan, u.dtype), 0.0)
    chol = jnp.linalg.cholesky(hooks.scale**2 * 2.38**2 / d * cov)
    chol = jnp.where(jnp.all(jnp.isfinite(chol)), chol, 0.1 * jnp.eye(d, dtype=u.dtype))
    a = cfg.resampling(k_res, log_w, n).astype(jnp.int32)
    u, log_prior, filters = tree.gather((u, log_prior, filters), a)

    def mh(i, c):
        u, lp, filters, n_acc, n_nan, n_bad = c
        k_prop, k_pf, k_acc = jax.random.split(jax.random.fold_in(k_mcmc, i), 3)
        u_new = u + jax.random.normal(k_prop, u.shape, u.dtype) @ chol.T
        lp_new, theta_new = jax.vmap(lambda x: _log_target(space, hooks, x))(u_new)
        fresh = _fresh_filters(k_pf, theta_new, t, ssm, observations, to_params, cfg)
        ll_new, ll_old = _log_z(fresh), _log_z(filters)
        log_alpha = (lp_new + ll_new) - (lp + ll_old)
        log_alpha = jnp.where(jnp.isnan(log_alpha), -jnp.inf, log_alpha)
        accept = jnp.log(jax.random.uniform(k_acc, (n,))) < log_alpha
        # a state of zero (estimated) density moves to any finite proposal (as in PMMH)
        accept = accept | (~jnp.isfinite(lp + ll_old) & jnp.isfinite(lp_new + ll_new))
        u = jnp.where(accept[:, None], u_new, u)
        lp = jnp.where(accept, lp_new, lp)
        filters = tree.where_rows(accept, fresh, filters)
        n_nan = n_nan + jnp.sum(jnp.where(accept, fresh.num_nan_potentials, 0))
        n_bad = n_bad + jnp.sum((~jnp.isfinite(ll_new)).astype(jnp.int32))
        return u, lp, filters, n_acc + jnp.sum(accept.astype(jnp.int32)), n_nan, n_bad

    zero = jnp.asarray(0, jnp.int32)
    u, log_prior, filters, n_acc, n_nan, n_bad = jax.lax.fori_loop(
        0, cfg.num_mcmc_steps, mh, (u, log_prior, filters, zero, zero, zero))
    rate = n_acc.astype(u.dtype) / (n * cfg.num_mcmc_steps)
    return u, log_prior, filters, jnp.full((n,), -math.log(n), log_w.dtype), rate, n_nan, n_bad


@eqx.filter_jit
def _init(key, ssm, observations, space, to_params, hooks, cfg: _Config):
    r"""θ ~ prior and a filter on \(y_0\) for each (the state before the loop's time 0)."""
    k_theta, k_pf = jax.random.split(key)
    theta = space.sample(k_theta, (cfg.num_theta,))
    u = jax.vmap(space.unconstrain)(theta)
    lp, theta = jax.vmap(lambda x: _log_target(space, hooks, x))(u)
    filters = _fresh_filters(k_pf, theta, jnp.asarray(0, jnp.int32), ssm, observations, to_params,
                             cfg)
    n = cfg.num_theta
    return SMC2State(u, lp, jnp.full((n,), -math.log(n), u.dtype), filters,
                     jnp.asarray(0, jnp.int32), jnp.sum(filters.num_nan_potentials),
                     jnp.asarray(0, jnp.int32), jnp.asarray(False))


@eqx.filter_jit
def _segment(key, state: SMC2State, records: _Records, ssm, observations, space, to_params,
             hooks: _Hooks, acceptance_threshold, can_grow, cfg: _Config):
    """Times ``state.t, ..., T - 1`` until the end, or until a rejuvenation's acceptance falls
    below ``acceptance_threshold`` while ``can_grow`` (then ``stop`` is True)."""
    n = cfg.num_theta

    def advance(k, u, filters):
        def one(k_i, u_i, st):
            m = _model(ssm, observations, to_params, space.constrain(u_i))
            return smc_kernel.step(k_i, st, m, resampling=cfg.x_resampling,
                                   ess_threshold=cfg.x_ess_threshold)

        new, info = jax.vmap(one)(jax.random.split(k, n), u, filters)
        return new, info.log_evidence_increment, jnp.sum(info.num_nan_potentials)

    def body(c):
        st, rec, _ = c
        t = st.t
        if cfg.progress:
            progress_bar.tick(t + 1, progress_bar.every(cfg.horizon))
        k_adv, k_rej = jax.random.split(jax.random.fold_in(key, t))
        filters, incs, n_nan = jax.lax.cond(
            t == 0,
            lambda: (st.filters, st.filters.log_evidence, jnp.asarray(0, jnp.int32)),
            lambda: advance(k_adv, st.u, st.filters),
        )
        n_bad = jnp.sum((~jnp.isfinite(incs)).astype(jnp.int32))
        log_w, inc, dead, ess, _ = smc_kernel.reweight(st.log_weights, _finite_or_neg_inf(incs))
        do = (ess < cfg.ess_threshold * n) & ~dead

        def move(_):
            return _rejuvenate(k_rej, t, st.u, st.log_prior, filters, log_w, ssm, observations,
                               space, to_params, hooks, cfg)

        def keep(_):
            z = jnp.asarray(0, jnp.int32)
            return st.u, st.log_prior, filters, log_w, jnp.full((), jnp.nan, log_w.dtype), z, z

        u, lp, filters, log_w, rate, m_nan, m_bad = jax.lax.cond(do, move, keep, None)
        new = SMC2State(u, lp, log_w, filters, t + 1, st.num_nan_potentials + n_nan + m_nan,
                        st.num_nonfinite + n_bad + m_bad, st.extinct | dead)
        rec = _Records(rec.ess.at[t].set(ess), rec.increments.at[t].set(inc),
                       rec.resampled.at[t].set(do), rec.acceptance.at[t].set(rate))
        stop = do & (rate < acceptance_threshold) & can_grow
        return new, rec, stop

    state, records, stop = jax.lax.while_loop(
        lambda c: (c[0].t < cfg.horizon) & ~c[2], body, (state, records, jnp.asarray(False)))
    return state, records, stop, jax.vmap(space.constrain)(state.u)


@eqx.filter_jit
def _exchange(key, state: SMC2State, records: _Records, ssm, observations, space, to_params,
              cfg: _Config):
    r"""Exchange step at the last assimilated time: fresh filters with ``cfg.num_x`` particles and
    θ-weights times \(\hat Z^{\mathrm{new}}_t / \hat Z^{\mathrm{old}}_t\)."""
    t = state.t - 1
    theta = jax.vmap(space.constrain)(state.u)
    fresh = _fresh_filters(key, theta, t, ssm, observations, to_params, cfg)
    new, old = _log_z(fresh), _log_z(state.filters)
    ratio = jnp.where(jnp.isfinite(old), new - old, -jnp.inf)
    log_w, inc, dead, _, _ = smc_kernel.reweight(state.log_weights, ratio)
    state = state._replace(
        filters=fresh, log_weights=log_w,
        num_nan_potentials=state.num_nan_potentials + jnp.sum(fresh.num_nan_potentials),
        num_nonfinite=state.num_nonfinite + jnp.sum((~jnp.isfinite(new)).astype(jnp.int32)),
        extinct=state.extinct | dead,
    )
    return state, records._replace(increments=records.increments.at[t].add(inc))


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------


def smc2(
    key: PRNGKeyArray,
    ssm: StateSpaceModel,
    observations: PyTree,
    prior: Mapping[str, Any],
    *,
    num_theta_particles: int,
    num_x_particles: int,
    num_mcmc_steps: int = 3,
    ess_threshold: float = 0.5,
    acceptance_threshold: float = 0.2,
    max_num_x_particles: int | None = None,
    params_fn: Callable | None = None,
    scale: float = 1.0,
    resampling: str | AbstractResampling = "systematic",
    x_resampling: str | AbstractResampling = "systematic",
    x_ess_threshold: float = 0.5,
    progress: bool = True,
    _broken: str | None = None,
) -> SMC2Result:
    r"""SMC² on a state-space model with unknown parameters θ (module docstring).

    Args:
        key: PRNG key.
        ssm: the state-space model; θ enters as ``ssm.with_params(params_fn(theta))`` (default:
            the named fields of ``ssm.params`` replaced), as in :func:`samplers.pmmh.pmmh`.
        observations: \(y_{0:T-1}\), leading time axis.
        prior: ``{name: numpyro Distribution}``.
        num_theta_particles: \(N_\theta \ge 2\).
        num_x_particles: initial \(N_x\) of each θ-particle's bootstrap filter.
        num_mcmc_steps: PMMH moves per rejuvenation.
        ess_threshold: resample-move the θ-particles when their ESS \(<\) this \(\cdot N_\theta\).
        acceptance_threshold: double \(N_x\) (exchange step) after a rejuvenation whose acceptance
            rate is below this (Chopin et al. use 0.2); 0 never doubles.
        max_num_x_particles: cap on \(N_x\) (default \(16 N_x\)).
        params_fn: ``params_fn(theta) -> model params`` (optional).
        scale: factor \(s\) of the random walk's covariance \(s^2 (2.38^2/d)\, \hat C\).
        resampling: θ-resampling scheme; ``x_resampling``, ``x_ess_threshold``: the filters'.
        progress: a progress bar over time (stderr; eager calls).
        _broken: tests only: ``"no_jacobian"`` drops the Jacobian from the walk's target (a
            broken variant that the tests must reject).

    Returns:
        :class:`SMC2Result`. Called eagerly it warns (``RuntimeWarning``) about NaN potentials,
        a collapsed θ-ESS, a rejuvenation accepting below 1% or the extinction of every θ-particle.
    """
    checks.prng_key("key", key)
    checks.instance("ssm", ssm, StateSpaceModel)
    n_theta = checks.positive_int("num_theta_particles", num_theta_particles, minimum=2)
    n_x = checks.positive_int("num_x_particles", num_x_particles)
    checks.positive_int("num_mcmc_steps", num_mcmc_steps)
    checks.probability("ess_threshold", ess_threshold)
    checks.probability("acceptance_threshold", acceptance_threshold)
    checks.probability("x_ess_threshold", x_ess_threshold)
    cap = 16 * n_x if max_num_x_particles is None else max_num_x_particles
    checks.positive_int("max_num_x_particles", cap, minimum=n_x)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    if _broken not in (None, "no_jacobian"):
        raise ValueError(f"unknown _broken variant {_broken!r}")
    # the checks of ssm.bootstrap: non-finite values and the time axis now, the shape of y_t when
    # _init is traced (an eager bootstrap would trace its shape check at every call)
    observations = _as_observations(observations)
    horizon = _horizon(observations)
    space = ParameterSpace(prior)
    to_params = make_params_fn(ssm.params, space.names, params_fn)
    hooks = _Hooks(jnp.asarray(0.0 if _broken == "no_jacobian" else 1.0),
                   jnp.asarray(float(scale)))
    cfg = _Config(n_theta, n_x, num_mcmc_steps, float(ess_threshold), float(x_ess_threshold),
                  get_resampling(resampling), get_resampling(x_resampling), horizon, False)
    # the same random streams, an unrolled (fusable) threefry on CPU
    k_init, k_loop, k_exchange = jax.random.split(fast_key(key), 3)
    nan = jnp.full((horizon,), jnp.nan)
    records = _Records(nan, jnp.zeros((horizon,)), jnp.zeros((horizon,), bool), nan)
    nx_history = np.zeros(horizon, np.int32)
    exchanged = np.zeros(horizon, bool)
    state = _init(k_init, ssm, observations, space, to_params, hooks, cfg)
    threshold = jnp.asarray(float(acceptance_threshold))
    enabled = bool(progress) and not progress_bar.is_traced(key, observations, ssm)
    with progress_bar.bar(horizon, "SMC²", enabled) as on:
        cfg = cfg._replace(progress=on)
        while True:
            t_start = int(state.t)
            can_grow = jnp.asarray(2 * cfg.num_x <= cap)
            state, records, stop, params = _segment(
                k_loop, state, records, ssm, observations, space, to_params, hooks, threshold,
                can_grow, cfg)
            t_next = int(state.t)
            nx_history[t_start:t_next] = cfg.num_x
            if not bool(stop) or t_next >= horizon:
                break
            cfg = cfg._replace(num_x=2 * cfg.num_x)
            state, records = _exchange(
                jax.random.fold_in(k_exchange, t_next - 1), state, records, ssm, observations,
                space, to_params, cfg._replace(progress=False))
            nx_history[t_next - 1] = cfg.num_x
            exchanged[t_next - 1] = True
    increments = records.increments
    log_z = float(np.sum(np.asarray(increments, np.float64)))
    result = SMC2Result(
        params=params,
        log_weights=state.log_weights,
        log_evidence=jnp.asarray(-np.inf if bool(state.extinct) else log_z, increments.dtype),
        log_evidence_increments=increments,
        ess=records.ess,
        resampled=records.resampled,
        acceptance_rate=records.acceptance,
        num_x_particles=jnp.asarray(nx_history),
        exchanged=jnp.asarray(exchanged),
        num_nan_potentials=state.num_nan_potentials,
        num_nonfinite=state.num_nonfinite,
        extinct=state.extinct,
        filters=state.filters,
    )
    warn_failures(result)
    return result


def warn_failures(result: SMC2Result) -> None:
    """``RuntimeWarning`` s after an eager call (silent under a transformation) for: NaN
    log-potentials in the filters; a θ-ESS below ``max(1.5, LOW_FINAL_ESS · Nθ)`` at some time;
    a rejuvenation accepting fewer than ``STUCK_ACCEPTANCE`` of its proposals; the extinction of
    every θ-particle."""
    fields = (result.num_nan_potentials, result.ess, result.acceptance_rate, result.extinct)
    if any(isinstance(x, jax.core.Tracer) for x in fields):
        return
    nans = int(result.num_nan_potentials)
    if nans:
        warnings.warn(
            f"SMC²: {nans} log-potential(s) of the θ-particles' filters were NaN and were treated "
            "as -inf (killed x-particles); check the model and the prior's support "
            "(result.num_nan_potentials)", RuntimeWarning, stacklevel=3)
    n = int(jnp.shape(result.log_weights)[0])
    ess = np.asarray(result.ess)
    low = max(1.5, LOW_FINAL_ESS * n)
    bad_t = np.flatnonzero(ess < low)
    if bad_t.size and not bool(result.extinct):
        warnings.warn(
            f"SMC²: the θ-ESS fell to {float(ess[bad_t].min()):.3g} of {n} θ-particles at "
            f"{bad_t.size} time(s) (first t = {int(bad_t[0])}): the θ-population collapsed onto "
            "very few particles; use more θ-particles or more MCMC moves (result.ess)",
            RuntimeWarning, stacklevel=3)
    rate = np.asarray(result.acceptance_rate)
    stuck = np.flatnonzero(rate < STUCK_ACCEPTANCE)  # NaN (no rejuvenation) compares False
    if stuck.size:
        warnings.warn(
            f"SMC²: {stuck.size} rejuvenation(s) accepted fewer than {STUCK_ACCEPTANCE:.0%} of "
            f"their PMMH proposals (t = {stuck[:8].tolist()}, rates "
            f"{[round(float(r), 4) for r in rate[stuck[:8]]]}): the θ-particles were not "
            "rejuvenated; raise num_x_particles / max_num_x_particles or num_mcmc_steps "
            "(result.acceptance_rate)", RuntimeWarning, stacklevel=3)
    if bool(result.extinct):
        warnings.warn(
            "SMC²: every θ-particle had zero weight at some time (all likelihood estimates -inf): "
            "log_evidence is -inf (result.extinct); check the model, the prior and the "
            "observations", RuntimeWarning, stacklevel=3)
