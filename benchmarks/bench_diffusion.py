r"""Steered diffusion sampling against a plain batched sampler and a per-step Python loop, in one run.

All three run the shipped digits network (``models/diffusion/digits.py``, unconditional, K reverse
Euler–Maruyama steps + Tweedie's \(\hat x_0\) at the end: K + 1 network evaluations per chain) on
the same number of chains, so the network evaluations (NFE) are equal:

- ``plain``   ``sample_digits``: one jitted ``lax.scan`` over the steps, all B·N chains in one batch
  (the fastest way to draw unsteered samples; no rewards, no weights, no resampling);
- ``fk``      FK steering (``models.diffusion.steering``) run by the engine ``samplers.smc.smc``:
  B independent runs of N particles as *islands* of one flat population
  (``samplers.sharding.Islands(B)``: resampling stays within each island of N, so the islands are
  exactly B independent SMC runs; a per-particle target class, one per island), DIFF potential on
  the verifier reward of \(\hat x_0\), resampling every ``--every`` steps: one image per island
  (its highest-reward particle);
- ``fk-every`` the same with rewards and resampling at every step (the most SMC work per step);
- ``fk-vmap``  the B runs as a ``vmap`` of ``smc`` over (key, class) instead of islands: the same
  law, but XLA runs the batched network of the ``vmap``-ed scan more slowly on CPU (measured below);
- ``python-loop`` the ``plain`` batch driven by a Python loop over the steps, each step a jitted
  call (the naive peer: one dispatch and one host round trip per step).

Reported: steady-state seconds per call (median of ``--reps``), network evaluations per second, and
the ratio to ``plain``: the SMC overhead is ``fk / plain - 1`` (target: at most 10 %).

    python benchmarks/bench_diffusion.py                 # B = 16 runs x N = 8 particles, K = 30
    python benchmarks/bench_diffusion.py --runs 64 --particles 16 --reps 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine_description  # noqa: E402
from samplers.sharding import Islands  # noqa: E402
from models.diffusion import (  # noqa: E402
    NULL_CLASS,
    ClassLogProb,
    Diff,
    EulerMaruyama,
    digits_fk_steering,
    fit_digits_classifier,
    load_digits_model,
    resampling_window,
    sample_digits,
    steering_diagnostics,
    steps_before_resampling,
)
from samplers.smc import smc  # noqa: E402


def _timed(fn, reps: int) -> tuple[float, float]:
    """(first call incl. compilation, median steady call) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=16, help="B: independent FK runs (images)")
    ap.add_argument("--particles", type=int, default=8, help="N: particles per run")
    ap.add_argument("--steps", type=int, default=30, help="K: reverse steps")
    ap.add_argument("--every", type=int, default=5, help="resample every k steps")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per method (median)")
    args = ap.parse_args(argv)
    b, n, k = args.runs, args.particles, args.steps
    model = load_digits_model()
    verifier = fit_digits_classifier("A")
    kernel = EulerMaruyama()
    chains = b * n
    nfe = chains * (k + 1)
    labels = jnp.full((chains,), NULL_CLASS, jnp.int32)
    key = jax.random.key(0)

    # plain: one jitted scan over the steps, all chains batched
    def plain():
        return sample_digits(key, model, labels, kernel, num_steps=k)

    # FK steering through the engine: B vmapped runs of N particles
    T = k + 1
    schedule = resampling_window(T, args.every)
    psteps = steps_before_resampling(schedule)
    targets = jnp.arange(b, dtype=jnp.int32) % 10
    keys = jax.random.split(key, b)

    islands = Islands("systematic", b)
    slot_targets = jnp.repeat(targets, n)  # particle i belongs to island i // n for the whole run

    slot_reward = ClassLogProb(verifier, slot_targets)  # built (and checked) outside jit

    @eqx.filter_jit
    def fk_islands(key, sched, psteps):
        m = digits_fk_steering(model, slot_reward, 5.0, Diff(), num_steps=k, potential_steps=psteps)
        res = smc(key, m, chains, ess_threshold=0.0, resample_schedule=sched, resampling=islands)
        x0 = res.particles.x0.reshape(b, n, -1)
        best = jnp.argmax(res.particles.reward.reshape(b, n), axis=1)
        return x0[jnp.arange(b), best], steering_diagnostics(res).nfe

    @eqx.filter_jit
    def fk_runs(keys, targets, sched, psteps):
        def one(key, target):
            m = digits_fk_steering(model, ClassLogProb(verifier, target), 5.0, Diff(), num_steps=k,
                                   potential_steps=psteps)
            res = smc(key, m, n, ess_threshold=0.0, resample_schedule=sched)
            return res.particles.x0, steering_diagnostics(res).nfe

        return jax.vmap(one)(keys, targets)

    def fk():
        return fk_islands(key, schedule, psteps)

    every_step = resampling_window(T, 1)
    all_steps = jnp.ones((T,), bool)

    def fk_every():
        return fk_islands(key, every_step, all_steps)

    def fk_vmap():
        return fk_runs(keys, targets, schedule, psteps)

    # the naive peer: a Python loop over steps, one jitted step per call
    times = model.sde.time_grid(k, 1e-3)

    @eqx.filter_jit
    def step(model, x, key, s, s_next):
        eps = model.eps(x, s, labels)
        mean, std = kernel.mean_std(model.sde, x, eps, s, s_next)
        return mean + std * jax.random.normal(key, mean.shape, mean.dtype)

    @eqx.filter_jit
    def final(model, x, s):
        return model.tweedie(x, model.eps(x, s, labels), s)

    def python_loop():
        k_init, k_chain = jax.random.split(key)
        x = jax.random.normal(k_init, (chains, 64))
        step_keys = jax.random.split(k_chain, k)
        for i in range(k):
            x = step(model, x, step_keys[i], times[i], times[i + 1])
        return final(model, x, times[-1])

    rows = []
    for name, fn in [("plain", plain), ("fk", fk), ("fk-every", fk_every), ("fk-vmap", fk_vmap),
                     ("python-loop", python_loop)]:
        first, steady = _timed(fn, args.reps)
        rows.append({"method": name, "compile_s": first - steady, "steady_s": steady,
                     "nfe_per_s": nfe / steady})
    assert int(fk()[1]) == nfe and int(np.asarray(fk_vmap()[1]).sum()) == nfe  # equal NFE, checked
    base = rows[0]["steady_s"]
    print(f"# {machine_description()}; jax {jax.__version__}")
    print(f"# digits network, K = {k} Euler-Maruyama steps, {b} runs x {n} particles = {chains} chains, "
          f"NFE {nfe} per call (equal for every method); resampling every {args.every} steps for fk")
    print(f"{'method':<12} {'steady s':>9} {'NFE/s':>10} {'images/s':>9} {'vs plain':>9} {'compile s':>9}")
    for r in rows:
        images = b if r["method"].startswith("fk") else chains
        print(f"{r['method']:<12} {r['steady_s']:9.4f} {r['nfe_per_s']:10.0f} {images / r['steady_s']:9.1f} "
              f"{r['steady_s'] / base:9.3f} {r['compile_s']:9.1f}")
    fk_row = rows[1]
    print(f"SMC overhead (fk / plain - 1): {100 * (fk_row['steady_s'] / base - 1):+.1f} %")
    return rows


if __name__ == "__main__":
    main()
