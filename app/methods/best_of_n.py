"""``bon``: best-of-N — N = B samples, the best-scored one under the reward."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from app.methods.search_base import SearchMethod
from models.llm_fk.strategies import LastAggregation
from samplers.search import best_of_n

__all__ = ["BestOfN"]


class BestOfN(SearchMethod):
    name: ClassVar[str] = "bon"
    summary: ClassVar[str] = "best-of-N under the reward, N = B samples"

    def eager_scoring(self, aggregation):
        return not isinstance(aggregation, LastAggregation)  # 'last': score finished samples only

    def search(self, ctx):
        return best_of_n(ctx.key, ctx.model, ctx.budget, max_steps=ctx.options["max_steps"])

    def reward_calls(self, ctx, res):
        if ctx.model.score_steps:  # every step was scored during the moves
            return int(np.sum(np.asarray(res.particles.hist_scored)))
        return int(res.compute.reward_calls)
