"""Batched decoding: cache consistency, stopping, done flags, resampling gathers, sampling laws."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llm import (
    ModelConfig,
    Sampling,
    decode_step,
    extend,
    forward_logits,
    generate_until,
    init_random,
    next_token_logprobs,
    reorder,
    sample_tokens,
    start,
)

CFG = ModelConfig(arch="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                  eos_token_ids=(7,))
PROMPTS = [[5, 9, 11, 200, 17], [3, 4], [100, 101, 102, 103, 104, 105, 106, 107, 108]]
N = 12


@pytest.fixture(scope="module")
def model():
    # Large weights so greedy paths are decisive and distributions far from uniform.
    return init_random(CFG, jax.random.key(3), scale=0.35)


def _full(model, seqs):
    L = max(map(len, seqs))
    arr = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
        arr[i, : len(s)] = s
    return np.asarray(forward_logits(model, jnp.asarray(arr)))


def _greedy(model, prompts=PROMPTS, n=N, **kw):
    state = start(model, prompts, n)
    return generate_until(model, state, jax.random.key(0), max_new_tokens=n, sampling=Sampling(0.0),
                          eos_ids=kw.pop("eos_ids", ()), **kw)


def test_state_leaves_have_batch_axis(model):
    state = start(model, PROMPTS, N)
    for leaf in jax.tree.leaves(state):
        assert leaf.shape[0] == len(PROMPTS)
    assert state.max_len % 64 == 0 and state.max_len >= 9 + N


def test_incremental_decoding_matches_full_forward(model):
    state, out = _greedy(model)
    toks = np.asarray(out.tokens)
    assert (np.asarray(out.num_tokens) == N).all() and (toks >= 0).all()
    seqs = [p + toks[i].tolist() for i, p in enumerate(PROMPTS)]
    full = _full(model, seqs)
    logp_full = jax.nn.log_softmax(full, axis=-1)
    for i, p in enumerate(PROMPTS):
        positions = np.arange(len(p) - 1, len(p) - 1 + N)
        # each generated token is the argmax of the full-sequence logits before it
        np.testing.assert_array_equal(full[i, positions].argmax(-1), toks[i])
        np.testing.assert_allclose(np.asarray(out.logprobs)[i], logp_full[i, positions, toks[i]], atol=2e-5)
        np.testing.assert_allclose(np.asarray(state.logits)[i], full[i, len(seqs[i]) - 1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state.logprob), np.asarray(out.logprob), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.lengths), [len(s) for s in seqs])
    for i, s in enumerate(seqs):
        assert np.asarray(state.tokens)[i, : len(s)].tolist() == s


def test_extend_scores_forced_tokens(model):
    state = start(model, PROMPTS, N)
    forced = np.array([[1, 2, 3], [4, 5, 0], [6, 0, 0]], np.int32)
    n = np.array([3, 2, 1], np.int32)
    state, lp = extend(model, state, jnp.asarray(forced), jnp.asarray(n), return_logprobs=True)
    seqs = [p + forced[i, : n[i]].tolist() for i, p in enumerate(PROMPTS)]
    logp_full = np.asarray(jax.nn.log_softmax(_full(model, seqs), axis=-1))
    for i, p in enumerate(PROMPTS):
        for j in range(n[i]):
            assert abs(float(lp[i, j]) - logp_full[i, len(p) - 1 + j, forced[i, j]]) < 2e-5
    np.testing.assert_allclose(np.asarray(next_token_logprobs(state))[:, :],
                               np.stack([logp_full[i, len(s) - 1] for i, s in enumerate(seqs)]), atol=2e-5)


def test_stop_tokens_end_the_step_and_eos_ends_the_row(model):
    _, ref = _greedy(model)
    ref = np.asarray(ref.tokens)
    stop = int(ref[0, 3])  # row 0 stops at the first occurrence of this token
    eos = int(ref[1, 5])  # row 1 emits "EOS" there
    state, out = _greedy(model, stop_ids=[stop], eos_ids=[eos])
    toks, num = np.asarray(out.tokens), np.asarray(out.num_tokens)
    for i in range(3):
        hits = [j for j, t in enumerate(ref[i]) if t in (stop, eos)]
        expect = hits[0] + 1 if hits else N
        assert num[i] == expect
        assert toks[i, :expect].tolist() == ref[i, :expect].tolist()
        assert (toks[i, expect:] == -1).all()
        assert bool(out.stopped[i]) == bool(hits)
        assert bool(state.done[i]) == (bool(hits) and ref[i, hits[0]] == eos)
    # A done row produces nothing more; other rows go on from where they stopped.
    lengths = np.asarray(state.lengths).copy()
    done = np.asarray(state.done).copy()
    state, out2 = generate_until(model, state, jax.random.key(1), max_new_tokens=4, eos_ids=[eos],
                                 sampling=Sampling(0.0))
    num2 = np.asarray(out2.num_tokens)
    assert (num2[done] == 0).all() and (num2[~done] > 0).all()
    np.testing.assert_array_equal(np.asarray(state.lengths), lengths + num2)


def test_reorder_is_a_resampling_gather(model):
    state, _ = _greedy(model, n=4)
    anc = jnp.array([2, 2, 0])
    moved = reorder(jax.tree.map(jnp.copy, state), anc)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[np.asarray(anc)])
    # Decoding on from the gathered state equals decoding on from the ancestors themselves.
    key = jax.random.key(5)
    after_moved, t1, _ = decode_step(model, moved, key, Sampling(0.0), eos_ids=())
    after_orig, t0, _ = decode_step(model, state, key, Sampling(0.0), eos_ids=())
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t0)[np.asarray(anc)])
    np.testing.assert_allclose(np.asarray(after_moved.logits), np.asarray(after_orig.logits)[np.asarray(anc)],
                               rtol=1e-5, atol=1e-5)


def test_cache_full_marks_rows_done(model):
    state = start(model, [[1, 2, 3]], 4, max_len=8)
    state, out = generate_until(model, state, jax.random.key(0), max_new_tokens=10, eos_ids=(),
                                sampling=Sampling(0.0))
    assert int(out.num_tokens[0]) == 5 and bool(state.done[0]) and int(state.lengths[0]) == 8


# ----------------------------------------------------------------------------- sampling laws
def _check_frequencies(tokens, probs):
    """Every category's frequency within 5 Monte Carlo standard errors of its probability."""
    n = tokens.size
    freq = np.bincount(tokens, minlength=probs.size) / n
    se = np.sqrt(probs * (1 - probs) / n) + 1e-12
    assert (freq[probs == 0] == 0).all(), "sampled a token outside the support"
    assert np.all(np.abs(freq - probs) <= 5 * se + 1.0 / n), np.max(np.abs(freq - probs) / se)


def _target(logits, temperature=1.0, top_k=None, top_p=None):
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, bool)
    keep[order[: top_k or z.size]] = True
    p = np.where(keep, np.exp(z - z.max()), 0)
    p /= p.sum()
    if top_p is not None:
        ps = p[order]
        before = np.cumsum(ps) - ps
        keep2 = np.zeros_like(keep)
        keep2[order[before < top_p]] = True
        p = np.where(keep2, p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7), Sampling(1.3, top_k=5),
                                      Sampling(1.0, top_p=0.8), Sampling(0.9, top_k=8, top_p=0.7)])
def test_sampler_draws_from_the_stated_distribution(sampling):
    V, n = 300, 16_000  # V > 256 exercises the blocked inverse CDF
    logits = np.random.default_rng(0).normal(0, 2.0, V).astype(np.float32)
    tok, lp, qlp = sample_tokens(jax.random.key(1), jnp.broadcast_to(jnp.asarray(logits), (n, V)), sampling)
    tok = np.asarray(tok)
    q = _target(logits.astype(np.float64), sampling.temperature, sampling.top_k, sampling.top_p)
    _check_frequencies(tok, q)
    p = _target(logits.astype(np.float64))
    np.testing.assert_allclose(np.asarray(lp), np.log(p[tok]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(qlp), np.log(q[tok]), rtol=1e-4, atol=1e-4)


def test_top_p_wider_than_candidates_uses_exact_threshold():
    V, n = 1000, 4_000
    logits = -0.002 * np.arange(V, dtype=np.float32)  # flat: the 0.6-nucleus has far more than 256 tokens
    s = Sampling(1.0, top_p=0.6)
    tok, _, qlp = sample_tokens(jax.random.key(2), jnp.broadcast_to(jnp.asarray(logits), (n, V)), s)
    q = _target(logits.astype(np.float64), top_p=0.6)
    assert (q > 0).sum() > 256
    tok = np.asarray(tok)
    # compare in 20 bins of equal expected mass-rank (single tokens are too rare to test one by one)
    support = np.flatnonzero(q)
    bins = np.array_split(support, 20)
    freq = np.array([np.isin(tok, b).mean() for b in bins])
    prob = np.array([q[b].sum() for b in bins])
    assert np.isin(tok, support).all()
    assert np.all(np.abs(freq - prob) <= 5 * np.sqrt(prob * (1 - prob) / n))
    np.testing.assert_allclose(np.asarray(qlp), np.log(q[tok]), rtol=1e-3, atol=1e-3)


def test_greedy_and_bad_settings():
    logits = jnp.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    tok, lp, qlp = sample_tokens(jax.random.key(0), logits, Sampling(0.0))
    assert tok.tolist() == [1, 0] and np.all(np.asarray(qlp) == 0)
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_attention_phases_change_nothing(model):
    """Decoding attends over a growing static prefix of the cache (64, 128, then all 256 slots
    here); the tokens, log-probabilities and final cache equal those of full-length attention."""
    from models.llm import decoding

    assert decoding._attention_phases(256) == (64, 128, 256)
    prompts = [list(range(10, 70)), [3, 4, 5], list(range(20, 50))]  # rows cross 64 and 128 at different steps
    n = 150

    def run(phases):
        state = start(model, prompts, n, max_len=256)
        eos = decoding.vocab_mask((), CFG.vocab_size)
        return decoding._generate_until_jit(model, state, jax.random.key(0), n, eos, eos, Sampling(temperature=0.0),
                                            attention_phases=phases)

    (s1, o1), (s3, o3) = run(1), run(3)
    assert int(o3.num_tokens.min()) == n and int(s3.lengths.max()) > 128  # every phase was used
    np.testing.assert_array_equal(np.asarray(o3.tokens), np.asarray(o1.tokens))
    np.testing.assert_allclose(np.asarray(o3.logprobs), np.asarray(o1.logprobs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s3.cache.k[1]), np.asarray(s1.cache.k[1]), rtol=1e-5, atol=1e-5)
