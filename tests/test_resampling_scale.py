"""Resampling keeps its guarantees in float32 at N = 10^7 particles (issue 17, item 1).

Exact references, computed in float64 with NumPy from the same float32 log-weights:
- systematic: every offspring count O_i is floor(N W_i) or ceil(N W_i), so |O_i − N W_i| < 1;
- stratified: equal weights give exactly one child each; in general |O_i − N W_i| < 2 (its true
  bound: both partial strata at the ends of a particle's interval can hit);
- residual: O_i ≥ floor(N W_i) (the deterministic part), equal weights: all N copies deterministic;
- multinomial: the law, by a chi-square test on 10^6 draws (moderate N), and mean/variance of the
  counts at N = 10^7.

A float32 CDF in [0, 1] resolves 6e-8, i.e. 0.6 strata at N = 10^7: the naive versions (the code
before issue 17) are run through the same checks and rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from samplers.resampling import Multinomial, Residual, Stratified, Systematic

BIG = 10_000_000
NEAR = 1e-5  # N W_i this close to an integer may round either way in float32 (relative)


def _log_w(kind: str, n: int):
    if kind == "equal":
        return jnp.zeros(n, jnp.float32)
    return jnp.log(jnp.arange(n, dtype=jnp.float32))  # weights ∝ i (particle 0 killed)


def _expected(log_w, m):
    lw = np.asarray(log_w, np.float64)
    w = np.exp(lw - lw.max())
    return m * w / w.sum()


def _counts(ancestors, n):
    return np.bincount(np.asarray(ancestors), minlength=n)


def _naive_systematic(key, log_w):
    """The float32-CDF systematic scheme (before issue 17): C_i = cumsum(W) / total in float32,
    O_i = #{k : (k + u) / M < C_i} differenced."""
    m = log_w.shape[0]
    w = jnp.exp(log_w - jnp.max(log_w))
    c = jnp.cumsum(w)
    c = c / c[-1]
    u = jax.random.uniform(key)
    below = jnp.clip(jnp.ceil(m * c - u), 0, m).astype(jnp.int32)
    return jnp.diff(below, prepend=0)


def _naive_stratified(key, log_w):
    """The float32-CDF stratified scheme: one uniform per stratum, the float32 CDF."""
    m = log_w.shape[0]
    w = jnp.exp(log_w - jnp.max(log_w))
    c = jnp.cumsum(w)
    c = c / c[-1]
    positions = (jnp.arange(m) + jax.random.uniform(key, (m,))) / m
    a = jnp.clip(jnp.searchsorted(c, positions, side="right"), 0, m - 1)
    return jnp.zeros(m, jnp.int32).at[a].add(1)


def _within_one(counts, expected):
    return bool(np.all(np.abs(counts - expected) < 1))


@pytest.fixture(scope="module")
def big_draws():
    """One compiled call per scheme and weight vector at N = 10^7 (offspring counts only)."""
    out = {}
    key = jax.random.key(17)
    for kind in ("equal", "linear"):
        lw = _log_w(kind, BIG)
        for name, scheme in (("systematic", Systematic()), ("stratified", Stratified()),
                             ("residual", Residual())):
            a = jax.jit(lambda k, lw, s=scheme: s(k, lw))(key, lw)
            out[name, kind] = _counts(a, BIG)
        out["naive", kind] = np.asarray(jax.jit(_naive_systematic)(key, lw))
    out["naive_stratified", "equal"] = np.asarray(
        jax.jit(_naive_stratified)(key, _log_w("equal", BIG)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["equal", "linear"])
def test_systematic_counts_within_one_at_ten_million(big_draws, kind):
    expected = _expected(_log_w(kind, BIG), BIG)
    counts = big_draws["systematic", kind]
    assert counts.sum() == BIG
    assert _within_one(counts, expected)


@pytest.mark.slow
def test_naive_float32_cdf_is_rejected_at_ten_million(big_draws):
    counts = big_draws["naive", "linear"]
    assert counts.sum() == BIG
    assert not _within_one(counts, _expected(_log_w("linear", BIG), BIG))


@pytest.mark.slow
def test_stratified_at_ten_million(big_draws):
    assert np.all(big_draws["stratified", "equal"] == 1)
    assert not np.all(big_draws["naive_stratified", "equal"] == 1)
    expected = _expected(_log_w("linear", BIG), BIG)
    counts = big_draws["stratified", "linear"]
    assert counts.sum() == BIG and np.all(np.abs(counts - expected) < 2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["equal", "linear"])
def test_residual_deterministic_part_at_ten_million(big_draws, kind):
    expected = _expected(_log_w(kind, BIG), BIG)
    counts = big_draws["residual", kind]
    assert counts.sum() == BIG
    floor = np.floor(expected)
    whole = expected == np.round(expected)  # exact in float32 too (equal weights: 1)
    clear = whole | (np.abs(expected - np.round(expected)) > NEAR * np.maximum(expected, 1))
    assert clear.mean() > 0.999
    assert np.all(counts[clear] >= floor[clear])
    if kind == "equal":
        assert np.all(counts == 1)  # every copy deterministic


def test_naive_residual_copies_are_rejected():
    """floor(N · exp(log W)) with normalised float32 log-weights (before issue 17) gives 0
    deterministic copies for equal weights at N = 10^7 (exp(−log N) · N = 0.99999994)."""
    n = BIG
    lw = jnp.full((8,), -np.log(n), jnp.float32)  # eight of the N equal normalised log-weights
    copies = np.floor(n * np.asarray(jnp.exp(lw)))
    assert not np.all(copies >= np.floor(_expected(jnp.zeros(8), 8) * n / 8))


def _chi2_pvalue(counts, probs):
    m = counts.sum()
    return stats.chisquare(counts, m * probs).pvalue


def test_multinomial_law_chi_square():
    """10^6 draws among N = 1000 particles with log-normal weights: chi-square against M W_i;
    the same draws from tempered weights W^0.9 are rejected."""
    n, m = 1000, 1_000_000
    lw = 1.5 * jax.random.normal(jax.random.key(3), (n,))
    probs = _expected(lw, 1.0)
    draw = jax.jit(lambda k, lw: Multinomial()(k, lw, m))
    assert _chi2_pvalue(_counts(draw(jax.random.key(4), lw), n), probs) > 1e-4
    assert _chi2_pvalue(_counts(draw(jax.random.key(4), 0.9 * lw), n), probs) < 1e-4


@pytest.mark.slow
def test_multinomial_runs_and_has_the_right_moments_at_ten_million():
    """O_i ~ Binomial(N, 1/N) for equal weights: mean 1, variance 1 − 1/N (CLT bounds on 10^7
    counts); jax.random.categorical would need an N × N array here."""
    counts = _counts(jax.jit(lambda k, lw: Multinomial()(k, lw))(jax.random.key(5),
                                                               _log_w("equal", BIG)), BIG)
    assert counts.sum() == BIG
    var = counts.var()
    # Var of the sample variance of Poisson(1)-like counts: (μ4 − σ⁴)/n with μ4 = 3 + 1 = 4 → 3/n
    assert abs(var - 1) < 5 * np.sqrt(3 / BIG)
    # a broken multinomial that returns the systematic draw (all counts 1) has variance 0
    assert counts.max() > 3
