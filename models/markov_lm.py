"""A Markov-chain "language model" on a tiny vocabulary: exact test bed for LLM particle methods.

Tokens follow a first-order chain started from the last prompt token,
P(w_j = v | w_{j-1} = u) = P[u, v]. Generation proceeds in *reasoning steps*: a step appends
tokens until it emits the delimiter or EOS, or has appended ``max_step_tokens`` tokens; a sequence
ends at EOS or when its buffer of ``max_length`` tokens (prompt included) is full.

The step potentials of :class:`MarkovLMFeynmanKac` are

    log G_t = Σ_{j new at step t} [φ(w_{j-1}, w_j) + log P[w_{j-1}, w_j] − log Q[w_{j-1}, w_j]]
              + 1[the sequence finished at step t] ψ(answer(w)),

with Q the proposal that draws the steps (Q = P by default, so the bracket's last two terms vanish).
Their product is exp(Φ(w)) P(w)/Q(w) with Φ(w) = Σ_j φ(w_{j-1}, w_j) + ψ(answer(w)), a function of
the complete sequence only, not of how it is cut into steps. So the target
π(w) ∝ P(w | prompt) exp Φ(w) and its evidence Z = E_P[exp Φ] are known exactly, by enumeration or a
forward recursion (:mod:`models.markov_lm_exact`). φ expresses per-token rewards or penalties
(φ[:, k] = λ rewards exp(λ · count of k)) and hard constraints (φ[k, k] = −inf: "no k twice in a
row"); ψ is a reward on the answer, the last non-EOS token (a verifier on the final answer).

For the search baselines (:mod:`samplers.search`) the model also supplies ``score`` (the
log-potential so far), ``answer``, ``num_tokens`` and, for single-token steps, ``expand_all``
(every next token, for deterministic beam search).

A particle mirrors the LLM state-space model: :class:`LMState` = token buffer [N, L] (prompt, then
generated tokens, then ``PAD``), length, number of steps taken, done flag. Finished particles are
absorbing: they are not moved and get potential 0. Since a particle holds its whole prefix, the
step transition x_{t-1} → x_t has positive density only when x_t extends x_{t-1} by exactly one
valid step (:meth:`MarkovLMFeynmanKac.log_transition`).

References: Lew, Zhi-Xuan, Grand & Mansinghka (2023), "Sequential Monte Carlo steering of large
language models using probabilistic programs"; Zhao, Brekelmans, Makhzani & Grosse (2024),
"Probabilistic inference in language models via twisted sequential Monte Carlo".
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ppl.feynman_kac import AbstractFeynmanKac

__all__ = [
    "PAD",
    "LMState",
    "MarkovLM",
    "TokenConstraint",
    "MarkovLMFeynmanKac",
    "markov_lm",
    "token_constraint",
    "toy_reasoning_model",
    "generate_step",
    "sample_sequences",
    "sequence_log_prob",
    "total_log_potential",
    "last_token_answer",
    "token_count",
    "segment_trajectory",
]

PAD = -1
"""Token id of unused buffer slots (positions ≥ ``length``)."""


class LMState(NamedTuple):
    """A batch of (partial) sequences: the particle of the LLM-style state-space models.

    Attributes:
        tokens: [N, L] prompt, then generated tokens, then ``PAD``.
        length: [N] number of valid tokens (prompt included; EOS included when emitted).
        num_steps: [N] reasoning steps generated so far.
        done: [N] finished (EOS emitted or buffer full); absorbing.
    """

    tokens: Int[Array, "N L"]
    length: Int[Array, " N"]
    num_steps: Int[Array, " N"]
    done: Bool[Array, " N"]


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or ``None`` when it is traced (value checks are then skipped)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


class MarkovLM(eqx.Module):
    """First-order Markov chain over V tokens: ``log_probs[u, v] = log P(next = v | previous = u)``.

    Every row must be a distribution (the EOS row is only used by code that generates past EOS).
    Build it with :func:`markov_lm`, which validates probabilities.
    """

    log_probs: Float[Array, "V V"]
    eos_id: int = eqx.field(static=True)
    delimiter_id: int = eqx.field(static=True)
    token_names: tuple[str, ...] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        shape = jnp.shape(self.log_probs)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2:
            raise ValueError(f"log_probs must be a square [V, V] matrix with V >= 2, got {shape}")
        v = shape[0]
        for name, idx in (("eos_id", self.eos_id), ("delimiter_id", self.delimiter_id)):
            if not isinstance(idx, int) or not 0 <= idx < v:
                raise ValueError(f"{name} must be an int in [0, {v}), got {idx!r}")
        if self.eos_id == self.delimiter_id:
            raise ValueError("eos_id and delimiter_id must differ")
        if self.token_names is not None and len(self.token_names) != v:
            raise ValueError(f"token_names needs {v} names, got {len(self.token_names)}")

    @property
    def vocab_size(self) -> int:
        return jnp.shape(self.log_probs)[0]

    def decode(self, tokens: Int[ArrayLike, " L"], length: int | None = None) -> str:
        """Human-readable string of one sequence (host-side; uses ``token_names``)."""
        toks = np.asarray(tokens)
        toks = toks[: int(length)] if length is not None else toks[toks != PAD]
        names = self.token_names or tuple(str(i) for i in range(self.vocab_size))
        return " ".join(names[int(t)] for t in toks)


def markov_lm(
    probs: Float[ArrayLike, "V V"],
    *,
    eos_id: int,
    delimiter_id: int,
    token_names: Sequence[str] | None = None,
) -> MarkovLM:
    """Build a :class:`MarkovLM` from a row-stochastic matrix ``probs[previous, next]``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"probs must be a square [V, V] matrix, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"every row of probs must sum to 1, got row sums {p.sum(axis=1)}")
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    return MarkovLM(
        jnp.asarray(log_p, jnp.float32),
        eos_id=int(eos_id),
        delimiter_id=int(delimiter_id),
        token_names=tuple(token_names) if token_names is not None else None,
    )


class TokenConstraint(eqx.Module):
    """Sequence potential exp Φ(w), Φ(w) = Σ_j φ(w_{j-1}, w_j) + ψ(answer(w)).

    ``log_pair[u, v] = φ(u, v)`` is charged for every generated token v following u (−inf forbids
    the pair); ``log_final[a] = ψ(a)`` once, when the sequence finishes, with ``a`` its
    :func:`last_token_answer`. Build it with :func:`token_constraint`.
    """

    log_pair: Float[Array, "V V"]
    log_final: Float[Array, " V"]

    def __check_init__(self):
        s_pair, s_final = jnp.shape(self.log_pair), jnp.shape(self.log_final)
        if len(s_pair) != 2 or s_pair[0] != s_pair[1] or s_final != (s_pair[0],):
            raise ValueError(
                f"log_pair must be [V, V] and log_final [V], got {s_pair} and {s_final}"
            )


def token_constraint(
    vocab_size: int,
    *,
    token_log_reward: Float[ArrayLike, " V"] | None = None,
    forbid_repeat: Sequence[int] = (),
    answer_log_reward: Float[ArrayLike, " V"] | None = None,
    pair_log_potential: Float[ArrayLike, "V V"] | None = None,
) -> TokenConstraint:
    """Build a :class:`TokenConstraint`.

    Args:
        vocab_size: V.
        token_log_reward: λ [V]: every generated token k multiplies the weight by exp(λ_k)
            (so the sequence gets exp(Σ_k λ_k · count_k)).
        forbid_repeat: tokens k that may not appear twice in a row (φ[k, k] = −inf; also forbids
            a first generated k after a prompt ending in k).
        answer_log_reward: ψ [V], added once for the final answer (last non-EOS token).
        pair_log_potential: an extra φ [V, V] added to the above.
    """
    v = int(vocab_size)
    if v < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size!r}")
    phi = np.zeros((v, v))
    if token_log_reward is not None:
        lam = np.asarray(token_log_reward, dtype=np.float64)
        if lam.shape != (v,):
            raise ValueError(f"token_log_reward must have shape ({v},), got {lam.shape}")
        phi = phi + lam[None, :]
    for k in forbid_repeat:
        if not isinstance(k, (int, np.integer)) or not 0 <= k < v:
            raise ValueError(f"forbid_repeat entries must be token ids in [0, {v}), got {k!r}")
        phi[k, k] = -np.inf
    if pair_log_potential is not None:
        extra = np.asarray(pair_log_potential, dtype=np.float64)
        if extra.shape != (v, v):
            raise ValueError(f"pair_log_potential must have shape ({v}, {v}), got {extra.shape}")
        phi = phi + extra
    psi = np.zeros(v)
    if answer_log_reward is not None:
        psi = np.asarray(answer_log_reward, dtype=np.float64)
        if psi.shape != (v,):
            raise ValueError(f"answer_log_reward must have shape ({v},), got {psi.shape}")
    if np.any(np.isnan(phi)) or np.any(np.isnan(psi)) or np.any(psi == np.inf):
        raise ValueError("constraint potentials must not be NaN (or +inf)")
    return TokenConstraint(jnp.asarray(phi, jnp.float32), jnp.asarray(psi, jnp.float32))


# ------------------------------------------------------------------------------------------------
# Sequence functions (batched over the leading axis)
# ------------------------------------------------------------------------------------------------


def _span_mask(lo: Int[Array, " N"], hi: Int[Array, " N"], max_length: int) -> Bool[Array, "N L"]:
    pos = jnp.arange(max_length)
    return (pos >= lo[:, None]) & (pos < hi[:, None])


def _pair_sum(
    table: Float[Array, "V V"],
    tokens: Int[Array, "N L"],
    lo: Int[Array, " N"],
    hi: Int[Array, " N"],
) -> Float[Array, " N"]:
    """Σ_{lo ≤ j < hi} table[w_{j-1}, w_j] (requires lo ≥ 1)."""
    max_length = tokens.shape[1]
    mask = _span_mask(lo, hi, max_length)[:, 1:]
    prev = jnp.clip(tokens[:, :-1], 0)
    cur = jnp.clip(tokens[:, 1:], 0)
    return jnp.sum(jnp.where(mask, table[prev, cur], 0.0), axis=1)


def _token_at(tokens: Int[Array, "N L"], pos: Int[Array, " N"]) -> Int[Array, " N"]:
    pos = jnp.clip(pos, 0, tokens.shape[1] - 1)
    return jnp.take_along_axis(tokens, pos[:, None], axis=1)[:, 0]


def last_token_answer(states: LMState, eos_id: int) -> Int[Array, " N"]:
    """The answer of a sequence: its last non-EOS token (the last prompt token if it emitted EOS at
    once). For unfinished sequences: the last token so far."""
    tokens, length = jnp.asarray(states.tokens), jnp.asarray(states.length)
    last = _token_at(tokens, length - 1)
    before = _token_at(tokens, length - 2)
    return jnp.where(last == eos_id, before, last)


def token_count(states: LMState, token: int, prompt_length: int) -> Int[Array, " N"]:
    """Number of generated (non-prompt) occurrences of ``token``."""
    tokens, length = jnp.asarray(states.tokens), jnp.asarray(states.length)
    span = _span_mask(jnp.full_like(length, prompt_length), length, tokens.shape[1])
    return jnp.sum(span & (tokens == token), axis=1).astype(jnp.int32)


def sequence_log_prob(
    lm: MarkovLM, states: LMState, prompt_length: int
) -> Float[Array, " N"]:
    """log P(generated tokens | prompt) = Σ_{prompt_length ≤ j < length} log P[w_{j-1}, w_j]."""
    tokens, length = jnp.asarray(states.tokens), jnp.asarray(states.length)
    return _pair_sum(lm.log_probs, tokens, jnp.full_like(length, prompt_length), length)


def generate_step(
    key: PRNGKeyArray,
    lm: MarkovLM,
    states: LMState,
    *,
    max_step_tokens: int,
    stop_at_eos: bool = True,
) -> LMState:
    """Append one reasoning step to every unfinished sequence.

    Tokens are drawn from ``lm`` until the delimiter or EOS is emitted, ``max_step_tokens`` tokens
    were added, or the buffer is full. Finished sequences are returned unchanged.
    ``stop_at_eos=False`` keeps generating after EOS until the buffer is full (``ignore_eos`` of
    LLM servers; not a valid language-model law — used to break absorption on purpose in tests).
    """
    tokens, length, num_steps, done = states
    n, max_length = tokens.shape
    pos = jnp.arange(max_length)
    active = ~done if stop_at_eos else length < max_length

    def body(_, carry):
        tokens, length, done, open_, key = carry
        key, sub = jax.random.split(key)
        prev = jnp.clip(_token_at(tokens, length - 1), 0)
        tok = jax.random.categorical(sub, lm.log_probs[prev]).astype(tokens.dtype)
        tokens = jnp.where(open_[:, None] & (pos == length[:, None]), tok[:, None], tokens)
        length = length + open_.astype(length.dtype)
        is_eos = tok == lm.eos_id
        ended = is_eos | (tok == lm.delimiter_id)
        full = length >= max_length
        finished = (is_eos & stop_at_eos) | full
        done = done | (open_ & finished)
        open_ = open_ & ~ended & ~full
        return tokens, length, done, open_, key

    tokens, length, done, _, _ = jax.lax.fori_loop(
        0, max_step_tokens, body, (tokens, length, done, active, key)
    )
    return LMState(tokens, length, num_steps + active.astype(num_steps.dtype), done)


# ------------------------------------------------------------------------------------------------
# The Feynman-Kac model
# ------------------------------------------------------------------------------------------------


class MarkovLMFeynmanKac(AbstractFeynmanKac):
    """Step-level Feynman-Kac model of constrained generation from a :class:`MarkovLM`.

    M_0 = prompt then one step, M_t = one more step (drawn from ``proposal`` when given, else from
    ``lm``), G_t as in the module docstring; ``done`` = EOS emitted or buffer full. The target over
    complete sequences is π(w) ∝ P(w | prompt) exp Φ(w), whatever the proposal and step sizes.

    Run it with a variable horizon: ``smc(key, model, N, max_steps=model.max_num_steps)`` finishes
    every particle (each step adds at least one token). Setting ``num_steps`` gives a fixed horizon
    (``lax.scan``; finished particles just wait), e.g. for reverse-mode gradients.
    """

    lm: MarkovLM
    constraint: TokenConstraint
    prompt: Int[Array, " P"]
    max_length: int = eqx.field(static=True)
    max_step_tokens: int = eqx.field(static=True)
    proposal: MarkovLM | None = None
    num_steps: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        v = self.lm.vocab_size
        if jnp.shape(self.constraint.log_pair)[0] != v:
            raise ValueError(
                f"constraint has vocabulary {jnp.shape(self.constraint.log_pair)[0]}, lm has {v}"
            )
        if self.proposal is not None and (
            self.proposal.vocab_size != v
            or self.proposal.eos_id != self.lm.eos_id
            or self.proposal.delimiter_id != self.lm.delimiter_id
        ):
            raise ValueError("proposal must share the lm's vocabulary, eos_id and delimiter_id")
        integer = jnp.issubdtype(jnp.result_type(self.prompt), jnp.integer)
        if jnp.ndim(self.prompt) != 1 or not integer:
            raise ValueError(f"prompt must be a 1-D integer array, got {jnp.shape(self.prompt)}")
        p = jnp.shape(self.prompt)[0]
        if not isinstance(self.max_length, int) or not 1 <= p < self.max_length:
            raise ValueError(
                f"need 1 <= prompt length < max_length, got prompt length {p} and max_length "
                f"{self.max_length!r}"
            )
        if not isinstance(self.max_step_tokens, int) or self.max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be an int >= 1, got {self.max_step_tokens!r}")
        steps = self.num_steps
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"num_steps must be None or an int >= 1, got {self.num_steps!r}")
        prompt = _concrete(self.prompt)
        if prompt is not None:
            if np.any(prompt < 0) or np.any(prompt >= v):
                raise ValueError(f"prompt tokens must lie in [0, {v}), got {prompt.tolist()}")
            if np.any(prompt == self.lm.eos_id):
                raise ValueError("the prompt must not contain EOS")

    # --- shapes ---------------------------------------------------------------------------------
    @property
    def prompt_length(self) -> int:
        return jnp.shape(self.prompt)[0]

    @property
    def max_num_steps(self) -> int:
        """Steps that finish every sequence: each step adds at least one token."""
        return self.max_length - self.prompt_length

    @property
    def eos_id(self) -> int:
        return self.lm.eos_id

    @property
    def move_lm(self) -> MarkovLM:
        """The chain the steps are drawn from (the proposal, or the lm itself)."""
        return self.lm if self.proposal is None else self.proposal

    def initial_state(self, num: int) -> LMState:
        """``num`` copies of the prompt, no step taken."""
        tokens = jnp.full((num, self.max_length), PAD, jnp.int32)
        tokens = tokens.at[:, : self.prompt_length].set(self.prompt.astype(jnp.int32))
        return LMState(
            tokens,
            jnp.full((num,), self.prompt_length, jnp.int32),
            jnp.zeros((num,), jnp.int32),
            jnp.zeros((num,), bool),
        )

    def answer(self, states: LMState) -> Int[Array, " N"]:
        """:func:`last_token_answer`."""
        return last_token_answer(states, self.eos_id)

    # --- search interface (samplers.search) -----------------------------------------------------
    def score(self, states: LMState) -> Float[Array, " N"]:
        """Reward of a (partial) sequence for search: its log-potential so far, Σ_{t ≤ now} log G_t
        (:func:`total_log_potential`; Φ(w) for a complete sequence without proposal)."""
        return total_log_potential(self, states)

    def num_tokens(self, states: LMState) -> Int[Array, " N"]:
        """Generated tokens (prompt excluded)."""
        return (jnp.asarray(states.length) - self.prompt_length).astype(jnp.int32)

    @property
    def num_children(self) -> int:
        """Next steps of a sequence for :meth:`expand_all`: V (single-token steps only)."""
        if self.max_step_tokens != 1:
            raise ValueError(
                f"expand_all enumerates single-token steps only (max_step_tokens = 1), this model "
                f"has max_step_tokens = {self.max_step_tokens}"
            )
        return self.lm.vocab_size

    def expand_all(self, states: LMState) -> tuple[LMState, Float[Array, "N V"]]:
        """Every next step of every sequence, for single-token steps: child ``i * V + v`` appends
        token v to sequence i (it finishes on EOS or a full buffer); ``log_probs[i, v]`` is its
        log-probability under the move chain. Children of finished sequences are meaningless
        (callers keep the finished sequence instead)."""
        v = self.num_children
        tokens, length, num_steps, done = states
        n = tokens.shape[0]
        parent = jnp.repeat(jnp.arange(n), v)
        tok = jnp.tile(jnp.arange(v, dtype=tokens.dtype), n)
        p_tokens, p_length = tokens[parent], length[parent]
        pos = jnp.arange(self.max_length)
        at = (pos[None, :] == p_length[:, None]) & (p_length[:, None] < self.max_length)
        c_tokens = jnp.where(at, tok[:, None], p_tokens)
        c_length = jnp.minimum(p_length + 1, self.max_length)
        c_done = (tok == self.eos_id) | (c_length >= self.max_length)
        children = LMState(c_tokens, c_length, num_steps[parent] + 1, c_done)
        last = jnp.clip(_token_at(tokens, length - 1), 0)
        return children, self.move_lm.log_probs[last]

    # --- Feynman-Kac protocol -------------------------------------------------------------------
    def init(self, key: PRNGKeyArray, num_particles: int) -> LMState:
        return self.move(key, jnp.asarray(0, jnp.int32), self.initial_state(num_particles))

    def move(self, key: PRNGKeyArray, t: Int[Array, ""], particles: LMState) -> LMState:
        return generate_step(key, self.move_lm, particles, max_step_tokens=self.max_step_tokens)

    def _increment_table(self) -> Float[Array, "V V"]:
        table = self.constraint.log_pair
        if self.proposal is not None:
            ratio = self.lm.log_probs - self.proposal.log_probs
            # pairs the proposal never draws carry no weight (avoid −inf − −inf = NaN)
            table = table + jnp.where(self.proposal.log_probs > -jnp.inf, ratio, 0.0)
        return table

    def log_potential(
        self, t: Int[Array, ""], previous: LMState | None, particles: LMState
    ) -> Float[Array, " N"]:
        """log G_t: pair potentials (and P/Q) of the tokens added at step t, plus ψ(answer) when
        the sequence finished at step t. 0 for a particle that was already finished."""
        length = particles.length
        if previous is None:
            lo = jnp.full_like(length, self.prompt_length)
            was_done = jnp.zeros_like(particles.done)
        else:
            lo, was_done = previous.length, previous.done
        log_g = _pair_sum(self._increment_table(), particles.tokens, lo, length)
        just_done = particles.done & ~was_done
        final = self.constraint.log_final[self.answer(particles)]
        return log_g + jnp.where(just_done, final, 0.0)

    def log_transition(
        self, t: Int[Array, ""], previous: LMState, particles: LMState
    ) -> Float[Array, " N"]:
        """log M_t(previous → particles) pairwise: the step's log-probability under the move chain
        if ``particles`` extends ``previous`` by exactly one step, 0 if ``previous`` is finished
        and ``particles`` equals it, else −inf."""
        tokens, hi = particles.tokens, particles.length
        lo = previous.length
        pos = jnp.arange(self.max_length)
        same_prefix = jnp.all(
            jnp.where(pos < lo[:, None], tokens == previous.tokens, True), axis=1
        )
        identical = (
            jnp.all(tokens == previous.tokens, axis=1)
            & (hi == lo)
            & (particles.num_steps == previous.num_steps)
            & particles.done
        )
        delim, eos = self.lm.delimiter_id, self.lm.eos_id
        n_new = hi - lo
        is_stop = (tokens == delim) | (tokens == eos)
        interior = _span_mask(lo, hi - 1, self.max_length)
        last = _token_at(tokens, hi - 1)
        full = hi >= self.max_length
        closes = (last == delim) | (last == eos) | (n_new == self.max_step_tokens) | full
        valid = (
            same_prefix
            & (n_new >= 1)
            & (n_new <= self.max_step_tokens)
            & ~jnp.any(interior & is_stop, axis=1)
            & closes
            & (particles.done == ((last == eos) | full))
            & (particles.num_steps == previous.num_steps + 1)
        )
        log_m = _pair_sum(self.move_lm.log_probs, tokens, lo, hi)
        return jnp.where(
            previous.done,
            jnp.where(identical, 0.0, -jnp.inf),
            jnp.where(valid, log_m, -jnp.inf),
        )

    def done(self, particles: LMState) -> Bool[Array, " N"]:
        return particles.done


def total_log_potential(model: MarkovLMFeynmanKac, states: LMState) -> Float[Array, " N"]:
    """Σ_t log G_t of complete sequences: Φ(w) + log P(w)/Q(w) (Φ(w) without a proposal)."""
    length = jnp.asarray(states.length)
    tokens = jnp.asarray(states.tokens)
    lo = jnp.full_like(length, model.prompt_length)
    log_g = _pair_sum(model._increment_table(), tokens, lo, length)
    final = model.constraint.log_final[last_token_answer(states, model.eos_id)]
    return log_g + jnp.where(jnp.asarray(states.done), final, 0.0)


def sample_sequences(
    key: PRNGKeyArray, model: MarkovLMFeynmanKac, num_samples: int
) -> LMState:
    """Draw complete sequences from the move chain (the LM prior without a proposal); potentials
    ignored. Best-of-N and importance sampling weigh them with :func:`total_log_potential`."""

    def body(t, carry):
        key, states = carry
        key, sub = jax.random.split(key)
        return key, model.move(sub, jnp.asarray(t, jnp.int32), states)

    k0, k1 = jax.random.split(key)
    states = model.init(k0, num_samples)
    _, states = jax.lax.fori_loop(1, model.max_num_steps, body, (k1, states))
    return states


def segment_trajectory(
    model: MarkovLMFeynmanKac, final: LMState, horizon: int
) -> LMState:
    """The states x_0, ..., x_{horizon-1} after each step of one sequence (leaves without a
    particle axis), e.g. as the ``reference`` of conditional SMC. The step boundaries are recomputed
    from the tokens (delimiter, EOS, ``max_step_tokens``, full buffer); after the last step the
    finished state repeats (absorption). Leaves of the result: tokens [T, L], others [T]."""
    tokens = jnp.asarray(final.tokens)
    length = jnp.asarray(final.length)
    p, cap, max_length = model.prompt_length, model.max_step_tokens, model.max_length
    delim, eos = model.lm.delimiter_id, model.lm.eos_id

    def scan_fn(carry, tok):
        step, count, prev_stop = carry
        new = prev_stop | (count == cap)
        step = jnp.where(new, step + 1, step)
        count = jnp.where(new, 1, count + 1)
        return (step, count, (tok == delim) | (tok == eos)), step

    init = (jnp.asarray(-1), jnp.asarray(0), jnp.asarray(True))
    _, step_of = jax.lax.scan(scan_fn, init, tokens[p:])
    valid = jnp.arange(p, max_length) < length
    total = jnp.max(jnp.where(valid, step_of, -1)) + 1
    ts = jnp.arange(horizon)
    len_t = p + jnp.sum(valid[None, :] & (step_of[None, :] <= ts[:, None]), axis=1)
    pos = jnp.arange(max_length)
    tok_t = jnp.where(pos[None, :] < len_t[:, None], tokens[None, :], PAD)
    return LMState(
        tok_t.astype(jnp.int32),
        len_t.astype(jnp.int32),
        jnp.minimum(ts + 1, total).astype(jnp.int32),
        jnp.asarray(final.done) & (ts + 1 >= total),
    )


def toy_reasoning_model(*, proposal: bool = False) -> MarkovLMFeynmanKac:
    """The standard exact test bed: V = 5 tokens ``a b c . <eos>``, prompt ``.``, at most 6
    generated tokens in steps of at most 3 tokens ended by ``.``; the constraint rewards each ``a``
    by e^0.5, forbids ``b b`` and rewards the answers ``c`` (e^1.5) and ``b`` (e^-1). There are 5461
    complete sequences. ``proposal=True`` draws steps from a flatter chain (importance-corrected).
    """
    probs = np.array(
        [
            [0.30, 0.25, 0.15, 0.15, 0.15],  # after a
            [0.25, 0.25, 0.25, 0.10, 0.15],  # after b
            [0.20, 0.30, 0.20, 0.15, 0.15],  # after c
            [0.35, 0.30, 0.20, 0.05, 0.10],  # after .
            [0.20, 0.20, 0.20, 0.20, 0.20],  # after <eos> (never used by a valid generation)
        ]
    )
    names = ("a", "b", "c", ".", "<eos>")
    lm = markov_lm(probs, eos_id=4, delimiter_id=3, token_names=names)
    constraint = token_constraint(
        5,
        token_log_reward=[0.5, 0.0, 0.0, 0.0, 0.0],
        forbid_repeat=(1,),
        answer_log_reward=[0.0, -1.0, 1.5, 0.0, 0.0],
    )
    q = None
    if proposal:
        q = markov_lm(0.5 * probs + 0.5 / 5, eos_id=4, delimiter_id=3, token_names=names)
    return MarkovLMFeynmanKac(
        lm=lm,
        constraint=constraint,
        prompt=jnp.asarray([3], jnp.int32),
        max_length=7,
        max_step_tokens=3,
        proposal=q,
    )
