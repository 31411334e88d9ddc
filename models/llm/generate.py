"""Text in, text out: chat prompts through the tokenizer, the batched decoder, and back."""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import jax
import numpy as np
from jaxtyping import Array

from .decoding import DecodeState, StepOutput, decode_step, generate_until, start
from .sampling import Sampling
from .tokenizer import Tokenizer
from .transformer import LlamaModel


class Generation(NamedTuple):
    texts: list[str]
    output: StepOutput  # token ids and per-token log-probabilities, [B, max_new_tokens]
    state: DecodeState


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], chat: bool = True,
                   system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt, rendered through the chat template when ``chat``."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    out = []
    for p in prompts:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            out.append(tokenizer.encode_chat(msgs))
        else:
            out.append(tokenizer.encode(p))
    return out


def generate_text(
    model: LlamaModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    key: Array,
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    chat: bool = True,
    stop_ids: Sequence[int] = (),
) -> Generation:
    """Generate a completion for every prompt in one batch (one ``while_loop`` on device)."""
    ids = encode_prompts(tokenizer, prompts, chat)
    state = start(model, ids, max_new_tokens)
    state, out = generate_until(model, state, key, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                eos_ids=tokenizer.eos_ids or None, sampling=sampling)
    toks = np.asarray(out.tokens)
    texts = [tokenizer.decode(row[row >= 0]) for row in toks]
    return Generation(texts, out, state)


def stream_text(
    model: LlamaModel,
    tokenizer: Tokenizer,
    prompt: str,
    key: Array,
    *,
    max_new_tokens: int = 256,
    sampling: Sampling = Sampling(),
    chat: bool = True,
    system: str | None = None,
    stats: dict | None = None,
) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece, one jitted decode step per token.

    ``stats`` (a dict, optional) receives ``tokens`` (generated), ``first_token_s`` (prefill and
    the first decode step, compilation included on a first call) and ``decode_s`` (the other
    tokens), so that tokens/s = (tokens − 1) / decode_s."""
    import time

    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    ids = encode_prompts(tokenizer, [prompt], chat, system)
    state = start(model, ids, max_new_tokens)
    eos = tokenizer.eos_ids or model.config.eos_token_ids
    generated: list[int] = []
    shown = ""
    t_first = None
    stats.update(tokens=0, first_token_s=0.0, decode_s=0.0)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        state, tok, _ = decode_step(model, state, sub, sampling, eos)
        t = int(tok[0])
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            stats["first_token_s"] = now - t0
        stats["tokens"] += 1
        stats["decode_s"] = now - t_first
        if t in eos:
            break
        generated.append(t)
        text = tokenizer.decode(generated)
        # An incomplete UTF-8 sequence decodes to U+FFFD: hold it back until the next token.
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
        if bool(state.done[0]):
            break
    text = tokenizer.decode(generated)
    if len(text) > len(shown):
        yield text[len(shown):]
