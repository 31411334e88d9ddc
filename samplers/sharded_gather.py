r"""Global resampling over a device mesh that moves only the rows whose ancestor is on another device.

With the particles split over \(D\) devices in contiguous blocks of \(B = N / D\) (the layout of
:mod:`samplers.sharding`), global resampling draws ancestors \(a^{1:N}\) over the whole population
and then has to gather row \(a^i\) into slot \(i\). For an LLM a row is a KV cache (MiB per
particle), and XLA's partitioned gather of a sharded array all-gathers it: every device receives
the \(N - B\) rows it does not hold, \(N (D - 1)\) rows on the wire per resampling step, whatever
the ancestors. Two steps cut this to the rows that must move:

1. **Locality-preserving ancestors** (:func:`local_ancestors`). Particles are exchangeable after
   resampling: any permutation of the ancestor vector gives the same empirical measure, hence the
   same law of everything that follows (the argument of in-place resampling, Murray, Lee & Jacob
   2016, used by :func:`samplers.gather.stable_ancestors`). We choose the permutation in which
   every surviving particle keeps its own slot and the extra copies of a device's particles fill
   that device's free slots first; only the surplus of a device with more offspring \(C_d\) than
   slots goes to devices with fewer. The rows crossing devices are then
   \(\sum_d \max(0, B - C_d)\), the minimum over all placements of the same offspring counts.
2. **A point-to-point gather** (:func:`sharded_gather`, a ``shard_map``): each device copies its
   local rows with a local take (or, for big rows, the in-place row copy of
   :mod:`samplers.gather`), and for each shift \(s = 1, \dots, D-1\) sends device \(d + s\) the rows
   it asked for, in chunks of ``chunk_rows`` rows through ``ppermute`` inside a ``while_loop``
   whose trip count is the largest request at that shift (0: nothing is sent). The ancestor
   vector is replicated (one all-gather of \(N\) int32), so both ends of every transfer know the
   plan without a handshake. On the wire: the rows whose ancestor is on another device, plus the
   padding of the last chunk of each shift (at most ``D · chunk_rows`` rows per active shift).

:class:`ShardedResampling` packages both as a resampling scheme: ``smc(key, model, N, mesh=mesh,
resampling=ShardedResampling("systematic", mesh))``. Its ancestors depend on the number of blocks,
not on the placement, so ``ShardedResampling("systematic", num_devices=8)`` on one device (a plain
gather) draws exactly what the mesh run draws: the same key gives the same result on 1 and 8
devices up to float reduction order. Conditional SMC is not supported.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Int, PyTree

from ppl import tree
from samplers.gather import IN_PLACE_MIN_ROW_BYTES, copy_changed_rows, row_bytes
from samplers.resampling import AbstractResampling, get_resampling

__all__ = ["local_ancestors", "cross_device_rows", "min_cross_device_rows", "sharded_gather",
           "GatherStats", "ShardedResampling"]


def _block(n: int, num_devices: int) -> int:
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    if n % num_devices:
        raise ValueError(f"{n} particles do not split into {num_devices} equal device blocks")
    return n // num_devices


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def local_ancestors(ancestors: Int[Array, " N"], num_devices: int) -> Int[Array, " N"]:
    r"""A permutation of ``ancestors`` that keeps offspring on their parent's device.

    Returns ``b`` with the same offspring counts as ``ancestors`` such that (i) every surviving
    particle keeps its slot (``b[i] = i`` when ``i`` has a child, so an in-place row copy is
    safe), (ii) on each device \(d\) with \(C_d\) offspring of its \(B\) particles,
    \(\min(C_d, B)\) of them stay on \(d\), and (iii) the surplus copies fill the free slots of
    the devices with \(C_d < B\), both listed in increasing order. Then
    \(\#\{i : \mathrm{dev}(b_i) \ne \mathrm{dev}(i)\} = \sum_d \max(0, B - C_d)\), the minimum
    (:func:`min_cross_device_rows`). O(N), jit-compatible; the law of the resampled population is
    unchanged (particles are exchangeable).
    """
    n = ancestors.shape[0]
    b = _block(n, num_devices)
    dt = ancestors.dtype
    counts = jnp.zeros(n, jnp.int32).at[ancestors].add(1)
    alive = counts > 0
    per_dev_children = counts.reshape(num_devices, b).sum(1)
    per_dev_alive = alive.reshape(num_devices, b).sum(1).astype(jnp.int32)
    extra_d = per_dev_children - per_dev_alive  # extra copies of the device's particles
    free_d = b - per_dev_alive  # slots of its dead particles
    # the extra copies, by ancestor (hence by device), and the dead slots, by slot (by device):
    # the first #dead entries of each list are valid and there are equally many of both
    num_dead = n - jnp.sum(alive.astype(jnp.int32))
    k = jnp.arange(n, dtype=jnp.int32)
    valid = k < num_dead
    extras = jnp.repeat(jnp.arange(n, dtype=dt), jnp.maximum(counts - 1, 0), total_repeat_length=n)
    dead = jnp.nonzero(~alive, size=n, fill_value=n)[0].astype(jnp.int32)
    e_dev = jnp.clip(extras // b, 0, num_devices - 1).astype(jnp.int32)
    s_dev = jnp.clip(dead // b, 0, num_devices - 1)
    e_rank = k - _exclusive_cumsum(extra_d)[e_dev]  # rank among its device's extras
    s_rank = k - _exclusive_cumsum(free_d)[s_dev]  # rank among its device's dead slots
    stays = valid & (e_rank < free_d[e_dev])
    exported = valid & ~stays
    imported = valid & (s_rank >= extra_d[s_dev])
    # the q-th exported copy goes to the q-th imported slot (position in the dead-slot list)
    import_pos = jnp.nonzero(imported, size=n, fill_value=n)[0].astype(jnp.int32)
    q = jnp.cumsum(exported.astype(jnp.int32)) - 1
    start_free = _exclusive_cumsum(free_d)
    target = jnp.where(stays, start_free[e_dev] + e_rank, import_pos[jnp.clip(q, 0, n - 1)])
    slot = jnp.where(valid, dead[jnp.clip(target, 0, n - 1)], n)
    return jnp.arange(n, dtype=dt).at[slot].set(extras, mode="drop")


def cross_device_rows(ancestors: Int[Array, " N"], num_devices: int) -> Int[Array, ""]:
    r"""\(\#\{i : \lfloor a_i / B \rfloor \ne \lfloor i / B \rfloor\}\): slots whose ancestor lives
    on another device."""
    n = ancestors.shape[0]
    b = _block(n, num_devices)
    return jnp.sum((ancestors // b != jnp.arange(n) // b).astype(jnp.int32))


def min_cross_device_rows(ancestors: Int[Array, " N"], num_devices: int) -> Int[Array, ""]:
    r"""\(\sum_d \max(0, B - C_d)\) (\(C_d\) the offspring of device \(d\)'s particles): the fewest
    rows that must change device for these offspring counts."""
    n = ancestors.shape[0]
    b = _block(n, num_devices)
    c = jnp.zeros(num_devices, jnp.int32).at[ancestors // b].add(1)
    return jnp.sum(jnp.maximum(b - c, 0))


class GatherStats(NamedTuple):
    """What :func:`sharded_gather` sent between devices (replicated scalars).

    Attributes:
        rows_sent: rows that crossed a device (counted from the send masks inside the gather).
        wire_rows: rows on the wire including the padding of the chunks (the sum over shifts of
            rounds · chunk_rows · D).
        rounds: ``ppermute`` rounds per shift s = 1, ..., D-1.
    """

    rows_sent: Int[Array, ""]
    wire_rows: Int[Array, ""]
    rounds: Int[Array, " S"]


def _to_words(v: Array) -> Array:
    """Rows [K, ...] of any dtype as uint32 words [K, W] (bit-exact; padded to whole words)."""
    k = v.shape[0]
    if v.dtype == jnp.bool_:
        v = v.astype(jnp.uint8)
    size = v.dtype.itemsize
    flat = v.reshape(k, -1)
    if size >= 4:
        return jax.lax.bitcast_convert_type(flat, jnp.uint32).reshape(k, -1)
    per = 4 // size
    m = flat.shape[1]
    flat = jnp.pad(flat, ((0, 0), (0, -m % per)))
    utype = jnp.uint8 if size == 1 else jnp.uint16
    narrow = jax.lax.bitcast_convert_type(flat, utype).reshape(k, -1, per)
    return jax.lax.bitcast_convert_type(narrow, jnp.uint32)


def _from_words(w: Array, like: Array) -> Array:
    """Inverse of :func:`_to_words` for rows shaped and typed like ``like`` ([N, ...])."""
    k = w.shape[0]
    dtype = jnp.dtype(jnp.uint8) if like.dtype == jnp.bool_ else like.dtype
    size = dtype.itemsize
    m = math.prod(like.shape[1:])
    if size >= 4:
        flat = jax.lax.bitcast_convert_type(w.reshape(k, m, size // 4) if size > 4 else w[:, :m], dtype)
    else:
        utype = jnp.uint8 if size == 1 else jnp.uint16
        narrow = jax.lax.bitcast_convert_type(w, utype).reshape(k, -1)[:, :m]
        flat = jax.lax.bitcast_convert_type(narrow, dtype)
    out = flat.reshape((k,) + like.shape[1:])
    return out.astype(jnp.bool_) if like.dtype == jnp.bool_ else out


def _num_words(x: Array) -> int:
    size = 1 if x.dtype == jnp.bool_ else x.dtype.itemsize
    return -(-math.prod(x.shape[1:]) * size // 4)


def sharded_gather(
    particles: PyTree,
    ancestors: Int[Array, " N"],
    mesh: Mesh,
    *,
    chunk_rows: int | None = None,
    in_place: bool = False,
) -> tuple[PyTree, GatherStats]:
    r"""``particles[ancestors]`` on particles split over ``mesh``'s first axis, moving only the rows
    whose ancestor is on another device: ``(moved, stats)``.

    Local rows are copied on their device: a take, or with ``in_place=True`` and rows of at least
    :data:`samplers.gather.IN_PLACE_MIN_ROW_BYTES` the in-place copy of the changed rows (exact only
    for stable ancestors, every source row a fixed point, as :func:`local_ancestors` gives). Remote rows travel
    point-to-point: for each shift \(s\), rounds of ``chunk_rows`` rows (default \(\lceil B / 8
    \rceil\)) from device \(d\) to \(d + s\), as many rounds as the largest request at that shift;
    the rows of every leaf are packed into one uint32 buffer, so a round is one ``ppermute``. All
    rounds of all shifts run in one ``while_loop`` (a ``switch`` picks the shift's ``ppermute``).
    Exact for any ancestors; the traffic is minimal with :func:`local_ancestors`.
    """
    axis = mesh.axis_names[0]
    d_num = mesh.shape[axis]
    n = ancestors.shape[0]
    b = _block(n, d_num)
    leaves, treedef = jax.tree.flatten(particles)
    for x in leaves:
        if jnp.shape(x)[:1] != (n,):
            raise ValueError(f"every particle leaf needs leading axis {n}, got {jnp.shape(x)}")
    k_rows = max(1, math.ceil(b / 8)) if chunk_rows is None else int(chunk_rows)
    if k_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
    in_place = bool(in_place) and row_bytes(particles) >= IN_PLACE_MIN_ROW_BYTES
    ancestors = ancestors.astype(jnp.int32)
    # pair[src, dst]: rows of device dst whose ancestor is on device src (the same on every device)
    pair = jnp.zeros((d_num, d_num), jnp.int32).at[ancestors // b, jnp.arange(n) // b].add(1)
    devs = jnp.arange(d_num)
    if d_num > 1:
        rounds = jnp.stack([(jnp.max(pair[devs, (devs + s) % d_num]) + k_rows - 1) // k_rows
                            for s in range(1, d_num)]).astype(jnp.int32)
    else:
        rounds = jnp.zeros((0,), jnp.int32)
    ends = jnp.cumsum(rounds)
    total_rounds = ends[-1] if d_num > 1 else jnp.zeros((), jnp.int32)
    widths = [_num_words(x) for x in leaves]
    offsets = [sum(widths[:i]) for i in range(len(widths))]

    def body(xs, anc, ends, total_rounds):
        d = jax.lax.axis_index(axis)
        mine = jax.lax.dynamic_slice_in_dim(anc, d * b, b)
        src_dev = mine // b
        here = jnp.arange(b, dtype=jnp.int32)
        local_idx = jnp.where(src_dev == d, mine - d * b, here)
        out = copy_changed_rows(xs, local_idx) if in_place else [jnp.take(x, local_idx, axis=0) for x in xs]

        def step(c):
            j, out, sent = c
            si = jnp.searchsorted(ends, j, side="right").astype(jnp.int32)  # shift s = si + 1
            r = j - jnp.where(si > 0, ends[jnp.maximum(si - 1, 0)], 0)
            s = si + 1
            req = jax.lax.dynamic_slice_in_dim(anc, ((d + s) % d_num) * b, b)
            ask = req // b == d
            n_send = jnp.sum(ask.astype(jnp.int32))
            send_rows = (req - d * b)[jnp.nonzero(ask, size=b, fill_value=0)[0]]
            get = src_dev == (d - s) % d_num
            n_get = jnp.sum(get.astype(jnp.int32))
            get_slots = jnp.nonzero(get, size=b, fill_value=b)[0]
            kk = r * k_rows + jnp.arange(k_rows, dtype=jnp.int32)
            idx = send_rows[jnp.clip(kk, 0, b - 1)]
            buf = jnp.concatenate([_to_words(jnp.take(x, idx, axis=0)) for x in xs], axis=1)
            branches = [lambda v, s=s_: jax.lax.ppermute(v, axis, [(i, (i + s) % d_num) for i in range(d_num)])
                        for s_ in range(1, d_num)]
            buf = jax.lax.switch(si, branches, buf)
            where = jnp.where(kk < n_get, get_slots[jnp.clip(kk, 0, b - 1)], b)
            out = [o.at[where].set(_from_words(buf[:, off: off + w], o), mode="drop")
                   for o, off, w in zip(out, offsets, widths)]
            return j + 1, out, sent + jnp.sum((kk < n_send).astype(jnp.int32))

        if d_num > 1:
            _, out, sent = jax.lax.while_loop(lambda c: c[0] < total_rounds, step,
                                              (jnp.zeros((), jnp.int32), out, jnp.zeros((), jnp.int32)))
        else:
            sent = jnp.zeros((), jnp.int32)
        return out, jax.lax.psum(sent, axis)

    spec = PartitionSpec(axis)
    moved, rows_sent = jax.shard_map(
        body, mesh=mesh, in_specs=(spec, PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=(spec, PartitionSpec()), check_vma=False,
    )(leaves, ancestors, ends, total_rounds)
    wire = total_rounds * k_rows * d_num
    return jax.tree.unflatten(treedef, moved), GatherStats(
        rows_sent=rows_sent, wire_rows=wire.astype(jnp.int32), rounds=rounds)


class ShardedResampling(AbstractResampling):
    r"""Global resampling whose offspring stay on their parent's device (see the module docstring).

    ``ShardedResampling(scheme, mesh)``: ancestors drawn by ``scheme`` over all \(N\) particles
    (the one-device law), permuted by :func:`local_ancestors` for the mesh's \(D\) blocks, and
    moved by :func:`sharded_gather`. ``ShardedResampling(scheme, num_devices=D)`` without a mesh
    draws the same ancestors and gathers them on one device (the reference of the mesh run).
    Pass the same mesh to ``smc(..., mesh=mesh)``. Conditional SMC is not supported.
    """

    scheme: AbstractResampling
    num_devices: int = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True)
    chunk_rows: int | None = eqx.field(static=True)

    #: the SMC kernel calls :meth:`gather` for rows of any size (no stable re-permutation)
    gathers_rows_itself: ClassVar[bool] = True

    def __init__(self, scheme: str | AbstractResampling = "systematic", mesh: Mesh | None = None, *,
                 num_devices: int | None = None, chunk_rows: int | None = None):
        if isinstance(scheme, ShardedResampling):
            raise ValueError("ShardedResampling cannot nest another ShardedResampling")
        self.scheme = get_resampling(scheme)
        if mesh is not None:
            d = mesh.shape[mesh.axis_names[0]]
            if num_devices is not None and num_devices != d:
                raise ValueError(f"num_devices={num_devices} but the mesh axis has {d} devices")
            num_devices = d
        if num_devices is None:
            raise ValueError("give a mesh or num_devices")
        _block(num_devices, num_devices)  # validates the integer
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self.num_devices = num_devices
        self.mesh = mesh
        self.chunk_rows = chunk_rows

    def __call__(self, key, log_weights, num_samples=None):
        n = log_weights.shape[0]
        if num_samples is not None and num_samples != n:
            raise ValueError("ShardedResampling draws exactly N ancestors (num_samples = N)")
        a = self.scheme(key, log_weights, n).astype(jnp.int32)
        return local_ancestors(a, self.num_devices)

    def gather(self, particles: PyTree, ancestors: Int[Array, " N"]) -> PyTree:
        """``particles[ancestors]``: :func:`sharded_gather` on the mesh, a plain gather without
        (and for rows of at most 8 bytes, such as the log-weights, where XLA's partitioned gather
        of N scalars is as cheap as any plan)."""
        if self.mesh is None or row_bytes(particles) <= 8:
            return tree.gather(particles, ancestors)
        return sharded_gather(particles, ancestors, self.mesh, chunk_rows=self.chunk_rows,
                              in_place=True)[0]  # local_ancestors are stable

    def conditional(self, key, log_weights, pin=0):
        raise NotImplementedError("conditional SMC with ShardedResampling is not supported")

    def _conditional_at_zero(self, key, weights):
        raise NotImplementedError("conditional SMC with ShardedResampling is not supported")
