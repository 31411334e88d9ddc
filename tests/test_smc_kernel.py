"""The SMC kernel (``samplers.smc_kernel``): init/step reproduce ``smc``; online filtering; vmapped
resampling; resampling after the last step.

- Online filtering (observations arrive one at a time, the kernel state carried between calls)
  gives exactly the log Ẑ of ``smc`` with the same random keys, and the jitted step compiles once.
- Under ``vmap`` (PMMH chains) ancestors come from a ``custom_vmap`` rule; every vmapped run must
  equal the same run alone (a rule that resampled chains whose flag is off would not).
- ``resample_final``: equally weighted particles whose mean over R runs matches the Kalman
  filtering mean (z-bound); the unweighted mean of unresampled particles (the broken variant) fails.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.linear_gaussian import LGSSMParams, kalman_filter, lgssm
from ppl.random import fast_key
from samplers import smc, smc_kernel

T = 12
PARAMS = LGSSMParams.scalar(0.9, 0.5, 1.0, 1.0)
SSM = lgssm(PARAMS)
_, YS = SSM.simulate(jax.random.key(0), T)
MODEL = SSM.bootstrap(YS)


def _smc_keys(key, num):
    """The per-step keys that ``smc`` gives the kernel."""
    k = fast_key(key)
    k_init, _, k = jax.random.split(k, 3)
    keys = []
    for _ in range(num):
        keys.append(k)
        k = jax.random.split(k, 4)[0]
    return k_init, keys


def test_online_filtering_matches_smc_and_compiles_once():
    key = jax.random.key(3)
    n = 128
    ref = smc(key, MODEL, n)
    k_init, keys = _smc_keys(key, T - 1)
    traces = []

    @eqx.filter_jit
    def step(k, state, model):
        traces.append(1)  # runs only when tracing
        return smc_kernel.step(k, state, model)

    state = eqx.filter_jit(smc_kernel.init)(k_init, SSM.bootstrap_online(YS[0]), n)
    ess = [state.ess]
    for t in range(1, T):
        state, info = step(keys[t - 1], state, SSM.bootstrap_online(YS[t]))  # y_t has just arrived
        ess.append(info.ess)
        assert int(state.step) == t
    assert len(traces) == 1, f"the online step recompiled ({len(traces)} traces)"
    np.testing.assert_allclose(state.log_evidence, ref.log_evidence, rtol=1e-5)
    np.testing.assert_allclose(state.log_weights, ref.log_weights, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ess), ref.ess, rtol=1e-4)
    # and the exact answer is near: |log Ẑ − log Z| within a generous multiple of its O(T/N) error
    exact = float(kalman_filter(PARAMS, YS).log_likelihood)
    assert abs(float(state.log_evidence) - exact) < 1.0


def test_kernel_state_and_info_fields():
    state = smc_kernel.init(jax.random.key(0), MODEL, 16)
    assert isinstance(state, smc_kernel.SMCState) and int(state.step) == 0
    np.testing.assert_allclose(jax.nn.logsumexp(state.log_weights), 0.0, atol=1e-5)
    state, info = smc_kernel.step(jax.random.key(1), state, MODEL, ess_threshold=1.0)
    assert isinstance(info, smc_kernel.SMCInfo)
    assert bool(info.resampled) and info.ancestors.shape == (16,)
    state2, info2 = smc_kernel.step(jax.random.key(2), state, MODEL, ess_threshold=0.0)
    assert not bool(info2.resampled)
    np.testing.assert_array_equal(info2.ancestors, np.arange(16))
    np.testing.assert_allclose(state2.log_evidence, state.log_evidence + info2.log_evidence_increment)


def test_kernel_rejects_bad_input():
    state = smc_kernel.init(jax.random.key(0), MODEL, 8)
    with pytest.raises(ValueError, match="ess_threshold"):
        smc_kernel.step(jax.random.key(1), state, MODEL, ess_threshold=1.5)
    with pytest.raises(ValueError, match="reference"):
        smc_kernel.step(jax.random.key(1), state, MODEL, ancestor_sampling=True)
    with pytest.raises(TypeError, match="AbstractFeynmanKac"):
        smc_kernel.init(jax.random.key(0), object(), 8)
    with pytest.raises(ValueError, match="num_particles"):
        smc_kernel.init(jax.random.key(0), MODEL, 0)


@pytest.mark.parametrize("conditional", [False, True])
def test_vmapped_runs_equal_single_runs(conditional):
    """Each chain of a vmapped run resamples exactly when it would alone (threshold 0.5)."""
    n, c = 32, 6
    keys = jax.random.split(jax.random.key(7), c)
    ref = None
    if conditional:
        ref = jax.tree.map(lambda x: x[:, 0], smc(jax.random.key(8), MODEL, n, store_history=True)
                           .history.particles)

    def run(k):
        return smc(k, MODEL, n, ess_threshold=0.5, reference=ref, ancestor_sampling=conditional,
                   store_history=True)

    batched = jax.jit(jax.vmap(run))(keys)
    flags = np.asarray(batched.resampled)
    assert 0 < flags[:, 1:].mean() < 1, "the test needs chains that resample at different steps"
    assert (flags != flags[:1]).any(), "the chains should not all resample at the same steps"
    for i in range(c):
        single = run(keys[i])
        np.testing.assert_array_equal(flags[i], np.asarray(single.resampled))
        np.testing.assert_array_equal(batched.history.ancestors[i], single.history.ancestors)
        np.testing.assert_allclose(batched.log_evidence[i], single.log_evidence, rtol=1e-5)
        np.testing.assert_allclose(batched.particles[i], single.particles, rtol=1e-5, atol=1e-6)


def test_vmapped_gradient_of_log_evidence():
    """Reverse mode through the scan of steps works per chain and under vmap (equal values)."""
    def log_z(rho, key):
        return smc(key, lgssm(PARAMS._replace(A=jnp.reshape(rho, (1, 1)))).bootstrap(YS), 32).log_evidence

    keys = jax.random.split(jax.random.key(9), 3)
    g = jax.jit(jax.vmap(jax.grad(log_z), in_axes=(None, 0)))(0.9, keys)
    g_single = np.array([jax.grad(log_z)(0.9, k) for k in keys])
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, g_single, rtol=1e-4, atol=1e-4)


def test_resample_final_equally_weighted_and_unbiased():
    """Resampling after the last step is unbiased given the weights: with the same key the
    resampled mean minus the weighted mean Σ W x of the unresampled run has mean 0 (z-bound over
    R runs). The broken variant (the unweighted mean of the unresampled particles) is rejected."""
    n, r, t = 16, 2000, 5
    model = SSM.bootstrap(YS[:t])

    def run(k):
        res = smc(k, model, n, ess_threshold=0.0, resample_final=True)
        plain = smc(k, model, n, ess_threshold=0.0)  # the same run before the final resampling
        weighted = jnp.sum(jnp.exp(plain.log_weights) * plain.particles[:, 0])
        return res.particles[:, 0], res.log_weights, res.final_ancestors, weighted, plain.particles[:, 0]

    keys = jax.random.split(jax.random.key(11), r)
    xs, lw, anc, weighted, plain = jax.jit(jax.vmap(run))(keys)
    np.testing.assert_allclose(lw, -math.log(n), atol=1e-6)
    assert anc.shape == (r, n)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(plain), np.asarray(anc), 1), xs)
    z = 4.0

    def centred(d):
        d = np.asarray(d, np.float64)
        return abs(d.mean()) < z * d.std(ddof=1) / math.sqrt(d.size)

    assert centred(np.asarray(xs).mean(axis=1) - weighted)
    assert not centred(np.asarray(plain).mean(axis=1) - weighted)  # ignores the weights


class _CountingModel(type(MODEL)):
    """The bootstrap filter with a per-step statistic: the number of particles moved."""

    def step_info(self, t, previous, particles):
        return {"moved": jnp.asarray(particles.shape[0], jnp.int32), "t": jnp.asarray(t, jnp.int32)}


def test_step_info_hook_is_recorded_per_step():
    model = _CountingModel(MODEL.ssm, MODEL.observations, MODEL.num_steps)
    res = smc(jax.random.key(0), model, 8)
    np.testing.assert_array_equal(res.step_info["t"], np.arange(T))
    np.testing.assert_array_equal(res.step_info["moved"], np.full(T, 8))
    assert res.model is None  # the model is not adaptive: nothing else travels in the loop
    assert smc(jax.random.key(0), MODEL, 8).step_info is None
