"""``dvts``: diverse verifier tree search — B // M independent subtrees of one beam each with
M = ``beam_width`` children (S·M ≈ B); the answer is the best-scored beam."""

from __future__ import annotations

from typing import ClassVar

from app.methods.beam_search import BeamSearch, beams_and_width
from samplers.search import dvts

__all__ = ["DVTS"]


class DVTS(BeamSearch):
    name: ClassVar[str] = "dvts"
    summary: ClassVar[str] = "diverse verifier tree search: B // M subtrees of one beam"

    def search(self, ctx):
        k, m = beams_and_width(ctx)
        return dvts(ctx.key, ctx.model, k, m, max_steps=ctx.options["max_steps"])
