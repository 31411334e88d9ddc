"""User functions as static fields that compare by what they compute.

A model's functions (a state-space model's ``transition``, a ``VmappedFeynmanKac``'s
``move_one``, ...) are static fields: part of the compiled program's cache key. Plain Python
functions compare by identity, so a model rebuilt from fresh functions, e.g. ``lambda``s inside a
function called for every dataset, would recompile on every call (seconds instead of
milliseconds). :func:`static_function` wraps them in :class:`StaticFunction`, which compares two
functions as equal when they are the same code with equal defaults and equal captured values
(closure cells, recursively for nested functions and ``functools.partial``): they compute the
same thing, so the compiled program can be reused. This is the same assumption ``jax.jit`` makes
for one function object (global variables read by the function are not part of the key).

Captured arrays and other unhashable values count by object: the same array captured again is
equal, an equal copy is not (its values are baked into the compiled program as constants), so a
model capturing a fresh array compiles anew each time it is rebuilt. Pass such arrays through the
model's ``params`` (traced, never a reason to recompile) instead of capturing them.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

__all__ = ["StaticFunction", "static_function"]

_UNHASHABLE = object()


def _value_key(v: Any, depth: int) -> Any:
    if isinstance(v, (types.FunctionType, functools.partial)):
        return _structural_key(v, depth + 1)
    if isinstance(v, StaticFunction):
        return v._key
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        # arrays: the same object (kept alive by the function that captures it), not equal values
        return ("object", id(v))
    try:
        hash(v)
    except TypeError:
        return ("object", id(v))
    return (type(v), v)


def _structural_key(fn: Any, depth: int = 0) -> Any:
    """A hashable key equal for functions computing the same thing, or ``None`` (use identity)."""
    if depth > 8:
        return None
    if isinstance(fn, functools.partial):
        inner = _structural_key(fn.func, depth + 1)
        args = tuple(_value_key(a, depth) for a in fn.args)
        kws = tuple(sorted((k, _value_key(v, depth)) for k, v in (fn.keywords or {}).items()))
        if inner is None or _UNHASHABLE in args or any(v is _UNHASHABLE for _, v in kws):
            return None
        return ("partial", inner, args, kws)
    if not isinstance(fn, types.FunctionType):
        return None
    cells = tuple(_value_key(c.cell_contents, depth) if _cell_full(c) else ("empty",)
                  for c in (fn.__closure__ or ()))
    defaults = tuple(_value_key(d, depth) for d in (fn.__defaults__ or ()))
    kwdefaults = tuple(sorted((k, _value_key(v, depth)) for k, v in (fn.__kwdefaults__ or {}).items()))
    if (_UNHASHABLE in cells or _UNHASHABLE in defaults or any(v is _UNHASHABLE for _, v in kwdefaults)
            or None in cells):
        return None
    return ("function", fn.__code__, id(fn.__globals__), cells, defaults, kwdefaults)


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


class StaticFunction:
    """A callable wrapper whose equality and hash follow the function's code and captured values
    (see the module docstring); calls go straight to ``fn``."""

    __slots__ = ("fn", "_key", "__wrapped__")

    def __init__(self, fn: Callable):
        if isinstance(fn, StaticFunction):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.__wrapped__ = fn
        self._key = _structural_key(fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other) -> bool:
        if not isinstance(other, StaticFunction):
            return NotImplemented
        if self._key is None or other._key is None:
            return self.fn is other.fn or self.fn == other.fn
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key) if self._key is not None else hash(self.fn)

    def __repr__(self) -> str:
        return f"StaticFunction({getattr(self.fn, '__qualname__', self.fn)!r})"


def static_function(fn: Callable | None) -> StaticFunction | None:
    """``fn`` wrapped in :class:`StaticFunction` (``None`` stays ``None``); an equinox converter
    for static function fields."""
    return None if fn is None else StaticFunction(fn)
