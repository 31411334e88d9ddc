"""The method interface: :class:`Method`, what a run receives (:class:`RunContext`) and returns
(:class:`MethodResult`, :class:`Compute`), and the host-side helpers the methods share."""

from __future__ import annotations

import abc
import time
from typing import Any, Callable, ClassVar, Hashable, NamedTuple, Sequence

import numpy as np
from jaxtyping import PRNGKeyArray

from models.llm_fk import strategies
from ppl import checks
from models.llm_fk.rewards import RewardModel
from models.llm_fk.ssm import LLMFeynmanKac
from models.llm_fk.step_lm import AbstractStepLM, StepLM

__all__ = ["Method", "RunContext", "MethodResult", "Compute", "build_model"]


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
    """Output of a method (:func:`app.methods.run_method`).

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


class RunContext(NamedTuple):
    """Everything one run of a method sees.

    Attributes:
        key: PRNG key; model: the prompt's :class:`~models.llm_fk.ssm.LLMFeynmanKac`; lm: its step
        LM (for decoding); budget: B; answer_fn: canonical answer of a completion's ids;
        selection: ``vote|argmax|sample`` (pf / pg / ptpg); rng: NumPy generator of
        ``selection="sample"``; options: the method options of :func:`app.methods.run_method`
        (``pg_iterations``, ``num_chains``, ``chain_betas``, ``ancestor_sampling``,
        ``beam_width``, ``resampling``, ``ess_threshold``, ``max_steps``).
    """

    key: PRNGKeyArray
    model: LLMFeynmanKac
    lm: AbstractStepLM
    budget: int
    answer_fn: Callable[[list[int]], Hashable]
    selection: str
    rng: np.random.Generator
    options: dict


class Method(abc.ABC):
    """One inference-time scaling method: a small stateless object with a ``name`` (its key in
    :data:`app.methods.METHODS`), a one-line ``summary`` and :meth:`run`. Adding a method = one
    file with a subclass, listed in :mod:`app.methods.registry`, plus its test."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: the method weights particles by the model's potentials (so ``power`` changes its target);
    #: the search baselines sample from the proposal and select by the reward instead
    uses_potentials: ClassVar[bool] = False

    def eager_scoring(self, aggregation: strategies.AbstractAggregation) -> bool:
        """Whether the model must score every step during the move (SMC, beam search: yes;
        sampling-and-selecting methods can score finished samples on demand)."""
        return True

    def check_options(self, options: dict) -> None:
        """Reject bad method options before anything is built (default: nothing to check)."""

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> MethodResult:
        """Run on ``ctx.model`` with budget ``ctx.budget``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
    weighting: Any = "twisted",
    aggregation: Any = "last",
    **options,
) -> LLMFeynmanKac:
    """The :class:`~models.llm_fk.ssm.LLMFeynmanKac` model :func:`app.methods.run_method` runs on."""
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
# helpers shared by the methods
# ------------------------------------------------------------------------------------------------


class Final(NamedTuple):
    """The final particles' buffers and weights (what the host needs to pick an answer)."""

    tokens: Any
    lengths: Any
    prompt_lengths: Any
    log_weights: Any
    log_reward: Any


def final(particles, log_weights) -> Final:
    s = particles.lm
    return Final(s.tokens, s.lengths, s.prompt_lengths, log_weights, particles.log_reward)


def timed(fn, *args, **static):
    """Compile ``fn`` (an ``eqx.filter_jit`` function) ahead of time, then time the call:
    ``(out, wall seconds, compile seconds)``."""
    import jax

    t0 = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    t1 = time.perf_counter()
    out = compiled(*args, **static)
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return out, t2 - t1, t1 - t0


def completion(fin: Final, i: int) -> list[int]:
    toks = np.asarray(fin.tokens[i])
    return toks[int(fin.prompt_lengths[i]): int(fin.lengths[i])].tolist()


def weighted_choice(answers: list, weights: np.ndarray, log_w: np.ndarray, selection: str,
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


def normalised(log_w) -> np.ndarray:
    lw = np.asarray(log_w, np.float64)
    m = np.max(lw)
    if not np.isfinite(m):
        return np.full(lw.shape, 1.0 / lw.size)
    w = np.exp(lw - m)
    return w / w.sum()


def positive_int_option(options: dict, name: str) -> int:
    return checks.positive_int(name, options[name])
