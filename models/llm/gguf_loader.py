"""Load a Llama-family model and its tokenizer from a GGUF file (llama.cpp's format)."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .gguf_file import GGUFFile
from .tokenizer import Tokenizer
from .transformer import LlamaModel, model_from_hf_state

# Tensor types we dequantise (through gguf.quants); anything else is refused by name.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, turning failures into clear errors (data stays on disk)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"GGUF path is not a file: {path!r}")
    return GGUFFile(path)


def gguf_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value metadata of a parsed GGUF file as Python values."""
    return reader.metadata


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], name: str = "") -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r} in GGUF metadata; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key):
        k = f"{arch}.{key}"
        if k not in meta:
            raise ValueError(f"GGUF metadata lacks {k!r}")
        return meta[k]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // heads)))
    rope_scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        rope_scaling = (("factor", float(meta[f"{arch}.rope.scaling.factor"])), ("rope_type", "linear"))
    elif kind not in (None, "none"):
        raise ValueError(f"unsupported RoPE scaling type {kind!r} in GGUF metadata")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        name=name or str(meta.get("general.name", "")),
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K projection rows (interleaved -> rotate-half RoPE).

    ``convert_hf_to_gguf.py`` applies ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)`` to the
    Hugging Face rows of each head; this is its inverse.
    """
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """Dequantise one GGUF tensor to float32 in numpy (row-major, Hugging Face ``[out, in]`` order)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise ValueError(
            f"unsupported GGUF tensor type {kind} for tensor {tensor.name!r}; "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    shape = tuple(int(s) for s in reversed(tensor.shape))
    try:
        out = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    except Exception as e:
        raise ValueError(f"cannot dequantise tensor {tensor.name!r} ({kind}): {e}") from None
    out = np.asarray(out, np.float32)
    if out.size != int(np.prod(shape)):
        raise ValueError(f"corrupt GGUF tensor {tensor.name!r}: {out.size} values for shape {shape}")
    return out.reshape(shape)


def hf_state_from_gguf(reader, config: ModelConfig) -> dict[str, np.ndarray]:
    """Dequantised tensors under Hugging Face names (Q/K rows un-permuted for Llama)."""
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        if name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[name]
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise ValueError(f"unexpected tensor {name!r} in GGUF file for architecture {config.arch}")
            hf = f"model.layers.{int(idx)}.{_LAYER_NAMES[rest]}"
        elif name == "rope_freqs.weight":
            hf = "rope_freqs"
        else:
            raise ValueError(f"unexpected tensor {name!r} in GGUF file for architecture {config.arch}")
        w = dequantize_tensor(t)
        if config.arch == "llama":
            # llama.cpp permutes Q and K (weights and biases) for its interleaved RoPE.
            if ".attn_q." in name:
                w = unpermute_qk(w, config.num_heads)
            elif ".attn_k." in name:
                w = unpermute_qk(w, config.num_kv_heads)
        state[hf] = w
    return state


def load_gguf(
    path: str | os.PathLike, dtype=jnp.float32
) -> tuple[LlamaModel, Tokenizer, ModelConfig]:
    """Load model weights (dequantised to ``dtype``), tokenizer and config from a GGUF file."""
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = config_from_gguf(meta, names)
    # Refuse unsupported quantisation before spending time on the rest.
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"unsupported GGUF tensor type {t.tensor_type.name} for tensor {t.name!r}; "
                f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    state = hf_state_from_gguf(reader, config)
    model = model_from_hf_state(config, state, dtype=dtype)
    if "rope_freqs" in state:  # Llama-3 style frequency factors stored as a tensor
        import equinox as eqx

        inv = model.inv_freq / jnp.asarray(state["rope_freqs"], jnp.float32)
        model = eqx.tree_at(lambda m: m.inv_freq, model, inv)
    return model, tokenizer, config
