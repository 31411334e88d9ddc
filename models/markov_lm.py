r"""A Markov-chain "language model" on a tiny vocabulary: the exact test bed of LLM particle methods.

Tokens follow a first-order chain started from the last prompt token,
\(P(w_j = v \mid w_{j-1} = u) = P[u, v]\). Generation proceeds in *reasoning steps*: a step appends
tokens until it emits the delimiter or EOS, or has appended ``max_step_tokens`` tokens; a sequence
ends at EOS or when its buffer of ``max_length`` tokens (prompt included) is full.

A :class:`MarkovTestBed` specifies one constrained-generation problem: the chain \(P\), a
:class:`TokenConstraint` \(\Phi(w) = \sum_j \varphi(w_{j-1}, w_j) + \psi(\mathrm{answer}(w))\)
(per-token rewards or penalties, \(\varphi[:, k] = \lambda\); hard constraints,
\(\varphi[k, k] = -\infty\) "no \(k\) twice in a row"; \(\psi\) a reward on the answer, the last
non-EOS token), the prompt, the buffer and step sizes, and optionally a proposal chain \(Q\) that
draws the steps. Its target over complete sequences is

\[
\pi(w) \propto P(w \mid \mathrm{prompt}) \exp \Phi(w), \qquad Z = \mathbb{E}_P[\exp \Phi],
\]

known exactly by enumeration or a forward recursion (:mod:`models.markov_lm_exact`), whatever the
proposal and however the sequence is cut into steps.

The test bed is a *specification*, not a Feynman-Kac model: its Feynman-Kac model is the one LLM
model, :class:`~models.llm_fk.ssm.LLMFeynmanKac`, built by
:func:`models.llm_fk.markov.from_markov_model`, with the chain through
:class:`~models.llm_fk.step_lm.MarkovStepLM` and \(\Phi\) as a per-step
:class:`~models.llm_fk.rewards.TokenPairReward` with product aggregation and twisted weights, so
that

\[
\log G_t = \sum_{j \text{ new at step } t} [\varphi + \log P - \log Q] +
\mathbf{1}[\text{finished at } t]\, \psi.
\]

The same model runs the transformer; this module only holds the chain, the constraint and the
sequence helpers.

References: Lew, Zhi-Xuan, Grand & Mansinghka (2023), "Sequential Monte Carlo steering of large
language models using probabilistic programs"; Zhao, Brekelmans, Makhzani & Grosse (2024),
"Probabilistic inference in language models via twisted sequential Monte Carlo".
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

__all__ = [
    "PAD",
    "MarkovLM",
    "TokenConstraint",
    "MarkovTestBed",
    "markov_lm",
    "tempered",
    "power_test_bed",
    "token_constraint",
    "toy_test_bed",
    "generate_step",
    "last_token_answer",
    "token_count",
]

PAD = -1
r"""Token id of unused buffer slots (positions \(\ge\) ``length``)."""

S = TypeVar("S")


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or ``None`` when it is traced (value checks are then skipped)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


class MarkovLM(eqx.Module):
    r"""First-order Markov chain over \(V\) tokens: ``log_probs[u, v] = log P(next = v | previous = u)``.

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


def tempered(lm: MarkovLM, alpha: float) -> MarkovLM:
    r"""The chain sampled at temperature \(1/\alpha\): rows \(\propto P(u, \cdot)^\alpha\) (computed
    in float64). A sequence drawn from it has law \(\prod_j P(w_{j-1}, w_j)^\alpha / Z_{w_{j-1}}\), not
    \(P(w)^\alpha / Z\): the per-token normalisers \(Z_u = \sum_v P(u, v)^\alpha\) differ between
    prefixes."""
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    log_p = alpha * np.asarray(lm.log_probs, np.float64)
    m = np.max(log_p, axis=1, keepdims=True)
    log_q = log_p - (m + np.log(np.sum(np.exp(log_p - m), axis=1, keepdims=True)))
    return MarkovLM(jnp.asarray(log_q, jnp.float32), eos_id=lm.eos_id, delimiter_id=lm.delimiter_id,
                    token_names=lm.token_names)


class TokenConstraint(eqx.Module):
    r"""Sequence potential \(\exp \Phi(w)\),
    \(\Phi(w) = \sum_j \varphi(w_{j-1}, w_j) + \psi(\mathrm{answer}(w))\).

    ``log_pair[u, v] = φ(u, v)`` is charged for every generated token \(v\) following \(u\)
    (\(-\infty\) forbids the pair); ``log_final[a] = ψ(a)`` once, when the sequence finishes, with ``a`` its
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
    r"""Build a :class:`TokenConstraint`.

    Args:
        vocab_size: \(V\).
        token_log_reward: \(\lambda\) [V]: every generated token \(k\) multiplies the weight by
            \(\exp(\lambda_k)\) (so the sequence gets \(\exp(\sum_k \lambda_k\, \mathrm{count}_k)\)).
        forbid_repeat: tokens \(k\) that may not appear twice in a row (\(\varphi[k, k] = -\infty\);
            also forbids a first generated \(k\) after a prompt ending in \(k\)).
        answer_log_reward: \(\psi\) [V], added once for the final answer (last non-EOS token).
        pair_log_potential: an extra \(\varphi\) [V, V] added to the above.
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
# the test bed (a specification; its Feynman-Kac model: models.llm_fk.markov.from_markov_model)
# ------------------------------------------------------------------------------------------------


class MarkovTestBed(eqx.Module):
    r"""Constrained generation from a :class:`MarkovLM`: target
    \(\pi(w) \propto P(w \mid \mathrm{prompt}) \exp \Phi(w)\).

    Steps are drawn from ``proposal`` \(Q\) when given (importance-corrected by \(P/Q\)), else from ``lm``;
    a step ends at the delimiter or EOS or after ``max_step_tokens`` tokens; a sequence at EOS or
    when its ``max_length`` buffer (prompt included) is full. Not a Feynman-Kac model: build that
    with :func:`models.llm_fk.markov.from_markov_model`; the exact answers come from
    :mod:`models.markov_lm_exact`.
    """

    lm: MarkovLM
    constraint: TokenConstraint
    prompt: Int[Array, " P"]
    max_length: int = eqx.field(static=True)
    max_step_tokens: int = eqx.field(static=True)
    proposal: MarkovLM | None = None

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
        prompt = _concrete(self.prompt)
        if prompt is not None:
            if np.any(prompt < 0) or np.any(prompt >= v):
                raise ValueError(f"prompt tokens must lie in [0, {v}), got {prompt.tolist()}")
            if np.any(prompt == self.lm.eos_id):
                raise ValueError("the prompt must not contain EOS")

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


# ------------------------------------------------------------------------------------------------
# sequence functions (batched over the leading axis)
# ------------------------------------------------------------------------------------------------


def _token_at(tokens: Int[Array, "N L"], pos: Int[Array, " N"]) -> Int[Array, " N"]:
    pos = jnp.clip(pos, 0, tokens.shape[1] - 1)
    return jnp.take_along_axis(tokens, pos[:, None], axis=1)[:, 0]


def last_token_answer(
    tokens: Int[ArrayLike, "N L"], lengths: Int[ArrayLike, " N"], eos_id: int
) -> Int[Array, " N"]:
    """The answer of a sequence: its last non-EOS token (the last prompt token if it emitted EOS at
    once). For unfinished sequences: the last token so far."""
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    last = _token_at(tokens, lengths - 1)
    before = _token_at(tokens, lengths - 2)
    return jnp.where(last == eos_id, before, last).astype(jnp.int32)


def token_count(
    tokens: Int[ArrayLike, "N L"],
    lengths: Int[ArrayLike, " N"],
    token: int,
    prompt_lengths: int | Int[ArrayLike, " N"],
) -> Int[Array, " N"]:
    """Number of generated (non-prompt) occurrences of ``token``."""
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    lo = jnp.broadcast_to(jnp.asarray(prompt_lengths), lengths.shape)
    pos = jnp.arange(tokens.shape[1])
    span = (pos[None, :] >= lo[:, None]) & (pos[None, :] < lengths[:, None])
    return jnp.sum(span & (tokens == token), axis=1).astype(jnp.int32)


def generate_step(
    key: PRNGKeyArray,
    lm: MarkovLM,
    state: S,
    *,
    max_step_tokens: int,
    stop_at_eos: bool = True,
) -> S:
    """Append one reasoning step to every unfinished sequence of ``state``, any NamedTuple with
    ``tokens`` [N, L] (``PAD`` past the length), ``lengths`` [N] and ``done`` [N] (e.g.
    :class:`~models.llm_fk.step_lm.MarkovDecodeState`); the other fields are kept.

    Tokens are drawn from ``lm`` until the delimiter or EOS is emitted, ``max_step_tokens`` tokens
    were added, or the buffer is full (then the row is done; at EOS too). Finished sequences are
    returned unchanged. ``stop_at_eos=False`` keeps generating after EOS until the buffer is full
    (``ignore_eos`` of LLM servers; not a valid language-model law — to break absorption on purpose
    in tests).
    """
    tokens, length, done = state.tokens, state.lengths, state.done
    max_length = tokens.shape[1]
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
    return state._replace(tokens=tokens, lengths=length, done=done)


def power_test_bed(alpha: float, *, max_step_tokens: int = 3) -> MarkovTestBed:
    r"""The exact reference of the power target \(\pi_\alpha(w) \propto P(w)^\alpha\) on the toy chain
    of :func:`toy_test_bed` (no constraint): a test bed whose pair potential is
    \(\varphi = (\alpha - 1) \log P\), so that \(P(w) e^{\Phi(w)} = P(w)^\alpha\) over complete sequences
    (EOS or a full buffer), with steps drawn from the tempered chain (:func:`tempered`). Its
    :mod:`models.markov_lm_exact` answers are those of \(\pi_\alpha\)."""
    base = toy_test_bed(max_step_tokens=max_step_tokens)
    log_p = np.asarray(base.lm.log_probs, np.float64)
    v = log_p.shape[0]
    constraint = token_constraint(v, pair_log_potential=(alpha - 1.0) * log_p)
    return MarkovTestBed(lm=base.lm, constraint=constraint, prompt=base.prompt, max_length=base.max_length,
                         max_step_tokens=max_step_tokens, proposal=tempered(base.lm, alpha))


def toy_test_bed(*, proposal: bool = False, max_step_tokens: int = 3) -> MarkovTestBed:
    r"""The standard exact test bed: \(V = 5\) tokens ``a b c . <eos>``, prompt ``.``, at most 6
    generated tokens in steps of at most ``max_step_tokens`` (3) tokens ended by ``.``; the
    constraint rewards each ``a`` by \(e^{0.5}\), forbids ``b b`` and rewards the answers ``c``
    (\(e^{1.5}\)) and ``b`` (\(e^{-1}\)). There are 5461 complete sequences. ``proposal=True`` draws steps
    from a
    flatter chain (importance-corrected). Its Feynman-Kac model:
    :func:`models.llm_fk.markov.toy_reasoning_model`.
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
    return MarkovTestBed(
        lm=lm,
        constraint=constraint,
        prompt=jnp.asarray([3], jnp.int32),
        max_length=7,
        max_step_tokens=max_step_tokens,
        proposal=q,
    )
