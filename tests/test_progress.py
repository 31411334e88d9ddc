"""Progress bars of the long samplers: shown on stderr for eager calls, off with progress=False,
absent under a transformation, and never changing a result (the same random streams)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from models.linear_gaussian import LGSSMParams, lgssm
from samplers.particle_gibbs import particle_gibbs
from samplers.pmmh import random_walk_metropolis
from samplers.tempering import tempered_smc


def _ll(key, theta):
    return -0.5 * jnp.sum((theta["mu"] - 1.0) ** 2)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_random_walk_metropolis_bar(capfd):
    kw = dict(num_samples=300, num_warmup=100, num_chains=2)
    on = random_walk_metropolis(jax.random.key(0), _ll, {"mu": dist.Normal()}, **kw)
    err = capfd.readouterr().err
    assert "random-walk Metropolis" in err and "401" in err  # the bar and its total
    off = random_walk_metropolis(jax.random.key(0), _ll, {"mu": dist.Normal()}, progress=False, **kw)
    assert "random-walk Metropolis" not in capfd.readouterr().err
    _same(on, off)


def test_particle_gibbs_bar(capfd):
    ssm = lgssm(LGSSMParams.scalar(0.9, 1.0, 0.5))
    _, ys = ssm.simulate(jax.random.key(1), 10)
    kw = dict(num_particles=8, num_samples=20, num_warmup=5, num_chains=2)
    on = particle_gibbs(jax.random.key(2), ssm, ys, **kw)
    assert "particle Gibbs" in capfd.readouterr().err
    off = particle_gibbs(jax.random.key(2), ssm, ys, progress=False, **kw)
    assert "particle Gibbs" not in capfd.readouterr().err
    _same(on, off)


def _model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_tempered_smc_bar(capfd):
    y = jnp.asarray([0.3, 1.2, 0.8, 1.9])
    on = tempered_smc(jax.random.key(3), _model, y, num_particles=64)
    assert "tempered SMC" in capfd.readouterr().err
    off = tempered_smc(jax.random.key(3), _model, y, num_particles=64, progress=False)
    assert "tempered SMC" not in capfd.readouterr().err
    _same(on.samples, off.samples)
    np.testing.assert_array_equal(np.asarray(on.log_evidence), np.asarray(off.log_evidence))
    # under jit (a transformation): no bar, and the same numbers
    from ppl.numpyro_model import from_numpyro

    target = from_numpyro(_model, y)
    jitted = jax.jit(lambda k: tempered_smc(k, target, num_particles=64).log_evidence)(jax.random.key(3))
    assert "tempered SMC" not in capfd.readouterr().err
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(off.log_evidence), rtol=1e-5)
