"""The calibration harness of ``tests/test_calibration_harness.py`` at a larger size.

SBC (χ² on binned ranks, per coordinate) and TARP (expected-coverage area and Kolmogorov-Smirnov
p-value) at level 0.01 on: tempered SMC (``tempered_smc`` on the numpyro conjugate model
``models.conjugate.gaussian_mean_model``, default HMC move; and the test's closed-form density
with a random-walk move), PMMH on an AR(1)-plus-noise model with unknown ρ, and Gaussian
variational guides (full-rank: contains the posterior; mean-field: over-confident on this
correlated posterior, the broken variant). S simulations, L posterior draws each.

    python benchmarks/bench_calibration_harness.py            # S = 200, L = 19
    python benchmarks/bench_calibration_harness.py --sims 500
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402

import test_calibration_harness as h  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sims", type=int, default=200)
    p.add_argument("--draws", type=int, default=19)
    p.add_argument("--smc-particles", type=int, default=256)
    p.add_argument("--vi-steps", type=int, default=500)
    p.add_argument("--pmmh-particles", type=int, default=64)
    p.add_argument("--pmmh-warmup", type=int, default=200)
    p.add_argument("--pmmh-thin", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    s, l = args.sims, args.draws
    theta, ys = h.simulate_conjugate(args.seed, s)
    key = jax.random.key(args.seed)
    keys = jax.random.split(key, 12)
    lines = []

    def record(name, draws, truths, k, t0, extra=""):
        res_sbc, res_tarp = h.calibration(k, draws, truths)
        lines.append(h.row(f"{name}{extra}", res_sbc, res_tarp, time.perf_counter() - t0))
        print(lines[-1], flush=True)

    t = time.perf_counter()
    draws, steps = h.run_tempered_smc(keys[0], ys, l, args.smc_particles, numpyro=True)
    record(f"tempered SMC, numpyro model, HMC, N={args.smc_particles}", draws, theta, keys[1], t,
           f" ({steps.mean():.1f} SMC steps)")
    t = time.perf_counter()
    draws, steps = h.run_tempered_smc(keys[2], ys, l, args.smc_particles)
    record(f"tempered SMC, closed form, RWM, N={args.smc_particles}", draws, theta, keys[3], t)
    for name, mf in (("VI full-rank Gaussian", False), ("VI mean-field Gaussian (broken)", True)):
        t = time.perf_counter()
        draws, _ = h.run_vi(keys[4], ys, l, args.vi_steps, mean_field=mf)
        record(name, draws, theta, keys[5], t)
    rho, ys_ssm = h.simulate_ssm(keys[6], s)
    t = time.perf_counter()
    draws, acc = h.run_pmmh(keys[7], ys_ssm, args.pmmh_particles, args.pmmh_warmup,
                            l * args.pmmh_thin, args.pmmh_thin)
    record(f"PMMH, N={args.pmmh_particles}, T={h.SSM_T}", draws, rho, keys[8], t,
           f" (acceptance {acc.mean():.2f})")
    print(f"\nS = {s} simulations, L = {l} draws; level 0.01\n")
    print("| sampler | SBC p-values | SBC | TARP area (ATC) | TARP p-value | TARP | seconds |")
    print("|---|---|---|---|---|---|---|")
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
