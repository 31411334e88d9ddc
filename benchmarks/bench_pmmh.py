"""PMMH on stochastic volatility: this toolkit against ``particles``' PMMH in one run.

Model (Kim, Shephard & Chib 1998) with θ = (μ, ρ, σ) — ``models/stochastic_volatility.py`` and
``particles.state_space_models.StochVol`` are the same model. One data set (T = 500, true
θ = (−1, 0.95, 0.3)) is simulated once in JAX and handed to the peer through a ``.npy`` file.

Same settings on both sides: priors μ ~ N(0, 2²), ρ ~ U(−1, 1), σ ~ Gamma(2, rate 5); bootstrap
filter with N = 256 particles, systematic resampling when ESS < N/2; adaptive Gaussian random
walk (particles: on θ itself with a vanishing-rate covariance tracker; ours: on the unconstrained
θ, covariance and scale adapted during warmup); both chains start at the true θ. The measured
quantity is Metropolis-Hastings iterations per second, each iteration being one particle filter
(particles skips the filter when a proposal falls outside the prior's support; the number of
filters it ran is reported too).

Our timings exclude compilation (a first call with the same shapes is made beforehand and its time
reported). Ours are measured before *and* after the peer, and the mean is used: the machine may be
shared, and this keeps the ratio fair under a drifting load. Variants: ``vectorized-threefry`` (the
SV model as shipped, ``vectorized=True``, and JAX's default key — what a user gets), ``per-particle``
(``vectorized=False``: a ``vmap`` of single-particle draws, default key),
``vectorized-philox`` (``StateSpaceModel(vectorized=True)``: one batched draw and ``log_prob`` per
step, and ``jax.random.key(seed, impl="philox2x32")``), and ``C`` chains of the latter ``vmap``-ed
into one program (aggregate iterations per second; particles runs one chain at a time).

    python benchmarks/bench_pmmh.py                      # T=500, N=256, 1000 / 100 iterations
    python benchmarks/bench_pmmh.py --iters 300 --peer-iters 50 --chains 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

from benchmarks.machine import machine_description  # noqa: E402
from benchmarks.peer_env import run_in_peer  # noqa: E402
from models.stochastic_volatility import SVParams, stochastic_volatility  # noqa: E402
from samplers.pmmh import pmmh  # noqa: E402

ESS_THRESHOLD = 0.5
# initial random-walk standard deviations: on θ = (μ, ρ, σ) for particles, and the same steps mapped
# to our unconstrained coordinates (μ, logit((ρ + 1) / 2), log σ) at the true θ
PEER_SD = (0.05, 0.01, 0.02)
OUR_SD = (0.05, 0.01 * 2 / (1 - 0.95**2), 0.02 / 0.3)
PRIOR = {
    "mu": dist.Normal(0.0, 2.0),
    "rho": dist.Uniform(-1.0, 1.0),
    "sigma": dist.Gamma(2.0, 5.0),
}

PEER_CODE = r"""
import time, numpy as np, importlib.metadata
import particles
from particles import distributions as dists, mcmc, state_space_models as ssms
y = np.load({data_path!r})
prior = dists.StructDist({{"mu": dists.Normal(loc=0.0, scale=2.0),
                          "rho": dists.Uniform(a=-1.0, b=1.0),
                          "sigma": dists.Gamma(a=2.0, b=5.0)}})
theta0 = np.array([({mu!r}, {rho!r}, {sigma!r})], dtype=prior.dtype)
rw_cov = np.diag(np.array({peer_sd!r}) ** 2)
n_filters = [0]
class CountingPMMH(mcmc.PMMH):
    def alg_instance(self, theta):
        n_filters[0] += 1
        return super().alg_instance(theta)
def run(niter, seed):
    np.random.seed(seed)
    alg = CountingPMMH(ssm_cls=ssms.StochVol, prior=prior, data=y, Nx={n},
                       smc_options=dict(resampling="systematic", ESSrmin={ess!r}),
                       niter=niter, theta0=theta0, adaptive=True, rw_cov=rw_cov)
    n_filters[0] = 0
    w, c = time.perf_counter(), time.process_time()
    alg.run()
    return (time.perf_counter() - w, time.process_time() - c, n_filters[0], alg.acc_rate,
            {{k: float(np.mean(alg.chain.theta[k][niter // 2:])) for k in ("mu", "rho", "sigma")}})
run(5, 0)  # warm-up: imports, numba's compilation of the inverse CDF
wall, cpu, nf, acc, means = run({niter}, 1)
RESULT = dict(wall=wall, cpu=cpu, filters=nf, acc=acc, means=means,
              version=importlib.metadata.version("particles"), numpy=np.__version__)
"""


def _model(vectorized: bool):
    # the shipped SV model is vectorized; ``vectorized=False`` is the per-particle vmap
    return dataclasses.replace(stochastic_volatility(), vectorized=vectorized)


def run_ours(ys, *, n, iters, chains, vectorized, impl, seed):
    """(wall s, cpu s, result) of one compiled PMMH call (the compile happened before)."""
    warm = iters // 2
    ssm = _model(vectorized)
    init = {"mu": -1.0, "rho": 0.95, "sigma": 0.3}

    def call(key):
        return pmmh(key, ssm, ys, PRIOR, num_particles=n, num_samples=iters - warm,
                    num_warmup=warm, num_chains=chains, init_params=init,
                    proposal_cov=jnp.diag(jnp.asarray(OUR_SD) ** 2),
                    resampling="systematic", ess_threshold=ESS_THRESHOLD)

    w, c = time.perf_counter(), time.process_time()
    res = jax.block_until_ready(call(jax.random.key(seed, impl=impl)))
    return time.perf_counter() - w, time.process_time() - c, res


def _fmt(d):
    return "{" + ", ".join(f"{k}: {v:.3f}" for k, v in d.items()) + "}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-steps", type=int, default=500, help="T (default 500)")
    ap.add_argument("--num-particles", type=int, default=256, help="N (default 256)")
    ap.add_argument("--iters", type=int, default=1000, help="our MH iterations per chain")
    ap.add_argument("--peer-iters", type=int, default=100, help="particles' MH iterations")
    ap.add_argument("--chains", type=int, default=8, help="chains of the vmapped variant")
    args = ap.parse_args(argv)

    params = SVParams.default()
    _, ys = stochastic_volatility(params).simulate(jax.random.key(0), args.num_steps)
    n = args.num_particles
    load0 = os.getloadavg()
    print(f"machine: {machine_description()}; load average at start {load0[0]:.1f}", flush=True)
    print(f"jax {jax.__version__} ({jax.default_backend()}, float32); T = {args.num_steps}, "
          f"N = {n}; systematic resampling at ESS < {ESS_THRESHOLD} N", flush=True)

    variants = {  # name: (vectorized, key impl, chains)
        "vectorized-threefry": (True, "threefry2x32", 1),
        "per-particle": (False, "threefry2x32", 1),
        "vectorized-philox": (True, "philox2x32", 1),
        f"vectorized-philox x{args.chains} chains (vmap)": (True, "philox2x32", args.chains),
    }
    ours = {}
    for name, (vec, impl, ch) in variants.items():
        w, c, _ = run_ours(ys, n=n, iters=args.iters, chains=ch, vectorized=vec, impl=impl,
                           seed=100)  # compile (same shapes as below)
        ours[name] = dict(compile_wall=w, runs=[])
        print(f"ours {name:<30} first call (with compilation) {w:6.1f}s", flush=True)

    def measure(tag):
        for name, (vec, impl, ch) in variants.items():
            w, c, res = run_ours(ys, n=n, iters=args.iters, chains=ch, vectorized=vec,
                                 impl=impl, seed=len(ours[name]["runs"]) + 1)
            ours[name]["runs"].append((w, c))
            ours[name]["acc"] = float(np.mean(res.acceptance_rate))
            ours[name]["means"] = {k: float(np.mean(v)) for k, v in res.params.items()}
            it = args.iters * ch
            print(f"ours {name:<30} ({tag}) {it / w:8.1f} it/s wall  {it / c:8.1f} it/s CPU  "
                  f"acc {ours[name]['acc']:.2f}", flush=True)

    measure("before peer")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "sv_y.npy")
        np.save(data_path, np.asarray(ys, np.float64))
        peer = run_in_peer(PEER_CODE.format(
            data_path=data_path, mu=float(params.mu), rho=float(params.rho),
            sigma=float(params.sigma), n=n, ess=ESS_THRESHOLD, niter=args.peer_iters,
            peer_sd=PEER_SD))
    p_it_w = args.peer_iters / peer["wall"]
    p_it_c = args.peer_iters / peer["cpu"]
    print(f"peer particles {peer['version']} (numpy {peer['numpy']}) {p_it_w:8.2f} it/s wall  "
          f"{p_it_c:8.2f} it/s CPU  acc {peer['acc']:.2f}  filters run {peer['filters']} of "
          f"{args.peer_iters} iterations", flush=True)
    measure("after peer")
    load1 = os.getloadavg()

    print(f"\nload average at end {load1[0]:.1f}\n")
    print("| variant | chains | compile s | ours it/s (wall) | ours it/s (CPU) | "
          "peer it/s (wall) | peer it/s (CPU) | ratio (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (vec, impl, ch) in variants.items():
        o = ours[name]
        wall = np.mean([r[0] for r in o["runs"]])
        cpu = np.mean([r[1] for r in o["runs"]])
        it = args.iters * ch
        compile_s = o["compile_wall"] - wall
        print(f"| {name} | {ch} | {compile_s:.1f} | {it / wall:.1f} | {it / cpu:.1f} | "
              f"{p_it_w:.2f} | {p_it_c:.2f} | {it / wall / p_it_w:.1f}x | "
              f"{it / cpu / p_it_c:.1f}x |")
    print(f"\nposterior means of the second half (short chains, a sanity check only): ours "
          f"vectorized-philox {_fmt(ours['vectorized-philox']['means'])}, "
          f"peer {_fmt(peer['means'])}")
    print("ratio = our iterations per second / particles' iterations per second, same run; ours is "
          "the mean of the measurements before and after the peer.")


if __name__ == "__main__":
    main()
