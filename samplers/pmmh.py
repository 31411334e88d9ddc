r"""Particle marginal Metropolis-Hastings (PMMH) and adaptive random-walk Metropolis.

PMMH (Andrieu, Doucet & Holenstein 2010) is random-walk Metropolis on θ in which the intractable
likelihood \(p_\theta(y)\) is replaced by the particle filter's unbiased estimate \(\hat Z_\theta\):
accept \(\theta'\) with probability

\[
\min\left(1, \frac{p(\theta')\, \hat Z_{\theta'}\, q(\theta \mid \theta')}
{p(\theta)\, \hat Z_\theta\, q(\theta' \mid \theta)}\right),
\]

keeping \(\hat Z_\theta\) of the current state (it is never refreshed). Because
\(\mathbb{E}[\hat Z_\theta] = p_\theta(y)\), the chain leaves \(p(\theta \mid y)\) exactly invariant
for any number of particles (pseudo-marginal argument, Andrieu & Roberts 2009).

The walk runs on the unconstrained \(u = T^{-1}(\theta)\) (numpyro's ``biject_to`` and its
Jacobian, see :mod:`samplers.parameters`) with a Gaussian proposal \(u' = u + L\varepsilon\),
\(LL^\top = \Sigma\). With ``adapt=True`` \(\Sigma\) is learned during warmup (Haario, Saksman &
Tamminen 2001; Andrieu & Thoms 2008): \(\Sigma = s^2 (2.38^2 / d)\, \hat C\) with \(\hat C\) a
covariance estimate of the warmup states and \(s\) a global scale tuned towards a target acceptance
rate (two windows, as in Stan's warmup: adaptive Metropolis first, then the scale for the fixed
\(\hat C\)), then frozen for the sampling phase, so the kept draws come from a fixed
Metropolis-Hastings kernel.

Everything — warmup, sampling, all particle filters — is one compiled program, and many chains
run in it by ``vmap``.
"""

from __future__ import annotations

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
from ppl.state_space import StateSpaceModel
from samplers.parameters import ParameterSpace, make_params_fn, place_params
from samplers.smc import smc

__all__ = [
    "MCMCResult",
    "ParticleFilterLikelihood",
    "random_walk_metropolis",
    "pmmh",
]


class MCMCResult(NamedTuple):
    r"""Chains of (pseudo-marginal) random-walk Metropolis, leading axes [chain, draw].

    Attributes:
        params: dict of constrained θ draws, leaves [C, S, ...].
        log_likelihood: [C, S] log-likelihood (estimate) at the current state.
        log_prior: [C, S] \(\log p(\theta)\) at the current state.
        accepted: [C, S] whether the move into this draw was accepted.
        acceptance_rate: [C] acceptance rate of the sampling phase.
        warmup_acceptance_rate: [C] acceptance rate of the warmup phase (NaN without warmup).
        proposal_cov: [C, d, d] covariance of the (frozen) unconstrained proposal.
        num_nonfinite: [C] proposals whose log-likelihood was NaN or −inf (rejected; counted).
    """

    params: dict
    log_likelihood: Float[Array, "C S"]
    log_prior: Float[Array, "C S"]
    accepted: Bool[Array, "C S"]
    acceptance_rate: Float[Array, " C"]
    warmup_acceptance_rate: Float[Array, " C"]
    proposal_cov: Float[Array, "C d d"]
    num_nonfinite: Int[Array, " C"]

    def to_inference_data(self, observations=None):
        """arviz ``InferenceData``: θ in ``posterior``; log-likelihood, prior and acceptance in
        ``sample_stats``; ``observations`` (optional, leading time axis) in ``observed_data``."""
        from samplers.mcmc_output import to_inference_data

        obs = None if observations is None else {"y": observations}
        dims = None
        if observations is not None:
            dims = {"y": ["time"] + [f"y_dim_{i}" for i in range(jnp.ndim(observations) - 1)]}
        return to_inference_data(
            self.params,
            sample_stats={
                "log_likelihood_estimate": self.log_likelihood,
                "log_prior": self.log_prior,
                "lp": self.log_likelihood + self.log_prior,
                "accepted": self.accepted,
            },
            observed_data=obs,
            dims=dims,
        )


class ParticleFilterLikelihood(eqx.Module):
    r"""\(\log \hat Z_\theta\) of a particle filter on a state-space model, ``loglik(key, theta)``.

    θ (a dict) is placed into the model with ``params_fn`` (default: replace the named fields of
    ``ssm.params``); ``proposal`` (optional) gives a guided filter instead of the bootstrap.
    """

    ssm: StateSpaceModel
    observations: PyTree
    num_particles: int = eqx.field(static=True)
    params_fn: Callable | None = eqx.field(static=True, default=None)
    resampling: Any = eqx.field(static=True, default="systematic")
    ess_threshold: float = eqx.field(static=True, default=0.5)
    proposal: Callable | None = eqx.field(static=True, default=None)

    def model(self, theta: Mapping[str, Any]):
        if self.params_fn is None:
            params = place_params(self.ssm.params, theta)
        else:
            params = self.params_fn(theta)
        m = self.ssm.with_params(params)
        if self.proposal is None:
            return m.bootstrap(self.observations)
        return m.guided(self.observations, self.proposal)

    def __call__(self, key: PRNGKeyArray, theta: Mapping[str, Any]) -> Float[Array, ""]:
        res = smc(
            key,
            self.model(theta),
            self.num_particles,
            resampling=self.resampling,
            ess_threshold=self.ess_threshold,
        )
        return res.log_evidence


class _RWConfig(NamedTuple):
    num_samples: int
    num_warmup: int
    adapt: bool
    scale: float
    adapt_start: int
    target_acceptance: float | None
    progress: bool


class _ChainState(NamedTuple):
    u: Array
    log_lik: Array
    log_prior: Array  # log prior density in u (with Jacobian)
    theta: dict


def random_walk_metropolis(
    key: PRNGKeyArray,
    log_likelihood: Callable,
    prior: Mapping[str, Any],
    *,
    num_samples: int,
    num_warmup: int = 500,
    num_chains: int = 1,
    init_params: Mapping[str, Any] | None = None,
    proposal_cov: Float[Array, "d d"] | None = None,
    adapt: bool = True,
    scale: float = 1.0,
    target_acceptance: float | None = 0.234,
    progress: bool = True,
    _desc: str = "random-walk Metropolis",
) -> MCMCResult:
    r"""Adaptive random-walk Metropolis on θ with a (possibly estimated) log-likelihood.

    ``log_likelihood(key, theta) -> scalar``: exact (e.g. a Kalman filter; the key is then unused)
    or an unbiased-in-exp estimate (a particle filter: PMMH). ``prior``: dict of numpyro
    distributions. ``init_params``: dict of constrained values (shared, or with a leading
    ``num_chains`` axis), or ``None`` for prior draws. ``proposal_cov``: initial proposal covariance
    in the unconstrained space (default \(0.1^2 I\)); with ``adapt`` it is replaced during warmup by
    \(s^2 \cdot \mathrm{scale}^2 \cdot 2.38^2/d\) times a running covariance of the warmup states, the
    global factor \(s\) being tuned towards ``target_acceptance`` (``None``: \(s = 1\)). The proposal
    is frozen after warmup. ``progress``: a progress bar over the iterations (stderr; only for an eager call).
    """
    if target_acceptance is not None:
        checks.probability("target_acceptance", target_acceptance, strict=True)
    checks.function("log_likelihood", log_likelihood, "log_likelihood(key, theta) -> scalar")
    checks.positive_int("num_samples", num_samples)
    checks.positive_int("num_chains", num_chains)
    checks.positive_int("num_warmup", num_warmup, minimum=0)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    space = ParameterSpace(prior)
    d = space.dim
    if proposal_cov is None:
        proposal_cov = 0.01 * jnp.eye(d)
    proposal_cov = jnp.asarray(proposal_cov, jnp.float32)
    if proposal_cov.shape != (d, d):
        raise ValueError(
            f"proposal_cov must be [{d}, {d}] (the unconstrained dimension), got "
            f"{proposal_cov.shape}"
        )
    if not bool(jnp.all(jnp.isfinite(jnp.linalg.cholesky(proposal_cov)))):
        raise ValueError("proposal_cov must be symmetric positive definite")
    k_init, k_run = jax.random.split(key)
    theta0 = space.broadcast_init(init_params, k_init, num_chains)
    u0 = jax.vmap(space.unconstrain)(theta0)
    cfg = _RWConfig(
        num_samples=num_samples,
        num_warmup=num_warmup,
        adapt=bool(adapt),
        scale=float(scale),
        adapt_start=max(min(50, num_warmup // 8), 2 * d),
        target_acceptance=None if target_acceptance is None else float(target_acceptance),
        progress=False,
    )
    keys = jax.random.split(k_run, num_chains)
    total = 1 + num_warmup + num_samples
    with progress_bar.bar(total, _desc, bool(progress) and not progress_bar.is_traced(key, u0)) as on:
        result = _rw_run(keys, u0, space, log_likelihood, proposal_cov, cfg._replace(progress=on))
    warn_stuck_chains(result)
    return result


# A chain whose sampling phase accepted fewer than this fraction of its proposals is "stuck".
STUCK_ACCEPTANCE = 0.01


def warn_stuck_chains(result: MCMCResult) -> None:
    """``RuntimeWarning`` (after an eager call; silent under a transformation) naming the chains
    whose acceptance rate is below ``STUCK_ACCEPTANCE``: their draws repeat one value and do not
    represent the posterior."""
    rate = result.acceptance_rate
    if isinstance(rate, jax.core.Tracer) or jnp.ndim(rate) != 1:
        return
    rate = np.asarray(rate)
    stuck = np.flatnonzero(~(rate >= STUCK_ACCEPTANCE))
    if stuck.size:
        warnings.warn(
            f"random-walk Metropolis / PMMH: {stuck.size} of {rate.size} chain(s) accepted fewer "
            f"than {STUCK_ACCEPTANCE:.0%} of their proposals (chains {stuck[:8].tolist()}, rates "
            f"{[round(float(r), 4) for r in rate[stuck[:8]]]}): they are stuck. With PMMH this usually "
            "means a noisy likelihood estimate (use more particles: the log-likelihood's standard "
            "deviation should be about 1) or a proposal far too wide (result.acceptance_rate)",
            RuntimeWarning, stacklevel=3,
        )


def pmmh(
    key: PRNGKeyArray,
    ssm: StateSpaceModel,
    observations: PyTree,
    prior: Mapping[str, Any],
    *,
    num_particles: int,
    num_samples: int,
    num_warmup: int = 500,
    num_chains: int = 1,
    init_params: Mapping[str, Any] | None = None,
    params_fn: Callable | None = None,
    proposal_cov: Float[Array, "d d"] | None = None,
    adapt: bool = True,
    scale: float = 1.0,
    target_acceptance: float | None = 0.15,
    resampling: Any = "systematic",
    ess_threshold: float = 0.5,
    proposal: Callable | None = None,
    progress: bool = True,
) -> MCMCResult:
    r"""PMMH for the parameters θ of a state-space model (``num_chains`` chains by ``vmap``).

    The likelihood estimate is \(\log \hat Z\) of a particle filter (bootstrap, or guided with
    ``proposal``) with ``num_particles`` particles, ``resampling`` and ``ess_threshold``; θ enters
    the model through ``ssm.with_params(params_fn(theta))``. See
    :func:`random_walk_metropolis` for the chain's arguments; the default target acceptance
    0.15 reflects the optimal scaling of PMMH with a noisy likelihood (Sherlock, Thiery, Roberts
    & Rosenthal 2015).
    """
    checks.instance("ssm", ssm, StateSpaceModel)
    checks.positive_int("num_particles", num_particles)
    space = ParameterSpace(prior)
    to_params = make_params_fn(ssm.params, space.names, params_fn)
    loglik = ParticleFilterLikelihood(
        ssm, observations, num_particles, to_params, resampling, float(ess_threshold), proposal
    )
    return random_walk_metropolis(
        key,
        loglik,
        prior,
        num_samples=num_samples,
        num_warmup=num_warmup,
        num_chains=num_chains,
        init_params=init_params,
        proposal_cov=proposal_cov,
        adapt=adapt,
        scale=scale,
        target_acceptance=target_acceptance,
        progress=progress,
        _desc="PMMH",
    )


def _finite_or_neg_inf(x):
    return jnp.where(jnp.isfinite(x) | (x == -jnp.inf), x, -jnp.inf)


class _Adaptation(NamedTuple):
    chol: Array  # Cholesky factor of the current proposal covariance
    mean: Array  # running mean (window 1)
    cov: Array  # running covariance (window 1)
    log_s: Array  # global log-scale
    w_n: Array  # Welford count, mean and M2 of the second quarter of the warmup
    w_mean: Array
    w_m2: Array
    fixed: Array  # the covariance estimate used in window 2


@eqx.filter_jit
def _rw_run(keys, u0, space: ParameterSpace, log_likelihood, cov0, cfg: _RWConfig):
    """All chains, one compiled program. A single ``scan`` over 1 + W + S iterations (the first
    evaluates the initial point, the next W adapt, the last S sample), so that the particle filter
    appears once in the program (compile time)."""
    d = u0.shape[-1]
    opt = cfg.scale**2 * 2.38**2 / d
    warm_n = cfg.num_warmup
    half = warm_n // 2
    total = 1 + warm_n + cfg.num_samples

    def evaluate(key, u):
        lp, theta = space.log_density_unconstrained(u)
        lp = _finite_or_neg_inf(lp)
        ll = jax.lax.cond(
            jnp.isfinite(lp),
            lambda: jnp.asarray(log_likelihood(key, theta), jnp.float32),
            lambda: jnp.asarray(-jnp.inf, jnp.float32),
        )
        return _ChainState(u, _finite_or_neg_inf(ll), lp, theta), ~jnp.isfinite(ll)

    def adapt(ad: _Adaptation, i, u, alpha):
        r"""Window 1 (first half of warmup): adaptive Metropolis with a running covariance
        \(\hat C_i = (1 - \gamma_i) \hat C_{i-1} + \gamma_i (u_i - \mu_i)(u_i - \mu_i)^\top\),
        \(\gamma_i = (i + 2)^{-0.6}\) (Andrieu & Thoms 2008, Alg. 4), while its second half feeds a
        plain covariance estimate. Window 2: that estimate, fixed (shrunk towards \(10^{-3} I\) as in
        Stan), with the global scale \(s\) tuned by Robbins-Monro,
        \(\log s \leftarrow \log s + \gamma (\alpha - \alpha^*)\), so that the frozen proposal's scale
        fits it."""
        first = i < half
        g = jnp.where(first, (i + 2.0) ** -0.6, (i - half + 2.0) ** -0.6)
        mean = (1.0 - g) * ad.mean + g * u
        dev = u - mean
        cov = (1.0 - g) * ad.cov + g * jnp.outer(dev, dev)
        log_s = ad.log_s
        if cfg.target_acceptance is not None:
            log_s = log_s + g * (alpha - cfg.target_acceptance)
        collect = (i >= half // 2) & first
        w_n = ad.w_n + collect
        delta = u - ad.w_mean
        w_mean = jnp.where(collect, ad.w_mean + delta / jnp.maximum(w_n, 1), ad.w_mean)
        w_m2 = jnp.where(collect, ad.w_m2 + jnp.outer(delta, u - w_mean), ad.w_m2)
        n = w_n.astype(jnp.float32)
        est = w_m2 / jnp.maximum(n - 1.0, 1.0)
        est = (n / (n + 5.0)) * est + 1e-3 * (5.0 / (n + 5.0)) * jnp.eye(d)
        switch = (i == half - 1) & (w_n >= 2)
        fixed = jnp.where(switch, 0.5 * (est + est.T), ad.fixed)
        log_s = jnp.where(i == half - 1, 0.0, log_s)
        basis = jnp.where(first & ~switch, cov, fixed)
        new_chol = jnp.exp(log_s) * jnp.linalg.cholesky(opt * (basis + 1e-10 * jnp.eye(d)))
        use = (i + 1 >= cfg.adapt_start) & jnp.all(jnp.isfinite(new_chol))
        chol = jnp.where(use, new_chol, ad.chol)
        return _Adaptation(chol, mean, cov, log_s, w_n, w_mean, w_m2, fixed)

    def chain(key, u_init):
        def body(carry, inp):
            state, ad, n_nf = carry
            it, k = inp  # it = 0: initial point; 1..W: warmup; then sampling
            if cfg.progress:
                progress_bar.tick(it + 1, progress_bar.every(total))
            k_prop, k_ll, k_acc = jax.random.split(k, 3)
            step = jnp.where(it == 0, 0.0, 1.0)
            u_new = state.u + step * (ad.chol @ jax.random.normal(k_prop, (d,)))
            prop, nonfinite = evaluate(k_ll, u_new)
            log_alpha = (prop.log_lik + prop.log_prior) - (state.log_lik + state.log_prior)
            log_alpha = jnp.where(jnp.isnan(log_alpha), -jnp.inf, log_alpha)
            accept = jnp.log(jax.random.uniform(k_acc)) < log_alpha
            # the initial point is taken as is; a state of zero (estimated) density moves to any
            # finite proposal
            accept = accept | (it == 0) | (~jnp.isfinite(state.log_lik + state.log_prior)
                                           & jnp.isfinite(prop.log_lik + prop.log_prior))
            state = tree.where(accept, prop, state)
            alpha = jnp.exp(jnp.minimum(log_alpha, 0.0))
            if cfg.adapt and warm_n > 0:
                i = it - 1
                new_ad = adapt(ad, i, state.u, alpha)
                in_warmup = (it >= 1) & (it <= warm_n)
                ad = tree.where(in_warmup, new_ad, ad)
            out = (state.theta, state.log_lik, accept)
            return (state, ad, n_nf + nonfinite), out

        init_state = _ChainState(
            u_init, jnp.asarray(-jnp.inf), jnp.asarray(-jnp.inf), space.constrain(u_init)
        )
        chol0 = jnp.linalg.cholesky(cov0)
        ad0 = _Adaptation(chol0, u_init, cov0 / opt, jnp.asarray(0.0), jnp.asarray(0),
                          jnp.zeros(d), jnp.zeros((d, d)), cov0 / opt)
        (_, ad, n_nf), (theta, ll, acc) = jax.lax.scan(
            body, (init_state, ad0, jnp.asarray(0)),
            (jnp.arange(total), jax.random.split(key, total)),
        )
        keep = slice(1 + warm_n, None)
        theta_s = jax.tree.map(lambda x: x[keep], theta)
        acc_s = acc[keep]
        log_prior = jax.vmap(space.log_prior)(theta_s)
        warm_rate = jnp.mean(acc[1:1 + warm_n]) if warm_n > 0 else jnp.asarray(jnp.nan)
        return (theta_s, ll[keep], log_prior, acc_s, jnp.mean(acc_s), warm_rate,
                ad.chol @ ad.chol.T, n_nf)

    theta, ll, lp, acc, rate, wrate, cov, n_nf = jax.vmap(chain)(keys, u0)
    return MCMCResult(theta, ll, lp, acc, rate, wrate, cov, n_nf)
