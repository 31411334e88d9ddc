"""Search baselines over Feynman-Kac models with absorbing ``done`` states (LLM-style models).

Every method takes the same model (a :class:`SearchModel`: ``init``/``move``/``done`` plus
``score``/``answer``/``num_tokens``), a key and a budget, and returns a :class:`SearchResult`
with the selected particle, its answer, the final scores and exact :class:`Compute` (tokens
generated, reward-model calls, steps, wall time).
"""

from samplers.search.base import (
    Compute,
    ExpandableSearchModel,
    SearchAdapter,
    SearchModel,
    SearchResult,
    rollout,
    select_particle,
    vote,
)
from samplers.search.beam_search import beam_search
from samplers.search.best_of_n import best_of_n
from samplers.search.dvts import dvts
from samplers.search.self_consistency import self_consistency
from samplers.search.weighted_best_of_n import weighted_best_of_n

__all__ = [
    "SearchModel",
    "ExpandableSearchModel",
    "SearchAdapter",
    "SearchResult",
    "Compute",
    "best_of_n",
    "weighted_best_of_n",
    "self_consistency",
    "beam_search",
    "dvts",
    "rollout",
    "vote",
    "select_particle",
]
