r"""Power targets \(\pi_\alpha(x) \propto p(x)^\alpha\) (Power-SMC) against the exact answers of the
Markov-chain LM, and the naive arm the same checks reject: temperature-\(1/\alpha\) sampling
without weights (it drops the per-token normalisers \(\sum_v p(v \mid x_{<j})^\alpha\)).

The exact reference is independent of the sampler: :func:`models.markov_lm.power_test_bed`
encodes \(p^\alpha\) as the pair potential \((\alpha - 1) \log P\) of the test bed, solved by
enumeration and by the forward recursion (:mod:`models.markov_lm_exact`); the sampler under test
is :class:`~models.llm_fk.ssm.LLMFeynmanKac` with ``power=α``, no reward model
(:class:`~models.llm_fk.rewards.ConstantReward`) and steps drawn from the tempered chain.
Tolerances: :mod:`exact_checks` (z = 4 Monte Carlo errors over R independent runs).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exact_checks import evidence_check, posterior_check
from models.llm_fk import LLMFeynmanKac, MarkovStepLM
from models.llm_fk.rewards import ConstantReward
from models.markov_lm import last_token_answer, power_test_bed, tempered, token_count
from models.markov_lm_exact import exact_answer_posterior, exact_posterior, forward_answer_posterior
from samplers.smc import smc

ALPHA = 3.0
R_RUNS, N = 192, 96
EOS, A = 4, 0


@pytest.fixture(scope="module")
def bed():
    return power_test_bed(ALPHA)


@pytest.fixture(scope="module")
def exact(bed):
    return exact_posterior(bed)


@pytest.fixture(scope="module")
def model(bed):
    return LLMFeynmanKac.build(MarkovStepLM(bed.lm, bed.proposal), [int(i) for i in np.asarray(bed.prompt)],
                               ConstantReward(), max_steps=bed.max_num_steps, max_step_tokens=bed.max_step_tokens,
                               max_new_tokens=bed.max_length - bed.prompt_length, power=ALPHA)


@eqx.filter_jit
def _runs(model, keys):
    def one(k):
        r = smc(k, model, N, resampling="systematic", ess_threshold=1.0, max_steps=model.max_num_steps)
        s = r.particles.lm
        return dict(log_z=r.log_evidence, log_w=r.log_weights, done=r.particles.done,
                    last=last_token_answer(s.tokens, s.lengths, EOS),
                    count=token_count(s.tokens, s.lengths, A, s.prompt_lengths),
                    proposed=jnp.sum(r.step_info["moves_proposed"]),
                    accepted=jnp.sum(r.step_info["moves_accepted"]))

    return jax.vmap(one)(keys)


def run_many(model, seed=1):
    return jax.tree.map(np.asarray, _runs(model, jax.random.split(jax.random.key(seed), R_RUNS)))


def exact_answers(bed, exact):
    last = exact_answer_posterior(exact, lambda s: last_token_answer(s.tokens, s.lengths, EOS), 5)
    count = exact_answer_posterior(exact, lambda s: token_count(s.tokens, s.lengths, A, bed.prompt_length),
                                   bed.max_length - bed.prompt_length + 1)
    return last, count


def checks(runs, bed, exact):
    last, count = exact_answers(bed, exact)
    ok_z, mean, se = evidence_check(runs["log_z"], exact.log_evidence)
    ok_l, tv_l, b_l, _ = posterior_check(runs["log_z"], runs["log_w"], runs["last"], last)
    ok_c, tv_c, b_c, _ = posterior_check(runs["log_z"], runs["log_w"], runs["count"], count)
    print(f"Zhat/Z {mean:.3f}±{se:.3f}; TV last {tv_l:.4f} (bound {b_l:.4f}); TV count {tv_c:.4f} (bound {b_c:.4f})")
    return ok_z, ok_l, ok_c


def test_power_reference_is_p_to_the_alpha(bed, exact):
    """The test bed's exact law is p^α / Σ p^α (direct, from the enumerated prior), and the forward
    recursion agrees with the enumeration."""
    log_joint = ALPHA * exact.log_prior
    log_z = np.logaddexp.reduce(log_joint)
    np.testing.assert_allclose(exact.log_evidence, log_z, atol=1e-6)
    np.testing.assert_allclose(exact.probs, np.exp(log_joint - log_z), atol=1e-6)
    np.testing.assert_allclose(forward_answer_posterior(bed)[0], exact.log_evidence, atol=1e-9)
    # the tempered chain's rows are normalised P^α
    q = np.exp(np.asarray(tempered(bed.lm, ALPHA).log_probs, np.float64))
    p = np.exp(np.asarray(bed.lm.log_probs, np.float64))
    np.testing.assert_allclose(q, p**ALPHA / (p**ALPHA).sum(1, keepdims=True), rtol=1e-5)


def test_power_smc_matches_the_exact_power_target(model, bed, exact):
    runs = run_many(model)
    assert np.all(runs["done"])
    assert np.all(runs["proposed"] == 0)  # no rejuvenation in this model
    assert all(checks(runs, bed, exact))


def test_temperature_sampling_is_rejected(model, bed, exact):
    """The naive arm: steps drawn at temperature 1/α, no weights (power 1, no proposal correction).
    Its law is Π_j p^α / Z_{x_{<j}}, not p^α / Z: the same checks reject it (the evidence check
    too, since it estimates Z = 1)."""
    naive = model.with_options(power=1.0, correct_proposal=False)
    ok_z, ok_l, ok_c = checks(run_many(naive), bed, exact)
    assert not ok_z and not (ok_l and ok_c)


def test_power_option_errors(model):
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="power"):
            model.with_options(power=bad)
