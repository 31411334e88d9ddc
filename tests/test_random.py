"""ppl.random: the unrolled threefry key implementation gives JAX's default streams bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl import random as prandom


def _draws(key):
    k1, k2 = jax.random.split(key)
    k3 = jax.random.fold_in(k2, 17)
    return dict(
        bits32=jax.random.bits(k1, (7, 3)),
        bits8=jax.random.bits(k1, (5,), dtype=jnp.uint8),
        bits16=jax.random.bits(k2, (4,), dtype=jnp.uint16),
        uniform=jax.random.uniform(k3, (6,)),
        normal=jax.random.normal(k2, (2, 5)),
        categorical=jax.random.categorical(k3, jnp.log(jnp.arange(1.0, 6.0)), shape=(8,)),
        split_data=jax.random.key_data(jax.random.split(k3, (2, 3))),
        per_row=jax.vmap(lambda k: jax.random.normal(k, (3,)))(jax.random.split(k1, 4)),
    )


@pytest.mark.parametrize("seed", [0, 1234567])
def test_streams_equal_default_threefry(seed):
    key = jax.random.key(seed)
    fast = prandom.fast_key(key)
    assert str(fast.dtype) == "key<fry_u>"  # the unrolled implementation's tag
    ref, got = _draws(key), _draws(fast)
    for name in ref:
        np.testing.assert_array_equal(np.asarray(ref[name]), np.asarray(got[name]), err_msg=name)
    # also under jit, where the unrolled hash fuses into its consumer
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda k: jax.random.normal(k, (1000,)))(fast)),
        np.asarray(jax.random.normal(key, (1000,))),
    )


def test_raw_and_other_keys():
    raw = jax.random.PRNGKey(3)
    fast = prandom.fast_key(raw)
    np.testing.assert_array_equal(np.asarray(jax.random.normal(fast, (4,))),
                                  np.asarray(jax.random.normal(raw, (4,))))
    philox = jax.random.key(3, impl="philox2x32")
    assert prandom.fast_key(philox) is philox
    assert prandom.fast_key(fast) is fast  # already fast: unchanged


def test_hash_detects_a_wrong_rotation(monkeypatch):
    """The bit-equality check above can fail: one wrong rotation constant changes every draw."""
    key = jax.random.key(0)
    monkeypatch.setattr(prandom, "_ROTATIONS", ((13, 15, 26, 6), (17, 29, 16, 25)))
    fast = prandom.fast_key(key)
    assert not np.array_equal(np.asarray(jax.random.bits(fast, (8,))),
                              np.asarray(jax.random.bits(key, (8,))))
