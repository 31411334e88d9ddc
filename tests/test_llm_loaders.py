"""GGUF and safetensors loaders: a llama.cpp-style GGUF round trip, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from llm_helpers import _TMP, rel_err, smollm2, tiny_checkpoint, write_gguf  # noqa: E402

from models.llm import forward_logits, load_gguf, load_hf, pad_prompts, prefill, smollm2_path, start  # noqa: E402
from models.llm.config import ModelConfig, rope_inv_freq  # noqa: E402
from models.llm.gguf_file import GGUFFile  # noqa: E402
from models.llm.hf_loader import read_safetensors  # noqa: E402


def _path(name):
    return os.path.join(_TMP, name)


# ----------------------------------------------------------------------------- GGUF round trip
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_round_trip_matches_transformers(qtype):
    """Weights permuted and quantised as llama.cpp's converter does load back to the same model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = _path(f"tiny-{qtype}.gguf")
    held = write_gguf(path, qtype=qtype)
    model, tok, config = load_gguf(path)
    assert config.tie_embeddings and config.num_kv_heads == 2 and config.vocab_size == 320
    assert tok.eos_id == 257 and tok.decode(tok.encode("the cat")) == "the cat"
    assert tok.encode(" t") == [319] and len(tok.encode("the")) == 3
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=128, tie_word_embeddings=True)
    ref = LlamaForCausalLM(cfg).eval()
    missing, unexpected = ref.load_state_dict({k: torch.tensor(v) for k, v in held.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    seq = np.random.default_rng(0).integers(0, 320, (1, 30))
    ours = np.asarray(forward_logits(model, jnp.asarray(seq, jnp.int32)))[0]
    with torch.no_grad():
        theirs = ref(torch.tensor(seq)).logits[0].numpy()
    assert rel_err(ours, theirs) <= 1e-4


def test_gguf_rope_freqs_tensor_scales_frequencies():
    factors = np.linspace(1.0, 8.0, 8).astype(np.float32)
    path = _path("tiny-ropefreqs.gguf")
    write_gguf(path, rope_freqs=factors)
    model, _, config = load_gguf(path)
    np.testing.assert_allclose(np.asarray(model.inv_freq), rope_inv_freq(config) / factors, rtol=1e-6)


def test_fast_header_parser_agrees_with_gguf_reader():
    import gguf

    path = _path("tiny-Q8_0-parse.gguf")
    write_gguf(path)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.name == b.name and a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_embedded_gguf_quantisation_types():
    f = GGUFFile(smollm2_path())
    kinds = {t.tensor_type.name for t in f.tensors}
    assert kinds == {"Q4_1", "Q8_0", "F32"}
    assert f.metadata["general.architecture"] == "llama" and f.metadata["llama.block_count"] == 30


# ----------------------------------------------------------------------------- bad files
def test_missing_files():
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf(_path("nope.gguf"))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_hf(_path("no-such-dir"))
    empty = _path("empty-dir")
    os.makedirs(empty, exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(empty)


def test_corrupt_gguf():
    bad = _path("random.gguf")
    with open(bad, "wb") as f:
        f.write(os.urandom(1000))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(bad)
    truncated = _path("truncated.gguf")
    with open(smollm2_path(), "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(200_000))  # cut inside the tokenizer metadata
    with pytest.raises(ValueError, match="corrupt GGUF file.*truncated"):
        load_gguf(truncated)
    cut_data = _path("cut-data.gguf")
    write_gguf(cut_data)
    with open(cut_data, "r+b") as f:
        f.truncate(os.path.getsize(cut_data) - 1000)
    with pytest.raises(ValueError, match="runs past the end of the file"):
        load_gguf(cut_data)


def test_unsupported_gguf_architecture_and_quantisation():
    path = _path("gpt2.gguf")
    write_gguf(path, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_gguf(path)
    path = _path("iq2.gguf")
    write_gguf(path, bad_tensor_type="IQ2_XXS")
    with pytest.raises(ValueError, match="unsupported GGUF tensor type IQ2_XXS for tensor 'blk.0.extra.weight'"):
        load_gguf(path)


def test_bad_hf_checkpoints():
    src = tiny_checkpoint("llama")
    # unsupported architecture
    d = _path("hf-gpt2")
    shutil.copytree(src, d, dirs_exist_ok=True)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported architecture: config.json has model_type='gpt2'"):
        load_hf(d)
    # corrupt safetensors
    d = _path("hf-corrupt")
    shutil.copytree(src, d, dirs_exist_ok=True)
    st = os.path.join(d, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    with pytest.raises(ValueError, match="corrupt safetensors file.*inconsistent offsets"):
        load_hf(d)
    with open(st, "wb") as f:
        f.write(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="bad JSON header"):
        read_safetensors(st)
    # corrupt config.json
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match="corrupt JSON"):
        load_hf(d)
    # no weights
    d = _path("hf-noweights")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), d)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(d)


def test_unsupported_configs():
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                intermediate_size=64, vocab_size=10)
    with pytest.raises(ValueError, match="unsupported RoPE scaling type 'yarn'"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="lacks required field 'vocab_size'"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf_dict({**base, "num_key_value_heads": 3})


# ----------------------------------------------------------------------------- bad prompts / batches
def test_prompt_and_batch_limits():
    model, _, config = smollm2()[:3]
    ctx = config.max_position_embeddings
    with pytest.raises(ValueError, match=f"longer than the model context of {ctx} tokens"):
        pad_prompts(model, [[1] * (ctx + 1)], 8)
    with pytest.raises(ValueError, match="exceeds the model context"):
        pad_prompts(model, [[1] * (ctx - 4)], 8)
    with pytest.raises(ValueError, match="does not fit the cache of max_len=16"):
        pad_prompts(model, [[1] * 20], 8, max_len=16)
    with pytest.raises(ValueError, match="KV cache of .* GiB, more than the .* GiB of memory available"):
        pad_prompts(model, [[1, 2, 3]] * 100_000, 2000)
    with pytest.raises(ValueError, match="empty batch"):
        pad_prompts(model, [], 8)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts(model, [[1], []], 8)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        prefill(model, jnp.ones((1, 40), jnp.int32), jnp.array([40]), max_len=32)
    with pytest.raises(ValueError, match="max_new_tokens"):
        start(model, [[1]], 0)
