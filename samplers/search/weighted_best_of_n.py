r"""Weighted best-of-N: a reward-weighted majority vote over the answers of N samples.

\(x^1, \dots, x^N\) i.i.d. from the generation law, scores \(s^i = \mathrm{score}(x^i)\) on the log
scale and vote weights \(w^i = \exp(s^i - \max_j s^j)\) (the reward up to a common factor;
\(-\infty\) scores vote with weight 0; if some score is \(+\infty\), only those vote). The winner
maximises \(W_a = \sum_i w^i \mathbf{1}\{a^i = a\}\); ties go to the answer of the earliest particle
among the tied answers (so, given the draws, a tied answer wins with probability
\(n_a / \sum_{b \text{ tied}} n_b\)). ``selected`` is the best-scored particle carrying the winner.

Compute: \(\sum_i \mathrm{num\_tokens}(x^i)\) tokens, \(N\) reward-model calls.

Reference: Li et al. (2023), "Making language models better reasoners with step-aware verifier";
Beeching, Tunstall & Rush (2024); Puri et al. (2025) (the weighted BoN baseline).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from samplers.search import base
from samplers.search.base import SearchModel, SearchResult

__all__ = ["weighted_best_of_n"]


def weighted_best_of_n(
    key: PRNGKeyArray, model: SearchModel, num_particles: int, *, max_steps: int | None = None
) -> SearchResult:
    r"""Reward-weighted vote (weights ``exp(score)``; return ``log r`` from ``score`` to vote with a
    reward \(r \ge 0\), e.g. a verifier probability)."""
    return base.run_sample_and_select(key, model, num_particles, max_steps, _weighted_vote)


def _weighted_vote(scores, answers):
    """The best-scored sample carrying the answer of the reward-weighted vote."""
    top = jnp.max(scores)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.where(scores > -jnp.inf, jnp.exp(scores - shift), 0.0)
    weights = jnp.where(top == jnp.inf, (scores == jnp.inf).astype(weights.dtype), weights)
    winner, _ = base.vote(answers, weights)
    best = base.argmax_first(jnp.where(answers == answers[winner], scores, -jnp.inf))
    return jnp.where(jnp.isfinite(scores[best]), best, winner)
