"""Bayesian workflow benchmark: tempered SMC against blackjax's adaptive tempered SMC and numpyro's
NUTS on the model zoo (``models/zoo``), in one run.

Accuracy is measured against each model's stored reference posterior (``ZooModel.reference()``,
long NUTS runs, or quadrature for the Gaussian mixture): for a run with weighted particles (or
draws) and every coordinate \\(j\\) of the compared sites,

    mean error  e_m = sqrt(mean_j ((m_j - ref_mean_j) / ref_sd_j)^2)     (RMS, in posterior sds)
    sd error    e_s = sqrt(mean_j log(s_j / ref_sd_j)^2)                 (RMS log ratio)

A setting is *accurate* when the medians over ``--reps`` independent runs of e_m and of e_s are at
most ``--tolerance`` (default 0.1: posterior means within a tenth of a posterior sd, sds within
about 10 %). Each method runs a ladder of budgets (particles for the SMC samplers, warm-up + draws
for NUTS); **time to accuracy** is the wall time (median over the reps; runs under 0.5 s timed as
the mean of repeated calls) of the cheapest accurate rung (``inf``: no rung reached it). The
reference's own Monte Carlo error (sd/sqrt(ESS), about 0.01 sd) is far below the tolerance.

Methods (same numpyro model, same unconstrained space, float32, compilation excluded: each
compiled program is called once before timing, and its first-call time is reported):

- ``ours``: ``samplers.tempering.tempered_smc`` with its defaults (HMC with 5 leapfrog steps,
  inverse mass matrix = weighted particle covariance, step size tuned to 0.8 acceptance, as many
  moves as the mean-squared-jump criterion needs, CESS = N/2);
- ``blackjax``: ``blackjax.adaptive_tempered_smc`` (ESS = N/2, systematic resampling), tuned as
  blackjax's documentation does with ``inner_kernel_tuning``, with HMC, 5
  leapfrog steps, ``num_mcmc_steps`` fixed moves per step (default 10, blackjax's default), the
  inverse mass matrix set to the particle covariance (``particles_covariance_matrix``) and
  per-particle step sizes updated by ``update_scale_from_acceptance_rate`` towards 0.65 after
  every step (the update of ``inner_kernel_tuning``, written out because it needs the previous
  step sizes);
- ``nuts``: ``numpyro.infer.NUTS`` (one chain, ``W`` warm-up + ``S`` draws with W = S).

Log-evidence: ``--evidence-reps`` independent runs of both SMC samplers at
``--evidence-particles``: the sd of log Ẑ, and ``var × time`` (variance ∝ 1/cost for SMC, so the
product compares them at equal time; smaller is better), and for the mixture (exact evidence by
quadrature) the z-score of the mean against the exact value.

    python benchmarks/bench_bayesian.py                                  # whole zoo, defaults
    python benchmarks/bench_bayesian.py --models eight_schools --reps 3 --particles 128 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import blackjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from blackjax.smc.tuning.from_kernel_info import update_scale_from_acceptance_rate  # noqa: E402
from blackjax.smc.tuning.from_particles import particles_covariance_matrix  # noqa: E402

from benchmarks.machine import machine_description  # noqa: E402
from models.zoo import ZOO, ZooModel, get  # noqa: E402
from samplers.tempering import tempered_smc  # noqa: E402


# ------------------------------------------------------------------------------------------------
# accuracy against the reference
# ------------------------------------------------------------------------------------------------


def errors(entry: ZooModel, ref, samples: dict, weights: np.ndarray) -> tuple[float, float]:
    """(e_m, e_s) of weighted draws ``samples[site]`` [n, ...] (module docstring)."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    em, es = [], []
    for site in entry.sites:
        x = np.asarray(samples[site], np.float64).reshape(w.shape[0], -1)
        m = w @ x
        s = np.sqrt(np.maximum(w @ (x - m) ** 2, 1e-300))
        rm, rs = np.ravel(ref.mean[site]), np.ravel(ref.sd[site])
        em.append((m - rm) / rs)
        es.append(np.log(s / rs))
    em, es = np.concatenate(em), np.concatenate(es)
    return float(np.sqrt(np.mean(em**2))), float(np.sqrt(np.mean(es**2)))


# ------------------------------------------------------------------------------------------------
# the three methods: each returns run(key) -> (samples, weights, log_z or nan), compiled on demand
# ------------------------------------------------------------------------------------------------


def ours(entry: ZooModel, target, n: int) -> Callable:
    def run(key):
        r = tempered_smc(key, target, num_particles=n, progress=False)
        return r.samples, np.exp(np.asarray(r.log_weights, np.float64)), float(r.log_evidence), \
            int(r.num_steps)

    return run


def blackjax_tempered(entry: ZooModel, target, n: int, num_mcmc_steps: int = 10,
                      num_leapfrog: int = 5, target_acceptance: float = 0.65) -> Callable:
    """blackjax's adaptive tempered SMC with the parameter update of ``inner_kernel_tuning``
    written out (the update needs the previous step sizes, which that wrapper does not pass)."""
    d = target.dim
    kernel = blackjax.mcmc.hmc.build_kernel()

    def step_fn(key, state, logdensity, step_size, inverse_mass_matrix):
        return kernel(key, state, logdensity, step_size, inverse_mass_matrix, num_leapfrog)

    def algo(params):
        return blackjax.adaptive_tempered_smc(
            target.log_prior, target.log_likelihood, step_fn, blackjax.hmc.init, params,
            blackjax.smc.resampling.systematic, target_ess=0.5, num_mcmc_steps=num_mcmc_steps)

    @jax.jit
    def run_jit(key):
        k0, k1 = jax.random.split(key)
        z0 = target.sample_prior(k0, n)
        params = {"step_size": jnp.full((n,), 1.0 / d**0.25), "inverse_mass_matrix": jnp.eye(d)[None]}
        state = algo(params).init(z0)

        def cond(c):
            return c[0].tempering_param < 1.0

        def body(c):
            state, params, key, log_z, steps = c
            key, sub = jax.random.split(key)
            state, info = algo(params).step(sub, state)
            acc = jnp.mean(info.update_info.acceptance_rate, axis=-1)  # [N], over the moves
            cov = particles_covariance_matrix(state.particles) + 1e-6 * jnp.eye(d)
            params = {"step_size": update_scale_from_acceptance_rate(params["step_size"], acc,
                                                                     target_acceptance),
                      "inverse_mass_matrix": cov[None]}
            return state, params, key, log_z + info.log_likelihood_increment, steps + 1

        state, _, _, log_z, steps = jax.lax.while_loop(
            cond, body, (state, params, k1, jnp.zeros(()), jnp.zeros((), jnp.int32)))
        return state.particles, state.weights, log_z, steps

    def run(key):
        z, w, log_z, steps = run_jit(key)
        return target.constrain(z), np.asarray(w, np.float64), float(log_z), int(steps)

    return run


def nuts(entry: ZooModel, target, draws: int) -> Callable:
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(entry.model), num_warmup=draws, num_samples=draws, num_chains=1,
                progress_bar=False, jit_model_args=True)
    args = entry.args()

    def run(key):
        mcmc.run(key, *args)
        s = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
        return s, np.ones(draws), math.nan, 2 * draws

    return run


MIN_TIME_S = 0.5  # runs shorter than this are timed as the mean of repeated calls

METHODS = {"ours": ours, "blackjax": blackjax_tempered, "nuts": nuts}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def ladder(entry: ZooModel, method: str, sizes: list[int], reps: int, seed: int, tolerance: float):
    target = entry.target()
    ref = entry.reference()
    rows = []
    for size in sizes:
        run = METHODS[method](entry, target, size)
        t0 = time.perf_counter()
        run(jax.random.key(10_000 + seed))  # compile (and warm) on this shape
        first = time.perf_counter() - t0
        times, em, es, log_z, steps = [], [], [], [], []
        for r in range(reps):
            key = jax.random.key(seed * 1000 + r)
            t0 = time.perf_counter()
            samples, w, lz, st = run(key)
            dt = time.perf_counter() - t0
            if dt < MIN_TIME_S:  # short runs: average over repeated calls (same key, same result)
                k = int(np.ceil(MIN_TIME_S / max(dt, 1e-4)))
                t0 = time.perf_counter()
                for _ in range(k):
                    run(key)
                dt = (time.perf_counter() - t0) / k
            times.append(dt)
            a, b = errors(entry, ref, samples, w)
            em.append(a), es.append(b), log_z.append(lz), steps.append(st)
        score = max(float(np.median(em)), float(np.median(es)))
        row = {"size": size, "time_s": float(np.median(times)), "first_call_s": first,
               "mean_err": float(np.median(em)), "sd_err": float(np.median(es)), "score": score,
               "accurate": score <= tolerance, "steps": float(np.mean(steps))}
        if method != "nuts":
            lz = np.asarray(log_z)
            row.update(log_z_mean=float(lz.mean()), log_z_var=float(lz.var(ddof=1)) if reps > 1 else math.nan)
            row["var_x_time"] = row["log_z_var"] * row["time_s"]
        rows.append(row)
        print(f"  {entry.name:22s} {method:9s} {size:6d}: {row['time_s']:7.2f} s "
              f"(first {first:6.1f} s)  mean err {row['mean_err']:.3f}  sd err {row['sd_err']:.3f}"
              + (f"  log Z {row['log_z_mean']:.3f} var {row['log_z_var']:.4f}" if method != "nuts" else ""),
              flush=True)
    return rows


def evidence(entry: ZooModel, method: str, n: int, reps: int, seed: int) -> dict:
    """``reps`` independent runs at ``n`` particles: the mean and variance of log Ẑ, the median
    time, var × time, and the error of the mean against the exact log-evidence where known."""
    run = METHODS[method](entry, entry.target(), n)
    run(jax.random.key(20_000 + seed))  # compile
    lz, times = [], []
    for r in range(reps):
        t0 = time.perf_counter()
        lz.append(run(jax.random.key(seed * 1000 + 500 + r))[2])
        times.append(time.perf_counter() - t0)
    lz = np.asarray(lz)
    row = {"particles": n, "reps": reps, "log_z_mean": float(lz.mean()),
           "log_z_sd": float(lz.std(ddof=1)), "time_s": float(np.median(times))}
    row["var_x_time"] = row["log_z_sd"] ** 2 * row["time_s"]
    exact = entry.reference().info.get("log_evidence") if entry.exact else None
    if exact is not None:
        row["exact_log_z"] = float(exact)
        row["bias_z"] = float((lz.mean() - exact) / (lz.std(ddof=1) / np.sqrt(reps)))
    print(f"  {entry.name:22s} {method:9s} {n:6d}: log Z {row['log_z_mean']:.3f} ± {row['log_z_sd']:.3f} "
          f"(sd over {reps} runs), {row['time_s']:.2f} s" + (f", exact {exact:.3f}" if exact is not None else ""),
          flush=True)
    return row


def time_to_accuracy(rows) -> float:
    ok = [r["time_s"] for r in rows if r["accurate"]]
    return min(ok) if ok else math.inf


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[e.name for e in ZOO])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--particles", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--nuts-draws", nargs="+", type=int, default=[125, 250, 500, 1000, 2000])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--evidence-particles", type=int, default=512)
    p.add_argument("--evidence-reps", type=int, default=12)
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = {"machine": machine_description(), "tolerance": a.tolerance, "reps": a.reps,
           "versions": {"jax": jax.__version__, "blackjax": blackjax.__version__,
                        "numpyro": __import__("numpyro").__version__},
           "models": {}}
    print(out["machine"], flush=True)
    for name in a.models:
        entry = get(name)
        res = {}
        for method in a.methods:
            sizes = a.nuts_draws if method == "nuts" else a.particles
            res[method] = ladder(entry, method, sizes, a.reps, a.seed, a.tolerance)
        for method in [m for m in a.methods if m != "nuts"]:
            res[f"{method}_evidence"] = evidence(entry, method, a.evidence_particles, a.evidence_reps, a.seed)
        out["models"][name] = res
    print("\n| model | ours: time to accuracy | blackjax | NUTS | blackjax / ours | NUTS / ours "
          f"| sd(log Ẑ) ours / blackjax (N = {a.evidence_particles}) | var·time, blackjax / ours |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in out["models"].items():
        t = {m: time_to_accuracy(res[m]) for m in METHODS if m in res}
        ratio = lambda m: (f"{t[m] / t['ours']:.1f}x" if m in t and math.isfinite(t.get("ours", math.inf))  # noqa: E731
                           and math.isfinite(t[m]) else "—")
        sd, vt = "—", "—"
        if "ours_evidence" in res and "blackjax_evidence" in res:
            o, b = res["ours_evidence"], res["blackjax_evidence"]
            sd = f"{o['log_z_sd']:.3f} / {b['log_z_sd']:.3f}"
            if o["var_x_time"] > 0:
                vt = f"{b['var_x_time'] / o['var_x_time']:.1f}x"
        fmt = lambda v: f"{v:.2f} s" if math.isfinite(v) else "not reached"  # noqa: E731
        print(f"| {name} | {fmt(t.get('ours', math.inf))} | {fmt(t.get('blackjax', math.inf))} | "
              f"{fmt(t.get('nuts', math.inf))} | {ratio('blackjax')} | {ratio('nuts')} | {sd} | {vt} |")
        out["models"][name]["time_to_accuracy"] = t
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
