"""Compile time of the LLM runtime on SmolLM2-135M: the first particle filter and ``generate_until``.

The first ``samplers.smc`` call on an LLM state-space model compiles the whole filter (the
transformer, the decode loop, the rewards, resampling); a second call with the same shapes only
runs. ``compile ≈ first − second``. The budget sweep runs one filter per number of particles
N ∈ {1, 2, 4, 8, 16, 32} (each N is a new program shape, so each compiles anew).

Usage::

    .venv/bin/python benchmarks/bench_llm_compile.py [--json out.json] [--budgets 1 2 4 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.machine import machine_description  # noqa: E402


def _ones(tokens, lengths, prompt_lengths, prev_lengths, finished):
    return jnp.ones(tokens.shape[:1], jnp.float32)


def _block(tree):
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="one-token steps (max_steps)")
    ap.add_argument("--budgets", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--gen-tokens", type=int, default=64, help="max_new_tokens of the generate_until timing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from models.llm import Sampling, generate_until, load_smollm2, start
    from models.llm_fk.rewards import TokenVerifier
    from models.llm_fk.ssm import LLMFeynmanKac
    from models.llm_fk.step_lm import StepLM
    from samplers import smc

    out: dict = {"machine": machine_description(), "jax": jax.__version__, "backend": jax.default_backend()}

    t0 = time.perf_counter()
    model, tokenizer, _ = load_smollm2()
    out["load_s"] = time.perf_counter() - t0
    lm = StepLM(model, tokenizer, tokenizer.token_ids_containing("\n\n"), None, Sampling(temperature=0.7))
    prompt = tokenizer.encode("The capital of France is")
    t0 = time.perf_counter()
    fk = LLMFeynmanKac.build(lm, prompt, TokenVerifier(_ones), max_steps=args.steps, max_step_tokens=1)
    _block(fk)
    out["build_s"] = time.perf_counter() - t0  # includes compiling the prompt's prefill

    def run(n, seed):
        t, c = time.perf_counter(), time.process_time()
        res = smc(jax.random.key(seed), fk, n, max_steps=args.steps)
        _block(res)
        return time.perf_counter() - t, time.process_time() - c

    def record(n, first, second):
        (f, fc), (s, sc) = first, second
        print(f"particle filter N={n}: first {f:.2f} s, second {s:.2f} s, compile ≈ {f - s:.2f} s wall "
              f"({fc - sc:.2f} s CPU)", flush=True)
        return {"N": n, "first_s": f, "second_s": s, "compile_s": f - s, "first_cpu_s": fc, "second_cpu_s": sc,
                "compile_cpu_s": fc - sc}

    n = args.particles
    first_pf = record(n, run(n, 0), run(n, 1))
    out["first_pf"] = {"steps": args.steps, **first_pf}

    sweep = [first_pf if b == n else record(b, run(b, 2), run(b, 3)) for b in args.budgets]
    out["budget_sweep"] = sweep
    out["budget_sweep_compile_total_s"] = sum(r["compile_s"] for r in sweep)
    out["budget_sweep_compile_total_cpu_s"] = sum(r["compile_cpu_s"] for r in sweep)

    # generate_until on a batch of 8 rows (fresh shapes: cache of 128 slots)
    def gen(seed):
        state = start(model, [prompt] * 8, args.gen_tokens, max_len=128)
        _block(state)
        t, c = time.perf_counter(), time.process_time()
        st, o = generate_until(model, state, jax.random.key(seed), max_new_tokens=args.gen_tokens,
                               sampling=Sampling(temperature=0.7), eos_ids=())
        _block((st, o))
        return time.perf_counter() - t, time.process_time() - c

    (f, fc), (s, sc) = gen(0), gen(1)
    out["generate_until"] = {"batch": 8, "max_new_tokens": args.gen_tokens, "max_len": 128, "first_s": f,
                             "second_s": s, "compile_s": f - s, "compile_cpu_s": fc - sc}
    print(f"generate_until B=8, {args.gen_tokens} tokens: first {f:.2f} s, second {s:.2f} s, compile ≈ {f - s:.2f} s "
          f"wall ({fc - sc:.2f} s CPU)", flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
