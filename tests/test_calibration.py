"""SBC and TARP (samplers.calibration) on the exact conjugate Normal–Normal posterior and on
posteriors broken on purpose: over-confident (sd × 0.5), under-confident (sd × 2) and biased
(mean + 1 posterior sd). The exact one must pass both tests at level 0.01, every broken one must
fail both."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from samplers.calibration import flatten_draws, sbc, sbc_ranks, tarp

S, L, D, N_OBS = 500, 99, 2, 4
PRIOR_SD, NOISE_SD = np.array([1.0, 2.0]), 1.0


@pytest.fixture(scope="module")
def simulations():
    """θ* ~ N(0, diag(PRIOR_SD²)), y_1..4 ~ N(θ*, 1): exact posterior N(m, v) per simulation."""
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(S, D)) * PRIOR_SD
    y = theta[:, None, :] + NOISE_SD * rng.normal(size=(S, N_OBS, D))
    v = 1.0 / (1.0 / PRIOR_SD**2 + N_OBS / NOISE_SD**2)
    m = v * y.sum(1) / NOISE_SD**2
    eps = rng.normal(size=(S, L, D))
    return theta, m, np.sqrt(v), eps


VARIANTS = {  # (shift in posterior sds, scale factor)
    "exact": (0.0, 1.0),
    "over_confident": (0.0, 0.5),
    "under_confident": (0.0, 2.0),
    "biased": (1.0, 1.0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sbc_and_tarp(simulations, variant):
    theta, m, sd, eps = simulations
    shift, scale = VARIANTS[variant]
    draws = m[:, None, :] + shift * sd + scale * sd * eps
    res_sbc = sbc(jax.random.key(1), draws, theta)
    res_tarp = tarp(jax.random.key(2), draws, theta)
    print(f"{variant}: SBC p = {np.round(res_sbc.p_values, 4)}, TARP p = {res_tarp.p_value:.3g}, "
          f"ATC = {res_tarp.atc:.3f}, distance = {res_tarp.distance:.3f}")
    assert res_sbc.histograms.sum(1).tolist() == [S] * D
    assert np.isclose(res_sbc.expected.sum(), S)
    assert res_tarp.coverage[0] == 0.0 and res_tarp.coverage[-1] == 1.0
    calibrated = variant == "exact"
    assert res_sbc.passed == calibrated
    assert res_tarp.passed == calibrated


def test_ranks_ties_and_dicts():
    # a stuck sampler (every draw equals the truth): ties are broken uniformly over 0..L
    truths = np.zeros((4000, 1))
    draws = np.zeros((4000, 9, 1))
    ranks = sbc_ranks(jax.random.key(0), draws, truths)
    counts = np.bincount(ranks[:, 0], minlength=10)
    assert counts.shape == (10,) and np.all(np.abs(counts - 400) < 4 * np.sqrt(400))
    # dicts of sites (numpyro samples) are flattened per site
    d, t = flatten_draws({"b": np.ones((3, 5, 2)), "a": np.zeros((3, 5))},
                         {"b": np.ones((3, 2)), "a": np.zeros(3)})
    assert d.shape == (3, 5, 3) and t.shape == (3, 3)


def test_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="shape"):
        sbc(key, np.zeros((10, 5, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="finite"):
        tarp(key, np.full((10, 5), np.nan), np.zeros(10))
    with pytest.raises(ValueError, match="expects"):
        sbc(key, np.random.default_rng(0).normal(size=(20, 99)), np.zeros(20), num_bins=10)
    with pytest.raises(ValueError, match="references"):
        tarp(key, np.zeros((10, 5, 2)), np.zeros((10, 2)), references=np.zeros((10, 3)))
    with pytest.raises(TypeError, match="both"):
        sbc(key, {"a": np.zeros((10, 5))}, np.zeros(10))
