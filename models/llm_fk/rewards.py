r"""Reward models for the LLM state-space model: one interface, scored incrementally.

A reward model scores a (partial) completion \(x_{1:t}\): ``log_score`` returns
\(\log \hat r(x_{1:t}) \in [-\infty, 0]\) for every particle (\(\hat r\) a probability: a verifier's
pass/fail, a PRM's step-correctness). Scoring is *incremental*: a model may keep a per-particle state
(``init_state`` after the prompt, ``update`` after every step with the new step's tokens only), e.g. a judge
LM's KV cache, so a new step is scored with the prefix's cache and the prefix is never processed again.

Concrete models:

- :class:`TokenPairReward` — a programmatic verifier written on token ids with lookup tables
  (runs inside ``jit``):
  \(\hat r = \exp\big(\sum_j \varphi(w_{j-1}, w_j) + \mathbf{1}[\text{finished}]\, \psi(\text{answer})\big)\),
  over the whole prefix or (``per_step``) over the new step only; \(\varphi = -\infty\) encodes a
  hard constraint;
- :class:`TokenVerifier` — any jnp function of the token buffer;
- :class:`ProgrammaticStepVerifier` — ``fn(text_so_far, finished) -> [0, 1]`` in Python on the
  decoded text, called on the host from inside the compiled loop (``jax.pure_callback``);
- :class:`FinalAnswerVerifier` — ``fn(text) -> [0, 1]`` on finished completions only (an outcome
  reward; unfinished prefixes score 1 and cost no call);
- both take ``log_scale=True`` for functions returning \(\log \hat r\) (no float32 underflow), and a
  :class:`HostCallbacks` (``callbacks=``): the per-experiment table of host functions (no
  module-level registry);
- :class:`LLMJudge` — a loaded LM asked a step-correctness question after the prefix;
  \(\hat r = p(\text{Yes}) / (p(\text{Yes}) + p(\text{No}))\) of its next token, all particles in one batched
  forward pass of the question tokens on top of the prefix cache (the generator's own cache when the judge is
  the generator, else the judge's cache kept in the reward state and extended by each new step).

A *reward call* is the scoring of one particle after one step (what the state-space model counts).

References: Puri et al. (2025) (PRM as observation model); Lightman et al. (2023), "Let's verify
step by step" (process rewards); Zheng et al. (2023), "Judging LLM-as-a-judge".
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from models.llm_fk.step_lm import AbstractStepLM, StepInfo
from ppl import tree
from ppl import checks

__all__ = [
    "RewardModel",
    "TokenPairReward",
    "TokenVerifier",
    "ProgrammaticStepVerifier",
    "FinalAnswerVerifier",
    "LLMJudge",
    "SelfCertainty",
    "ConstantReward",
    "host_rows",
    "HostCallbacks",
    "HostAnswer",
]


class RewardModel(eqx.Module):
    r"""Interface of every reward model (all methods batched over particles N).

    ``scores_unfinished`` (class variable): whether unfinished prefixes are scored (a process
    reward) or only finished completions (an outcome reward: unfinished ones get \(\log \hat r = 0\) and
    cost no reward call).
    """

    scores_unfinished: ClassVar[bool] = True
    #: ``update`` leaves the state of inactive (done) rows bit-for-bit unchanged
    keeps_done_rows: ClassVar[bool] = True

    def bind(self, lm: AbstractStepLM, prompt_ids: Sequence[int], max_new_tokens: int) -> "RewardModel":
        """Host, once per prompt: return the reward model ready for this prompt (e.g. with a judge's
        prompt prefilled). ``max_new_tokens``: the longest completion."""
        return self

    def extra_context(self, lm: AbstractStepLM) -> int:
        """Cache slots needed past the completion in the generator's cache (a judge question)."""
        return 0

    def init_state(self, lm: AbstractStepLM, lm_state) -> Any:
        """Per-particle state after the prompt (leading axis N), or ``None``."""
        return None

    def update(self, lm: AbstractStepLM, state, lm_state, prev_lengths: Int[Array, " N"],
               active: Bool[Array, " N"], max_step_tokens: int, step: StepInfo | None = None) -> Any:
        """Consume the new step (tokens ``prev_lengths ≤ j < lm_state.lengths`` of active rows;
        ``step``: the step LM's :class:`~models.llm_fk.step_lm.StepInfo` of it, when known)."""
        return state

    def truncate(self, lm: AbstractStepLM, state, lm_state, lengths: Int[Array, " N"]) -> Any:
        """The state of every row after the generator was cut back to ``lengths`` (the parent of
        the last step: resample-move). Default: a stateless reward."""
        if state is None:
            return None
        raise NotImplementedError(f"{type(self).__name__} keeps a state but does not define truncate "
                                  "(needed by resample-move)")

    def log_score(self, lm: AbstractStepLM, state, lm_state, prev_lengths: Int[Array, " N"],
                  finished: Bool[Array, " N"], active: Bool[Array, " N"]) -> Float[Array, " N"]:
        r"""\(\log \hat r\) of every row's prefix (rows not ``active`` may return anything)."""
        raise NotImplementedError

    def rewind(self, lm: AbstractStepLM, state_row, lm_prompt_length: Int[Array, ""],
               lm_lengths: Int[Array, " T"]) -> Any:
        """The state of one particle (leaves without N) at earlier lengths of the generator, one row
        per entry of ``lm_lengths`` (to rebuild a reference path for particle Gibbs)."""
        if state_row is None:
            return None
        raise NotImplementedError(f"{type(self).__name__} keeps a state but does not define rewind")

    def aggregate(self, log_prev: Float[Array, " N"], log_r: Float[Array, " N"],
                  first: Bool[Array, " N"]) -> Float[Array, " N"]:
        """The model's own aggregation of step scores (``aggregation='model'``); default: last."""
        return log_r


# ------------------------------------------------------------------------------------------------
# token-level verifiers (pure jnp)
# ------------------------------------------------------------------------------------------------


def _last_answer(tokens, lengths, eos_ids):
    """Last non-EOS token of each row."""
    idx = jnp.maximum(lengths - 1, 0)
    last = jnp.take_along_axis(tokens, idx[:, None], axis=1)[:, 0]
    before = jnp.take_along_axis(tokens, jnp.maximum(idx - 1, 0)[:, None], axis=1)[:, 0]
    is_eos = jnp.isin(last, jnp.asarray(eos_ids, jnp.int32))
    return jnp.where(is_eos, before, last)


class TokenPairReward(RewardModel):
    r"""A verifier on token ids by table lookup,

    \[
    \hat r(x) = \exp\Big(\sum_{\mathrm{lo} \le j < \mathrm{len}} \varphi(w_{j-1}, w_j) +
    \mathbf{1}[\text{finished}]\, \psi(\mathrm{answer}(x))\Big)
    \]

    (``log_pair`` = \(\varphi\) [V, V], ``log_final`` = \(\psi\) [V], answer = the last non-EOS token). ``lo``
    is the prompt length (a prefix score) or, with ``per_step``, the start of the new step (a step score,
    whose product over steps is the prefix score). Tables should be \(\le 0\) for \(\hat r \in [0, 1]\);
    \(-\infty\) forbids a pair (hard constraint)."""

    log_pair: Float[Array, "V V"]
    log_final: Float[Array, " V"]
    per_step: Bool[Array, ""]

    def __init__(self, log_pair: Float[ArrayLike, "V V"], log_final: Float[ArrayLike, " V"] | None = None,
                 *, per_step: bool = False):
        lp = np.asarray(log_pair, np.float64)
        if lp.ndim != 2 or lp.shape[0] != lp.shape[1]:
            raise ValueError(f"log_pair must be a square [V, V] table, got shape {lp.shape}")
        lf = np.zeros(lp.shape[0]) if log_final is None else np.asarray(log_final, np.float64)
        if lf.shape != (lp.shape[0],):
            raise ValueError(f"log_final must have shape ({lp.shape[0]},), got {lf.shape}")
        if np.isnan(lp).any() or np.isnan(lf).any() or (lp == np.inf).any() or (lf == np.inf).any():
            raise ValueError("reward tables must not contain NaN or +inf")
        self.log_pair = jnp.asarray(lp, jnp.float32)
        self.log_final = jnp.asarray(lf, jnp.float32)
        self.per_step = jnp.asarray(bool(per_step))

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        tokens, lengths = lm_state.tokens, lm_state.lengths
        lo = jnp.where(self.per_step, prev_lengths, lm_state.prompt_lengths)
        pos = jnp.arange(1, tokens.shape[1])
        mask = (pos[None, :] >= jnp.maximum(lo, 1)[:, None]) & (pos[None, :] < lengths[:, None])
        prev, cur = jnp.clip(tokens[:, :-1], 0), jnp.clip(tokens[:, 1:], 0)
        s = jnp.sum(jnp.where(mask, self.log_pair[prev, cur], 0.0), axis=1)
        answer = jnp.clip(_last_answer(tokens, lengths, lm.eos_ids), 0)
        return s + jnp.where(finished, self.log_final[answer], 0.0)


class TokenVerifier(RewardModel):
    """Any jnp verifier ``fn(tokens [N, L], lengths [N], prompt_lengths [N], prev_lengths [N],
    finished [N]) -> r̂ ∈ [0, 1] [N]`` (a process reward on token ids, inside ``jit``)."""

    fn: Callable = eqx.field(static=True)

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        r = self.fn(lm_state.tokens, lm_state.lengths, lm_state.prompt_lengths, prev_lengths, finished)
        return _safe_log(r)


def _safe_log(r):
    r = jnp.asarray(r, jnp.float32)
    bad = jnp.isnan(r) | (r < 0) | (r > 1)
    return jnp.where(bad, jnp.nan, jnp.log(jnp.clip(r, 0.0, 1.0)))


# ------------------------------------------------------------------------------------------------
# host-side (text) verifiers
# ------------------------------------------------------------------------------------------------


class HostAnswer:
    r"""Interning table of one answer function ``fn(completion_ids) -> Hashable``: integer ids with
    equal answers \(\Leftrightarrow\) equal ids, so that votes can run inside ``jit``
    (``jax.pure_callback``). ``values[i]`` is the answer of id \(i\)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.table: dict[Any, int] = {}
        self.values: list[Any] = []

    def intern(self, answer) -> int:
        i = self.table.get(answer)
        if i is None:
            i = self.table[answer] = len(self.values)
            self.values.append(answer)
        return i


class HostCallbacks:
    """The host (Python) functions that compiled programs call through ``jax.pure_callback`` —
    reward functions, answer functions — and the answer-interning tables, of one experiment.

    The caller creates one (e.g. per experiment) and passes it to the reward models and to
    :meth:`~models.llm_fk.ssm.LLMFeynmanKac.build`; nothing is kept at module level, and two
    objects never share functions or tables. Compiled programs receive a function as an integer id
    (an array leaf) and the object itself as a static field compared by identity, so that another
    task's function registered in the *same* object does not recompile anything.
    """

    def __init__(self):
        self._fns: list[Callable] = []
        self._ids: dict[Any, int] = {}
        self._tables: dict[int, HostAnswer] = {}

    def register(self, fn: Callable) -> int:
        """The id of ``fn`` (registered on first use; the same callable keeps its id)."""
        checks.function("fn", fn, "a host function called from compiled code")
        try:
            i = self._ids.get(fn)
        except TypeError:  # unhashable callable
            i = None
        if i is None:
            i = len(self._fns)
            self._fns.append(fn)
            try:
                self._ids[fn] = i
            except TypeError:
                pass
        return i

    def fn(self, i) -> Callable:
        """The function registered under id ``i``."""
        i = int(i)
        if not 0 <= i < len(self._fns):
            raise KeyError(f"no host function with id {i} in this HostCallbacks")
        return self._fns[i]

    def answers(self, i) -> HostAnswer:
        """The interning table of the answer function registered under id ``i``."""
        i = int(i)
        if i not in self._tables:
            self._tables[i] = HostAnswer(self.fn(i))
        return self._tables[i]

    @property
    def num_functions(self) -> int:
        return len(self._fns)

    def __repr__(self) -> str:
        return f"HostCallbacks({len(self._fns)} functions, {len(self._tables)} answer tables)"


def host_rows(row_fn: Callable, out_dtype, *arrays: Array) -> Array:
    """``row_fn(*row_values) -> scalar`` applied on the host to every row of the [N, ...] arrays
    (a ``jax.pure_callback``, usable under ``jit`` and ``vmap``); returns [N] of ``out_dtype``.
    Scalar (0-d) arrays are passed whole to every row. ``row_fn`` must not capture traced or
    per-call values: the compiled program keeps the first one it saw; pass them as arrays."""
    n = next(a.shape[0] for a in arrays if jnp.ndim(a) > 0)

    def cb(*xs):
        xs = [np.asarray(x) for x in xs]
        out = np.empty((n,), out_dtype)
        for i in range(n):
            out[i] = row_fn(*(x if x.ndim == 0 else x[i] for x in xs))
        return out

    return jax.pure_callback(
        cb, jax.ShapeDtypeStruct((n,), out_dtype), *arrays, vmap_method="sequential"
    )


def _completion_ids(tokens_row, prompt_length, length) -> list[int]:
    return [int(t) for t in tokens_row[int(prompt_length): int(length)]]


class _HostVerifier(RewardModel):
    fn_id: Int[Array, ""]
    callbacks: HostCallbacks = eqx.field(static=True)
    log_scale: bool = eqx.field(static=True)

    def __init__(self, fn: Callable, *, callbacks: HostCallbacks | None = None, log_scale: bool = False):
        if callbacks is None:
            callbacks = HostCallbacks()
        checks.instance("callbacks", callbacks, HostCallbacks)
        self.callbacks = callbacks
        self.fn_id = jnp.asarray(callbacks.register(fn), jnp.int32)
        self.log_scale = bool(log_scale)

    @property
    def fn(self) -> Callable:
        return self.callbacks.fn(self.fn_id)

    def _checked(self, value) -> float:
        r"""A host score as a float32-safe value: \(\hat r \in [0, 1]\), or (``log_scale``)
        \(\log \hat r \in [-\infty, 0]\); anything else is NaN (a killed particle, reported by the engine)."""
        v = float(value)
        if self.log_scale:
            return v if v <= 0.0 else float("nan")
        return v if 0.0 <= v <= 1.0 else float("nan")

    def _log(self, out):
        if self.log_scale:
            out = jnp.asarray(out, jnp.float32)
            return jnp.where(out > 0, jnp.nan, out)
        return _safe_log(out)


class ProgrammaticStepVerifier(_HostVerifier):
    r"""A process reward in Python on the decoded completion: ``fn(text_so_far, finished) -> r̂``
    with \(\hat r \in [0, 1]\) (values outside count as NaN = a killed particle, reported by the
    engine), or with ``log_scale=True`` ``fn`` returns \(\log \hat r \in [-\infty, 0]\) (a product of many
    small factors does not underflow in float32). Called on the host from the compiled loop, once per active
    particle and step; inactive rows are not decoded. ``fn`` is registered in ``callbacks`` (a
    :class:`HostCallbacks`; default: a new one of this verifier's own)."""

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        decode, callbacks, check = lm.decode, self.callbacks, self._checked
        neutral = 0.0 if self.log_scale else 1.0

        def row(fid, tokens, p, length, fin, act):
            if not act:
                return neutral
            return check(callbacks.fn(fid)(decode(_completion_ids(tokens, p, length)), bool(fin)))

        out = host_rows(row, np.float32, self.fn_id, lm_state.tokens, lm_state.prompt_lengths,
                        lm_state.lengths, finished, active)
        return self._log(out)


class FinalAnswerVerifier(_HostVerifier):
    r"""An outcome reward in Python: ``fn(text) -> r̂ ∈ [0, 1]`` (``log_scale=True``: \(\log \hat r\))
    on finished completions; unfinished prefixes score 1 (\(\log \hat r = 0\)) and are not sent to ``fn`` (no
    reward call). ``fn`` is registered in ``callbacks`` (see :class:`ProgrammaticStepVerifier`)."""

    scores_unfinished: ClassVar[bool] = False

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        decode, callbacks, check = lm.decode, self.callbacks, self._checked
        neutral = 0.0 if self.log_scale else 1.0

        def row(fid, tokens, p, length, fin, act):
            if not (act and fin):
                return neutral
            return check(callbacks.fn(fid)(decode(_completion_ids(tokens, p, length))))

        out = host_rows(row, np.float32, self.fn_id, lm_state.tokens, lm_state.prompt_lengths,
                        lm_state.lengths, finished, active)
        return self._log(out)


# ------------------------------------------------------------------------------------------------
# LLM as a judge
# ------------------------------------------------------------------------------------------------

DEFAULT_QUESTION = "\n\nIs every step above correct? Answer Yes or No.\nAnswer:"


class LLMJudge(RewardModel):
    r"""\(\hat r = p(\text{Yes}) / (p(\text{Yes}) + p(\text{No}))\) of the judge's next token after
    ``question_template`` is appended to the prefix (``normalize=False``: \(p(\text{Yes})\) alone); Yes/No may
    each be several token ids (their probabilities add).

    ``lm=None`` (or the generator itself) judges with the generator's own cache: the question is
    forced on top of every particle's cache (a copy), one batched forward pass of
    ``len(question)`` tokens. A different ``lm`` (same tokenizer) keeps its own cache of each
    particle in the reward state, extended by every new step, so no prefix is re-encoded.
    ``question_template`` is text appended verbatim after the completion so far (needs a
    tokenizer; a suffix, so that the prefix cache is reused) or token ids; ``yes``/``no`` likewise (text: the
    first token of the word with and without a leading space).
    """

    lm: AbstractStepLM | None = None
    question_template: Any = eqx.field(static=True, default=DEFAULT_QUESTION)
    yes: Any = eqx.field(static=True, default="Yes")
    no: Any = eqx.field(static=True, default="No")
    normalize: bool = eqx.field(static=True, default=True)
    # set by bind
    question_ids: tuple[int, ...] | None = eqx.field(static=True, default=None)
    yes_ids: tuple[int, ...] | None = eqx.field(static=True, default=None)
    no_ids: tuple[int, ...] | None = eqx.field(static=True, default=None)
    shared: bool = eqx.field(static=True, default=True)
    judge_prompt: Any = None

    @property
    def keeps_done_rows(self) -> bool:
        """A separate judge's cache goes through the batched forward for every row (a K/V entry is
        written past the length of inactive rows): only the shared judge keeps no state."""
        return self.shared

    def _judge(self, lm):
        return lm if self.shared else self.lm

    def _ids(self, judge, spec, word: bool) -> tuple[int, ...]:
        if isinstance(spec, str):
            if word:
                ids = []
                for text in (" " + spec, spec):
                    enc = judge.encode(text)
                    if enc and enc[0] not in ids:
                        ids.append(enc[0])
                return tuple(ids)
            return tuple(judge.encode(spec))
        return tuple(int(i) for i in spec)

    def bind(self, lm, prompt_ids, max_new_tokens):
        shared = self.lm is None or self.lm is lm or getattr(self.lm, "model", 0) is getattr(lm, "model", 1)
        judge = lm if shared else self.lm
        if not shared and judge.vocab_size != lm.vocab_size:
            raise ValueError("a separate judge LM must share the generator's tokenizer (vocabulary sizes "
                             f"differ: {judge.vocab_size} vs {lm.vocab_size})")
        q = self._ids(judge, self.question_template, False)
        yes, no = self._ids(judge, self.yes, True), self._ids(judge, self.no, True)
        if not q:
            raise ValueError("the judge question has no tokens")
        if not yes or (self.normalize and not no):
            raise ValueError("the judge needs Yes (and No) token ids")
        v = judge.vocab_size
        if any(not 0 <= i < v for i in q + yes + no):
            raise ValueError(f"judge token ids must lie in [0, {v})")
        if set(yes) & set(no):
            raise ValueError(f"Yes and No token ids overlap: {set(yes) & set(no)}")
        prompt_state = None
        if not shared:
            prompt_state = judge.prefill(prompt_ids, int(max_new_tokens) + len(q))
        return LLMJudge(lm=self.lm, question_template=self.question_template, yes=self.yes, no=self.no,
                        normalize=self.normalize, question_ids=q, yes_ids=yes, no_ids=no,
                        shared=shared, judge_prompt=prompt_state)

    def _check_bound(self):
        if self.question_ids is None:
            raise ValueError("LLMJudge must be bound to a prompt first (LLMFeynmanKac does it: "
                             "reward.bind(lm, prompt_ids, max_new_tokens))")

    def extra_context(self, lm):
        self._check_bound()
        return len(self.question_ids) if self.shared else 0

    def init_state(self, lm, lm_state):
        self._check_bound()
        if self.shared:
            return None
        return self.lm.broadcast(self.judge_prompt, lm_state.tokens.shape[0])

    def truncate(self, lm, state, lm_state, lengths):
        if self.shared or state is None:
            return None
        return self.lm.truncate(state, state.prompt_lengths + (lengths - lm_state.prompt_lengths))

    def update(self, lm, state, lm_state, prev_lengths, active, max_step_tokens, step=None):
        if self.shared:
            return state
        k = int(max_step_tokens)
        idx = prev_lengths[:, None] + jnp.arange(k)[None, :]
        new = jnp.take_along_axis(lm_state.tokens, jnp.minimum(idx, lm_state.tokens.shape[1] - 1), axis=1)
        n = jnp.where(active, lm_state.lengths - prev_lengths, 0)
        return self.lm.force(state, new, n)

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        self._check_bound()
        judge = self._judge(lm)
        src = lm_state if self.shared else state
        n = src.tokens.shape[0]
        q = jnp.broadcast_to(jnp.asarray(self.question_ids, jnp.int32), (n, len(self.question_ids)))
        asked = judge.force(src, q, jnp.full((n,), len(self.question_ids), jnp.int32))
        logp = judge.next_token_logprobs(asked)
        log_yes = jax.nn.logsumexp(logp[:, jnp.asarray(self.yes_ids)], axis=-1)
        if not self.normalize:
            return log_yes
        log_no = jax.nn.logsumexp(logp[:, jnp.asarray(self.no_ids)], axis=-1)
        return log_yes - jnp.logaddexp(log_yes, log_no)

    def rewind(self, lm, state_row, lm_prompt_length, lm_lengths):
        if self.shared or state_row is None:
            return None
        judge_lengths = state_row.prompt_lengths + (lm_lengths - lm_prompt_length)
        return self.lm.rewind(state_row, judge_lengths)


# ------------------------------------------------------------------------------------------------
# rewards without a reward model
# ------------------------------------------------------------------------------------------------


class ConstantReward(RewardModel):
    r"""\(\hat r = 1\) for every prefix: no reward model at all (the target is the LM itself, or
    \(p^\alpha\) with ``power``; search then selects by nothing). Costs no reward call."""

    scores_unfinished: ClassVar[bool] = False

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        return jnp.zeros(lm_state.lengths.shape, jnp.float32)


class SelfCertainty(RewardModel):
    r"""Self-certainty: the generator's own confidence, no reward model. With \(x_{1:n}\) the
    generated tokens so far,

    \[ \log \hat r(x_{1:n}) = \frac{1}{n} \sum_{j \le n} \log p(x_j \mid x_{<j}) \in (-\infty, 0], \]

    the mean token log-probability under the LM at temperature 1 (\(\hat r\) is the inverse
    per-token perplexity; 1 before any token). With the twisted weighting the target is
    \(\pi(x) \propto p(x)\, \hat r(x)^\beta\): sequences the model is sure of, a reward that
    cannot see correctness (it is "hacked" by confident repetition).

    The state keeps the running sum of \(\log p\) at every step boundary (a [N, L] buffer over
    the generator's token positions), read from the step LM's ``StepInfo``, so scoring costs
    nothing and earlier prefixes (particle Gibbs' reference path, resample-move) stay valid.

    References: Kadavath et al. (2022), "Language models (mostly) know what they know";
    Kang, Zhao & Song (2025), "Scalable best-of-N selection for large language models via
    self-certainty" (a KL form of the same idea).
    """

    def init_state(self, lm, lm_state):
        return jnp.zeros(lm_state.tokens.shape, jnp.float32)

    def update(self, lm, state, lm_state, prev_lengths, active, max_step_tokens, step=None):
        if step is None:
            raise ValueError("SelfCertainty needs the step's log-probability (StepInfo)")
        width = state.shape[1]
        started = prev_lengths > lm_state.prompt_lengths
        before = jnp.take_along_axis(state, jnp.clip(prev_lengths - 1, 0, width - 1)[:, None], axis=1)[:, 0]
        total = jnp.where(started, before, 0.0) + step.logprob
        at = jnp.clip(lm_state.lengths - 1, 0, width - 1)
        write = active & (lm_state.lengths > prev_lengths)
        hit = (jnp.arange(width)[None, :] == at[:, None]) & write[:, None]
        return jnp.where(hit, total[:, None], state)

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        width = state.shape[1]
        n = lm_state.lengths - lm_state.prompt_lengths
        total = jnp.take_along_axis(state, jnp.clip(lm_state.lengths - 1, 0, width - 1)[:, None], axis=1)[:, 0]
        return jnp.where(n > 0, total / jnp.maximum(n, 1).astype(jnp.float32), 0.0)

    def truncate(self, lm, state, lm_state, lengths):
        return state  # the sums at earlier boundaries are still there

    def rewind(self, lm, state_row, lm_prompt_length, lm_lengths):
        return tree.broadcast_rows(state_row, lm_lengths.shape[0])
