"""The learned process reward (:class:`models.llm_fk.prm.HiddenStatePRM`) and its training prompts.

- exactness of the cache path: the score from the generator's KV cache (the last token fed again at
  slot length − 1) equals the head applied to hidden states recomputed by a full forward pass over the
  whole prefix, for particles of different lengths (a tiny random transformer: compiles fast);
- the reward inside ``LLMFeynmanKac`` and ``smc`` under ``jit``: finite weights and log Ẑ;
- the shipped head: loads without pickle, right shapes, its stored held-out AUC;
- clear errors on bad input; ``app.tasks.train_tasks`` is disjoint from the evaluation prompts.
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llm import ModelConfig, init_random
from models.llm.transformer import forward, init_cache, rms_norm
from models.llm_fk.prm import PRM_WEIGHTS, HiddenStatePRM, prefix_hidden_states, prm_metadata
from models.llm_fk.ssm import LLMFeynmanKac
from models.llm_fk.step_lm import MarkovStepLM, StepLM
from samplers.smc import smc

PROMPT = [1, 2, 3, 4]
H = 16
# The stored held-out AUC of the shipped head (measured 0.751 on 1,086 prefixes of 20 evaluation prompts;
# its standard error is about 0.015) must stay clearly above chance (a head that learned nothing: 1/2).
MIN_HELD_OUT_AUC = 0.7


def _tiny_lm():
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=H, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=128, eos_token_ids=(31,))
    return StepLM(init_random(cfg, jax.random.key(0), scale=0.5), None, delimiter_ids=(30,), eos_ids=(31,))


def _random_prm(seed=1, h=H):
    r = np.random.default_rng(seed)
    return HiddenStatePRM(r.normal(size=h), 0.5 + r.random(h), r.normal(size=h), r.normal())


@jax.jit
def _full_forward_hidden(model, tokens, lengths):
    """Final-normed hidden state at position length − 1 of every row, by a full forward pass over the
    whole (right-padded) sequence from an empty cache: no cache reuse."""
    n, width = tokens.shape
    hidden, _ = forward(model, tokens, jnp.zeros((n,), jnp.int32), init_cache(model.config, n, width))
    last = hidden[jnp.arange(n), lengths - 1]
    return rms_norm(last, model.norm, model.config.rms_norm_eps)


def _reference_log_scores(prm, model, tokens, lengths):
    """log σ(head(h)) with h from :func:`_full_forward_hidden` (float64 head)."""
    h = np.asarray(_full_forward_hidden(model, jnp.asarray(tokens), jnp.asarray(lengths)), np.float64)
    z = ((h - np.asarray(prm.mean)) / np.asarray(prm.scale)) @ np.asarray(prm.w) + float(prm.b)
    return -np.logaddexp(0.0, -z)


@eqx.filter_jit
def _two_steps(model, key):
    p0 = model.init(key, 6)
    p1 = model.move(jax.random.fold_in(key, 1), jnp.asarray(1), p0)
    return p0, p1, model.reward.log_score(model.lm, None, p1.lm, p0.lm.lengths, p1.done, ~p0.done)


def test_cache_path_equals_full_forward():
    lm, prm = _tiny_lm(), _random_prm()
    model = LLMFeynmanKac.build(lm, PROMPT, prm, max_steps=4, max_step_tokens=5)
    p0, p1, direct = _two_steps(model, jax.random.key(3))
    h = prefix_hidden_states(lm.model, p1.lm)
    assert h.shape == (6, H) and h.dtype == jnp.float32
    p0, p1, direct = jax.tree.map(np.asarray, (p0, p1, direct))
    lengths = p1.lm.lengths
    assert len(set(lengths.tolist())) >= 3, f"the test needs particles of different lengths, got {lengths}"
    ref = _reference_log_scores(prm, lm.model, np.concatenate([p0.lm.tokens, p1.lm.tokens]),
                                np.concatenate([p0.lm.lengths, lengths]))
    ref0, ref1 = ref[:6], ref[6:]
    np.testing.assert_allclose(direct, ref1, atol=2e-5, rtol=1e-5)
    moved = ~p0.done  # rows scored by the model in its move
    assert moved.any()
    np.testing.assert_allclose(p1.log_step_reward[moved], ref1[moved], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(p0.log_step_reward, ref0, atol=2e-5, rtol=1e-5)
    assert np.all(direct < 0) and np.ptp(direct) > 1e-3  # a real, row-dependent score


def test_inside_smc_under_jit():
    lm = _tiny_lm()
    model = LLMFeynmanKac.build(lm, PROMPT, _random_prm(2), max_steps=4, max_step_tokens=3)

    @jax.jit
    def run(key):
        res = smc(key, model, 8, ess_threshold=1.0, max_steps=model.max_steps)
        return res.log_evidence, res.log_weights, res.particles.log_reward, res.num_nan_potentials

    log_z, log_w, log_r, nans = run(jax.random.key(0))
    assert np.isfinite(float(log_z)) and np.all(np.isfinite(np.asarray(log_w)))
    assert np.all(np.asarray(log_r) <= 0) and np.all(np.isfinite(np.asarray(log_r)))
    assert int(nans) == 0


def test_shipped_head_loads_without_pickle():
    with np.load(PRM_WEIGHTS, allow_pickle=False) as f:
        assert {"mean", "scale", "w", "b", "metadata"} <= set(f.files)
        assert f["w"].shape == f["mean"].shape == f["scale"].shape == (576,)  # SmolLM2-135M's hidden size
        assert f["b"].shape == ()
        meta = json.loads(str(f["metadata"]))
    prm = HiddenStatePRM.default()
    assert prm.hidden_size == 576 and prm.scores_unfinished and prm.init_state(None, None) is None
    assert meta == prm_metadata()
    test = meta["metrics"]["test"]
    assert test["n"] >= 500 and meta["prompts"]["test"] >= 20
    assert test["auc"] > MIN_HELD_OUT_AUC, test
    # held-out prompts are evaluation prompts, disjoint from the training prompts
    assert "get_tasks" in meta["prompts"]["test_source"] and "train_tasks" in meta["prompts"]["train_source"]


def test_errors(tmp_path):
    prm = _random_prm()
    with pytest.raises(FileNotFoundError, match="train_prm"):
        HiddenStatePRM.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3), w=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        HiddenStatePRM.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="shape of w"):
        HiddenStatePRM(np.zeros(3), np.ones(4), np.zeros(3), 0.0)
    with pytest.raises(ValueError, match="scalar"):
        HiddenStatePRM(np.zeros(3), np.ones(3), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="scale must be > 0"):
        HiddenStatePRM(np.zeros(3), np.zeros(3), np.zeros(3), 0.0)
    with pytest.raises(ValueError, match="finite"):
        HiddenStatePRM(np.zeros(3), np.ones(3), np.full(3, np.nan), 0.0)
    # a head of another hidden size (the shipped SmolLM2 head on the tiny model): clear error at build
    with pytest.raises(ValueError, match="hidden size"):
        LLMFeynmanKac.build(_tiny_lm(), PROMPT, HiddenStatePRM.default(), max_steps=2, max_step_tokens=2)
    # a generator without hidden states (the Markov-chain LM)
    from models.markov_lm import toy_test_bed

    with pytest.raises(TypeError, match="transformer"):
        LLMFeynmanKac.build(MarkovStepLM(toy_test_bed().lm), [0], prm, max_steps=2, max_step_tokens=2)


def test_train_tasks_disjoint_from_evaluation():
    from app import tasks as T

    for family in T.FAMILIES:
        train, evaluation = T.train_tasks(family), T.get_tasks(family)
        assert len(train) == 20 and len({t.prompt for t in train}) == 20
        assert not {t.prompt for t in train} & {t.prompt for t in evaluation}
        assert all(t.family == family for t in train)
    assert not {L for L, _ in T._TRAIN_LETTER_SPECS} & {L for L, _ in T._LETTER_SPECS}
    assert not set(T._TRAIN_NUMBER_SPECS) & set(T._NUMBER_SPECS)
    assert not set(T._TRAIN_CATEGORIES) & set(T._CATEGORIES)
    assert not set(T._TRAIN_ACROSTIC_WORDS) & set(T._ACROSTIC_WORDS)
    assert [t.prompt for t in T.train_tasks("acrostic", 3)] == [t.prompt for t in T.train_tasks("acrostic")[:3]]
    # the checkers work on the new prompts
    lakes = next(t for t in T.train_tasks("closed_set") if "Great Lakes" in t.prompt and t.n == 2)
    assert lakes.is_correct(" Lake Superior\n2. Erie") and not lakes.is_correct(" Superior\n2. Lake Superior")
    assert T.train_tasks("letter_words")[0].is_correct(" Egg\n2. Eagle")
    with pytest.raises(ValueError, match="unknown task family"):
        T.train_tasks("nope")
    with pytest.raises(ValueError, match="training prompts"):
        T.train_tasks("acrostic", 21)
