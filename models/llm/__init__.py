"""LLM runtime in JAX: Llama-family transformer, GGUF / Hugging Face loaders, batched decoding.

See docs/llm_runtime.md.
"""

from .config import ModelConfig
from .decoding import (
    DecodeState,
    StepOutput,
    decode_step,
    empty_state,
    extend,
    generate_until,
    generated_tokens,
    next_token_logprobs,
    pad_prompts,
    prefill,
    reorder,
    resample_state,
    start,
    vocab_mask,
)
from .generate import generate_text
from .gguf_loader import load_gguf
from .hf_loader import load_hf
from .sampling import Sampling, sample_tokens
from .smollm2 import load_smollm2, smollm2_path
from .tokenizer import Tokenizer
from .transformer import (KVCache, LlamaModel, forward, forward_logits, init_cache, init_random, to_dtype,
                          with_matmul_dtype)

__all__ = [
    "DecodeState", "KVCache", "LlamaModel", "ModelConfig", "Sampling", "StepOutput", "Tokenizer",
    "decode_step", "empty_state", "extend", "forward", "forward_logits", "generate_text", "generate_until",
    "generated_tokens", "init_cache", "init_random", "load_gguf", "load_hf", "load_smollm2", "next_token_logprobs",
    "pad_prompts", "prefill", "reorder", "resample_state", "sample_tokens", "smollm2_path", "start", "to_dtype", "vocab_mask",
    "with_matmul_dtype",
]
