"""Progress bars for compiled loops (PMMH, particle Gibbs, tempered SMC).

A jit-compiled ``lax.scan`` or ``while_loop`` cannot print; it can call back to the host. The
eager entry point of a long sampler opens a bar around its compiled call,

    with progress.bar(total, "PMMH", enabled) as on:
        result = compiled(..., progress=on)      # ``on`` is static: False compiles no callback

and inside the loop :func:`tick` sends the iteration (or λ for tempering) to the host at most
about 100 times per run (``jax.debug.callback`` under an un-batched ``lax.cond``). The bar is tqdm's,
written to stderr; ``progress=False`` on the samplers turns it off. Under a transformation (the
caller ``vmap``-s or ``jit``-s the sampler) no bar is opened and nothing is compiled in.

The open bars live in a stack private to this module: host-side display state only, never read
by the numerics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

__all__ = ["bar", "tick", "every", "is_traced"]

_OPEN: list = []  # the bars of the eager calls now running (innermost last)


def is_traced(*values) -> bool:
    """Whether any of ``values`` (pytrees) holds a tracer: then no bar is opened."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values))


@contextlib.contextmanager
def bar(total: int | float, desc: str, enabled: bool, *, unit: str = "it", scale: float = 1.0) -> Iterator[bool]:
    """Open a tqdm bar of ``total`` (in the loop's units × ``scale``) while the block runs; yields
    whether the compiled loop should report (``enabled`` and tqdm importable)."""
    if not enabled:
        yield False
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield False
        return
    fmt = None if scale == 1.0 else "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]"
    t = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, bar_format=fmt)
    _OPEN.append((t, scale))
    try:
        yield True
    finally:
        _OPEN.remove((t, scale))
        t.close()


def _update(value) -> None:
    if not _OPEN:
        return
    t, scale = _OPEN[-1]
    v = float(np.max(np.asarray(value))) * scale  # batched (vmapped chains): the furthest
    v = int(v) if float(v).is_integer() else v
    if v > t.n:
        t.update(v - t.n)


def tick(value, every=None) -> None:
    """Report ``value`` (an un-batched loop counter, or a float such as λ) to the open bar; with
    ``every``, only when ``value % every == 0`` (a real branch when ``value`` is not batched)."""
    if every is None:
        jax.debug.callback(_update, value)
        return
    every = max(int(every), 1)
    jax.lax.cond(value % every == 0, lambda v: jax.debug.callback(_update, v), lambda v: None, value)


def every(total: int, times: int = 100) -> int:
    """The reporting period giving about ``times`` updates over ``total`` iterations."""
    return max(int(total) // times, 1)

