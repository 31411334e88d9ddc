"""Calibration harness: SBC and TARP (samplers.calibration) on the project's own samplers.

For s = 1..S a parameter θ*_s is drawn from the prior and data from the model given θ*_s; the
sampler, run on the data (vmapped over the S simulations: one compiled program), returns L
posterior draws; ``sbc`` and ``tarp`` test them at level 0.01 (SBC Bonferroni-corrected over the
coordinates).

1. **Tempered SMC** (``samplers.tempering.AdaptiveTempering`` on the engine) on the conjugate
   Gaussian-mean model of ``models.conjugate`` (μ ~ N(0, I₂), y_1..n ~ N(μ, Σ), Σ with
   correlation 0.9), L draws from the final weighted particles (multinomial). In this test the
   model's density is written out in closed form (a module with ``log_prior``/``log_likelihood``:
   the numpyro version costs ten times more per evaluation on a CPU), with a random-walk move;
   ``benchmarks/bench_calibration_harness.py`` runs ``tempered_smc`` on the numpyro model itself
   with its default HMC move.
2. **PMMH** (``samplers.pmmh``) on an AR(1)-plus-noise linear-Gaussian state-space model with one
   unknown parameter, ρ ~ U(−0.9, 0.9) (σ_x = σ_y = 1 known), bootstrap filter; one chain per
   simulation started from the prior, adaptive warmup, then L draws thinned from the chain.
3. **Variational guides** fitted by ``samplers.variational`` (ELBO, sticking-the-landing
   gradients, Adam) on the same conjugate model: a full-rank Gaussian contains the posterior and
   must pass; a mean-field Gaussian on this correlated posterior (correlation 0.87) has marginal
   standard deviations half the true ones (over-confident: 1/√Λ_ii instead of √(Λ⁻¹)_ii) and must
   fail SBC (the broken variant).

The runners take their sizes as arguments; the benchmark script calls them at a larger size and
prints the table.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

from models.conjugate import gaussian_mean_model
from ppl.numpyro_model import from_numpyro
from ppl.state_space import StateSpaceModel
from samplers import variational as vi
from samplers.calibration import sbc, tarp
from samplers.pmmh import pmmh
from samplers.smc import smc
from samplers.tempering import AdaptiveTempering, tempered_smc

# the conjugate model
DIM, NUM_OBS, NOISE_CORR = 2, 5, 0.9
PRIOR_MEAN = np.zeros(DIM, np.float32)
PRIOR_COV = np.eye(DIM, dtype=np.float32)
NOISE_COV = np.array([[1.0, NOISE_CORR], [NOISE_CORR, 1.0]], np.float32)
# the state-space model
SSM_T, SX, SY = 10, 1.0, 1.0
RHO_PRIOR = {"rho": dist.Uniform(-0.9, 0.9)}

# test sizes (the benchmark passes larger ones)
S, L = 60, 9
SMC_N = 128
VI_STEPS = 300
PMMH_S, PMMH_N, PMMH_WARMUP, PMMH_SAMPLES, PMMH_THIN = 40, 32, 80, 200, 25


# ------------------------------------------------------------------------------------------------
# simulations and runners (shared with benchmarks/bench_calibration_harness.py)
# ------------------------------------------------------------------------------------------------


def simulate_conjugate(seed: int, num_sims: int):
    """θ* ~ N(0, I) and y_{1:n} ~ N(θ*, Σ) per simulation: ([S, 2], [S, n, 2]) float32."""
    rng = np.random.default_rng(seed)
    theta = PRIOR_MEAN + rng.normal(size=(num_sims, DIM)) @ np.linalg.cholesky(PRIOR_COV).T
    noise = rng.normal(size=(num_sims, NUM_OBS, DIM)) @ np.linalg.cholesky(NOISE_COV).T
    return theta.astype(np.float32), (theta[:, None, :] + noise).astype(np.float32)


class ConjugateTarget(eqx.Module):
    """``models.conjugate.gaussian_mean_model`` (the prior N(m₀, S₀), y_i ~ N(μ, Σ)) in closed form,
    in the interface of ``AdaptiveTempering``."""

    y: jax.Array
    dim: int = eqx.field(static=True, default=DIM)

    def log_prior(self, z):
        r = z - PRIOR_MEAN
        return -0.5 * r @ np.linalg.solve(PRIOR_COV, np.eye(DIM)).astype(np.float32) @ r

    def log_likelihood(self, z):
        r = self.y - z
        prec = np.linalg.inv(NOISE_COV).astype(np.float32)
        return -0.5 * jnp.sum((r @ prec) * r)

    def sample_prior(self, key, n):
        return PRIOR_MEAN + jax.random.normal(key, (n, DIM)) @ np.linalg.cholesky(PRIOR_COV).T


def _weighted_draws(key, z, log_weights, num_draws):
    idx = jax.random.categorical(key, log_weights, shape=(num_draws,))
    return z[idx]


def run_tempered_smc(key, ys, num_draws, num_particles, *, numpyro: bool = False):
    """L draws per simulation from tempered SMC, all simulations in one vmapped program.
    ``numpyro=False``: ``AdaptiveTempering`` on :class:`ConjugateTarget` with a random-walk move;
    ``True``: ``tempered_smc`` on ``gaussian_mean_model`` (numpyro) with its default HMC move.
    Returns (draws [S, L, 2], SMC steps [S])."""

    def one(k, y):
        k_run, k_draw = jax.random.split(k)
        if numpyro:
            res = tempered_smc(k_run, gaussian_mean_model, y, PRIOR_MEAN, PRIOR_COV, NOISE_COV,
                               num_particles=num_particles, progress=False)
            z, lw, steps = res.samples["mu"], res.log_weights, res.num_steps
        else:
            model = AdaptiveTempering(ConjugateTarget(y), kernel="rwm", num_mcmc_steps=3,
                                      max_mcmc_steps=20)
            res = smc(k_run, model, num_particles, ess_threshold=1.0, max_steps=30)
            z, lw, steps = res.particles.z, res.log_weights, res.num_steps
        return _weighted_draws(k_draw, z, lw, num_draws), steps

    keys = jax.random.split(key, ys.shape[0])
    draws, steps = jax.jit(jax.vmap(one))(keys, jnp.asarray(ys))
    return np.asarray(draws), np.asarray(steps)


@eqx.filter_jit
def _fit_guides(keys, ys, mask, num_draws, num_steps, learning_rate, num_samples):
    optimizer = optax.adam(learning_rate)
    objective = vi.ELBO(num_samples)

    def one(k, y):
        target = from_numpyro(gaussian_mean_model, y, PRIOR_MEAN, PRIOR_COV, NOISE_COV)
        k_fit, k_draw = jax.random.split(k)

        def body(state, kk):
            state, info = vi.step(kk, state, objective, target, optimizer,
                                  estimator="sticking_the_landing")
            # the mean-field family: the off-diagonal of the Cholesky factor held at zero
            state = state._replace(params=eqx.tree_at(
                lambda f: f.raw_scale_tril, state.params, state.params.raw_scale_tril * mask))
            return state, info.loss

        state, losses = jax.lax.scan(body, vi.init(vi.FullRankGaussian.init(DIM), optimizer),
                                     jax.random.split(k_fit, num_steps))
        return state.params.sample(k_draw, num_draws), losses[-1]

    return jax.vmap(one)(keys, ys)


def run_vi(key, ys, num_draws, num_steps, *, mean_field=False, learning_rate=5e-2,
           num_samples=8):
    """Fit a Gaussian guide to each simulation's posterior (``from_numpyro`` of
    ``gaussian_mean_model``) by the ELBO with sticking-the-landing gradients and Adam, then draw L
    from it; vmapped over simulations. ``mean_field``: the diagonal (mean-field) Gaussian — a
    ``FullRankGaussian`` whose off-diagonal is held at zero, so that both variants share one
    compiled program. Returns (draws [S, L, 2], final losses [S])."""
    mask = np.eye(DIM, dtype=np.float32) if mean_field else np.ones((DIM, DIM), np.float32)
    keys = jax.random.split(key, ys.shape[0])
    draws, loss = _fit_guides(keys, jnp.asarray(ys), jnp.asarray(mask), num_draws, num_steps,
                              learning_rate, num_samples)
    return np.asarray(draws), np.asarray(loss)


def _ar1(p):
    return dist.Normal(0.0, SX / jnp.sqrt(1.0 - p["rho"] ** 2))


def _ar1_trans(p, t, x):
    return dist.Normal(p["rho"] * x, SX)


def _ar1_obs(p, t, x):
    return dist.Normal(x, SY)


def ar1_ssm(rho):
    """x_0 ~ N(0, σ_x²/(1 − ρ²)), x_t = ρ x_{t−1} + σ_x ε_t, y_t = x_t + σ_y η_t."""
    return StateSpaceModel(_ar1, _ar1_trans, _ar1_obs, {"rho": jnp.asarray(rho, jnp.float32)},
                           vectorized=True)


def simulate_ssm(key, num_sims):
    """ρ* ~ U(−0.9, 0.9) and y_{0:T−1} per simulation: ([S], [S, T])."""

    def one(k):
        k_rho, k_y = jax.random.split(k)
        rho = RHO_PRIOR["rho"].sample(k_rho)
        return rho, ar1_ssm(rho).simulate(k_y, SSM_T)[1]

    rho, ys = jax.vmap(one)(jax.random.split(key, num_sims))
    return np.asarray(rho), ys


def run_pmmh(key, ys, num_particles, num_warmup, num_samples, thin):
    """One PMMH chain per simulation (from a prior draw; adaptive warmup), every ``thin``-th
    draw kept: (draws [S, num_samples // thin], acceptance rates [S])."""

    def one(k, y):
        res = pmmh(k, ar1_ssm(0.0), y, RHO_PRIOR, num_particles=num_particles,
                   num_samples=num_samples, num_warmup=num_warmup, progress=False)
        return res.params["rho"][0, thin - 1::thin], res.acceptance_rate[0]

    keys = jax.random.split(key, ys.shape[0])
    draws, acc = jax.vmap(one)(keys, ys)  # pmmh compiles its own chain program
    return np.asarray(draws), np.asarray(acc)


def calibration(key, draws, truths):
    """(SBC result, TARP result) at level 0.01."""
    k1, k2 = jax.random.split(key)
    return sbc(k1, draws, truths), tarp(k2, draws, truths)


def row(name, res_sbc, res_tarp, seconds=None):
    """One line of the harness table."""
    t = "" if seconds is None else f" | {seconds:.1f}"
    return (f"| {name} | {', '.join(f'{p:.3f}' for p in res_sbc.p_values)} | "
            f"{'pass' if res_sbc.passed else 'FAIL'} | {res_tarp.atc:+.3f} | {res_tarp.p_value:.3f} | "
            f"{'pass' if res_tarp.passed else 'FAIL'}{t} |")


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conjugate():
    return simulate_conjugate(0, S)


def test_tempered_smc_is_calibrated(conjugate):
    theta, ys = conjugate
    t = time.perf_counter()
    draws, steps = run_tempered_smc(jax.random.key(1), ys, L, SMC_N)
    res_sbc, res_tarp = calibration(jax.random.key(2), draws, theta)
    print(row("tempered SMC (rwm)", res_sbc, res_tarp, time.perf_counter() - t))
    assert draws.shape == (S, L, DIM) and np.all(steps >= 2)
    assert res_sbc.passed and res_tarp.passed


def test_variational_guides_full_rank_passes_mean_field_fails(conjugate):
    theta, ys = conjugate
    results = {}
    for name in ("full-rank", "mean-field"):
        t = time.perf_counter()
        draws, loss = run_vi(jax.random.key(3), ys, L, VI_STEPS, mean_field=name == "mean-field")
        assert np.all(np.isfinite(loss))
        results[name] = calibration(jax.random.key(4), draws, theta)
        print(row(f"VI {name}", *results[name], time.perf_counter() - t))
    assert results["full-rank"][0].passed and results["full-rank"][1].passed
    assert not results["mean-field"][0].passed


def test_pmmh_is_calibrated():
    rho, ys = simulate_ssm(jax.random.key(5), PMMH_S)
    t = time.perf_counter()
    draws, acc = run_pmmh(jax.random.key(6), ys, PMMH_N, PMMH_WARMUP, PMMH_SAMPLES, PMMH_THIN)
    res_sbc, res_tarp = calibration(jax.random.key(7), draws, rho)
    print(row("PMMH", res_sbc, res_tarp, time.perf_counter() - t), f"acceptance {acc.mean():.2f}")
    assert draws.shape == (PMMH_S, PMMH_SAMPLES // PMMH_THIN)
    assert res_sbc.passed and res_tarp.passed
