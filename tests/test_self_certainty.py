r"""Self-certainty as a reward (:class:`~models.llm_fk.rewards.SelfCertainty`): the twisted SMC
target \(\pi(x) \propto p(x) \exp(\beta \bar\ell(x))\), \(\bar\ell\) the mean token log-probability,
against its exact law on the Markov-chain LM (enumeration of the 5461 complete sequences), with a
broken variant (the sum instead of the mean) that the same checks reject; and the reward's state
through particle Gibbs' path rebuild."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llm_fk import LLMFeynmanKac, MarkovStepLM
from models.llm_fk.rewards import SelfCertainty
from models.markov_lm import toy_test_bed
from models.markov_lm_exact import ExactPosterior, exact_posterior
from test_power_smc import checks, run_many

BETA = 2.0


class _SumNotMean(SelfCertainty):
    """Broken: the total log-probability instead of the mean (a length penalty, not certainty)."""

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        n = (lm_state.lengths - lm_state.prompt_lengths).astype(jnp.float32)
        return super().log_score(lm, state, lm_state, prev_lengths, finished, active) * n


@pytest.fixture(scope="module")
def bed():
    return toy_test_bed()


def _model(bed, reward):
    return LLMFeynmanKac.build(MarkovStepLM(bed.lm), [3], reward, max_steps=bed.max_num_steps,
                               max_step_tokens=bed.max_step_tokens, max_new_tokens=6, temperature=1.0 / BETA)


@pytest.fixture(scope="module")
def exact(bed):
    base = exact_posterior(bed)  # its sequences and prior P (the constraint is not used here)
    n = base.states.lengths - bed.prompt_length
    log_pot = BETA * base.log_prior / n
    log_joint = base.log_prior + log_pot
    log_z = float(np.logaddexp.reduce(log_joint))
    return ExactPosterior(base.states, base.log_prior, log_pot, log_z, np.exp(log_joint - log_z))


def test_self_certainty_smc_matches_exact(bed, exact):
    runs = run_many(_model(bed, SelfCertainty()), seed=3)
    assert all(checks(runs, bed, exact))


def test_sum_instead_of_mean_is_rejected(bed, exact):
    ok_z, ok_l, ok_c = checks(run_many(_model(bed, _SumNotMean()), seed=3), bed, exact)
    assert not (ok_z and ok_l and ok_c)


def test_self_certainty_scores_and_path(bed):
    """log r̂ equals the mean log p of the generated tokens, after every step and on every state of
    the rebuilt path (particle Gibbs' reference)."""
    model = _model(bed, SelfCertainty())
    p = model.init(jax.random.key(0), 4)
    for t in range(1, 3):
        p = model.move(jax.random.key(t), jnp.asarray(t), p)
    lp = np.asarray(bed.lm.log_probs, np.float64)
    toks, lens = np.asarray(p.lm.tokens), np.asarray(p.lm.lengths)
    for i in range(4):
        seq = toks[i, : lens[i]]
        want = np.mean([lp[a, b] for a, b in zip(seq[:-1], seq[1:])])
        np.testing.assert_allclose(float(p.log_reward[i]), want, rtol=1e-5)
        path = model.path(jax.tree.map(lambda x: x[i], p))
        for s in range(int(p.num_steps[i])):
            n = int(path.lm.lengths[s])
            want_s = np.mean([lp[a, b] for a, b in zip(seq[: n - 1], seq[1:n])])
            np.testing.assert_allclose(float(path.log_reward[s]), want_s, rtol=1e-5)
            got = model.reward.log_score(model.lm, path.reward[s:s + 1], jax.tree.map(lambda x: x[s:s + 1], path.lm),
                                         None, None, None)
            np.testing.assert_allclose(float(got[0]), want_s, rtol=1e-5)
