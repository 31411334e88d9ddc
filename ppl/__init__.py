"""Modelling layer: the Feynman-Kac protocol and builders (state-space models, numpyro models)."""

from ppl.feynman_kac import AbstractFeynmanKac, VmappedFeynmanKac, from_single_particle
from ppl.state_space import BootstrapFilter, GuidedFilter, StateSpaceModel

__all__ = [
    "AbstractFeynmanKac",
    "VmappedFeynmanKac",
    "from_single_particle",
    "StateSpaceModel",
    "BootstrapFilter",
    "GuidedFilter",
]
