r"""Exact answers for a :class:`~models.markov_lm.MarkovTestBed`: enumeration of all complete
sequences and a forward recursion, in float64 NumPy, independent of the JAX sampling code (the
test bed's Feynman-Kac model, :func:`models.llm_fk.markov.from_markov_model`).

The target over complete sequences \(w\) (generated after the prompt) is

\[
\begin{gathered}
\pi(w) = P(w \mid \mathrm{prompt}) \exp \Phi(w) / Z, \qquad
Z = \sum_w P(w \mid \mathrm{prompt}) \exp \Phi(w), \\
\Phi(w) = \sum_j \varphi(w_{j-1}, w_j) + \psi(\mathrm{answer}(w)),
\end{gathered}
\]

where a complete sequence ends with EOS or fills the buffer. With \(G\) generated positions and
\(V - 1\) non-EOS tokens there are \(\sum_{k<G} (V-1)^k + (V-1)^G\) of them (5461 for the toy
model).

The forward recursion carries \(\alpha_k(v)\) = the sum over non-finished prefixes of \(k\)
generated tokens ending in \(v\) of \(P \cdot \exp \sum \varphi\) — the standard forward algorithm
for a Markov chain — and collects the mass that finishes at each \(k\) by answer, giving \(Z\) and
the posterior of the last-token answer in \(O(G V^2)\).

Sampled sequences (the particles of the Feynman-Kac model, :class:`~models.llm_fk.ssm.LLMParticle`,
whose token buffers ``particles.lm.tokens`` have the same layout: prompt, tokens, ``PAD``) are
located in the enumeration by :func:`sequence_index`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple

import numpy as np
from jaxtyping import Array, Float, Int

from models.markov_lm import PAD, MarkovTestBed

__all__ = [
    "Sequences",
    "ExactPosterior",
    "enumerate_sequences",
    "exact_posterior",
    "exact_answer_posterior",
    "forward_answer_posterior",
    "sequence_index",
]


class Sequences(NamedTuple):
    """Complete sequences (NumPy arrays, S rows).

    Attributes:
        tokens: [S, L] prompt, generated tokens (the last one EOS unless the buffer is full), then
            ``PAD`` — the layout of the step LM's token buffer.
        lengths: [S] valid tokens, prompt included.
        num_steps: [S] reasoning steps the sequence is generated in.
    """

    tokens: Int[np.ndarray, "S L"]
    lengths: Int[np.ndarray, " S"]
    num_steps: Int[np.ndarray, " S"]


class ExactPosterior(NamedTuple):
    r"""Every complete sequence with its prior, potential and posterior probability (float64).

    Attributes:
        states: the :class:`Sequences` (S rows).
        log_prior: \(\log P(w \mid \mathrm{prompt})\), sums (in probability) to 1.
        log_potential: \(\Phi(w)\).
        log_evidence: \(\log Z\).
        probs: \(\pi(w)\).
    """

    states: Sequences
    log_prior: Float[np.ndarray, " S"]
    log_potential: Float[np.ndarray, " S"]
    log_evidence: float
    probs: Float[np.ndarray, " S"]


def _parameters(model: MarkovTestBed):
    log_p = np.asarray(model.lm.log_probs, np.float64)
    phi = np.asarray(model.constraint.log_pair, np.float64)
    psi = np.asarray(model.constraint.log_final, np.float64)
    prompt = np.asarray(model.prompt, np.int64)
    return log_p, phi, psi, prompt


def _segment_count(gen: np.ndarray, delim: int, eos: int, cap: int) -> int:
    steps, count, stop = 0, 0, True
    for tok in gen:
        if stop or count == cap:
            steps, count = steps + 1, 0
        count += 1
        stop = tok in (delim, eos)
    return steps


def enumerate_sequences(model: MarkovTestBed, max_sequences: int = 200_000) -> Sequences:
    """All complete sequences of the test bed (prompt included, padded)."""
    v, eos = model.lm.vocab_size, model.lm.eos_id
    p, max_length = model.prompt_length, model.max_length
    g = max_length - p
    non_eos = [k for k in range(v) if k != eos]
    count = sum(len(non_eos) ** k for k in range(g)) + len(non_eos) ** g
    if count > max_sequences:
        raise ValueError(
            f"{count} complete sequences exceed max_sequences={max_sequences}: make the vocabulary "
            "or max_length smaller"
        )
    prompt = np.asarray(model.prompt, np.int64)
    rows, lengths = [], []
    for k in range(1, g + 1):  # k - 1 non-EOS tokens, then EOS
        combos = list(itertools.product(non_eos, repeat=k - 1))
        body = np.array(combos, np.int64).reshape(len(combos), k - 1)
        rows.append(np.concatenate([body, np.full((len(body), 1), eos)], axis=1))
        lengths.append(np.full(len(body), p + k))
    combos = list(itertools.product(non_eos, repeat=g))
    full = np.array(combos, np.int64).reshape(len(combos), g)
    rows.append(full)
    lengths.append(np.full(len(full), max_length))
    tokens = np.full((count, max_length), PAD, np.int64)
    tokens[:, :p] = prompt
    i = 0
    for r in rows:
        tokens[i : i + len(r), p : p + r.shape[1]] = r
        i += len(r)
    length = np.concatenate(lengths)
    steps = np.array(
        [
            _segment_count(tokens[s, p : length[s]], model.lm.delimiter_id, eos,
                           model.max_step_tokens)
            for s in range(count)
        ]
    )
    return Sequences(tokens.astype(np.int32), length.astype(np.int32), steps.astype(np.int32))


def exact_posterior(model: MarkovTestBed, max_sequences: int = 200_000) -> ExactPosterior:
    """Enumerate the complete sequences and return the exact posterior and evidence."""
    log_p, phi, psi, prompt = _parameters(model)
    states = enumerate_sequences(model, max_sequences)
    tokens, length = states.tokens.astype(np.int64), states.lengths.astype(np.int64)
    p, eos = model.prompt_length, model.lm.eos_id
    pos = np.arange(1, model.max_length)
    mask = (pos[None, :] >= p) & (pos[None, :] < length[:, None])
    prev, cur = np.clip(tokens[:, :-1], 0, None), np.clip(tokens[:, 1:], 0, None)
    log_prior = np.where(mask, log_p[prev, cur], 0.0).sum(axis=1)
    rows = np.arange(len(length))
    last = tokens[rows, length - 1]
    answer = np.where(last == eos, tokens[rows, length - 2], last)
    log_pot = np.where(mask, phi[prev, cur], 0.0).sum(axis=1) + psi[answer]
    log_joint = log_prior + log_pot
    m = np.max(log_joint)
    if not np.isfinite(m):
        raise ValueError("every complete sequence has zero weight: Z = 0")
    log_z = float(m + np.log(np.sum(np.exp(log_joint - m))))
    return ExactPosterior(states, log_prior, log_pot, log_z, np.exp(log_joint - log_z))


def exact_answer_posterior(
    exact: ExactPosterior,
    answer_fn: Callable[[Sequences], Int[Array, " S"]],
    num_answers: int,
) -> Float[np.ndarray, " K"]:
    r"""\(\pi(\mathrm{answer} = k)\), \(k <\) ``num_answers``, for an integer answer function of the
    :class:`Sequences` (e.g. ``lambda s: token_count(s.tokens, s.lengths, 0, P)``)."""
    answers = np.asarray(answer_fn(exact.states)).astype(np.int64)
    if answers.shape != exact.probs.shape:
        raise ValueError(f"answer_fn must return one integer per sequence, got {answers.shape}")
    if answers.min() < 0 or answers.max() >= num_answers:
        raise ValueError(f"answers must lie in [0, {num_answers}), got [{answers.min()}, "
                         f"{answers.max()}]")
    return np.bincount(answers, weights=exact.probs, minlength=num_answers)


def forward_answer_posterior(model: MarkovTestBed) -> tuple[float, Float[np.ndarray, " V"]]:
    r"""Forward recursion: (\(\log Z\), posterior of the last-token answer [V]), without enumeration."""
    log_p, phi, psi, prompt = _parameters(model)
    eos = model.lm.eos_id
    g = model.max_length - model.prompt_length
    k_mat = np.exp(log_p + phi)  # one generated token: P[u, v] e^{φ(u, v)}
    final = np.exp(psi)
    alpha = np.zeros(len(final))
    alpha[prompt[-1]] = 1.0
    mass = np.zeros(len(final))
    for _ in range(g):
        mass += alpha * k_mat[:, eos] * final  # EOS now: the answer is the previous token
        alpha = alpha @ k_mat
        alpha[eos] = 0.0
    mass += alpha * final  # buffer full
    z = mass.sum()
    if not z > 0:
        raise ValueError("every complete sequence has zero weight: Z = 0")
    return float(np.log(z)), mass / z


def sequence_index(exact: ExactPosterior, sequences: Any) -> Int[np.ndarray, " N"]:
    """Row of each sequence in ``exact.states`` (matched on tokens; −1 if absent, e.g. an
    unfinished sequence or one with a wrongly placed EOS). ``sequences``: particles of the
    Feynman-Kac model (:class:`~models.llm_fk.ssm.LLMParticle`, tokens in ``.lm.tokens``), a
    decoding state or :class:`Sequences` (``.tokens``), or a token array [N, L]."""
    toks = getattr(sequences, "lm", sequences)
    toks = np.asarray(getattr(toks, "tokens", toks), np.int32)
    table = {row.tobytes(): i for i, row in enumerate(np.asarray(exact.states.tokens, np.int32))}
    return np.array([table.get(row.tobytes(), -1) for row in toks.reshape(-1, toks.shape[-1])],
                    np.int64)
