"""Best-of-N: draw N complete particles independently, return the one the reward model scores best.

x^1, ..., x^N i.i.d. from the model's generation law (``init`` then ``move`` until ``done``);
the result is x^{i*}, i* = argmax_i score(x^i) (ties: lowest i). Its law is that of the argmax of
N i.i.d. draws: for a discrete generation law p with score s,
P(select x) = [F(s(x))^N − F⁻(s(x))^N] · p(x) / p(s = s(x)), F the CDF of s(X), F⁻ its left limit.

Compute: Σ_i num_tokens(x^i) tokens, N reward-model calls.

Reference: Cobbe et al. (2021), "Training verifiers to solve math word problems"; Snell et al.
(2024); Beeching, Tunstall & Rush (2024).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from samplers.search import base
from samplers.search.base import SearchModel, SearchResult

__all__ = ["best_of_n"]


def best_of_n(
    key: PRNGKeyArray, model: SearchModel, num_particles: int, *, max_steps: int | None = None
) -> SearchResult:
    """Best-of-N under the model's reward ``score``.

    Args:
        key: PRNG key.
        model: a :class:`~samplers.search.base.SearchModel`.
        num_particles: N ≥ 1 (static).
        max_steps: step cap of the generation (default ``model.max_num_steps``).

    Returns:
        :class:`~samplers.search.base.SearchResult` (``particles`` = the N samples).
    """
    base.check_search_model(model)
    n = base.check_count("num_particles", num_particles)
    max_steps = base.resolve_max_steps(model, max_steps)
    return base.timed_call(_best_of_n_jit, _best_of_n, key, model, n=n, max_steps=max_steps)


def _best_of_n(key, model, *, n, max_steps):
    particles, steps, at_cap = base.rollout(key, model, n, max_steps)
    scores, nans = base.sanitise_scores(model.score(particles))
    answers = model.answer(particles)
    best = base.argmax_first(scores)
    compute = base.untimed_compute(jnp.sum(model.num_tokens(particles)), n, steps)
    return SearchResult(
        particles=particles,
        scores=scores,
        answers=answers,
        valid=jnp.ones((n,), bool),
        selected=best,
        answer=answers[best],
        compute=compute,
        reached_max_steps=at_cap,
        num_nan_scores=nans,
    )


_best_of_n_jit = eqx.filter_jit(_best_of_n)
