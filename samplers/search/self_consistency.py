r"""Self-consistency: draw N complete particles, return the most frequent answer (majority vote).

\(x^1, \dots, x^N\) i.i.d. from the generation law, answers \(a^i = \mathrm{answer}(x^i)\); the
winner maximises the count \(n_a = \sum_i \mathbf{1}\{a^i = a\}\). Ties go to the answer of the
earliest particle among the tied answers, so given the counts a tied answer wins with probability
\(n_a / \sum_{b \text{ tied}} n_b\) (exchangeability). As \(N \to \infty\) the vote returns the mode
of the model's answer law with probability \(\to 1\) (law of large numbers), when the mode is
unique. No reward model is called.

Reference: Wang et al. (2023), "Self-consistency improves chain of thought reasoning in language
models".
"""

from __future__ import annotations

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
    return base.run_sample_and_select(
        key, model, num_particles, max_steps, _majority_vote, scored=False
    )


def _majority_vote(scores, answers):
    """The first sample carrying the most frequent answer (``scores`` unused)."""
    winner, _ = base.vote(answers, jnp.ones(answers.shape, jnp.float32))
    return winner
