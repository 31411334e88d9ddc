"""Cost of vmapped particle filters against their resampling rate (the PMMH-chains situation).

``C`` bootstrap filters on the stochastic-volatility model (T steps, N particles, systematic
resampling) are ``vmap``-ed into one compiled call, as PMMH does with its chains, at ESS thresholds
0 (never resample), 0.5 and 1 (every step). Under ``vmap`` a ``lax.cond`` on a per-chain predicate
becomes a select that runs both branches: before the kernel refactor every chain resampled at every
step whatever the threshold. The engine now draws ancestors through a ``custom_vmap`` rule that
only works for the chains whose flag is set, so the cost should follow the measured resampling
rate. The peer of this benchmark is the same filter at threshold 1 in the same run (the ratio
time(0.5) / time(1) against the rate), and ``--root`` runs it on another checkout (before/after).

    python benchmarks/bench_vmap_resampling.py                     # C=8, T=500, N=1024
    python benchmarks/bench_vmap_resampling.py --root /tmp/old      # an earlier checkout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=ROOT, help="checkout whose samplers/models are imported")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--num-steps", type=int, default=500)
    ap.add_argument("--num-particles", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pmmh-iters", type=int, default=200,
                    help="also time PMMH with --chains vmapped chains (N=256, threshold 0.5); 0 skips")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.root))
    sys.path.insert(1, ROOT)

    import jax
    import numpy as np

    from benchmarks.machine import machine_description
    from models.stochastic_volatility import stochastic_volatility
    from samplers.smc import smc

    ssm = stochastic_volatility()
    _, ys = ssm.simulate(jax.random.key(0), args.num_steps)
    model = ssm.bootstrap(ys)
    keys = jax.random.split(jax.random.key(1), args.chains)
    out = {"machine": machine_description(), "root": os.path.abspath(args.root), "chains": args.chains,
           "T": args.num_steps, "N": args.num_particles, "rows": []}
    for thr in (0.0, 0.5, 1.0):
        run = jax.jit(jax.vmap(lambda k, th=thr: smc(k, model, args.num_particles, ess_threshold=th)))
        t0 = time.perf_counter()
        res = jax.block_until_ready(run(keys))
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(keys))
            best = min(best, time.perf_counter() - t0)
        rate = float(np.mean(np.asarray(res.resampled)[:, 1:]))
        row = {"ess_threshold": thr, "seconds": best, "compile_and_run": first, "resampling_rate": rate,
               "log_evidence_mean": float(np.mean(np.asarray(res.log_evidence)))}
        out["rows"].append(row)
        print(f"threshold {thr:3.1f}: {best * 1e3:8.1f} ms per vmapped call "
              f"({best / args.num_steps / args.chains * 1e6:6.1f} µs per chain-step), "
              f"resampling rate {rate:.3f}", flush=True)
    t = {r["ess_threshold"]: r["seconds"] for r in out["rows"]}
    out["cost_0.5_over_1.0"] = t[0.5] / t[1.0]
    out["cost_0.0_over_1.0"] = t[0.0] / t[1.0]
    print(f"machine: {out['machine']}\nroot: {out['root']}\n"
          f"time(0.5)/time(1.0) = {out['cost_0.5_over_1.0']:.2f}, time(0)/time(1.0) = {out['cost_0.0_over_1.0']:.2f}")
    if args.pmmh_iters:
        import jax.numpy as jnp
        import numpyro.distributions as dist

        from samplers.pmmh import pmmh

        prior = {"mu": dist.Normal(0.0, 2.0), "rho": dist.Uniform(-1.0, 1.0), "sigma": dist.Gamma(2.0, 5.0)}
        init = {"mu": -1.0, "rho": 0.95, "sigma": 0.3}
        sd = (0.05, 0.01 * 2 / (1 - 0.95**2), 0.02 / 0.3)

        def call(seed):
            return jax.block_until_ready(pmmh(
                jax.random.key(seed), ssm, ys, prior, num_particles=256, num_samples=args.pmmh_iters // 2,
                num_warmup=args.pmmh_iters // 2, num_chains=args.chains, init_params=init,
                proposal_cov=jnp.diag(jnp.asarray(sd) ** 2), resampling="systematic", ess_threshold=0.5))

        call(0)
        best = float("inf")
        for r in range(3):
            t0 = time.perf_counter()
            call(r + 1)
            best = min(best, time.perf_counter() - t0)
        out["pmmh_iterations_per_s"] = args.pmmh_iters * args.chains / best
        print(f"PMMH, {args.chains} vmapped chains, N=256, T={args.num_steps}: "
              f"{out['pmmh_iterations_per_s']:.1f} iterations/s (all chains)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
