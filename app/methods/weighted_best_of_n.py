"""``wbon``: reward-weighted majority vote over N = B samples."""

from __future__ import annotations

from typing import ClassVar

from app.methods.best_of_n import BestOfN
from app.methods.search_base import sample_weights_by_score
from samplers.search import weighted_best_of_n

__all__ = ["WeightedBestOfN"]


class WeightedBestOfN(BestOfN):
    name: ClassVar[str] = "wbon"
    summary: ClassVar[str] = "reward-weighted majority vote over N = B samples"

    def search(self, ctx):
        return weighted_best_of_n(ctx.key, ctx.model, ctx.budget, max_steps=ctx.options["max_steps"])

    def candidate_weights(self, res, valid, num_answers):
        return sample_weights_by_score(res)
