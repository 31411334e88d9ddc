"""samplers.gather: stable ancestors and the in-place row copy used by the engine for big particles.

Exact checks: the stable permutation has the same offspring counts and keeps every survivor in its
slot; the in-place copy equals the plain gather ``x[a]``; the engine with big rows (an LGSSM whose
particles carry a 64 KiB payload that must travel with the state) keeps every payload row equal
to its particle's state and records ancestors consistent with it, and its log Ẑ agrees with the
Kalman filter within Monte Carlo error. The broken companion: an unstable ancestor vector (a swap)
copied in place gives a wrong answer, which is why the ancestors are made stable first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.linear_gaussian import LGSSMParams, kalman_filter, lgssm
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.gather import (
    IN_PLACE_MIN_ROW_BYTES,
    copy_changed_rows,
    resample_rows,
    is_stable,
    row_bytes,
    stable_ancestors,
)
from samplers.smc import smc


def test_stable_ancestors_keep_counts_and_survivors():
    for n in (1, 2, 7, 32):
        for s in range(25):
            a = jax.random.categorical(jax.random.key(s), jax.random.normal(jax.random.key(s + 99), (n,)),
                                       shape=(n,))
            b = np.asarray(stable_ancestors(a))
            a = np.asarray(a)
            np.testing.assert_array_equal(np.bincount(a, minlength=n), np.bincount(b, minlength=n))
            survivors = np.unique(a)
            np.testing.assert_array_equal(b[survivors], survivors)
            assert bool(is_stable(jnp.asarray(b)))


def test_in_place_copy_equals_gather_and_fails_on_unstable_input():
    x = jax.random.normal(jax.random.key(0), (6, 3, 4))
    a = jnp.asarray([0, 0, 2, 2, 2, 5])
    b = stable_ancestors(a)
    np.testing.assert_array_equal(copy_changed_rows(x, b), x[b])
    big = jnp.zeros((6, IN_PLACE_MIN_ROW_BYTES // 4)) + jnp.arange(6.0)[:, None]
    moved, used = resample_rows(big, a)
    np.testing.assert_array_equal(used, b)
    np.testing.assert_array_equal(moved, big[b])
    moved, used = resample_rows(x, a)  # small rows: a plain gather with the ancestors as given
    np.testing.assert_array_equal(used, a)
    np.testing.assert_array_equal(moved, x[a])
    swap = jnp.asarray([1, 0, 2, 3, 4, 5])  # a cycle: not stable
    assert not bool(is_stable(swap))
    # the broken route: copying a cycle in place reads a row it already overwrote
    assert not np.array_equal(copy_changed_rows(x, swap), x[swap])
    assert row_bytes({"a": x, "b": jnp.zeros((6,))}) == 3 * 4 * 4 + 4


class _PayloadFK(AbstractFeynmanKac):
    """An LGSSM bootstrap filter whose particles also carry a big payload row = the state."""

    inner: AbstractFeynmanKac
    width: int = 16384  # 64 KiB of float32 per particle

    @property
    def num_steps(self):
        return self.inner.num_steps

    def _wrap(self, x):
        return x, jnp.broadcast_to(x.reshape(x.shape[0], -1)[:, :1], (x.shape[0], self.width))

    def init(self, key, num_particles):
        return self._wrap(self.inner.init(key, num_particles))

    def move(self, key, t, particles):
        x, payload = particles
        ok = jnp.all(payload == x.reshape(x.shape[0], -1)[:, :1], axis=1)  # the payload came along
        new = self.inner.move(key, t, x)
        return self._wrap(jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), new, jnp.nan))

    def log_potential(self, t, previous, particles):
        return self.inner.log_potential(t, None if previous is None else previous[0], particles[0])


def test_engine_with_big_rows_moves_payloads_with_states():
    params = LGSSMParams.scalar(0.9, 0.5, 1.0, 1.0)
    ssm = lgssm(params)
    _, ys = ssm.simulate(jax.random.key(1), 12)
    model = _PayloadFK(ssm.bootstrap(ys))
    n = 16
    assert row_bytes(model.init(jax.random.key(0), n)) >= IN_PLACE_MIN_ROW_BYTES
    run = jax.jit(jax.vmap(lambda k: smc(k, model, n, ess_threshold=1.0, store_history=True)))
    res = run(jax.random.split(jax.random.key(2), 64))
    x, payload = res.particles
    # a payload that did not follow its particle makes the next state NaN, then the potential NaN
    assert int(res.num_nan_potentials.sum()) == 0
    np.testing.assert_array_equal(payload[..., 0], x.reshape(x.shape[:2] + (-1,))[..., 0])
    # recorded ancestors are stable (survivors in their own slots)
    anc = np.asarray(res.history.ancestors[:, 1:])
    assert all(np.array_equal(a[a], a) for a in anc.reshape(-1, n))
    # log Ẑ: the mean of Ẑ/Z over 64 runs is 1 within 4 standard errors
    exact = float(kalman_filter(params, ys).log_likelihood)
    ratio = np.exp(np.asarray(res.log_evidence) - exact)
    assert abs(ratio.mean() - 1) < 4 * ratio.std(ddof=1) / np.sqrt(ratio.size) + 1e-3
