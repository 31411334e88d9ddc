"""The O(N) inverse CDF behind stratified and systematic resampling, against a float64 search.

``_stratified_search(W, u, M)`` must return ``searchsorted(S, k + u_k, "right")`` (clipped to
N − 1) for the float64 right edges S = M · cumsum(W) / ΣW on the stratum axis, for shared
(systematic) and per-stratum (stratified) offsets, M ≠ N and zero weights; positions within 1e-4
strata of an edge may go either way (the float32 edges are accurate to ~1e-5 strata, see
``_positions``). ``_cumsum`` must match a float64 cumulative sum within the float32 worst-case
rounding bound n · eps · Σ|x|. Both checks reject broken versions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers.resampling import _cumsum, _stratified_search, normalise

CASES = [(1, 4), (33, 12), (1000, 1000), (4097, 8195)]
EDGE = 1e-4  # strata: positions this close to an edge are not compared


def _reference(weights, u, m):
    """(float64 ancestors, mask of positions farther than EDGE from every edge)."""
    w = np.asarray(weights, np.float64)
    edges = m * np.cumsum(w) / w.sum()
    positions = np.arange(m) + np.broadcast_to(np.asarray(u, np.float64), (m,))
    idx = np.clip(np.searchsorted(edges, positions, side="right"), 0, w.shape[0] - 1)
    near = np.searchsorted(edges, positions - EDGE) != np.searchsorted(edges, positions + EDGE)
    return idx, ~near


def _off_by_one(weights, u, m):
    """A deliberately broken search: the window misses the stratum above ⌊M C_i⌋."""
    a = _stratified_search(weights, u, m)
    return jnp.clip(a + (jnp.arange(m) % 7 == 3), 0, weights.shape[0] - 1)


def _cases(n, m, key):
    k_w, k_z, k_u = jax.random.split(key, 3)
    log_w = 3.0 * jax.random.normal(k_w, (n,))
    zeroed = jnp.where(jax.random.bernoulli(k_z, 0.5, (n,)), -jnp.inf, log_w).at[0].set(0.0)
    for lw in (log_w, zeroed):
        weights = jnp.exp(normalise(lw))
        for u in (jax.random.uniform(k_u), jax.random.uniform(k_u, (m,))):
            yield weights, u


@jax.jit
def _both(weights, u_shared, u_strata):
    m = u_strata.shape[0]
    return [_stratified_search(weights, u, m) for u in (u_shared, u_strata)]


def _agrees(got, weights, u, m):
    want, compared = _reference(weights, u, m)
    return np.array_equal(np.asarray(got)[compared], want[compared]), compared.mean()


@pytest.mark.parametrize("n,m", CASES)
def test_matches_searchsorted(n, m):
    cases = list(_cases(n, m, jax.random.key(n * 7919 + m)))
    for i in range(0, len(cases), 2):  # (shared, per-stratum) offsets for one weight vector
        (weights, u_shared), (_, u_strata) = cases[i], cases[i + 1]
        for got, u in zip(_both(weights, u_shared, u_strata), (u_shared, u_strata)):
            ok, frac = _agrees(got, weights, u, m)
            assert ok, f"case {i}"
            assert frac > 0.99  # nearly every position is compared
            assert np.all(np.asarray(weights)[np.asarray(got)] > 0), "a zero-weight particle was selected"


def test_comparison_rejects_broken_search():
    n = m = 1000
    broken = jax.jit(_off_by_one, static_argnums=2)
    weights, u = next(_cases(n, m, jax.random.key(0)))
    assert not _agrees(broken(weights, u, m), weights, u, m)[0]


def _cumsum_ok(fn, x) -> bool:
    x64 = np.asarray(x, np.float64)
    bound = x.shape[0] * np.finfo(np.float32).eps * np.abs(x64).sum()
    return bool(np.max(np.abs(np.asarray(fn(x), np.float64) - np.cumsum(x64))) <= bound)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1025, 100_000])
def test_cumsum_matches_float64(n):
    x = jax.random.uniform(jax.random.key(n), (n,)) - 0.25
    assert _cumsum_ok(jax.jit(_cumsum), x)


def test_cumsum_check_rejects_exclusive_sum():
    x = jax.random.uniform(jax.random.key(1), (1025,))
    assert not _cumsum_ok(jax.jit(lambda v: _cumsum(v) - v), x)
