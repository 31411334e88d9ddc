"""One entry point for every inference-time scaling method on the LLM state-space model.

``run_method(method, key, lm, prompt_ids, reward, budget, answer_fn=..., max_steps=...,
max_step_tokens=...)`` builds the :class:`~models.llm_fk.ssm.LLMFeynmanKac` model of the prompt and
runs one of

==========  ===================================================================  ===============
method      algorithm                                                            budget B is
==========  ===================================================================  ===============
``pf``      particle filtering: ``samplers.smc`` on the model                    N = B particles
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
budget B; pg and ptpg spend (``pg_iterations`` + 1) times (× ``num_chains``) that, all counted.

Answers: pf, pg and ptpg return the weighted majority answer Σ_i W_i 1{a_i = a} (pg/ptpg pool
the weighted particle systems of every sweep of the target chain), bon the best-scored sample,
wbon the reward-weighted vote, sc the plain vote, beam/dvts the best-scored beam.

Compute (:class:`Compute`): tokens generated (every sampled token, including those of particles
later discarded by resampling), reward-model calls (one per particle and scored step), wall time of
the compiled call (compilation reported apart).

Reference: Puri et al. (2025), "A probabilistic inference approach to inference-time scaling of
LLMs using particle-based Monte Carlo methods"; Beeching, Tunstall & Rush (2024) (search
baselines).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from models.llm_fk.rewards import (
    FinalAnswerVerifier,
    LLMJudge,
    ProgrammaticStepVerifier,
    RewardModel,
    TokenPairReward,
    TokenVerifier,
)
from models.llm_fk import strategies
from models.llm_fk.ssm import LLMFeynmanKac, total_compute
from models.llm_fk.step_lm import AbstractStepLM, MarkovStepLM, StepLM
from samplers.parallel_tempering import initial_paths, parallel_tempering_pg
from samplers.search import beam_search, best_of_n, dvts, self_consistency, weighted_best_of_n
from samplers.smc import smc

__all__ = [
    "METHODS",
    "Compute",
    "MethodResult",
    "run_method",
    "build_model",
    "StepLM",
    "MarkovStepLM",
    "AbstractStepLM",
    "RewardModel",
    "ProgrammaticStepVerifier",
    "FinalAnswerVerifier",
    "LLMJudge",
    "TokenPairReward",
    "TokenVerifier",
]

METHODS = ("pf", "pg", "ptpg", "bon", "wbon", "sc", "beam", "dvts")


class Compute(NamedTuple):
    """Exact compute of one run.

    Attributes:
        tokens_generated: sampled tokens, all particles / candidates / sweeps included.
        reward_calls: reward-model scorings (one particle after one step; outcome rewards only
            count finished particles).
        wall_time_s: seconds of the compiled call(s) to ``block_until_ready``.
        compile_time_s: seconds of tracing + compilation (≈ 0 when cached).
    """

    tokens_generated: int
    reward_calls: int
    wall_time_s: float
    compile_time_s: float = 0.0


class MethodResult(NamedTuple):
    """Output of :func:`run_method`.

    Attributes:
        answer: the selected canonical answer (``answer_fn`` of the selected completion).
        text: the decoded selected completion; ``tokens``: its token ids.
        all_answers: the answer of every final candidate (particles of the last sweep, samples,
            beams); ``weights``: each candidate's normalised weight or vote share.
        compute: :class:`Compute`.
        method: the method name.
        log_evidence: log Ẑ of ``pf`` (NaN for the other methods).
        diagnostics: flags and rates (extinct runs, NaN potentials, step cap, swap rates...).
    """

    answer: Hashable
    text: str
    tokens: list[int]
    all_answers: list[Hashable]
    weights: list[float]
    compute: Compute
    method: str
    log_evidence: float
    diagnostics: dict


def build_model(
    lm: AbstractStepLM,
    prompt_ids: Sequence[int],
    reward: RewardModel,
    *,
    answer_fn: Callable[[list[int]], Hashable] | None,
    max_steps: int,
    max_step_tokens: int,
    sampling: Any = None,
    temperature: float = 1.0,
    weighting: str = "twisted",
    aggregation: str = "last",
    **options,
) -> LLMFeynmanKac:
    """The :class:`~models.llm_fk.ssm.LLMFeynmanKac` model :func:`run_method` runs on."""
    if sampling is not None:
        if not isinstance(lm, StepLM):
            raise ValueError(f"sampling settings apply to a StepLM (the transformer), not {type(lm).__name__}")
        lm = lm.with_sampling(sampling)
    return LLMFeynmanKac.build(
        lm, prompt_ids, reward, max_steps=max_steps, max_step_tokens=max_step_tokens,
        temperature=temperature, weighting=weighting, aggregation=aggregation,
        answer_fn=answer_fn, **options,
    )


# ------------------------------------------------------------------------------------------------
# compiled cores
# ------------------------------------------------------------------------------------------------


class _Final(NamedTuple):
    tokens: Any
    lengths: Any
    prompt_lengths: Any
    log_weights: Any
    log_reward: Any


def _final(particles, log_weights) -> _Final:
    s = particles.lm
    return _Final(s.tokens, s.lengths, s.prompt_lengths, log_weights, particles.log_reward)


@eqx.filter_jit
def _pf_core(key, model, *, n, resampling, ess_threshold):
    res = smc(key, model, n, resampling=resampling, ess_threshold=ess_threshold,
              max_steps=model.max_steps)
    flags = dict(extinct=res.extinct, num_nan_potentials=res.num_nan_potentials,
                 reached_max_steps=res.reached_max_steps, num_steps=res.num_steps)
    tokens, calls = total_compute(res.step_info)
    return _final(res.particles, res.log_weights), res.log_evidence, tokens, calls, flags


def _temper(model, beta):
    return model.with_inv_temperature(beta)


def _path(model, particle):
    return model.path(particle)


def _record(path):
    return path.lm.lengths[-1]


def _sweep_summary(res):
    tokens, calls = total_compute(res.step_info)
    return _final(res.particles, res.log_weights), tokens, calls, res.extinct, res.num_nan_potentials


@eqx.filter_jit
def _pt_core(key, model, betas, *, n, iterations, ancestor_sampling, resampling, ess_threshold,
             swap):
    k0, k1 = jax.random.split(key)
    paths, init = initial_paths(k0, model, betas, n, tempered=_temper, path_fn=_path,
                                resampling=resampling, ess_threshold=ess_threshold,
                                max_steps=model.max_steps)
    out = parallel_tempering_pg(
        k1, model, betas, paths, n, iterations, tempered=_temper, path_fn=_path,
        ancestor_sampling=ancestor_sampling, resampling=resampling, ess_threshold=ess_threshold,
        max_steps=model.max_steps, swap=swap, record_fn=_record, sweep_fn=_sweep_summary,
    )
    finals, tok, calls, extinct, nans = out.sweeps
    init_tokens, init_calls = total_compute(init.step_info)  # summed over the chains too
    tokens = init_tokens + jnp.sum(tok)
    reward_calls = init_calls + jnp.sum(calls)
    flags = dict(num_extinct_sweeps=jnp.sum(extinct) + jnp.sum(init.extinct),
                 num_nan_potentials=jnp.sum(nans) + jnp.sum(init.num_nan_potentials),
                 swap_proposed=out.swap_proposed, swap_accepted=out.swap_accepted)
    cold = jax.tree.map(lambda x: x[:, 0], finals)  # [S, N, ...] of the target chain
    return cold, tokens, reward_calls, flags


def _timed(fn, *args, **static):
    """Compile ``fn`` (an ``eqx.filter_jit`` function) ahead of time, then time the call."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    t1 = time.perf_counter()
    out = compiled(*args, **static)
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return out, t2 - t1, t1 - t0


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def _completion(final: _Final, i: int) -> list[int]:
    toks = np.asarray(final.tokens[i])
    return toks[int(final.prompt_lengths[i]): int(final.lengths[i])].tolist()


def _weighted_choice(answers: list, weights: np.ndarray, log_w: np.ndarray, selection: str,
                     rng: np.random.Generator) -> int:
    """Index of the selected candidate: ``vote`` — the highest-weight candidate carrying the answer
    of largest total weight; ``argmax`` — the highest-weight candidate; ``sample`` — one ∝ W."""
    if selection == "argmax":
        return int(np.argmax(log_w))
    if selection == "sample":
        return int(rng.choice(len(weights), p=weights / weights.sum()))
    totals: dict[Hashable, float] = {}
    for a, w in zip(answers, weights):
        totals[a] = totals.get(a, 0.0) + float(w)
    best = max(totals, key=lambda a: totals[a])  # first maximal in insertion order on ties
    cands = [i for i, a in enumerate(answers) if a == best]
    return max(cands, key=lambda i: log_w[i])


def _normalised(log_w) -> np.ndarray:
    lw = np.asarray(log_w, np.float64)
    m = np.max(lw)
    if not np.isfinite(m):
        return np.full(lw.shape, 1.0 / lw.size)
    w = np.exp(lw - m)
    return w / w.sum()


def _check_common(method, budget, lm, answer_fn, max_steps, max_step_tokens):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if not isinstance(lm, AbstractStepLM):
        raise TypeError(f"lm must be a StepLM or MarkovStepLM, got {type(lm).__name__}")
    if answer_fn is not None and not callable(answer_fn):
        raise TypeError("answer_fn must be callable: answer_fn(completion_ids) -> Hashable")


def run_method(
    method: str,
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
    weighting: str = "twisted",
    aggregation: str = "last",
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
) -> MethodResult:
    """Run one inference-time scaling method (see the module docstring for budgets and answers).

    Args:
        method: one of :data:`METHODS`.
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
        temperature: τ of the potential (β = 1/τ); weighting: ``twisted|puri``;
            aggregation: ``last|min|product|model``; puri_link: ``logit|identity|log``.
        pg_iterations: conditional-SMC sweeps of pg / ptpg (after an initial PF).
        num_chains, chain_betas: ptpg chains (default β_c = β · 2^{−c}, c < ``num_chains``).
        ancestor_sampling: PGAS for pg / ptpg.
        beam_width: M, children per beam (beam, dvts).
        selection: ``vote|argmax|sample`` for pf / pg / ptpg.
        resampling: scheme of pf (pg / ptpg use multinomial conditional resampling).
        ess_threshold: resample when ESS < threshold · N (default 0.5 for twisted, 1 for puri;
            pg / ptpg resample every step).
        seed_selection: seed of ``selection="sample"``.

    Returns:
        :class:`MethodResult`.
    """
    _check_common(method, budget, lm, answer_fn, max_steps, max_step_tokens)
    if selection not in ("vote", "argmax", "sample"):
        raise ValueError(f"selection must be vote, argmax or sample, got {selection!r}")
    if method == "sc":
        eager = False
    elif method in ("bon", "wbon"):
        eager = not isinstance(strategies.aggregation(aggregation), strategies.LastAggregation)
    else:
        eager = True
    model = build_model(
        lm, prompt_ids, reward, answer_fn=answer_fn, max_steps=max_steps,
        max_step_tokens=max_step_tokens, max_new_tokens=max_new_tokens, sampling=sampling,
        temperature=temperature, weighting=weighting, aggregation=aggregation, puri_link=puri_link,
        score_steps=eager,
    )
    if ess_threshold is None:
        ess_threshold = model.weighting.default_ess_threshold
    rng = np.random.default_rng(seed_selection)
    fn = answer_fn if answer_fn is not None else tuple

    if method == "pf":
        (final, log_z, tok, calls, flags), wall, comp = _timed(
            _pf_core, key, model, n=budget, resampling=resampling, ess_threshold=float(ess_threshold))
        comps = [_completion(final, i) for i in range(budget)]
        answers = [fn(c) for c in comps]
        log_w = np.asarray(final.log_weights, np.float64)
        w = _normalised(log_w)
        i = _weighted_choice(answers, w, log_w, selection, rng)
        return MethodResult(
            answers[i], lm.decode(comps[i]), comps[i], answers, w.tolist(),
            Compute(int(tok), int(calls), wall, comp), method, float(log_z),
            {k: np.asarray(v).item() for k, v in flags.items()},
        )

    if method in ("pg", "ptpg"):
        if not isinstance(pg_iterations, int) or pg_iterations < 1:
            raise ValueError(f"pg_iterations must be an int >= 1, got {pg_iterations!r}")
        beta = float(model.inv_temperature)
        if method == "pg":
            betas = np.asarray([beta])
        elif chain_betas is not None:
            betas = np.asarray(chain_betas, np.float64)
            if betas.ndim != 1 or betas.size < 1 or np.any(betas <= 0):
                raise ValueError("chain_betas must be a non-empty list of positive inverse temperatures")
        else:
            if not isinstance(num_chains, int) or num_chains < 1:
                raise ValueError(f"num_chains must be an int >= 1, got {num_chains!r}")
            betas = beta * 0.5 ** np.arange(num_chains)
        (cold, tok, calls, flags), wall, comp = _timed(
            _pt_core, key, model, jnp.asarray(betas, jnp.float32), n=budget,
            iterations=pg_iterations, ancestor_sampling=bool(ancestor_sampling),
            resampling="multinomial", ess_threshold=1.0, swap=method == "ptpg")
        s_count = pg_iterations
        answers, weights, comps, logs = [], [], [], []
        for s in range(s_count):
            fin = jax.tree.map(lambda x: np.asarray(x[s]), cold)
            w = _normalised(fin.log_weights) / s_count
            for i in range(budget):
                c = _completion(fin, i)
                comps.append(c)
                answers.append(fn(c))
                weights.append(w[i])
                logs.append(np.log(w[i]) if w[i] > 0 else -np.inf)
        weights = np.asarray(weights)
        i = _weighted_choice(answers, weights, np.asarray(logs), selection, rng)
        last = slice((s_count - 1) * budget, s_count * budget)
        prop = np.asarray(flags["swap_proposed"]).sum(0)
        acc = np.asarray(flags["swap_accepted"]).sum(0)
        diag = dict(num_extinct_sweeps=int(flags["num_extinct_sweeps"]),
                    num_nan_potentials=int(flags["num_nan_potentials"]),
                    swap_rate=[float(a / p) if p else float("nan") for a, p in zip(acc, prop)],
                    betas=betas.tolist())
        return MethodResult(
            answers[i], lm.decode(comps[i]), comps[i], answers[last],
            (weights[last] * s_count).tolist(), Compute(int(tok), int(calls), wall, comp), method,
            float("nan"), diag,
        )

    # ---- search baselines (samplers.search) --------------------------------------------------
    if method in ("bon", "wbon", "sc"):
        search = {"bon": best_of_n, "wbon": weighted_best_of_n, "sc": self_consistency}[method]
        res = search(key, model, budget, max_steps=max_steps)
    else:
        if not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
        m = min(beam_width, budget)
        k = max(budget // m, 1)
        if method == "beam":
            res = beam_search(key, model, k, m, max_steps=max_steps)
        else:
            res = dvts(key, model, k, m, max_steps=max_steps)
    table = model.answer_table()
    ids = np.asarray(res.answers)
    valid = np.asarray(res.valid)
    all_answers = [table.values[int(a)] for a, v in zip(ids, valid) if v]
    sel = int(res.selected)
    parts = res.particles
    lengths = np.asarray(parts.lm.lengths)
    prompt_len = np.asarray(parts.lm.prompt_lengths)
    toks = np.asarray(parts.lm.tokens[sel])[int(prompt_len[sel]): int(lengths[sel])].tolist()
    calls = int(res.compute.reward_calls)
    if method in ("bon", "wbon") and eager:
        calls = int(np.sum(np.asarray(parts.hist_scored)))  # every step was scored
    if method in ("wbon",):
        sc = np.asarray(res.scores, np.float64)
        w = _normalised(sc)
    elif method == "sc":
        w = np.full(len(all_answers), 1.0 / max(len(all_answers), 1))
    else:
        sc = np.asarray(res.scores, np.float64)[valid]
        w = (sc == sc.max()).astype(float) if sc.size else sc
        w = w / w.sum() if w.sum() > 0 else w
    diag = dict(reached_max_steps=bool(res.reached_max_steps), num_nan_scores=int(res.num_nan_scores),
                num_steps=int(res.compute.num_steps))
    return MethodResult(
        table.values[int(res.answer)], lm.decode(toks), toks, all_answers, list(np.asarray(w, float)),
        Compute(int(res.compute.tokens_generated), calls, float(res.compute.wall_time_s),
                float(res.compute.compile_time_s)),
        method, float("nan"), diag,
    )
