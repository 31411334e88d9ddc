"""Bootstrap particle filter on stochastic volatility: this engine against ``particles`` in one run.

Model (Kim, Shephard & Chib 1998), parameters μ = −1, ρ = 0.95, σ = 0.3, as in
``models/stochastic_volatility.py``; ``particles.state_space_models.StochVol`` has the same
definition (X_0 ~ N(μ, σ²/(1−ρ²)), X_t = μ + ρ(X_{t−1} − μ) + σU_t, Y_t | X_t ~ N(0, e^{X_t})).
One data set of length T is simulated once in JAX and handed to the peer through a ``.npy`` file.
Both sides run the bootstrap filter with systematic resampling when ESS < 0.5 N.

For each N: compile time (first call minus the steady-state median) apart, then the median of
several steady-state runs (``block_until_ready``), particle-steps per second = N T / time, the ratio
ours / peer in wall-clock time and in process CPU time (the machine may be shared: CPU time is less
sensitive to other processes), and log Ẑ of both sides side by side (they must agree within Monte
Carlo error). The peer (NumPy 1.26, float64, numba-compiled inverse CDF) runs in its own virtual
environment ``.venv-particles/`` (see ``benchmarks/peer_env.py``), warmed up on a tiny problem
first so that numba's compilation is excluded; at N = 10^5 it runs once.

Engine variants (``--variants``):

- ``vectorized-threefry``: the model as shipped (``StateSpaceModel(..., vectorized=True)``: one
  batched draw and one batched ``log_prob`` per step) and JAX's default key, which the engine runs
  through the unrolled threefry of ``ppl.random`` (same numbers) — what a user gets;
- ``vectorized-philox``: the same model with a ``philox2x32`` key;
- ``vmap-threefry``: the per-particle model (``vectorized=False``: a ``vmap`` of single-particle
  numpyro draws) and the default key.

    python benchmarks/bench_sv_filter.py                                   # T=1000, N=1e3,1e4,1e5
    python benchmarks/bench_sv_filter.py --num-particles 1000 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from benchmarks.machine import machine_description  # noqa: E402
from benchmarks.peer_env import run_in_peer  # noqa: E402
from models.stochastic_volatility import SVParams, stochastic_volatility  # noqa: E402
from samplers.smc import smc  # noqa: E402

ESS_THRESHOLD = 0.5
VARIANTS = {
    # name: (vectorized model, PRNG implementation of the keys)
    "vectorized-threefry": (True, "threefry2x32"),
    "vectorized-philox": (True, "philox2x32"),
    "vmap-threefry": (False, "threefry2x32"),
}

PEER_CODE = r"""
import time, numpy as np, particles
from particles import state_space_models as ssms
y = np.load({data_path!r})
ssm = ssms.StochVol(mu={mu!r}, rho={rho!r}, sigma={sigma!r})
def run(n, data, seed):
    np.random.seed(seed)
    alg = particles.SMC(fk=ssms.Bootstrap(ssm=ssm, data=data), N=n, resampling="systematic",
                        ESSrmin={ess!r})
    w, c = time.perf_counter(), time.process_time()
    alg.run()
    return time.perf_counter() - w, time.process_time() - c, float(alg.logLt)
warmup = run(100, y[:50], 0)          # numba compiles the inverse CDF on its first call
runs = [run({n}, y, 1 + r) for r in range({repeats})]
RESULT = dict(warmup_wall=warmup[0], warmup_cpu=warmup[1],
              wall=[r[0] for r in runs], cpu=[r[1] for r in runs], logz=[r[2] for r in runs],
              version=__import__("importlib.metadata").metadata.version("particles"),
              numpy=np.__version__)
"""


def _time_ours(fn, keys):
    """(first wall, first cpu, steady walls, steady cpus, log Ẑ of the steady runs)."""
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(keys[0]))
    first = (time.perf_counter() - w, time.process_time() - c)
    walls, cpus, logz = [], [], []
    for k in keys[1:]:
        w, c = time.perf_counter(), time.process_time()
        res = jax.block_until_ready(fn(k))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        logz.append(float(res.log_evidence))
    return first, walls, cpus, logz


def bench_ours(variant, ys, n, repeats, seed=1):
    vectorized, impl = VARIANTS[variant]
    ssm = dataclasses.replace(stochastic_volatility(), vectorized=vectorized)
    model = ssm.bootstrap(ys)

    def fn(key):
        return smc(key, model, n, resampling="systematic", ess_threshold=ESS_THRESHOLD)

    keys = [jax.random.key(seed + r, impl=impl) for r in range(repeats + 1)]
    first, walls, cpus, logz = _time_ours(fn, keys)
    return dict(first_wall=first[0], first_cpu=first[1], wall=walls, cpu=cpus, logz=logz)


def bench_peer(data_path, n, repeats, params):
    code = PEER_CODE.format(data_path=data_path, mu=float(params.mu), rho=float(params.rho),
                            sigma=float(params.sigma), ess=ESS_THRESHOLD, n=n, repeats=repeats)
    return run_in_peer(code)


def _logz_summary(logz):
    logz = np.asarray(logz)
    sd = float(np.std(logz, ddof=1)) if logz.size > 1 else float("nan")
    return float(np.mean(logz)), sd, logz.size


def _agree(ours, peer):
    """|mean difference| within 4 standard errors (the peer's sd is taken from ours when it ran
    once: same algorithm, same N)."""
    (mo, so, no), (mp, sp, n_p) = ours, peer
    if not math.isfinite(sp):
        sp = so
    se = math.sqrt(so**2 / no + sp**2 / n_p)
    return abs(mo - mp) <= 4 * se, (mo - mp) / se if se > 0 else float("inf")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-steps", type=int, default=1000, help="T (default 1000)")
    ap.add_argument("--num-particles", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=5, help="steady-state runs of the engine")
    ap.add_argument("--peer-repeats", type=int, nargs="+", default=None,
                    help="steady-state runs of the peer per N (default 5 / 3 / 1 for N <= 1e3 / "
                         "<= 1e4 / larger)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", default=None, help="also write the raw measurements to this file")
    args = ap.parse_args(argv)
    if args.peer_repeats is not None and len(args.peer_repeats) != len(args.num_particles):
        ap.error("--peer-repeats needs one value per --num-particles")

    params = SVParams.default()
    t_len = args.num_steps
    _, ys = stochastic_volatility(params).simulate(jax.random.key(0), t_len)
    ys_np = np.asarray(ys, np.float64)
    load0 = os.getloadavg()
    print(f"machine: {machine_description()}; load average at start {load0[0]:.1f}", flush=True)
    print(f"jax {jax.__version__} ({jax.default_backend()}, float32); T = {t_len}; "
          f"ESS threshold {ESS_THRESHOLD}; systematic resampling", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "sv_y.npy")
        np.save(data_path, ys_np)
        for i, n in enumerate(args.num_particles):
            if args.peer_repeats is not None:
                peer_reps = args.peer_repeats[i]
            else:
                peer_reps = 5 if n <= 1000 else 3 if n <= 10_000 else 1
            ours = {}
            for v in args.variants:
                ours[v] = bench_ours(v, ys, n, args.repeats)
                o = ours[v]
                print(f"N={n:>6} ours {v:<20} first {o['first_wall']:6.2f}s  steady "
                      f"{np.median(o['wall']):7.4f}s wall {np.median(o['cpu']):7.4f}s cpu  "
                      f"log Z {np.mean(o['logz']):.2f}", flush=True)
            peer = bench_peer(data_path, n, peer_reps, params)
            print(f"N={n:>6} peer particles {peer['version']:<6} warm-up {peer['warmup_wall']:5.2f}s"
                  f"  steady {np.median(peer['wall']):7.4f}s wall {np.median(peer['cpu']):7.4f}s "
                  f"cpu  log Z {np.mean(peer['logz']):.2f}", flush=True)
            rows.append(dict(n=n, ours=ours, peer=peer))
    load1 = os.getloadavg()

    # ------------------------------------------------------------------------------ report
    def rate(n, secs):
        return n * t_len / secs

    print(f"\nload average at end {load1[0]:.1f}\n")
    print("| N | variant | compile s (wall / CPU) | ours p-steps/s | peer p-steps/s | ratio (wall) "
          "| ratio (CPU) | log Ẑ ours | log Ẑ peer | agree |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        n, peer = row["n"], row["peer"]
        p_wall, p_cpu = np.median(peer["wall"]), np.median(peer["cpu"])
        lp = _logz_summary(peer["logz"])
        for v, o in row["ours"].items():
            o_wall, o_cpu = np.median(o["wall"]), np.median(o["cpu"])
            compile_s = o["first_wall"] - o_wall
            compile_cpu = o["first_cpu"] - o_cpu
            lo = _logz_summary(o["logz"])
            ok, z = _agree(lo, lp)
            sd_p = f" ± {lp[1]:.2f}" if math.isfinite(lp[1]) else " (1 run)"
            print(f"| {n:,} | {v} | {compile_s:.1f} / {compile_cpu:.1f} | {rate(n, o_wall):.3g} "
                  f"| {rate(n, p_wall):.3g} "
                  f"| {p_wall / o_wall:.1f}x | {p_cpu / o_cpu:.1f}x | {lo[0]:.2f} ± {lo[1]:.2f} | "
                  f"{lp[0]:.2f}{sd_p} | {'yes' if ok else 'NO'} (z={z:+.1f}) |")
    peer0 = rows[0]["peer"]
    print(f"\npeer warm-up (N=100, T=50; numba compiles the inverse CDF, excluded above): "
          f"{peer0['warmup_wall']:.2f} s wall / {peer0['warmup_cpu']:.2f} s CPU; "
          f"numpy {peer0['numpy']}, particles {peer0['version']}")
    print("log Ẑ: mean ± sd over the steady runs; 'agree' = |difference| < 4 standard errors.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, T=t_len, load=[load0, load1], machine=machine_description()), f,
                      indent=1)


if __name__ == "__main__":
    main()
