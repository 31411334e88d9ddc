"""Weighted best-of-N: a reward-weighted majority vote over the answers of N samples.

x^1, ..., x^N i.i.d. from the generation law, scores s^i = score(x^i) on the log scale and vote
weights w^i = exp(s^i − max_j s^j) (the reward up to a common factor; −inf scores vote with
weight 0; if some score is +inf, only those vote). The winner maximises W_a = Σ_i w^i 1{a^i = a};
ties go to the answer of the earliest particle among the tied answers (so, given the draws, a tied
answer wins with probability n_a / Σ_{b tied} n_b). ``selected`` is the best-scored particle carrying the winner.

Compute: Σ_i num_tokens(x^i) tokens, N reward-model calls.

Reference: Li et al. (2023), "Making language models better reasoners with step-aware verifier";
Beeching, Tunstall & Rush (2024); Puri et al. (2025) (the weighted BoN baseline).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from samplers.search import base
from samplers.search.base import SearchModel, SearchResult

__all__ = ["weighted_best_of_n"]


def weighted_best_of_n(
    key: PRNGKeyArray, model: SearchModel, num_particles: int, *, max_steps: int | None = None
) -> SearchResult:
    """Reward-weighted vote (weights ``exp(score)``; return ``log r`` from ``score`` to vote with a
    reward r ≥ 0, e.g. a verifier probability)."""
    base.check_search_model(model)
    n = base.check_count("num_particles", num_particles)
    max_steps = base.resolve_max_steps(model, max_steps)
    return base.timed_call(
        _weighted_best_of_n_jit, _weighted_best_of_n, key, model, n=n, max_steps=max_steps
    )


def _weighted_best_of_n(key, model, *, n, max_steps):
    particles, steps, at_cap = base.rollout(key, model, n, max_steps)
    scores, nans = base.sanitise_scores(model.score(particles))
    answers = model.answer(particles)
    top = jnp.max(scores)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.where(scores > -jnp.inf, jnp.exp(scores - shift), 0.0)
    weights = jnp.where(top == jnp.inf, (scores == jnp.inf).astype(weights.dtype), weights)
    winner, _ = base.vote(answers, weights)
    answer = answers[winner]
    best = base.argmax_first(jnp.where(answers == answer, scores, -jnp.inf))
    best = jnp.where(jnp.isfinite(scores[best]), best, winner)
    compute = base.untimed_compute(jnp.sum(model.num_tokens(particles)), n, steps)
    return SearchResult(
        particles=particles,
        scores=scores,
        answers=answers,
        valid=jnp.ones((n,), bool),
        selected=best,
        answer=answer,
        compute=compute,
        reached_max_steps=at_cap,
        num_nan_scores=nans,
    )


_weighted_best_of_n_jit = eqx.filter_jit(_weighted_best_of_n)
