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
variance is larger than global resampling's at the same \(N\) (no exchange step here).

    mesh = particle_mesh()                       # all devices on the "particles" axis
    res = smc(key, model, n, mesh=mesh)          # global resampling, sharded
    res = smc(key, model, n, mesh=mesh, resampling=Islands("systematic", mesh.size))

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
from jaxtyping import Array, Float, Int, PyTree

from samplers.resampling import AbstractResampling, get_resampling

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
    r"""Resample inside each of ``num_islands`` contiguous blocks of particles.

    Block \(j\) (particles \(jB, \dots, (j+1)B - 1\), \(B = N / K\)) draws \(B\) ancestors among its own
    particles with ``scheme`` on its normalised weights; after resampling its particles carry
    \(\log W_j - \log B\), \(W_j\) the block's share of the total weight, so the weights stay
    normalised and \(\hat Z\) unbiased (each block is an unbiased resampling of its own measure).
    With the blocks on the devices of a mesh (``smc(..., mesh=mesh)`` with ``num_islands`` the
    mesh size) resampling and the gather of the rows are local: nothing crosses a device but the
    two scalar reductions (log-sum-exp, ESS). Conditional SMC is not supported.
    """

    scheme: AbstractResampling
    num_islands: int = eqx.field(static=True)

    def __init__(self, scheme: str | AbstractResampling = "systematic", num_islands: int = 1):
        if isinstance(scheme, Islands):
            raise ValueError("Islands cannot nest another Islands scheme")
        self.scheme = get_resampling(scheme)
        if isinstance(num_islands, bool) or not isinstance(num_islands, int) or num_islands < 1:
            raise ValueError(f"num_islands must be a positive integer, got {num_islands!r}")
        self.num_islands = num_islands

    def _block(self, n: int) -> int:
        if n % self.num_islands:
            raise ValueError(
                f"{n} particles do not split into {self.num_islands} equal islands")
        return n // self.num_islands

    def __call__(self, key, log_weights, num_samples=None):
        n = log_weights.shape[0]
        if num_samples is not None and num_samples != n:
            raise ValueError("Islands resampling draws exactly N ancestors (num_samples = N)")
        b = self._block(n)
        k = self.num_islands
        keys = jax.random.split(key, k)
        blocks = log_weights.reshape(k, b)
        local = jax.vmap(lambda kk, lw: self.scheme(kk, lw, b))(keys, blocks)
        return (local + (jnp.arange(k, dtype=jnp.int32) * b)[:, None]).reshape(n).astype(jnp.int32)

    def log_weights_after(self, log_weights: Float[Array, " N"]) -> Float[Array, " N"]:
        r"""\(\log W_j - \log B\) for every particle of block \(j\)."""
        n = log_weights.shape[0]
        b = self._block(n)
        mass = jax.nn.logsumexp(log_weights.reshape(self.num_islands, b), axis=1)
        mass = mass - jax.nn.logsumexp(mass)  # normalised (the input is, up to rounding)
        return jnp.repeat(mass - math.log(b), b, total_repeat_length=n)

    def gather(self, particles: PyTree, ancestors: Int[Array, " N"]) -> PyTree:
        """Block-local gather: every leaf as [K, B, ...], indices within the block."""
        n = ancestors.shape[0]
        b = self._block(n)
        k = self.num_islands
        local = ancestors.reshape(k, b) - (jnp.arange(k, dtype=ancestors.dtype) * b)[:, None]

        def take(x):
            xb = x.reshape((k, b) + x.shape[1:])
            return jax.vmap(lambda rows, idx: jnp.take(rows, idx, axis=0))(xb, local).reshape(x.shape)

        return jax.tree.map(take, particles)

    def conditional(self, key, log_weights, pin=0):
        raise NotImplementedError("conditional SMC with Islands resampling is not supported")

    def _conditional_at_zero(self, key, weights):
        raise NotImplementedError("conditional SMC with Islands resampling is not supported")

