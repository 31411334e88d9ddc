"""One prepared accelerator check (issue 17, item 5): run it the moment a GPU is available.

    python benchmarks/gpu_check.py --json gpu_check.json          # defaults sized for ≤ 8 minutes

Prints one table and writes the raw numbers as JSON:

1. ``sv``: the bootstrap filter on stochastic volatility (μ = −1, ρ = 0.95, σ = 0.3, T steps,
   systematic resampling when ESS < N/2) at N = 10^4 … 10^7: ``samplers.smc`` against a minimal
   hand-written JAX filter (one ``lax.scan``, ``searchsorted`` resampling) in the same run; median
   steady-state time after a compile call, particle-steps per second, log Ẑ of both (they must
   agree within Monte Carlo error);
2. ``sharded``: the same filter with the particles split over all devices present
   (``smc(..., mesh=particle_mesh())``), global and island resampling, against one device;
3. ``llm_decode``: JAX decode tokens/s at batch 1 / 16 / 64 through ``bench_llm_decode --mode gpu``
   (its memory-bandwidth floor and in-place gather cost; the transformers comparison of that
   script runs in its CPU mode and is not repeated here).

Not covered yet: the LLM particle filter at N = 64 … 512 (issue 17, item 5; to add). A step that
exceeds ``--budget-s`` stops the remaining sizes (reported as skipped) so the whole check stays in
its time slot. ``--toy`` runs every part at toy size (the test suite's CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.stochastic_volatility import SVParams, stochastic_volatility  # noqa: E402
from samplers.sharding import Islands, particle_mesh  # noqa: E402
from samplers.smc import smc  # noqa: E402

ESS_THRESHOLD = 0.5


def minimal_filter(key, ys, n, mu, rho, sigma):
    """The bootstrap filter written directly in JAX: the peer of ``samplers.smc`` (float32)."""

    def loglik(x, y):
        return -0.5 * (jnp.log(2 * jnp.pi) + x + y * y * jnp.exp(-x))

    k0, key = jax.random.split(key)
    x = mu + sigma / jnp.sqrt(1 - rho**2) * jax.random.normal(k0, (n,))
    lw = loglik(x, ys[0])
    log_z = jax.nn.logsumexp(lw) - jnp.log(n)
    lw = lw - jax.nn.logsumexp(lw)

    def step(carry, y):
        x, lw, log_z, key = carry
        key, k_u, k_x = jax.random.split(key, 3)
        ess = 1.0 / jnp.sum(jnp.exp(2 * lw))
        resample = ess < ESS_THRESHOLD * n
        cdf = jnp.cumsum(jnp.exp(lw))
        pos = (jnp.arange(n) + jax.random.uniform(k_u)) / n * cdf[-1]
        a = jnp.clip(jnp.searchsorted(cdf, pos, side="right"), 0, n - 1)
        x = jnp.where(resample, x[a], x)
        lw = jnp.where(resample, -jnp.log(n) * jnp.ones_like(lw), lw)
        x = mu + rho * (x - mu) + sigma * jax.random.normal(k_x, (n,))
        u = lw + loglik(x, y)
        inc = jax.nn.logsumexp(u)
        return (x, u - inc, log_z + inc, key), None

    (_, _, log_z, _), _ = jax.lax.scan(step, (x, lw, log_z, key), ys[1:])
    return log_z


def _time(fn, keys):
    """(compile + first run s, median steady s, log Ẑ of the steady runs)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(keys[0]))
    first = time.perf_counter() - t0
    times, logz = [], []
    for k in keys[1:]:
        t0 = time.perf_counter()
        z = jax.block_until_ready(fn(k))
        times.append(time.perf_counter() - t0)
        logz.append(float(z))
    return first, float(np.median(times)), logz


def sv_part(ns, t_len, repeats, budget_s, mesh_too):
    params = SVParams.default()
    mu, rho, sigma = float(params.mu), float(params.rho), float(params.sigma)
    ssm = stochastic_volatility(params)
    _, ys = ssm.simulate(jax.random.key(0), t_len)
    model = ssm.bootstrap(ys)
    keys = [jax.random.key(1 + r) for r in range(repeats + 1)]
    rows, sharded = [], []
    start = time.perf_counter()
    mesh = particle_mesh()
    for n in ns:
        if time.perf_counter() - start > budget_s:
            rows.append(dict(n=n, skipped=True))
            continue
        ours = jax.jit(lambda k, n=n: smc(k, model, n, resampling="systematic",
                                          ess_threshold=ESS_THRESHOLD).log_evidence)
        peer = jax.jit(lambda k, n=n: minimal_filter(k, ys, n, mu, rho, sigma))
        o_first, o_t, o_z = _time(ours, keys)
        p_first, p_t, p_z = _time(peer, keys)
        rows.append(dict(n=n, ours_s=o_t, peer_s=p_t, ours_compile_s=o_first - o_t,
                         peer_compile_s=p_first - p_t, ours_logz=o_z, peer_logz=p_z,
                         ratio=p_t / o_t, ours_psteps=n * t_len / o_t))
        if mesh_too and n % mesh.size == 0:
            for name, scheme in (("global", "systematic"), ("islands", Islands("systematic", mesh.size))):
                fn = jax.jit(lambda k, n=n, scheme=scheme: smc(
                    k, model, n, resampling=scheme, ess_threshold=ESS_THRESHOLD, mesh=mesh).log_evidence)
                first, t, z = _time(fn, keys)
                sharded.append(dict(n=n, devices=mesh.size, resampling=name, s=t, compile_s=first - t,
                                    one_device_s=o_t, speedup=o_t / t, logz=z))
    return rows, sharded


def llm_part(batch_sizes, new_tokens, tiny, out_dir):
    from benchmarks import bench_llm_decode

    path = os.path.join(out_dir, "llm_decode.json")
    argv = ["--mode", "gpu", "--batch-sizes", *map(str, batch_sizes), "--new-tokens", str(new_tokens),
            "--repeats", "1", "--gather-batch", str(batch_sizes[-1]), "--json", path]
    bench_llm_decode.main(argv + (["--tiny"] if tiny else []))
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-particles", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--num-steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new SV sizes after this")
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--toy", action="store_true", help="toy sizes everywhere (CPU smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.toy:
        args.num_particles, args.num_steps, args.repeats = [64, 128], 20, 2
        args.batch_sizes, args.new_tokens = [1, 2], 3

    devices = jax.devices()
    print(f"jax {jax.__version__}; backend {jax.default_backend()}; {len(devices)} device(s): "
          f"{devices[0].device_kind}", flush=True)
    t0 = time.perf_counter()
    sv, sharded = sv_part(args.num_particles, args.num_steps, args.repeats, args.budget_s, True)
    out_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else ROOT
    llm = None if args.skip_llm else llm_part(args.batch_sizes, args.new_tokens, args.toy, out_dir)
    total = time.perf_counter() - t0

    print(f"\nSV bootstrap filter, T = {args.num_steps} (median of {args.repeats} steady runs)")
    print("| N | ours s | minimal JAX s | ours / minimal speed | ours p-steps/s | log Ẑ ours | log Ẑ minimal |")
    print("|---|---|---|---|---|---|---|")
    for r in sv:
        if r.get("skipped"):
            print(f"| {r['n']:,} | skipped (budget) | | | | | |")
            continue
        print(f"| {r['n']:,} | {r['ours_s']:.4f} | {r['peer_s']:.4f} | {r['ratio']:.2f}x | "
              f"{r['ours_psteps']:.3g} | {np.mean(r['ours_logz']):.2f} | {np.mean(r['peer_logz']):.2f} |")
    if sharded:
        print(f"\nsharded over {sharded[0]['devices']} device(s)")
        print("| N | resampling | s | one device s | speed-up |")
        print("|---|---|---|---|---|")
        for r in sharded:
            print(f"| {r['n']:,} | {r['resampling']} | {r['s']:.4f} | {r['one_device_s']:.4f} | {r['speedup']:.2f}x |")
    print(f"\ntotal {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(devices=[str(d) for d in devices], backend=jax.default_backend(), sv=sv,
                           sharded=sharded, llm_decode=llm, total_s=total, T=args.num_steps), f, indent=1)
    return dict(sv=sv, sharded=sharded, llm_decode=llm)


if __name__ == "__main__":
    main()
