"""Architecture description shared by the loaders and the transformer."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static hyper-parameters of a Llama-family decoder (hashable, safe as a jit static argument).

    ``rope_scaling`` is ``None`` or a tuple of ``(name, value)`` pairs (kept hashable), e.g.
    ``(("rope_type", "llama3"), ("factor", 32.0), ...)``.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_type(self) -> str:
        return self.rope_scaling_dict.get("rope_type", self.rope_scaling_dict.get("type", "default"))

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling) if self.rope_scaling else {}

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + h

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of KV cache one token occupies (all layers, keys and values)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str = "") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dictionary (Llama or Qwen2)."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture: config.json has model_type={model_type!r} "
                f"(architectures={archs}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None
        if cfg.get("mlp_bias"):
            raise ValueError("unsupported configuration: mlp_bias=True")
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise ValueError("unsupported configuration: Qwen2 sliding-window attention (use_sliding_window=True)")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(rope, dict):
            theta = rope.get("rope_theta")
        theta = 10000.0 if theta is None else float(theta)
        rope_scaling = None
        if isinstance(rope, dict):
            kept = {k: v for k, v in rope.items() if k != "rope_theta" and v is not None}
            if kept and kept.get("rope_type", kept.get("type", "default")) != "default":
                rope_scaling = tuple(sorted((k, _hashable(v)) for k, v in kept.items()))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            arch=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=(model_type == "qwen2") or attention_bias,
            o_bias=attention_bias and model_type == "llama",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            name=name,
        )


def _hashable(v):
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies of the rotary embedding, with Llama-3 / linear scaling applied (numpy)."""
    import numpy as np

    d = config.head_dim
    # float32 throughout, as transformers computes it, so positions * inv_freq agree to the last bit
    inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d)))).astype(np.float32)
    rs = config.rope_scaling_dict
    kind = config.rope_type
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old = float(rs.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
