"""AEVB (samplers.variational.aevb) against an exact marginal likelihood, and a digits smoke test.

A linear-Gaussian VAE is probabilistic PCA: p(x) = N(x; b, W Wᵀ + σ² I) exactly. Its encoder is
set by hand to an imperfect q(z | x) (the exact posterior mean shifted by half a standard
deviation, a diagonal scale 1.5 times the largest posterior standard deviation: wider than the
posterior in every direction, so the importance weights are bounded and their relative variance
v is finite). Then, on n held-out points with the exact log p(x_i) known:

- the held-out estimate log Ẑ_K (K = 4096) matches the exact mean log-likelihood within Z standard
  errors (the spread over the points of log Ẑ_K(x_i) − log p(x_i), purely Monte Carlo error), after
  the delta-method bias −v/(2K) (~1e-4 here, a tenth of the error); the library's own Monte Carlo
  error (from the ESS) agrees with that spread;
- IWAE_K (from disjoint blocks of the same weights) increases with K = 1, 4, 16, 64 (paired
  z-tests) and is never significantly above the exact value;
- two broken estimators fail the same check: averaging the log-weights instead of
  log-mean-exp (that is the ELBO, below by the KL), and an encoder whose log-density has the wrong
  sign.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samplers import variational as vi
from samplers.variational import aevb

Z = 4.0
D, L, N_TEST, K_MAX = 8, 2, 200, 4096
SIGMA, SHIFT, WIDEN = 0.5, 0.5, 1.5


class WrongSignEncoder(aevb.GaussianEncoder):
    """Broken on purpose: returns −log q(z | x)."""

    def sample_and_log_prob(self, key, x, num_samples):
        z, log_q = super().sample_and_log_prob(key, x, num_samples)
        return z, -log_q


@pytest.fixture(scope="module")
def ppca():
    """(vae, wrong-sign vae, held-out x [n, D], exact log p(x_i) [n] in float64)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(D, L))
    b = rng.normal(size=D)
    dec = aevb.LinearGaussianDecoder(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                                     jnp.asarray(math.log(SIGMA), jnp.float32))
    x = rng.normal(size=(N_TEST, L)) @ w.T + b + SIGMA * rng.normal(size=(N_TEST, D))
    x = x.astype(np.float32)
    cov = w @ w.T + SIGMA**2 * np.eye(D)
    r = x.astype(np.float64) - b
    exact = -0.5 * (D * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1]
                    + np.einsum("nd,nd->n", r, np.linalg.solve(cov, r.T).T))
    # the encoder: exact posterior mean M^{-1} Wᵀ (x − b), shifted, with a constant wide scale
    m = w.T @ w + SIGMA**2 * np.eye(L)
    a = np.linalg.solve(m, w.T)
    sd = WIDEN * np.sqrt(np.linalg.eigvalsh(SIGMA**2 * np.linalg.inv(m)).max())
    weight = np.concatenate([a, np.zeros((L, D))], 0)
    bias = np.concatenate([-a @ b + SHIFT * sd, np.full(L, np.log(sd))])
    enc = aevb.GaussianEncoder.init(jax.random.key(0), D, L, width=1, depth=0)
    enc = eqx.tree_at(lambda e: (e.mlp.layers[0].weight, e.mlp.layers[0].bias), enc,
                      (jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32)))
    broken = WrongSignEncoder(enc.mlp, enc.latent_dim)
    return aevb.VAE(enc, dec), aevb.VAE(broken, dec), jnp.asarray(x), exact


def _matches_exact(log_z, exact, bias=0.0):
    """|mean(log Ẑ − log p) − bias| ≤ Z · se, se the spread of the differences over the points
    (each log p exact: the spread is Monte Carlo error only)."""
    d = np.asarray(log_z, np.float64) - exact
    se = d.std(ddof=1) / np.sqrt(d.size)
    return bool(abs(d.mean() - bias) <= Z * se), float(d.mean()), float(se)


def _log_mean_exp(lw, axis=-1):
    m = lw.max(axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.mean(np.exp(lw - m), axis))


def test_ppca_heldout_matches_exact_and_broken_variants_fail(ppca):
    vae, broken_vae, x, exact = ppca
    key = jax.random.key(1)
    res = aevb.heldout_log_likelihood(key, vae, x, K_MAX, chunk_size=1024)
    ok, gap, se = _matches_exact(res.log_likelihood, exact, res.bias)
    print(f"IWAE_{K_MAX}: gap {gap:.5f} ± {se:.5f} (bias {res.bias:.2e}, library mc_error "
          f"{res.mc_error:.5f})")
    assert ok
    assert res.num_particles == K_MAX and np.all(np.asarray(res.ess) > 1)
    # the Monte Carlo error reported by the library (delta method, from the ESS) is the spread
    assert 0.7 < res.mc_error / se < 1.4
    assert abs(res.mean - float(np.mean(np.asarray(res.log_likelihood)))) < 1e-4
    # the decoder's exact marginal is the float64 reference
    assert np.allclose(np.asarray(vae.decoder.exact_log_marginal(x)), exact, atol=1e-3)
    post_mean, post_cov = vae.decoder.exact_posterior(x)
    loc, log_scale = jax.vmap(vae.encoder)(x)
    shift = SHIFT * np.exp(np.asarray(log_scale))
    assert np.allclose(np.asarray(loc) - shift, np.asarray(post_mean), atol=1e-4)
    assert np.all(np.exp(2 * np.asarray(log_scale[0])) > np.linalg.eigvalsh(np.asarray(post_cov)).max())

    # IWAE_K from disjoint blocks of the same weights: increasing in K, never above exact
    lw = np.asarray(aevb.heldout_log_weights(key, vae, x, K_MAX, chunk_size=1024), np.float64)
    assert np.allclose(_log_mean_exp(lw), np.asarray(res.log_likelihood), atol=1e-4)
    per_k = {k: _log_mean_exp(lw.reshape(N_TEST, K_MAX // k, k)).mean(1) for k in (1, 4, 16, 64)}
    ks = sorted(per_k)
    for k in ks:
        d = per_k[k] - exact
        assert d.mean() <= Z * d.std(ddof=1) / np.sqrt(N_TEST), k
    for k0, k1 in zip(ks[:-1], ks[1:]):
        inc = per_k[k1] - per_k[k0]
        z_inc = inc.mean() / (inc.std(ddof=1) / np.sqrt(N_TEST))
        print(f"IWAE_{k0} -> IWAE_{k1}: +{inc.mean():.4f} (z = {z_inc:.1f})")
        assert z_inc > Z
    # amortised_bound (the training objective per point) estimates the same IWAE_16
    b16 = np.asarray(aevb.amortised_bound(jax.random.key(2), vi.IWAE(16, 4), vae, x), np.float64)
    d = b16 - per_k[16]
    assert b16.shape == (N_TEST,) and abs(d.mean()) <= Z * d.std(ddof=1) / np.sqrt(N_TEST)

    # broken 1: mean of the log-weights (the ELBO) instead of log-mean-exp
    ok1, gap1, _ = _matches_exact(lw.mean(1), exact, res.bias)
    # broken 2: encoder log-density with the wrong sign
    res2 = aevb.heldout_log_likelihood(key, broken_vae, x, K_MAX, chunk_size=1024)
    ok2, gap2, _ = _matches_exact(res2.log_likelihood, exact, res2.bias)
    print(f"broken: mean log-weight gap {gap1:.3f}, wrong-sign encoder gap {gap2:.3f}")
    assert not ok1 and not ok2


def test_digits_smoke():
    """A tiny VAE on a slice of the digits, a few IWAE steps with dynamic binarisation: finite and
    decreasing loss; NaN parameters stop training at once with a warning."""
    train_x, test_x = aevb.load_digits_split(jax.random.key(0), 0.1)
    assert train_x.shape[1] == test_x.shape[1] == 64 and train_x.shape[0] + test_x.shape[0] == 1797
    assert set(np.unique(np.asarray(test_x)).tolist()) <= {0.0, 1.0}
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    vae = eqx.filter_jit(lambda m: aevb.VAE(  # one compiled initialisation, not many small ops
        aevb.GaussianEncoder.init(k1, 64, 2, width=16, depth=1),
        aevb.BernoulliDecoder.init(k2, 2, 64, width=16, depth=1, data_mean=m)))(train_x.mean(0))
    res = aevb.train(k3, vae, train_x[:200], vi.IWAE(3), optax.adam(1e-2), 40, batch_size=16,
                     binarise=True, chunk_size=40, progress=False)
    losses = np.asarray(res.losses)
    assert res.num_steps_run == 40 and not res.nan_stopped and np.all(np.isfinite(losses))
    assert losses[-10:].mean() < losses[:10].mean()
    assert res.params.sample(jax.random.key(5), 3).shape == (3, 64)
    # NaN parameters (the same compiled program): stopped at step 0, the parameters returned
    nan_vae = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan) if eqx.is_inexact_array(a) else a,
                           vae)
    with pytest.warns(RuntimeWarning, match="not finite"):
        bad = aevb.train(k3, nan_vae, train_x[:200], vi.IWAE(3), optax.adam(1e-2), 40,
                         batch_size=16, binarise=True, chunk_size=40, progress=False)
    assert bad.nan_stopped and bad.num_steps_run == 1


def test_errors():
    key = jax.random.key(0)
    vae = aevb.VAE(aevb.GaussianEncoder.init(key, 4, 2, width=4, depth=1),
                   aevb.BernoulliDecoder.init(key, 2, 4, width=4, depth=1))
    with pytest.raises(ValueError, match="multiple"):
        aevb.heldout_log_weights(key, vae, jnp.zeros((3, 4)), 10, chunk_size=3)
    with pytest.raises(ValueError, match="intensities"):
        aevb.train(key, vae, 2.0 * jnp.ones((3, 4)), vi.IWAE(2), optax.adam(1e-3), 2,
                   binarise=True, progress=False)
    with pytest.raises(TypeError, match="importance-weighted"):
        aevb.amortised_bound(key, vi.SMCBound(4), vae, jnp.zeros((3, 4)))
