"""Search baselines (samplers.search) on the Markov-chain language model, against exact laws.

The model is the one LLM Feynman-Kac model (models.llm_fk.ssm.LLMFeynmanKac) of the Markov test bed
(models.llm_fk.markov.from_markov_model): its search score is log R_t = Φ of the prefix, and with
single-token steps it enumerates every next token (``expand_all``) for deterministic beam search.

Every stochastic check compares the method's output law over R independent runs (one compiled call,
``lax.map`` over the keys) with a law computed exactly from the enumeration of all 5461 complete sequences of
the toy model (models.markov_lm_exact), cell by cell with a multinomial standard error and a
Bonferroni-corrected z (family-wise level α = P(|N(0,1)| > 4)). Each check has a companion that
breaks the method (argmin instead of argmax, inverted vote weights, minority vote, ...) and asserts
that the same check rejects it. Deterministic beam search is checked for exact equality.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from jax.tree_util import Partial

from models.llm_fk.markov import from_markov_model
from models.markov_lm import PAD, markov_lm, toy_test_bed
from models.markov_lm_exact import exact_posterior, sequence_index
from samplers.search import (
    SearchAdapter,
    beam_search,
    best_of_n,
    dvts,
    self_consistency,
    weighted_best_of_n,
)
from samplers.search import base

Z_SCORE = 4.0
ALPHA = 2 * scipy.stats.norm.sf(Z_SCORE)  # family-wise level of every law check
EOS = 4


# ------------------------------------------------------------------------------------------------
# exact laws (float64 NumPy, independent of the JAX code)
# ------------------------------------------------------------------------------------------------


def argmax_law(p, s, n):
    """P(item i is the first maximiser of s among n i.i.d. draws from p).

    The maximum score equals v with probability F(v)^n − F(v⁻)^n (F the CDF of s(X)); given that,
    the first draw scoring v is a draw conditioned on s = v (exchangeability), so item i has
    probability p_i / P(s = v) within its tie group."""
    values, group = np.unique(s, return_inverse=True)  # −inf sorts first
    mass = np.bincount(group, weights=p, minlength=len(values))
    cdf = np.minimum(np.cumsum(mass), 1.0)
    p_max = cdf**n - np.maximum(cdf - mass, 0.0) ** n
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(mass[group] > 0, p / mass[group], 0.0)
    return p_max[group] * share


def compositions(n, k):
    """Every vector of k non-negative counts summing to n, [C(n+k−1, k−1), k]."""
    counts = np.zeros((1, 0), np.int64)
    used = np.zeros(1, np.int64)
    for _ in range(k - 1):
        reps = n - used + 1  # the next count takes 0, ..., n − used
        row = np.repeat(np.arange(len(counts)), reps)
        nxt = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        counts = np.concatenate([counts[row], nxt[:, None]], axis=1)
        used = used[row] + nxt
    return np.concatenate([counts, (n - used)[:, None]], axis=1)


def vote_law(cat_probs, cat_answers, cat_weights, n, num_answers):
    """Law of the winner of a weighted vote over n i.i.d. draws from categories (answer, weight).

    Enumerates the multisets of n categories (multinomial probabilities); answer a totals
    W_a = Σ n_c w_c over its categories; the winner is the answer of the earliest draw among the
    answers of maximal total, i.e. answer a with probability n_a / Σ_{b tied} n_b."""
    counts = compositions(n, len(cat_probs))
    log_coef = scipy.special.gammaln(n + 1) - scipy.special.gammaln(counts + 1).sum(1)
    with np.errstate(divide="ignore"):
        log_p = log_coef + (counts * np.log(cat_probs)).sum(1, where=counts > 0)
    onehot = np.eye(num_answers)[cat_answers]  # [k, A]
    votes = counts @ onehot  # n_a
    totals = (counts * cat_weights) @ onehot  # W_a
    best = totals.max(1, keepdims=True)
    tied = (votes > 0) & (totals >= best - 1e-9 * np.maximum(best, 1e-300))
    share = np.where(tied, votes, 0.0) / np.where(tied, votes, 0.0).sum(1, keepdims=True)
    return np.exp(log_p) @ share


def law_check(sampled_cells, cell_probs):
    """|p̂_c − p_c| ≤ z se_c for every cell (se_c = sqrt(p_c(1−p_c)/R), z Bonferroni over the
    cells of positive probability at level ALPHA); cells of probability 0 must stay empty and
    unknown cells (−1) fail. Returns (passed, TV distance, max standardised deviation)."""
    r = sampled_cells.size
    if np.any(sampled_cells < 0):
        return False, 1.0, np.inf
    freq = np.bincount(sampled_cells, minlength=cell_probs.size) / r
    support = cell_probs > 0
    z = scipy.stats.norm.isf(ALPHA / 2 / support.sum())
    se = np.sqrt(cell_probs * (1 - cell_probs) / r)
    dev = np.abs(freq - cell_probs)
    ok = bool(np.all(dev <= z * se + 1e-12))
    return ok, 0.5 * dev.sum(), float(np.max(dev / np.maximum(se, 1e-12)))


class Cells:
    """Integer cell ids of (answer, score) pairs, for comparing laws of selected sequences."""

    def __init__(self, answers, scores):
        keys = list(zip(np.asarray(answers).tolist(), np.asarray(scores, np.float64).tolist()))
        self.index = {kk: i for i, kk in enumerate(sorted(set(keys)))}
        self.of_exact = np.array([self.index[kk] for kk in keys])

    def probs(self, row_probs):
        return np.bincount(self.of_exact, weights=row_probs, minlength=len(self.index))

    def of_tokens(self, exact, tokens):
        """Cells of sequences given by their token buffers [M, L] (−1: not a complete one)."""
        table = {row.tobytes(): i for i, row in enumerate(np.asarray(exact.states.tokens,
                                                                      np.int32))}
        idx = np.array([table.get(row.tobytes(), -1) for row in np.asarray(tokens, np.int32)])
        return np.where(idx >= 0, self.of_exact[idx], -1)


def _tokens_of(result, which=None):
    """Token buffers of the selected particle of each run ([R, L]) or, with which="all", of every
    final particle ([R·P, L])."""
    tok = np.asarray(result.particles.lm.tokens)
    if which == "all":
        tok = tok.reshape(-1, tok.shape[-1])
    else:
        tok = tok[np.arange(tok.shape[0]), np.asarray(result.selected)]
    return tok


def _answers_of(states):
    tok, length = np.asarray(states.tokens), np.asarray(states.lengths)
    rows = np.arange(len(length))
    last = tok[rows, length - 1]
    return np.where(last == EOS, tok[rows, length - 2], last)


def _generated(particles, prompt_length):
    """Generated tokens counted from the buffers (independently of ``num_tokens``)."""
    return (np.asarray(particles.lm.tokens)[..., prompt_length:] != PAD).sum(-1)


# ------------------------------------------------------------------------------------------------
# models and fixtures
# ------------------------------------------------------------------------------------------------


def _token_bed(bed):
    """The toy test bed with single-token steps (so ``expand_all`` enumerates the V next tokens)."""
    return dataclasses.replace(bed, max_step_tokens=1)


def _vote_bed(bed):
    """The toy test bed with a chain whose answer law has a clear mode (c: 0.375) for voting."""
    row = [0.20, 0.15, 0.35, 0.15, 0.15]
    probs = np.array([row, row, row, [0.25, 0.20, 0.35, 0.10, 0.10], [0.2] * 5])
    return dataclasses.replace(bed, lm=markov_lm(probs, eos_id=EOS, delimiter_id=3))


def _signed_score(sign, model, states):
    return sign * model.score(states)


def _signed(model, sign):
    """The model's own reward times ``sign`` (a traced leaf: −1 turns argmax into argmin without
    recompiling)."""
    return SearchAdapter(model, score_fn=Partial(_signed_score, jnp.float32(sign)))


@pytest.fixture(scope="module")
def bed():
    return toy_test_bed()


@pytest.fixture(scope="module")
def toy(bed):
    """The test bed's Feynman-Kac model (an LLMFeynmanKac)."""
    return from_markov_model(bed)


@pytest.fixture(scope="module")
def exact(bed):
    return exact_posterior(bed)


@pytest.fixture(scope="module")
def rows(bed, exact):
    """Per complete sequence: prior probability, Φ, answer, generated tokens (as a tuple)."""
    prior = np.exp(exact.log_prior)
    answers = _answers_of(exact.states)
    p = bed.prompt_length
    tok, length = exact.states.tokens, exact.states.lengths
    keys = [tuple(tok[i, p:length[i]].tolist()) for i in range(len(length))]
    return dict(prior=prior, phi=exact.log_potential, answer=answers, key=keys, exact=exact)


@eqx.filter_jit
def _mapped(method, keys, model, static):
    # lax.map (a scan over runs) compiles about twice faster than vmap here; runs are tiny
    return jax.lax.map(lambda k: method(k, model, *static), keys)


def _runs(method, key, model, runs, *static, fresh=False):
    """``runs`` independent runs in one compiled call (``fresh``: retrace, e.g. after a test
    replaced a helper of the method)."""
    fn = eqx.filter_jit(lambda *a: _mapped.__wrapped__(*a)) if fresh else _mapped
    out = fn(method, jax.random.split(key, runs), model, static)
    return jax.tree.map(np.asarray, out)


# ------------------------------------------------------------------------------------------------
# best-of-N
# ------------------------------------------------------------------------------------------------

BON_N, BON_R = 8, 2000


@pytest.fixture(scope="module")
def bon_runs(toy):
    good = _runs(best_of_n, jax.random.key(1), _signed(toy, 1.0), BON_R, BON_N)
    argmin = _runs(best_of_n, jax.random.key(2), _signed(toy, -1.0), BON_R, BON_N)
    return good, argmin


def _bon_check(result, rows):
    cells = Cells(rows["answer"], rows["phi"])
    exact_law = cells.probs(argmax_law(rows["prior"], rows["phi"], BON_N))
    return law_check(cells.of_tokens(rows["exact"], _tokens_of(result)), exact_law)


def test_best_of_n_law_is_argmax_of_n(bon_runs, rows, toy):
    """The selected (answer, Φ) follows the exact argmax-of-N law of the LM's sequence law."""
    good, _ = bon_runs
    ok, tv, zmax = _bon_check(good, rows)
    assert ok, (tv, zmax)
    idx = sequence_index(rows["exact"], _tokens_of(good))
    np.testing.assert_array_equal(good.scores[np.arange(BON_R), good.selected], rows["phi"][idx])
    assert not good.reached_max_steps.any() and (good.num_nan_scores == 0).all()
    assert np.all(good.answer == good.answers[np.arange(BON_R), good.selected])
    # exact compute: every generated token counted once, one reward call per sample
    gen = _generated(good.particles, toy.prompt_length).sum(1)
    np.testing.assert_array_equal(good.compute.tokens_generated, gen)
    np.testing.assert_array_equal(good.compute.reward_calls, BON_N)
    assert np.all(np.isnan(good.compute.wall_time_s))  # not timed under a transformation


def test_best_of_n_check_rejects_argmin(bon_runs, rows):
    _, argmin = bon_runs
    ok, tv, _ = _bon_check(argmin, rows)
    assert not ok and tv > 0.3


# ------------------------------------------------------------------------------------------------
# weighted best-of-N
# ------------------------------------------------------------------------------------------------

WBON_N, WBON_R = 4, 3000


@pytest.fixture(scope="module")
def wbon_runs(toy):
    good = _runs(weighted_best_of_n, jax.random.key(3), _signed(toy, 1.0), WBON_R, WBON_N)
    inverted = _runs(weighted_best_of_n, jax.random.key(4), _signed(toy, -1.0), WBON_R, WBON_N)
    return good, inverted


def _wbon_check(result, rows):
    cells = Cells(rows["answer"], rows["phi"])
    cat = np.array(sorted(cells.index, key=cells.index.get), dtype=np.float64)
    law = vote_law(cells.probs(rows["prior"]), cat[:, 0].astype(int), np.exp(cat[:, 1]),
                   WBON_N, 5)
    return law_check(result.answer, law)


def test_weighted_best_of_n_law(wbon_runs, rows, toy):
    """The winner of the exp(Φ)-weighted vote over N = 4 samples follows the exact law computed
    over all multisets of 4 (answer, Φ) categories."""
    good, _ = wbon_runs
    ok, tv, zmax = _wbon_check(good, rows)
    assert ok, (tv, zmax)
    # the selected particle carries the winning answer and is its best-scored one
    r = np.arange(WBON_R)
    assert np.all(good.answers[r, good.selected] == good.answer)
    best_same = np.where(good.answers == good.answer[:, None], good.scores, -np.inf).max(1)
    finite = np.isfinite(best_same)
    np.testing.assert_array_equal(good.scores[r, good.selected][finite], best_same[finite])
    gen = _generated(good.particles, toy.prompt_length).sum(1)
    np.testing.assert_array_equal(good.compute.tokens_generated, gen)
    np.testing.assert_array_equal(good.compute.reward_calls, WBON_N)


def test_weighted_best_of_n_check_rejects_inverted_weights(wbon_runs, rows):
    _, inverted = wbon_runs
    ok, tv, _ = _wbon_check(inverted, rows)
    assert not ok and tv > 0.1


# ------------------------------------------------------------------------------------------------
# self-consistency
# ------------------------------------------------------------------------------------------------

SC_N, SC_R = 9, 3000


@pytest.fixture(scope="module")
def vote_bed(bed):
    return _vote_bed(bed)


@pytest.fixture(scope="module")
def vote_model(vote_bed):
    return from_markov_model(vote_bed)


@pytest.fixture(scope="module")
def vote_answer_law(vote_bed):
    ex = exact_posterior(vote_bed)
    law = np.bincount(_answers_of(ex.states), weights=np.exp(ex.log_prior), minlength=5)
    return law[:4]  # EOS is never an answer


def _sc_law(answer_law, n):
    return vote_law(answer_law, np.arange(4), np.ones(4), n, 4)


def test_self_consistency_converges_to_the_mode(vote_answer_law):
    """Exact: P(majority vote = mode) increases to 1 with N (here from 0.375 to > 0.97)."""
    mode = int(np.argmax(vote_answer_law))
    p_mode = [_sc_law(vote_answer_law, n)[mode] for n in (1, 5, 17, 64, 128)]
    np.testing.assert_allclose(p_mode[0], vote_answer_law[mode], atol=1e-12)
    assert np.all(np.diff(p_mode) > 0) and p_mode[-1] > 0.97, p_mode


def test_self_consistency_law(vote_model, vote_answer_law):
    """The voted answer follows the exact law of the majority of N multinomial draws (ties split
    in proportion to the tied counts)."""
    res = _runs(self_consistency, jax.random.key(5), vote_model, SC_R, SC_N)
    ok, tv, zmax = law_check(res.answer, _sc_law(vote_answer_law, SC_N))
    assert ok, (tv, zmax)
    counts = (res.answers[:, :, None] == np.arange(4)).sum(1)
    np.testing.assert_array_equal(counts[np.arange(SC_R), res.answer], counts.max(1))
    np.testing.assert_array_equal(res.compute.reward_calls, 0)
    assert np.all(np.isnan(res.scores))
    gen = _generated(res.particles, vote_model.prompt_length).sum(1)
    np.testing.assert_array_equal(res.compute.tokens_generated, gen)


def _minority_vote(answers, weights):
    same = answers[:, None] == answers[None, :]
    totals = jnp.sum(jnp.where(same, weights[None, :], 0.0), axis=1)
    return jnp.argmin(totals).astype(jnp.int32), totals


def test_self_consistency_check_rejects_minority_vote(vote_model, vote_answer_law, monkeypatch):
    monkeypatch.setattr(base, "vote", _minority_vote)
    res = _runs(self_consistency, jax.random.key(11), vote_model, SC_R, SC_N, fresh=True)
    ok, tv, _ = law_check(res.answer, _sc_law(vote_answer_law, SC_N))
    assert not ok and tv > 0.1


# ------------------------------------------------------------------------------------------------
# DVTS and sampled beam search (single-token steps)
# ------------------------------------------------------------------------------------------------

DVTS_S, DVTS_M, DVTS_R = 4, 3, 2000


@pytest.fixture(scope="module")
def token_bed(bed):
    return _token_bed(bed)


@pytest.fixture(scope="module")
def token_model(token_bed):
    return from_markov_model(token_bed)


def beam1_law(bed, rows, m):
    """Exact law of the final beam of a one-beam search with m sampled children per step (greedy
    by the model's score, cumulative Φ), by recursion over the tree of prefixes: each step selects
    child v of the beam with the argmax-of-m probability among the V children."""
    log_p = np.asarray(bed.lm.log_probs, np.float64)
    phi = np.asarray(bed.constraint.log_pair, np.float64)
    psi = np.asarray(bed.constraint.log_final, np.float64)
    horizon = bed.max_length - bed.prompt_length
    v_all = np.arange(log_p.shape[0])
    law = {}

    def rec(prefix, last, cum, prob):
        done = (v_all == EOS) | (len(prefix) + 1 == horizon)
        answer = np.where(v_all == EOS, last, v_all)
        scores = cum + phi[last] + np.where(done, psi[answer], 0.0)
        select = argmax_law(np.exp(log_p[last]), scores, m)
        for v in v_all[select > 0]:
            if done[v]:
                key = prefix + (int(v),)
                law[key] = law.get(key, 0.0) + prob * select[v]
            else:
                rec(prefix + (int(v),), v, scores[v], prob * select[v])

    rec((), int(bed.prompt[-1]), 0.0, 1.0)
    return np.array([law.get(k, 0.0) for k in rows["key"]])


@pytest.fixture(scope="module")
def dvts_runs(token_model):
    good = _runs(dvts, jax.random.key(12), _signed(token_model, 1.0), DVTS_R, DVTS_S, DVTS_M)
    argmin = _runs(dvts, jax.random.key(13), _signed(token_model, -1.0), DVTS_R, DVTS_S, DVTS_M)
    return good, argmin


def _dvts_checks(result, rows, subtree_law):
    cells = Cells(rows["answer"], rows["phi"])
    sel = law_check(cells.of_tokens(rows["exact"], _tokens_of(result)),
                    cells.probs(argmax_law(subtree_law, rows["phi"], DVTS_S)))
    pooled = law_check(cells.of_tokens(rows["exact"], _tokens_of(result, "all")),
                       cells.probs(subtree_law))
    return sel, pooled


def test_dvts_subtrees_and_selection_follow_exact_laws(dvts_runs, rows, token_bed, token_model):
    """Each of the S subtrees (one beam, M sampled children per step) ends in the exact law of a
    one-beam search; the S subtrees are i.i.d., so DVTS's choice follows the argmax-of-S law."""
    good, _ = dvts_runs
    q = beam1_law(token_bed, rows, DVTS_M)
    np.testing.assert_allclose(q.sum(), 1.0, atol=1e-6)  # float32 chain
    (ok_sel, tv_sel, z_sel), (ok_pool, tv_pool, z_pool) = _dvts_checks(good, rows, q)
    assert ok_sel, (tv_sel, z_sel)
    assert ok_pool, (tv_pool, z_pool)
    assert good.valid.all() and good.particles.done.all() and not good.reached_max_steps.any()
    # exact compute: single-token steps, one beam per subtree, so each subtree generated M
    # one-token candidates per token of its final beam, each scored once
    gen = _generated(good.particles, token_model.prompt_length).sum(1)
    np.testing.assert_array_equal(good.compute.tokens_generated, DVTS_M * gen)
    np.testing.assert_array_equal(good.compute.reward_calls, DVTS_M * gen)


def test_dvts_checks_reject_argmin(dvts_runs, rows, token_bed):
    _, argmin = dvts_runs
    q = beam1_law(token_bed, rows, DVTS_M)
    (ok_sel, tv_sel, _), (ok_pool, tv_pool, _) = _dvts_checks(argmin, rows, q)
    assert not ok_sel and not ok_pool and tv_sel > 0.3 and tv_pool > 0.3


# ------------------------------------------------------------------------------------------------
# deterministic beam search (expand_all) against the enumeration
# ------------------------------------------------------------------------------------------------


@eqx.filter_jit
def _expand_vs_move(model, key):
    """Particles after 2 sampled steps (some finished), their children by ``expand_all``, and a
    third sampled step."""
    k0, k1, k2 = jax.random.split(key, 3)
    parents = model.move(k1, jnp.asarray(1), model.init(k0, 64))
    children, log_probs = model.expand_all(parents)
    return parents, children, log_probs, model.move(k2, jnp.asarray(2), parents)


def test_expand_all_children_are_real_steps(token_model, token_bed):
    """The child of ``expand_all`` for the token a sampled step drew is that sampled particle, leaf
    by leaf (tokens, lengths, done, step count, reward, per-step records); children of finished
    particles are the particle; the log-probabilities are the chain's next-token row."""
    parents, children, log_probs, moved = jax.tree.map(
        np.asarray, _expand_vs_move(token_model, jax.random.key(4)))
    v = token_model.num_children
    n = parents.done.shape[0]
    assert v == 5 and 0 < parents.done.sum() < n  # both kinds of parents
    length = parents.lm.lengths
    drawn = np.where(parents.done, 0, moved.lm.tokens[np.arange(n), np.minimum(length, 6)])
    pick = np.arange(n) * v + drawn
    for c, m in zip(jax.tree.leaves(children), jax.tree.leaves(moved)):
        np.testing.assert_allclose(c[pick].astype(np.float64), m.astype(np.float64), atol=1e-6)
    last = parents.lm.tokens[np.arange(n), length - 1]
    np.testing.assert_allclose(log_probs, np.asarray(token_bed.lm.log_probs)[last], atol=1e-6)
    for c, p in zip(jax.tree.leaves(children), jax.tree.leaves(parents)):  # finished: unchanged
        np.testing.assert_array_equal(c.reshape((n, v) + c.shape[1:])[parents.done],
                                      np.repeat(p[parents.done][:, None], v, axis=1))


def _joint_score(params, model, particles):
    """sign · (J(prefix) + oracle · V*(prefix)): J = log P + Φ so far (the LM log-probabilities of
    the steps taken, recorded by the particle, plus the model's log R = Φ so far); V* the exact
    best J-gain of any completion (0 when finished)."""
    sign, oracle, to_go = params
    s = particles.lm
    j = jnp.sum(particles.hist_logprob, axis=1) + particles.log_reward
    k = model.num_tokens(particles)
    last = jnp.take_along_axis(s.tokens, (s.lengths - 1)[:, None], axis=1)[:, 0]
    return sign * (j + oracle * jnp.where(particles.done, 0.0, to_go[k, jnp.clip(last, 0)]))


def value_to_go(bed):
    """W[k, u] = max over completions of a prefix with k generated tokens ending in u of the
    J-gain (max-product backward recursion): W[G, u] = ψ(u) and, for k < G,
    W[k, u] = max(s(u, EOS) + ψ(u), max_{v ≠ EOS} s(u, v) + W[k+1, v]), s = log P + φ."""
    s = np.asarray(bed.lm.log_probs, np.float64) + np.asarray(bed.constraint.log_pair, np.float64)
    psi = np.asarray(bed.constraint.log_final, np.float64)
    horizon = bed.max_length - bed.prompt_length
    w = np.zeros((horizon + 1, len(psi)))
    w[horizon] = psi
    for k in range(horizon - 1, -1, -1):
        cont = s + w[k + 1][None, :]
        cont[:, EOS] = s[:, EOS] + psi
        w[k] = cont.max(1)
    return w


def _joint(model, bed, sign=1.0, oracle=0.0, nan_at=None):
    to_go = value_to_go(bed)
    if nan_at is not None:
        to_go[nan_at] = np.nan
    params = (jnp.float32(sign), jnp.float32(oracle), jnp.asarray(to_go, jnp.float32))
    return SearchAdapter(model, score_fn=Partial(_joint_score, params))


@pytest.fixture(scope="module")
def exact_j(token_bed):
    ex = exact_posterior(token_bed)
    return ex, ex.log_prior + ex.log_potential


def _top_check(result, ex, j):
    """The selected beam is the unique J-maximiser of the enumeration."""
    order = np.argsort(-j)
    assert j[order[0]] - j[order[1]] > 1e-3  # unique maximiser: an exact target
    chosen = jax.tree.map(lambda x: np.asarray(x)[None], result.selected_particle())
    idx = sequence_index(ex, chosen)
    return int(idx[0]) == int(order[0])


def test_exhaustive_beam_search_ranks_every_sequence(token_model, token_bed, exact_j):
    """Provably exact: with single-token steps enumerated by ``expand_all`` and K = 5461 beams,
    nothing is ever pruned — every candidate at a step is a distinct prefix (finished beams are kept
    once), each extends to a distinct complete sequence, so there are at most 5461 of them. The
    final beams are then all complete sequences ranked by J = log P + Φ, and the selection is the
    exact MAP sequence of the target π ∝ P e^Φ. Compute: one token and one reward call per node of
    the prefix tree, 5 · (1 + 4 + ... + 4^5) = 6825."""
    ex, j = exact_j
    k = len(j)
    res = beam_search(None, _joint(token_model, token_bed), k, None)
    idx = sequence_index(ex, res.particles)
    assert res.valid.all() and res.particles.done.all()
    np.testing.assert_array_equal(np.sort(idx), np.arange(k))  # every sequence, once
    scores = np.asarray(res.scores, np.float64)
    finite = np.isfinite(j[idx])
    np.testing.assert_array_equal(np.isfinite(scores), finite)
    np.testing.assert_allclose(scores[finite], j[idx][finite], atol=1e-4)
    assert np.all(np.diff(scores[finite]) <= 1e-4)  # best first
    assert _top_check(res, ex, j)
    assert int(res.compute.tokens_generated) == 6825 == int(res.compute.reward_calls)
    assert int(res.compute.num_steps) == token_model.max_num_steps
    # broken (argmin): same program, the check rejects the selection
    bad = beam_search(None, _joint(token_model, token_bed, sign=-1.0), k, None)
    assert not _top_check(bad, ex, j)


@pytest.fixture(scope="module")
def oracle_runs(token_model, token_bed):
    """One compiled program (K = 1, expand_all) serves the four searches: only traced leaves of
    the score differ."""
    m, b = token_model, token_bed
    oracle = _joint(m, b, oracle=1.0)
    return dict(
        beam=beam_search(None, oracle, 1, None),
        dvts=dvts(None, oracle, 1, None),
        greedy=beam_search(None, _joint(m, b), 1, None),
        argmin=beam_search(None, _joint(m, b, sign=-1.0, oracle=1.0), 1, None),
        nan=beam_search(None, _joint(m, b, oracle=1.0, nan_at=(1, 2)), 1, None),
    )


def test_oracle_beam_search_is_exact_with_one_beam(oracle_runs, token_model, exact_j):
    """Provably exact: scoring a prefix by J so far plus the exact best J-gain of its completions
    (an oracle PRM, by a max-product backward recursion over (length, last token), valid because
    the chain is Markov and Φ sums pair terms plus a last-token reward), the best child always lies
    on an optimal path, so even one beam returns the MAP sequence. Plain greedy search (no oracle)
    does not, and neither does the argmin-broken search: the check rejects both."""
    ex, j = exact_j
    res = oracle_runs["beam"]
    assert _top_check(res, ex, j)
    np.testing.assert_allclose(float(res.scores[res.selected]), j.max(), atol=1e-4)
    greedy = oracle_runs["greedy"]
    assert not _top_check(greedy, ex, j)
    # expand_all with one beam: V children scored per step while the beam is unfinished
    steps = int(token_model.num_tokens(jax.tree.map(lambda x: x[None], res.selected_particle()))[0])
    assert int(res.compute.reward_calls) == 5 * steps == int(res.compute.tokens_generated)
    assert not _top_check(oracle_runs["argmin"], ex, j)


def test_nan_scores_are_counted_and_never_selected(oracle_runs):
    """A NaN reward (here for the prefix "c", the start of the MAP sequence ". c <eos>") is
    counted and ranks as −inf: the search then takes another path."""
    res = oracle_runs["nan"]
    assert int(res.num_nan_scores) == 1 and int(oracle_runs["beam"].num_nan_scores) == 0
    assert int(oracle_runs["beam"].particles.lm.tokens[0, 1]) == 2
    assert int(res.particles.lm.tokens[0, 1]) != 2 and np.isfinite(float(res.scores[0]))


def test_dvts_with_one_subtree_is_beam_search(oracle_runs):
    """DVTS with a single subtree is beam search (same budget and score: identical results); the
    public calls are timed, and the second one reuses the compiled program."""
    a, b = oracle_runs["beam"], oracle_runs["dvts"]
    for x, y in zip(jax.tree.leaves((a.particles, a.scores, a.selected, a.answer)),
                    jax.tree.leaves((b.particles, b.scores, b.selected, b.answer))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a.compute.tokens_generated) == int(b.compute.tokens_generated)
    assert int(a.compute.reward_calls) == int(b.compute.reward_calls)
    for r in (a, b):
        assert np.isfinite(float(r.compute.wall_time_s)) and float(r.compute.wall_time_s) > 0
    assert float(b.compute.compile_time_s) < 0.5  # cached


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors(toy, token_model, no_shape_checks):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_particles"):
        best_of_n(key, toy, 0)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(key, toy, 0, 2)
    with pytest.raises(ValueError, match="expansions"):
        dvts(key, toy, 2, 0)
    with pytest.raises(ValueError, match="single-token steps"):
        beam_search(key, toy, 2, None)  # expand_all needs single-token steps
    with pytest.raises(ValueError, match="max_steps"):
        self_consistency(key, toy, 4, max_steps=0)
    with pytest.raises(TypeError, match="lacks"):
        best_of_n(key, object(), 4)
    # a model without the search methods can be wrapped
    wrapped = SearchAdapter(toy, score_fn=lambda m, s: m.score(s))
    base.check_search_model(wrapped)
    assert wrapped.max_num_steps == toy.max_num_steps
