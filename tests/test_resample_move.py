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


def test_transformer_truncate_and_resample_move():
    """The transformer's ``truncate`` (the parent of the last step) has the next-token logits of a
    fresh prefill of the shorter prefix, and resample-move runs on the transformer under jit with
    every re-generated token counted."""
    import equinox as eqx
    import jax

    from models.llm import ModelConfig, init_random
    from models.llm_fk.rewards import SelfCertainty
    from models.llm_fk.step_lm import StepLM
    from samplers.smc import smc

    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(1,))
    lm = StepLM(init_random(cfg, jax.random.key(0), scale=0.5), None, (2, 3), (1,))
    model = LLMFeynmanKac.build(lm, [4, 5, 6], SelfCertainty(), max_steps=6, max_step_tokens=3)
    p = model.init(jax.random.key(1), 6)
    p = model.move(jax.random.key(2), jnp.asarray(1), p)
    prev = p.lm.lengths - p.step_tokens
    cut = lm.truncate(p.lm, prev)
    for i in range(6):
        n = int(prev[i])
        fresh = lm.prefill(np.asarray(p.lm.tokens[i, :n]).tolist(), 4)
        np.testing.assert_allclose(np.asarray(cut.logits[i]), np.asarray(fresh.logits[0]), atol=2e-5)
        assert int(cut.lengths[i]) == n and not bool(cut.done[i])

    @eqx.filter_jit
    def run(m, key):
        r = smc(key, m, 8, ess_threshold=1.0, max_steps=m.max_num_steps)
        return r.log_evidence, r.step_info

    log_z, info = run(model.with_options(rejuvenation=1), jax.random.key(3))
    assert np.isfinite(float(log_z))
    assert int(info["moves_proposed"].sum()) > 0 and int(info["moves_accepted"].sum()) > 0
    # every particle moves at t = 0; afterwards each step is generated once more per proposal
    assert int(info["tokens"].sum()) > 8 + int(info["moves_proposed"].sum())


def test_particle_gibbs_refuses_resample_move(base):
    """Conditional SMC pins a reference path that resample-move would not see: a clear error."""
    import jax

    from samplers.smc import smc

    rm = base.with_options(rejuvenation=1)
    assert base.supports_conditional_smc and not rm.supports_conditional_smc
    ref = base.path(jax.tree.map(lambda x: x[0], base.init(jax.random.key(0), 1)))
    with pytest.raises(ValueError, match="conditional SMC"):
        smc(jax.random.key(1), rm, 4, reference=ref, num_steps=base.max_num_steps)
