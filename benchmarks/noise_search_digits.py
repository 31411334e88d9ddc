"""Noise search on the digits diffusion model, judged by an independent evaluator.

    nice .venv/bin/python benchmarks/noise_search_digits.py [--quick]

Task: generate an image of a target class c (every class 0..9 in turn). The sampler is DDIM
(eta = 0, 30 steps, Tweedie at the end: 31 network evaluations per image). The *verifier* that the
search maximises is log p(c | x) of a logistic regression fitted on half A of scikit-learn's digits;
the *evaluator* that judges the result is an MLP fitted on the disjoint half B
(models/diffusion/verifiers.py). The gap between verifier accuracy and evaluator accuracy of the
returned samples measures how much the search exploits the verifier ("reward hacking").

Tables (one row per compute level; NFE per search, network evaluations per image):
1. random search (best-of-N), unconditional model (label = null class) and class-conditional model
   (label = c): best-of-n for n = 1..32 is read off the first n candidates of one N = 32 search
   (the first n of 32 iid noises are n iid noises, so each prefix is an exact best-of-n);
2. zero-order search, unconditional, 8 neighbours per round at cosine 0.8 (elitist), by rounds;
3. search over paths, unconditional, a few (beams, children, start, forward, backward) settings.
Accuracy standard errors are binomial, sqrt(p (1 - p) / searches).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.diffusion.digits import NULL_CLASS, load_digits_model
from models.diffusion.noise_search import (
    DigitsDenoiser,
    path_search,
    random_search,
    zero_order_search,
)
from models.diffusion.verifiers import ClassLogProb, fit_digits_classifier, fit_digits_evaluator

STEPS = 30


def _se(p, n):
    return np.sqrt(max(p * (1 - p), 1e-12) / n)


def _row(name, nfe, ev_hit, ver_hit, ver_score, ev_score):
    n = len(ev_hit)
    pe, pv = float(np.mean(ev_hit)), float(np.mean(ver_hit))
    return (f"| {name} | {nfe} | {pe:.3f} ± {_se(pe, n):.3f} | {pv:.3f} | {pv - pe:+.3f} | "
            f"{np.mean(ver_score):.2f} | {np.mean(ev_score):.2f} | {n} |")


HEADER = ("| setting | NFE | evaluator acc. | verifier acc. | gap | verifier log p(c\\|x) | "
          "evaluator log p(c\\|x) | searches |\n|---|---|---|---|---|---|---|---|")


def main(quick: bool = False):
    t_start = time.time()
    model = load_digits_model()
    verifier, evaluator = fit_digits_classifier("A"), fit_digits_evaluator()
    ev = jax.jit(lambda x: (evaluator.predict(x), evaluator.log_probs(x)))
    vp = jax.jit(lambda x: (verifier.predict(x), verifier.log_probs(x)))

    def judge(x, c):
        pe, le = ev(x)
        pv, lv = vp(x)
        return (np.asarray(pe) == c, np.asarray(pv) == c, np.asarray(lv)[..., c], np.asarray(le)[..., c])

    per_class = 3 if quick else 30
    ns = [1, 2, 4, 8, 16, 32]
    print(f"digits noise search: DDIM {STEPS} steps ({STEPS + 1} NFE per image), verifier = logistic "
          f"regression on half A, evaluator = MLP on half B; {jax.devices()[0].platform}")

    # ---- 1. random search --------------------------------------------------------------------
    for label_name in ("unconditional", "conditional"):
        t0 = time.time()
        stats = {n: ([], [], [], []) for n in ns}
        reps = per_class if label_name == "unconditional" else max(per_class // 3, 1)
        for c in range(10):
            den = DigitsDenoiser(model, NULL_CLASS if label_name == "unconditional" else c)
            rew = ClassLogProb(verifier, c)
            for j in range(reps):
                key = jax.random.fold_in(jax.random.key(1000 + c), j)
                res = random_search(key, den, rew, num_candidates=max(ns), num_steps=STEPS)
                e_hit, v_hit, v_sc, e_sc = judge(res.samples, c)
                scores = np.asarray(res.scores)
                for n in ns:
                    i = int(np.argmax(scores[:n]))
                    for lst, val in zip(stats[n], (e_hit[i], v_hit[i], v_sc[i], e_sc[i])):
                        lst.append(val)
        print(f"\n### random search (best-of-N), {label_name} model ({time.time() - t0:.0f} s)\n")
        print(HEADER)
        for n in ns:
            print(_row(f"N = {n}", n * (STEPS + 1), *stats[n]))

    # ---- 2. zero-order search ----------------------------------------------------------------
    t0 = time.time()
    nb, rounds, cos = 8, 6, 0.8
    reps = max(per_class // 3, 1)
    hist = {r: ([], [], [], []) for r in range(rounds + 1)}
    den = DigitsDenoiser(model, NULL_CLASS)
    for c in range(10):
        rew = ClassLogProb(verifier, c)
        for j in range(reps):
            key = jax.random.fold_in(jax.random.key(2000 + c), j)
            res = zero_order_search(key, den, rew, num_neighbours=nb, num_rounds=rounds, cosine=cos,
                                    elitist=True, num_steps=STEPS)
            # elitist: the pivot after round r is the best sample seen so far
            e_hit, v_hit, v_sc, e_sc = judge(res.samples, c)
            for r in range(rounds + 1):
                for lst, val in zip(hist[r], (e_hit[r], v_hit[r], v_sc[r], e_sc[r])):
                    lst.append(val)
    print(f"\n### zero-order search, unconditional, {nb} neighbours per round at cosine {cos}, "
          f"elitist ({time.time() - t0:.0f} s)\n")
    print(HEADER)
    for r in range(rounds + 1):
        print(_row(f"round {r}", (1 + r * nb) * (STEPS + 1), *hist[r]))

    # ---- 3. search over paths ----------------------------------------------------------------
    t0 = time.time()
    configs = [  # (beams N, children M, start k0, forward Δf, backward Δb)
        (1, 4, 10, 5, 10),
        (2, 4, 10, 5, 10),
        (4, 4, 10, 5, 10),
        (8, 4, 20, 5, 10),
    ]
    print("\n### search over paths, unconditional (verifier on Tweedie's x̂0 at each landing level)\n")
    print(HEADER)
    for (n, m, k0, df, db) in configs:
        st = ([], [], [], [])
        nfe = None
        for c in range(10):
            rew = ClassLogProb(verifier, c)
            for j in range(reps):
                key = jax.random.fold_in(jax.random.key(3000 + c), j)
                res = path_search(key, den, rew, num_beams=n, num_children=m, start_step=k0,
                                  forward_steps=df, backward_steps=db, num_steps=STEPS)
                nfe = res.nfe
                vals = judge(res.sample[None], c)
                for lst, val in zip(st, vals):
                    lst.append(val[0])
        print(_row(f"N={n}, M={m}, k0={k0}, Δf={df}, Δb={db}", nfe, *st))
    print(f"\n(paths: {time.time() - t0:.0f} s; total {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 searches per class (a smoke run)")
    main(ap.parse_args().quick)
