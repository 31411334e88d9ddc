"""The jaxtyping + beartype runtime checks of tests/conftest.py are in force on ppl and samplers.

A public function called with a wrongly shaped or typed argument must raise a jaxtyping type-check
error at the call, before any computation.
"""

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

from ppl import tree
from samplers.resampling import Systematic, ess, normalise

def test_wrong_rank_is_rejected():
    with pytest.raises(TypeCheckError):
        normalise(jnp.zeros((4, 2)))  # log-weights must be [N]
    with pytest.raises(TypeCheckError):
        ess(jnp.zeros(()))


def test_wrong_dtype_is_rejected():
    with pytest.raises(TypeCheckError):
        normalise(jnp.zeros(4, jnp.int32))  # Float[Array, " N"]


def test_inconsistent_axes_are_rejected():
    """The named axis N must agree across the arguments of one call."""
    with pytest.raises(TypeCheckError):
        tree.where_rows(jnp.zeros((3, 2), bool), jnp.zeros(3), jnp.zeros(3))


def test_methods_are_checked():
    with pytest.raises(TypeCheckError):
        Systematic()(jax.random.key(0), jnp.zeros((4, 4)), 4)


def test_correct_calls_pass():
    lw = normalise(jnp.zeros(4))
    assert lw.shape == (4,)
    assert Systematic()(jax.random.key(0), lw, 4).shape == (4,)
