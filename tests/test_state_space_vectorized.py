"""``StateSpaceModel(vectorized=True)``: batched draws and densities against the Kalman filter.

Exact reference: the Kalman log-likelihood of a scalar linear-Gaussian model. Over R independent
runs (one compiled, vmapped call per filter), the mean of Ẑ/Z must be within a z = 4 CLT bound of 1
(E Ẑ = Z, Del Moral 2004), for the bootstrap and a guided filter. The same check rejects a model
whose observation standard deviation is 20 % off. The batched densities equal the per-particle
(vmapped) ones, and functions that do not broadcast over the particle axis get a clear error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from models.linear_gaussian import LGSSMParams, kalman_filter
from ppl.state_space import StateSpaceModel
from samplers.smc import smc

T, N, R = 20, 128, 300
Z_BOUND = 4.0
OK = {"rho": 0.9, "sx": 0.5, "sy": 1.0, "s0": 1.0}
BROKEN = {**OK, "sy": 1.2}


def _initial(p):
    return dist.Normal(0.0, p["s0"])


def _transition(p, t, x):
    return dist.Normal(p["rho"] * x, p["sx"])


def _observation(p, t, x):
    return dist.Normal(x, p["sy"])


def _proposal(p, t, x_prev, y):
    """A guided proposal pulled half-way towards y_t."""
    if x_prev is None:
        return dist.Normal(0.5 * y, p["s0"])
    mean = p["rho"] * x_prev
    return dist.Normal(mean + 0.5 * (y - mean), p["sx"])


def _ssm(params, vectorized=True):
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return StateSpaceModel(_initial, _transition, _observation, params, vectorized=vectorized)


def mean_ratio_test(log_zhat, log_z, z: float = Z_BOUND) -> bool:
    """Accept E[Ẑ/Z] = 1? |mean − 1| < z · sd / √R over R independent runs."""
    ratio = np.exp(np.asarray(log_zhat, np.float64) - float(log_z))
    if not np.all(np.isfinite(ratio)):
        return False
    return bool(abs(ratio.mean() - 1.0) < z * ratio.std(ddof=1) / np.sqrt(ratio.size))


@pytest.fixture(scope="module")
def data():
    _, ys = _ssm(OK, vectorized=False).simulate(jax.random.key(0), T)
    exact = LGSSMParams.scalar(OK["rho"], OK["sx"], OK["sy"], OK["s0"])
    return ys, float(kalman_filter(exact, ys[:, None]).log_likelihood)


@pytest.fixture(scope="module")
def runs(data):
    ys, _ = data

    @jax.jit
    def log_evidence(keys, params):
        ssm = _ssm(params)
        boot, guided = ssm.bootstrap(ys), ssm.guided(ys, _proposal)
        one = lambda k, m: smc(k, m, N).log_evidence  # noqa: E731
        return {"bootstrap": jax.vmap(lambda k: one(k, boot))(keys),
                "guided": jax.vmap(lambda k: one(k, guided))(keys)}

    keys = jax.random.split(jax.random.key(1), R)
    return {label: jax.tree.map(np.asarray, log_evidence(keys, p))
            for label, p in (("ok", OK), ("broken", BROKEN))}


@pytest.mark.parametrize("kind", ["bootstrap", "guided"])
def test_vectorized_evidence_is_unbiased(data, runs, kind):
    _, log_z = data
    assert mean_ratio_test(runs["ok"][kind], log_z)


@pytest.mark.parametrize("kind", ["bootstrap", "guided"])
def test_evidence_check_rejects_wrong_observation_variance(data, runs, kind):
    _, log_z = data
    assert not mean_ratio_test(runs["broken"][kind], log_z)


def test_batched_densities_equal_vmapped(data):
    ys, _ = data

    @jax.jit
    def densities(prev, x):
        t, t0 = jnp.asarray(3, jnp.int32), jnp.asarray(0, jnp.int32)
        out = []
        for make in (lambda s: s.bootstrap(ys), lambda s: s.guided(ys, _proposal)):
            for ssm in (_ssm(OK), _ssm(OK, vectorized=False)):
                m = make(ssm)
                out.append((m.log_potential(t, prev, x), m.log_transition(t, prev, x),
                            m.log_potential(t0, None, x), m.move(jax.random.key(4), t, prev)))
        return out

    prev = jax.random.normal(jax.random.key(2), (7,))
    x = jax.random.normal(jax.random.key(3), (7,))
    boot_vec, boot_per, guided_vec, guided_per = densities(prev, x)
    for vec, per in ((boot_vec, boot_per), (guided_vec, guided_per)):
        for a, b in zip(vec[:3], per[:3]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert vec[3].shape == per[3].shape == (7,)


def test_non_broadcasting_functions_are_rejected(data):
    ys, _ = data
    params = {k: jnp.asarray(v) for k, v in OK.items()}
    pooled_move = StateSpaceModel(_initial, lambda p, t, x: dist.Normal(jnp.mean(x), 1.0),
                                  _observation, params, vectorized=True)
    with pytest.raises(ValueError, match="vectorized=True but a draw has shape"):
        smc(jax.random.key(0), pooled_move.bootstrap(ys), 8)
    pooled_obs = StateSpaceModel(_initial, _transition,
                                 lambda p, t, x: dist.Normal(jnp.mean(x), 1.0), params,
                                 vectorized=True)
    with pytest.raises(ValueError, match="vectorized=True but log_prob has shape"):
        smc(jax.random.key(0), pooled_obs.bootstrap(ys), 8)
