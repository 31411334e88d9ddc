"""Llama-family decoder (Llama, SmolLM2, Qwen2) in equinox.

Weights keep the Hugging Face layout (``[out_features, in_features]``); the Q/K/V projections are
fused into one matrix and the gate/up projections into another, so a layer is four matmuls.
The layers' weights are stacked along a leading layer axis (one :class:`DecoderLayer` whose every
leaf is ``[L, ...]``) and the decoder runs them under ``jax.lax.scan``: the layer is traced and
compiled once, not ``L`` times.

The KV cache is two arrays ``[B, L, kv_heads, max_len, head_dim]`` with the batch (particle)
axis first, so resampling is ``jax.tree.map(lambda x: x[ancestors], cache)``. The scan carries
the whole cache; layer ``l`` writes its new keys and values with a per-row scatter at index ``l``
and reads its slice with ``dynamic_slice`` (in place under ``jit`` with donated or loop-carried
buffers).
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
    """Preallocated keys and values of every layer: two ``[B, L, kv_heads, max_len, head_dim]``
    arrays (batch first, then layer)."""

    k: Float[Array, "B L Hkv T D"]
    v: Float[Array, "B L Hkv T D"]

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_layers(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple[Array, Array]:
        """Keys and values of layer ``i``: two ``[B, kv_heads, max_len, head_dim]`` arrays."""
        return self.k[:, i], self.v[:, i]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (self.k, self.v))


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zero KV cache for ``batch_size`` rows of ``max_len`` tokens (all layers)."""
    shape = (batch_size, config.num_layers, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


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
    """One decoder layer; in :class:`LlamaModel` every leaf has a leading layer axis ``L``."""

    input_norm: Float[Array, " H"]
    attn: Attention
    post_norm: Float[Array, " H"]
    mlp: MLP


class LlamaModel(eqx.Module):
    """A Llama / Qwen2 decoder. ``lm_head`` is ``None`` when the embeddings are tied.

    ``layers`` is one :class:`DecoderLayer` holding all layers' weights stacked along a leading
    axis (``layers.attn.qkv_weight`` is ``[L, Dqkv, H]``); :meth:`layer` slices one out.
    """

    config: ModelConfig = eqx.field(static=True)
    embed: Float[Array, "V H"]
    layers: DecoderLayer  # stacked; a tuple of per-layer DecoderLayer after unstack_layers
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

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def layer(self, i: int) -> DecoderLayer:
        """The weights of layer ``i`` (a slice of the stacked :attr:`layers`)."""
        if not isinstance(self.layers, DecoderLayer):
            return self.layers[i]
        return jax.tree.map(lambda x: x[i], self.layers)

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
    H, D, F, L = c.hidden_size, c.head_dim, c.intermediate_size, c.num_layers
    nq, nkv = c.num_heads * D, c.num_kv_heads * D

    def stacked(parts) -> Array:
        """Layer ``i``'s weight is ``parts(i)`` (a list of arrays concatenated along axis 0); all
        layers are staged in one preallocated float32 buffer, then converted once."""
        first = parts(0)
        buf = np.empty((L, sum(x.shape[0] for x in first), *first[0].shape[1:]), np.float32)
        for i in range(L):
            buf[i] = np.concatenate(parts(i), 0) if i else np.concatenate(first, 0)
        return jnp.asarray(buf, dtype)

    def pre(i: int) -> str:
        return f"model.layers.{i}."

    def attn(i: int, proj: str, kind: str, rows: int, cols: int | None = None) -> np.ndarray:
        name = f"{pre(i)}self_attn.{proj}.{kind}"
        return f32(name, (rows,) if cols is None else (rows, cols))

    layers = DecoderLayer(
        input_norm=stacked(lambda i: [f32(pre(i) + "input_layernorm.weight", (H,))]),
        attn=Attention(
            qkv_weight=stacked(lambda i: [attn(i, "q_proj", "weight", nq, H), attn(i, "k_proj", "weight", nkv, H),
                                          attn(i, "v_proj", "weight", nkv, H)]),
            qkv_bias=stacked(lambda i: [attn(i, "q_proj", "bias", nq), attn(i, "k_proj", "bias", nkv),
                                        attn(i, "v_proj", "bias", nkv)]) if c.qkv_bias else None,
            o_weight=stacked(lambda i: [attn(i, "o_proj", "weight", H, nq)]),
            o_bias=stacked(lambda i: [attn(i, "o_proj", "bias", H)]) if c.o_bias else None,
        ),
        post_norm=stacked(lambda i: [f32(pre(i) + "post_attention_layernorm.weight", (H,))]),
        mlp=MLP(
            gate_up_weight=stacked(lambda i: [f32(pre(i) + "mlp.gate_proj.weight", (F, H)),
                                              f32(pre(i) + "mlp.up_proj.weight", (F, H))]),
            down_weight=stacked(lambda i: [f32(pre(i) + "mlp.down_proj.weight", (H, F))]),
        ),
    )
    embed = arr(get("model.embed_tokens.weight"), (c.vocab_size, H), "model.embed_tokens.weight")
    lm_head = None
    if not c.tie_embeddings:
        lm_head = arr(get("lm_head.weight"), (c.vocab_size, H), "lm_head.weight")
    return LlamaModel(
        config=c,
        embed=embed,
        layers=layers,
        norm=arr(get("model.norm.weight"), (H,), "model.norm.weight"),
        lm_head=lm_head,
        inv_freq=jnp.asarray(rope_inv_freq(c)),
    )


def stack_layers(layers) -> DecoderLayer:
    """One :class:`DecoderLayer` with the weights of ``layers`` stacked along a leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def unstack_layers(model: "LlamaModel") -> "LlamaModel":
    """The model with per-layer weights (a tuple of :class:`DecoderLayer`), run by an unrolled loop.

    The default stacked model runs its layers under ``lax.scan`` and compiles ≈ L times less
    code, but on XLA:CPU every step of the scan copies its layer's weight matrices out of the
    stack before the matmuls (a dynamic slice cannot feed a dot in place), which at small batch
    costs up to ≈ 2-3x the decode time. Unstacked weights give the unrolled program: no copies,
    L times the compile time. Same numbers either way; the KV cache layout is the same.
    """
    if not isinstance(model.layers, DecoderLayer):
        return model
    return eqx.tree_at(lambda m: m.layers, model, tuple(model.layer(i) for i in range(model.num_layers)))


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
    return LlamaModel(config=c, embed=embed, layers=stack_layers(layers), norm=ones(H), lm_head=lm_head,
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
    def cast_layer(layer: DecoderLayer) -> DecoderLayer:
        return eqx.tree_at(lambda l: (l.attn.qkv_weight, l.attn.o_weight, l.mlp.gate_up_weight, l.mlp.down_weight),
                           layer, (cast(layer.attn.qkv_weight), cast(layer.attn.o_weight),
                                   cast(layer.mlp.gate_up_weight), cast(layer.mlp.down_weight)))

    layers = (cast_layer(model.layers) if isinstance(model.layers, DecoderLayer)
              else tuple(cast_layer(layer) for layer in model.layers))
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

    Attention sees the cached slots ``t < start[b]`` of the row (written by earlier calls) and the
    chunk's own keys ``s' <= s``; the chunk is written to the cache after the last layer.
    ``attend`` (static) reads only the first ``attend`` cache slots, which is exact for every row
    with ``start[b] <= attend`` (other rows' outputs are then meaningless): the attention's cost
    follows the filled part of the cache, not its preallocated length (``attend=0``: the cache is
    empty and not read, as in a prefill).

    The layers run under ``jax.lax.scan`` over the stacked weights, carrying the hidden states and
    the whole cache: layer ``l`` scatters its new keys and values into index ``l`` of the cache's
    layer axis, then reads that layer's slice (``dynamic_slice``), so the cache is updated in place.
    """
    c = model.config
    B, S = tokens.shape
    T = cache.max_len if attend is None else min(int(attend), cache.max_len)
    D, nkv, g = c.head_dim, c.num_kv_heads, c.group_size
    nq = c.num_heads * D
    F = c.intermediate_size
    cdt = cache.k.dtype
    pos = start[:, None] + jnp.arange(S, dtype=start.dtype)[None, :]  # [B, S]
    ang = pos.astype(_F32)[..., None] * model.inv_freq  # [B, S, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    # Keys a query sees: the cached slots t < start (written by earlier calls) and the chunk's own
    # positions s' <= s. Cached slots >= start are stale (or this chunk's, not written yet).
    old_mask = (jnp.arange(T)[None, :] < start[:, None])[:, None, None, None, :]  # [B, 1, 1, 1, T]
    new_mask = (jnp.arange(S)[None, :] <= jnp.arange(S)[:, None])[None, None, None]  # [1, 1, 1, S, S]
    scale = 1.0 / math.sqrt(D)

    def attention(q, k, v, l):
        """q [B, S, heads, D]; k, v [B, S, K, D] of the chunk (cache dtype); the layer's cached
        keys / values are read (first T slots) from the loop-invariant input cache."""
        qg = q.reshape(B, S, nkv, g, D)
        if T > 0:
            kc = jax.lax.dynamic_slice(cache.k, (0, l, 0, 0, 0), (B, 1, nkv, T, D))[:, 0]  # [B, K, T, D]
            vc = jax.lax.dynamic_slice(cache.v, (0, l, 0, 0, 0), (B, 1, nkv, T, D))[:, 0]
        if S == 1:
            # One query per row (decoding): the per-(row, kv-head) products are [g, D] x [D, T],
            # far too small for a batched matmul; a broadcast multiply and a reduction stream the
            # cache once and are several times faster on CPU.
            q1 = qg[:, 0].astype(_F32)  # [B, K, G, D]
            s_new = jnp.sum(q1 * k[:, 0, :, None, :].astype(_F32), axis=-1)[..., None, None] * scale  # [B,K,G,1,1]
            if T > 0:
                s_old = jnp.sum(q1[:, :, :, None, :] * kc[:, :, None, :, :].astype(_F32), axis=-1)  # [B, K, G, T]
                s_old = s_old[:, :, :, None, :] * scale  # [B, K, G, 1, T]
        else:
            s_new = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=_F32) * scale
            if T > 0:
                s_old = jnp.einsum("bskgd,bktd->bkgst", qg, kc, preferred_element_type=_F32) * scale
        s_new = jnp.where(new_mask, s_new, -jnp.inf)
        if T > 0:
            s_all = jnp.concatenate([jnp.where(old_mask, s_old, -jnp.inf), s_new], axis=-1)
        else:
            s_all = s_new
        p = jax.nn.softmax(s_all, axis=-1).astype(cdt)  # [B, K, G, S, T + S]
        p_old, p_new = p[..., :T], p[..., T:]
        if S == 1:
            o = p_new[:, :, :, 0, 0, None].astype(_F32) * v[:, 0, :, None, :].astype(_F32)  # [B, K, G, D]
            if T > 0:
                o = o + jnp.sum(p_old[:, :, :, 0, :, None].astype(_F32) * vc[:, :, None, :, :].astype(_F32), axis=3)
            return o[:, None]  # [B, 1, K, G, D]
        # XLA:CPU has no bf16 x bf16 -> f32 kernel for this batched dot (UNIMPLEMENTED at
        # batch > 1): multiply in float32 there.
        pv_dtype = _F32 if jax.default_backend() == "cpu" else cdt
        o = jnp.einsum("bkgst,btkd->bskgd", p_new.astype(pv_dtype), v.astype(pv_dtype), preferred_element_type=_F32)
        if T > 0:
            o = o + jnp.einsum("bkgst,bktd->bskgd", p_old.astype(pv_dtype), vc.astype(pv_dtype),
                               preferred_element_type=_F32)
        return o

    def layer_step(x, xs):
        layer, l = xs
        h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
        qkv = _linear(h, layer.attn.qkv_weight, layer.attn.qkv_bias)
        q = qkv[..., :nq].reshape(B, S, c.num_heads, D)
        k = qkv[..., nq:nq + nkv * D].reshape(B, S, nkv, D)
        v = qkv[..., nq + nkv * D:].reshape(B, S, nkv, D)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = k.astype(cdt), v.astype(cdt)
        o = attention(q, k, v, l).astype(x.dtype)
        o = _linear(o.reshape(B, S, nq), layer.attn.o_weight, layer.attn.o_bias)
        x = x + o
        h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
        gu = _linear(h, layer.mlp.gate_up_weight)
        a = jax.nn.silu(gu[..., :F].astype(_F32)).astype(x.dtype) * gu[..., F:]
        x = x + _linear(a, layer.mlp.down_weight)
        return x, (k, v)

    x = model.embed[tokens].astype(model.dtype)  # [B, S, H]
    if isinstance(model.layers, DecoderLayer):  # stacked weights: one traced layer under scan
        layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
        x, (ks, vs) = jax.lax.scan(layer_step, x, (model.layers, layer_ids))  # ks, vs: [L, B, S, K, D]
    else:  # per-layer weights (see unstack_layers): a Python loop, each layer traced and compiled
        ks, vs = [], []
        for l, layer in enumerate(model.layers):
            x, (k, v) = layer_step(x, (layer, l))
            ks.append(k)
            vs.append(v)
        ks, vs = jnp.stack(ks), jnp.stack(vs)
    # Every layer's new keys and values in one per-row scatter (in place under jit).
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, S))
    k = cache.k.at[rows, :, :, pos].set(jnp.moveaxis(ks, 0, 2), mode="drop")  # [B, S, L, K, D] at (b, pos)
    v = cache.v.at[rows, :, :, pos].set(jnp.moveaxis(vs, 0, 2), mode="drop")
    return x, KVCache(k=k, v=v)


@jax.jit
def forward_logits(
    model: LlamaModel, tokens: Int[Array, "B S"]
) -> Float[Array, "B S V"]:
    """Logits at every position of right-padded sequences (teacher forcing, no cache kept)."""
    B, S = tokens.shape
    cache = init_cache(model.config, B, S, model.dtype)
    hidden, _ = forward(model, tokens, jnp.zeros((B,), jnp.int32), cache, attend=0)  # empty cache: not read
    return model.logits(hidden)
