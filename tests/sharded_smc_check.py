"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (the device count is
fixed when JAX initialises); prints one JSON line of results."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models.linear_gaussian import LGSSMParams, kalman_filter, lgssm  # noqa: E402
from samplers import smc_kernel  # noqa: E402
from samplers.sharding import Islands, particle_mesh, shard_particles  # noqa: E402
from samplers.smc import smc  # noqa: E402

T, N, R = 25, 2048, 4
PARAMS = LGSSMParams.scalar(0.9, 0.5, 1.0, 1.0)
SSM = lgssm(PARAMS)
_, YS = SSM.simulate(jax.random.key(0), T)
MODEL = SSM.bootstrap(YS)


def collectives(fn, *args):
    """Number of each collective in the compiled (SPMD-partitioned) program."""
    txt = jax.jit(fn).lower(*args).compile().as_text()
    return {op: txt.count(f" {op}(") + txt.count(f" {op}-start(")
            for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute")}


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = particle_mesh()
    keys = [jax.random.key(100 + r) for r in range(R)]
    out = {"log_z_exact": float(kalman_filter(PARAMS, YS).log_likelihood)}

    one = [smc(k, MODEL, N) for k in keys]
    eight = [smc(k, MODEL, N, mesh=mesh) for k in keys]
    out["global_1"] = [float(r.log_evidence) for r in one]
    out["global_8"] = [float(r.log_evidence) for r in eight]
    out["particles_equal"] = [bool(np.allclose(np.asarray(a.particles), np.asarray(b.particles),
                                               rtol=1e-4, atol=1e-5)) for a, b in zip(one, eight)]
    sh = eight[0].particles.sharding
    out["sharding"] = [str(sh.spec), len(sh.device_set)]
    out["resampled_steps"] = [int(r.resampled.sum()) for r in eight]

    islands = Islands("systematic", 8)
    out["islands_1"] = [float(smc(k, MODEL, N, resampling=islands).log_evidence) for k in keys[:3]]
    out["islands_8"] = [float(smc(k, MODEL, N, mesh=mesh, resampling=islands).log_evidence)
                        for k in keys[:3]]

    # communication of one sharded kernel step that resamples (global vs island)
    state = shard_particles(smc_kernel.init(jax.random.key(1), MODEL, N), mesh)
    for name, scheme in (("global", "systematic"), ("islands", islands)):
        out["collectives_" + name] = collectives(
            lambda k, s, scheme=scheme: smc_kernel.step(k, s, MODEL, resampling=scheme,
                                                        ess_threshold=1.0),
            jax.random.key(2), state)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
