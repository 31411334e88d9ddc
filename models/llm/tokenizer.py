"""Tokenizers (from GGUF metadata or a ``tokenizer.json``) and chat-template rendering."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# Pre-tokenizer split patterns, by llama.cpp's ``tokenizer.ggml.pre`` name.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split: str | None, digits: bool = False):
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# name -> (pre-tokenizer factory, BPE ignore_merges)
GGUF_PRE_TOKENIZERS = {
    "default": (lambda: _byte_level(None), False),
    "gpt-2": (lambda: _byte_level(None), False),
    "gpt2": (lambda: _byte_level(None), False),
    "smollm": (lambda: _byte_level(None, digits=True), False),
    "llama-bpe": (lambda: _byte_level(_LLAMA3_SPLIT), True),
    "llama3": (lambda: _byte_level(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _byte_level(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (lambda: _byte_level(_QWEN2_SPLIT), False),
}

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


class _TemplateError(Exception):
    pass


def _raise(message: str):
    raise _TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_env() -> jinja2.Environment:
    # The environment transformers renders chat templates with.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the model's special tokens and chat template.

    ``encode`` follows transformers: ``add_special_tokens=True`` adds a BOS where the model wants one.
    ``encode_chat`` renders the chat template and tokenizes it without adding anything more (the
    template writes its own special tokens).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_eos_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)
        pad = self._id(pad_token)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        eos = [self.eos_id] if self.eos_id is not None else []
        for i in extra_eos_ids:
            if i not in eos:
                eos.append(int(i))
        self.eos_ids: tuple[int, ...] = tuple(eos)
        self._env = _jinja_env()
        self._template = None
        self._decoded_vocab: list[str] | None = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) >= 0]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]] | str,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> str:
        """Render a conversation (list of ``{"role", "content"}``, or one user message as a str)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (none in the GGUF metadata / tokenizer_config.json)")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each chat message must be a dict with 'role' and 'content', got {m!r}")
        if self._template is None:
            self._template = self._env.from_string(self.chat_template)
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "",
                **kwargs,
            )
        except _TemplateError as e:
            raise ValueError(f"chat template rejected the conversation: {e}") from None

    def encode_chat(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)

    # ------------------------------------------------------------------ token sets
    def decoded_vocab(self) -> list[str]:
        """The text of every token id on its own (cached)."""
        if self._decoded_vocab is None:
            self._decoded_vocab = [self.backend.decode([i], skip_special_tokens=False)
                                   for i in range(self.vocab_size)]
        return self._decoded_vocab

    def token_ids_containing(self, text: str) -> tuple[int, ...]:
        """Ids of every token whose text contains ``text`` (e.g. ``"\\n\\n"`` for a blank-line step delimiter)."""
        if not text:
            raise ValueError("the delimiter text must be non-empty")
        return tuple(i for i, s in enumerate(self.decoded_vocab()) if text in s)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Build from the ``tokenizer.ggml.*`` metadata of a GGUF file (byte-level BPE)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is supported"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError("GGUF tokenizer has no merges (tokenizer.ggml.merges)")
        make_pre, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                         ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False)
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = make_pre()
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_USER_DEFINED]
        if special:
            backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)

        def tok(key):
            i = meta.get(key)
            return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

        return cls(
            backend,
            bos_token=tok("tokenizer.ggml.bos_token_id"),
            eos_token=tok("tokenizer.ggml.eos_token_id"),
            pad_token=tok("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_ids=[int(meta["tokenizer.ggml.eot_token_id"])] if "tokenizer.ggml.eot_token_id" in meta else (),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, extra_eos_ids: Sequence[int] = ()) -> "Tokenizer":
        """Build from a Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json``)."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}")
        try:
            backend = tokenizers.Tokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"corrupt tokenizer file {tj!r}: {e}") from None
        cfg: dict[str, Any] = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            with open(tc) as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"corrupt JSON in {tc!r}: {e}") from None
        template = cfg.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])

        def tok(name):
            v = cfg.get(name)
            return v.get("content") if isinstance(v, dict) else v

        return cls(backend, bos_token=tok("bos_token"), eos_token=tok("eos_token"), pad_token=tok("pad_token"),
                   add_bos=bool(cfg.get("add_bos_token", False)) and _post_processor_lacks_bos(backend),
                   chat_template=template, extra_eos_ids=extra_eos_ids)


def _post_processor_lacks_bos(backend: tokenizers.Tokenizer) -> bool:
    """True when encoding with special tokens does not already insert a BOS."""
    return backend.post_processor is None
