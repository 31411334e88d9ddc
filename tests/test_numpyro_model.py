"""The tempering view of a numpyro model (ppl.numpyro_model).

Exact references: numpyro's own ``potential_energy`` (log π_0 + log L = −potential energy, so the
log-Jacobian is in the prior), hand-written densities of a small model with a positive latent
(HalfNormal, exp transform), and the prior's exact moments for the prior sampler (CLT bound, with a
companion check that a sampler forgetting the unconstraining transform is rejected).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import potential_energy

from ppl.numpyro_model import NumpyroModel, from_numpyro

Z_CRIT = 4.0


def scale_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    s = numpyro.sample("s", dist.HalfNormal(1.5))
    numpyro.deterministic("s2", s**2)
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, s).to_event(1), obs=y)


def factor_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.factor("soft", -0.5 * mu**2)
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y = jnp.asarray([[0.3, -1.0], [1.2, 0.4], [0.8, -0.2]])


@pytest.fixture(scope="module")
def nm() -> NumpyroModel:
    return from_numpyro(scale_model, Y)


def test_layout(nm):
    assert nm.latent_sites == ("mu", "s")
    assert nm.likelihood_sites == ("y",)
    assert nm.dim == 3
    z = jnp.asarray([0.1, -0.2, 0.3])
    np.testing.assert_array_equal(nm.ravel(nm.unravel(z)), z)
    assert nm.unravel(z)["mu"].shape == (2,) and nm.unravel(z)["s"].shape == ()


def test_densities_match_numpyro_and_hand_formula(nm):
    @jax.jit
    def all_densities(z):
        lp, ll = nm.log_densities(z)
        pe = potential_energy(scale_model, (Y,), {}, nm.unravel(z))
        mu, u = z[:2], z[2]
        s = jnp.exp(u)  # biject_to(positive) = exp, log|dT/du| = u
        prior = dist.Normal(0.0, 2.0).log_prob(mu).sum() + dist.HalfNormal(1.5).log_prob(s) + u
        lik = dist.Normal(mu, s).log_prob(Y).sum()
        ours = jnp.stack([lp, ll, lp + ll, nm.log_prior(z), nm.log_likelihood(z), nm.log_joint(z)])
        ref = jnp.stack([prior, lik, -pe, prior, lik, prior + lik])
        return ours, ref

    zs = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    ours, ref = jax.vmap(all_densities)(zs)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_constrain(nm):
    z = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 3))
    out = jax.jit(lambda x: nm.constrain(x))(z)
    assert out["mu"].shape == (4, 7, 2) and out["s"].shape == (4, 7) and out["s2"].shape == (4, 7)
    np.testing.assert_allclose(out["s"], jnp.exp(z[..., 2]), rtol=1e-6)
    np.testing.assert_allclose(out["s2"], jnp.exp(2 * z[..., 2]), rtol=1e-5)
    single = nm.constrain(z[0, 0], deterministic=False)
    assert set(single) == {"mu", "s"} and single["mu"].shape == (2,)
    with pytest.raises(ValueError, match="shape"):
        nm.constrain(jnp.zeros((4, 2)))


def _prior_moment_zscores(theta_mu, theta_s):
    """z-scores of the sample means of mu (2 coords) and s against the exact prior means."""
    r = theta_s.shape[0]
    exact = np.array([0.0, 0.0, 1.5 * np.sqrt(2 / np.pi)])  # E|N(0, 1.5²)| = 1.5 √(2/π)
    x = np.concatenate([np.asarray(theta_mu), np.asarray(theta_s)[:, None]], axis=1)
    return (x.mean(0) - exact) / (x.std(0, ddof=1) / np.sqrt(r))


def test_sample_prior_moments(nm):
    z, theta = jax.jit(lambda k: (z := nm.sample_prior(k, 4000), nm.constrain(z)))(
        jax.random.PRNGKey(2)
    )
    assert z.shape == (4000, 3)
    zs = _prior_moment_zscores(theta["mu"], theta["s"])
    assert np.all(np.abs(zs) < Z_CRIT), zs
    # companion: forgetting T^{-1} (using constrained draws as z) must be rejected by the same check
    wrong = jnp.concatenate([theta["mu"], theta["s"][:, None]], axis=1)
    bad = jax.jit(lambda x: nm.constrain(x))(wrong)
    zs_bad = _prior_moment_zscores(bad["mu"], bad["s"])
    assert np.any(np.abs(zs_bad) > Z_CRIT), zs_bad


def test_factor_sites_and_likelihood_sites():
    y = jnp.asarray(0.7)
    default = from_numpyro(factor_model, y)
    assert default.likelihood_sites == ("soft", "y")
    only_y = from_numpyro(factor_model, y, likelihood_sites=("y",))
    z = jnp.asarray([0.4])
    both = jax.jit(lambda z: (default.log_densities(z), only_y.log_densities(z)))
    (lp0, ll0), (lp1, ll1) = both(z)
    np.testing.assert_allclose(lp0 + ll0, lp1 + ll1, rtol=1e-6)
    np.testing.assert_allclose(ll0 - ll1, -0.5 * 0.4**2, rtol=1e-5)
    with pytest.raises(ValueError, match="not observed sample sites"):
        from_numpyro(factor_model, y, likelihood_sites=("mu",))


def test_bad_models(no_shape_checks):
    def no_obs():
        numpyro.sample("a", dist.Normal())

    def no_latent(y):
        numpyro.sample("y", dist.Normal(), obs=y)

    def discrete(y):
        k = numpyro.sample("k", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(ValueError, match="no observed sites"):
        from_numpyro(no_obs)
    with pytest.raises(ValueError, match="no latent sample sites"):
        from_numpyro(no_latent, jnp.ones(3))
    with pytest.raises(ValueError, match="discrete latent"):
        from_numpyro(discrete, jnp.ones(()))
    with pytest.raises(TypeError, match="callable"):
        from_numpyro("not a model")
    nm = from_numpyro(scale_model, np.asarray(Y))  # numpy data are accepted (become jax arrays)
    assert isinstance(nm.model_args[0], jax.Array)
    with pytest.raises(ValueError, match="num_samples"):
        nm.sample_prior(jax.random.PRNGKey(0), 0)


def test_pointwise_log_likelihood_sums_to_the_likelihood():
    import numpyro
    import numpyro.distributions as dist

    from ppl.numpyro_model import from_numpyro

    def model(x, y):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(x @ b, 0.5), obs=y)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 2)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=7), jnp.float32)
    t = from_numpyro(model, x, y)
    z = jnp.asarray([0.3, -0.2])
    pw = t.pointwise_log_likelihood(z)
    assert pw.shape == (7,)
    np.testing.assert_allclose(float(pw.sum()), float(t.log_likelihood(z)), rtol=1e-6)
    expect = -0.5 * ((y - x @ z) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(np.asarray(pw), np.asarray(expect), rtol=1e-5, atol=1e-5)
