"""LLM step models on the JAX transformer, the judge's incremental scoring, and ``run_method``.

- A tiny random transformer (compiles fast) checks the pieces that only the transformer path has:
  the LLM judge scored incrementally on the prefix cache (shared with the generator, or the judge's
  own cache extended step by step) equals a full forward pass over prefix + question, and the
  rewound states of a particle's path (:meth:`LLMFeynmanKac.path`) have the right next-token
  logits.
- ``run_method`` runs every method on the Markov LM with Python (host) verifiers; answers, texts
  and compute counts are checked for consistency.
- One smoke test runs particle filtering with SmolLM2 and its own LLM judge (slow).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from app.methods import (
    METHODS,
    FinalAnswerVerifier,
    LLMJudge,
    MarkovStepLM,
    ProgrammaticStepVerifier,
    StepLM,
    run_method,
)
from models.llm import ModelConfig, forward_logits, init_random
from models.llm_fk.ssm import LLMFeynmanKac
from models.markov_lm import toy_test_bed

QUESTION, YES, NO = (5, 6, 7), (8,), (9,)
PROMPT = [1, 2, 3]


def _tiny(seed):
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                      max_position_embeddings=128, eos_token_ids=(31,))
    return init_random(cfg, jax.random.key(seed), scale=0.5)


@eqx.filter_jit
def _two_steps(shared, separate, key):
    out = {}
    for name, model in (("shared", shared), ("separate", separate)):
        p0 = model.init(key, 3)
        p1 = model.move(jax.random.fold_in(key, 1), jnp.asarray(1), p0)
        path = model.path(jax.tree.map(lambda x: x[0], p1))
        out[name] = (p0, p1, path)
    return out


def _reference_judge(model, tokens, length):
    """log p(Yes)/(p(Yes)+p(No)) by a full forward pass over prefix + question."""
    seq = list(np.asarray(tokens[:length])) + list(QUESTION)
    logits = np.asarray(forward_logits(model, jnp.asarray([seq + [0] * (40 - len(seq))])))[0, len(seq) - 1]
    lp = logits - np.logaddexp.reduce(logits)
    return lp[YES[0]] - np.logaddexp(lp[YES[0]], lp[NO[0]])


def test_judge_incremental_equals_full_forward():
    gen, jud = _tiny(0), _tiny(1)
    lm = StepLM(gen, None, delimiter_ids=(30,), eos_ids=(31,))
    shared = LLMFeynmanKac.build(lm, PROMPT, LLMJudge(question_template=QUESTION, yes=YES, no=NO),
                                 max_steps=3, max_step_tokens=4)
    judge_lm = StepLM(jud, None, delimiter_ids=(30,), eos_ids=(31,))
    judge = LLMJudge(lm=judge_lm, question_template=QUESTION, yes=YES, no=NO)
    separate = LLMFeynmanKac.build(lm, PROMPT, judge, max_steps=3, max_step_tokens=4)
    assert shared.reward.shared and not separate.reward.shared
    out = jax.tree.map(np.asarray, _two_steps(shared, separate, jax.random.key(0)))
    for name, judge_model in (("shared", gen), ("separate", jud)):
        p0, p1, path = out[name]
        for i in range(3):
            ref = _reference_judge(judge_model, p1.lm.tokens[i], p1.lm.lengths[i])
            np.testing.assert_allclose(p1.log_step_reward[i], ref, atol=2e-5, err_msg=f"{name} row {i}")
        assert np.all(p1.scored) and np.all(p1.lm.lengths >= p0.lm.lengths)
        # the path of particle 0: step 0 is its state after the first step, with the same logits
        assert path.lm.lengths[0] == p0.lm.lengths[0]
        np.testing.assert_allclose(path.lm.logits[0], p0.lm.logits[0], atol=2e-5)
        np.testing.assert_allclose(path.lm.logits[1], p1.lm.logits[0], atol=2e-5)
        np.testing.assert_allclose(path.log_reward[:2], [p0.log_reward[0], p1.log_reward[0]], atol=1e-6)
        if name == "separate":  # the judge's cache follows the generator's tokens
            np.testing.assert_array_equal(path.reward.lengths[:2],
                                          [p0.reward.lengths[0], p1.reward.lengths[0]])


# ------------------------------------------------------------------------------------------------
# run_method on the Markov LM with host-side (text) verifiers
# ------------------------------------------------------------------------------------------------

NAMES = {"a": 0, "b": 1, "c": 2, ".": 3, "<eos>": 4}


def _step_score(text: str, finished: bool) -> float:
    """Partial credit: 'b b' is fatal; each 'b' costs 30%; a finished text ending in 'c' scores 1."""
    words = text.split()
    if any(u == v == "b" for u, v in zip(words[:-1], words[1:])):
        return 0.0
    r = 0.7 ** words.count("b")
    if finished:
        last = [w for w in words if w != "<eos>"][-1:] or ["."]
        r *= {"a": 0.5, "b": 0.2, "c": 1.0, ".": 0.3}[last[0]]
    return r


def _answer(ids):
    ids = [i for i in ids if i != 4]
    return ids[-1] if ids else 3


@pytest.mark.slow
def test_run_method_every_method_on_markov_lm():
    lm = MarkovStepLM(toy_test_bed().lm)
    common = dict(answer_fn=_answer, max_steps=6, max_step_tokens=3, max_new_tokens=6,
                  temperature=0.5, pg_iterations=2, num_chains=2)
    tokens = {}
    for method in METHODS:
        reward = FinalAnswerVerifier(lambda t: _step_score(t, True)) if method == "bon" else \
            ProgrammaticStepVerifier(_step_score)
        res = run_method(method, jax.random.key(1), lm, [3], reward, 4, **common)
        tokens[method] = res.compute.tokens_generated
        assert res.method == method
        assert res.answer == _answer(res.tokens), method
        assert res.text == lm.decode(res.tokens)
        assert res.answer in res.all_answers or method in ("pg", "ptpg")
        assert len(res.weights) == len(res.all_answers)
        np.testing.assert_allclose(sum(res.weights), 1.0, atol=1e-5, err_msg=method)
        c = res.compute
        assert c.tokens_generated >= 4 and c.wall_time_s > 0, (method, c)
        if method == "sc":
            assert c.reward_calls == 0
        elif method == "bon":
            assert c.reward_calls == 4  # outcome reward: one call per finished sample
        else:
            assert c.reward_calls >= 4, (method, c)
        if method in ("pg", "ptpg"):
            # initial PF + 2 sweeps per chain: more tokens than one PF
            assert c.tokens_generated > 3 * 4, c
        if method in ("pf", "rm"):
            assert np.isfinite(res.log_evidence)
            assert 1 <= res.diagnostics["unique_completions"] <= 4
    assert tokens["rm"] > tokens["pf"]  # the re-generated steps are counted
    with pytest.raises(ValueError, match="method"):
        run_method("bogus", jax.random.key(0), lm, [3], ProgrammaticStepVerifier(_step_score), 4,
                   **common)
    with pytest.raises(ValueError, match="budget"):
        run_method("pf", jax.random.key(0), lm, [3], ProgrammaticStepVerifier(_step_score), 0,
                   **common)


# ------------------------------------------------------------------------------------------------
# the registry of methods
# ------------------------------------------------------------------------------------------------


def test_method_registry_is_immutable_and_built_from_classes():
    """METHODS maps each name to one Method object, each class in its own module of app.methods;
    it cannot grow; scale and the CLI take their --methods choices from it; unknown names and
    duplicate names are rejected."""
    import importlib
    import types

    from app import scale
    from app.methods import Method, get_method, method_registry
    from app.methods.base import RunContext

    assert isinstance(METHODS, types.MappingProxyType)
    with pytest.raises(TypeError):
        METHODS["mine"] = METHODS["pf"]
    modules = set()
    for name, m in METHODS.items():
        assert isinstance(m, Method) and m.name == name and m.summary
        modules.add(type(m).__module__)
        assert importlib.import_module(type(m).__module__) is not None
    assert len(modules) == len(METHODS)  # one file per method
    assert set(METHODS) == {"pf", "rm", "pg", "ptpg", "bon", "wbon", "sc", "beam", "dvts"}
    assert scale.method_names() == tuple(METHODS)
    assert get_method("pf") is METHODS["pf"] and get_method(METHODS["sc"]) is METHODS["sc"]
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("mcts")

    class Twice(type(METHODS["pf"])):
        pass

    with pytest.raises(ValueError, match="two methods named 'pf'"):
        method_registry((type(METHODS["pf"]), Twice))
    with pytest.raises(TypeError, match="not a Method"):
        method_registry((int,))
    assert RunContext._fields[:4] == ("key", "model", "lm", "budget")


def test_a_new_method_is_one_class():
    """A Method subclass (outside the registry) runs through run_method like the built-in ones:
    here particle filtering that reports the highest-weight particle."""
    from app.methods import Method
    from app.methods.particle_filter import ParticleFilter

    class ArgmaxPF(Method):
        name = "pf-argmax"
        summary = "particle filter, highest-weight particle"

        def run(self, ctx):
            res = ParticleFilter().run(ctx._replace(selection="argmax"))
            return res._replace(method=self.name)

    lm = MarkovStepLM(toy_test_bed().lm)
    res = run_method(ArgmaxPF(), jax.random.key(0), lm, [3], ProgrammaticStepVerifier(_step_score), 4,
                     answer_fn=_answer, max_steps=6, max_step_tokens=3, max_new_tokens=6)
    assert res.method == "pf-argmax" and res.weights[int(np.argmax(res.weights))] == max(res.weights)
    assert res.answer == res.all_answers[int(np.argmax(res.weights))]
    assert res.compute.tokens_generated >= 4 and res.compute.reward_calls >= 4


def test_power_on_a_search_baseline_warns_and_rm_warns_without_mixing(monkeypatch):
    """power changes the target of the weighting methods only: a search baseline warns that it is
    ignored. rm warns when no Metropolis-Hastings move was accepted (the particles did not mix)."""
    import warnings

    from app.methods import particle_filter, resample_move

    lm = MarkovStepLM(toy_test_bed().lm)
    common = dict(answer_fn=_answer, max_steps=6, max_step_tokens=3, max_new_tokens=6)
    reward = ProgrammaticStepVerifier(_step_score)
    with pytest.warns(UserWarning, match="no effect on 'sc'"):
        run_method("sc", jax.random.key(0), lm, [3], reward, 2, power=2.0, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = run_method("pf", jax.random.key(0), lm, [3], reward, 2, power=2.0, **common)
    assert res.diagnostics["moves_proposed"] == 0

    real = particle_filter.ParticleFilter.run

    def stuck(self, ctx):
        r = real(self, ctx)
        return r._replace(diagnostics=dict(r.diagnostics, moves_accepted=0))

    monkeypatch.setattr(resample_move.ParticleFilter, "run", stuck)
    with pytest.warns(RuntimeWarning, match="none of .* re-generations was accepted"):
        run_method("rm", jax.random.key(0), lm, [3], reward, 4, **common)
