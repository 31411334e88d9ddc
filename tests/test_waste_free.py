"""Waste-free tempered SMC (samplers/waste_free.py) against the conjugate model's exact evidence
and posterior, with the same statistical checks and broken kernel as tests/test_tempering.py."""

from __future__ import annotations

from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_tempering import FAST_COMPILE, PoweredRandomWalk, passes, problem, zscores  # noqa: F401

from samplers.smc import smc
from samplers.tempering import AdaptiveTempering
from samplers.waste_free import WasteFreeTempering

N, P, R = 256, 8, 64  # particles, chain length (M = 32 chains), runs


def _model(target, power):
    base = AdaptiveTempering(target, kernel=PoweredRandomWalk(power=power), target_ess=0.5)
    return WasteFreeTempering(base, P)


@pytest.fixture(scope="module")
def wf_runs(problem):  # noqa: F811
    """R runs with the correct kernel (power 1) and with a broken one (power 1/2), one compile."""
    target = problem["target"]

    def one(key, power):
        res = smc(key, _model(target, power), N, ess_threshold=1.0, max_steps=24)
        return dict(log_evidence=res.log_evidence, log_weights=res.log_weights,
                    samples=target.constrain(res.particles.z), num_steps=res.num_steps,
                    reached=res.reached_max_steps, steps=res.model_info["mcmc_steps"])

    def run(keys, powers):
        return jax.vmap(jax.vmap(one, (0, None)), (None, 0))(keys, powers)

    keys = jax.random.split(jax.random.key(5), R)
    powers = jnp.asarray([1.0, 0.5])
    compiled = jax.jit(run).lower(keys, powers).compile(FAST_COMPILE)
    out = jax.tree.map(np.asarray, compiled(keys, powers))
    return [SimpleNamespace(**jax.tree.map(lambda v: v[i], out)) for i in range(2)]


def test_waste_free_matches_exact(wf_runs, problem):  # noqa: F811
    good = wf_runs[0]
    assert not good.reached.any()
    z = zscores(good, problem)
    print("waste-free z-scores:", z, "steps", good.num_steps[:8])
    assert passes(z), z
    # every move is P − 1 MCMC steps from M = N / P starts
    t = int(good.num_steps[0])
    np.testing.assert_array_equal(good.steps[0, 1:t], P - 1)


def test_waste_free_broken_kernel_is_rejected(wf_runs, problem):  # noqa: F811
    z = zscores(wf_runs[1], problem)
    print("broken kernel z-scores:", z)
    assert not passes(z), z


def test_chains_keep_every_state(problem):  # noqa: F811
    """One move: the first M particles are distinct starts taken from the population, and the N
    outputs are M chains of P states each (a random walk of step size 0 leaves each chain constant)."""
    target = problem["target"]
    model = _model(target, 1.0)
    parts = model.init(jax.random.key(0), N)
    frozen = eqx.tree_at(lambda m: m.base.step_size, model, jnp.zeros(()))
    moved = eqx.filter_jit(lambda m, k, p: m.move(k, jnp.asarray(1), p))(frozen, jax.random.key(1), parts)
    z0, z1 = np.asarray(parts.z), np.asarray(moved.z).reshape(P, N // P, -1)
    rows = {r.tobytes() for r in z0}
    assert all(r.tobytes() in rows for r in z1[0])           # the starts come from the population
    assert len({r.tobytes() for r in z1[0]}) == N // P        # M distinct starts
    np.testing.assert_array_equal(z1, np.broadcast_to(z1[0], z1.shape))  # no move: constant chains
    moving = eqx.filter_jit(lambda m, k, p: m.move(k, jnp.asarray(1), p))(model, jax.random.key(1), parts)
    z2 = np.asarray(moving.z).reshape(P, N // P, -1)
    np.testing.assert_array_equal(z2[0], z1[0])                # the same starts for the same key
    assert np.mean(np.any(z2[1:] != z2[:1], axis=-1)) > 0.2    # and the chains move from there
    with pytest.raises(ValueError, match="multiple of chain_length"):
        model.init(jax.random.key(0), N + 1)
    with pytest.raises(ValueError, match="chain_length"):
        WasteFreeTempering(model.base, 1)


def test_tempered_smc_entry_point(problem):  # noqa: F811
    """``tempered_smc(..., waste_free=P)`` runs the same model: P − 1 moves per step, no
    unmixed-move warning, results with the usual fields."""
    import warnings

    from samplers.tempering import tempered_smc

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = tempered_smc(jax.random.key(2), problem["target"], num_particles=N, waste_free=P,
                           kernel="rwm", progress=False)
    t = int(res.num_steps)
    np.testing.assert_array_equal(res.mcmc_steps[1:t], P - 1)
    assert int(res.num_unmixed_steps) == 0 and np.isfinite(float(res.log_evidence))
    assert abs(float(res.log_evidence) - problem["log_z"]) < 1.0
    with pytest.raises(ValueError, match="multiple of chain_length"):
        tempered_smc(jax.random.key(2), problem["target"], num_particles=N + 1, waste_free=P)
