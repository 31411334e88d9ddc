"""The SMC engine against exact answers: the Kalman filter on a linear-Gaussian model, closed-form
importance sampling, and a variable-horizon model with absorbing (``done``) particles.

Tolerances come from the Monte Carlo error of R independent runs (vmapped into one compiled call):
a z = 4 CLT bound on the mean of Ẑ/Z (E Ẑ = Z, Del Moral 2004), the 1/√N rate of the error of log Ẑ,
Bonferroni-corrected z bounds on filtering means. Each check is also run on a deliberately broken
filter (wrong observation variance, ignored absorption) and must reject it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from models.linear_gaussian import LGSSMParams, kalman_filter, lgssm
from ppl.feynman_kac import from_single_particle
from samplers.smc import smc

T = 20
RHO, SIGMA_X, SIGMA_Y, SIGMA_0 = 0.9, 0.5, 1.0, 1.0
PARAMS = LGSSMParams.scalar(RHO, SIGMA_X, SIGMA_Y, SIGMA_0)
# the deliberately broken filter: observation standard deviation off by 20 %
BROKEN = LGSSMParams.scalar(RHO, SIGMA_X, 1.2 * SIGMA_Y, SIGMA_0)
Z_BOUND = 4.0
SMALL_N, LARGE_N = 64, 1024
R_SMALL, R_LARGE = 400, 100


# ---------------------------------------------------------------------------------------------
# statistics (tolerances from the Monte Carlo error)
# ---------------------------------------------------------------------------------------------


def mean_ratio_test(log_zhat, log_z, z: float = Z_BOUND) -> bool:
    """Accept E[Ẑ/Z] = 1? |mean − 1| < z · sd / √R over R independent runs."""
    ratio = np.exp(np.asarray(log_zhat, np.float64) - float(log_z))
    if not np.all(np.isfinite(ratio)):
        return False
    return bool(abs(ratio.mean() - 1.0) < z * ratio.std(ddof=1) / np.sqrt(ratio.size))


def rmse_rate_test(err_small, err_large, n_small, n_large, z: float = Z_BOUND) -> bool:
    """Accept RMSE(log Ẑ) ∝ 1/√N between two particle numbers?

    log RMSE = ½ log MSE has delta-method standard error sd(e²) / (2 √R MSE) per particle number.
    """
    def log_rmse_and_se(e):
        e2 = np.asarray(e, np.float64) ** 2
        mse = e2.mean()
        return 0.5 * np.log(mse), e2.std(ddof=1) / (2 * np.sqrt(e2.size) * mse)

    a, se_a = log_rmse_and_se(err_small)
    b, se_b = log_rmse_and_se(err_large)
    expected = 0.5 * np.log(n_large / n_small)
    return bool(abs((a - b) - expected) < z * np.hypot(se_a, se_b))


def filtering_means_test(means, exact, alpha: float = 1e-4) -> bool:
    """Accept E[filtering mean estimate] = Kalman mean at every step (Bonferroni over T)?"""
    means = np.asarray(means, np.float64)
    se = means.std(0, ddof=1) / np.sqrt(means.shape[0])
    z = np.abs(means.mean(0) - np.asarray(exact)) / se
    return bool(np.all(z < stats.norm.isf(alpha / (2 * means.shape[1]))))


# ---------------------------------------------------------------------------------------------
# shared runs: one compiled vmapped call per particle number, reused for the broken filter
# ---------------------------------------------------------------------------------------------


def _make_runs(num_particles):
    @jax.jit
    def runs(keys, params, ys):
        model = lgssm(params).bootstrap(ys)

        def one(key):
            res = smc(key, model, num_particles, store_history=True)
            h = res.history
            means = jnp.sum(jnp.exp(h.log_weights) * h.particles[..., 0], axis=1)
            return res.log_evidence, means, res.resampled

        return jax.vmap(one)(keys)

    return runs


@pytest.fixture(scope="module")
def data():
    _, ys = lgssm(PARAMS).simulate(jax.random.key(0), T)
    kf = kalman_filter(PARAMS, ys)
    return ys, kf


@pytest.fixture(scope="module")
def lgssm_runs(data):
    ys, _ = data
    out = {}
    for n, r in ((SMALL_N, R_SMALL), (LARGE_N, R_LARGE)):
        runs = _make_runs(n)
        keys = jax.random.split(jax.random.key(n), r)
        for label, params in (("ok", PARAMS), ("broken", BROKEN)):
            out[n, label] = jax.tree.map(np.asarray, runs(keys, params, ys))
    return out


def test_evidence_is_unbiased(data, lgssm_runs):
    _, kf = data
    log_zhat, _, resampled = lgssm_runs[SMALL_N, "ok"]
    assert np.all(np.isfinite(log_zhat))
    # the default adaptive rule (ESS < N/2) resampled on some steps, not all
    assert 0 < resampled.sum(1).mean() < T - 1
    assert mean_ratio_test(log_zhat, kf.log_likelihood)


def test_evidence_check_rejects_wrong_observation_variance(data, lgssm_runs):
    _, kf = data
    assert not mean_ratio_test(lgssm_runs[SMALL_N, "broken"][0], kf.log_likelihood)


def test_log_evidence_error_shrinks_like_inverse_sqrt_n(data, lgssm_runs):
    _, kf = data
    err = {n: lgssm_runs[n, "ok"][0] - float(kf.log_likelihood) for n in (SMALL_N, LARGE_N)}
    assert rmse_rate_test(err[SMALL_N], err[LARGE_N], SMALL_N, LARGE_N)
    # the broken filter's error is a bias that does not shrink with N
    bad = {n: lgssm_runs[n, "broken"][0] - float(kf.log_likelihood) for n in (SMALL_N, LARGE_N)}
    assert not rmse_rate_test(bad[SMALL_N], bad[LARGE_N], SMALL_N, LARGE_N)


def test_filtering_means_match_kalman(data, lgssm_runs):
    _, kf = data
    exact = np.asarray(kf.means[:, 0])
    assert filtering_means_test(lgssm_runs[LARGE_N, "ok"][1], exact)
    assert not filtering_means_test(lgssm_runs[LARGE_N, "broken"][1], exact)


# ---------------------------------------------------------------------------------------------
# threshold 0 is importance sampling, exactly
# ---------------------------------------------------------------------------------------------


def test_threshold_zero_is_importance_sampling(data):
    """With ess_threshold=0 the engine never resamples and log Ẑ = log (1/N) Σ_i Π_t G_t(x^i),
    recomputed here in float64 from the stored trajectories. The same comparison fails on a run
    that resamples (same compiled function, forced by the schedule)."""
    ys, _ = data
    n = 32
    model = lgssm(PARAMS).bootstrap(ys)

    def run(schedule):
        return smc(jax.random.key(5), model, n, ess_threshold=0.0, resample_schedule=schedule,
                   store_history=True)

    def importance_log_evidence(res):
        x = np.asarray(res.history.particles[..., 0], np.float64)  # [T, N]
        y = np.asarray(ys[:, 0], np.float64)[:, None]
        log_g = stats.norm.logpdf(y, x, SIGMA_Y).sum(0)
        return logsumexp(log_g) - np.log(n), log_g

    res = run(jnp.zeros(T, bool))
    assert not np.any(np.asarray(res.resampled))
    assert np.array_equal(np.asarray(res.history.ancestors), np.tile(np.arange(n), (T, 1)))
    log_z_is, log_g = importance_log_evidence(res)
    assert float(res.log_evidence) == pytest.approx(log_z_is, abs=1e-3)
    np.testing.assert_allclose(np.asarray(res.log_weights), log_g - logsumexp(log_g), atol=1e-3)

    forced = run(jnp.ones(T, bool))
    assert np.all(np.asarray(forced.resampled)[1:])
    assert float(forced.log_evidence) != pytest.approx(importance_log_evidence(forced)[0], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# gradients (Ścibior & Wood 2021 stop-gradient resampling), short horizon
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grad_log_evidence_matches_kalman_gradient(data):
    """d log Ẑ / dρ, resampling every step, T = 5: the mean over R runs (a consistent score
    estimate, bias O(1/N)) agrees with the Kalman gradient; a wrong observation variance is
    rejected by the same z = 4 bound."""
    ys, _ = data
    ys5 = ys[:5]
    n, r = 256, 400

    def log_zhat(rho, sigma_y, key):
        params = LGSSMParams.scalar(rho, SIGMA_X, sigma_y, SIGMA_0)
        return smc(key, lgssm(params).bootstrap(ys5), n, ess_threshold=1.0).log_evidence

    grads = jax.jit(jax.vmap(jax.grad(log_zhat), in_axes=(None, None, 0)))
    exact = float(jax.grad(
        lambda rho: kalman_filter(LGSSMParams.scalar(rho, SIGMA_X, SIGMA_Y, SIGMA_0), ys5)
        .log_likelihood)(RHO))
    keys = jax.random.split(jax.random.key(11), r)

    def accept(g):
        g = np.asarray(g, np.float64)
        assert np.all(np.isfinite(g))
        return abs(g.mean() - exact) < Z_BOUND * g.std(ddof=1) / np.sqrt(r)

    assert accept(grads(RHO, SIGMA_Y, keys))
    assert not accept(grads(RHO, 1.2 * SIGMA_Y, keys))


# ---------------------------------------------------------------------------------------------
# pytree particles and compile-once
# ---------------------------------------------------------------------------------------------

MOVE_TRACES = {"flat": 0, "nested": 0}


def _normal_logpdf(y, mean, sd):
    return -0.5 * ((y - mean) / sd) ** 2 - jnp.log(sd) - 0.5 * jnp.log(2 * jnp.pi)


def _flat_init(p, key):
    return p["s0"] * jax.random.normal(key)


def _flat_move(p, key, t, x):
    MOVE_TRACES["flat"] += 1
    return p["rho"] * x + p["sx"] * jax.random.normal(key)


def _flat_log_potential(p, t, prev, x):
    return _normal_logpdf(p["ys"][t], x, p["sy"])


def _nested_init(p, key):
    x = p["s0"] * jax.random.normal(key)
    return {"state": {"x": x}, "aux": (2.0 * x, jnp.zeros((), jnp.int32))}


def _nested_move(p, key, t, part):
    MOVE_TRACES["nested"] += 1
    x = p["rho"] * part["state"]["x"] + p["sx"] * jax.random.normal(key)
    return {"state": {"x": x}, "aux": (2.0 * x, part["aux"][1] + 1)}


def _nested_log_potential(p, t, prev, part):
    return _normal_logpdf(p["ys"][t], part["state"]["x"], p["sy"])


def _flat_model(params):
    """The scalar LGSSM bootstrap filter with a bare array particle."""
    return from_single_particle(_flat_init, _flat_move, _flat_log_potential, params=params,
                                num_steps=T)


def _nested_model(params):
    """The same filter (same random draws) with a nested dict/tuple particle carrying extras.
    The functions are module-level, so rebuilt models share one compiled engine."""
    return from_single_particle(_nested_init, _nested_move, _nested_log_potential, params=params,
                                num_steps=T)


def _dict_params(rho, ys):
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return {"rho": f(rho), "sx": f(SIGMA_X), "sy": f(SIGMA_Y), "s0": f(SIGMA_0),
            "ys": jnp.asarray(ys[:, 0])}


@pytest.fixture(scope="module")
def pytree_runs(data):
    ys, _ = data
    p1, p2 = _dict_params(RHO, ys), _dict_params(0.7, 2.0 * ys)
    kw = dict(ess_threshold=1.0, store_history=True)
    flat = smc(jax.random.key(1), _flat_model(p1), 32, **kw)
    before = MOVE_TRACES["nested"]
    nested = smc(jax.random.key(1), _nested_model(p1), 32, **kw)
    first = MOVE_TRACES["nested"] - before
    # other key, other parameter values of the same shapes, a freshly built model object
    nested2 = smc(jax.random.key(2), _nested_model(p2), 32, **kw)
    second = MOVE_TRACES["nested"] - before - first
    return flat, nested, nested2, first, second


def test_nested_pytree_particles(pytree_runs):
    flat, nested, _, _, _ = pytree_runs
    # the same draws and weights as the bare-array model
    assert float(nested.log_evidence) == pytest.approx(float(flat.log_evidence), abs=1e-5)
    np.testing.assert_allclose(nested.particles["state"]["x"], flat.particles, atol=1e-5)
    # every leaf was gathered with the same ancestors
    x = np.asarray(nested.particles["state"]["x"])
    np.testing.assert_allclose(np.asarray(nested.particles["aux"][0]), 2 * x, rtol=1e-6)
    assert np.all(np.asarray(nested.particles["aux"][1]) == T - 1)
    h = nested.history
    assert h.particles["state"]["x"].shape == (T, 32)
    np.testing.assert_allclose(h.particles["aux"][0], 2 * np.asarray(h.particles["state"]["x"]),
                               rtol=1e-6)
    ages = np.tile(np.arange(T)[:, None], (1, 32))
    assert np.array_equal(np.asarray(h.particles["aux"][1]), ages)


def test_engine_traces_once(pytree_runs):
    """Python-side calls of ``move`` happen at trace time only: a second call with another key
    and other parameter values of the same shapes reuses the compiled function."""
    _, nested, nested2, first, second = pytree_runs
    assert first >= 1
    assert second == 0
    assert float(nested.log_evidence) != float(nested2.log_evidence)


# ---------------------------------------------------------------------------------------------
# variable horizon: absorbing particles, while-loop path
# ---------------------------------------------------------------------------------------------

MAX_STEPS = 8
DONE_N = 32
WALK_SD = 0.5


def _done_init(p, key):
    kx, kl = jax.random.split(key)
    return {"x": jax.random.normal(kx), "age": jnp.zeros((), jnp.int32),
            "life": jax.random.randint(kl, (), 1, p["max_life"] + 1)}


def _done_move(p, key, t, part):
    return {"x": part["x"] + WALK_SD * jax.random.normal(key), "age": part["age"] + 1,
            "life": part["life"]}


def _done_log_potential(p, t, prev, part):
    return -0.5 * part["x"] ** 2


def _done_flag(p, part):
    return (part["age"] >= part["life"]) & p["absorb"]


def _done_model(max_life, absorb=True):
    """x_0 ~ N(0, 1), lifetime L ~ U{1..K}; until age L, x_t = x_{t-1} + ε/2, G_t = e^{-x_t²/2}.

    Z = (1/K) Σ_L (2π)^{(L+1)/2} p(y_{0:L} = 0) for the random walk observed with unit noise
    (Kalman). ``absorb=False`` breaks the model: it never reports done. K and the flag are array
    parameters, so every variant shares one compiled engine.
    """
    params = {"max_life": jnp.asarray(max_life, jnp.int32), "absorb": jnp.asarray(absorb)}
    return from_single_particle(_done_init, _done_move, _done_log_potential, done=_done_flag,
                                params=params)


def _done_exact_log_z(max_life):
    """log Z by a scalar Kalman recursion in float64 (random walk, y_t = 0, unit noise)."""
    m, v, log_p, logs = 0.0, 1.0, 0.0, []
    for t in range(max_life + 1):
        if t > 0:
            v = v + WALK_SD**2
        s = v + 1.0
        log_p += stats.norm.logpdf(0.0, m, np.sqrt(s)) + 0.5 * np.log(2 * np.pi)
        m, v = m * (1 - v / s), v - v**2 / s  # update with y_t = 0
        if t > 0:
            logs.append(log_p)  # life L = t: potentials at steps 0..L
    return logsumexp(logs) - np.log(max_life)


@pytest.fixture(scope="module")
def done_runs():
    @jax.jit
    def runs(keys, model, schedule):
        return jax.vmap(lambda k: smc(k, model, DONE_N, ess_threshold=0.0, max_steps=MAX_STEPS,
                                      resample_schedule=schedule, store_history=True))(keys)

    never, always = jnp.zeros(MAX_STEPS, bool), jnp.ones(MAX_STEPS, bool)
    few = jax.random.split(jax.random.key(3), 4)
    many = jax.random.split(jax.random.key(4), 400)
    out = {
        "is": runs(few, _done_model(5), never),
        "capped": runs(few, _done_model(12), never),
        "resampled": runs(many, _done_model(5), always),
        "broken": runs(many, _done_model(5, absorb=False), always),
    }
    return jax.tree.map(np.asarray, out)


def test_done_particles_stay_and_keep_weight(done_runs):
    res = done_runs["is"]
    for r in range(res.log_evidence.shape[0]):
        life = res.particles["life"][r]
        steps = int(res.num_steps[r])
        assert steps == life.max() + 1
        assert not res.reached_max_steps[r]
        assert np.array_equal(res.particles["age"][r], life)
        x = res.history.particles["x"][r]  # [MAX_STEPS, N]
        for i in range(DONE_N):
            # not moved after finishing
            assert np.all(x[life[i]:steps, i] == x[life[i], i])
        # weights: G_t for t ≤ L_i only, then kept; log Ẑ is importance sampling over them
        alive = np.arange(MAX_STEPS)[:, None] <= life[None, :]
        log_g = np.where(alive, -0.5 * x.astype(np.float64) ** 2, 0.0).sum(0)
        np.testing.assert_allclose(res.log_weights[r], log_g - logsumexp(log_g), atol=1e-4)
        assert float(res.log_evidence[r]) == pytest.approx(logsumexp(log_g) - np.log(DONE_N),
                                                           abs=1e-4)
        assert np.all(np.isnan(res.ess[r][steps:])) and np.all(np.isfinite(res.ess[r][:steps]))


def test_variable_horizon_reaches_cap(done_runs):
    res = done_runs["capped"]
    assert np.all(res.num_steps == MAX_STEPS)
    assert np.all(res.reached_max_steps)
    assert np.all(res.particles["age"] == np.minimum(res.particles["life"], MAX_STEPS - 1))


def test_variable_horizon_evidence_with_resampling(done_runs):
    res = done_runs["resampled"]
    exact = _done_exact_log_z(5)
    ran = np.arange(1, MAX_STEPS)[None, :] < res.num_steps[:, None]
    assert np.all(res.resampled[:, 1:][ran])
    # the loop stops at the first step after which every particle is done (with resampling, a
    # last step may start from an all-done population, when it dropped the unfinished particles)
    h = res.history.particles
    done = h["age"] >= h["life"]  # [R, MAX_STEPS, N]
    rows = np.arange(res.num_steps.shape[0])
    assert np.all(done[rows, res.num_steps - 1].all(-1))
    assert not np.any(done[rows, res.num_steps - 2].all(-1))
    assert not np.any(res.reached_max_steps)
    assert mean_ratio_test(res.log_evidence, exact)
    # a model that ignores absorption (moves and weights finished particles) is rejected
    assert not mean_ratio_test(done_runs["broken"].log_evidence, exact)
