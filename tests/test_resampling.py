"""Resampling schemes: unbiased offspring counts, the conditional (pinned) law, the ESS.

Exact references:
- plain schemes: E[O_i] = M W_i (Douc, Cappé & Moulines 2005), tested with a Hotelling χ² bound on
  the mean count vector over R draws;
- conditional schemes: the law of the offspring counts given that slot 0 chose ``pin`` is the plain
  law tilted by O_pin / (N W_pin) (Andrieu, Doucet & Holenstein 2010; Chopin & Singh 2015), so
  E_cond[O_i] = E[O_i O_pin] / (N W_pin), which we estimate from independent plain draws and compare
  with a CLT bound (Bonferroni over the N components).

Every check is shown to reject a deliberately broken scheme. All draws of one scheme come from one
compiled, vmapped call shared by the tests (module fixture).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from samplers.resampling import (
    AbstractResampling,
    Multinomial,
    Residual,
    Stratified,
    Systematic,
    ess,
    get_resampling,
    log_ess,
    offspring_counts,
)

N = 6
R = 20_000  # draws per check
# N W = [1.38, 0.30, 1.86, 0.72, 1.20, 0.54]: integer parts 0 and 1, varied fractional parts
WEIGHTS = np.array([0.23, 0.05, 0.31, 0.12, 0.20, 0.09])
LOG_W = jnp.log(jnp.asarray(WEIGHTS, jnp.float32))
PINS = (0, 4)
ALPHA = 1e-4  # family-wise false-rejection probability of each check (fixed seeds anyway)
SCHEMES = {
    "multinomial": Multinomial(),
    "stratified": Stratified(),
    "systematic": Systematic(),
    "residual": Residual(),
}


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def hotelling_mean_test(counts: np.ndarray, expected: np.ndarray, alpha: float = ALPHA) -> bool:
    """Accept E[O] = expected? Hotelling T² ≈ χ²_r on the mean of R count vectors.

    The counts sum to M, so their covariance is singular along 1; we project on the eigenvectors of
    the empirical covariance with non-zero eigenvalue (rank r) and require the mean to match exactly
    (to float precision) along zero-variance directions.
    """
    counts = np.asarray(counts, np.float64)
    r = counts.shape[0]
    diff = counts.mean(0) - expected
    eigval, eigvec = np.linalg.eigh(np.cov(counts, rowvar=False))
    live = eigval > 1e-9 * max(eigval.max(), 1e-12)
    proj = eigvec.T @ diff
    if np.any(np.abs(proj[~live]) > 1e-6):
        return False
    t2 = r * np.sum(proj[live] ** 2 / eigval[live])
    return bool(t2 < stats.chi2.isf(alpha, int(live.sum())))


def tilted_law_zscores(cond: np.ndarray, plain: np.ndarray, pin: int) -> np.ndarray:
    """z-scores of E_cond[O_i] − E[O_i O_pin] / (N W_pin) from independent draws (CLT)."""
    cond = np.asarray(cond, np.float64)
    plain = np.asarray(plain, np.float64)
    scale = N * WEIGHTS[pin]
    tilted = plain * plain[:, [pin]] / scale
    diff = cond.mean(0) - tilted.mean(0)
    var = cond.var(0, ddof=1) / cond.shape[0] + tilted.var(0, ddof=1) / plain.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, diff / np.sqrt(var), np.where(np.abs(diff) < 1e-9, 0.0, np.inf))
    return z


def tilted_law_test(cond, plain, pin, alpha: float = ALPHA) -> bool:
    """Accept the conditional law? max |z| below the Bonferroni bound over N components."""
    bound = stats.norm.isf(alpha / (2 * N))
    return bool(np.max(np.abs(tilted_law_zscores(cond, plain, pin))) < bound)


# ---------------------------------------------------------------------------------------------
# draws (one compiled call per scheme, shared by all tests)
# ---------------------------------------------------------------------------------------------


def naive_conditional(scheme: AbstractResampling, key, log_w, pin):
    """Broken-in-general pinning: plain resampling (same particle order as the real conditional
    form, i.e. rotated so that ``pin`` comes first), then overwrite slot 0 with ``pin``."""
    a = scheme(key, jnp.roll(log_w, -pin)).at[0].set(0)
    return (a + pin) % N


def _counts(a):
    return offspring_counts(a, N)


UNDERFLOW_LOG_W = jnp.array([0.0, -200.0, 0.0, -1.0, -jnp.inf, 0.5])  # W_1 = 0 in float32
UNDERFLOW_PINS = jnp.array([1, 4, 5])


def _make_draws(scheme: AbstractResampling):
    """One compiled call: for each pin, R independent draws of the plain scheme in the
    conditional form's particle order (pin first, labels rotated back), of the conditional
    scheme and of the naive pinning; plus the pins kept under underflowing weights."""

    def one(key, pin):
        k_rot, k_cond, k_naive = jax.random.split(key, 3)
        rot = (scheme(k_rot, jnp.roll(LOG_W, -pin)) + pin) % N
        cond = scheme.conditional(k_cond, LOG_W, pin)
        naive = naive_conditional(scheme, k_naive, LOG_W, pin)
        return {"rot": _counts(rot), "cond": _counts(cond), "cond_slot0": cond[0],
                "naive": _counts(naive)}

    @jax.jit
    def draws(key, pins):
        keys = jax.random.split(key, (len(PINS), R))
        out = jax.vmap(lambda ks, pin: jax.vmap(lambda k: one(k, pin))(ks))(keys, pins)
        out["underflow_slot0"] = jax.vmap(
            lambda pin: scheme.conditional(key, UNDERFLOW_LOG_W, pin)[0]
        )(UNDERFLOW_PINS)
        return out

    return draws


@pytest.fixture(scope="module")
def draws():
    out = {}
    for i, (name, scheme) in enumerate(SCHEMES.items()):
        res = jax.tree.map(np.asarray, _make_draws(scheme)(jax.random.key(i), jnp.array(PINS)))
        out[name] = {pin: {k: v[j] for k, v in res.items() if k != "underflow_slot0"}
                     for j, pin in enumerate(PINS)}
        out[name]["underflow_slot0"] = res["underflow_slot0"]
    return out


# ---------------------------------------------------------------------------------------------
# plain schemes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMES))
def test_offspring_counts_unbiased(draws, name):
    plain = draws[name][0]["rot"]  # pin 0: no rotation, the plain scheme itself
    assert np.all(plain.sum(1) == N)
    assert hotelling_mean_test(plain, N * WEIGHTS)


@pytest.mark.parametrize("name", ["stratified", "systematic", "residual"])
def test_low_variance_schemes_keep_counts_near_expectation(draws, name):
    """|O_i − N W_i| < 1 (systematic), < 2 (stratified); O_i ≥ floor(N W_i) (residual)."""
    counts = draws[name][0]["rot"]
    if name == "residual":
        assert np.all(counts >= np.floor(N * WEIGHTS))
    elif name == "stratified":
        assert np.all(np.abs(counts - N * WEIGHTS) < 2)
    else:
        assert np.all(np.abs(counts - N * WEIGHTS) < 1)


def test_mean_test_rejects_biased_schemes():
    """A stratified scheme whose uniforms live in [0, 0.9) and a multinomial scheme on tempered
    weights W^0.8 are biased; the Hotelling test must reject both (numpy: no compilation)."""
    rng = np.random.default_rng(7)
    positions = (np.arange(N) + 0.9 * rng.uniform(size=(R, N))) / N
    short_stratified = np.searchsorted(np.cumsum(WEIGHTS), positions, side="right").clip(0, N - 1)
    tempered_w = WEIGHTS**0.8 / np.sum(WEIGHTS**0.8)
    tempered = rng.choice(N, size=(R, N), p=tempered_w)
    for ancestors in (short_stratified, tempered):
        counts = np.stack([np.bincount(a, minlength=N) for a in ancestors])
        assert not hotelling_mean_test(counts, N * WEIGHTS)
    # the same numpy construction without the bias passes
    fair = np.searchsorted(np.cumsum(WEIGHTS), (np.arange(N) + rng.uniform(size=(R, N))) / N,
                           side="right").clip(0, N - 1)
    assert hotelling_mean_test(np.stack([np.bincount(a, minlength=N) for a in fair]), N * WEIGHTS)


# ---------------------------------------------------------------------------------------------
# conditional schemes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pin", PINS)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_conditional_keeps_pin(draws, name, pin):
    d = draws[name][pin]
    assert np.all(d["cond_slot0"] == pin)
    assert np.all(d["cond"].sum(1) == N)
    assert np.all(d["cond"][:, pin] >= 1)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_conditional_keeps_pin_with_underflowing_weight(draws, name):
    """A pinned particle whose weight underflows to 0 in float32 must still be kept (regression:
    stratified/systematic used to hand its slot to the next particle)."""
    assert np.array_equal(draws[name]["underflow_slot0"], np.asarray(UNDERFLOW_PINS))


@pytest.mark.parametrize("pin", PINS)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_conditional_law_is_tilted_plain_law(draws, name, pin):
    d = draws[name][pin]
    assert tilted_law_test(d["cond"], d["rot"], pin)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_naive_pinning_is_rejected_except_for_multinomial(draws, name):
    """'Resample, then overwrite slot 0 with the pin' is exact for multinomial (the N−1 other
    slots are i.i.d., so the result is e_pin + Multinomial(N−1, W), the tilted law) but wrong for
    the low-variance schemes, where the same test must reject it."""
    verdicts = [
        tilted_law_test(draws[name][pin]["naive"], draws[name][pin]["rot"], pin) for pin in PINS
    ]
    if name == "multinomial":
        assert all(verdicts)
    else:
        assert not any(verdicts)


def test_unpinned_conditional_is_rejected(draws):
    """Plain multinomial draws used as 'conditional' draws (pin ignored) fail the law test.
    (Multinomial draws do not depend on the particle order, so the plain draws made for the
    other pin serve as independent plain draws.)"""
    d = draws["multinomial"]
    assert not tilted_law_test(d[PINS[1]]["rot"], d[PINS[0]]["rot"], PINS[0])
    assert not tilted_law_test(d[PINS[0]]["rot"], d[PINS[1]]["rot"], PINS[1])


# ---------------------------------------------------------------------------------------------
# ESS and lookup
# ---------------------------------------------------------------------------------------------


def test_ess_values_and_bounds():
    lw = jnp.log(jnp.asarray(WEIGHTS, jnp.float32))
    rand = jax.random.normal(jax.random.key(0), (200, 50)) * 3.0

    @jax.jit
    def values():
        return {
            "uniform": ess(jnp.zeros(N)),
            "one_hot": ess(jnp.array([0.0, -jnp.inf, -jnp.inf])),
            "two": ess(jnp.log(jnp.array([1.0, 1.0, 0.0, 0.0]))),
            "one_two_three": ess(jnp.log(jnp.array([1.0, 2.0, 3.0]))),
            "shifted": ess(lw + 100.0),
            "weights": ess(lw),
            "from_log": jnp.exp(log_ess(lw)),
            "random": jax.vmap(ess)(rand),
        }

    v = jax.tree.map(np.asarray, values())
    assert v["uniform"] == pytest.approx(N, rel=1e-6)
    assert v["one_hot"] == pytest.approx(1.0, rel=1e-6)
    assert v["two"] == pytest.approx(2.0, rel=1e-6)
    assert v["one_two_three"] == pytest.approx(36 / 14, rel=1e-6)  # (Σw)²/Σw² for w = 1, 2, 3
    # invariant to the normalising constant (float32 rounding of 100 + log W only)
    assert v["shifted"] == pytest.approx(v["weights"], rel=1e-4)
    assert v["weights"] == pytest.approx(1 / np.sum(WEIGHTS**2), rel=1e-5)
    assert v["from_log"] == pytest.approx(v["weights"], rel=1e-6)
    assert np.all((v["random"] >= 1 - 1e-4) & (v["random"] <= 50 * (1 + 1e-5)))


def test_get_resampling():
    assert isinstance(get_resampling("Systematic"), Systematic)
    scheme = Residual()
    assert get_resampling(scheme) is scheme
    with pytest.raises(ValueError, match="unknown resampling scheme"):
        get_resampling("bogus")


def test_alive_replaces_dead_ancestors_only():
    """A position in a rounding sliver of the CDF at a killed particle must not revive it: the
    guard maps dead ancestors to the largest live ancestor and leaves live ones alone (an identity
    guard fails the assertion)."""
    from samplers.resampling import _alive

    w = jnp.array([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    a = jnp.array([0, 1, 2, 3, 4, 5, 3, 1], jnp.int32)
    np.testing.assert_array_equal(np.asarray(_alive(a, w)), [4, 1, 4, 3, 4, 4, 3, 1])
