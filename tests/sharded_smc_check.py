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
from samplers.sharded_gather import ShardedResampling, local_ancestors, sharded_gather  # noqa: E402
from samplers.sharding import Islands, particle_mesh, shard_particles  # noqa: E402
from samplers.smc import smc  # noqa: E402

T, N, R = 25, 2048, 4
PARAMS = LGSSMParams.scalar(0.9, 0.5, 1.0, 1.0)
SSM = lgssm(PARAMS)
_, YS = SSM.simulate(jax.random.key(0), T)
MODEL = SSM.bootstrap(YS)


def collectives(fn, *args):
    """Number of each collective in the compiled (SPMD-partitioned) program."""
    return count_collectives(jax.jit(fn).lower(*args).compile().as_text())


def count_collectives(txt):
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
    out.update(island_exchange(mesh))
    out.update(llm_particles(mesh))
    print(json.dumps(out))


def np_cross(anc, d=8):
    """Slots whose ancestor lives on another device, and the minimum over placements (numpy)."""
    anc = np.asarray(anc)
    b = anc.shape[0] // d
    children = np.bincount(anc // b, minlength=d)
    return int(np.sum(anc // b != np.arange(anc.shape[0]) // b)), int(np.sum(np.maximum(b - children, 0)))


def island_exchange(mesh):
    """One island resampling step whose island ESS is below K/2 (an exchange), gathered on the mesh
    (only the copied islands' rows cross) and on one device; and the exchange rule."""
    n, b = 256, 32
    one = Islands("systematic", 8, exchange_threshold=0.5)
    eight = Islands("systematic", 8, exchange_threshold=0.5, mesh=mesh)

    @jax.jit
    def step(x, xs):
        lw = jnp.repeat(jnp.linspace(-5.0, 0.0, 8), b) + 0.1 * jax.random.normal(jax.random.key(5), (n,))
        lw = lw - jax.nn.logsumexp(lw)
        even = jnp.full((n,), -jnp.log(n))
        anc = one(jax.random.key(6), lw)
        moved, stats = sharded_gather(xs, anc, mesh)
        rule = (one.exchanges(lw), one.exchanges(even), one.log_weights_after(lw),
                one.log_weights_after(even), one(jax.random.key(6), even))
        return anc, one.gather(x, anc), eight.gather(xs, anc), moved, stats.rows_sent, rule

    x = jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3)
    anc, ref, moved8, moved, rows_sent, rule = step(x, shard_particles(x, mesh))
    source = np.asarray(anc).reshape(8, b)[:, 0] // b
    ex, ex_even, after, after_even, anc_even = (np.asarray(r) for r in rule)
    return {"exchange_gather_equal": bool(np.array_equal(np.asarray(ref), np.asarray(moved))
                                          and np.array_equal(np.asarray(ref), np.asarray(moved8))),
            "exchange_rows_sent": int(rows_sent),
            "exchange_islands_copied": int(np.sum(source != np.arange(8))), "island_size": b,
            "exchange_rule": [bool(ex), bool(ex_even),
                              bool(np.allclose(after, -np.log(n))),  # equal weights after it
                              bool(np.allclose(after_even, -np.log(n))),
                              bool(np.all(anc_even // b == np.arange(n) // b))]}  # no exchange


def llm_particles(mesh, n=64):
    """The LLM particle filter (Markov-chain LM) with ShardedResampling: 1 vs 8 devices, and the
    rows its gather sends between devices."""
    from models.llm_fk import toy_reasoning_model

    model = toy_reasoning_model(proposal=True)
    key = jax.random.key(3)
    runs = [smc(key, model, n, max_steps=model.max_num_steps, **kw)
            for kw in (dict(resampling=ShardedResampling("systematic", num_devices=8)),
                       dict(resampling=ShardedResampling("systematic", mesh), mesh=mesh))]
    out = {"llm_1": float(runs[0].log_evidence), "llm_8": float(runs[1].log_evidence),
           "llm_tokens_equal": bool(np.array_equal(np.asarray(runs[0].particles.lm.tokens),
                                                   np.asarray(runs[1].particles.lm.tokens))),
           "llm_sharding": str(runs[1].particles.lm.tokens.sharding.spec)}
    out["llm_resampled"] = int(runs[1].resampled.sum())

    # the gather alone, on LLM particles, for ancestors of uneven weights across devices
    particles = runs[1].particles

    # systematic and multinomial ancestors (numpy) of weights uneven within and across devices
    rng = np.random.default_rng(9)
    a_all = []
    for scale in (0.0, 0.5, 2.0):
        w = np.exp(rng.normal(size=n) * scale + np.repeat(np.linspace(-2.0, 1.0, 8), n // 8))
        w /= w.sum()
        cdf = np.cumsum(w)
        a_all.append(np.minimum(np.searchsorted(cdf, (rng.uniform() + np.arange(n)) / n, side="right"), n - 1))
        a_all.append(rng.choice(n, size=n, p=w))
    a_all = np.stack(a_all).astype(np.int32)
    b_all = np.asarray(jax.jit(jax.vmap(lambda x: local_ancestors(x, 8)))(jnp.asarray(a_all)))
    out["permutation"] = [dict(same_counts=bool(np.array_equal(np.bincount(ai, minlength=n),
                                                               np.bincount(bi, minlength=n))),
                               stable=bool(np.all(bi[bi] == bi)), cross_plain=np_cross(ai),
                               cross_local=np_cross(bi)) for ai, bi in zip(a_all, b_all)]
    a, b = jnp.asarray(a_all[0]), jnp.asarray(b_all[0])
    gather = jax.jit(lambda p, anc: sharded_gather(p, anc, mesh, chunk_rows=2)).lower(particles, b).compile()
    for name, anc in (("plain", a), ("local", b)):
        moved, stats = gather(particles, anc)
        idx = np.asarray(anc)
        exact = all(np.array_equal(np.asarray(x), np.asarray(y)[idx]) for x, y in
                    zip(jax.tree.leaves(moved), jax.tree.leaves(particles)))
        out[f"gather_{name}"] = dict(exact=exact, rows_sent=int(stats.rows_sent),
                                     wire_rows=int(stats.wire_rows), cross=np_cross(idx))
    out["gather_collectives"] = count_collectives(gather.as_text())
    return out


if __name__ == "__main__":
    main()
