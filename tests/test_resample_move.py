r"""Resample-move for LLM particles (:meth:`~models.llm_fk.ssm.LLMFeynmanKac.rejuvenate`): after
each step, a Metropolis-Hastings re-generation of the last step that leaves the current target
invariant. Exact on the Markov-chain LM (constrained test bed and power target) against the
enumeration / forward recursion; the broken variant (accept every proposal, i.e. the conditional
law q instead of q·G) is rejected by the same checks. Tolerances: :mod:`exact_checks`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from models.llm_fk import LLMFeynmanKac, MarkovStepLM
from models.llm_fk.markov import toy_reasoning_model
from models.llm_fk.rewards import ConstantReward
from models.markov_lm import power_test_bed, toy_test_bed
from models.markov_lm_exact import exact_posterior
from test_power_smc import checks, run_many


@pytest.fixture(scope="module")
def bed():
    return toy_test_bed()


@pytest.fixture(scope="module")
def exact(bed):
    return exact_posterior(bed)


@pytest.fixture(scope="module")
def base():
    return toy_reasoning_model()


@pytest.fixture(scope="module")
def rm_runs(base):
    return run_many(base.with_options(rejuvenation=1))


class _AlwaysAccept(LLMFeynmanKac):
    """Broken: every proposal replaces the particle (no Metropolis-Hastings ratio)."""

    def _log_acceptance(self, log_g_proposed, log_g_current):
        return jnp.full_like(log_g_proposed, jnp.inf)


def test_resample_move_matches_the_exact_posterior(rm_runs, bed, exact):
    assert all(checks(rm_runs, bed, exact))
    proposed, accepted = rm_runs["proposed"].sum(), rm_runs["accepted"].sum()
    print(f"acceptance {accepted / proposed:.3f} of {proposed} proposals")
    assert 0 < accepted < proposed


def test_always_accepting_is_rejected(base, bed, exact):
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    broken = _AlwaysAccept(**fields).with_options(rejuvenation=1)
    ok_z, ok_l, ok_c = checks(run_many(broken), bed, exact)
    assert not (ok_z and ok_l and ok_c)


def test_resample_move_on_the_power_target():
    alpha = 3.0
    bed = power_test_bed(alpha)
    model = LLMFeynmanKac.build(MarkovStepLM(bed.lm, bed.proposal), [3], ConstantReward(),
                                max_steps=bed.max_num_steps, max_step_tokens=bed.max_step_tokens,
                                max_new_tokens=6, power=alpha, rejuvenation=1)
    runs = run_many(model, seed=2)
    assert all(checks(runs, bed, exact_posterior(bed)))
    assert runs["accepted"].sum() > 0


def test_rejuvenation_options(base):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rejuvenation"):
            base.with_options(rejuvenation=bad)
    with pytest.raises(ValueError, match="reweight_finished"):
        base.with_options(weighting="puri", reweight_finished=True, rejuvenation=1)
    assert base.with_options(rejuvenation=2).rejuvenation == 2
    assert base.rejuvenation == 0
