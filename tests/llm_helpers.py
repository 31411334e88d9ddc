"""Shared, process-cached fixtures for the LLM tests (models load once per pytest process)."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TMP = tempfile.mkdtemp(prefix="ppl-llm-tests-")


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over the compared logits."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.cache
def smollm2():
    """(model, tokenizer, config, hf_state) of the embedded SmolLM2, float32."""
    from models.llm import gguf_loader, smollm2_path
    from models.llm.tokenizer import Tokenizer
    from models.llm.transformer import model_from_hf_state

    reader = gguf_loader.open_gguf(smollm2_path())
    meta = reader.metadata
    config = gguf_loader.config_from_gguf(meta, {t.name for t in reader.tensors})
    state = gguf_loader.hf_state_from_gguf(reader, config)
    model = model_from_hf_state(config, state)
    return model, Tokenizer.from_gguf_metadata(meta), config, state


GREEDY_QUESTIONS = ("What is the capital of France?", "Name three colours.")


@functools.cache
def smollm2_greedy(n: int = 32):
    """Greedy continuations (EOS ignored) of the chat-rendered GREEDY_QUESTIONS: (prompts, tokens [2, n])."""
    import jax

    from models.llm import Sampling, generate_until, start

    model, tok, _, _ = smollm2()
    prompts = [tok.encode_chat(q) for q in GREEDY_QUESTIONS]
    state = start(model, prompts, n)
    _, out = generate_until(model, state, jax.random.key(0), max_new_tokens=n, eos_ids=(),
                            sampling=Sampling(temperature=0.0))
    return prompts, np.asarray(out.tokens)


@functools.cache
def torch_smollm2():
    """transformers' LlamaForCausalLM holding the same dequantised SmolLM2 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, _, c, state = smollm2()
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.device("meta"):
        ref = LlamaForCausalLM(cfg)
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                        strict=False, assign=True)
    ref.tie_weights()
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: rebuild them off the meta device.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ref.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    return ref.eval()


@functools.cache
def hf_gguf_tokenizer():
    """transformers' own tokenizer built from the GGUF (vocabulary, merges, special tokens, template).

    transformers has no entry for the GGUF pre-tokenizer name ``smollm`` and falls back to plain
    GPT-2 splitting, which differs from SmolLM2's tokenizer.json (and llama.cpp's ``smollm`` rule)
    where every digit is split off first (``Digits(individual_digits=True)``, then ``ByteLevel``):
    e.g. ``"a  9"`` gives ``ĠĠ`` + ``9`` there but ``Ġ`` + ``Ġ`` + ``9`` in the fallback. The
    reference gets SmolLM2's pre-tokenizer back; everything else is transformers' own conversion.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    from models.llm import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return tok


@functools.cache
def tiny_checkpoint(arch: str) -> str:
    """A tiny random checkpoint written by transformers' save_pretrained (safetensors).

    ``llama``: untied embeddings, GQA, Llama-3 RoPE scaling, one safetensors file.
    ``qwen2``: q/k/v biases, tied embeddings, sharded into several files with an index.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0 if arch == "llama" else 1)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = LlamaForCausalLM(cfg)
        shard = "10GB"
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1e6)
        model = Qwen2ForCausalLM(cfg)
        shard = "150KB"
    else:
        raise ValueError(arch)
    # Random init has tiny weights and near-uniform logits; scale up so greedy decoding is decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)
    path = os.path.join(_TMP, f"tiny-{arch}")
    model.save_pretrained(path, max_shard_size=shard)
    return path


@functools.cache
def tiny_torch(arch: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch)).eval()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reordering of Q/K rows (the forward direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, arch: str = "llama", qtype: str = "Q8_0", hf_state=None, *, layers=2, hidden=64,
               heads=4, kv_heads=2, ffn=96, vocab=320, rope_freqs=None, bad_tensor_type=None) -> dict:
    """Write a small GGUF the way llama.cpp's converter does; returns the (quantised-then-dequantised)
    Hugging Face-named float32 weights it holds, for building a reference model."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    rng = np.random.default_rng(0)
    if hf_state is None:
        d = hidden // heads
        hf_state = {"model.embed_tokens.weight": rng.normal(0, 0.3, (vocab, hidden)),
                    "model.norm.weight": 1 + 0.1 * rng.normal(size=hidden)}
        for i in range(layers):
            p = f"model.layers.{i}."
            hf_state.update({
                p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=hidden),
                p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=hidden),
                p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (heads * d, hidden)),
                p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (kv_heads * d, hidden)),
                p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (kv_heads * d, hidden)),
                p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (hidden, heads * d)),
                p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (ffn, hidden)),
                p + "mlp.up_proj.weight": rng.normal(0, 0.2, (ffn, hidden)),
                p + "mlp.down_proj.weight": rng.normal(0, 0.2, (hidden, ffn)),
            })
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                   "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                   "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                   "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                   "mlp.down_proj.weight": "ffn_down.weight"}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    # A toy byte-level vocabulary: the 256 byte symbols, then control tokens.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + [f"<|ctl{i}|>" for i in range(vocab - 257)] + ["Ġt"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (vocab - 257) + [1])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    held = {}
    for name, value in hf_state.items():
        value = np.asarray(value, np.float32)
        if name in names:
            gname = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer_names[rest]}"
        if gname.endswith("attn_q.weight"):
            value_g = llama_cpp_permute(value, heads) if arch == "llama" else value
        elif gname.endswith("attn_k.weight"):
            value_g = llama_cpp_permute(value, kv_heads) if arch == "llama" else value
        else:
            value_g = value
        if value.ndim == 2:
            qt = Q[qtype]
            data = quants.quantize(value_g, qt)
            held[name] = quants.dequantize(quants.quantize(value, qt), qt).reshape(value.shape)
            w.add_tensor(gname, data, raw_dtype=qt)
        else:
            held[name] = value
            w.add_tensor(gname, value_g)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    if bad_tensor_type is not None:
        qt = Q[bad_tensor_type]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        w.add_tensor("blk.0.extra.weight", np.zeros((1, size), np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held
