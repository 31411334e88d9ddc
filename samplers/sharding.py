r"""Particles sharded over a device mesh: the particle axis is the data axis.

A one-axis :class:`jax.sharding.Mesh` (:func:`particle_mesh`) splits the \(N\) particles into
contiguous blocks of \(N / D\), one per device. ``samplers.smc(..., mesh=mesh)`` keeps every
particle leaf and the log-weights sharded that way after each step (a sharding constraint inside
the compiled loop); XLA's SPMD partitioner then runs moves and potentials where their particles
live and inserts the collectives: log-sum-exp for \(\log \hat Z\) and the ESS (one scalar
all-reduce each), and, for *global* resampling, the cumulative sums of the resampling scheme (a
prefix over the \(D\) block totals) and the gather of the resampled rows, which moves the rows
whose ancestor lives on another device. Global resampling is the one-device algorithm: the same
law, and, because JAX's random bits do not depend on the sharding, the same key gives the same
draws on any number of devices up to float32 reduction order.

:class:`Islands` resamples inside each block instead (island particle filter, Vergé, Dubarry,
Del Moral & Moulines 2015): no particle crosses a device, and each island keeps its total weight
\(W_j\) (its particles get \(\log W_j - \log(N/D)\) after resampling), so \(\hat Z\) stays
unbiased. The price: an island whose weight collapses is not refilled from the others, so the
variance is larger than global resampling's at the same \(N\). The optional exchange
(``exchange_threshold``) resamples the islands themselves by their masses when the islands' ESS
is low, copying whole islands between devices (only the islands that are replaced).

For big rows (LLM KV caches) the partitioned gather of global resampling is costly (XLA moves the
whole population); :class:`samplers.sharded_gather.ShardedResampling` draws the same global law,
keeps offspring on their parent's device where possible and sends only the rows whose ancestor is
on another device, point to point.

    mesh = particle_mesh()                       # all devices on the "particles" axis
    res = smc(key, model, n, mesh=mesh)          # global resampling, sharded
    res = smc(key, model, n, mesh=mesh, resampling=Islands("systematic", mesh.size))
    res = smc(key, model, n, mesh=mesh,          # islands, exchanged when their ESS < K/2
              resampling=Islands("systematic", mesh.size, exchange_threshold=0.5, mesh=mesh))
    res = smc(key, model, n, mesh=mesh, resampling=ShardedResampling("systematic", mesh))

With the kernel (online filtering), shard the state yourself: ``state =
shard_particles(smc_kernel.init(...), mesh)``; a jitted ``smc_kernel.step`` then runs sharded (its
outputs follow the inputs' sharding; :func:`constrain` pins it inside a loop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PyTree

from samplers.gather import stable_ancestors
from samplers.resampling import AbstractResampling, ess, get_resampling
from samplers.sharded_gather import sharded_gather

__all__ = ["PARTICLE_AXIS", "particle_mesh", "particle_sharding", "shard_particles", "constrain",
           "Islands"]

PARTICLE_AXIS = "particles"


def particle_mesh(devices: Sequence[Any] | None = None, axis_name: str = PARTICLE_AXIS) -> Mesh:
    """A one-axis mesh over ``devices`` (default: all of ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("particle_mesh needs at least one device")
    return Mesh(np.asarray(devices), (axis_name,))


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) < 1:
        raise ValueError("the mesh has no axis")
    return mesh.axis_names[0]


def particle_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (particle) axis split over the mesh's first axis, the other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(_axis(mesh)))


def check_divisible(num_particles: int, mesh: Mesh) -> None:
    """Clear error unless the particles split evenly over the mesh's first axis."""
    d = mesh.shape[_axis(mesh)]
    if num_particles % d:
        raise ValueError(
            f"num_particles={num_particles} must be a multiple of the {d} devices of the mesh axis "
            f"{_axis(mesh)!r} (equal blocks of particles per device)"
        )


def _leaf_sharding(x, mesh: Mesh):
    return particle_sharding(mesh) if jnp.ndim(x) >= 1 else NamedSharding(mesh, PartitionSpec())


def shard_particles(particles: PyTree, mesh: Mesh) -> PyTree:
    """Place a pytree on the mesh, leaves split along their leading axis (scalars replicated);
    e.g. an :class:`~samplers.smc_kernel.SMCState` for online filtering."""
    for x in jax.tree.leaves(particles):
        if jnp.ndim(x) >= 1:
            check_divisible(jnp.shape(x)[0], mesh)
    return jax.tree.map(lambda x: jax.device_put(x, _leaf_sharding(x, mesh)), particles)


def constrain(particles: PyTree, mesh: Mesh | None) -> PyTree:
    """Inside ``jit``: keep the leaves split along their leading axis (no-op without a mesh)."""
    if mesh is None:
        return particles
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, _leaf_sharding(x, mesh)), particles)


class Islands(AbstractResampling):
    r"""Resample inside each of ``num_islands`` contiguous blocks of particles, with an optional
    island-level exchange.

    Block \(j\) (particles \(jB, \dots, (j+1)B - 1\), \(B = N / K\)) draws \(B\) ancestors among its own
    particles with ``scheme`` on its normalised weights; after resampling its particles carry
    \(\log W_j - \log B\), \(W_j\) the block's share of the total weight, so the weights stay
    normalised and \(\hat Z\) unbiased (each block is an unbiased resampling of its own measure).
    With the blocks on the devices of a mesh (``smc(..., mesh=mesh)`` with ``num_islands`` the
    mesh size) resampling and the gather of the rows are local: nothing crosses a device but the
    two scalar reductions (log-sum-exp, ESS).

    **Exchange** (the double bootstrap of Vergé, Dubarry, Del Moral & Moulines 2015, §3): at a
    resampling step where the islands' masses are uneven, \(\mathrm{ESS}(W_{1:K}) <\)
    ``exchange_threshold`` \(\cdot K\), the islands themselves are resampled after their particles:
    \(K\) source islands are drawn with ``exchange_scheme`` from \(W_{1:K}\) (an unbiased island-level
    resampling), island \(j\) becomes a copy of its source island's resampled particles, and every
    particle then carries \(-\log N\) (each island mass \(1/K\)): \(\hat Z\) stays unbiased, and
    a collapsed island is refilled from the heavy ones. Surviving islands keep their slot
    (:func:`samplers.gather.stable_ancestors` at the island level), so an exchange copies only the
    islands that died: \(B\) rows each. ``exchange_threshold`` 0 (default) never exchanges, 1
    exchanges at every resampling step. With ``mesh`` (islands = the mesh's devices) the rows move
    by :func:`samplers.sharded_gather.sharded_gather`: an exchange sends exactly the copied
    islands' rows, a step without exchange sends nothing. Conditional SMC is not supported.
    """

    scheme: AbstractResampling
    num_islands: int = eqx.field(static=True)
    exchange_threshold: float = eqx.field(static=True)
    exchange_scheme: AbstractResampling
    mesh: Mesh | None = eqx.field(static=True)

    def __init__(self, scheme: str | AbstractResampling = "systematic", num_islands: int = 1, *,
                 exchange_threshold: float = 0.0,
                 exchange_scheme: str | AbstractResampling = "systematic",
                 mesh: Mesh | None = None):
        if isinstance(scheme, Islands) or isinstance(exchange_scheme, Islands):
            raise ValueError("Islands cannot nest another Islands scheme")
        self.scheme = get_resampling(scheme)
        if isinstance(num_islands, bool) or not isinstance(num_islands, int) or num_islands < 1:
            raise ValueError(f"num_islands must be a positive integer, got {num_islands!r}")
        self.num_islands = num_islands
        if (isinstance(exchange_threshold, bool) or not isinstance(exchange_threshold, (int, float))
                or not 0.0 <= exchange_threshold <= 1.0):
            raise ValueError(f"exchange_threshold must be a number in [0, 1], got {exchange_threshold!r}")
        self.exchange_threshold = float(exchange_threshold)
        self.exchange_scheme = get_resampling(exchange_scheme)
        if mesh is not None and num_islands % mesh.shape[_axis(mesh)]:
            raise ValueError(f"num_islands={num_islands} must be a multiple of the mesh's "
                             f"{mesh.shape[_axis(mesh)]} devices")
        self.mesh = mesh

    @property
    def gathers_rows_itself(self) -> bool:
        """With a mesh the kernel calls :meth:`gather` for rows of any size."""
        return self.mesh is not None

    def _block(self, n: int) -> int:
        if n % self.num_islands:
            raise ValueError(
                f"{n} particles do not split into {self.num_islands} equal islands")
        return n // self.num_islands

    def island_log_masses(self, log_weights: Float[Array, " N"]) -> Float[Array, " K"]:
        r"""\(\log W_j\), the normalised log-mass of each island."""
        b = self._block(log_weights.shape[0])
        mass = jax.nn.logsumexp(log_weights.reshape(self.num_islands, b), axis=1)
        return mass - jax.nn.logsumexp(mass)  # normalised (the input is, up to rounding)

    def exchanges(self, log_weights: Float[Array, " N"]) -> Bool[Array, ""]:
        r"""Whether a resampling step with these weights exchanges islands:
        \(\mathrm{ESS}(W_{1:K}) <\) ``exchange_threshold`` \(\cdot K\) (always at 1, never at 0)."""
        if self.exchange_threshold <= 0.0 or self.num_islands == 1:
            return jnp.asarray(False)
        if self.exchange_threshold >= 1.0:
            return jnp.asarray(True)
        return ess(self.island_log_masses(log_weights)) < self.exchange_threshold * self.num_islands

    def island_ancestors(self, key, log_weights: Float[Array, " N"]) -> Int[Array, " K"]:
        """Source island of each island slot (the identity when no exchange happens): drawn by
        ``exchange_scheme`` from the island masses, surviving islands in their own slot."""
        k = self.num_islands
        drawn = stable_ancestors(self.exchange_scheme(key, self.island_log_masses(log_weights), k)
                                 .astype(jnp.int32))
        return jnp.where(self.exchanges(log_weights), drawn, jnp.arange(k, dtype=jnp.int32))

    def __call__(self, key, log_weights, num_samples=None):
        n = log_weights.shape[0]
        if num_samples is not None and num_samples != n:
            raise ValueError("Islands resampling draws exactly N ancestors (num_samples = N)")
        b = self._block(n)
        k = self.num_islands
        keys = jax.random.split(key, k)
        blocks = log_weights.reshape(k, b)
        local = jax.vmap(lambda kk, lw: self.scheme(kk, lw, b))(keys, blocks)
        local = local + (jnp.arange(k, dtype=jnp.int32) * b)[:, None]
        if self.exchange_threshold > 0.0 and k > 1:
            local = local[self.island_ancestors(jax.random.fold_in(key, k), log_weights)]
        return local.reshape(n).astype(jnp.int32)

    def log_weights_after(self, log_weights: Float[Array, " N"]) -> Float[Array, " N"]:
        r"""\(\log W_j - \log B\) for every particle of block \(j\); \(-\log N\) after an exchange."""
        n = log_weights.shape[0]
        b = self._block(n)
        kept = jnp.repeat(self.island_log_masses(log_weights) - math.log(b), b, total_repeat_length=n)
        return jnp.where(self.exchanges(log_weights), -math.log(n), kept)

    def gather(self, particles: PyTree, ancestors: Int[Array, " N"]) -> PyTree:
        """Block-local gather after an island-level copy of the exchanged islands (if any); with
        a mesh, :func:`samplers.sharded_gather.sharded_gather` (only copied islands cross)."""
        n = ancestors.shape[0]
        b = self._block(n)
        k = self.num_islands
        if self.mesh is not None:
            return sharded_gather(particles, ancestors, self.mesh)[0]
        rows = ancestors.reshape(k, b)
        source = rows[:, 0] // b  # every particle of island j descends from island source[j]
        local = rows - (source * b)[:, None]

        def take(x):
            xb = x.reshape((k, b) + x.shape[1:])
            if self.exchange_threshold > 0.0 and k > 1:
                moved = jnp.any(source != jnp.arange(k))
                xb = jax.lax.cond(moved, lambda y: jnp.take(y, source, axis=0), lambda y: y, xb)
            return jax.vmap(lambda r, idx: jnp.take(r, idx, axis=0))(xb, local).reshape(x.shape)

        return jax.tree.map(take, particles)

    def conditional(self, key, log_weights, pin=0):
        raise NotImplementedError("conditional SMC with Islands resampling is not supported")

    def _conditional_at_zero(self, key, weights):
        raise NotImplementedError("conditional SMC with Islands resampling is not supported")
