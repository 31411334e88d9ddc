"""Argument checks at the Python boundary (the one copy the whole toolkit uses).

Bad input gets a clear error before anything is traced: each check names the argument, says what
was expected and shows what was given, and returns the (normalised) value, so that a call site
reads ``n = checks.positive_int("num_particles", num_particles)``.

Counts are Python ints (static: they fix array shapes); ``bool`` is refused although it is an
``int`` subclass.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "positive_int",
    "optional_positive_int",
    "probability",
    "function",
    "instance",
    "strategy",
    "feynman_kac_model",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum`` (``minimum=0`` for counts that may be zero).

    Raises ``ValueError("<name> must be an int >= <minimum>, got <value>")`` otherwise.
    """
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def optional_positive_int(name: str, value: Any, minimum: int = 1) -> int | None:
    """``None`` or an int ≥ ``minimum`` (e.g. an optional horizon or step cap)."""
    if value is None:
        return None
    return positive_int(name, value, minimum)


def probability(name: str, value: Any, *, strict: bool = False) -> float:
    """``value`` as a float in [0, 1] (``strict=True``: in (0, 1), e.g. a target fraction).

    Raises ``ValueError("<name> must be a number in [0, 1], got <value>")`` otherwise.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = 0.0 < v < 1.0 if strict else 0.0 <= v <= 1.0
    if not ok:
        interval = "(0, 1)" if strict else "[0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def function(name: str, value: Any, usage: str) -> Any:
    """``value`` if callable, else ``TypeError("<name> must be callable: <usage>")``."""
    if not callable(value):
        raise TypeError(f"{name} must be callable: {usage}")
    return value


def instance(name: str, value: Any, cls: type) -> Any:
    """``value`` if it is a ``cls``, else ``TypeError("<name> must be a <cls>, got <type>")``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value


def strategy(what: str, value: Any, base: type, table: dict[str, type]) -> Any:
    """A strategy object (an instance of ``base``): ``value`` itself, or ``table[name]()`` for a
    name (case-insensitive). Otherwise ``ValueError("unknown <what> <value>; choose one of ...")``.
    """
    if isinstance(value, base):
        return value
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]()
    raise ValueError(
        f"unknown {what} {value!r}; choose one of {sorted(table)} or pass an {base.__name__} "
        "instance"
    )


def feynman_kac_model(model: Any, name: str = "model") -> Any:
    """``model`` if it is an :class:`~ppl.feynman_kac.AbstractFeynmanKac`, else a ``TypeError``."""
    from ppl.feynman_kac import AbstractFeynmanKac  # ppl.feynman_kac uses these checks too

    if not isinstance(model, AbstractFeynmanKac):
        raise TypeError(
            f"{name} must be an AbstractFeynmanKac (see ppl.feynman_kac), got {type(model).__name__}"
        )
    return model


def prng_key(name: str, key: Any) -> Any:
    """``key`` if it is a JAX PRNG key (typed, ``jax.random.key(seed)``, or raw ``uint32[2]``,
    ``jax.random.PRNGKey(seed)``), traced or not; else ``TypeError`` (an int seed would fail deep
    inside JAX)."""
    import jax
    import jax.numpy as jnp

    if isinstance(key, jax.Array):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            return key
        if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
            return key
    raise TypeError(
        f"{name} must be a JAX PRNG key such as jax.random.key(0), got "
        f"{type(key).__name__} {getattr(key, 'dtype', '')} {getattr(key, 'shape', '')}".rstrip()
    )
