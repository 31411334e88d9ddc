"""``ptpg``: parallel-tempering particle Gibbs (Puri et al. 2025, Alg. 3) — ``num_chains`` particle
Gibbs chains at β_c = β·2^{−c} (or ``chain_betas``) with swaps of neighbours; N = B particles per
sweep and chain; answers from the target chain."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from app.methods.base import positive_int_option
from app.methods.particle_gibbs import ParticleGibbs

__all__ = ["ParallelTemperingPG"]


class ParallelTemperingPG(ParticleGibbs):
    name: ClassVar[str] = "ptpg"
    uses_potentials: ClassVar[bool] = True
    summary: ClassVar[str] = "parallel-tempering particle Gibbs: num_chains tempered PG chains with swaps"
    swap: ClassVar[bool] = True

    def check_options(self, options):
        super().check_options(options)
        if options["chain_betas"] is None:
            positive_int_option(options, "num_chains")
        else:
            self.betas(1.0, options)

    def betas(self, beta, options):
        if options["chain_betas"] is not None:
            betas = np.asarray(options["chain_betas"], np.float64)
            if betas.ndim != 1 or betas.size < 1 or np.any(betas <= 0):
                raise ValueError("chain_betas must be a non-empty list of positive inverse temperatures")
            return betas
        return beta * 0.5 ** np.arange(positive_int_option(options, "num_chains"))
