"""Per-step cost of an LLM particle filter against plain decoding of the same tokens (SmolLM2-135M).

A particle filter with one-token steps and a cheap reward (a jnp verifier returning 1, so the
weights stay uniform and it never resamples at ESS threshold 0.5) does the work of plain batched
decoding plus the engine's bookkeeping: weights, ESS, the done-mask, the reward call, the step
history. Its *steady-state* time per step is measured as the difference between runs of S2 and S1
steps divided by S2 − S1 (compilation and prefill cancel), on the same cache size; the peer is
``generate_until`` at the same batch producing S2 and S1 tokens, measured the same way in the same
run. EOS is disabled on both sides (a never-sampled id on the filter's side), so every row makes
every token. Target of the house issue: the filter within 10% of decoding at N = 32.

    python benchmarks/bench_llm_step_cost.py                 # N = 32, S = 16 and 48 steps
    python benchmarks/bench_llm_step_cost.py --particles 8 32
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
    return jax.block_until_ready(tree)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, nargs="+", default=[32])
    ap.add_argument("--short", type=int, default=16, help="S1 steps / tokens")
    ap.add_argument("--long", type=int, default=48, help="S2 steps / tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from models.llm import Sampling, generate_until, load_smollm2, start
    from models.llm_fk.rewards import TokenVerifier
    from models.llm_fk.ssm import LLMFeynmanKac
    from models.llm_fk.step_lm import StepLM
    from samplers import smc

    model, tokenizer, _ = load_smollm2()
    sampling = Sampling(temperature=0.7)
    never = (model.config.vocab_size - 1,)  # an id the chat model does not produce: EOS off
    lm = StepLM(model, tokenizer, (), never, sampling)
    prompt = tokenizer.encode("Write a long story about a particle filter.")
    room = args.long + 16
    out = {"machine": machine_description(), "jax": jax.__version__, "S1": args.short, "S2": args.long,
           "rows": []}

    def best(fn):
        fn(0)  # compile
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            fn(r + 1)
            times.append(time.perf_counter() - t)
        return min(times)

    for n in args.particles:
        def pf(steps):
            fk = LLMFeynmanKac.build(lm, prompt, TokenVerifier(_ones), max_steps=steps, max_step_tokens=1,
                                     max_new_tokens=room)

            def call(seed):
                res = _block(smc(jax.random.key(seed), fk, n, max_steps=steps))
                assert int(res.num_steps) == steps, "a particle finished early"
                return res
            return best(call)

        def dec(tokens):
            def call(seed):
                state = _block(start(model, [prompt] * n, room))
                t = time.perf_counter()
                _block(generate_until(model, state, jax.random.key(seed), max_new_tokens=tokens,
                                      sampling=sampling, eos_ids=()))
                return time.perf_counter() - t
            call(0)
            return min(call(r + 1) for r in range(args.repeats))

        pf1, pf2 = pf(args.short), pf(args.long)
        d1, d2 = dec(args.short), dec(args.long)
        per_pf = (pf2 - pf1) / (args.long - args.short)
        per_dec = (d2 - d1) / (args.long - args.short)
        row = {"N": n, "pf_s": [pf1, pf2], "decode_s": [d1, d2], "pf_ms_per_step": per_pf * 1e3,
               "decode_ms_per_token": per_dec * 1e3, "ratio": per_pf / per_dec}
        out["rows"].append(row)
        print(f"N={n}: particle filter {per_pf * 1e3:.1f} ms/step, generate_until {per_dec * 1e3:.1f} ms/token, "
              f"ratio {per_pf / per_dec:.3f}", flush=True)
    print(f"machine: {out['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
