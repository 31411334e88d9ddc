"""The registry of methods: an immutable mapping name → :class:`~app.methods.base.Method`, built
once from the method classes (nothing registers itself at import; adding a method = its file and
one entry in :data:`_CLASSES`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from app.methods.base import Method
from app.methods.beam_search import BeamSearch
from app.methods.best_of_n import BestOfN
from app.methods.dvts import DVTS
from app.methods.parallel_tempering import ParallelTemperingPG
from app.methods.particle_filter import ParticleFilter
from app.methods.particle_gibbs import ParticleGibbs
from app.methods.resample_move import ResampleMove
from app.methods.self_consistency import SelfConsistency
from app.methods.weighted_best_of_n import WeightedBestOfN

__all__ = ["METHODS", "get_method", "method_registry"]

_CLASSES: tuple[type[Method], ...] = (
    ParticleFilter, ResampleMove, ParticleGibbs, ParallelTemperingPG, BestOfN, WeightedBestOfN,
    SelfConsistency,
    BeamSearch, DVTS,
)


def method_registry(classes=_CLASSES) -> Mapping[str, Method]:
    """An immutable name → method mapping of ``classes`` (names must be unique)."""
    out: dict[str, Method] = {}
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} is not a Method subclass")
        if cls.name in out:
            raise ValueError(f"two methods named {cls.name!r}: {type(out[cls.name]).__name__}, {cls.__name__}")
        out[cls.name] = cls()
    return MappingProxyType(out)


METHODS: Mapping[str, Method] = method_registry()


def get_method(method: str | Method) -> Method:
    """The method named ``method`` (or ``method`` itself); unknown names are a ``ValueError``."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]
    raise ValueError(f"method must be one of {tuple(METHODS)} or a Method, got {method!r}")
