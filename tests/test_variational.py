"""Variational objectives against exact answers (samplers.variational).

Normal–Normal models have a Gaussian posterior N(m, s²) and an exact log p(x)
(models.conjugate); for a Gaussian q = N(μ, σ²) the ELBO is log p(x) − KL(q‖posterior) in
closed form, so its gradient is analytic. The linear-Gaussian state-space model has the Kalman
log-likelihood. Tolerances are z = 4 standard errors of the Monte Carlo estimates (or exact
chi-square quantiles for variances).
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
import scipy.integrate
import scipy.stats

from models.conjugate import ConjugateGaussianMean
from models.linear_gaussian import LGSSMParams, kalman_filter
from ppl.numpyro_model import from_numpyro
from ppl.state_space import StateSpaceModel
from samplers import variational as vi

Z = 4.0


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def _conjugate(prior_var, noise_var, n, seed=0, noise_corr=0.0):
    d = len(prior_var)
    noise = np.diag(noise_var).astype(np.float32)
    if d == 2:
        noise[0, 1] = noise[1, 0] = noise_corr * np.sqrt(noise_var[0] * noise_var[1])
    cg = ConjugateGaussianMean(jnp.zeros(d), jnp.diag(jnp.asarray(prior_var, jnp.float32)),
                               jnp.asarray(noise))
    _, y = cg.simulate(jax.random.key(seed), n)
    target = from_numpyro(cg.model, *cg.model_args(y))
    m, s = cg.posterior(y)
    return target, float(cg.log_evidence(y)), np.asarray(m, np.float64), np.asarray(s, np.float64)


@pytest.fixture(scope="module")
def normal1d():
    """1-D: μ ~ N(0, 1), y_i ~ N(μ, 1), n = 5."""
    return _conjugate([1.0], [1.0], 5)


def _kl_gauss(mu_q, cov_q, mu_p, cov_p):
    d = len(mu_q)
    ip = np.linalg.inv(cov_p)
    diff = mu_p - mu_q
    return 0.5 * (np.trace(ip @ cov_q) + diff @ ip @ diff - d
                  + np.log(np.linalg.det(cov_p) / np.linalg.det(cov_q)))


def _q1d(m, s, shift, widen):
    """A fixed, non-optimal mean-field q = N(m + shift·s, (widen·s)²) in 1-D."""
    return vi.MeanFieldGaussian(jnp.asarray([m + shift * s], jnp.float32),
                                jnp.asarray([np.log(widen * s)], jnp.float32))


_COMPILED = {}


def _estimates(objective, params, target, keys, estimator="reparameterisation"):
    """One bound estimate per key (compiled once per objective, target and estimator)."""
    tag = (objective, id(target), estimator)
    if tag not in _COMPILED:
        _COMPILED[tag] = eqx.filter_jit(lambda p, k: jax.vmap(
            lambda kk: vi.bound(kk, objective, p, target, estimator=estimator))(k))
    return np.asarray(_COMPILED[tag](params, keys), np.float64)


def _mean_se(x):
    x = np.asarray(x, np.float64)
    return x.mean(0), x.std(0, ddof=1) / np.sqrt(x.shape[0])


# ------------------------------------------------------------------------------------------------
# 1. the optimised ELBO reaches log p(x) when the family contains the posterior
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mean_field", "full_rank"])
def test_fitted_elbo_reaches_log_evidence(family):
    # mean-field: independent coordinates (diagonal posterior); full-rank: correlated noise
    corr = 0.0 if family == "mean_field" else 0.8
    target, log_z, m, s = _conjugate([1.0, 2.0], [0.5, 1.0], 5, seed=1, noise_corr=corr)
    q0 = (vi.MeanFieldGaussian if family == "mean_field" else vi.FullRankGaussian).init(2)
    res = vi.fit(jax.random.key(0), q0, vi.ELBO(8), target, optax.adam(5e-2), 600,
                 estimator="stl", progress=False)
    assert not res.nan_stopped and res.num_steps_run == 600
    q = res.params
    if family == "mean_field":
        mu, cov = np.asarray(q.loc, np.float64), np.diag(np.asarray(q.scale, np.float64) ** 2)
    else:
        mu = np.asarray(q.loc, np.float64)
        chol = np.asarray(q.scale_tril, np.float64)
        cov = chol @ chol.T
    kl = _kl_gauss(mu, cov, m, s)  # exact gap log p(x) − ELBO(q)
    vals = _estimates(vi.ELBO(1), q, target, jax.random.split(jax.random.key(1), 4096))
    est, se = _mean_se(vals)
    print(f"{family}: ELBO {est:.6f} ± {se:.2e} vs log p(x) {log_z:.6f}; exact KL {kl:.2e}; "
          f"loss trace {res.losses[0]:.3f} -> {res.losses[-1]:.6f}")
    # float32 evaluation of log p(x, z) carries ~1e-6 relative rounding
    assert abs(est - log_z) <= Z * se + 1e-5 * abs(log_z)
    assert kl < 1e-3
    if family == "full_rank":
        assert abs(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])) > 0.1  # it learned the correlation


# ------------------------------------------------------------------------------------------------
# 2. IWAE(K) increases with K towards log p(x); every bound stays below log p(x)
# ------------------------------------------------------------------------------------------------


def test_iwae_increases_with_k(normal1d):
    target, log_z, m, s = normal1d
    m, s = float(m[0]), float(np.sqrt(s[0, 0]))
    shift, widen = 1.0, 2.0
    q = _q1d(m, s, shift, widen)
    # the exact ELBO and the χ² divergence χ² = ∫ π²/q − 1 (IWAE_K ≈ log p − χ²/(2K), K → ∞)
    kl = _kl_gauss(np.array([m + shift * s]), np.array([[(widen * s) ** 2]]), np.array([m]),
                   np.array([[s**2]]))
    pi, qq = scipy.stats.norm(m, s), scipy.stats.norm(m + shift * s, widen * s)
    chi2 = scipy.integrate.quad(lambda z: pi.pdf(z) ** 2 / qq.pdf(z), m - 20 * s, m + 20 * s)[0] - 1
    # 20000 estimates per K: the step from K = 16 to 64 (about χ²/2 · (1/16 − 1/64) ≈ 0.017 nats)
    # is then about 7 standard errors, so the z = 4 test of strict increase has power
    ks = (1, 4, 16, 64)
    means, ses = [], []
    for i, k in enumerate(ks):
        vals = _estimates(vi.IWAE(k), q, target, jax.random.split(jax.random.key(10 + i), 20000))
        mu, se = _mean_se(vals)
        means.append(mu)
        ses.append(se)
    print("IWAE_K", dict(zip(ks, np.round(means, 4))), "log p(x)", round(log_z, 4),
          "exact ELBO", round(log_z - kl, 4), "chi2", round(chi2, 3))
    assert abs(means[0] - (log_z - kl)) <= Z * ses[0]  # K = 1 is the ELBO
    for a in range(len(ks) - 1):  # strictly increasing
        assert means[a + 1] - means[a] > Z * np.hypot(ses[a], ses[a + 1])
    for mu, se in zip(means, ses):
        assert mu <= log_z + Z * se
    # towards log p(x): the gap at K = 64 is O(χ²/K) (first order χ²/(2K); a factor 2 for the
    # higher-order terms), and far below the K = 1 gap (the KL)
    assert log_z - means[-1] <= chi2 / ks[-1] + Z * ses[-1]


RHO, SX, SY = 0.9, 1.0, 0.5
S0 = SX / np.sqrt(1 - RHO**2)


@pytest.fixture(scope="module")
def guided_lgssm():
    """1-D linear-Gaussian SSM (AR(1) plus noise), T = 6, with a guided proposal of parameters
    φ = (a, b, c): q(x_t | x_{t−1}, y_t) = N(a x_{t−1} + b y_t, exp(2c)); batched (vectorized)."""
    theta = LGSSMParams.scalar(RHO, SX, SY)
    base = StateSpaceModel(_lg_init, _lg_trans, _lg_obs, _phi0(), vectorized=True)
    _, ys = base.simulate(jax.random.key(3), 6)

    def build(phi):
        return base.with_params(phi).guided(ys, _lg_proposal)

    return build, float(kalman_filter(theta, ys).log_likelihood)


def _phi0():
    return {"a": jnp.asarray(0.5), "b": jnp.asarray(0.3), "c": jnp.asarray(0.0)}


def _lg_init(p):
    return dist.Normal(jnp.zeros(1), S0).to_event(1)


def _lg_trans(p, t, x):
    return dist.Normal(RHO * x, SX).to_event(1)


def _lg_obs(p, t, x):
    return dist.Normal(x, SY).to_event(1)


def _lg_proposal(p, t, x_prev, y):
    loc = p["b"] * y if x_prev is None else p["a"] * x_prev + p["b"] * y
    return dist.Normal(loc, jnp.exp(p["c"])).to_event(1)


def test_every_bound_below_log_evidence(normal1d, guided_lgssm):
    target, log_z, m, s = normal1d
    q = _q1d(float(m[0]), float(np.sqrt(s[0, 0])), 0.5, 1.5)
    keys = jax.random.split(jax.random.key(20), 1000)
    objectives = {"elbo": vi.ELBO(), "iwae8": vi.IWAE(8), "renyi0.5": vi.RenyiBound(0.5, 8),
                  "smc8": vi.SMCBound(8)}
    found = {}
    for name, obj in objectives.items():
        mu, se = _mean_se(_estimates(obj, q, target, keys))
        found[name] = mu
        assert mu <= log_z + Z * se, (name, mu, se, log_z)
    # power means: ELBO ≤ Rényi_0.5 ≤ IWAE_8 = SMC_8 in expectation (one step: no resampling)
    assert found["elbo"] < found["renyi0.5"] < found["iwae8"]
    print("numpyro bounds", {k: round(v, 4) for k, v in found.items()}, "log p(x)", round(log_z, 4))

    build, log_lik = guided_lgssm
    phi = _phi0()
    fk = {"elbo": vi.ELBO(), "iwae8": vi.IWAE(8), "smc8": vi.SMCBound(8, ess_threshold=1.0)}
    found = {}
    for name, obj in fk.items():
        mu, se = _mean_se(_estimates(obj, phi, build, keys[:400]))
        found[name] = mu
        assert mu <= log_lik + Z * se, (name, mu, se, log_lik)
    assert found["elbo"] < found["iwae8"] < found["smc8"]  # resampling helps over T = 6 steps
    print("FK bounds", {k: round(v, 4) for k, v in found.items()}, "Kalman", round(log_lik, 4))


# ------------------------------------------------------------------------------------------------
# 3. gradients: score function and reparameterisation vs the analytic gradient; STL at the optimum
# ------------------------------------------------------------------------------------------------


def _elbo_grads(q, target, estimator, keys, num_samples, objective=None):
    obj = objective if objective is not None else vi.ELBO(num_samples)
    g = jax.jit(jax.vmap(jax.grad(lambda p, k: vi.bound(k, obj, p, target, estimator=estimator)),
                         in_axes=(None, 0)))(q, keys)
    return np.stack([np.asarray(g.loc[:, 0]), np.asarray(g.log_scale[:, 0])], 1).astype(np.float64)


def _broken_score_grads(q, target, keys, num_samples):
    """A score-function estimator whose learning signal lacks the −log q term (the entropy)."""

    def one(p, key):
        z = jax.lax.stop_gradient(p.sample(key, num_samples))
        log_q = p.log_prob(z)
        f = jax.vmap(target.log_joint)(z)  # broken: should be log p(x, z) − log q(z)
        b = (jnp.sum(f) - f) / (num_samples - 1)
        return jnp.mean(jax.lax.stop_gradient(f - b) * log_q)

    g = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))(q, keys)
    return np.stack([np.asarray(g.loc[:, 0]), np.asarray(g.log_scale[:, 0])], 1).astype(np.float64)


def test_gradient_estimators_match_analytic(normal1d):
    target, log_z, m, s = normal1d
    m, s = float(m[0]), float(np.sqrt(s[0, 0]))
    shift, widen = 0.8, 1.5
    q = _q1d(m, s, shift, widen)
    mu, sigma = m + shift * s, widen * s
    # ELBO = log p − KL(N(μ, σ²) ‖ N(m, s²)): ∂/∂μ = −(μ − m)/s², ∂/∂log σ = 1 − σ²/s²
    exact = np.array([-(mu - m) / s**2, 1.0 - sigma**2 / s**2])
    keys = jax.random.split(jax.random.key(30), 400)
    for est in ("reparameterisation", "score_function", "sticking_the_landing"):
        g = _elbo_grads(q, target, est, keys, 16)
        mean, se = _mean_se(g)
        print(est, mean, "±", se, "exact", exact)
        assert np.all(np.abs(mean - exact) <= Z * se), (est, mean, se, exact)
    # the broken estimator misses the entropy gradient (+1 on log σ): rejected
    g = _broken_score_grads(q, target, keys, 16)
    mean, se = _mean_se(g)
    print("broken score function", mean, "±", se)
    assert np.any(np.abs(mean - exact) > Z * se)
    # IWAE(4): the score-function gradient agrees with the reparameterised one
    obj = vi.IWAE(4, 16)
    ga, sa = _mean_se(_elbo_grads(q, target, "reparameterisation", keys, 0, obj))
    gb, sb = _mean_se(_elbo_grads(q, target, "score_function", keys, 0, obj))
    assert np.all(np.abs(ga - gb) <= Z * np.hypot(sa, sb)), (ga, gb, sa, sb)


def _two_sites():
    """a ~ N(0, 1), b ~ N(0, 1), y_a,i ~ N(a, 1), y_b,i ~ N(b, 1) (n = 4 each): independent
    Gaussian posteriors N(sum y / 5, 1/5) per site."""
    ya = np.asarray([0.3, -0.5, 1.2, 0.4], np.float32)
    yb = np.asarray([2.0, 1.1, 1.6, 2.4], np.float32)

    def model(ya, yb):
        import numpyro

        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("ya", dist.Normal(a, 1.0), obs=ya)
        numpyro.sample("yb", dist.Normal(b, 1.0), obs=yb)

    post_m = np.array([ya.sum() / 5, yb.sum() / 5])
    return from_numpyro(model, ya, yb), post_m, np.sqrt(0.2)


def test_per_latent_estimator_matches_analytic():
    target, m, s = _two_sites()
    names = [n for n, _, _ in target.layout]
    assert names == ["a", "b"]
    shift, widen = np.array([0.8, -0.6]), np.array([1.5, 0.7])
    mu, sigma = m + shift * s, widen * s
    q = vi.MeanFieldGaussian(jnp.asarray(mu, jnp.float32), jnp.asarray(np.log(sigma), jnp.float32))
    exact = np.concatenate([-(mu - m) / s**2, 1.0 - sigma**2 / s**2])
    keys = jax.random.split(jax.random.key(31), 300)

    def grads(fn):
        g = jax.jit(jax.vmap(jax.grad(fn), in_axes=(None, 0)))(q, keys)
        return np.concatenate([np.asarray(g.loc), np.asarray(g.log_scale)], 1).astype(np.float64)

    obj = vi.ELBO(16)
    est = {"a": "score_function"}  # b reparameterised
    g = grads(lambda p, k: vi.bound(k, obj, p, target, estimator=est))
    mean, se = _mean_se(g)
    print("per-latent", mean, "±", se, "exact", exact)
    assert np.all(np.abs(mean - exact) <= Z * se)
    # the score-function coordinates are noisier than the pathwise ones at the same draws
    assert se[0] > 2 * se[1]

    def broken(p, k):  # a's draws stopped without the score term: a's gradient loses E[L ∇ log q]
        z = p.sample(k, 16)
        z = z.at[:, 0].set(jax.lax.stop_gradient(z[:, 0]))
        return jnp.mean(jax.vmap(target.log_joint)(z) - p.log_prob(z))

    mean_b, se_b = _mean_se(grads(broken))
    print("broken per-latent", mean_b, "±", se_b)
    assert np.any(np.abs(mean_b - exact) > Z * se_b)
    with pytest.raises(ValueError, match="unknown latent sites"):
        vi.bound(jax.random.key(0), obj, q, target, estimator={"c": "score"})
    with pytest.raises(ValueError, match="per-latent estimators"):
        vi.bound(jax.random.key(0), obj, q, target, estimator={"a": "stl"})
    with pytest.raises(TypeError, match="factorises"):
        vi.bound(jax.random.key(0), obj, vi.FullRankGaussian.init(2), target, estimator=est)


def test_sticking_the_landing_zero_variance_at_optimum(normal1d):
    target, log_z, m, s = normal1d
    m, s = float(m[0]), float(np.sqrt(s[0, 0]))
    q = _q1d(m, s, 0.0, 1.0)  # the exact posterior
    keys = jax.random.split(jax.random.key(40), 500)
    stl = _elbo_grads(q, target, "stl", keys, 4)
    rep = _elbo_grads(q, target, "reparam", keys, 4)
    # reparameterised per-draw gradient at the optimum: −ε/σ and 1 − ε², so Var = (1/σ², 2)/M
    var_exact = np.array([1.0 / s**2, 2.0]) / 4
    var_rep = rep.var(0, ddof=1)
    r = keys.shape[0]
    lo, hi = scipy.stats.chi2.ppf([1e-5, 1 - 1e-5], r - 1) / (r - 1)
    print("gradient variance at the optimum: STL", stl.var(0), "reparam", var_rep, "exact", var_exact)
    assert np.all((var_rep / var_exact > lo) & (var_rep / var_exact < hi))
    # STL: zero up to float32 rounding of log p(x, z) − log q(z) (values ~ 10)
    assert np.all(np.abs(stl) < 1e-4) and np.all(stl.var(0) < 1e-4 * var_exact)


# ------------------------------------------------------------------------------------------------
# 4. the SMC bound: one particle is the ELBO, no resampling is IWAE (same keys, value and gradient)
# ------------------------------------------------------------------------------------------------


def test_smc_bound_special_cases(guided_lgssm):
    build, _ = guided_lgssm
    phi = _phi0()
    key = jax.random.key(50)

    @eqx.filter_jit
    def values(p):
        objs = (vi.SMCBound(1, 4, ess_threshold=1.0), vi.ELBO(4),
                vi.SMCBound(8, 4, ess_threshold=0.0), vi.IWAE(8, 4))
        return [vi.bound(key, o, p, build) for o in objs]

    @eqx.filter_jit
    def grads(p):  # one particle: the resampling step runs (N = 1) and must not change anything
        return [jax.grad(lambda q: vi.bound(key, o, q, build))(p)
                for o in (vi.SMCBound(1, 4, ess_threshold=1.0), vi.ELBO(4))]

    smc1, elbo, smc_sis, iwae = (float(v) for v in values(phi))
    print(f"SMC(N=1) {smc1:.6f} ELBO {elbo:.6f}; SMC(N=8, no resampling) {smc_sis:.6f} "
          f"IWAE(8) {iwae:.6f}")
    np.testing.assert_allclose(smc1, elbo, rtol=1e-5)
    np.testing.assert_allclose(smc_sis, iwae, rtol=1e-5)
    g1, g2 = grads(phi)
    for name in phi:
        np.testing.assert_allclose(g1[name], g2[name], rtol=1e-4, atol=1e-4)
    # (with resampling the SMC bound differs from IWAE: test_every_bound_below_log_evidence)


def test_fit_learned_proposal_improves_smc_bound(guided_lgssm):
    build, log_lik = guided_lgssm
    obj = vi.SMCBound(4, 8, ess_threshold=1.0)
    res = vi.fit(jax.random.key(61), _phi0(), obj, build, optax.adam(5e-2), 200, progress=False)
    # the loss trace holds independent estimates of −bound (fresh keys at every step)
    before, after = -res.losses[:20], -res.losses[-50:]
    (b, sb), (a, sa) = _mean_se(before), _mean_se(after)
    print(f"SMC bound (N=4): first 20 steps {b:.3f}, last 50 steps {a:.3f}, Kalman {log_lik:.3f}")
    assert a - b > Z * np.hypot(sa, sb)
    assert a <= log_lik + Z * sa


# ------------------------------------------------------------------------------------------------
# 5. flows, NaN reports, errors
# ------------------------------------------------------------------------------------------------


def test_flow_family(normal1d):
    target, log_z, _, _ = _conjugate([1.0, 2.0], [0.5, 1.0], 5, seed=1)
    flow = vi.coupling_flow(jax.random.key(0), 2, flow_layers=2, nn_width=8)
    z, lq, lq2 = eqx.filter_jit(
        lambda f: (lambda z, lq: (z, lq, f.log_prob(z)))(*f.sample_and_log_prob(jax.random.key(1), 16))
    )(flow)
    np.testing.assert_allclose(lq, lq2, rtol=1e-4, atol=1e-4)
    res = vi.fit(jax.random.key(2), flow, vi.ELBO(8), target, optax.adam(2e-2), 150,
                 progress=False)
    first, last = float(np.mean(res.losses[:20])), float(np.mean(res.losses[-20:]))
    print(f"flow: loss {first:.3f} -> {last:.3f}; -log p(x) = {-log_z:.3f}")
    assert not res.nan_stopped and last < first
    vals = _estimates(vi.ELBO(1), res.params, target, jax.random.split(jax.random.key(3), 1000))
    mu, se = _mean_se(vals)
    assert mu <= log_z + Z * se


def test_fit_stops_on_nan(normal1d):
    target = normal1d[0]
    q = vi.MeanFieldGaussian.init(1)
    with pytest.warns(RuntimeWarning, match="not finite at step"):
        res = vi.fit(jax.random.key(0), q, vi.ELBO(4), target, optax.sgd(1e30), 50,
                     chunk_size=8, progress=False)
    assert res.nan_stopped and res.num_steps_run < 50
    assert np.all(np.isfinite(np.asarray(res.params.loc)))
    assert int(res.state.step) == res.num_steps_run - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = vi.fit(jax.random.key(0), q, vi.ELBO(4), target, optax.adam(1e-2), 10,
                    chunk_size=8, progress=False)
    assert not ok.nan_stopped and ok.losses.shape == (10,) and int(ok.state.step) == 10


def test_errors(normal1d, guided_lgssm, no_shape_checks):
    target = normal1d[0]
    q = vi.MeanFieldGaussian.init(1)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="dimension"):
        vi.elbo(key, vi.MeanFieldGaussian.init(3), target)
    with pytest.raises(ValueError, match="sticking_the_landing"):
        vi.iwae(key, q, target, 4, estimator="stl")
    with pytest.raises(ValueError, match="num_samples >= 2"):
        vi.elbo(key, q, target, estimator="score")
    with pytest.raises(ValueError, match="unknown gradient estimator"):
        vi.elbo(key, q, target, estimator="magic")
    with pytest.raises(ValueError, match="alpha"):
        vi.RenyiBound(1.0, 4)
    with pytest.raises(ValueError, match="num_particles"):
        vi.IWAE(0)
    with pytest.raises(TypeError, match="variational family"):
        vi.elbo(key, {"loc": 0.0}, target)
    build, _ = guided_lgssm
    with pytest.raises(ValueError, match="only the 'reparameterisation'"):
        vi.bound(key, vi.ELBO(2), _phi0(), build, estimator="score")
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        vi.init(q, "adam")
    with pytest.raises(TypeError, match="target must be"):
        vi.elbo(key, q, 3.0)
