"""Main demo: the same SMC engine on a state-space model and steering an LLM.

    python -m app.demo [--num-particles 1000] [--num-steps 500] [--seed 0]
                          [--num-runs 10] [--output outputs/sv_filter.png]
                          [--llm-runs 3] [--llm-particles 16] [--no-llm]

Part 1, a bootstrap particle filter on a simulated stochastic-volatility series:
It simulates y_{0:T-1} from the stochastic-volatility model (Kim, Shephard & Chib 1998), runs the
bootstrap filter (Gordon, Salmond & Smith 1993) with the compiled SMC engine, and prints the
log-evidence log Ẑ (with its spread over independent runs, vmapped into one call), the ESS trace
and the run time. It plots the observations, the true log-volatility and the filtered mean
E[x_t | y_{0:t}] with a 90 % band (weighted 5 % and 95 % quantiles of the particles at each step).

Part 2, the project's idea on an LLM (:mod:`app.steer`): SmolLM2-135M is asked for a sentence
about a cat without the letter "e". A particle filter over words (16 particles, the constraint as a
process reward) against best-of-16 plain samples under the same score, over a few seeded runs:
both answers of each run and the satisfaction rates are printed.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from models.stochastic_volatility import SVParams, stochastic_volatility
from samplers.smc import smc

__all__ = ["main", "build_parser", "weighted_quantiles"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.demo",
        description="Bootstrap particle filter on a simulated stochastic-volatility series.",
    )
    parser.add_argument("--num-particles", type=int, default=1000, help="particles N (1000)")
    parser.add_argument("--num-steps", type=int, default=500, help="length T of the series (500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the filter (0)")
    parser.add_argument("--num-runs", type=int, default=10,
                        help="independent runs for the spread of log Ẑ (10)")
    parser.add_argument("--output", default=os.path.join("outputs", "sv_filter.png"),
                        help="where to write the plot (outputs/sv_filter.png)")
    parser.add_argument("--llm-runs", type=int, default=3,
                        help="seeded runs of the LLM steering comparison (3)")
    parser.add_argument("--llm-particles", type=int, default=16,
                        help="particles of the filter = samples of best-of-N (16)")
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM steering part")
    return parser


def weighted_quantiles(
    values: Float[Array, "T N"], log_weights: Float[Array, "T N"], qs: Sequence[float]
) -> Float[Array, "T Q"]:
    """Quantiles of the weighted empirical law Σ_i W_t^i δ_{x_t^i} at each step t: the smallest
    particle value whose cumulative weight reaches q."""
    qs = jnp.asarray(qs)

    def one(x, lw):
        order = jnp.argsort(x)
        cum = jnp.cumsum(jnp.exp(lw - jax.nn.logsumexp(lw))[order])
        idx = jnp.clip(jnp.searchsorted(cum, qs * cum[-1], side="left"), 0, x.shape[0] - 1)
        return x[order][idx]

    return jax.vmap(one)(values, log_weights)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_particles", "num_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_runs < 2:
        raise SystemExit("--num-runs must be >= 2 (the spread of log Ẑ needs two runs)")
    if args.llm_runs < 1 or args.llm_particles < 1:
        raise SystemExit("--llm-runs and --llm-particles must be >= 1")


def _plot(path, ys, xs, mean, band):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    t = np.arange(ys.shape[0])
    fig = Figure(figsize=(10, 6), constrained_layout=True)
    ax_y, ax_x = fig.subplots(2, 1, sharex=True)
    ax_y.plot(t, ys, lw=0.7, color="0.3")
    ax_y.set_ylabel("observation $y_t$")
    ax_y.set_title("Stochastic volatility: bootstrap particle filter")
    ax_x.fill_between(t, band[:, 0], band[:, 1], color="C0", alpha=0.3, label="90% filtering band")
    ax_x.plot(t, mean, color="C0", lw=1.2, label=r"filtered mean $E[x_t \mid y_{0:t}]$")
    ax_x.plot(t, xs, color="k", lw=0.8, ls="--", label="true log-volatility $x_t$")
    ax_x.set_xlabel("t")
    ax_x.set_ylabel("log-volatility")
    ax_x.legend(loc="upper left", ncols=3, fontsize="small", framealpha=0.9)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the demo; returns the printed summary as a dict (used by the smoke test)."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    n, num_steps = args.num_particles, args.num_steps

    key_data, key_filter, key_runs = jax.random.split(jax.random.key(args.seed), 3)
    ssm = stochastic_volatility(SVParams.default())
    xs, ys = ssm.simulate(key_data, num_steps)
    model = ssm.bootstrap(ys)

    # One run with the genealogy stored: filtering moments at every step for the plot.
    filter_run = jax.jit(lambda k, m: smc(k, m, n, store_history=True))
    start = time.perf_counter()
    res = jax.block_until_ready(filter_run(key_filter, model))
    first_time = time.perf_counter() - start
    start = time.perf_counter()
    res = jax.block_until_ready(filter_run(key_filter, model))
    run_time = time.perf_counter() - start

    hist = res.history
    mean = jnp.sum(jnp.exp(hist.log_weights) * hist.particles, axis=1)
    band = weighted_quantiles(hist.particles, hist.log_weights, (0.05, 0.95))

    # Independent runs, vmapped into one compiled call, without history.
    many = jax.jit(jax.vmap(lambda k, m: smc(k, m, n).log_evidence, in_axes=(0, None)))
    keys = jax.random.split(key_runs, args.num_runs)
    jax.block_until_ready(many(keys, model))
    start = time.perf_counter()
    log_zs = np.asarray(jax.block_until_ready(many(keys, model)))
    runs_time = time.perf_counter() - start

    ess = np.asarray(res.ess)
    inside = (np.asarray(xs) >= np.asarray(band[:, 0])) & (np.asarray(xs) <= np.asarray(band[:, 1]))
    summary = {
        "log_evidence": float(res.log_evidence),
        "log_evidence_mean": float(np.mean(log_zs)),
        "log_evidence_sd": float(np.std(log_zs, ddof=1)),
        "ess_min": float(ess.min()),
        "ess_median": float(np.median(ess)),
        "ess_mean": float(ess.mean()),
        "num_resampling_steps": int(np.sum(np.asarray(res.resampled))),
        "band_coverage": float(inside.mean()),
        "extinct": bool(res.extinct),
        "num_nan_potentials": int(res.num_nan_potentials),
        "run_time_s": run_time,
        "compile_and_run_time_s": first_time,
        "runs_time_s": runs_time,
        "output": os.path.abspath(args.output),
    }

    print(f"stochastic volatility, T = {num_steps}, bootstrap filter with N = {n} particles "
          f"(seed {args.seed}, JAX on {jax.devices()[0].platform})")
    print(f"log-evidence log Ẑ        : {summary['log_evidence']:.3f}")
    print(f"  over {args.num_runs} runs        : mean {summary['log_evidence_mean']:.3f}, "
          f"sd {summary['log_evidence_sd']:.3f}")
    print(f"ESS (of N = {n})         : min {summary['ess_min']:.1f}, median "
          f"{summary['ess_median']:.1f}, mean {summary['ess_mean']:.1f}")
    print(f"resampling steps          : {summary['num_resampling_steps']} of {num_steps - 1}")
    print(f"true x_t inside 90% band  : {100 * summary['band_coverage']:.1f}% of steps")
    if summary["extinct"] or summary["num_nan_potentials"]:
        print(f"WARNING: extinct={summary['extinct']}, "
              f"NaN potentials={summary['num_nan_potentials']}")
    print(f"run time (one filter)     : {run_time * 1e3:.1f} ms "
          f"(first call with compilation: {first_time:.2f} s)")
    print(f"run time ({args.num_runs} runs, vmapped) : {runs_time * 1e3:.1f} ms")

    _plot(args.output, np.asarray(ys), np.asarray(xs), np.asarray(mean), np.asarray(band))
    print(f"plot written to {summary['output']}")
    if not args.no_llm:
        summary["llm"] = llm_steering(args.llm_runs, args.llm_particles, args.seed)
    return summary


LLM_PROMPT = "Write a short sentence about a cat."


def llm_steering(runs: int, particles: int, seed: int, max_steps: int = 24) -> dict:
    """Part 2 (see the module docstring); returns :func:`app.steer.compare`'s rates."""
    from app.steer import CONSTRAINTS, compare, load_lm

    constraint = CONSTRAINTS["lipogram"]
    print(f"\nLLM steering: SmolLM2-135M, prompt {LLM_PROMPT!r}, constraint: {constraint.description}")
    print(f"particle filter over words (N = {particles}) against best-of-{particles} plain samples, "
          f"{runs} seeded run(s) each (the first of each compiles):")
    start = time.perf_counter()
    lm = load_lm()
    out = compare(lm, LLM_PROMPT, constraint, runs=runs, num_particles=particles, seed=seed,
                  max_steps=max_steps)
    print(f"satisfied: particle filter {out['pf_satisfied']:.0%} of runs "
          f"({out['pf_tokens']:.0f} tokens per run), best-of-{particles} {out['bon_satisfied']:.0%} "
          f"({out['bon_tokens']:.0f} tokens per run); plain samples {out['plain_sample_rate']:.1%}")
    print(f"LLM part: {time.perf_counter() - start:.0f} s")
    return {k: v for k, v in out.items() if k != "results"}


if __name__ == "__main__":
    main()
