"""Self-consistency: draw N complete particles, return the most frequent answer (majority vote).

x^1, ..., x^N i.i.d. from the generation law, answers a^i = answer(x^i); the winner maximises the
count n_a = Σ_i 1{a^i = a}. Ties go to the answer of the earliest particle among the tied answers,
so given the counts a tied answer wins with probability n_a / Σ_{b tied} n_b (exchangeability). As
N → ∞ the vote returns the mode of the model's answer law with probability → 1 (law of large
numbers), when the mode is unique. No reward model is called.

Reference: Wang et al. (2023), "Self-consistency improves chain of thought reasoning in language
models".
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from samplers.search import base
from samplers.search.base import SearchModel, SearchResult

__all__ = ["self_consistency"]


def self_consistency(
    key: PRNGKeyArray, model: SearchModel, num_particles: int, *, max_steps: int | None = None
) -> SearchResult:
    """Majority vote over the canonical answers of N independent samples.

    ``selected`` is the first particle carrying the winning answer; ``scores`` are NaN (never
    computed; ``model.score`` is not called).
    """
    base.check_search_model(model)
    n = base.check_count("num_particles", num_particles)
    max_steps = base.resolve_max_steps(model, max_steps)
    return base.timed_call(
        _self_consistency_jit, _self_consistency, key, model, n=n, max_steps=max_steps
    )


def _self_consistency(key, model, *, n, max_steps):
    particles, steps, at_cap = base.rollout(key, model, n, max_steps)
    answers = model.answer(particles)
    winner, _ = base.vote(answers, jnp.ones((n,), jnp.float32))
    compute = base.untimed_compute(jnp.sum(model.num_tokens(particles)), 0, steps)
    return SearchResult(
        particles=particles,
        scores=jnp.full((n,), jnp.nan, jnp.float32),
        answers=answers,
        valid=jnp.ones((n,), bool),
        selected=winner,
        answer=answers[winner],
        compute=compute,
        reached_max_steps=at_cap,
        num_nan_scores=jnp.asarray(0, jnp.int32),
    )


_self_consistency_jit = eqx.filter_jit(_self_consistency)
