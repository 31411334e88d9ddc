"""PMMH against the exact posterior of a linear-Gaussian model's parameters.

θ = (ρ, σ_x) of x_t = ρ x_{t-1} + σ_x ε_t, y_t = x_t + σ_y η_t (σ_y known), with priors
ρ ~ U(−1, 1), σ_x ~ HalfNormal(2). References:

- the exact posterior by quadrature: p(θ | y) ∝ p(θ) p_θ(y) on a fine grid, p_θ(y) from a scalar
  Kalman filter in float64 NumPy (independent of every sampler and of the JAX code here);
- exact-likelihood MCMC: the same adaptive random-walk Metropolis with the Kalman log-likelihood
  (``models.linear_gaussian.kalman_filter``).

C chains (one compiled, vmapped call) start at independent draws from the exact posterior (so
there is no burn-in bias common to all chains) and give C independent estimates of E[θ_i] and
E[θ_i²]; their mean is within a CLT bound of the exact value (Student-t quantile for C − 1 degrees
of freedom, family-wise level 1e-3 with a Bonferroni correction over the 4 moments). PMMH is exact
for any N (pseudo-marginal), so there is no particle bias to allow for; N is chosen so that
sd(log Ẑ) ≈ 1.3 at the true θ (mixing). A PMMH run with a wrong potential (the observation density
of y_t given 2 x_t instead of x_t) must fail the same check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

from exact_checks import ar1_noise_log_likelihood, ar1_noise_ssm
from models.linear_gaussian import LGSSMParams, kalman_filter
from samplers.parameters import ParameterSpace
from samplers.pmmh import pmmh, random_walk_metropolis

T, N = 40, 64
C, WARMUP, SAMPLES = 16, 100, 250
RHO, SX, SY = 0.8, 1.0, 0.5
FAMILY_ALPHA = 1e-3
PRIOR = {"rho": dist.Uniform(-1.0, 1.0), "sx": dist.HalfNormal(2.0)}


def _ssm(gain=1.0):
    """gain = 1 is the model; gain = 2 is the deliberately wrong potential."""
    return ar1_noise_ssm(RHO, SX, SY, gain)


_, YS = _ssm().simulate(jax.random.key(0), T)


def _kalman_loglik(rho, sx):
    return kalman_filter(LGSSMParams.scalar(rho, sx, SY), YS[:, None]).log_likelihood


def kalman_loglik(key, theta):
    return _kalman_loglik(theta["rho"], theta["sx"])


def _moments(draws):
    """Per-chain E[θ_i], E[θ_i²]: array [C, 4]."""
    cols = []
    for k in ("rho", "sx"):
        x = np.asarray(draws[k])
        cols += [x.mean(1), (x**2).mean(1)]
    return np.stack(cols, axis=1)


def _z(per_chain, exact):
    se = per_chain.std(0, ddof=1) / np.sqrt(per_chain.shape[0])
    z = np.abs(per_chain.mean(0) - exact) / se
    bound = stats.t.ppf(1 - FAMILY_ALPHA / (2 * z.size), df=per_chain.shape[0] - 1)
    return z, bound


@pytest.fixture(scope="module")
def posterior_grid():
    """Quadrature of p(ρ, σ_x | y) on a 400 x 400 grid: (weights, ρ values, σ_x values)."""
    rho = np.linspace(0.2, 0.9999, 400)
    sx = np.linspace(0.3, 2.2, 400)
    R, S = np.meshgrid(rho, sx, indexing="ij")
    lp = ar1_noise_log_likelihood(R, S, SY, np.asarray(YS, np.float64))
    lp += stats.halfnorm.logpdf(S, scale=2.0)  # the uniform prior on ρ is flat on the grid
    w = np.exp(lp - lp.max())
    w /= w.sum()
    # the grid must hold the posterior: the edge rows carry < 1e-3 of the mass (and what lies
    # beyond them moves the moments by far less than the Monte Carlo error)
    assert w[[0, -1], :].sum() + w[:, [0, -1]].sum() < 1e-3
    return w, R, S


@pytest.fixture(scope="module")
def exact_moments(posterior_grid):
    w, R, S = posterior_grid
    return np.array([(w * R).sum(), (w * R**2).sum(), (w * S).sum(), (w * S**2).sum()])


@pytest.fixture(scope="module")
def chains(posterior_grid):
    w, R, S = posterior_grid
    rng = np.random.default_rng(0)
    idx = rng.choice(w.size, size=C, p=w.ravel())
    init = {"rho": jnp.asarray(R.ravel()[idx], jnp.float32),
            "sx": jnp.asarray(S.ravel()[idx], jnp.float32)}  # exact posterior draws (grid cells)
    run = lambda key, gain: pmmh(  # noqa: E731
        key, _ssm(gain), YS, PRIOR, num_particles=N, num_samples=SAMPLES, num_warmup=WARMUP,
        num_chains=C, init_params=init,
    )
    good = run(jax.random.key(1), 1.0)
    broken = run(jax.random.key(2), 2.0)  # wrong potential: same compiled program
    exact_mcmc = random_walk_metropolis(
        jax.random.key(3), kalman_loglik, PRIOR, num_samples=SAMPLES, num_warmup=WARMUP,
        num_chains=C, init_params=init,
    )
    return good, broken, exact_mcmc


def test_pmmh_matches_exact_posterior(chains, exact_moments):
    good = chains[0]
    # proposals at the numerical edge (ρ rounding to ±1) give a non-finite log Ẑ: counted, rejected
    assert int(jnp.sum(good.num_nonfinite)) < 0.01 * C * (WARMUP + SAMPLES)
    rate = np.asarray(good.acceptance_rate)
    assert np.all((rate > 0.02) & (rate < 0.6)), rate
    z, bound = _z(_moments(good.params), exact_moments)
    assert z.max() < bound, f"PMMH vs quadrature: |z| = {z} (bound {bound:.2f})"


def test_kalman_mcmc_matches_exact_posterior(chains, exact_moments):
    z, bound = _z(_moments(chains[2].params), exact_moments)
    assert z.max() < bound, f"exact-likelihood MCMC vs quadrature: |z| = {z} (bound {bound:.2f})"


def test_pmmh_agrees_with_exact_likelihood_mcmc(chains):
    a, b = _moments(chains[0].params), _moments(chains[2].params)
    se = np.sqrt(a.var(0, ddof=1) / a.shape[0] + b.var(0, ddof=1) / b.shape[0])
    z = np.abs(a.mean(0) - b.mean(0)) / se
    # Welch's t with the smaller of the two degrees of freedom (conservative)
    bound = stats.t.ppf(1 - FAMILY_ALPHA / (2 * z.size), df=C - 1)
    assert z.max() < bound, f"PMMH vs Kalman MCMC: |z| = {z} (bound {bound:.2f})"


def test_pmmh_with_wrong_potential_is_rejected(chains, exact_moments):
    z, bound = _z(_moments(chains[1].params), exact_moments)
    assert z.max() > bound, f"PMMH with a wrong potential passed: |z| = {z}"


def test_inference_data(chains):
    idata = chains[0].to_inference_data(YS)
    post = idata.posterior
    assert post["rho"].shape == (C, SAMPLES)
    assert "accepted" in idata.sample_stats and "lp" in idata.sample_stats
    assert idata.observed_data["y"].shape == (T,)
    import arviz as az

    summary = az.summary(idata, var_names=["rho", "sx"])
    assert np.all(np.isfinite(summary["r_hat"])) and np.all(summary["ess_bulk"] > 0)


def test_parameter_space_roundtrip_and_jacobian():
    space = ParameterSpace({"a": dist.Normal(0.0, 1.0), "b": dist.Gamma(2.0, 1.0)})
    assert space.dim == 2 and space.names == ("a", "b")
    theta = {"a": jnp.asarray(-0.4), "b": jnp.asarray(1.7)}

    @jax.jit
    def check(theta):
        u = space.unconstrain(theta)
        lp, back = space.log_density_unconstrained(u)
        return u, lp, back

    u, lp, back = check(theta)
    np.testing.assert_allclose(np.asarray(u), [-0.4, np.log(1.7)], rtol=1e-6)
    for k in theta:
        np.testing.assert_allclose(back[k], theta[k], rtol=1e-5)
    # change of variables: log p_U(u) = log p(a) + log p(e^{u_b}) + u_b
    expected = stats.norm.logpdf(-0.4) + stats.gamma.logpdf(1.7, 2.0) + np.log(1.7)
    np.testing.assert_allclose(float(lp), expected, rtol=1e-5)


def test_numpy_kalman_matches_project_kalman():
    ll = ar1_noise_log_likelihood(np.array([0.7]), np.array([1.3]), SY, np.asarray(YS, np.float64))
    np.testing.assert_allclose(ll[0], float(_kalman_loglik(0.7, 1.3)), rtol=1e-4)


def test_bad_input_errors(no_shape_checks):
    ssm = _ssm()
    kw = dict(num_particles=4, num_samples=2, num_warmup=0)
    with pytest.raises(TypeError, match="numpyro Distribution"):
        pmmh(jax.random.key(0), ssm, YS, {"rho": 0.5}, **kw)
    with pytest.raises(ValueError, match="not fields of the model's params"):
        pmmh(jax.random.key(0), ssm, YS, {"phi": dist.Normal(0.0, 1.0)}, **kw)
    with pytest.raises(ValueError, match="init_params"):
        pmmh(jax.random.key(0), ssm, YS, PRIOR, init_params={"rho": jnp.zeros(3), "sx": 1.0}, **kw)
    with pytest.raises(ValueError, match="outside the prior's support"):
        pmmh(jax.random.key(0), ssm, YS, PRIOR, init_params={"rho": 2.0, "sx": 1.0}, **kw)
    with pytest.raises(ValueError, match="proposal_cov"):
        pmmh(jax.random.key(0), ssm, YS, PRIOR, proposal_cov=jnp.eye(3), **kw)
    with pytest.raises(ValueError, match="num_particles"):
        pmmh(jax.random.key(0), ssm, YS, PRIOR, num_particles=0, num_samples=2)
    with pytest.raises(ValueError, match="target_acceptance"):
        random_walk_metropolis(
            jax.random.key(0), kalman_loglik, PRIOR, num_samples=2, target_acceptance=1.5
        )
