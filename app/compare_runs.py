"""Paired comparison of two cells of ``ppl scale`` experiments, possibly from different runs of the
command (e.g. a power target against temperature sampling, which differ in ``--power``).

``python -m app.compare_runs A/results.json:pf@8 B/results.json:pf@1 [--draw]`` pairs the runs of
cell A with those of cell B on (prompt, seed) — the same prompt and key, as every ``ppl scale`` run
uses common random numbers — and prints each cell's accuracy with its Wilson interval, the
discordant pairs with McNemar's exact p-value (with ``--draw``: the same exact binomial test on the
signs of the paired differences, a sign test), and the mean paired difference with a bootstrap
interval over prompts.

``--draw`` scores each run by the **expected accuracy of one answer drawn from its final weighted
particles**, \\(\\sum_i W_i \\mathbf 1[a_i \\text{ correct}]\\) (from the candidates, weights and
per-candidate correctness every row stores), instead of the selected answer: for a particle
filter that is the accuracy of a sample from its target, and for equally weighted samples (no
reward) the exact accuracy of one sample of the sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from app.scale import mcnemar_exact_p, wilson_interval

__all__ = ["load_cell", "compare", "main"]


def load_cell(spec: str, draw: bool = False) -> dict:
    """``path:method@budget`` → {(prompt, seed): score} (score = correct, or the draw accuracy)."""
    path, _, cell = spec.rpartition(":")
    if not path or "@" not in cell:
        raise ValueError(f"expected PATH:METHOD@BUDGET, got {spec!r}")
    method, _, budget = cell.partition("@")
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"] if isinstance(data, dict) else data
    out = {}
    for r in rows:
        if r["method"] == method and int(r["budget"]) == int(budget):
            if draw:
                w, ok = np.asarray(r.get("weights") or []), np.asarray(r.get("candidates_correct") or [])
                if w.size == 0 or w.size != ok.size:
                    raise ValueError(f"{spec}: a run lacks candidate weights / correctness for --draw")
                out[(r["prompt"], r["seed"])] = float(np.dot(w / w.sum(), ok))
            else:
                out[(r["prompt"], r["seed"])] = float(r["correct"])
    if not out:
        raise ValueError(f"{spec}: no runs of {method}@{budget} in {path}")
    return out


def compare(a: dict, b: dict, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """Paired statistics of two cells (see the module docstring)."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two cells share no (prompt, seed) pair")
    xa, xb = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    d = xa - xb
    prompts = sorted({k[0] for k in keys})
    per_prompt = np.array([np.mean([d[i] for i, k in enumerate(keys) if k[0] == p]) for p in prompts])
    rng = np.random.default_rng(seed)
    boot = [rng.choice(per_prompt, per_prompt.size).mean() for _ in range(n_boot)]
    wins, losses = int(np.sum(d > 1e-12)), int(np.sum(d < -1e-12))
    n = len(keys)
    return dict(n=n, prompts=len(prompts), mean_a=float(xa.mean()), mean_b=float(xb.mean()),
                wilson_a=wilson_interval(int(round(xa.sum())), n), wilson_b=wilson_interval(int(round(xb.sum())), n),
                diff=float(d.mean()), diff_ci=tuple(float(x) for x in np.percentile(boot, [2.5, 97.5])),
                wins=wins, losses=losses, p_value=mcnemar_exact_p(wins, losses))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.compare_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="PATH/results.json:METHOD@BUDGET")
    p.add_argument("b", help="PATH/results.json:METHOD@BUDGET")
    p.add_argument("--draw", action="store_true", help="score runs by the accuracy of one draw ∝ W")
    args = p.parse_args(argv)
    try:
        res = compare(load_cell(args.a, args.draw), load_cell(args.b, args.draw))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "expected accuracy of one draw ∝ W" if args.draw else "accuracy of the selected answer"
    print(f"{kind}, {res['n']} paired runs over {res['prompts']} prompts")
    print(f"A {args.a}: {res['mean_a']:.3f}" + ("" if args.draw else f" [{res['wilson_a'][0]:.2f}, {res['wilson_a'][1]:.2f}]"))
    print(f"B {args.b}: {res['mean_b']:.3f}" + ("" if args.draw else f" [{res['wilson_b'][0]:.2f}, {res['wilson_b'][1]:.2f}]"))
    print(f"A − B: {res['diff']:+.3f}, 95% bootstrap over prompts [{res['diff_ci'][0]:+.3f}, {res['diff_ci'][1]:+.3f}]; "
          f"A better on {res['wins']}, B better on {res['losses']} "
          f"({'exact sign test' if args.draw else 'McNemar exact'} p = {res['p_value']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
