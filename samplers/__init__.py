"""Particle algorithms over any Feynman-Kac model."""

from samplers.resampling import (
    AbstractResampling,
    Multinomial,
    Residual,
    Stratified,
    Systematic,
    ess,
    get_resampling,
)
from samplers import smc_kernel
from samplers.smc import SMCHistory, SMCResult, smc
from samplers.smc_kernel import SMCInfo, SMCState

__all__ = [
    "smc",
    "smc_kernel",
    "SMCState",
    "SMCInfo",
    "SMCResult",
    "SMCHistory",
    "AbstractResampling",
    "Multinomial",
    "Stratified",
    "Systematic",
    "Residual",
    "ess",
    "get_resampling",
]
