"""Diverse verifier tree search (DVTS): the budget split into independent beam searches.

With a budget of N candidates per step and expansion width M, DVTS runs S = N / M independent
subtrees; each keeps ``beams_per_subtree`` beams (1 in Beeching et al.: each subtree is expanded
greedily, its beam replaced by the best of its M children under the PRM) and never exchanges beams
with another subtree, which keeps the S final answers diverse. The result is the best-scored beam
over all subtrees. With one subtree DVTS *is* beam search; with one beam per subtree, the S
subtree results are i.i.d., so the selected one follows the argmax-of-S law of a single subtree's
result (see :mod:`samplers.search.best_of_n`).

Reference: Beeching, Tunstall & Rush (2024), "Scaling test-time compute with open models"
(Hugging Face search-and-learn, ``dvts`` with ``n`` = S·M and ``beam_width`` = M).
"""

from __future__ import annotations

from jaxtyping import PRNGKeyArray

from samplers.search.base import SearchModel, SearchResult
from samplers.search.beam_search import run_beams

__all__ = ["dvts"]


def dvts(
    key: PRNGKeyArray | None,
    model: SearchModel,
    num_subtrees: int,
    expansions: int | None,
    *,
    beams_per_subtree: int = 1,
    max_steps: int | None = None,
) -> SearchResult:
    """DVTS with S = ``num_subtrees`` subtrees of ``beams_per_subtree`` beams, each beam expanded
    into M = ``expansions`` sampled candidates per step (``None``: all next steps, ``expand_all``).

    The budget per step is S · beams_per_subtree · M candidates. ``particles`` of the result are the
    final beams, subtree-major (slot g·K + j is beam j of subtree g).
    """
    return run_beams(key, model, num_subtrees, beams_per_subtree, expansions, max_steps=max_steps)
