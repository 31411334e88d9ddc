"""The Markov-chain language model: exact answers, and SMC over reasoning steps against them.

Tolerances come from the Monte Carlo error (z = 4 unless said otherwise), and every stochastic
check has a companion that breaks the algorithm and asserts the same check rejects it.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array

from exact_checks import evidence_check, posterior_check

from models.markov_lm import (
    LMState,
    MarkovLMFeynmanKac,
    generate_step,
    markov_lm,
    sample_sequences,
    segment_trajectory,
    sequence_log_prob,
    token_constraint,
    token_count,
    total_log_potential,
    toy_reasoning_model,
)
from models.markov_lm_exact import (
    exact_answer_posterior,
    exact_posterior,
    forward_answer_posterior,
    sequence_index,
)
from samplers.smc import smc

Z_SCORE = 4.0
R_RUNS = 192  # independent SMC runs, vmapped into one compiled call
N_PARTICLES = 96
A, B, C, DOT, EOS = range(5)


# checks (shared by the real tests and their broken companions): tests/exact_checks.py


def cell_check(samples_cells, probs_cells, z=4.5):
    """Multinomial frequencies vs exact probabilities, cell by cell: |p̂ − p| ≤ z sqrt(p(1−p)/M)
    (z = 4.5 covers the ~30 cells jointly)."""
    m = samples_cells.size
    freq = np.bincount(samples_cells, minlength=probs_cells.size) / m
    se = np.sqrt(probs_cells * (1 - probs_cells) / m)
    dev = np.abs(freq - probs_cells)
    return bool(np.all(dev <= z * se + 1e-12)), float(np.max(dev / np.maximum(se, 1e-300)))


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return toy_reasoning_model()


@pytest.fixture(scope="module")
def exact(model):
    return exact_posterior(model)


def _answers(model, states):
    return model.answer(states), token_count(states, A, model.prompt_length)


@eqx.filter_jit
def _run_many_jit(model, keys):
    def one(k):
        res = smc(k, model, N_PARTICLES, resampling="systematic", ess_threshold=1.0,
                  max_steps=model.max_num_steps)
        last, count = _answers(model, res.particles)
        return dict(log_z=res.log_evidence, log_w=res.log_weights, last=last, count=count,
                    done=res.particles.done, reached_max=res.reached_max_steps,
                    steps=res.num_steps, resampled=res.resampled, extinct=res.extinct,
                    num_nan=res.num_nan_potentials)

    return jax.vmap(one)(keys)


def _run_many(model, key):
    """R independent variable-horizon SMC runs (resampling every step) in one compiled call;
    models of equal structure share the compilation."""
    return jax.tree.map(np.asarray, _run_many_jit(model, jax.random.split(key, R_RUNS)))


def _exact_answers(model, exact):
    last = exact_answer_posterior(exact, model.answer, model.lm.vocab_size)
    count = exact_answer_posterior(
        exact, lambda s: token_count(s, A, model.prompt_length), model.max_num_steps + 1
    )
    return last, count


@pytest.fixture(scope="module")
def smc_runs(model):
    return _run_many(model, jax.random.key(1))


# ------------------------------------------------------------------------------------------------
# exact answers
# ------------------------------------------------------------------------------------------------


def test_enumeration_matches_forward_recursion(model, exact):
    assert exact.states.tokens.shape == (5461, 7)
    assert model.lm.decode(exact.states.tokens[0]) == ". <eos>"
    np.testing.assert_allclose(np.exp(exact.log_prior).sum(), 1.0, atol=1e-6)  # complete support
    np.testing.assert_allclose(exact.probs.sum(), 1.0, atol=1e-12)
    log_z_fwd, last_fwd = forward_answer_posterior(model)
    np.testing.assert_allclose(exact.log_evidence, log_z_fwd, rtol=0, atol=1e-10)
    np.testing.assert_allclose(exact_answer_posterior(exact, model.answer, 5), last_fwd, atol=1e-12)
    # the 'no b b' constraint is hard: those sequences have zero posterior mass
    tok = exact.states.tokens
    has_bb = np.any((tok[:, :-1] == B) & (tok[:, 1:] == B), axis=1)
    assert has_bb.any() and np.all(exact.probs[has_bb] == 0)


@eqx.filter_jit
def _step_decomposition(model, finals):
    """Per-step log G_t and log M_t along the step segmentation of each final sequence, plus
    transitions that must be impossible (backwards; from another sequence's first state)."""
    horizon = model.max_num_steps
    traj = jax.vmap(lambda s: segment_trajectory(model, s, horizon))(finals)  # leaves [S, T, ...]
    at = lambda t: jax.tree.map(lambda x: x[:, t], traj)  # noqa: E731
    t1 = jnp.asarray(1, jnp.int32)
    log_g = [model.log_potential(jnp.asarray(0, jnp.int32), None, at(0))]
    log_m = [sequence_log_prob(model.lm, at(0), model.prompt_length)]
    for t in range(1, horizon):
        prev, cur = at(t - 1), at(t)
        log_g.append(jnp.where(prev.done, 0.0, model.log_potential(t1, prev, cur)))  # engine rule
        log_m.append(model.log_transition(t1, prev, cur))
    backwards = model.log_transition(t1, at(1), at(0))
    other = jax.tree.map(lambda x: x[::-1], at(0))
    from_other = model.log_transition(t1, other, at(1))
    same = jnp.all(other.tokens == at(0).tokens, axis=1)
    return dict(log_g=jnp.stack(log_g, 1), log_m=jnp.stack(log_m, 1), last=at(horizon - 1),
                backwards=backwards, backwards_ok=~at(1).done, from_other=from_other,
                same=same)


def test_step_decomposition_matches_whole_sequence(model, exact):
    """Σ_t log G_t and Σ_t log M_t along the step segmentation equal Φ(w) and log P(w); the JAX
    sequence functions agree with the independent NumPy enumeration; impossible moves get −inf."""
    states = LMState(*map(jnp.asarray, exact.states))
    phi = np.asarray(total_log_potential(model, states))
    np.testing.assert_array_equal(np.isinf(phi), np.isinf(exact.log_potential))
    fin = np.isfinite(phi)
    np.testing.assert_allclose(phi[fin], exact.log_potential[fin], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(sequence_log_prob(model.lm, states, model.prompt_length)), exact.log_prior,
        atol=1e-5,
    )
    pick = np.random.default_rng(0).choice(len(exact.probs), size=256, replace=False)
    out = jax.tree.map(np.asarray, _step_decomposition(model, jax.tree.map(lambda x: x[pick],
                                                                              states)))
    np.testing.assert_array_equal(out["last"].tokens, exact.states.tokens[pick])
    np.testing.assert_array_equal(out["last"].num_steps, exact.states.num_steps[pick])
    assert np.all(out["last"].done)
    g_sum = out["log_g"].sum(1)
    np.testing.assert_array_equal(np.isinf(g_sum), np.isinf(exact.log_potential[pick]))
    ok = np.isfinite(g_sum)
    np.testing.assert_allclose(g_sum[ok], exact.log_potential[pick][ok], atol=1e-5)
    np.testing.assert_allclose(out["log_m"].sum(1), exact.log_prior[pick], atol=1e-5)
    assert np.all(np.isneginf(out["backwards"][out["backwards_ok"]]))
    assert np.all(np.isneginf(out["from_other"][~out["same"]]))
    assert np.all(np.isfinite(out["from_other"][out["same"]]))


@pytest.fixture(scope="module")
def prior_samples(model):
    return jax.jit(sample_sequences, static_argnums=2)(jax.random.key(7), model, 20_000)


def _length_answer_cells(states, model):
    gen_len = np.asarray(states.length) - model.prompt_length  # 1..6
    return (gen_len - 1) * model.lm.vocab_size + np.asarray(model.answer(states))


def test_exact_enumeration_against_prior_monte_carlo(model, exact, prior_samples):
    s = prior_samples
    idx = sequence_index(exact, s)
    assert np.all(np.asarray(s.done)) and np.all(idx >= 0)  # every draw is a complete sequence
    np.testing.assert_array_equal(np.asarray(s.num_steps), exact.states.num_steps[idx])
    cells_p = np.bincount(
        _length_answer_cells(exact.states, model), weights=np.exp(exact.log_prior), minlength=30
    )
    ok, worst = cell_check(_length_answer_cells(s, model), cells_p)
    assert ok, f"prior frequencies off the enumeration: worst |z| = {worst:.2f}"
    # Z = E_P[exp Φ]: importance identity with a CLT bound
    ok, mean, se = evidence_check(exact.log_potential[idx], exact.log_evidence)
    assert ok, (mean, se)


def test_prior_check_rejects_a_wrong_enumeration(model, prior_samples):
    """Companion: an enumeration of a slightly different chain (a and c swapped after '.') is
    rejected by the same frequency check."""
    probs = np.exp(np.asarray(model.lm.log_probs, np.float64))
    probs[DOT, [A, C]] = probs[DOT, [C, A]]
    wrong = MarkovLMFeynmanKac(
        lm=markov_lm(probs / probs.sum(1, keepdims=True), eos_id=EOS, delimiter_id=DOT),
        constraint=model.constraint, prompt=model.prompt, max_length=model.max_length,
        max_step_tokens=model.max_step_tokens,
    )
    wrong_exact = exact_posterior(wrong)
    cells_p = np.bincount(
        _length_answer_cells(wrong_exact.states, model), weights=np.exp(wrong_exact.log_prior),
        minlength=30,
    )
    ok, worst = cell_check(_length_answer_cells(prior_samples, model), cells_p)
    assert not ok, worst


# ------------------------------------------------------------------------------------------------
# SMC against the exact answers
# ------------------------------------------------------------------------------------------------


def test_smc_runs_are_complete(smc_runs, model):
    assert np.all(smc_runs["done"]) and not np.any(smc_runs["reached_max"])
    assert not np.any(smc_runs["extinct"]) and np.all(smc_runs["num_nan"] == 0)
    assert np.all(smc_runs["steps"] <= model.max_num_steps)
    assert np.any(smc_runs["steps"] < model.max_num_steps)  # the horizon really varies
    assert np.all(smc_runs["resampled"][:, 1][smc_runs["steps"] > 1])


def test_smc_evidence_unbiased(smc_runs, exact):
    ok, mean, se = evidence_check(smc_runs["log_z"], exact.log_evidence)
    assert ok, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"


def test_smc_answer_posteriors(smc_runs, model, exact):
    last_exact, count_exact = _exact_answers(model, exact)
    for key, probs in (("last", last_exact), ("count", count_exact)):
        ok, tv, bound, est = posterior_check(
            smc_runs["log_z"], smc_runs["log_w"], smc_runs[key], probs
        )
        print(f"{key}: TV {tv:.4f} (bound {bound:.4f})")
        assert ok, f"{key}: TV {tv:.4f}, bound {bound:.4f}; est {est}, exact {probs}"


class _Broken(MarkovLMFeynmanKac):
    """Deliberately broken variants, switched by array flags so that they share one compilation.

    ``drop_pair_potentials``: the per-token potentials φ are ignored (only the final answer reward
    is kept), so resampling and weighting never see the constraint on the tokens.
    ``not_absorbing``: finished sequences are not absorbing: generation goes on after EOS (until the
    buffer is full), and the extra tokens are weighted.
    """

    drop_pair_potentials: Array = eqx.field(default_factory=lambda: jnp.asarray(False))
    not_absorbing: Array = eqx.field(default_factory=lambda: jnp.asarray(False))

    def log_potential(self, t, previous, particles):
        good = super().log_potential(t, previous, particles)
        was_done = jnp.zeros_like(particles.done) if previous is None else previous.done
        final = self.constraint.log_final[self.answer(particles)]
        final_only = jnp.where(particles.done & ~was_done, final, 0.0)
        return jnp.where(self.drop_pair_potentials, final_only, good)

    def move(self, key, t, particles):
        absorbing = super().move(key, t, particles)
        running_on = generate_step(key, self.lm, particles, max_step_tokens=self.max_step_tokens,
                                   stop_at_eos=False)
        return jax.tree.map(lambda a, b: jnp.where(self.not_absorbing, a, b), running_on, absorbing)

    def done(self, particles):
        return particles.done & ~self.not_absorbing


@pytest.mark.parametrize("broken", ["drop_pair_potentials", "not_absorbing"])
def test_smc_checks_reject_broken_models(model, exact, broken):
    """Companion of the two tests above: the same checks reject each broken variant (the
    evidence check, and the answer-posterior check on at least one of the two answers)."""
    flags = {"drop_pair_potentials": jnp.asarray(False), "not_absorbing": jnp.asarray(False)}
    flags[broken] = jnp.asarray(True)
    bad = _Broken(lm=model.lm, constraint=model.constraint, prompt=model.prompt,
                  max_length=model.max_length, max_step_tokens=model.max_step_tokens, **flags)
    runs = _run_many(bad, jax.random.key(1))
    last_exact, count_exact = _exact_answers(model, exact)
    ok_z, mean, se = evidence_check(runs["log_z"], exact.log_evidence)
    ok_last, tv_last, b_last, _ = posterior_check(runs["log_z"], runs["log_w"], runs["last"],
                                                  last_exact)
    ok_count, tv_count, b_count, _ = posterior_check(runs["log_z"], runs["log_w"], runs["count"],
                                                     count_exact)
    print(f"{broken}: Zhat/Z {mean:.3f}±{se:.3f}; TV last {tv_last:.3f} (bound {b_last:.3f}); "
          f"TV count {tv_count:.3f} (bound {b_count:.3f})")
    assert not ok_z, (mean, se)
    assert not (ok_last and ok_count), (tv_last, b_last, tv_count, b_count)


# ------------------------------------------------------------------------------------------------
# interface
# ------------------------------------------------------------------------------------------------


def test_conditional_smc_keeps_reference_with_ancestor_sampling(model, exact):
    """Conditional SMC with ancestor sampling (uses log_transition): the pinned reference survives,
    and every ancestor drawn for it is a particle equal to the reference's previous state."""
    horizon = model.max_num_steps
    ref_row = int(np.argmax(exact.probs * (exact.states.num_steps == 4)))
    final = jax.tree.map(lambda x: jnp.asarray(x[ref_row]), exact.states)
    ref = segment_trajectory(model, final, horizon)
    res = smc(jax.random.key(3), model, 16, max_steps=horizon, reference=ref,
              ancestor_sampling=True, store_history=True)
    np.testing.assert_array_equal(np.asarray(res.particles.tokens[0]), np.asarray(final.tokens))
    steps = int(res.num_steps)
    assert steps == 4
    hist = res.history
    for t in range(1, steps):
        a0 = int(hist.ancestors[t, 0])
        np.testing.assert_array_equal(np.asarray(hist.particles.tokens[t - 1, a0]),
                                      np.asarray(ref.tokens[t - 1]))


def test_proposal_potentials_carry_the_likelihood_ratio(exact):
    """With a proposal Q, Σ_t log G_t = Φ + log P − log Q for every complete sequence."""
    m = toy_reasoning_model(proposal=True)
    states = LMState(*map(jnp.asarray, exact.states))
    lhs = np.asarray(total_log_potential(m, states))
    rhs = (exact.log_potential + np.asarray(sequence_log_prob(m.lm, states, 1))
           - np.asarray(sequence_log_prob(m.proposal, states, 1)))
    np.testing.assert_array_equal(np.isinf(lhs), np.isinf(rhs))
    ok = np.isfinite(rhs)
    np.testing.assert_allclose(lhs[ok], rhs[ok], atol=1e-4)


@pytest.fixture(scope="module")
def proposal_models():
    """Guided SMC with a fixed horizon (``lax.scan``), and its broken twin that forgets the P/Q
    correction (it targets Q e^Φ: lm = proposal = Q); both share one compilation."""
    good = dataclasses.replace(toy_reasoning_model(proposal=True), num_steps=6)
    bad = dataclasses.replace(good, lm=good.proposal)
    return good, bad


@pytest.mark.slow
@pytest.mark.parametrize("which", ["guided", "broken_no_ratio"])
def test_guided_fixed_horizon_smc(model, exact, proposal_models, which):
    good, bad = proposal_models
    runs = _run_many(good if which == "guided" else bad, jax.random.key(2))
    assert np.all(runs["done"]) and np.all(runs["steps"] == 6)
    last_exact, count_exact = _exact_answers(model, exact)
    ok_z, mean, se = evidence_check(runs["log_z"], exact.log_evidence)
    ok_last, tv_last, b_last, _ = posterior_check(runs["log_z"], runs["log_w"], runs["last"],
                                                  last_exact)
    ok_count, tv_count, b_count, _ = posterior_check(runs["log_z"], runs["log_w"], runs["count"],
                                                     count_exact)
    print(f"{which}: Zhat/Z {mean:.3f}±{se:.3f}; TV last {tv_last:.3f} (bound {b_last:.3f}); "
          f"TV count {tv_count:.3f} (bound {b_count:.3f})")
    if which == "guided":
        assert ok_z and ok_last and ok_count
    else:
        assert not ok_z and not (ok_last and ok_count)


def test_bad_input_errors(model):
    probs = np.full((5, 5), 0.2)
    with pytest.raises(ValueError, match="sum to 1"):
        markov_lm(probs * 1.1, eos_id=4, delimiter_id=3)
    with pytest.raises(ValueError, match="must differ"):
        markov_lm(probs, eos_id=3, delimiter_id=3)
    with pytest.raises(ValueError, match="forbid_repeat"):
        token_constraint(5, forbid_repeat=(9,))
    kw = dict(lm=model.lm, constraint=model.constraint, max_step_tokens=3)
    with pytest.raises(ValueError, match="EOS"):
        MarkovLMFeynmanKac(prompt=jnp.asarray([EOS]), max_length=7, **kw)
    with pytest.raises(ValueError, match="prompt length"):
        MarkovLMFeynmanKac(prompt=jnp.asarray([A, B]), max_length=2, **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        MarkovLMFeynmanKac(prompt=jnp.asarray([A]), max_length=7, lm=model.lm,
                           constraint=token_constraint(4), max_step_tokens=3)
    with pytest.raises(ValueError, match="max_sequences"):
        exact_posterior(model, max_sequences=100)


# ------------------------------------------------------------------------------------------------
# one LLM Feynman-Kac model for both LMs
# ------------------------------------------------------------------------------------------------


@eqx.filter_jit
def _llm_run_many_jit(llm_model, keys, *, prompt_length):
    def one(k):
        res = smc(k, llm_model, N_PARTICLES, resampling="systematic", ess_threshold=1.0,
                  max_steps=llm_model.max_num_steps)
        s = res.particles.lm
        states = LMState(s.tokens, s.lengths, res.particles.num_steps, res.particles.done)
        return dict(log_z=res.log_evidence, log_w=res.log_weights, last=llm_model.answer(res.particles),
                    count=token_count(states, A, prompt_length), done=res.particles.done,
                    extinct=res.extinct, num_nan=res.num_nan_potentials,
                    tokens=jnp.sum(res.step_info["tokens"]))

    return jax.vmap(one)(keys)


def test_llm_feynman_kac_reproduces_the_markov_model(model, exact, smc_runs):
    """The toy model as an LLMFeynmanKac (MarkovStepLM + per-step TokenPairReward, product
    aggregation, twisted weights at β = 1: models.llm_fk.markov.from_markov_model) draws the same
    tokens with the same keys and gives the same log Ẑ (float32 rounding) as MarkovLMFeynmanKac,
    and passes the same exact checks (forward recursion: E[Ẑ/Z] = 1, answer laws)."""
    from models.llm_fk.markov import from_markov_model

    llm = from_markov_model(model)
    assert llm.move_keeps_done and not llm.is_adaptive
    runs = jax.tree.map(np.asarray, _llm_run_many_jit(llm, jax.random.split(jax.random.key(1), R_RUNS),
                                                      prompt_length=llm.prompt_length))
    np.testing.assert_allclose(runs["log_z"], smc_runs["log_z"], atol=1e-4)
    np.testing.assert_array_equal(runs["last"], smc_runs["last"])
    np.testing.assert_array_equal(runs["count"], smc_runs["count"])
    assert np.all(runs["done"]) and not runs["extinct"].any() and runs["num_nan"].sum() == 0
    assert np.all(runs["tokens"] >= N_PARTICLES)
    ok, mean, se = evidence_check(runs["log_z"], exact.log_evidence)
    assert ok, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    last_exact, count_exact = _exact_answers(model, exact)
    for key, probs in (("last", last_exact), ("count", count_exact)):
        ok, tv, bound, est = posterior_check(runs["log_z"], runs["log_w"], runs[key], probs)
        assert ok, f"{key}: TV {tv:.4f}, bound {bound:.4f}; est {est}, exact {probs}"
    with pytest.raises(TypeError, match="MarkovLMFeynmanKac"):
        from_markov_model(llm)
