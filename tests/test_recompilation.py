"""Models rebuilt from fresh functions reuse the compiled program (ppl/functions.py); a model
that computes something else, or captures a fresh array, compiles anew. Compilations are
counted by a trace-time side effect in the model's transition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ppl.feynman_kac import VmappedFeynmanKac
from ppl.functions import StaticFunction
from ppl.state_space import StateSpaceModel
from samplers.smc import smc

TRACES: list[str] = []  # appended to whenever a model function is traced (a compilation)


def make_ssm(rho: float) -> StateSpaceModel:
    """A fresh model: new lambdas at every call, capturing the float ``rho``."""

    def transition(p, t, x):
        TRACES.append("ssm")
        return dist.Normal(rho * x, 1.0)

    return StateSpaceModel(initial=lambda p: dist.Normal(0.0, 1.0), transition=transition,
                           observation=lambda p, t, x: dist.Normal(x, 0.5))


YS = jnp.linspace(-1.0, 1.0, 8)


def _traces(kind):
    return sum(1 for k in TRACES if k == kind)


def test_fresh_functions_compile_once():
    smc(jax.random.key(0), make_ssm(0.9).bootstrap(YS), 32)
    first = _traces("ssm")
    assert first >= 1
    for seed in range(1, 4):  # three more fresh models, same code and captured value
        res = smc(jax.random.key(seed), make_ssm(0.9).bootstrap(YS), 32)
    assert _traces("ssm") == first, "a structurally identical model recompiled"
    assert np.isfinite(float(res.log_evidence))


def test_a_different_captured_value_recompiles():
    """The broken variant a structural cache must not allow: ρ = 0.5 is another program (and
    another log Ẑ), not the ρ = 0.9 one."""
    a = smc(jax.random.key(0), make_ssm(0.9).bootstrap(YS), 32)
    before = _traces("ssm")
    b = smc(jax.random.key(0), make_ssm(0.5).bootstrap(YS), 32)
    assert _traces("ssm") > before
    assert float(a.log_evidence) != float(b.log_evidence)


def _move(p, key, t, x):
    TRACES.append("vmapped")
    return x + jax.random.normal(key)


def make_vmapped(scale):
    return VmappedFeynmanKac(init_one=lambda p, k: jax.random.normal(k), move_one=_move,
                             log_potential_one=lambda p, t, xp, x: -scale * x**2, num_steps=5)


def test_vmapped_model_from_fresh_lambdas_compiles_once():
    smc(jax.random.key(0), make_vmapped(0.5), 16)
    first = _traces("vmapped")
    smc(jax.random.key(1), make_vmapped(0.5), 16)
    assert _traces("vmapped") == first


def test_captured_arrays_count_by_object():
    """Documented limit: an array captured by a closure is baked into the program, so only the
    same array object reuses it; an equal copy compiles anew (pass arrays through params)."""
    w = jnp.asarray([1.0, 2.0])

    def make(v):
        return StaticFunction(lambda x: x * v)

    assert make(w) == make(w) and hash(make(w)) == hash(make(w))
    assert make(w) != make(jnp.asarray([1.0, 2.0]))
    assert make(0.5) == make(0.5) and make(0.5) != make(0.25)
