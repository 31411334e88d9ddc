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
from samplers.smc import SMCHistory, SMCResult, smc

__all__ = [
    "smc",
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
