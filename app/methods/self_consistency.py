"""``sc``: self-consistency — plain majority vote over N = B samples (no reward calls)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from app.methods.search_base import SearchMethod
from samplers.search import self_consistency

__all__ = ["SelfConsistency"]


class SelfConsistency(SearchMethod):
    name: ClassVar[str] = "sc"
    summary: ClassVar[str] = "self-consistency: majority vote over N = B samples, no reward"

    def eager_scoring(self, aggregation):
        return False

    def search(self, ctx):
        return self_consistency(ctx.key, ctx.model, ctx.budget, max_steps=ctx.options["max_steps"])

    def candidate_weights(self, res, valid, num_answers):
        return np.full(num_answers, 1.0 / max(num_answers, 1))
