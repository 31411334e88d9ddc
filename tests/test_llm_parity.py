"""Logit and greedy-generation parity with Hugging Face transformers (torch, CPU), float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (installed by `make test`: a missing reference must fail, not skip)

from llm_helpers import rel_err, smollm2, smollm2_greedy, tiny_checkpoint, tiny_torch, torch_smollm2  # noqa: E402

from models.llm import Sampling, forward_logits, generate_until, load_hf, start, with_matmul_dtype  # noqa: E402
from models.llm.gguf_loader import unpermute_qk  # noqa: E402

TOL = 1e-4  # relative error of float32 logits


def _padded(seqs):
    L = max(map(len, seqs))
    arr = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
        arr[i, : len(s)] = s
    return arr


def _torch_logits(ref, seq):
    with torch.no_grad():
        return ref(torch.tensor([seq])).logits[0].numpy()


def _torch_greedy(ref, seq, n):
    """transformers' generate, greedy, ignoring EOS (as our call below does)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    saved = ref.generation_config.eos_token_id, ref.config.eos_token_id
    ref.generation_config.eos_token_id = ref.config.eos_token_id = None  # else generate merges it back
    try:
        with torch.no_grad():
            out = ref.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                               generation_config=cfg)
    finally:
        ref.generation_config.eos_token_id, ref.config.eos_token_id = saved
    assert out.shape[1] == len(seq) + n
    return out[0, len(seq):].tolist()


def _greedy(model, prompts, n):
    state = start(model, prompts, n)
    state, out = generate_until(model, state, jax.random.key(0), max_new_tokens=n, eos_ids=(),
                                sampling=Sampling(temperature=0.0))
    return np.asarray(out.tokens)


# ----------------------------------------------------------------------------- SmolLM2 from the GGUF
@pytest.fixture(scope="module")
def smol():
    model, tok, config, state = smollm2()
    return model, tok, config


def test_smollm2_logits_match_transformers(smol):
    model, tok, _ = smol
    ref = torch_smollm2()
    seqs = [tok.encode_chat("What is 7 times 8? Think step by step."), tok.encode("The quick brown fox")]
    ours = np.asarray(forward_logits(model, jnp.asarray(_padded(seqs))))
    for i, s in enumerate(seqs):
        assert rel_err(ours[i, : len(s)], _torch_logits(ref, s)) <= TOL


def test_smollm2_greedy_generation_matches_transformers(smol):
    _, tok, _ = smol
    ref = torch_smollm2()
    prompts, ours = smollm2_greedy(32)
    for i, p in enumerate(prompts):
        assert ours[i].tolist() == _torch_greedy(ref, p, 32)
    # End-to-end check of dequantisation and the Q/K un-permutation: a wrong layout gives garbage.
    assert "Paris" in tok.decode(ours[0])


def test_qk_unpermutation_matches_transformers_gguf_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * 64, 16)).astype(np.float32)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    np.testing.assert_array_equal(unpermute_qk(w, 3), proc.process(w, "blk.0.attn_k.weight").weights)
    q = rng.normal(size=(9 * 64, 16)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(q, 9), proc.process(q, "blk.0.attn_q.weight").weights)


# ----------------------------------------------------------------------------- tiny HF checkpoints
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_checkpoint_logits_and_greedy_match(arch):
    path = tiny_checkpoint(arch)
    ref = tiny_torch(arch)
    model, tok, config = load_hf(path)
    assert config.arch == arch and tok is None
    if arch == "llama":
        assert config.rope_type == "llama3" and not config.tie_embeddings
    else:
        assert config.qkv_bias and config.tie_embeddings
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (37, 20)]
    ours = np.asarray(forward_logits(model, jnp.asarray(_padded(seqs))))
    for i, s in enumerate(seqs):
        assert rel_err(ours[i, : len(s)], _torch_logits(ref, s)) <= TOL
    gen = _greedy(model, seqs, 32)
    for i, s in enumerate(seqs):
        assert gen[i].tolist() == _torch_greedy(ref, s, 32)


def test_bfloat16_close_to_float32():
    model, _, _ = load_hf(tiny_checkpoint("llama"))
    model16, _, _ = load_hf(tiny_checkpoint("llama"), dtype=jnp.bfloat16)
    assert model16.layers[0].attn.qkv_weight.dtype == jnp.bfloat16
    seq = jnp.asarray(np.stack([np.arange(3, 40), np.arange(40, 3, -1)]))  # batch > 1: see forward
    a = np.asarray(forward_logits(model, seq))
    b = np.asarray(forward_logits(model16, seq))
    assert b.dtype == np.float32
    assert rel_err(b, a) < 5e-2


def test_bfloat16_matmuls_with_float32_activations():
    """``with_matmul_dtype``: bf16 matmul operands, float32 everywhere else (cache included)."""
    model, _, _ = load_hf(tiny_checkpoint("llama"))
    mixed = with_matmul_dtype(model, jnp.bfloat16)
    assert mixed.dtype == jnp.float32 and mixed.matmul_dtype == jnp.bfloat16
    assert mixed.layers[0].mlp.down_weight.dtype == jnp.bfloat16 and mixed.norm.dtype == jnp.float32
    seq = jnp.asarray(np.stack([np.arange(3, 40), np.arange(40, 3, -1)]))
    a = np.asarray(forward_logits(model, seq))
    b = np.asarray(forward_logits(mixed, seq))
    assert b.dtype == np.float32
    assert 1e-4 < rel_err(b, a) < 5e-2  # rounded like bf16, not float32 in disguise
    state = start(mixed, [[5, 6, 7], [8, 9]], 4)
    assert state.cache.k[0].dtype == jnp.float32
    assert _greedy(mixed, [[5, 6, 7], [8, 9]], 4).shape == (2, 4)


def test_single_row_bfloat16_matmul_padding_is_exact():
    """A lone bf16 row is padded to two rows on CPU (a slow GEMV path): same products as in a batch."""
    from models.llm.transformer import _matmul_t

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((48, 40)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 1, 40)), jnp.float32)
    one = _matmul_t(x[:1], w)
    assert one.shape == (1, 1, 48) and one.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(_matmul_t(x, w)[0]), rtol=1e-6, atol=1e-6)
    exact = np.asarray(x[0, 0].astype(jnp.bfloat16), np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(np.asarray(one[0, 0]), exact, rtol=1e-5, atol=1e-5)
