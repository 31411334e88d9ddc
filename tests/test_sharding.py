"""Sharded SMC (issue 17, item 2): the particle axis over a mesh of 8 simulated CPU devices.

Exact reference: the Kalman log-likelihood of a linear-Gaussian model. The 8-device runs happen in
a subprocess (``tests/sharded_smc_check.py``) because the device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``):
- global resampling: the same key gives the same log Ẑ and particles on 1 and 8 devices (JAX's
  random bits do not depend on the sharding; float32 reductions in another order may flip a rare
  resampling decision, so agreement is required to 1e-3 nats, far below the Monte Carlo sd);
- island resampling: the same on 1 and 8 devices, and its compiled step has no
  collective-permute (no particle crosses a device) and fewer collectives than the global one;
- unbiasedness of island resampling (Ẑ / Z has mean 1), in process on one device (the algorithm
  does not depend on the placement), and a broken variant that forgets the islands' masses is
  rejected by the same test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.linear_gaussian import LGSSMParams, kalman_filter, lgssm
from samplers.sharding import Islands, particle_mesh
from samplers.smc import smc

ROOT = Path(__file__).resolve().parents[1]
T = 25
PARAMS = LGSSMParams.scalar(0.9, 0.5, 1.0, 1.0)
SSM = lgssm(PARAMS)
_, YS = SSM.simulate(jax.random.key(0), T)
MODEL = SSM.bootstrap(YS)
Z_BOUND = 4.0  # |z| of the mean of Ẑ / Z (R independent runs)


class NoMassIslands(Islands):
    """Broken: resampled islands get equal weights −log N, forgetting each island's mass."""

    def log_weights_after(self, log_weights):
        return -jnp.log(float(log_weights.shape[0]))


def _z_of_mean_ratio(scheme, n=64, reps=1000):
    f = jax.jit(jax.vmap(lambda k: smc(k, MODEL, n, resampling=scheme).log_evidence))
    log_z = np.asarray(f(jax.random.split(jax.random.key(7), reps)), np.float64)
    ratio = np.exp(log_z - float(kalman_filter(PARAMS, YS).log_likelihood))
    return (ratio.mean() - 1) / (ratio.std(ddof=1) / np.sqrt(reps))


def test_island_resampling_is_unbiased_and_the_massless_variant_is_rejected():
    """8 islands of 8 particles: Ẑ unbiased (Vergé et al. 2015); forgetting the masses biases
    Ẑ down (measured z ≈ −22)."""
    assert abs(_z_of_mean_ratio(Islands("systematic", 8))) < Z_BOUND
    assert abs(_z_of_mean_ratio(NoMassIslands("systematic", 8))) > Z_BOUND


def test_islands_validation():
    with pytest.raises(ValueError, match="equal islands"):
        smc(jax.random.key(0), MODEL, 30, resampling=Islands("systematic", 8))
    with pytest.raises(ValueError, match="num_islands"):
        Islands("systematic", 0)
    with pytest.raises(NotImplementedError):
        Islands("systematic", 2).conditional(jax.random.key(0), jnp.zeros(4), 0)
    mesh = particle_mesh(jax.devices()[:1])
    res = smc(jax.random.key(0), MODEL, 16, mesh=mesh)  # a one-device mesh is valid
    assert np.isfinite(float(res.log_evidence))


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_smc_check.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_particles_are_sharded_over_eight_devices(eight_devices):
    assert eight_devices["sharding"] == ["P('particles',)", 8]
    assert min(eight_devices["resampled_steps"]) > 0  # resampling ran on the mesh


def test_global_resampling_same_key_same_result_on_one_and_eight_devices(eight_devices):
    one, eight = np.array(eight_devices["global_1"]), np.array(eight_devices["global_8"])
    assert np.max(np.abs(one - eight)) < 1e-3
    assert np.mean(eight_devices["particles_equal"]) >= 0.5
    # and log Ẑ on 8 devices is within Monte Carlo error of the Kalman log-likelihood
    sd = max(np.std(one, ddof=1), 0.05)
    assert abs(np.mean(eight) - eight_devices["log_z_exact"]) < Z_BOUND * sd / np.sqrt(len(eight)) + sd**2


def test_island_resampling_is_local_on_eight_devices(eight_devices):
    np.testing.assert_allclose(eight_devices["islands_8"], eight_devices["islands_1"], atol=1e-3)
    glob, isl = eight_devices["collectives_global"], eight_devices["collectives_islands"]
    assert isl["collective-permute"] == 0 and isl["all-to-all"] == 0
    assert sum(isl.values()) < sum(glob.values())
