"""``rm``: resample-move particle filtering — ``pf`` on the model with ``rejuvenation`` Metropolis-
Hastings re-generations of every particle's last step before each move
(:meth:`~models.llm_fk.ssm.LLMFeynmanKac.rejuvenate`), N = B particles. The re-generated steps are
counted in the compute (about (1 + rejuvenation) times the PF's tokens)."""

from __future__ import annotations

from typing import ClassVar

from app.methods.base import Method, MethodResult, RunContext, positive_int_option
from app.methods.particle_filter import ParticleFilter

__all__ = ["ResampleMove"]


class ResampleMove(Method):
    name: ClassVar[str] = "rm"
    summary: ClassVar[str] = "resample-move particle filtering (MH rejuvenation of the last step), N = B"

    def check_options(self, options: dict) -> None:
        positive_int_option(options, "rejuvenation")

    def run(self, ctx: RunContext) -> MethodResult:
        model = ctx.model.with_options(rejuvenation=ctx.options["rejuvenation"])
        res = ParticleFilter().run(ctx._replace(model=model))
        return res._replace(method=self.name)
