"""Strategies of the LLM Feynman-Kac model (models.llm_fk.strategies): every formula against a hand
computation in float64 NumPy, names map to the classes, bad names are rejected, and models that
differ only in β share one compiled program."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llm_fk import strategies as st

R_PREV = np.array([0.5, 0.2, 1.0, 0.0, 0.9])
R_NEW = np.array([0.25, 0.4, 0.99, 0.3, 0.0])
FIRST = np.array([False, True, False, False, False])
BETA = 1.7


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(x)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


class _Reward:
    """A reward model whose own aggregation is the mean of log-scores (hand-checkable)."""

    def aggregate(self, log_prev, log_r, first):
        return jnp.where(first, log_r, 0.5 * (log_prev + log_r))


def _agg(a):
    out = a(_Reward(), _f32(_log(R_PREV)), _f32(_log(R_NEW)), jnp.asarray(FIRST))
    return np.asarray(out, np.float64)


def test_aggregations_by_hand():
    lp, lr = _log(R_PREV), _log(R_NEW)
    np.testing.assert_allclose(_agg(st.LastAggregation()), lr, rtol=1e-6)
    mins = np.where(FIRST, lr, np.minimum(lp, lr))
    np.testing.assert_allclose(_agg(st.MinAggregation()), mins, rtol=1e-6)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(_agg(st.ProductAggregation()), lp + lr, rtol=1e-6)
    with np.errstate(invalid="ignore"):
        model = np.where(FIRST, lr, 0.5 * (lp + lr))
    np.testing.assert_allclose(_agg(st.ModelAggregation()), model, rtol=1e-6)


def test_links_by_hand():
    lr = _f32(_log(R_NEW))
    clip = np.clip(R_NEW, 1e-7, 1 - 1e-7)
    np.testing.assert_allclose(np.asarray(st.LogitLink()(lr)), np.log(clip / (1 - clip)), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(st.IdentityLink()(lr)), R_NEW, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.LogLink()(lr)), _log(R_NEW), rtol=1e-6)


def test_weightings_by_hand():
    lp, lr = _f32(_log(R_PREV)), _f32(_log(R_NEW))
    tw = st.TwistedWeighting()
    got = np.asarray(tw.log_potential(BETA, lp, lr), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = BETA * (_log(R_NEW) - _log(R_PREV))
    want[R_PREV == 0] = -np.inf  # a dead prefix stays dead
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tw.log_potential(BETA, None, lr)), BETA * _log(R_NEW), rtol=1e-5)
    # telescoping: the product of twisted potentials along a path is R_T^β
    path = _f32(_log([0.9, 0.5, 0.6, 0.3]))
    total = tw.log_potential(BETA, None, path[:1])[0] + sum(
        tw.log_potential(BETA, path[i - 1:i], path[i:i + 1])[0] for i in range(1, 4))
    np.testing.assert_allclose(float(total), BETA * np.log(0.3), rtol=1e-5)
    for lk, f in ((st.LogitLink(), lambda r: np.clip(r, 1e-7, 1 - 1e-7) / (1 - np.clip(r, 1e-7, 1 - 1e-7))),
                  (st.IdentityLink(), np.exp), (st.LogLink(), lambda r: r)):
        w = st.PuriWeighting(link=lk)
        got = np.asarray(w.log_potential(BETA, lp, lr), np.float64)
        np.testing.assert_allclose(got, BETA * _log(f(R_NEW)), rtol=1e-4, err_msg=lk.name)
        assert w.default_ess_threshold == 1.0
    assert tw.default_ess_threshold == 0.5


def test_done_of_weightings():
    done = jnp.asarray([True, False])
    np.testing.assert_array_equal(st.TwistedWeighting().done(done), [True, False])
    np.testing.assert_array_equal(st.PuriWeighting().done(done), [True, False])
    paper = st.PuriWeighting(reweight_finished=True)
    np.testing.assert_array_equal(paper.done(done), [False, False])
    np.testing.assert_array_equal(paper.done(jnp.asarray([True, True])), [True, True])


def test_names_map_to_classes_and_bad_names_are_rejected():
    assert st.weighting("twisted") == st.TwistedWeighting()
    assert st.weighting("puri") == st.PuriWeighting(link=st.LogitLink())
    assert st.weighting("puri", link="log", reweight_finished=True) == st.PuriWeighting(
        link=st.LogLink(), reweight_finished=True)
    for name, cls in (("last", st.LastAggregation), ("min", st.MinAggregation),
                      ("product", st.ProductAggregation), ("model", st.ModelAggregation)):
        assert isinstance(st.aggregation(name), cls) and st.aggregation(name).name == name
    for name, cls in (("logit", st.LogitLink), ("identity", st.IdentityLink), ("log", st.LogLink)):
        assert isinstance(st.link(name), cls)
    obj = st.MinAggregation()
    assert st.aggregation(obj) is obj
    with pytest.raises(ValueError, match="unknown weighting"):
        st.weighting("bogus")
    with pytest.raises(ValueError, match="unknown aggregation"):
        st.aggregation("sum")
    with pytest.raises(ValueError, match="unknown puri_link"):
        st.weighting("puri", link="probit")
    with pytest.raises(ValueError, match="unknown puri_link"):
        st.link(3)
    with pytest.raises(ValueError, match="reweight_finished"):
        st.weighting("twisted", reweight_finished=True)
    with pytest.raises(ValueError, match="fields of the weighting"):
        st.weighting(st.PuriWeighting(), link="log")
    with pytest.raises(TypeError, match="AbstractLink"):
        st.PuriWeighting(link="logit")


def test_models_differing_in_beta_share_one_program():
    """β is an array leaf: tempered copies of a model have one treedef (one compilation); another
    weighting class does not."""
    from models.llm_fk.rewards import TokenPairReward
    from models.llm_fk.ssm import LLMFeynmanKac
    from models.llm_fk.step_lm import MarkovStepLM
    from models.markov_lm import toy_test_bed

    toy = toy_test_bed()
    m = LLMFeynmanKac.build(MarkovStepLM(toy.lm), [3], TokenPairReward(np.zeros((5, 5))), max_steps=3,
                            max_step_tokens=2)
    hot = m.with_inv_temperature(0.25)
    assert jax.tree.structure(m) == jax.tree.structure(hot)
    assert float(hot.inv_temperature) == 0.25
    puri = m.with_options(weighting="puri")
    assert jax.tree.structure(puri) != jax.tree.structure(m)
    count = []

    @eqx.filter_jit
    def pot(model, lr):
        count.append(1)
        return model.log_potential(jnp.asarray(1), None, model.initial_state(2)._replace(log_reward=lr))

    lr = _f32([-1.0, -2.0])
    np.testing.assert_allclose(pot(m, lr), [-1.0, -2.0])
    np.testing.assert_allclose(pot(hot, lr), [-0.25, -0.5])
    assert len(count) == 1
