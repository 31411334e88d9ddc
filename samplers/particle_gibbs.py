r"""Conditional SMC and particle Gibbs.

**Conditional SMC** (Andrieu, Doucet & Holenstein 2010) runs the SMC engine with a reference
trajectory \(x^*_{0:T-1}\) pinned in slot 0 (``smc(..., reference=x*)``; the engine's conditional
resamplers keep it) and returns a new trajectory drawn from the particle system:

- by genealogy: \(k \sim W_{T-1}\), then trace the ancestors of particle \(k\);
- with **ancestor sampling** (PGAS; Lindsten, Jordan & Schön 2014): the reference's ancestor at
  each step is redrawn \(\propto W_{t-1}^i\, m_t(x_{t-1}^i, x^*_t)\), so the new path can leave the
  reference at any step and mixing no longer degrades with path degeneracy;
- with **backward sampling** (PG-BS; Whiteley 2010, Lindsten & Schön 2013): the new path is drawn
  by FFBS over the conditional particle system.

The kernel \(x^* \mapsto x'\) leaves the Feynman-Kac path measure (for a state-space model, the
smoothing distribution \(p(x_{0:T-1} \mid y, \theta)\)) invariant for *any* \(N \ge 1\).
:func:`csmc_kernel` is generic over Feynman-Kac models, including variable-horizon ones (an LLM's
reasoning steps).

**Particle Gibbs** for a state-space model alternates \(x \sim \mathrm{CSMC}(\cdot \mid x, \theta)\)
and \(\theta \sim K(\cdot \mid x, y)\), the θ-step being user supplied (e.g. a conjugate draw) or a
blackjax kernel on θ given the path (:func:`blackjax_theta_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree
from ppl import progress as progress_bar
from ppl.feynman_kac import AbstractFeynmanKac
from ppl.state_space import StateSpaceModel
from samplers.parameters import ParameterSpace, make_params_fn, place_params
from samplers.smc import SMCHistory, smc
from samplers.smoothing import _ffbs, _paths_from_indices, trace_genealogy

__all__ = [
    "CSMCOutput",
    "csmc_kernel",
    "ParticleGibbsResult",
    "particle_gibbs",
    "blackjax_theta_update",
    "BlackjaxThetaUpdate",
    "ssm_log_joint",
]


class CSMCOutput(NamedTuple):
    r"""One conditional-SMC update.

    Attributes:
        trajectory: the new trajectory (leaves [T, ...], like the reference).
        indices: [T] particle index of the new trajectory at each step; slot 0 holds the
            reference, so ``indices != 0`` marks the steps where the trajectory moved.
        log_evidence: \(\log \hat Z\) of the conditional run (a diagnostic; not an unbiased estimate).
        num_steps: number of steps run (variable-horizon models).
        extinct: every particle died at some step (the reference is then returned unchanged).
        history: the conditional run's :class:`~samplers.smc.SMCHistory` (slot 0 holds the
            reference); unused fields cost nothing under ``jit``.
    """

    trajectory: PyTree
    indices: Int[Array, " T"]
    log_evidence: Float[Array, ""]
    num_steps: Int[Array, ""]
    extinct: Bool[Array, ""]
    history: SMCHistory


def csmc_kernel(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    reference: PyTree,
    num_particles: int,
    *,
    resampling: Any = "multinomial",
    ess_threshold: float = 1.0,
    ancestor_sampling: bool = False,
    backward_sampling: bool = False,
    max_steps: int | None = None,
    include_potential: bool = False,
) -> CSMCOutput:
    r"""Conditional SMC update of a reference trajectory (leaves [T, ...]) of any Feynman-Kac model.

    Args:
        key: PRNG key.
        model: the Feynman-Kac model.
        reference: the current trajectory \(x^*_{0:T-1}\), pinned in slot 0.
        num_particles: \(N \ge 1\) (\(N = 1\) returns the reference).
        resampling: conditional resampling scheme (multinomial is the textbook choice; the
            engine's conditional systematic/stratified/residual forms are also valid,
            Chopin & Singh 2015).
        ess_threshold: resample when \(\mathrm{ESS} < \mathrm{threshold} \cdot N\) (1: every step).
        ancestor_sampling: PGAS (needs ``model.log_transition``).
        backward_sampling: draw the new path by FFBS (needs ``log_transition``; fixed horizon).
        max_steps: step cap of variable-horizon models.
        include_potential: add \(\log G_t(x_{t-1}, x_t)\) to the backward/ancestor weights of models
            whose potentials depend on \(x_{t-1}\) and whose ``log_transition`` is \(M_t\) alone
            (see :mod:`samplers.smoothing`). Only backward sampling uses it.
    """
    if ancestor_sampling and backward_sampling:
        raise ValueError("choose ancestor_sampling or backward_sampling, not both")
    if backward_sampling and getattr(model, "num_steps", None) is None:
        raise ValueError("backward_sampling needs a fixed-horizon model (num_steps)")
    if reference is None:
        raise ValueError("conditional SMC needs a reference trajectory (leaves [T, ...])")
    k_smc, k_sel = jax.random.split(key)
    res = smc(
        k_smc,
        model,
        num_particles,
        resampling=resampling,
        ess_threshold=ess_threshold,
        max_steps=max_steps,
        reference=reference,
        ancestor_sampling=ancestor_sampling,
        store_history=True,
    )
    if backward_sampling:
        s = _ffbs(k_sel, model, res.history, res.log_weights, 1, include_potential)
        idx = s.indices[0]
        traj = tree.row(s.trajectories, 0)
    else:
        final = jax.random.categorical(k_sel, res.log_weights).astype(jnp.int32)
        b = trace_genealogy(res.history, final[None], res.num_steps)
        idx = b[0]
        traj = tree.row(_paths_from_indices(res.history, b, res.num_steps), 0)
    length = idx.shape[0]
    ref = jax.tree.map(lambda r: r[:length], reference)
    traj = tree.where(~res.extinct, traj, ref)
    idx = jnp.where(res.extinct, 0, idx)
    return CSMCOutput(traj, idx, res.log_evidence, res.num_steps, res.extinct, res.history)


# ------------------------------------------------------------------------------------------------
# State-space particle Gibbs


def ssm_log_joint(
    ssm: StateSpaceModel, trajectory: PyTree, observations: PyTree
) -> Float[Array, ""]:
    r"""Complete-data log-likelihood \(\log p_\theta(x_{0:T-1}, y_{0:T-1})\) of a state-space model."""
    p = ssm.params
    T = tree.leading_size(trajectory, "trajectory")
    x0 = tree.row(trajectory, 0)
    lp = jnp.sum(ssm.initial(p).log_prob(x0))
    ts = jnp.arange(T, dtype=jnp.int32)
    obs = jax.vmap(
        lambda t, x, y: jnp.sum(ssm.observation(p, t, x).log_prob(y))
    )(ts, trajectory, observations)
    if T > 1:
        prev, cur = tree.consecutive(trajectory)
        trans = jax.vmap(lambda t, xp, x: jnp.sum(ssm.transition(p, t, xp).log_prob(x)))(
            ts[1:], prev, cur
        )
        lp = lp + jnp.sum(trans)
    return lp + jnp.sum(obs)


class BlackjaxThetaUpdate(eqx.Module):
    r"""θ-step of particle Gibbs: ``num_steps`` of a blackjax kernel targeting \(p(\theta \mid x, y)\).

    Called as ``update(key, theta, trajectory) -> theta``. A module (its arrays are leaves), so
    that runs differing only in data or fixed parameters share one compiled program.
    """

    ssm: StateSpaceModel
    observations: PyTree
    space: ParameterSpace
    algorithm: Callable = eqx.field(static=True)
    params_fn: Callable | None = eqx.field(static=True, default=None)
    num_steps: int = eqx.field(static=True, default=1)

    def log_density(self, u: Float[Array, " d"], trajectory: PyTree) -> Float[Array, ""]:
        r"""\(\log p(T(u)) + \log |J| + \log p_\theta(x, y)\) on the unconstrained θ."""
        lp, th = self.space.log_density_unconstrained(u)
        params = place_params(self.ssm.params, th) if self.params_fn is None else self.params_fn(th)
        out = lp + ssm_log_joint(self.ssm.with_params(params), trajectory, self.observations)
        return jnp.where(jnp.isnan(out), -jnp.inf, out)

    def __call__(self, key: PRNGKeyArray, theta: Mapping[str, Any], trajectory: PyTree) -> dict:
        alg = self.algorithm(lambda u: self.log_density(u, trajectory))
        state = alg.init(self.space.unconstrain(theta))

        def body(s, k):
            s, _ = alg.step(k, s)
            return s, None

        state, _ = jax.lax.scan(body, state, jax.random.split(key, self.num_steps))
        return self.space.constrain(state.position)


def blackjax_theta_update(
    ssm: StateSpaceModel,
    observations: PyTree,
    prior: Mapping[str, Any],
    algorithm: Callable[[Callable], Any],
    *,
    params_fn: Callable | None = None,
    num_steps: int = 1,
) -> BlackjaxThetaUpdate:
    r"""A θ-step for particle Gibbs: ``num_steps`` of a blackjax kernel targeting \(p(\theta \mid x, y)\).

    ``algorithm(logdensity_fn)`` returns a blackjax ``SamplingAlgorithm`` on the flat
    unconstrained θ (e.g. ``lambda ld: blackjax.normal_random_walk(ld, 0.1 * jnp.ones(d))`` or
    ``lambda ld: blackjax.hmc(ld, 0.05, jnp.ones(d), 10)``); the log density is
    \(\log p(\theta) + \log |J| + \log p_\theta(x, y)\) in the unconstrained space. Define
    ``algorithm`` once and reuse it: it is part of the compiled program's static signature.
    Returns ``update(key, theta, trajectory) -> theta``.
    """
    space = ParameterSpace(prior)
    checks.function("algorithm", algorithm, "algorithm(logdensity_fn) -> SamplingAlgorithm")
    checks.positive_int("num_steps", num_steps)
    make_params_fn(ssm.params, space.names, params_fn)  # validates the names now
    return BlackjaxThetaUpdate(ssm, observations, space, algorithm, params_fn, num_steps)


class ParticleGibbsResult(NamedTuple):
    r"""Output of :func:`particle_gibbs` (chains × draws).

    Attributes:
        params: dict of θ draws, leaves [C, S, ...] (``None`` when θ is fixed).
        trajectories: path draws, leaves [C, S, T, ...] (``None`` if not stored).
        update_rate: [C, T] fraction of sweeps (after warmup) in which \(x_t\) changed.
        log_evidence: [C, S] \(\log \hat Z\) of each conditional run (diagnostic).
        num_extinct: [C] conditional runs in which every particle died.
    """

    params: dict | None
    trajectories: PyTree | None
    update_rate: Float[Array, "C T"]
    log_evidence: Float[Array, "C S"]
    num_extinct: Int[Array, " C"]

    def to_inference_data(self, *, state_name: str = "x", observations=None):
        """arviz ``InferenceData`` (θ and, if stored, the paths with a ``time`` dimension)."""
        from samplers.mcmc_output import to_inference_data

        posterior = dict(self.params or {})
        dims = {}
        if self.trajectories is not None:
            leaves = jax.tree.leaves(self.trajectories)
            names = [state_name] if len(leaves) == 1 else [
                f"{state_name}_{i}" for i in range(len(leaves))
            ]
            for name, leaf in zip(names, leaves):
                posterior[name] = leaf  # [C, S, T, ...]
                dims[name] = ["time"] + [f"{name}_dim_{j}" for j in range(leaf.ndim - 3)]
        obs = None
        if observations is not None:
            obs = {"y": observations}
            dims["y"] = ["time"] + [f"y_dim_{i}" for i in range(jnp.ndim(observations) - 1)]
        return to_inference_data(
            posterior,
            sample_stats={"log_evidence": self.log_evidence},
            observed_data=obs,
            dims=dims,
        )


def particle_gibbs(
    key: PRNGKeyArray,
    ssm: StateSpaceModel,
    observations: PyTree,
    *,
    num_particles: int,
    num_samples: int,
    num_warmup: int = 0,
    num_chains: int = 1,
    theta_update: Callable | None = None,
    prior: Mapping[str, Any] | None = None,
    init_params: Mapping[str, Any] | None = None,
    params_fn: Callable | None = None,
    init_trajectory: PyTree | None = None,
    ancestor_sampling: bool = True,
    backward_sampling: bool = False,
    resampling: Any = "multinomial",
    ess_threshold: float = 1.0,
    thin: int = 1,
    store_trajectories: bool = True,
    progress: bool = True,
) -> ParticleGibbsResult:
    r"""Particle Gibbs for a state-space model, ``num_chains`` chains by ``vmap``, compiled whole.

    One sweep: \(x \sim \mathrm{CSMC}(\cdot \mid x, \theta)\) on the bootstrap filter of ``ssm`` with
    θ, then θ ~ ``theta_update(key, theta, x)`` (any kernel invariant for \(p(\theta \mid x, y)\);
    ``None`` keeps θ fixed, i.e. pure smoothing by PG).

    θ is a dict of named values placed into the model by ``params_fn(theta) -> model params``
    (default: replace the named fields of ``ssm.params``). Initial θ: ``init_params`` (shared or
    with a leading chain axis) or, when ``None``, prior draws (``prior`` needed). The initial path
    is ``init_trajectory`` (leaves [T, ...] or [C, T, ...]) or a draw of the latent Markov chain
    at the initial θ (the first sweeps then move it to the posterior: use ``num_warmup``).

    ``theta_update`` is part of the compiled program's static signature: define it once (or use
    :func:`blackjax_theta_update`, a module whose arrays are traced) to reuse the compilation.
    ``progress``: a progress bar over the sweeps (stderr; only for an eager call).
    """
    checks.positive_int("num_particles", num_particles)
    checks.positive_int("num_samples", num_samples)
    checks.positive_int("num_chains", num_chains)
    checks.positive_int("thin", thin)
    checks.positive_int("num_warmup", num_warmup, minimum=0)
    checks.instance("ssm", ssm, StateSpaceModel)
    if theta_update is not None:
        checks.function("theta_update", theta_update, "theta_update(key, theta, trajectory)")
    k_theta, k_run = jax.random.split(key)

    if theta_update is None:
        if init_params is not None or prior is not None:
            raise ValueError("init_params/prior given without theta_update: θ would stay fixed")
        theta0 = {}
        to_params = _keep_params
    else:
        if prior is not None:
            space = ParameterSpace(prior)
            theta0 = space.broadcast_init(init_params, k_theta, num_chains)
            names = space.names
        else:
            if init_params is None:
                raise ValueError("give init_params or a prior to draw initial θ from")
            theta0 = tree.broadcast_rows({k: jnp.asarray(v) for k, v in init_params.items()},
                                         num_chains)
            names = tuple(init_params)
        to_params = make_params_fn(ssm.params, names, params_fn)

    horizon = tree.leading_size(observations, "observations")
    x0 = None if init_trajectory is None else _broadcast_paths(init_trajectory, horizon, num_chains)

    cfg = _PGConfig(
        num_particles=num_particles,
        num_samples=num_samples,
        num_warmup=num_warmup,
        thin=thin,
        ancestor_sampling=bool(ancestor_sampling),
        backward_sampling=bool(backward_sampling),
        resampling=resampling,
        ess_threshold=float(ess_threshold),
        store=bool(store_trajectories),
        progress=False,
    )
    keys = jax.random.split(k_run, num_chains)
    total = num_warmup + num_samples * thin
    enabled = bool(progress) and not progress_bar.is_traced(key, observations, theta0)
    with progress_bar.bar(total, "particle Gibbs", enabled, unit="sweep") as on:
        out = _pg_run(keys, ssm, observations, theta0, x0, theta_update, to_params, cfg._replace(progress=on))
    theta_s, x_s, moved, log_z, n_ext = out
    denom = max(num_samples * thin, 1)
    return ParticleGibbsResult(
        params=theta_s if theta_update is not None else None,
        trajectories=x_s if store_trajectories else None,
        update_rate=moved / denom,
        log_evidence=log_z,
        num_extinct=n_ext,
    )


class _PGConfig(NamedTuple):
    num_particles: int
    num_samples: int
    num_warmup: int
    thin: int
    ancestor_sampling: bool
    backward_sampling: bool
    resampling: Any
    ess_threshold: float
    store: bool
    progress: bool


def _keep_params(theta):
    raise AssertionError("unreachable")  # marker: θ fixed, the model keeps its params


def _with_theta(ssm, to_params, theta):
    if to_params is _keep_params:
        return ssm
    if to_params is None:
        return ssm.with_params(place_params(ssm.params, theta))
    return ssm.with_params(to_params(theta))


def _broadcast_paths(paths, horizon, num_chains):
    def one(x):
        x = jnp.asarray(x)
        if x.shape[:1] == (horizon,):
            return jnp.broadcast_to(x, (num_chains,) + x.shape)
        if x.shape[:2] == (num_chains, horizon):
            return x
        raise ValueError(
            f"init_trajectory leaves need shape [T={horizon}, ...] or [C={num_chains}, T, ...], "
            f"got {x.shape}"
        )

    return jax.tree.map(one, paths)


def _forward_path(key, model, horizon):
    r"""One path of the Feynman-Kac model's Markov chain \(x_0 \sim M_0\), \(x_t \sim M_t\) (no weighting)."""
    k0, k = jax.random.split(key)
    x0 = model.init(k0, 1)

    def body(x, inp):
        t, kk = inp
        x = model.move(kk, t, x)
        return x, x

    ts = jnp.arange(1, horizon, dtype=jnp.int32)
    _, xs = jax.lax.scan(body, x0, (ts, jax.random.split(k, horizon - 1)))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b[:, 0]], axis=0), x0, xs)


@eqx.filter_jit
def _pg_run(keys, ssm, observations, theta0, x0, theta_update, to_params, cfg: _PGConfig):
    r"""All chains in one program: a single ``scan`` over \(W + S \cdot \mathrm{thin}\) sweeps (the CSMC
    appears once in the program), writing every thin-th sweep after warmup into the output buffers."""
    horizon = tree.leading_size(observations, "observations")
    total = cfg.num_warmup + cfg.num_samples * cfg.thin

    def sweep(theta, x, k):
        k_x, k_th = jax.random.split(k)
        model = _with_theta(ssm, to_params, theta).bootstrap(observations)
        out = csmc_kernel(
            k_x,
            model,
            x,
            cfg.num_particles,
            resampling=cfg.resampling,
            ess_threshold=cfg.ess_threshold,
            ancestor_sampling=cfg.ancestor_sampling,
            backward_sampling=cfg.backward_sampling,
        )
        x = out.trajectory
        if theta_update is not None:
            theta = theta_update(k_th, theta, x)
        return theta, x, out

    def chain(key, theta, x):
        k_path, k_run = jax.random.split(key)
        if x is None:
            model = _with_theta(ssm, to_params, theta).bootstrap(observations)
            x = _forward_path(k_path, model, horizon)

        def buffer(like):
            return tree.buffer(like, cfg.num_samples)

        def body(carry, inp):
            theta, x, moved, n_ext, th_buf, x_buf, lz_buf = carry
            i, k = inp
            if cfg.progress:
                progress_bar.tick(i + 1, progress_bar.every(total))
            theta, x, out = sweep(theta, x, k)
            j = i - cfg.num_warmup
            sampling = j >= 0
            moved = moved + jnp.where(sampling, out.indices != 0, False)
            n_ext = n_ext + (sampling & out.extinct)
            write = sampling & (j % cfg.thin == cfg.thin - 1)
            slot = jnp.clip(j // cfg.thin, 0, cfg.num_samples - 1)

            def put(buf, val):
                return buf.at[slot].set(jnp.where(write, val, buf[slot]))

            th_buf = jax.tree.map(put, th_buf, theta)
            if cfg.store:
                x_buf = jax.tree.map(put, x_buf, x)
            lz_buf = put(lz_buf, out.log_evidence)
            return (theta, x, moved, n_ext, th_buf, x_buf, lz_buf), None

        init = (
            theta,
            x,
            jnp.zeros(horizon, jnp.float32),
            jnp.asarray(0, jnp.int32),
            buffer(theta),
            buffer(x) if cfg.store else None,
            jnp.zeros(cfg.num_samples),
        )
        carry, _ = jax.lax.scan(body, init, (jnp.arange(total), jax.random.split(k_run, total)))
        _, _, moved, n_ext, th_buf, x_buf, lz_buf = carry
        return th_buf, x_buf, moved, lz_buf, n_ext

    return jax.vmap(chain)(keys, theta0, x0)
