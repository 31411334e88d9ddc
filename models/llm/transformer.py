"""Llama-family decoder (Llama, SmolLM2, Qwen2) in equinox.

Weights keep the Hugging Face layout (``[out_features, in_features]``); the Q/K/V projections are
fused into one matrix and the gate/up projections into another, so a layer is four matmuls.
The KV cache is a pytree whose every leaf has the batch (particle) axis first, so resampling is
``jax.tree.map(lambda x: x[ancestors], cache)``; a chunk of new tokens is written into it with a
per-row scatter (in place under ``jit`` with donated or loop-carried buffers).
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .config import ModelConfig, rope_inv_freq

_F32 = jnp.float32


def _matmul_t(x: Array, w: Array) -> Array:
    """``x @ w.T`` in float32 with operands in ``w``'s dtype.

    XLA:CPU multiplies a single bfloat16 row by a matrix ≈ 8x slower than two rows (a slow
    matrix-vector path; 121 vs 16 ms for 30 [3072 × 576] matrices): a lone row is padded to two.
    """
    rows = x.size // x.shape[-1]
    pad = rows == 1 and w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
    xm = x.astype(w.dtype)
    if pad:
        xm = xm.reshape(1, x.shape[-1])
        xm = jnp.concatenate([xm, jnp.zeros_like(xm)])
    y = jax.lax.dot_general(xm, w, (((xm.ndim - 1,), (1,)), ((), ())), preferred_element_type=_F32)
    return y[:1].reshape(*x.shape[:-1], w.shape[0]) if pad else y


def _linear(x: Array, w: Array, b: Array | None = None) -> Array:
    """``x @ w.T + b`` with ``w`` in ``[out, in]`` layout, operands in ``w``'s dtype, accumulating in
    float32; the result in ``x``'s dtype."""
    y = _matmul_t(x, w)
    if b is not None:
        y = y + b.astype(_F32)
    return y.astype(x.dtype)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in float32, as transformers does, then scaled in the input dtype."""
    xf = x.astype(_F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class KVCache(eqx.Module):
    """Preallocated keys and values, one ``[B, kv_heads, max_len, head_dim]`` array per layer."""

    k: tuple[Float[Array, "B Hkv T D"], ...]
    v: tuple[Float[Array, "B Hkv T D"], ...]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zero KV cache for ``batch_size`` rows of ``max_len`` tokens."""
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
    return KVCache(k=tuple(zeros() for _ in range(config.num_layers)),
                   v=tuple(zeros() for _ in range(config.num_layers)))


def cache_nbytes(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> int:
    return batch_size * max_len * config.kv_bytes_per_token(jnp.dtype(dtype).itemsize)


class Attention(eqx.Module):
    qkv_weight: Float[Array, "Dqkv H"]
    qkv_bias: Float[Array, " Dqkv"] | None
    o_weight: Float[Array, "H Dq"]
    o_bias: Float[Array, " H"] | None


class MLP(eqx.Module):
    gate_up_weight: Float[Array, "F2 H"]  # gate rows first, then up rows
    down_weight: Float[Array, "H F"]


class DecoderLayer(eqx.Module):
    input_norm: Float[Array, " H"]
    attn: Attention
    post_norm: Float[Array, " H"]
    mlp: MLP


class LlamaModel(eqx.Module):
    """A Llama / Qwen2 decoder. ``lm_head`` is ``None`` when the embeddings are tied."""

    config: ModelConfig = eqx.field(static=True)
    embed: Float[Array, "V H"]
    layers: tuple[DecoderLayer, ...]
    norm: Float[Array, " H"]
    lm_head: Float[Array, "V H"] | None
    inv_freq: Float[Array, " D2"]

    @property
    def dtype(self):
        """Activation and KV-cache dtype: that of the norm weights (see :func:`with_matmul_dtype`)."""
        return self.norm.dtype

    @property
    def matmul_dtype(self):
        """Dtype of the projection and embedding matrices (the matmul operands)."""
        return self.embed.dtype

    def head_weight(self) -> Array:
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, hidden: Float[Array, "... H"]) -> Float[Array, "... V"]:
        """Final norm and language-model head; logits in float32."""
        h = rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        w = self.head_weight()
        return _matmul_t(h, w)


# ----------------------------------------------------------------------------- construction
def model_from_hf_state(config: ModelConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32) -> LlamaModel:
    """Assemble a :class:`LlamaModel` from Hugging Face parameter names (``model.layers.0...``)."""

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"checkpoint lacks tensor {name!r} required by {config.arch} config")
        return tensors[name]

    def check(x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)} from the config")
        return x

    def arr(x: np.ndarray, shape: tuple[int, ...], name: str) -> Array:
        return jnp.asarray(np.asarray(check(x, shape, name)), dtype=dtype)

    def f32(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(check(get(name), shape, name), np.float32)

    c = config
    H, D, F = c.hidden_size, c.head_dim, c.intermediate_size
    nq, nkv = c.num_heads * D, c.num_kv_heads * D
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv_w = np.concatenate([f32(a + "q_proj.weight", (nq, H)), f32(a + "k_proj.weight", (nkv, H)),
                                f32(a + "v_proj.weight", (nkv, H))], 0)
        qkv_b = None
        if c.qkv_bias:
            qkv_b = jnp.asarray(np.concatenate([f32(a + "q_proj.bias", (nq,)), f32(a + "k_proj.bias", (nkv,)),
                                                f32(a + "v_proj.bias", (nkv,))]), dtype)
        o_b = arr(get(a + "o_proj.bias"), (H,), a + "o_proj.bias") if c.o_bias else None
        gate_up = np.concatenate([f32(p + "mlp.gate_proj.weight", (F, H)), f32(p + "mlp.up_proj.weight", (F, H))], 0)
        layers.append(DecoderLayer(
            input_norm=arr(get(p + "input_layernorm.weight"), (H,), p + "input_layernorm.weight"),
            attn=Attention(
                qkv_weight=jnp.asarray(qkv_w, dtype),
                qkv_bias=qkv_b,
                o_weight=arr(get(a + "o_proj.weight"), (H, nq), a + "o_proj.weight"),
                o_bias=o_b,
            ),
            post_norm=arr(get(p + "post_attention_layernorm.weight"), (H,), p + "post_attention_layernorm.weight"),
            mlp=MLP(
                gate_up_weight=jnp.asarray(gate_up, dtype),
                down_weight=arr(get(p + "mlp.down_proj.weight"), (H, F), p + "mlp.down_proj.weight"),
            ),
        ))
    embed = arr(get("model.embed_tokens.weight"), (c.vocab_size, H), "model.embed_tokens.weight")
    lm_head = None
    if not c.tie_embeddings:
        lm_head = arr(get("lm_head.weight"), (c.vocab_size, H), "lm_head.weight")
    return LlamaModel(
        config=c,
        embed=embed,
        layers=tuple(layers),
        norm=arr(get("model.norm.weight"), (H,), "model.norm.weight"),
        lm_head=lm_head,
        inv_freq=jnp.asarray(rope_inv_freq(c)),
    )


def init_random(config: ModelConfig, key: Array, dtype=jnp.float32, scale: float = 0.02) -> LlamaModel:
    """Random weights of the given shape (benchmarks and tests); norms are ones."""
    return _init_random(config, key, jnp.dtype(dtype), float(scale))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_random(config: ModelConfig, key: Array, dtype, scale: float) -> LlamaModel:
    c = config
    H, D, F = c.hidden_size, c.head_dim, c.intermediate_size
    nq, nkv = c.num_heads * D, c.num_kv_heads * D
    shapes = [(c.vocab_size, H)] + ([] if c.tie_embeddings else [(c.vocab_size, H)])
    for _ in range(c.num_layers):
        shapes += [(nq + 2 * nkv, H), (H, nq), (2 * F, H), (H, F)]
        shapes += ([(nq + 2 * nkv,)] if c.qkv_bias else []) + ([(H,)] if c.o_bias else [])
    # One random draw sliced into every weight (one RNG kernel to compile, not one per weight).
    flat = scale * jax.random.normal(key, (sum(math.prod(sh) for sh in shapes),), _F32)
    pos = [0]

    def normal(shape):
        n = math.prod(shape)
        out = jax.lax.dynamic_slice_in_dim(flat, pos[0], n).reshape(shape).astype(dtype)
        pos[0] += n
        return out

    ones = lambda n: jnp.ones((n,), dtype)  # noqa: E731
    embed = normal((c.vocab_size, H))
    lm_head = None if c.tie_embeddings else normal((c.vocab_size, H))
    layers = tuple(
        DecoderLayer(
            input_norm=ones(H),
            attn=Attention(normal((nq + 2 * nkv, H)), normal((nq + 2 * nkv,)) if c.qkv_bias else None,
                           normal((H, nq)), normal((H,)) if c.o_bias else None),
            post_norm=ones(H),
            mlp=MLP(normal((2 * F, H)), normal((H, F))),
        )
        for _ in range(c.num_layers)
    )
    assert pos[0] == flat.size
    return LlamaModel(config=c, embed=embed, layers=layers, norm=ones(H), lm_head=lm_head,
                      inv_freq=jnp.asarray(rope_inv_freq(c)))


def with_matmul_dtype(model: LlamaModel, dtype) -> LlamaModel:
    """Mixed precision: the projection and embedding matrices in ``dtype``, the rest unchanged.

    Every matmul then multiplies ``dtype`` operands (activations are rounded to ``dtype`` at the
    matmul input) with float32 accumulation, while norms, biases, RoPE, softmax, the residual
    stream and the KV cache keep the model's dtype: the split of ``torch.autocast``. With
    ``bfloat16`` on a float32 model this halves the weights' memory, and on CPUs with bf16
    matrix units (AVX512-BF16, AMX) the matmuls run ≈ 3x faster than in float32.
    """
    dtype = jnp.dtype(dtype)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    layers = tuple(
        eqx.tree_at(lambda l: (l.attn.qkv_weight, l.attn.o_weight, l.mlp.gate_up_weight, l.mlp.down_weight),
                    layer, (cast(layer.attn.qkv_weight), cast(layer.attn.o_weight),
                            cast(layer.mlp.gate_up_weight), cast(layer.mlp.down_weight)))
        for layer in model.layers)
    lm_head = None if model.lm_head is None else cast(model.lm_head)
    return eqx.tree_at(lambda m: (m.embed, m.layers, m.lm_head), model, (cast(model.embed), layers, lm_head),
                       is_leaf=lambda x: x is None)


def to_dtype(model: LlamaModel, dtype) -> LlamaModel:
    """Cast every floating weight (not the RoPE frequencies) to ``dtype``."""
    inv = model.inv_freq
    model = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, model)
    return eqx.tree_at(lambda m: m.inv_freq, model, inv)


# ----------------------------------------------------------------------------- forward
def _rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotary embedding in the Hugging Face (rotate-half) convention; x: [B, S, heads, D]."""
    d2 = x.shape[-1] // 2
    xf = x.astype(_F32)
    x1, x2 = xf[..., :d2], xf[..., d2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def forward(
    model: LlamaModel,
    tokens: Int[Array, "B S"],
    start: Int[Array, " B"],
    cache: KVCache,
    attend: int | None = None,
) -> tuple[Float[Array, "B S H"], KVCache]:
    """Run a chunk of ``S`` tokens per row, written at cache slots ``start[b] + s``.

    Each query at position ``p = start[b] + s`` attends to cache slots ``t <= p`` of its row, so
    padding beyond a row's valid tokens is never seen by valid queries and is overwritten later.
    Slots past the cache end are dropped (callers check capacity). Returns the final hidden states
    (before the last norm) and the updated cache.

    ``attend`` (static) reads only the first ``attend`` cache slots in attention, which is exact
    for every query at a position ``p < attend`` (other rows' outputs are then meaningless): the
    attention's cost follows the filled part of the cache, not its preallocated length.
    """
    c = model.config
    B, S = tokens.shape
    T = cache.max_len if attend is None else min(int(attend), cache.max_len)
    D, nkv, g = c.head_dim, c.num_kv_heads, c.group_size
    nq = c.num_heads * D
    pos = start[:, None] + jnp.arange(S, dtype=start.dtype)[None, :]  # [B, S]
    ang = pos.astype(_F32)[..., None] * model.inv_freq  # [B, S, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    mask = jnp.arange(T)[None, None, :] <= pos[:, :, None]  # [B, S, T]
    mask = mask[:, None, None, :, :]  # [B, 1, 1, S, T]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, S))
    scale = 1.0 / math.sqrt(D)

    x = model.embed[tokens].astype(model.dtype)  # [B, S, H]
    ks, vs = [], []
    for layer, kc, vc in zip(model.layers, cache.k, cache.v):
        h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
        qkv = _linear(h, layer.attn.qkv_weight, layer.attn.qkv_bias)
        q = qkv[..., :nq].reshape(B, S, c.num_heads, D)
        k = qkv[..., nq:nq + nkv * D].reshape(B, S, nkv, D)
        v = qkv[..., nq + nkv * D:].reshape(B, S, nkv, D)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        kc = kc.at[rows, :, pos].set(k.astype(kc.dtype), mode="drop")
        vc = vc.at[rows, :, pos].set(v.astype(vc.dtype), mode="drop")
        ks.append(kc)
        vs.append(vc)
        if T < cache.max_len:
            kc, vc = kc[:, :, :T], vc[:, :, :T]
        qg = q.reshape(B, S, nkv, g, D)
        if S == 1:
            # One query per row (decoding): the per-(row, kv-head) products are [g, D] x [D, T],
            # far too small for a batched matmul; a broadcast multiply and a reduction stream the
            # cache once and are several times faster on CPU.
            q1 = qg[:, 0].astype(_F32)  # [B, K, G, D]
            s = jnp.sum(q1[:, :, :, None, :] * kc[:, :, None, :, :].astype(_F32), axis=-1)  # [B, K, G, T]
            s = s[:, :, :, None, :] * scale  # [B, K, G, 1, T]
        else:
            s = jnp.einsum("bskgd,bktd->bkgst", qg, kc, preferred_element_type=_F32) * scale
        s = jnp.where(mask, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(vc.dtype)
        if S == 1:
            o = jnp.sum(p[:, :, :, 0, :, None].astype(_F32) * vc[:, :, None, :, :].astype(_F32), axis=3)  # [B,K,G,D]
            o = o[:, None].astype(x.dtype)  # [B, 1, K, G, D]
        else:
            # XLA:CPU has no bf16 x bf16 -> f32 kernel for this batched dot (UNIMPLEMENTED at
            # batch > 1): multiply in float32 there.
            pv_dtype = _F32 if jax.default_backend() == "cpu" else vc.dtype
            o = jnp.einsum("bkgst,bktd->bskgd", p.astype(pv_dtype), vc.astype(pv_dtype),
                           preferred_element_type=_F32).astype(x.dtype)
        o = _linear(o.reshape(B, S, nq), layer.attn.o_weight, layer.attn.o_bias)
        x = x + o
        h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
        gu = _linear(h, layer.mlp.gate_up_weight)
        F = c.intermediate_size
        a = jax.nn.silu(gu[..., :F].astype(_F32)).astype(x.dtype) * gu[..., F:]
        x = x + _linear(a, layer.mlp.down_weight)
    return x, KVCache(k=tuple(ks), v=tuple(vs))


@jax.jit
def forward_logits(
    model: LlamaModel, tokens: Int[Array, "B S"]
) -> Float[Array, "B S V"]:
    """Logits at every position of right-padded sequences (teacher forcing, no cache kept)."""
    B, S = tokens.shape
    cache = init_cache(model.config, B, S, model.dtype)
    hidden, _ = forward(model, tokens, jnp.zeros((B,), jnp.int32), cache)
    return model.logits(hidden)
