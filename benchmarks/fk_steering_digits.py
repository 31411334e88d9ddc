"""FK steering of the digits diffusion model against best-of-N at equal network evaluations.

The unconditional digits model (label = NULL_CLASS, Euler–Maruyama, K reverse steps + Tweedie at the
end: K + 1 network evaluations per chain) is steered towards a target class c by the verifier
r(x) = log p_A(c | x) (logistic regression fitted on half A of load_digits,
``fit_digits_classifier("A")``), with potentials DIFF / MAX / SUM / RT (exact, with the final correction; and MAX / SUM / RT without
it, the greedier heuristic targets) and resampling every k steps
in a window (rewards evaluated at the resampling steps and the last one, as in the authors' code).
Best-of-N runs N independent chains of the same model and keeps the highest verifier reward: the
same N (K + 1) network evaluations as FK steering with N particles.

Every method returns one image per (class, seed): the final particle with the highest verifier
reward (FK and best-of-N alike). Reported, averaged over the 10 classes and the seeds:
- verifier: mean reward log p_A(c | x) of the returned image;
- eval acc: accuracy of the *independent evaluator* (an MLP fitted on half B,
  ``fit_digits_evaluator()``) on the returned image;
- pop acc: evaluator accuracy of the final population (FK: weighted by the final weights; best-of-N:
  the N independent chains), i.e. of the steered *law* rather than the top-1 pick;
- ESS: final ESS / N (before the final weighting it is 1 for best-of-N); roots: distinct step-0
  ancestors of the final particles; NFE and reward calls per returned image.

Run: ``nice .venv/bin/python benchmarks/fk_steering_digits.py`` (about 1.5 minutes on the 2-core CPU;
``--quick`` for a smoke run).
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
from models.diffusion import (  # noqa: E402
    NULL_CLASS,
    RT,
    ClassLogProb,
    Diff,
    Max,
    Sum,
    best_of_n_chains,
    digits_fk_steering,
    fit_digits_classifier,
    fit_digits_evaluator,
    load_digits_model,
    resampling_window,
    steering_diagnostics,
    steps_before_resampling,
)
from samplers.smc import smc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=str, default="4,8,16",
                    help="N values (comma-separated): FK particles = best-of-N chains")
    ap.add_argument("--seeds", type=int, default=8, help="independent runs per class")
    ap.add_argument("--steps", type=int, default=30, help="K reverse steps")
    ap.add_argument("--every", type=int, default=5, help="resample every k steps")
    ap.add_argument("--lam", type=float, default=5.0, help="lambda of the tilt p(x) p_A(c|x)^lambda")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 3 classes (smoke run)")
    args = ap.parse_args()
    k_steps, every, lam = args.steps, args.every, args.lam
    sizes = [int(v) for v in args.particles.split(",")]
    seeds = 2 if args.quick else args.seeds
    classes = np.arange(3 if args.quick else 10)
    t_start = time.time()

    model = load_digits_model()
    verifier = fit_digits_classifier("A")
    evaluator = fit_digits_evaluator()
    T = k_steps + 1
    schedule = resampling_window(T, every, start=every - 1, end=T - 2 - every // 2)
    steps = steps_before_resampling(schedule)
    every_step = resampling_window(T, 1)
    all_steps = jnp.ones((T,), bool)

    for n in sizes:
        targets = jnp.asarray(np.repeat(classes, seeds), jnp.int32)
        keys = jax.random.split(jax.random.key(0), targets.shape[0])

        def build(potential, target, lam_, psteps=None):
            return digits_fk_steering(
                model, ClassLogProb(verifier, target), lam_, potential, num_steps=k_steps,
                potential_steps=psteps,
            )

        @eqx.filter_jit
        def run_fk(potential, keys, targets, lam_, sched, psteps):
            def one(key, target):
                res = smc(key, build(potential, target, lam_, psteps), n, ess_threshold=0.0,
                          resample_schedule=sched)
                return res.particles.x0, res.particles.reward, res.log_weights, steering_diagnostics(res)

            return jax.vmap(one)(keys, targets)

        @eqx.filter_jit
        def run_fk_ess(potential, keys, targets, lam_):
            """Rewards at every step, resampling when ESS < N / 2 (weights carried in between)."""

            def one(key, target):
                res = smc(key, build(potential, target, lam_), n, ess_threshold=0.5)
                return res.particles.x0, res.particles.reward, res.log_weights, steering_diagnostics(res)

            return jax.vmap(one)(keys, targets)

        @eqx.filter_jit
        def run_best_of_n(keys, targets):
            def one(key, target):
                b = best_of_n_chains(key, build(Diff(), target, 0.0, steps), n)
                return b.samples, b.rewards, jnp.full((n,), -np.log(n)), b.nfe, b.reward_calls

            return jax.vmap(one)(keys, targets)

        methods = [
            ("best-of-N", None),
            ("FK DIFF", Diff()),
            ("FK MAX", Max()),
            ("FK SUM", Sum()),
            ("FK RT", RT()),
            ("FK DIFF, resampling every step", "every"),
            ("FK DIFF, ESS < N/2 triggered, rewards every step", "ess"),
            ("FK MAX, no final correction (heuristic)", Max(False)),
            ("FK SUM, no final correction (heuristic)", Sum(False)),
            ("FK RT, no final correction (heuristic)", RT(False)),
        ]
        rows = []
        for name, pot in methods:
            t0 = time.time()
            if pot is None:
                x0, r, lw, nfe, calls = run_best_of_n(keys, targets)
                final_ess = np.ones(len(keys))
                roots = np.full(len(keys), float(n))
                n_res = np.zeros(len(keys))
            else:
                lam_ = jnp.asarray(lam, jnp.float32)
                if pot == "ess":
                    x0, r, lw, diag = run_fk_ess(Diff(), keys, targets, lam_)
                elif pot == "every":
                    x0, r, lw, diag = run_fk(Diff(), keys, targets, lam_, every_step, all_steps)
                else:
                    x0, r, lw, diag = run_fk(pot, keys, targets, lam_, schedule, steps)
                final_ess = np.asarray(diag.ess)[:, -1] / n
                roots = np.asarray(diag.unique_roots)[:, -1]
                n_res = np.asarray(diag.resampled).sum(1)
                nfe, calls = diag.nfe, diag.reward_calls
            nfe, calls = np.asarray(nfe), np.asarray(calls)
            r = np.asarray(r)
            best = np.argmax(r, axis=1)
            x_best = np.asarray(x0)[np.arange(len(best)), best]
            tg = np.asarray(targets)
            top_reward = r[np.arange(len(best)), best]
            acc = np.asarray(evaluator.predict(jnp.asarray(x_best))) == tg
            pred_all = np.asarray(evaluator.predict(x0)) == tg[:, None]
            w = np.exp(np.asarray(lw, np.float64))
            pop_acc = (w * pred_all).sum(1)
            sec = time.time() - t0
            rows.append((name, top_reward.mean(), top_reward.std(ddof=1) / np.sqrt(len(tg)), acc.mean(),
                         np.sqrt(acc.mean() * (1 - acc.mean()) / len(tg)), pop_acc.mean(), final_ess.mean(),
                         roots.mean(), n_res.mean(), int(nfe[0]), int(calls[0]), sec))
            print(f"  {name}: {sec:.1f} s", flush=True)

        print()
        print(f"digits, unconditional model steered to class c by log p_A(c|x); lambda = {lam}, N = {n}, "
              f"K = {k_steps} Euler-Maruyama steps, resampling after steps "
              f"{np.flatnonzero(np.asarray(schedule)) - 1}; {len(classes)} classes x {seeds} seeds")
        print("| method | verifier log p_A(c|x) | evaluator acc (top-1) | evaluator acc (population) "
              "| final ESS / N | distinct roots | resamplings | NFE | reward calls |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, rm, rse, acc, ase, pop, ess, roots, nres, nfe, calls, _ in rows:
            print(f"| {name} | {rm:.3f} ± {rse:.3f} | {acc:.3f} ± {ase:.3f} | {pop:.3f} | {ess:.2f} | "
                  f"{roots:.1f} | {nres:.1f} | {nfe} | {calls} |")

    print(f"\n{machine_description()}; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
