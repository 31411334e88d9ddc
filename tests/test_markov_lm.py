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

from models.llm_fk.markov import from_markov_model, toy_reasoning_model
from models.llm_fk.ssm import LLMFeynmanKac
from models.markov_lm import (
    last_token_answer,
    markov_lm,
    token_constraint,
    token_count,
    toy_test_bed,
)
from models.markov_lm_exact import (
    exact_answer_posterior,
    exact_posterior,
    forward_answer_posterior,
    sequence_index,
)
from samplers.parallel_tempering import path_log_potential
from samplers.search.base import rollout
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
# fixtures: the test bed (a specification), its Feynman-Kac model (an LLMFeynmanKac), exact answers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bed():
    return toy_test_bed()


@pytest.fixture(scope="module")
def model(bed):
    return from_markov_model(bed)


@pytest.fixture(scope="module")
def exact(bed):
    return exact_posterior(bed)


def _answers(model, particles):
    s = particles.lm
    return model.answer(particles), token_count(s.tokens, s.lengths, A, s.prompt_lengths)


@eqx.filter_jit
def _run_many_jit(model, keys, num_steps):
    def one(k):
        res = smc(k, model, N_PARTICLES, resampling="systematic", ess_threshold=1.0,
                  num_steps=num_steps, max_steps=None if num_steps else model.max_num_steps)
        last, count = _answers(model, res.particles)
        return dict(log_z=res.log_evidence, log_w=res.log_weights, last=last, count=count,
                    done=res.particles.done, reached_max=res.reached_max_steps,
                    steps=res.num_steps, resampled=res.resampled, extinct=res.extinct,
                    num_nan=res.num_nan_potentials, tokens=jnp.sum(res.step_info["tokens"]))

    return jax.vmap(one)(keys)


def _run_many(model, key, num_steps=None):
    """R independent SMC runs (resampling every step) in one compiled call: variable horizon, or
    ``num_steps`` fixed (``lax.scan``; finished particles wait); models of equal structure share
    the compilation."""
    return jax.tree.map(np.asarray, _run_many_jit(model, jax.random.split(key, R_RUNS), num_steps))


def _exact_answers(bed, exact):
    last = exact_answer_posterior(exact, lambda s: last_token_answer(s.tokens, s.lengths, EOS),
                                  bed.lm.vocab_size)
    count = exact_answer_posterior(
        exact, lambda s: token_count(s.tokens, s.lengths, A, bed.prompt_length),
        bed.max_num_steps + 1,
    )
    return last, count


@pytest.fixture(scope="module")
def smc_runs(model):
    return _run_many(model, jax.random.key(1))


# ------------------------------------------------------------------------------------------------
# exact answers
# ------------------------------------------------------------------------------------------------


def test_enumeration_matches_forward_recursion(bed, exact):
    assert exact.states.tokens.shape == (5461, 7)
    assert bed.lm.decode(exact.states.tokens[0]) == ". <eos>"
    np.testing.assert_allclose(np.exp(exact.log_prior).sum(), 1.0, atol=1e-6)  # complete support
    np.testing.assert_allclose(exact.probs.sum(), 1.0, atol=1e-12)
    log_z_fwd, last_fwd = forward_answer_posterior(bed)
    np.testing.assert_allclose(exact.log_evidence, log_z_fwd, rtol=0, atol=1e-10)
    last_exact, _ = _exact_answers(bed, exact)
    np.testing.assert_allclose(last_exact, last_fwd, atol=1e-12)
    # the 'no b b' constraint is hard: those sequences have zero posterior mass
    tok = exact.states.tokens
    has_bb = np.any((tok[:, :-1] == B) & (tok[:, 1:] == B), axis=1)
    assert has_bb.any() and np.all(exact.probs[has_bb] == 0)


NUM_DRAWS = 20_000


@eqx.filter_jit
def _draws_and_paths(model, key):
    """NUM_DRAWS rollouts of the model's move law (potentials ignored), the trajectory of each
    (``model.path``), and along it Σ_t log G_t (engine rule: 0 once done), Σ_t log M_t (log q of
    the first step, then ``log_transition``), plus transitions that must be impossible (backwards;
    from another draw's first state)."""
    finals, _, _ = rollout(key, model, NUM_DRAWS, model.max_num_steps)
    paths = jax.vmap(model.path)(finals)  # leaves [S, T, ...]
    at = lambda t: jax.tree.map(lambda x: x[:, t], paths)  # noqa: E731
    t1 = jnp.asarray(1, jnp.int32)
    log_g = jax.vmap(lambda p: path_log_potential(model, p))(paths)
    log_m = at(0).step_logq
    for t in range(1, model.max_num_steps):
        log_m = log_m + model.log_transition(t1, at(t - 1), at(t))
    backwards = model.log_transition(t1, at(1), at(0))
    other = jax.tree.map(lambda x: x[::-1], at(0))
    from_other = model.log_transition(t1, other, at(1))
    same = jnp.all(other.lm.tokens == at(0).lm.tokens, axis=1)
    last = at(model.max_num_steps - 1)
    return dict(finals=finals, log_g=log_g, log_m=log_m, last_tokens=last.lm.tokens,
                last_done=last.done, backwards=backwards, backwards_ok=~at(1).done,
                from_other=from_other, same=same)


@pytest.fixture(scope="module")
def prior_draws(model):
    return jax.tree.map(np.asarray, _draws_and_paths(model, jax.random.key(7)))


def _chain_log_prob(log_probs, states, p):
    """Σ_{p ≤ j < length} log Q[w_{j−1}, w_j] (float64 NumPy)."""
    tab = np.asarray(log_probs, np.float64)
    tok, length = states.tokens.astype(np.int64), states.lengths
    pos = np.arange(1, tok.shape[1])
    mask = (pos[None, :] >= p) & (pos[None, :] < length[:, None])
    with np.errstate(invalid="ignore"):
        return np.where(mask, tab[np.clip(tok[:, :-1], 0, None), np.clip(tok[:, 1:], 0, None)],
                        0.0).sum(1)


def _decomposition_checks(out, exact, log_target, log_move):
    idx = sequence_index(exact, out["finals"])
    assert np.all(idx >= 0) and np.all(out["finals"].done)  # every draw is a complete sequence
    np.testing.assert_array_equal(out["finals"].num_steps, exact.states.num_steps[idx])
    np.testing.assert_array_equal(out["last_tokens"], exact.states.tokens[idx])
    assert np.all(out["last_done"])
    g_sum, want = out["log_g"], log_target[idx]
    np.testing.assert_array_equal(np.isinf(g_sum), np.isinf(want))
    ok = np.isfinite(want)
    np.testing.assert_allclose(g_sum[ok], want[ok], atol=1e-4)
    np.testing.assert_allclose(out["log_m"], log_move[idx], atol=1e-4)
    assert np.all(np.isneginf(out["backwards"][out["backwards_ok"]]))
    assert np.all(np.isneginf(out["from_other"][~out["same"]]))
    assert np.all(np.isfinite(out["from_other"][out["same"]]))
    return idx


def test_step_decomposition_matches_whole_sequence(prior_draws, exact):
    """Along the trajectory of every draw, Σ_t log G_t = Φ(w) and Σ_t log M_t = log P(w) (the
    independent NumPy enumeration); impossible moves get −inf; the step segmentation (steps per
    sequence) agrees with the enumeration's."""
    _decomposition_checks(prior_draws, exact, exact.log_potential, exact.log_prior)


def test_proposal_potentials_carry_the_likelihood_ratio(exact):
    """With a proposal Q, Σ_t log G_t = Φ + log P − log Q and Σ_t log M_t = log Q along the
    trajectory of every draw."""
    bed = toy_test_bed(proposal=True)
    out = jax.tree.map(np.asarray, _draws_and_paths(from_markov_model(bed), jax.random.key(8)))
    log_q = _chain_log_prob(bed.proposal.log_probs, exact.states, bed.prompt_length)
    _decomposition_checks(out, exact, exact.log_potential + exact.log_prior - log_q, log_q)


def _length_answer_cells(tokens, lengths, bed):
    gen_len = np.asarray(lengths) - bed.prompt_length  # 1..6
    answer = np.asarray(last_token_answer(tokens, lengths, EOS))
    return (gen_len - 1) * bed.lm.vocab_size + answer


def test_exact_enumeration_against_prior_monte_carlo(bed, exact, prior_draws):
    s = prior_draws["finals"]
    idx = sequence_index(exact, s)
    assert np.all(idx >= 0)
    cells_p = np.bincount(
        _length_answer_cells(exact.states.tokens, exact.states.lengths, bed),
        weights=np.exp(exact.log_prior), minlength=30,
    )
    ok, worst = cell_check(_length_answer_cells(s.lm.tokens, s.lm.lengths, bed), cells_p)
    assert ok, f"prior frequencies off the enumeration: worst |z| = {worst:.2f}"
    # Z = E_P[exp Φ]: importance identity with a CLT bound
    ok, mean, se = evidence_check(exact.log_potential[idx], exact.log_evidence)
    assert ok, (mean, se)


def test_prior_check_rejects_a_wrong_enumeration(bed, prior_draws):
    """Companion: an enumeration of a slightly different chain (a and c swapped after '.') is
    rejected by the same frequency check."""
    probs = np.exp(np.asarray(bed.lm.log_probs, np.float64))
    probs[DOT, [A, C]] = probs[DOT, [C, A]]
    wrong = dataclasses.replace(
        bed, lm=markov_lm(probs / probs.sum(1, keepdims=True), eos_id=EOS, delimiter_id=DOT))
    wrong_exact = exact_posterior(wrong)
    cells_p = np.bincount(
        _length_answer_cells(wrong_exact.states.tokens, wrong_exact.states.lengths, bed),
        weights=np.exp(wrong_exact.log_prior), minlength=30,
    )
    s = prior_draws["finals"]
    ok, worst = cell_check(_length_answer_cells(s.lm.tokens, s.lm.lengths, bed), cells_p)
    assert not ok, worst


# ------------------------------------------------------------------------------------------------
# SMC against the exact answers
# ------------------------------------------------------------------------------------------------


def test_smc_runs_are_complete(smc_runs, model):
    assert model.move_keeps_done and not model.is_adaptive
    assert np.all(smc_runs["done"]) and not np.any(smc_runs["reached_max"])
    assert not np.any(smc_runs["extinct"]) and np.all(smc_runs["num_nan"] == 0)
    assert np.all(smc_runs["steps"] <= model.max_num_steps)
    assert np.any(smc_runs["steps"] < model.max_num_steps)  # the horizon really varies
    assert np.all(smc_runs["resampled"][:, 1][smc_runs["steps"] > 1])
    assert np.all(smc_runs["tokens"] >= N_PARTICLES)  # compute: step_info counts every token


def test_smc_evidence_unbiased(smc_runs, exact):
    ok, mean, se = evidence_check(smc_runs["log_z"], exact.log_evidence)
    assert ok, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"


def test_smc_answer_posteriors(smc_runs, bed, exact):
    last_exact, count_exact = _exact_answers(bed, exact)
    for key, probs in (("last", last_exact), ("count", count_exact)):
        ok, tv, bound, est = posterior_check(
            smc_runs["log_z"], smc_runs["log_w"], smc_runs[key], probs
        )
        print(f"{key}: TV {tv:.4f} (bound {bound:.4f})")
        assert ok, f"{key}: TV {tv:.4f}, bound {bound:.4f}; est {est}, exact {probs}"


class _Broken(LLMFeynmanKac):
    """A deliberately broken variant: with ``not_absorbing``, finished sequences are not absorbing:
    a finished sequence whose buffer is not full is reopened at every move and generation goes on
    after EOS, the extra tokens weighted (and its answer reward charged again when it finishes).
    The other broken variant, the per-token potentials φ ignored (only the answer reward ψ kept,
    so resampling and weighting never see the constraint on the tokens), is this class with the
    reward's pair table zeroed: both share one compilation."""

    not_absorbing: Array = eqx.field(default_factory=lambda: jnp.asarray(False))

    def move(self, key, t, particles):
        lm = particles.lm
        full = lm.lengths >= lm.tokens.shape[1]
        reopen = self.not_absorbing & ~full
        p = particles._replace(done=particles.done & ~reopen, lm=lm._replace(done=lm.done & ~reopen))
        return super().move(key, t, p)

    def done(self, particles):
        return super().done(particles) & ~self.not_absorbing


def _broken(model, broken):
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    bad = _Broken(**fields, not_absorbing=jnp.asarray(broken == "not_absorbing"))
    if broken == "drop_pair_potentials":
        bad = eqx.tree_at(lambda m: m.reward.log_pair, bad, jnp.zeros_like(bad.reward.log_pair))
    return bad


@pytest.mark.parametrize("broken", ["drop_pair_potentials", "not_absorbing"])
def test_smc_checks_reject_broken_models(model, bed, exact, broken):
    """Companion of the two tests above: the same checks reject each broken variant (the
    evidence check, and the answer-posterior check on at least one of the two answers)."""
    runs = _run_many(_broken(model, broken), jax.random.key(1))
    last_exact, count_exact = _exact_answers(bed, exact)
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


def test_conditional_smc_keeps_reference_with_ancestor_sampling(model, exact, prior_draws):
    """Conditional SMC with ancestor sampling (uses log_transition): the pinned reference (the
    trajectory ``model.path`` of the most probable 4-step draw) survives, and every ancestor drawn
    for it is a particle equal to the reference's previous state."""
    horizon = model.max_num_steps
    finals = prior_draws["finals"]
    idx = sequence_index(exact, finals)
    row = int(np.argmax(np.where(finals.num_steps == 4, exact.probs[idx], -1.0)))
    final = jax.tree.map(lambda x: jnp.asarray(x[row]), finals)
    ref = model.path(final)
    res = smc(jax.random.key(3), model, 16, max_steps=horizon, reference=ref,
              ancestor_sampling=True, store_history=True)
    np.testing.assert_array_equal(np.asarray(res.particles.lm.tokens[0]), np.asarray(final.lm.tokens))
    assert int(res.particles.num_steps[0]) == 4
    steps = int(res.num_steps)
    assert steps >= 4
    hist = res.history
    for t in range(1, steps):
        a0 = int(hist.ancestors[t, 0])
        np.testing.assert_array_equal(np.asarray(hist.particles.lm.tokens[t - 1, a0]),
                                      np.asarray(ref.lm.tokens[t - 1]))


@pytest.fixture(scope="module")
def proposal_models():
    """Guided SMC with a fixed horizon (``num_steps=6``: ``lax.scan``), and its broken twin that
    forgets the P/Q correction (it targets Q e^Φ); ``correct_proposal`` is an array leaf, so both
    share one compilation."""
    good = toy_reasoning_model(proposal=True)
    return good, good.with_options(correct_proposal=False)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["guided", "broken_no_ratio"])
def test_guided_fixed_horizon_smc(bed, exact, proposal_models, which):
    good, bad = proposal_models
    runs = _run_many(good if which == "guided" else bad, jax.random.key(2), num_steps=6)
    assert np.all(runs["done"]) and np.all(runs["steps"] == 6)
    last_exact, count_exact = _exact_answers(bed, exact)
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


def test_bad_input_errors(bed, model):
    probs = np.full((5, 5), 0.2)
    with pytest.raises(ValueError, match="sum to 1"):
        markov_lm(probs * 1.1, eos_id=4, delimiter_id=3)
    with pytest.raises(ValueError, match="must differ"):
        markov_lm(probs, eos_id=3, delimiter_id=3)
    with pytest.raises(ValueError, match="forbid_repeat"):
        token_constraint(5, forbid_repeat=(9,))
    with pytest.raises(ValueError, match="EOS"):
        dataclasses.replace(bed, prompt=jnp.asarray([EOS]))
    with pytest.raises(ValueError, match="prompt length"):
        dataclasses.replace(bed, prompt=jnp.asarray([A, B]), max_length=2)
    with pytest.raises(ValueError, match="vocabulary"):
        dataclasses.replace(bed, constraint=token_constraint(4))
    with pytest.raises(ValueError, match="max_step_tokens"):
        dataclasses.replace(bed, max_step_tokens=0)
    with pytest.raises(ValueError, match="max_sequences"):
        exact_posterior(bed, max_sequences=100)
    with pytest.raises(TypeError, match="MarkovTestBed"):
        from_markov_model(model)
