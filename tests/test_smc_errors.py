"""Bad input gets clear Python errors; numerical failure inside jit is reported in the result.

The numerical-failure tests share one compiled engine: the failure mode is an array parameter of
the model (NaN potentials, −inf potentials, total extinction, +inf potentials).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.linear_gaussian import LGSSMParams, lgssm
from ppl.feynman_kac import VmappedFeynmanKac, from_single_particle
from samplers.smc import smc

# ill-typed input on purpose: the library's own errors, as users see them (no runtime type checker)
pytestmark = pytest.mark.usefixtures("no_shape_checks")

T = 6
N = 16
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def lgssm_model():
    params = LGSSMParams.scalar(0.9, 0.5, 1.0, 1.0)
    ssm = lgssm(params)
    _, ys = ssm.simulate(jax.random.key(1), T)
    return ssm, ys, ssm.bootstrap(ys)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3])
def test_num_particles_below_one(lgssm_model, n):
    with pytest.raises(ValueError, match="num_particles must be an int >= 1"):
        smc(KEY, lgssm_model[2], n)


@pytest.mark.parametrize("n", [10.0, "10", True, None])
def test_num_particles_not_int(lgssm_model, n):
    with pytest.raises(ValueError, match="num_particles must be an int"):
        smc(KEY, lgssm_model[2], n)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.5", None])
def test_ess_threshold_outside_unit_interval(lgssm_model, threshold):
    with pytest.raises(ValueError, match=r"ess_threshold must be a number in \[0, 1\]"):
        smc(KEY, lgssm_model[2], N, ess_threshold=threshold)


def test_not_a_feynman_kac_model(lgssm_model):
    with pytest.raises(TypeError, match="AbstractFeynmanKac"):
        smc(KEY, lgssm_model[0], N)  # the StateSpaceModel itself, not its bootstrap filter


def test_unknown_resampling(lgssm_model):
    with pytest.raises(ValueError, match="unknown resampling scheme"):
        smc(KEY, lgssm_model[2], N, resampling="sytematic")


def test_observation_time_axes_disagree(lgssm_model):
    ssm, ys, _ = lgssm_model
    with pytest.raises(ValueError, match="disagree on the number of time steps"):
        ssm.bootstrap({"a": ys, "b": ys[:-1]})


def test_observation_scalar(lgssm_model):
    with pytest.raises(ValueError, match="leading time axis"):
        lgssm_model[0].bootstrap(jnp.asarray(1.0))


@pytest.mark.parametrize("shape", [(T,), (T, 2), (T, 1, 1)])
def test_observation_shape_mismatch(lgssm_model, shape):
    """y_t must have the observation law's shape (1,) here; a broadcastable mismatch would be
    summed silently inside log_prob."""
    with pytest.raises(ValueError, match=r"each y_t should have shape \(1,\)"):
        lgssm_model[0].bootstrap(jnp.zeros(shape))


def test_num_steps_beyond_observations(lgssm_model):
    with pytest.raises(ValueError, match="exceeds the model's horizon"):
        smc(KEY, lgssm_model[2], N, num_steps=T + 1)


def test_bad_num_steps_and_max_steps(lgssm_model):
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        smc(KEY, lgssm_model[2], N, num_steps=0)
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        smc(KEY, _variable_model(), N, max_steps=2.5)


def _bad_shape_potential(p, t, prev, x):
    return jnp.stack([x, x])  # two values per particle: shape [N, 2] once batched


def _potential_bad_after_zero(p, t, prev, x):
    return -0.5 * x**2 if prev is None else jnp.stack([x, x])


def _init(p, key):
    return jax.random.normal(key)


def _move(p, key, t, x):
    return x + jax.random.normal(key)


def _potential(p, t, prev, x):
    return -0.5 * x**2


@pytest.mark.parametrize(
    "potential, where", [(_bad_shape_potential, "t=0"), (_potential_bad_after_zero, "step t")]
)
def test_log_potential_wrong_shape(potential, where):
    model = from_single_particle(_init, _move, potential, num_steps=T)
    with pytest.raises(ValueError, match=rf"log_potential must return shape \({N},\).*at {where}"):
        smc(KEY, model, N)


def test_init_wrong_leading_axis():
    class Bad(VmappedFeynmanKac):
        def init(self, key, num_particles):
            return jnp.zeros((num_particles + 1,))

    model = Bad(init_one=_init, move_one=_move, log_potential_one=_potential, num_steps=T)
    with pytest.raises(ValueError, match="leading axis"):
        smc(KEY, model, N)


def _variable_model():
    return from_single_particle(_init, _move, _potential, done=lambda p, x: x > 2.0)


def test_no_horizon_and_no_max_steps():
    with pytest.raises(ValueError, match="pass max_steps"):
        smc(KEY, _variable_model(), N)


def test_ancestor_sampling_without_reference(lgssm_model):
    with pytest.raises(ValueError, match="ancestor_sampling=True needs a reference"):
        smc(KEY, lgssm_model[2], N, ancestor_sampling=True)


def test_reference_too_short(lgssm_model):
    with pytest.raises(ValueError, match=rf"leading time axis of length >= {T}"):
        smc(KEY, lgssm_model[2], N, reference=jnp.zeros((T - 1, 1)))


def test_bad_resample_schedule(lgssm_model):
    with pytest.raises(ValueError, match="1-D boolean array"):
        smc(KEY, lgssm_model[2], N, resample_schedule=jnp.zeros(T))
    with pytest.raises(ValueError, match=f"resample_schedule needs {T} entries"):
        smc(KEY, lgssm_model[2], N, resample_schedule=jnp.zeros(T - 1, bool))


# ---------------------------------------------------------------------------------------------
# numerical failure inside jit: reported, never a silent NaN
# ---------------------------------------------------------------------------------------------

OK, NAN_ABOVE_ONE, NEG_INF_ABOVE_ONE, ALL_DEAD_AT_3, ALL_NAN_AT_3, POS_INF_AT_3 = range(6)


def _failing_potential(p, t, prev, x):
    """−x²/2, with the failure selected by p["mode"] (an array: all modes share one compile)."""
    mode = p["mode"]
    lg = -0.5 * x**2
    lg = jnp.where((mode == NAN_ABOVE_ONE) & (x > 1.0), jnp.nan, lg)
    lg = jnp.where((mode == NEG_INF_ABOVE_ONE) & (x > 1.0), -jnp.inf, lg)
    lg = jnp.where((mode == ALL_DEAD_AT_3) & (t == 3), -jnp.inf, lg)
    lg = jnp.where((mode == ALL_NAN_AT_3) & (t == 3), jnp.nan, lg)
    lg = jnp.where((mode == POS_INF_AT_3) & (t == 3) & (x > 0.0), jnp.inf, lg)
    return lg


@pytest.fixture(scope="module")
def failure_runs():
    run = jax.jit(lambda model: smc(jax.random.key(3), model, N, store_history=True))
    out = {}
    for mode in range(6):
        model = from_single_particle(_init, _move, _failing_potential,
                                     params={"mode": jnp.asarray(mode)}, num_steps=T)
        out[mode] = jax.tree.map(np.asarray, run(model))
    return out


def _assert_no_nan(res):
    for leaf in jax.tree.leaves(res):
        if np.issubdtype(leaf.dtype, np.floating):
            assert not np.any(np.isnan(leaf))


def test_healthy_run_reports_no_failure(failure_runs):
    res = failure_runs[OK]
    assert res.num_nan_potentials == 0 and not res.extinct and np.isfinite(res.log_evidence)
    _assert_no_nan(res)


def test_nan_potentials_are_counted_and_kill(failure_runs):
    res, twin = failure_runs[NAN_ABOVE_ONE], failure_runs[NEG_INF_ABOVE_ONE]
    expected = int(np.sum(res.history.particles > 1.0))  # potentials are evaluated on these
    assert expected > 0
    assert int(res.num_nan_potentials) == expected
    assert int(twin.num_nan_potentials) == 0
    # a NaN potential is exactly a −inf potential (a killed particle)
    assert float(res.log_evidence) == float(twin.log_evidence)
    np.testing.assert_array_equal(res.particles, twin.particles)
    assert not res.extinct and np.isfinite(res.log_evidence)
    _assert_no_nan(res)
    # killed particles carry zero weight
    assert np.all(np.exp(res.log_weights)[res.particles > 1.0] == 0.0)


@pytest.mark.parametrize("mode", [ALL_DEAD_AT_3, ALL_NAN_AT_3, POS_INF_AT_3])
def test_extinction_is_reported(failure_runs, mode):
    """Every particle killed at t = 3 (−inf or NaN), or a +inf potential (weights that cannot be
    normalised): extinct=True, log Ẑ = −inf, weights stay finite (uniform), no NaN anywhere."""
    res = failure_runs[mode]
    assert res.extinct
    assert res.log_evidence == -np.inf
    assert np.isneginf(res.log_evidence_increments[3])
    assert np.all(np.isfinite(res.log_weights))
    np.testing.assert_allclose(res.history.log_weights[3], -np.log(N), rtol=1e-6)
    assert np.all(np.isfinite(res.ess))
    if mode == ALL_NAN_AT_3:
        assert int(res.num_nan_potentials) == N
    _assert_no_nan(res)


@pytest.mark.parametrize("mode, message", [(NAN_ABOVE_ONE, "were NaN"), (ALL_DEAD_AT_3, "extinction")])
def test_failures_are_warned_after_the_call(mode, message):
    """An eager ``smc`` call also warns (the fields alone are easy to miss); a healthy run does not."""
    import warnings

    def model(m):
        return from_single_particle(_init, _move, _failing_potential, params={"mode": jnp.asarray(m)},
                                    num_steps=T)

    with pytest.warns(RuntimeWarning, match=message):
        smc(jax.random.key(3), model(mode), N)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        smc(jax.random.key(3), model(OK), N)


# ---------------------------------------------------------------------------------------------
# failures that speak: low final ESS, stuck chains, NaN data at the boundary, keys
# ---------------------------------------------------------------------------------------------


def _sharp_lgssm(obs_std):
    return lgssm(LGSSMParams.scalar(0.9, 1.0, obs_std))


def test_low_final_ess_warns():
    """Observations far sharper than the prior: after the last step one particle carries the
    weight (ESS < 1% of N) and the eager call says so; with the usual noise it stays silent."""
    import warnings

    ys = jnp.linspace(0.5, 2.0, 4)[:, None]
    with pytest.warns(RuntimeWarning, match="final effective sample size"):
        res = smc(jax.random.key(0), _sharp_lgssm(1e-3).bootstrap(ys), 256)
    assert float(res.ess[-1]) < 2.56
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = smc(jax.random.key(0), _sharp_lgssm(1.0).bootstrap(ys), 256)
    assert float(res.ess[-1]) > 2.56


def test_nan_observations_are_an_error_at_the_boundary():
    ssm = _sharp_lgssm(1.0)
    ys = np.zeros((5, 1), np.float32)
    ys[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite value.*time step 3"):
        ssm.bootstrap(ys)
    with pytest.raises(ValueError, match="non-finite"):
        ssm.guided(np.full((5, 1), np.inf, np.float32), lambda p, t, x, y: None)


def test_plain_list_observations_are_accepted():
    """A list of per-step observations is stacked on the time axis (it used to be reported as a
    scalar)."""
    model = _sharp_lgssm(1.0).bootstrap([[0.1], [0.2], [0.3]])
    assert model.num_steps == 3
    ref = _sharp_lgssm(1.0).bootstrap(jnp.asarray([[0.1], [0.2], [0.3]]))
    a, b = smc(jax.random.key(1), model, 16), smc(jax.random.key(1), ref, 16)
    np.testing.assert_array_equal(np.asarray(a.log_evidence), np.asarray(b.log_evidence))


def test_nan_in_numpyro_data_is_an_error():
    import numpyro
    import numpyro.distributions as dist

    from ppl.numpyro_model import from_numpyro

    def model(y):
        mu = numpyro.sample("mu", dist.Normal())
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = np.array([0.1, np.nan, 0.3, np.nan], np.float32)
    with pytest.raises(ValueError, match=r"model_args\[0\] contains 2 NaN value\(s\).*index \(1,\)"):
        from_numpyro(model, y)
    from_numpyro(model, np.nan_to_num(y))  # fine without NaN


def test_int_seed_as_key_is_a_clear_error(lgssm_model):
    with pytest.raises(TypeError, match=r"jax.random.key"):
        smc(0, lgssm_model[2], 8)


def test_stuck_chains_warn():
    """Random-walk Metropolis whose proposal is 10^4 times too wide (and no adaptation) accepts
    almost nothing: the eager call names the stuck chains; a well-tuned run stays silent."""
    import warnings

    import numpyro.distributions as dist

    from samplers.pmmh import random_walk_metropolis

    def log_lik(key, theta):
        return -0.5 * jnp.sum((theta["mu"] - 1.0) ** 2) * 100.0

    prior = {"mu": dist.Normal(0.0, 1.0)}
    kw = dict(num_samples=200, num_warmup=0, num_chains=2, adapt=False)
    with pytest.warns(RuntimeWarning, match="2 of 2 chain"):
        res = random_walk_metropolis(jax.random.key(0), log_lik, prior, proposal_cov=1e4 * jnp.eye(1), **kw)
    assert np.all(np.asarray(res.acceptance_rate) < 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = random_walk_metropolis(jax.random.key(0), log_lik, prior, proposal_cov=0.01 * jnp.eye(1), **kw)
    assert np.all(np.asarray(res.acceptance_rate) > 0.2)
