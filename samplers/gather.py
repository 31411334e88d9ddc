"""Moving particles by ancestor indices: the gather that resampling costs, done cheaply for big rows.

After resampling, row ``i`` of the particle population becomes row ``a_i`` of the old one. A plain
gather ``x[a]`` copies every row, which for an LLM particle is the whole KV cache (hundreds of MiB)
although most particles survive. Two facts make it cheaper:

1. The order of the resampled particles is free: particles are exchangeable after resampling, so any
   permutation of ``a`` targets the same law. :func:`stable_ancestors` picks the permutation in which
   every surviving particle keeps its own slot (``a_i = i`` whenever ``i`` has a child), as in
   in-place resampling of Murray, Lee & Jacob (2016, "Parallel resampling in the particle filter",
   §4). Only the slots of dead particles change; with multinomial resampling of equal weights that
   is a fraction 1/e ≈ 37% of the rows, far fewer when the weights are even.
2. With stable ancestors every source row is a fixed point, never written, so the changed rows can
   be overwritten *in place*, one after the other (:func:`copy_changed_rows`): a ``while_loop`` of
   ``dynamic_update_slice`` on donated buffers, touching only the rows that change.

:func:`resample_rows` chooses: stable ancestors and the in-place row copy when the rows are big, a
plain gather otherwise (for small particles one vectorised gather is faster than any loop). The
choice is static (from the shapes): a ``lax.cond`` between the two routes would cost XLA its
buffer aliasing and copy everything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PyTree

from ppl.tree import gather as gather_rows

__all__ = ["stable_ancestors", "is_stable", "copy_changed_rows", "resample_rows", "row_bytes",
           "IN_PLACE_MIN_ROW_BYTES"]

# Rows at least this big are moved by the in-place row copy (an LLM particle row is ~MiB; a
# state-space particle is a few bytes, where one vectorised gather wins).
IN_PLACE_MIN_ROW_BYTES = 64 * 1024


def stable_ancestors(ancestors: Int[Array, " N"]) -> Int[Array, " N"]:
    """The permutation of ``ancestors`` in which each surviving particle keeps its slot.

    Returns ``b`` with the same multiset of values as ``ancestors`` (the same offspring counts) and
    ``b_i = i`` for every ``i`` that appears in ``ancestors``; the extra copies fill the slots of
    the particles that died, in increasing order. O(N), jit-compatible.
    """
    n = ancestors.shape[0]
    counts = jnp.zeros(n, jnp.int32).at[ancestors].add(1)
    alive = counts > 0
    # the extra copies (counts − 1 of each survivor), listed in order; there are exactly #dead of them
    extras = jnp.repeat(jnp.arange(n, dtype=ancestors.dtype), jnp.maximum(counts - 1, 0), total_repeat_length=n)
    dead_slots = jnp.nonzero(~alive, size=n, fill_value=n)[0]
    stable = jnp.arange(n, dtype=ancestors.dtype)
    return stable.at[dead_slots].set(extras, mode="drop")


def is_stable(ancestors: Int[Array, " N"]) -> Bool[Array, ""]:
    """Whether every source row is a fixed point (``a[a_i] = a_i``), i.e. an in-place copy is safe."""
    return jnp.all(ancestors[ancestors] == ancestors)


def row_bytes(tree: PyTree) -> int:
    """Bytes of one row (leading-axis slice) of every array leaf of ``tree`` (static)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if hasattr(x, "shape") and x.ndim >= 1 and x.shape[0] > 0:
            total += x.size // x.shape[0] * x.dtype.itemsize
    return total


def copy_changed_rows(tree: PyTree, ancestors: Int[Array, " N"]) -> PyTree:
    """Row ``i`` ← row ``ancestors[i]`` for the rows where they differ, in place.

    Requires stable ancestors (see :func:`is_stable`); the result is then equal to
    ``tree[ancestors]`` leaf by leaf. The loop runs once per changed row, so its cost is
    (#changed / N) of a full copy, and nothing when no row changes. Donate ``tree`` to the
    enclosing ``jit`` so that XLA updates its buffers in place.
    """
    n = ancestors.shape[0]
    changed = ancestors != jnp.arange(n, dtype=ancestors.dtype)
    num = jnp.sum(changed)
    dest = jnp.nonzero(changed, size=n, fill_value=0)[0]

    def body(carry):
        k, t = carry
        d = dest[k]
        s = ancestors[d]

        def move(x):
            row = jax.lax.dynamic_index_in_dim(x, s, axis=0, keepdims=True)
            return jax.lax.dynamic_update_index_in_dim(x, row, d, axis=0)

        return k + 1, jax.tree.map(move, t)

    _, out = jax.lax.while_loop(lambda c: c[0] < num, body, (jnp.asarray(0, num.dtype), tree))
    return out


def resample_rows(tree: PyTree, ancestors: Int[Array, " N"]) -> tuple[PyTree, Int[Array, " N"]]:
    """Move particles to their ancestors by the cheapest exact route: ``(moved, used_ancestors)``.

    Big rows (one row ≥ :data:`IN_PLACE_MIN_ROW_BYTES`, a static choice): the ancestors are made
    stable (:func:`stable_ancestors`, a permutation of them) and only the changed rows are copied,
    in place (:func:`copy_changed_rows`; donate ``tree`` to the enclosing ``jit``). Small rows: a
    plain gather with the ancestors as given. Either way row ``i`` of ``moved`` is row
    ``used_ancestors[i]`` of ``tree``; record ``used_ancestors`` in the genealogy.
    """
    if row_bytes(tree) < IN_PLACE_MIN_ROW_BYTES:
        return gather_rows(tree, ancestors), ancestors
    stable = stable_ancestors(ancestors)
    return copy_changed_rows(tree, stable), stable
