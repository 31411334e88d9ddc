"""``beam``: beam search — K = B // M beams, M = ``beam_width`` sampled children each, kept by step
reward (K·M ≈ B candidates per step); the answer is the best-scored beam."""

from __future__ import annotations

from typing import ClassVar

from app.methods.base import positive_int_option
from app.methods.search_base import SearchMethod
from samplers.search import beam_search

__all__ = ["BeamSearch", "beams_and_width"]


def beams_and_width(ctx) -> tuple[int, int]:
    """(K, M): M = min(beam_width, B) children per beam, K = max(B // M, 1)."""
    m = min(positive_int_option(ctx.options, "beam_width"), ctx.budget)
    return max(ctx.budget // m, 1), m


class BeamSearch(SearchMethod):
    name: ClassVar[str] = "beam"
    summary: ClassVar[str] = "beam search: B // M beams of M = beam_width children, kept by step reward"

    def check_options(self, options):
        positive_int_option(options, "beam_width")

    def search(self, ctx):
        k, m = beams_and_width(ctx)
        return beam_search(ctx.key, ctx.model, k, m, max_steps=ctx.options["max_steps"])
