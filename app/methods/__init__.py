"""One entry point for every inference-time scaling method on the LLM state-space model.

``run_method(method, key, lm, prompt_ids, reward, budget, answer_fn=..., max_steps=...,
max_step_tokens=...)`` builds the :class:`~models.llm_fk.ssm.LLMFeynmanKac` model of the prompt and
runs one of the methods of :data:`METHODS` — an immutable mapping name → :class:`Method` object
(one file each in this package: ``particle_filter.py``, ``particle_gibbs.py``,
``parallel_tempering.py``, ``best_of_n.py``, ``weighted_best_of_n.py``, ``self_consistency.py``,
``beam_search.py``, ``dvts.py``; listed in ``registry.py``):

==========  ===================================================================  ===============
method      algorithm                                                            budget B is
==========  ===================================================================  ===============
``pf``      particle filtering: ``samplers.smc`` on the model                    N = B particles
``rm``      resample-move PF: ``rejuvenation`` MH re-generations of the last     N = B particles
            step before each move (invariant for the current target)
``pg``      particle Gibbs: a PF draws the first reference, then                 N = B particles
            ``pg_iterations`` conditional-SMC sweeps (optionally with            per sweep
            ancestor sampling)
``ptpg``    parallel-tempering particle Gibbs (Puri et al. Alg. 3):              N = B particles
            ``num_chains`` PG chains at β_c = β·2^{−c}, swaps of neighbours      per sweep and
                                                                                 chain
``bon``     best-of-N under the reward                                           N = B samples
``wbon``    reward-weighted majority vote                                        N = B samples
``sc``      self-consistency (majority vote, no reward)                          N = B samples
``beam``    beam search: K = B // M beams, M = ``beam_width`` sampled            K·M ≈ B
            children each, kept by step reward                                   candidates/step
``dvts``    diverse verifier tree search: B // M subtrees of one beam            S·M ≈ B
==========  ===================================================================  ===============

so that pf, bon, wbon, sc, beam and dvts generate about B complete answers' worth of tokens at
budget B; rm spends about (1 + ``rejuvenation``) times that; pg and ptpg spend
(``pg_iterations`` + 1) times (× ``num_chains``) that, all counted.

Answers: pf, pg and ptpg return the weighted majority answer Σ_i W_i 1{a_i = a} (pg/ptpg pool
the weighted particle systems of every sweep of the target chain), bon the best-scored sample,
wbon the reward-weighted vote, sc the plain vote, beam/dvts the best-scored beam.

Compute (:class:`Compute`): tokens generated (every sampled token, including those of particles
later discarded by resampling), reward-model calls (one per particle and scored step) — for
pf / pg / ptpg the sums of the engine's per-step ``result.step_info`` — and the wall time of the
compiled call (compilation reported apart).

Reference: Puri et al. (2025), "A probabilistic inference approach to inference-time scaling of
LLMs using particle-based Monte Carlo methods"; Beeching, Tunstall & Rush (2024) (search
baselines).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Sequence

import numpy as np
from jaxtyping import PRNGKeyArray

from app.methods.base import Compute, Method, MethodResult, RunContext, build_model
from app.methods.registry import METHODS, get_method, method_registry
from models.llm_fk import strategies
from models.llm_fk.rewards import (
    FinalAnswerVerifier,
    HostCallbacks,
    LLMJudge,
    ProgrammaticStepVerifier,
    RewardModel,
    TokenPairReward,
    TokenVerifier,
)
from models.llm_fk.step_lm import AbstractStepLM, MarkovStepLM, StepLM
from ppl import checks

__all__ = [
    "METHODS",
    "Method",
    "RunContext",
    "get_method",
    "method_registry",
    "Compute",
    "MethodResult",
    "run_method",
    "build_model",
    "StepLM",
    "MarkovStepLM",
    "AbstractStepLM",
    "RewardModel",
    "HostCallbacks",
    "ProgrammaticStepVerifier",
    "FinalAnswerVerifier",
    "LLMJudge",
    "TokenPairReward",
    "TokenVerifier",
]


def run_method(
    method: str | Method,
    key: PRNGKeyArray,
    lm: AbstractStepLM,
    prompt_ids: Sequence[int],
    reward: RewardModel,
    budget: int,
    *,
    answer_fn: Callable[[list[int]], Hashable] | None = None,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int | None = None,
    sampling: Any = None,
    temperature: float = 1.0,
    weighting: str | strategies.AbstractWeighting = "twisted",
    aggregation: str | strategies.AbstractAggregation = "last",
    puri_link: str | None = None,
    pg_iterations: int = 4,
    num_chains: int = 4,
    chain_betas: Sequence[float] | None = None,
    ancestor_sampling: bool = False,
    beam_width: int = 4,
    selection: str = "vote",
    resampling: str = "systematic",
    ess_threshold: float | None = None,
    seed_selection: int = 0,
    callbacks: HostCallbacks | None = None,
    power: float = 1.0,
    rejuvenation: int = 1,
) -> MethodResult:
    """Run one inference-time scaling method (see the module docstring for budgets and answers).

    Args:
        method: a name of :data:`METHODS` or a :class:`Method` object.
        key: PRNG key.
        lm: a :class:`~models.llm_fk.step_lm.StepLM` (transformer + tokenizer + delimiters + EOS)
            or :class:`~models.llm_fk.step_lm.MarkovStepLM`.
        prompt_ids: prompt token ids (chat template applied).
        reward: a :class:`~models.llm_fk.rewards.RewardModel` (unused by ``sc``).
        budget: B ≥ 1 (particles / samples / candidates per step, see the table).
        answer_fn: canonical answer of a completion, ``answer_fn(completion_ids) -> Hashable``
            (default: the token tuple).
        max_steps: step cap; max_step_tokens: token cap per step; max_new_tokens: completion
            buffer (default ``max_steps · max_step_tokens``).
        sampling: the LM's :class:`~models.llm.Sampling` (StepLM only; default: the lm's).
        temperature: τ of the potential (β = 1/τ); weighting: ``twisted|puri`` or an
            :class:`~models.llm_fk.strategies.AbstractWeighting`; aggregation:
            ``last|min|product|model`` or an :class:`~models.llm_fk.strategies.AbstractAggregation`;
            puri_link: ``logit|identity|log`` (puri by name only).
        pg_iterations: conditional-SMC sweeps of pg / ptpg (after an initial PF).
        num_chains, chain_betas: ptpg chains (default β_c = β · 2^{−c}, c < ``num_chains``).
        ancestor_sampling: PGAS for pg / ptpg.
        beam_width: M, children per beam (beam, dvts).
        selection: ``vote|argmax|sample`` for pf / pg / ptpg.
        resampling: scheme of pf (pg / ptpg use multinomial conditional resampling).
        ess_threshold: resample when ESS < threshold · N (default: the weighting's, 0.5 for
            twisted, 1 for puri; pg / ptpg resample every step).
        seed_selection: seed of ``selection="sample"``.
        callbacks: the experiment's :class:`~models.llm_fk.rewards.HostCallbacks` for the answer
            function (default: the reward's own, else a new one).
        power: α of the power target p^α R^β (weights p^α/q per step; sample the LM at
            temperature 1/α through ``sampling``); 1: the LM itself.
        rejuvenation: MH moves per step of ``rm``.

    Returns:
        :class:`MethodResult`.
    """
    m = get_method(method)
    checks.positive_int("budget", budget)
    checks.instance("lm", lm, AbstractStepLM)
    if answer_fn is not None:
        checks.function("answer_fn", answer_fn, "answer_fn(completion_ids) -> Hashable")
    if selection not in ("vote", "argmax", "sample"):
        raise ValueError(f"selection must be vote, argmax or sample, got {selection!r}")
    options = dict(pg_iterations=pg_iterations, num_chains=num_chains, chain_betas=chain_betas,
                   ancestor_sampling=ancestor_sampling, beam_width=beam_width, resampling=resampling,
                   ess_threshold=ess_threshold, max_steps=max_steps, rejuvenation=rejuvenation)
    m.check_options(options)
    if power != 1.0 and not m.uses_potentials:
        warnings.warn(f"power={power} has no effect on {m.name!r}: it samples from the proposal and selects by "
                      "the reward (only pf, rm, pg and ptpg weight by p^alpha)", UserWarning, stacklevel=2)
    model = build_model(
        lm, prompt_ids, reward, answer_fn=answer_fn, max_steps=max_steps,
        max_step_tokens=max_step_tokens, max_new_tokens=max_new_tokens, sampling=sampling,
        temperature=temperature, weighting=weighting, aggregation=aggregation, puri_link=puri_link,
        score_steps=m.eager_scoring(strategies.aggregation(aggregation)), callbacks=callbacks,
        power=power,
    )
    ctx = RunContext(key=key, model=model, lm=model.lm, budget=budget,
                     answer_fn=answer_fn if answer_fn is not None else tuple, selection=selection,
                     rng=np.random.default_rng(seed_selection), options=options)
    return m.run(ctx)
