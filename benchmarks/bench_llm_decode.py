"""Decode throughput of the JAX LLM runtime against transformers (and llama-cpp-python) in one run.

CPU mode (default): SmolLM2-135M-Instruct from the embedded GGUF, float32, the same dequantised
weights in transformers' LlamaForCausalLM. For each batch size: prefill time, decode tokens/s
(summed over the batch), compile time, and at one batch size the cost of gathering the decoding
state by ancestor indices (what SMC resampling does) relative to one decode step.

    python benchmarks/bench_llm_decode.py                       # batches 1 8 32 64, 128 new tokens
    python benchmarks/bench_llm_decode.py --batch-sizes 1 32 --new-tokens 64
    python benchmarks/bench_llm_decode.py --dtype mixed --torch-dtype float32 bfloat16
    python benchmarks/bench_llm_decode.py --mode gpu            # random Qwen2.5-1.5B-shaped bf16 model

GPU mode: a random model shaped like Qwen2.5-1.5B (28 layers, hidden 1536, 12/2 heads, FFN 8960,
vocab 151936, tied embeddings) in bfloat16, against transformers' ``generate`` on the same weights
when torch sees a GPU, and the fraction of the memory-bandwidth floor reached at each batch size
(floor = bytes of weights + KV cache read per step / measured device copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.llm import Sampling, decoding, pad_prompts  # noqa: E402
from models.llm.config import ModelConfig  # noqa: E402

PROMPT = "Write a short story about a dragon who learns to program computers."


def _best(fn, repeats):
    """Best wall time over ``repeats`` calls of ``fn`` (which must block until done)."""
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# ----------------------------------------------------------------------------- JAX side
def bench_jax(model, prompt_ids, batch, new_tokens, repeats, gather=False):
    tokens, lengths, max_len = pad_prompts(model, [prompt_ids] * batch, new_tokens)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    sampling = Sampling(temperature=0.0)
    no_ids = decoding.vocab_mask((), model.config.vocab_size)  # no stop / EOS tokens: exactly new_tokens
    key = jax.random.key(0)

    t = time.perf_counter()
    prefill = decoding._prefill.lower(model, tokens, lengths, max_len).compile()
    compile_prefill = time.perf_counter() - t
    state = prefill(model, tokens, lengths)
    t = time.perf_counter()
    gen = decoding._generate_until_jit.lower(model, state, key, new_tokens, no_ids, no_ids, sampling).compile()
    compile_decode = time.perf_counter() - t

    t_prefill, state = _best(lambda: jax.block_until_ready(prefill(model, tokens, lengths)), repeats)

    def run():
        st = jax.tree.map(jnp.copy, state)  # generate donates its input
        jax.block_until_ready(st)
        t0 = time.perf_counter()
        st, out = gen(model, st, key, no_ids, no_ids)
        jax.block_until_ready(out)
        return time.perf_counter() - t0, (st, out)

    times = []
    for _ in range(repeats):
        dt, (st, out) = run()
        times.append(dt)
    t_decode = min(times)
    n_tok = int(np.asarray(out.num_tokens).sum())
    assert n_tok == batch * new_tokens, (n_tok, batch * new_tokens)
    res = dict(batch=batch, max_len=max_len, prompt_tokens=len(prompt_ids),
               compile_prefill_s=compile_prefill, compile_decode_s=compile_decode,
               prefill_s=t_prefill, decode_s=t_decode, decode_tok_s=n_tok / t_decode,
               step_ms=1e3 * t_decode / new_tokens)
    if gather:
        # multinomial resampling of equal weights: ancestors uniform on the batch (≈ 1/e of the
        # rows die, the most a resampling of even weights kills on average)
        anc = jax.random.randint(jax.random.key(1), (batch,), 0, batch)
        step_s = t_decode / new_tokens
        s2 = jax.tree.map(jnp.copy, st)
        s2 = jax.block_until_ready(decoding.reorder(s2, anc))  # compile
        gts = []
        for _ in range(max(5, repeats)):
            t0 = time.perf_counter()
            s2 = jax.block_until_ready(decoding.reorder(s2, anc))
            gts.append(time.perf_counter() - t0)
        # what samplers.smc does for LLM particles: stable ancestors, dead rows overwritten in place
        s3, used = decoding.resample_state(jax.tree.map(jnp.copy, st), anc)  # compile
        jax.block_until_ready(s3)
        its = []
        for _ in range(max(5, repeats)):
            t0 = time.perf_counter()
            s3, used = decoding.resample_state(s3, anc)
            jax.block_until_ready(s3)
            its.append(time.perf_counter() - t0)
        cache_mb = st.cache.nbytes() / 2**20
        dead = int(batch - np.unique(np.asarray(anc)).size)
        res.update(gather_ms=1e3 * min(gts), gather_fraction_of_step=min(gts) / step_s,
                   inplace_ms=1e3 * min(its), inplace_fraction_of_step=min(its) / step_s,
                   rows_replaced=dead, cache_mb=cache_mb)
    return res


# ----------------------------------------------------------------------------- transformers side
def torch_reference_from(model, config, torch_dtype="float32", device="cpu"):
    """transformers model holding exactly our weights (un-fused back to Hugging Face names)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    c = config
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
              tie_word_embeddings=c.tie_embeddings, head_dim=c.head_dim, eos_token_id=None, pad_token_id=0)
    hf_cfg = LlamaConfig(**kw) if c.arch == "llama" else Qwen2Config(**kw)
    dt = getattr(torch, torch_dtype)
    ref = AutoModelForCausalLM.from_config(hf_cfg, dtype=dt)

    def t(x):
        return torch.from_numpy(np.array(jnp.asarray(x, jnp.float32))).to(dt)

    nq, nkv, F = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    sd = {"model.embed_tokens.weight": t(model.embed), "model.norm.weight": t(model.norm)}
    if model.lm_head is not None:
        sd["lm_head.weight"] = t(model.lm_head)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        w = t(layer.attn.qkv_weight)
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"] = (
            w[:nq], w[nq:nq + nkv], w[nq + nkv:])
        if layer.attn.qkv_bias is not None:
            b = t(layer.attn.qkv_bias)
            sd[p + "self_attn.q_proj.bias"], sd[p + "self_attn.k_proj.bias"], sd[p + "self_attn.v_proj.bias"] = (
                b[:nq], b[nq:nq + nkv], b[nq + nkv:])
        sd[p + "self_attn.o_proj.weight"] = t(layer.attn.o_weight)
        gu = t(layer.mlp.gate_up_weight)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gu[:F], gu[F:]
        sd[p + "mlp.down_proj.weight"] = t(layer.mlp.down_weight)
        sd[p + "input_layernorm.weight"] = t(layer.input_norm)
        sd[p + "post_attention_layernorm.weight"] = t(layer.post_norm)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    ref.tie_weights()
    ref.generation_config.eos_token_id = None
    return ref.to(device).eval()


def bench_torch(ref, prompt_ids, batch, new_tokens, repeats, device="cpu"):
    import torch
    from transformers import GenerationConfig

    ids = torch.tensor([prompt_ids] * batch, device=device)
    mask = torch.ones_like(ids)
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    with torch.inference_mode():
        def prefill():
            out = ref(ids, attention_mask=mask, use_cache=True)
            sync()
            return out

        def generate():
            out = ref.generate(ids, attention_mask=mask, generation_config=cfg)
            sync()
            return out

        prefill()  # warm-up (first-call allocations)
        ref.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
        t_prefill, _ = _best(prefill, repeats)
        t_total, out = _best(generate, repeats)
    assert out.shape[1] == len(prompt_ids) + new_tokens
    t_decode = max(t_total - t_prefill, 1e-9)
    return dict(batch=batch, prefill_s=t_prefill, generate_s=t_total,
                decode_tok_s=batch * (new_tokens - 1) / t_decode, e2e_tok_s=batch * new_tokens / t_total,
                step_ms=1e3 * t_decode / (new_tokens - 1))


def bench_llama_cpp(path, prompt_ids, new_tokens):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count(), verbose=False, logits_all=False)
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids)
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for tok in llm.generate(prompt_ids, top_k=1, reset=True):
        n += 1
        if n >= new_tokens:
            break
    t_total = time.perf_counter() - t
    return dict(batch=1, prefill_s=t_prefill, decode_tok_s=(new_tokens - 1) / max(t_total - t_prefill, 1e-9),
                e2e_tok_s=new_tokens / t_total)


# ----------------------------------------------------------------------------- modes
def run_cpu(args):
    import torch

    from models.llm import load_smollm2, smollm2_path, with_matmul_dtype

    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.tiny:  # random weights of a toy Llama: a smoke test of this mode (numbers mean nothing)
        from models.llm import init_random

        model, tok, config = init_random(LLAMA_TINY, jax.random.key(0), dtype=dtype), None, LLAMA_TINY
    else:
        model, tok, config = load_smollm2(dtype=dtype)
    if args.dtype == "mixed":
        model = with_matmul_dtype(model, jnp.bfloat16)
    print(f"loaded {config.name if args.tiny else 'SmolLM2 from GGUF'} in {time.perf_counter() - t:.1f} s; devices: {jax.devices()}; "
          f"cpus: {os.cpu_count()}; torch threads: {torch.get_num_threads()}; JAX side {args.dtype} "
          f"(matmuls {jnp.dtype(model.matmul_dtype).name}, activations {jnp.dtype(model.dtype).name}); "
          f"transformers {' and '.join(args.torch_dtype)}", flush=True)
    prompt_ids = list(range(3, 40)) if args.tiny else tok.encode_chat(PROMPT)
    refs = {dt: torch_reference_from(model, config, torch_dtype=dt) for dt in args.torch_dtype}
    rows = []
    for b in args.batch_sizes:
        j = bench_jax(model, prompt_ids, b, args.new_tokens, args.repeats, gather=(b == args.gather_batch))
        for dt, ref in refs.items():
            r = bench_torch(ref, prompt_ids, b, args.new_tokens, args.torch_repeats)
            row = dict(batch=b, dtype=args.dtype, torch_dtype=dt, jax=j, transformers=r,
                       speedup=j["decode_tok_s"] / r["decode_tok_s"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    lc = (bench_llama_cpp(smollm2_path(), prompt_ids, args.new_tokens)
          if 1 in args.batch_sizes and not args.tiny else None)
    print_table(rows, lc, args)
    return dict(mode="cpu", prompt_tokens=len(prompt_ids), new_tokens=args.new_tokens, rows=rows, llama_cpp=lc)


QWEN25_15B = ModelConfig(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                         tie_embeddings=True, qkv_bias=True, max_position_embeddings=32768, name="qwen2.5-1.5b-shape")
# SmolLM2's architecture at toy size: a smoke test of CPU mode (``--tiny``)
LLAMA_TINY = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True,
                         max_position_embeddings=1024, name="llama-tiny")
# the same architecture at toy size: a smoke test of GPU mode on any backend (``--tiny``)
QWEN2_TINY = ModelConfig(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                         tie_embeddings=True, qkv_bias=True, max_position_embeddings=1024, name="qwen2-tiny")


def device_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second read plus written by an elementwise bf16 kernel on the default device."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)  # reads and writes nbytes each
    jax.block_until_ready(f(x))
    t, _ = _best(lambda: jax.block_until_ready(f(x)), 5)
    return 2 * nbytes / t


def run_gpu(args):
    from models.llm import init_random

    model = init_random(QWEN2_TINY if args.tiny else QWEN25_15B, jax.random.key(0), dtype=jnp.bfloat16)
    c = model.config
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model))
    bw = device_copy_bandwidth(2 << 20 if args.tiny else 2 << 30)
    print(f"devices: {jax.devices()}; weights {weight_bytes / 2**30:.2f} GiB; measured copy bandwidth "
          f"{bw / 1e9:.0f} GB/s", flush=True)
    prompt_ids = list(np.random.default_rng(0).integers(100, c.vocab_size, 64))
    ref = None
    try:
        import torch

        if torch.cuda.is_available():
            ref = torch_reference_from(model, c, torch_dtype="bfloat16", device="cuda")
        else:
            print("torch sees no GPU: transformers side skipped", flush=True)
    except ImportError:
        print("torch not installed: transformers side skipped", flush=True)
    rows = []
    for b in args.batch_sizes:
        j = bench_jax(model, prompt_ids, b, args.new_tokens, args.repeats, gather=(b == args.gather_batch))
        mean_len = len(prompt_ids) + args.new_tokens / 2
        # per step: every weight once (embedding rows negligible; tied head = embedding read once) + KV cache read
        kv_bytes = b * mean_len * c.kv_bytes_per_token(2)
        floor_s = (weight_bytes + kv_bytes) / bw
        j.update(floor_step_ms=1e3 * floor_s, fraction_of_floor=floor_s / (j["step_ms"] / 1e3))
        row = dict(batch=b, jax=j)
        if ref is not None:
            r = bench_torch(ref, prompt_ids, b, args.new_tokens, args.torch_repeats, device="cuda")
            row.update(transformers=r, speedup=j["decode_tok_s"] / r["decode_tok_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, None, args)
    return dict(mode="gpu", bandwidth_GBps=bw / 1e9, rows=rows)


def print_table(rows, llama_cpp, args):
    print(f"\nDecode throughput, {args.new_tokens} new tokens, tokens/s summed over the batch")
    print("| batch | JAX dtype | transformers dtype | JAX decode tok/s | transformers decode tok/s | speedup "
          "| JAX prefill s | transformers prefill s | JAX compile s (prefill + decode) | extra |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r.get('dtype', 'bfloat16')} | {r.get('torch_dtype', 'bfloat16')} ", end="")
        j, t = r["jax"], r.get("transformers")
        extra = []
        if "gather_ms" in j:
            extra.append(f"plain gather {j['gather_ms']:.1f} ms = {100 * j['gather_fraction_of_step']:.1f}% of a step; "
                         f"in-place resampling ({j['rows_replaced']}/{r['batch']} rows replaced) "
                         f"{j['inplace_ms']:.1f} ms = {100 * j['inplace_fraction_of_step']:.1f}% "
                         f"({j['cache_mb']:.0f} MiB cache)")
        if "fraction_of_floor" in j:
            extra.append(f"{100 * j['fraction_of_floor']:.0f}% of bandwidth floor")
        print(f"| {j['decode_tok_s']:.1f} | {t['decode_tok_s']:.1f} | {r['speedup']:.2f}x "
              f"| {j['prefill_s']:.3f} | {t['prefill_s']:.3f} "
              if t else f"| {j['decode_tok_s']:.1f} | - | - | {j['prefill_s']:.3f} | - ", end="")
        print(f"| {j['compile_prefill_s']:.1f} + {j['compile_decode_s']:.1f} | {'; '.join(extra)} |")
    if llama_cpp:
        print(f"\nllama-cpp-python (same GGUF, batch 1): decode {llama_cpp['decode_tok_s']:.1f} tok/s, "
              f"prefill {llama_cpp['prefill_s']:.3f} s")
    elif args.mode == "cpu":
        print("\nllama-cpp-python: not installed, skipped")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per JAX measurement (best is kept)")
    p.add_argument("--torch-repeats", type=int, default=1, help="timed runs per transformers measurement")
    p.add_argument("--gather-batch", type=int, default=32, help="batch size at which to time the resampling gather")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "mixed"], default="float32",
                   help="CPU mode, JAX side: 'mixed' = bfloat16 matmuls with float32 activations and KV cache "
                        "(models.llm.with_matmul_dtype)")
    p.add_argument("--torch-dtype", nargs="+", choices=["float32", "bfloat16"], default=None,
                   help="CPU mode, transformers side, one run per dtype on the same weights (default: float32, "
                        "or bfloat16 when --dtype bfloat16)")
    p.add_argument("--tiny", action="store_true",
                   help="a toy model with random weights, a smoke test of the script (GPU mode: Qwen2-shaped, "
                        "on any backend; CPU mode: Llama-shaped, against transformers)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.torch_dtype is None:
        args.torch_dtype = ["bfloat16" if args.dtype == "bfloat16" else "float32"]
    res = run_cpu(args) if args.mode == "cpu" else run_gpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
