"""Conditional SMC and particle Gibbs against exact answers on linear-Gaussian models.

1. Conditional SMC keeps the reference: slot 0 holds x*_t at every step (with ancestor sampling),
   checked in every conditional run of the calibration test below.
2. Calibration (simulation-based): for each of R replications draw (q*, x*, y) from the joint,
   start particle Gibbs (PGAS + the conjugate q-step) at (q*, x*) and take K sweeps. If the kernel
   leaves p(q, x | y) invariant, (q_K, x_K) is an exact posterior draw, so its probability
   integral transforms (ranks) under the exact posterior — p(q | y) by quadrature with the Kalman
   likelihood, p(x_t | y) as the quadrature mixture of RTS smoothers — are i.i.d. uniform. A
   χ² test on binned ranks (family-wise level 1e-3, Bonferroni over the quantities) must pass, and
   must reject the kernel with the reference *not pinned* (an SMC path instead of conditional SMC).
3. The particle Gibbs driver (PGAS with a blackjax θ-step; PG with backward sampling for fixed θ)
   against the exact posterior moments of q and x_t: C chains give C independent estimates, within
   a Student-t bound (C − 1 degrees of freedom, family-wise level 1e-3, Bonferroni). The same
   compiled runs with a wrong observation noise must fail it.
"""

from __future__ import annotations

from functools import partial

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

from models.linear_gaussian import LGSSMParams, kalman_filter, rts_smoother
from ppl.state_space import StateSpaceModel
from samplers.particle_gibbs import (
    blackjax_theta_update,
    csmc_kernel,
    particle_gibbs,
    ssm_log_joint,
)
from samplers.smc import smc
from samplers.smoothing import genealogy_paths

FAMILY_ALPHA = 1e-3
RHO, SY = 0.7, 0.5
C0 = 1.0 / (1.0 - RHO**2)  # x_0 ~ N(0, q C0)
A0, B0 = 4.0, 3.0  # q ~ InvGamma(A0, B0)
PRIOR = {"q": dist.InverseGamma(A0, B0)}


def _init(p):
    return dist.Normal(0.0, jnp.sqrt(p["q"] * C0))


def _trans(p, t, x):
    return dist.Normal(RHO * x, jnp.sqrt(p["q"]))


def _obs(p, t, x):
    return dist.Normal(x, p["sy"])


def ssm(q=1.0, sy=SY):
    return StateSpaceModel(_init, _trans, _obs, {"q": jnp.asarray(q), "sy": jnp.asarray(sy)})


def q_update(key, x):
    """Exact draw from p(q | x) = InvGamma(A0 + T/2, B0 + S/2),
    S = x_0²/C0 + Σ (x_t − ρ x_{t−1})²."""
    s = x[0] ** 2 / C0 + jnp.sum((x[1:] - RHO * x[:-1]) ** 2)
    a, b = A0 + x.shape[0] / 2.0, B0 + s / 2.0
    return b / jax.random.gamma(key, a)


def lgssm_params(q, sy=SY):
    return LGSSMParams.scalar(RHO, jnp.sqrt(q), sy, jnp.sqrt(q * C0))


Q_GRID = np.exp(np.linspace(np.log(0.02), np.log(40.0), 500))


@jax.jit
def posterior_on_grid(ys):
    """Normalised quadrature weights of p(q | y) on Q_GRID (trapezoid in log q) and the RTS
    smoothing means/variances at each grid point: [G], [G, T], [G, T]."""
    q = jnp.asarray(Q_GRID)

    def one(qq):
        p = lgssm_params(qq)
        ll = kalman_filter(p, ys[:, None]).log_likelihood
        m, v = rts_smoother(p, ys[:, None])
        return ll, m[:, 0], v[:, 0, 0]

    ll, m, v = jax.vmap(one)(q)
    log_w = ll + dist.InverseGamma(A0, B0).log_prob(q) + jnp.log(q)  # density in log q
    w = jnp.exp(log_w - jnp.max(log_w))
    return w / jnp.sum(w), m, v


# ---- 2. simulation-based calibration ------------------------------------------------------------

T_S, N_S, R_S, K_S, BINS = 5, 4, 400, 8, 10


@partial(jax.jit, static_argnames="pinned")
def sbc_draws(keys, pinned: bool):
    base = ssm()

    def one(key):
        k_q, k_sim, k_run = jax.random.split(key, 3)
        q = B0 / jax.random.gamma(k_q, A0)
        xs, ys = base.with_params({"q": q, "sy": jnp.asarray(SY)}).simulate(k_sim, T_S)

        def sweep(carry, k):
            q, x, kept = carry
            k_x, k_q = jax.random.split(k)
            fk = base.with_params({"q": q, "sy": jnp.asarray(SY)}).bootstrap(ys)
            if pinned:
                out = csmc_kernel(k_x, fk, x, N_S, ancestor_sampling=True)
                # conditional SMC keeps the reference: slot 0 holds x*_t at every step
                kept = kept & jnp.all(out.history.particles[:, 0] == x)
                x = out.trajectory
            else:  # deliberately broken: a fresh SMC path, the reference is not pinned
                k1, k2 = jax.random.split(k_x)
                res = smc(k1, fk, N_S, resampling="multinomial", ess_threshold=1.0,
                          store_history=True)
                final = jax.random.categorical(k2, res.log_weights)
                x = genealogy_paths(res.history, final[None])[0]
            return (q_update(k_q, x), x, kept), None

        (q, x, kept), _ = jax.lax.scan(
            sweep, (q, xs, jnp.asarray(True)), jax.random.split(k_run, K_S)
        )
        return q, x, ys, kept

    return jax.vmap(one)(keys)


def _ranks(q, x, ys, kept):
    """Posterior CDF values of q_K, x_{K,0} and x_{K,T-1} under the exact posterior: [R, 3]."""
    w, m, v = jax.vmap(posterior_on_grid)(ys)  # [R, G], [R, G, T]
    w, m, v = (np.asarray(a, np.float64) for a in (w, m, v))
    q = np.asarray(q, np.float64)
    x = np.asarray(x, np.float64)
    cdf_q = np.cumsum(w, axis=1)
    u_q = np.array([np.interp(np.log(qq), np.log(Q_GRID), c) for qq, c in zip(q, cdf_q)])
    u_x = [
        np.sum(w * stats.norm.cdf((x[:, [t]] - m[:, :, t]) / np.sqrt(v[:, :, t])), axis=1)
        for t in (0, T_S - 1)
    ]
    return np.stack([u_q] + u_x, axis=1)


def _chi2_pvalues(u):
    counts = np.stack(
        [np.histogram(u[:, j], bins=BINS, range=(0, 1))[0] for j in range(u.shape[1])]
    )
    return stats.chisquare(counts, axis=1).pvalue


@pytest.fixture(scope="module")
def sbc_ranks():
    keys = jax.random.split(jax.random.key(7), R_S)
    good = sbc_draws(keys, True)
    broken = sbc_draws(keys, False)
    return _ranks(*good), _ranks(*broken), np.asarray(good[3])


def test_conditional_smc_keeps_reference(sbc_ranks):
    # every conditional run of every replication (R × K runs, with ancestor sampling)
    assert sbc_ranks[2].all()


def test_sbc_ranks_uniform_for_particle_gibbs(sbc_ranks):
    p = _chi2_pvalues(sbc_ranks[0])
    assert p.min() > FAMILY_ALPHA / p.size, f"χ² p-values of the ranks (q, x_0, x_T-1): {p}"


def test_sbc_rejects_unpinned_reference(sbc_ranks):
    p = _chi2_pvalues(sbc_ranks[1])
    assert p.min() < FAMILY_ALPHA / p.size, f"the broken kernel passed calibration: p = {p}"


# ---- 3. the particle Gibbs driver vs exact posterior moments -----------------------------------

T_D, N_D, C_D, S_D, W_D = 20, 8, 16, 300, 50
_, YS_D = ssm().simulate(jax.random.key(3), T_D)


@pytest.fixture(scope="module")
def exact_driver():
    w, m, v = (np.asarray(a, np.float64) for a in posterior_on_grid(YS_D))
    q_moments = np.array([np.sum(w * Q_GRID), np.sum(w * Q_GRID**2)])
    x_mean = w @ m
    x_m2 = w @ (m**2 + v)
    return q_moments, np.stack([x_mean, x_m2])  # [2], [2, T]


def _bound(n_stats, n_chains):
    return stats.t.ppf(1 - FAMILY_ALPHA / (2 * n_stats), df=n_chains - 1)


def _z(per_chain, exact):
    se = per_chain.std(0, ddof=1) / np.sqrt(per_chain.shape[0])
    return np.abs(per_chain.mean(0) - exact) / se


def random_walk(logdensity):
    return blackjax.normal_random_walk(logdensity, 0.6 * jnp.ones(1))


def _run_pgas(sy, key):
    model = ssm(sy=sy)
    # one algorithm factory for both runs: they share the compiled program
    update = blackjax_theta_update(model, YS_D, PRIOR, random_walk, num_steps=3)
    return particle_gibbs(
        key, model, YS_D, num_particles=N_D, num_samples=S_D, num_warmup=W_D, num_chains=C_D,
        theta_update=update, prior=PRIOR, init_params={"q": 1.0}, ancestor_sampling=True,
    )


@pytest.fixture(scope="module")
def pgas_runs():
    return _run_pgas(SY, jax.random.key(11)), _run_pgas(2.0 * SY, jax.random.key(12))


def _driver_stats(res, with_q):
    x = np.asarray(res.trajectories, np.float64)  # [C, S, T]
    cols = [x.mean(1), (x**2).mean(1)]
    if with_q:
        q = np.asarray(res.params["q"], np.float64)
        cols = [q.mean(1)[:, None], (q**2).mean(1)[:, None]] + cols
    return np.concatenate(cols, axis=1)


def test_pgas_with_blackjax_theta_step_matches_exact(pgas_runs, exact_driver):
    res = pgas_runs[0]
    exact = np.concatenate([exact_driver[0], exact_driver[1][0], exact_driver[1][1]])
    z = _z(_driver_stats(res, True), exact)
    bound = _bound(z.size, C_D)
    assert z.max() < bound, f"max |z| = {z.max():.2f} at {z.argmax()} (bound {bound:.2f})"
    assert int(res.num_extinct.sum()) == 0
    # ancestor sampling renews the path at every step (no path degeneracy): the update rate is
    # ≈ 0.10 at t = 0 and ≈ 0.6 later (measured); without ancestor sampling it is ≤ 0.003 over the
    # first steps, so 0.05 separates the two (0.1 sat on the t = 0 value itself: 0.1008 / 0.0998
    # for two random streams of the same law, 0.2 standard errors apart)
    assert np.all(np.asarray(res.update_rate).mean(0) > 0.05)


def test_pgas_with_wrong_model_is_rejected(pgas_runs, exact_driver):
    exact = np.concatenate([exact_driver[0], exact_driver[1][0], exact_driver[1][1]])
    z = _z(_driver_stats(pgas_runs[1], True), exact)
    assert z.max() > _bound(z.size, C_D), f"a wrong model passed: max |z| = {z.max():.2f}"


@pytest.mark.slow
def test_pg_backward_sampling_fixed_theta_matches_rts():
    q = 1.3
    p = lgssm_params(q)
    m, v = rts_smoother(p, YS_D[:, None])
    exact = np.concatenate([np.asarray(m[:, 0]), np.asarray(m[:, 0] ** 2 + v[:, 0, 0])])
    runs = [
        particle_gibbs(
            jax.random.key(5 + i), ssm(q=q, sy=sy), YS_D, num_particles=N_D, num_samples=S_D,
            num_warmup=W_D, num_chains=C_D, ancestor_sampling=False, backward_sampling=True,
        )
        for i, sy in enumerate((SY, 2.0 * SY))
    ]
    z_good = _z(_driver_stats(runs[0], False), exact)
    z_bad = _z(_driver_stats(runs[1], False), exact)
    bound = _bound(z_good.size, C_D)
    assert z_good.max() < bound, f"PG-BS: max |z| = {z_good.max():.2f} (bound {bound:.2f})"
    assert z_bad.max() > bound, f"PG-BS with a wrong model passed: {z_bad.max():.2f}"
    idata = runs[0].to_inference_data(observations=YS_D)
    assert idata.posterior["x"].shape == (C_D, S_D, T_D)


def test_inference_data_and_log_joint(pgas_runs):
    idata = pgas_runs[0].to_inference_data(observations=YS_D)
    assert idata.posterior["q"].shape == (C_D, S_D)
    assert idata.posterior["x"].dims == ("chain", "draw", "time")
    # complete-data log-likelihood against scipy
    model = ssm(q=0.8)
    x = np.linspace(-1.0, 1.0, 4)
    y = np.array([0.1, -0.2, 0.3, 0.0])
    expected = (
        stats.norm.logpdf(x[0], 0, np.sqrt(0.8 * C0))
        + stats.norm.logpdf(x[1:], RHO * x[:-1], np.sqrt(0.8)).sum()
        + stats.norm.logpdf(y, x, SY).sum()
    )
    got = jax.jit(ssm_log_joint)(model, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_bad_input_errors():
    model = ssm()
    xs, ys = jnp.zeros(4), jnp.zeros(4)
    fk = model.bootstrap(ys)
    with pytest.raises(ValueError, match="not both"):
        csmc_kernel(jax.random.key(0), fk, xs, 4, ancestor_sampling=True, backward_sampling=True)
    with pytest.raises(ValueError, match="reference"):
        csmc_kernel(jax.random.key(0), fk, None, 4)
    with pytest.raises(ValueError, match="num_particles"):
        particle_gibbs(jax.random.key(0), model, ys, num_particles=0, num_samples=2)
    with pytest.raises(ValueError, match="without theta_update"):
        particle_gibbs(jax.random.key(0), model, ys, num_particles=2, num_samples=2, prior=PRIOR)
    with pytest.raises(ValueError, match="init_trajectory"):
        particle_gibbs(jax.random.key(0), model, ys, num_particles=2, num_samples=2,
                       init_trajectory=jnp.zeros(7))
    with pytest.raises(TypeError, match="StateSpaceModel"):
        particle_gibbs(jax.random.key(0), fk, ys, num_particles=2, num_samples=2)
