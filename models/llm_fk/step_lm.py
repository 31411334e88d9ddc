"""A small "step" protocol over language models, shared by the JAX transformer and the Markov LM.

The LLM state-space model (:mod:`models.llm_fk.ssm`) and its reward models only ever call the
methods of :class:`AbstractStepLM`, batched over a leading particle axis N:

- ``prefill(prompt_ids, max_new_tokens)`` (host): the decoding state of the prompt, batch 1;
- ``broadcast(state, n)``: n copies of a batch-1 state (under ``jit``);
- ``generate_step(key, state, max_step_tokens)``: append one reasoning step to every row that is
  not done — tokens until a delimiter, EOS, ``max_step_tokens`` tokens or a full buffer — and
  return the step's log-probability under the model (temperature 1) and under the sampling law;
- ``force(state, tokens, n)``: append forced tokens (a judge's question), and
  ``next_token_logprobs(state)``;
- ``decode(ids)`` (host): text of a list of token ids.

A decoding state is a NamedTuple whose leaves all have the particle axis first and which has at
least the fields ``tokens`` [N, L], ``lengths`` [N], ``prompt_lengths`` [N] and ``done`` [N], so
that resampling is a gather of every leaf and the step model can read tokens generically.

:class:`StepLM` wraps the JAX transformer of :mod:`models.llm` (its public API only: ``prefill``,
``generate_until``, ``extend``, ``next_token_logprobs``); :class:`MarkovStepLM` wraps the
Markov-chain language model of :mod:`models.markov_lm` (the exact test bed).

Reference: Puri et al. (2025), "A probabilistic inference approach to inference-time scaling of
LLMs using particle-based Monte Carlo methods" (steps = text up to a delimiter).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from models import llm as _llm
from ppl import tree
from models.markov_lm import PAD as MARKOV_PAD
from models.markov_lm import MarkovLM, generate_step

__all__ = [
    "AbstractStepLM",
    "StepLM",
    "MarkovStepLM",
    "MarkovDecodeState",
    "StepInfo",
    "generated_span",
]


class StepInfo(NamedTuple):
    """What one :meth:`AbstractStepLM.generate_step` produced, per row (0 for rows not moved).

    Attributes:
        num_tokens: tokens appended.
        logprob: log-probability of the step under the model (temperature 1, no truncation).
        proposal_logprob: log-probability under the law actually sampled from.
    """

    num_tokens: Int[Array, " N"]
    logprob: Float[Array, " N"]
    proposal_logprob: Float[Array, " N"]


def _tile(state, n: int):
    return tree.broadcast_rows(tree.row(state, 0), n)


def _copy(state):
    """Fresh buffers for eager calls (the runtime's jitted entry points donate their state
    argument); under an outer ``jit`` nothing is donated and the state is passed as is."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.core.Tracer) else jnp.copy(x), state)


def generated_span(state) -> tuple[Int[Array, "N L"], Bool[Array, "N L"]]:
    """(tokens, mask of the generated positions prompt_length ≤ j < length)."""
    pos = jnp.arange(state.tokens.shape[1])
    mask = (pos[None, :] >= state.prompt_lengths[:, None]) & (pos[None, :] < state.lengths[:, None])
    return state.tokens, mask


class AbstractStepLM(eqx.Module):
    """The step interface (see the module docstring). Concrete: :class:`StepLM`,
    :class:`MarkovStepLM`."""

    delimiter_ids: tuple[int, ...] = eqx.field(static=True)
    eos_ids: tuple[int, ...] = eqx.field(static=True)

    #: ``generate_step`` leaves rows that are done unchanged in everything it can read of them
    #: (scratch storage past a row's length excepted)
    keeps_done_rows: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int:
        """Token id of unused buffer slots."""
        return 0

    @abc.abstractmethod
    def prefill(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Any:
        """Host: decoding state (batch 1) of the prompt with room for ``max_new_tokens`` more."""

    def broadcast(self, state, n: int):
        """n copies of row 0 of ``state``."""
        return _tile(state, n)

    @abc.abstractmethod
    def generate_step(self, key: PRNGKeyArray, state, max_step_tokens: int) -> tuple[Any, StepInfo]:
        """Append one step to every row not done (see the module docstring)."""

    @abc.abstractmethod
    def force(self, state, tokens: Int[Array, "N S"], n: Int[Array, " N"]):
        """Append ``n[i]`` forced tokens to row i (no sampling); rows that overflow are truncated."""

    @abc.abstractmethod
    def next_token_logprobs(self, state) -> Float[Array, "N V"]:
        """log p(next token | tokens so far) of every row."""

    @abc.abstractmethod
    def rewind(self, state_row, lengths: Int[Array, " T"]):
        """The states of one row (leaves without the particle axis) cut back to each of the
        ``lengths`` (≤ its length): leaves [T, ...], with the right next-token distribution."""

    def truncate(self, state, lengths: Int[Array, " N"]):
        """Every row cut back to ``lengths[i]`` (≤ its length, ≥ its prompt length), not done, with
        the right next-token distribution: the parent of a particle's last step (resample-move
        re-generates that step). Slots past the new lengths are scratch."""
        raise NotImplementedError(f"{type(self).__name__} does not define truncate (needed by resample-move)")

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Host: the text of a list of token ids."""

    def encode(self, text: str) -> list[int]:
        """Host: token ids of ``text`` (no special tokens)."""
        raise NotImplementedError(f"{type(self).__name__} has no tokenizer to encode text")

    def _check_ids(self):
        v = self.vocab_size
        for name in ("delimiter_ids", "eos_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, tuple) or not all(isinstance(i, int) for i in ids):
                raise TypeError(f"{name} must be a tuple of ints, got {ids!r}")
            if any(not 0 <= i < v for i in ids):
                raise ValueError(f"{name} must lie in [0, {v}), got {ids}")
        if not self.eos_ids:
            raise ValueError("eos_ids must not be empty")


# ------------------------------------------------------------------------------------------------
# the JAX transformer
# ------------------------------------------------------------------------------------------------


class StepLM(AbstractStepLM):
    """The JAX transformer of :mod:`models.llm` with its tokenizer, step delimiters and EOS ids.

    ``StepLM(model, tokenizer, delimiter_ids, eos_ids, sampling=Sampling())`` or
    :meth:`from_smollm2`. ``tokenizer`` may be ``None`` (token-level use; ``decode`` then prints
    ids). ``sampling`` is the runtime's :class:`~models.llm.Sampling` used for every step.
    """

    model: Any
    tokenizer: Any = eqx.field(static=True)
    sampling: Any = eqx.field(static=True)

    # The runtime's batched forward also runs done rows: their tokens, length, logits, log-prob and
    # every cache slot below their length are unchanged; only the K/V entry at their next free slot
    # (scratch, never attended by a finished row, overwritten before any read) is written. Nothing
    # the model reads changes, so the engine may skip its row select (which would copy every KV
    # cache row at every step).
    keeps_done_rows: ClassVar[bool] = True

    def __init__(self, model, tokenizer, delimiter_ids: Sequence[int], eos_ids: Sequence[int] | None = None,
                 sampling=None):
        self.model = model
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = tuple(model.config.eos_token_ids)
            if tokenizer is not None:
                eos_ids = tuple(dict.fromkeys(eos_ids + tuple(tokenizer.eos_ids)))
        self.delimiter_ids = tuple(int(i) for i in delimiter_ids)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.sampling = _llm.Sampling() if sampling is None else sampling
        if not isinstance(self.sampling, _llm.Sampling):
            raise TypeError(f"sampling must be a models.llm.Sampling, got {type(sampling).__name__}")
        self._check_ids()

    @classmethod
    def from_smollm2(cls, delimiter: str = "\n\n", *, sampling=None, dtype=jnp.float32) -> "StepLM":
        """SmolLM2-135M-Instruct; the step delimiters are every token whose text contains
        ``delimiter`` (default: a blank line, as in Puri et al.)."""
        model, tokenizer, _ = _llm.load_smollm2(dtype=dtype)
        return cls(model, tokenizer, tokenizer.token_ids_containing(delimiter), None, sampling)

    def with_sampling(self, sampling) -> "StepLM":
        return StepLM(self.model, self.tokenizer, self.delimiter_ids, self.eos_ids, sampling)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_context(self) -> int:
        return self.model.config.max_position_embeddings

    def prefill(self, prompt_ids, max_new_tokens):
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("the prompt has no tokens")
        # cache lengths rounded up to a multiple of 64: prompts of similar lengths share one
        # compiled program (the extra slots are never reached: steps end by max_steps or EOS)
        need = len(ids) + int(max_new_tokens)
        max_len = min(-(-need // 64) * 64, max(self.max_context, need))
        return _llm.start(self.model, [ids], max_new_tokens, max_len=max_len)

    def generate_step(self, key, state, max_step_tokens):
        state, out = _llm.generate_until(
            self.model, _copy(state), key, max_new_tokens=int(max_step_tokens),
            stop_ids=self.delimiter_ids, eos_ids=self.eos_ids, sampling=self.sampling,
        )
        return state, StepInfo(out.num_tokens, out.logprob, out.proposal_logprob)

    def force(self, state, tokens, n):
        return _llm.extend(self.model, _copy(state), tokens, n)

    def next_token_logprobs(self, state):
        return _llm.next_token_logprobs(state)

    def rewind(self, state_row, lengths):
        # The cache of the longer state holds the shorter prefixes (slots past a length are never
        # attended to); only the next-token logits are recomputed, by forcing the last token again.
        row1 = tree.add_axis(state_row)

        def logits_at(length):
            short = row1._replace(lengths=(length - 1)[None], done=jnp.zeros((1,), bool))
            tok = state_row.tokens[length - 1]
            asked = self.force(short, tok[None, None], jnp.ones((1,), jnp.int32))
            return jnp.where(length == state_row.lengths, state_row.logits, asked.logits[0])

        logits = jax.lax.map(logits_at, lengths)
        t = lengths.shape[0]
        width = state_row.tokens.shape[0]
        keep = jnp.arange(width)[None, :] < lengths[:, None]
        tokens = jnp.where(keep, state_row.tokens[None, :], self.pad_id)
        rows = tree.broadcast_rows(state_row, t)
        return rows._replace(tokens=tokens, lengths=lengths.astype(jnp.int32), logits=logits,
                             done=lengths >= width)

    def truncate(self, state, lengths):
        # The cache keeps the shorter prefix (slots past a length are never attended to); only the
        # next-token logits are recomputed, by forcing the token at lengths - 1 again (one batched
        # one-token forward). Rows already at ``lengths`` keep their logits.
        lengths = lengths.astype(jnp.int32)
        width = state.tokens.shape[1]
        last = jnp.take_along_axis(state.tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)
        short = state._replace(lengths=jnp.maximum(lengths - 1, 0), done=jnp.zeros_like(state.done))
        asked = self.force(short, last, jnp.ones_like(lengths))
        same = lengths == state.lengths
        keep = jnp.arange(width)[None, :] < lengths[:, None]
        return asked._replace(
            tokens=jnp.where(keep, state.tokens, self.pad_id),
            lengths=lengths,
            logits=jnp.where(same[:, None], state.logits, asked.logits),
            done=jnp.zeros_like(state.done),
            logprob=state.logprob,
        )

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, text):
        if self.tokenizer is None:
            raise ValueError("this StepLM has no tokenizer: pass token ids instead of text")
        return self.tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------------
# the Markov-chain LM (exact test bed)
# ------------------------------------------------------------------------------------------------


class MarkovDecodeState(NamedTuple):
    """Decoding state of :class:`MarkovStepLM` (``PAD`` = −1 in unused slots)."""

    tokens: Int[Array, "N L"]
    lengths: Int[Array, " N"]
    prompt_lengths: Int[Array, " N"]
    done: Bool[Array, " N"]


def _pair_logprob(log_probs, tokens, lo, hi):
    """Σ_{lo ≤ j < hi} log_probs[w_{j-1}, w_j]."""
    pos = jnp.arange(1, tokens.shape[1])
    mask = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
    prev, cur = jnp.clip(tokens[:, :-1], 0), jnp.clip(tokens[:, 1:], 0)
    return jnp.sum(jnp.where(mask, log_probs[prev, cur], 0.0), axis=1)


class MarkovStepLM(AbstractStepLM):
    """Adapter giving a :class:`~models.markov_lm.MarkovLM` the step interface.

    Steps are drawn from ``proposal`` when given (else from ``lm``); ``logprob`` is under ``lm``.
    A sequence is done at EOS or when its buffer (prompt + ``max_new_tokens``) is full, exactly as
    in :mod:`models.markov_lm`, so its exact answers (:mod:`models.markov_lm_exact`) apply.
    """

    lm: MarkovLM
    proposal: MarkovLM | None = None

    keeps_done_rows: ClassVar[bool] = True  # models.markov_lm.generate_step returns them unchanged

    def __init__(self, lm: MarkovLM, proposal: MarkovLM | None = None):
        if not isinstance(lm, MarkovLM):
            raise TypeError(f"lm must be a MarkovLM, got {type(lm).__name__}")
        if proposal is not None and (proposal.vocab_size != lm.vocab_size or proposal.eos_id != lm.eos_id
                                     or proposal.delimiter_id != lm.delimiter_id):
            raise ValueError("proposal must share the lm's vocabulary, eos_id and delimiter_id")
        self.lm = lm
        self.proposal = proposal
        self.delimiter_ids = (lm.delimiter_id,)
        self.eos_ids = (lm.eos_id,)

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    @property
    def pad_id(self) -> int:
        return MARKOV_PAD

    @property
    def max_context(self) -> int:
        return 1 << 30

    def prefill(self, prompt_ids, max_new_tokens):
        ids = np.asarray([int(i) for i in prompt_ids], np.int32)
        if ids.size == 0:
            raise ValueError("the prompt has no tokens")
        if np.any(ids < 0) or np.any(ids >= self.vocab_size) or np.any(ids == self.lm.eos_id):
            raise ValueError(f"prompt tokens must lie in [0, {self.vocab_size}) and not be EOS")
        length = ids.size + int(max_new_tokens)
        tokens = np.full((1, length), MARKOV_PAD, np.int32)
        tokens[0, : ids.size] = ids
        p = jnp.asarray([ids.size], jnp.int32)
        return MarkovDecodeState(jnp.asarray(tokens), p, p, jnp.zeros((1,), bool))

    def generate_step(self, key, state, max_step_tokens):
        q = self.move_lm
        new = generate_step(key, q, state, max_step_tokens=int(max_step_tokens))
        lo, hi = state.lengths, new.lengths
        logp = _pair_logprob(self.lm.log_probs, new.tokens, lo, hi)
        logq = logp if self.proposal is None else _pair_logprob(q.log_probs, new.tokens, lo, hi)
        return new, StepInfo((hi - lo).astype(jnp.int32), logp, logq)

    def force(self, state, tokens, n):
        n_rows, width = state.tokens.shape
        n = jnp.minimum(n, width - state.lengths)
        s = tokens.shape[1]
        cols = state.lengths[:, None] + jnp.arange(s)[None, :]
        valid = jnp.arange(s)[None, :] < n[:, None]
        rows = jnp.broadcast_to(jnp.arange(n_rows)[:, None], cols.shape)
        buf = state.tokens.at[rows, jnp.where(valid, cols, width)].set(tokens.astype(jnp.int32), mode="drop")
        lengths = state.lengths + n
        return state._replace(tokens=buf, lengths=lengths, done=state.done | (lengths >= width))

    def rewind(self, state_row, lengths):
        t = lengths.shape[0]
        width = state_row.tokens.shape[0]
        keep = jnp.arange(width)[None, :] < lengths[:, None]
        return MarkovDecodeState(
            jnp.where(keep, state_row.tokens[None, :], MARKOV_PAD).astype(jnp.int32),
            lengths.astype(jnp.int32),
            jnp.broadcast_to(state_row.prompt_lengths, (t,)),
            lengths >= width,
        )

    def truncate(self, state, lengths):
        width = state.tokens.shape[1]
        keep = jnp.arange(width)[None, :] < lengths[:, None]
        return state._replace(tokens=jnp.where(keep, state.tokens, MARKOV_PAD).astype(state.tokens.dtype),
                              lengths=lengths.astype(jnp.int32), done=jnp.zeros_like(state.done))

    @property
    def move_lm(self) -> MarkovLM:
        """The chain the steps are drawn from (the proposal, or the lm itself)."""
        return self.lm if self.proposal is None else self.proposal

    def next_token_logprobs(self, state):
        return self.lm.log_probs[self._last_token(state)]

    def next_token_proposal_logprobs(self, state) -> Float[Array, "N V"]:
        """log q(next token | tokens so far) under the chain the steps are drawn from."""
        return self.move_lm.log_probs[self._last_token(state)]

    @staticmethod
    def _last_token(state):
        last = jnp.take_along_axis(state.tokens, jnp.maximum(state.lengths - 1, 0)[:, None], axis=1)[:, 0]
        return jnp.clip(last, 0)

    def decode(self, ids):
        names = self.lm.token_names or tuple(str(i) for i in range(self.vocab_size))
        return " ".join(names[int(i)] for i in ids if int(i) >= 0)

    def encode(self, text):
        names = self.lm.token_names or tuple(str(i) for i in range(self.vocab_size))
        index = {n: i for i, n in enumerate(names)}
        try:
            return [index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"unknown token {e.args[0]!r} for this Markov LM") from None
