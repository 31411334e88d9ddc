"""Row operations on pytrees of particles (the one copy the whole toolkit uses).

A population of particles is a pytree whose array leaves share a leading axis: the particle axis N
(or, for a stored path, the time axis T; for a population of paths, [M, T, ...]). Resampling,
conditional SMC, smoothing, search and particle MCMC all move rows of such pytrees; these functions
do it leaf by leaf, the same way everywhere, so that a change (e.g. how a row is selected) is made
once.

All functions are pure and jit-compatible; indices and masks may be traced. Leaves keep their
dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree

__all__ = [
    "leading_size",
    "num_particles",
    "gather",
    "row",
    "where_rows",
    "where",
    "set_row",
    "index_time",
    "broadcast_rows",
    "add_axis",
    "prepend",
    "consecutive",
    "buffer",
]


def leading_size(tree: PyTree, what: str = "pytree") -> int:
    """Size of the leading axis of the first array leaf (static).

    Raises ``ValueError`` when ``tree`` has no leaves or its first leaf is a scalar; ``what`` names
    the tree in the message.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{what} has no array leaves")
    shape = jnp.shape(leaves[0])
    if not shape:
        raise ValueError(f"{what} needs a leading axis; its first leaf is a scalar")
    return shape[0]


def num_particles(particles: PyTree) -> int:
    """N, the size of the particle axis of a population (static)."""
    return leading_size(particles, "particles pytree")


def gather(tree: PyTree, idx: Int[ArrayLike, " M"]) -> PyTree:
    """Rows ``idx`` of every leaf: ``x[idx]`` along the leading axis (resampling's gather)."""
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def row(tree: PyTree, i: Int[ArrayLike, ""]) -> PyTree:
    """Row ``i`` of every leaf (one particle, leaves without the leading axis)."""
    return jax.tree.map(lambda x: jnp.take(x, i, axis=0), tree)


def where_rows(mask: Bool[Array, " N"], a: PyTree, b: PyTree) -> PyTree:
    """Row i from ``a`` where ``mask[i]``, else from ``b`` (``a`` and ``b`` of equal structure)."""

    def sel(x, y):
        return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y)

    return jax.tree.map(sel, a, b)


def where(pred: Bool[ArrayLike, ""], a: PyTree, b: PyTree) -> PyTree:
    """The whole of ``a`` if ``pred`` else the whole of ``b`` (a scalar select per leaf; the
    leaves of ``b`` are cast to the dtypes of ``a``)."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y.astype(x.dtype)), a, b)


def set_row(tree: PyTree, i: Int[ArrayLike, ""], value: PyTree) -> PyTree:
    """``tree`` with row ``i`` of every leaf replaced by ``value`` (leaves without the axis)."""
    return jax.tree.map(lambda x, r: x.at[i].set(r), tree, value)


def index_time(tree: PyTree, t: Int[ArrayLike, ""]) -> PyTree:
    """Slice ``t`` of the leading (time) axis of every leaf, for a traced ``t``
    (``dynamic_index_in_dim``: no gather)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, t, 0, keepdims=False), tree)


def broadcast_rows(value: PyTree, n: int) -> PyTree:
    """``n`` copies of one particle (leaves gain a leading axis of size ``n``; no copy is made
    until XLA needs one)."""
    return jax.tree.map(lambda r: jnp.broadcast_to(r, (n,) + jnp.shape(r)), value)


def add_axis(tree: PyTree) -> PyTree:
    """Every leaf with a new leading axis of size 1 (one particle as a population of one)."""
    return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)


def prepend(first: PyTree, rest: PyTree) -> PyTree:
    """``first`` (leaves without the leading axis) stacked before ``rest`` (leaves [T, ...]):
    leaves [1 + T, ...]. Step 0's value in front of a ``scan``'s stacked steps 1..T."""
    return jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a)[None], b]), first, rest)


def consecutive(path: PyTree) -> tuple[PyTree, PyTree]:
    """``(path[:-1], path[1:])``: the pairs (x_{t−1}, x_t), t = 1..T−1, of a path (leaves
    [T, ...])."""
    return jax.tree.map(lambda x: x[:-1], path), jax.tree.map(lambda x: x[1:], path)


def buffer(like: PyTree, length: int) -> PyTree:
    """Zeros with a new leading axis of ``length`` and the shapes and dtypes of ``like``'s leaves
    (an output buffer written row by row inside a loop)."""
    return jax.tree.map(
        lambda x: jnp.zeros((length,) + jnp.shape(x), jnp.result_type(x)), like
    )
