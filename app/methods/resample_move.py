"""``rm``: resample-move particle filtering — ``pf`` on the model with ``rejuvenation`` Metropolis-
Hastings re-generations of every particle's last step before each move
(:meth:`~models.llm_fk.ssm.LLMFeynmanKac.rejuvenate`), N = B particles. The re-generated steps are
counted in the compute (about (1 + rejuvenation) times the PF's tokens)."""

from __future__ import annotations

import warnings
from typing import ClassVar

from app.methods.base import Method, MethodResult, RunContext, positive_int_option
from app.methods.particle_filter import ParticleFilter

__all__ = ["ResampleMove"]


class ResampleMove(Method):
    name: ClassVar[str] = "rm"
    summary: ClassVar[str] = "resample-move particle filtering (MH rejuvenation of the last step), N = B"
    uses_potentials: ClassVar[bool] = True

    def check_options(self, options: dict) -> None:
        positive_int_option(options, "rejuvenation")

    def run(self, ctx: RunContext) -> MethodResult:
        model = ctx.model.with_options(rejuvenation=ctx.options["rejuvenation"])
        res = ParticleFilter().run(ctx._replace(model=model))
        d = res.diagnostics
        if d["moves_proposed"] > 0 and d["moves_accepted"] == 0:
            warnings.warn(f"resample-move: none of {d['moves_proposed']} Metropolis-Hastings re-generations was "
                          "accepted (no rejuvenation: the particles did not mix; the result is a plain particle "
                          "filter's at the rm cost)", RuntimeWarning, stacklevel=2)
        return res._replace(method=self.name)
