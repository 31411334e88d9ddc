"""Where a bootstrap-filter step's time goes, against the time a speed-up target allows.

Issue 2 asks for >= 20x the ``particles`` library at N = 10^4 on the stochastic-volatility filter
(``bench_sv_filter.py``). This script puts the engine's whole step beside the parts no filter can
skip, each timed as a ``lax.scan`` of T steps over N particles on its own (the same loop the engine
runs):

- ``loop``: the scan with an affine update only (per-step overhead of the compiled loop);
- ``bits``: 32 random bits per particle (threefry, the fused lowering of ``ppl.random``);
- ``normals``: N(0, 1) draws per particle (bits plus JAX's inverse-CDF transform, ``erf_inv``);
- ``move``: the SV transition x' = μ + ρ (x − μ) + σ ε (normals plus the affine map);
- ``move + weight``: the move plus the observation log-density and one ``exp`` of the weights;

and the budget: the peer's time per step (measured in the same run) divided by the target.

    python benchmarks/sv_step_budget.py                      # N = 10^4, T = 1000, target 20x
    python benchmarks/sv_step_budget.py --num-particles 1000 --target 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_sv_filter import ESS_THRESHOLD, bench_peer  # noqa: E402
from benchmarks.machine import machine_description  # noqa: E402
from models.stochastic_volatility import SVParams, stochastic_volatility  # noqa: E402
from ppl.random import fast_key  # noqa: E402
from samplers.smc import smc  # noqa: E402


def _best(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def _scan(body, n, steps):
    """T steps of ``x <- body(key_t, x, y_t)`` over N particles, keys as the engine folds them."""

    @jax.jit
    def run(key, ys):
        def step(carry, t_y):
            x, acc = carry
            t, y = t_y
            x, w = body(jax.random.fold_in(key, t), x, y)
            return (x, acc + w), None

        (x, acc), _ = jax.lax.scan(step, (jnp.zeros(n), 0.0), (jnp.arange(steps), ys))
        return acc

    return run


def parts(p: SVParams):
    mu, rho, sigma = p.mu, p.rho, p.sigma
    normal = lambda k, x: jax.random.normal(k, x.shape)  # noqa: E731

    def weight(x, y):
        log_g = -0.5 * (x + y * y * jnp.exp(-x))
        return jnp.sum(jnp.exp(log_g - jnp.max(log_g)))

    return {
        "loop": lambda k, x, y: (0.9 * x + 0.1, x[0]),
        "bits": lambda k, x, y: (0.9 * x + jax.random.bits(k, x.shape).astype(jnp.float32), x[0]),
        "normals": lambda k, x, y: (0.9 * x + normal(k, x), x[0]),
        "move": lambda k, x, y: (mu + rho * (x - mu) + sigma * normal(k, x), x[0]),
        "move + weight": lambda k, x, y: ((x2 := mu + rho * (x - mu) + sigma * normal(k, x)), weight(x2, y)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-particles", type=int, default=10_000)
    p.add_argument("--num-steps", type=int, default=1000)
    p.add_argument("--target", type=float, default=20.0, help="speed-up over the peer to budget for")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--peer-repeats", type=int, default=3)
    args = p.parse_args(argv)
    n, steps = args.num_particles, args.num_steps
    print(machine_description())

    params = SVParams.default()
    _, ys = stochastic_volatility().simulate(jax.random.key(0), steps)
    key = fast_key(jax.random.key(1))
    us = 1e6 / steps
    rows = []
    for name, body in parts(params).items():
        run = _scan(body, n, steps)
        rows.append((name, us * _best(lambda: run(key, ys), args.repeats)))
    model = stochastic_volatility().bootstrap(ys)
    filt = jax.jit(lambda k: smc(k, model, n, resampling="systematic", ess_threshold=ESS_THRESHOLD).log_evidence)
    rows.append(("whole engine step (smc)", us * _best(lambda: filt(jax.random.key(2)), args.repeats)))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "y.npy")
        np.save(path, np.asarray(ys, np.float64))
        peer = bench_peer(path, n, args.peer_repeats, params)
    peer_us = us * float(np.median(peer["wall"]))
    budget = peer_us / args.target

    print(f"\nN = {n}, T = {steps}; microseconds per step (best of {args.repeats} runs)")
    print("| part | µs per step | share of the budget |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.1f} | {100 * t / budget:.0f}% |")
    print(f"| peer step (particles {peer['version']}, median of {len(peer['wall'])}) | {peer_us:.1f} | |")
    print(f"| budget for {args.target:g}x = peer / {args.target:g} | {budget:.1f} | 100% |")
    print(f"\nwhole step: {peer_us / rows[-1][1]:.1f}x the peer; normals alone would allow "
          f"{peer_us / dict(rows)['normals']:.1f}x")


if __name__ == "__main__":
    main()
