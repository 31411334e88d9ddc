"""Load a Hugging Face checkpoint directory: ``config.json`` plus safetensors (one file or shards)."""

from __future__ import annotations

import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ModelConfig
from .tokenizer import Tokenizer
from .transformer import LlamaModel, model_from_hf_state

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a ``.safetensors`` file as numpy (bfloat16 via ml_dtypes).

    The format is an 8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}`` and the raw bytes; numpy's own safetensors backend
    cannot express bfloat16, hence this small reader.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path!r}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"corrupt safetensors file {path!r}: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"corrupt safetensors file {path!r}: header length {n} exceeds file size {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt safetensors file {path!r}: bad JSON header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {path!r}: header is not a JSON object")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except KeyError as e:
            raise ValueError(f"corrupt or unsupported safetensors entry {name!r} in {path!r}: {e}") from None
        count = int(np.prod(shape)) if shape else 1
        if end > data.size or end - begin != count * np.dtype(dt).itemsize:
            raise ValueError(f"corrupt safetensors file {path!r}: tensor {name!r} has inconsistent offsets "
                             f"[{begin}, {end}) for {count} x {np.dtype(dt).name} (file data is {data.size} bytes)")
        out[name] = np.frombuffer(data, dtype=dt, count=count, offset=begin).reshape(shape)
    return out


def read_hf_config(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path!r}")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(cfg_file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt JSON in {cfg_file!r}: {e}") from None


def read_hf_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (``model.safetensors`` or an index of shards)."""
    path = os.fspath(path)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"corrupt shard index {index!r}: {e}") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(os.path.join(path, shard)))
        missing = [k for k in weight_map if k not in tensors]
        if missing:
            raise ValueError(f"shards in {path!r} lack tensors listed in the index: {missing[:5]}")
        return tensors
    if os.path.isfile(single):
        return read_safetensors(single)
    if any(f.endswith(".bin") for f in os.listdir(path)):
        raise ValueError(f"{path!r} holds PyTorch .bin weights; only safetensors checkpoints are supported")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


def load_hf(
    path: str | os.PathLike, dtype=jnp.float32, tokenizer: bool = True
) -> tuple[LlamaModel, Tokenizer | None, ModelConfig]:
    """Load a Llama / Qwen2 checkpoint directory as saved by transformers' ``save_pretrained``.

    Returns ``(model, tokenizer, config)``; ``tokenizer`` is ``None`` when the directory has no
    ``tokenizer.json`` (or ``tokenizer=False``).
    """
    path = os.fspath(path)
    raw = read_hf_config(path)
    config = ModelConfig.from_hf_dict(raw, name=os.path.basename(os.path.normpath(path)))
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            gen = json.load(f)
        eos = gen.get("eos_token_id")
        extra = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        import dataclasses

        config = dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra)))
    tensors = read_hf_weights(path)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    model = model_from_hf_state(config, tensors, dtype=dtype)
    tok = None
    if tokenizer and os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer.from_hf_dir(path, extra_eos_ids=config.eos_token_ids)
    return model, tok, config
