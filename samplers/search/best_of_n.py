r"""Best-of-N: draw N complete particles independently, return the one the reward model scores best.

\(x^1, \dots, x^N\) i.i.d. from the model's generation law (``init`` then ``move`` until ``done``);
the result is \(x^{i^*}\), \(i^* = \operatorname{argmax}_i \mathrm{score}(x^i)\) (ties: lowest
\(i\)). Its law is that of the argmax of \(N\) i.i.d. draws: for a discrete generation law \(p\)
with score \(s\),

\[
P(\text{select } x) = \big[F(s(x))^N - F^-(s(x))^N\big] \frac{p(x)}{p(s = s(x))},
\]

\(F\) the CDF of \(s(X)\), \(F^-\) its left limit.

Compute: \(\sum_i \mathrm{num\_tokens}(x^i)\) tokens, \(N\) reward-model calls.

Reference: Cobbe et al. (2021), "Training verifiers to solve math word problems"; Snell et al.
(2024); Beeching, Tunstall & Rush (2024).
"""

from __future__ import annotations

from jaxtyping import PRNGKeyArray

from samplers.search import base
from samplers.search.base import SearchModel, SearchResult

__all__ = ["best_of_n"]


def best_of_n(
    key: PRNGKeyArray, model: SearchModel, num_particles: int, *, max_steps: int | None = None
) -> SearchResult:
    r"""Best-of-N under the model's reward ``score``.

    Args:
        key: PRNG key.
        model: a :class:`~samplers.search.base.SearchModel`.
        num_particles: \(N \ge 1\) (static).
        max_steps: step cap of the generation (default ``model.max_num_steps``).

    Returns:
        :class:`~samplers.search.base.SearchResult` (``particles`` = the N samples).
    """
    return base.run_sample_and_select(key, model, num_particles, max_steps, _best_scored)


def _best_scored(scores, answers):
    """The best-scored sample (ties: the lowest index)."""
    return base.argmax_first(scores)
