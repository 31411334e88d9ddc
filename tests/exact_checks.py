"""Exact-answer checks shared by the Markov-chain LM tests (test_markov_lm, test_llm_ssm).

Both compare pooled SMC runs with the exact forward recursion: the evidence (E[Ẑ/Z] = 1) and the
answer law in total variation, with tolerances from the Monte Carlo error.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.stats

Z_SCORE = 4.0


def evidence_check(log_z_hat, log_z, z=Z_SCORE):
    """E[Ẑ/Z] = 1 (unbiasedness): |mean − 1| ≤ z · sd/√R over R independent runs."""
    ratio = np.exp(np.asarray(log_z_hat, np.float64) - log_z)
    mean, se = ratio.mean(), ratio.std(ddof=1) / np.sqrt(ratio.size)
    return bool(abs(mean - 1.0) <= z * se), mean, se


def posterior_check(log_z_hat, log_w, answers, exact_probs, z=Z_SCORE):
    """Pooled SMC posterior over K answers vs the exact one, in total variation.

    Runs are pooled with weights Ẑ_r: E[Ẑ_r Σ_i W_r^i 1{a_r^i ∈ S}] = Z π(S) exactly (unbiasedness
    of the unnormalised particle measure, Del Moral 2004), so the pooled estimate π̂(S) is a ratio
    of means of R i.i.d. terms, asymptotically normal with a delta-method standard error se(S)
    estimated from the runs (floored by the error sqrt(π(S)(1−π(S))/(RN)) of R·N exact draws, so
    that an empty cell does not get se = 0). Since TV(π̂, π) = max_S |π̂(S) − π(S)| over the 2^K
    answer sets, we assert |π̂(S) − π(S)| ≤ z' se(S) for every S, hence TV ≤ max_S z' se(S), with
    z' the two-sided normal quantile at level α / 2^(K−1) (Bonferroni over the set pairs S, S^c;
    α = P(|N(0,1)| > z), z = 4).
    """
    k = exact_probs.shape[0]
    r, n = np.shape(log_w)
    w = np.exp(np.asarray(log_w, np.float64))
    hist = np.zeros((r, k))
    np.add.at(hist, (np.repeat(np.arange(r), n), np.asarray(answers).reshape(-1)), w.reshape(-1))
    lz = np.asarray(log_z_hat, np.float64)
    zr = np.exp(lz - lz.max())
    est = (zr[:, None] * hist).sum(0) / zr.sum()
    resid = zr[:, None] * (hist - est) / zr.mean()  # delta-method terms, one row per run
    sets = np.array(list(itertools.product([0.0, 1.0], repeat=k)))[1:-1]  # S ≠ ∅, all
    p_set = np.clip(sets @ exact_probs, 0.0, 1.0)
    se_emp = (resid @ sets.T).std(axis=0, ddof=1) / np.sqrt(r)
    se = np.maximum(se_emp, np.sqrt(p_set * (1 - p_set) / (r * n)))
    alpha = 2 * scipy.stats.norm.sf(z)
    z_set = scipy.stats.norm.isf(alpha / 2 / 2 ** (k - 1))
    dev = np.abs(sets @ (est - exact_probs))
    tv = 0.5 * np.abs(est - exact_probs).sum()
    bound = float(np.max(z_set * se))
    # 1e-6: float32 normalisation of the weights (sets whose π(S) is 0 or 1 have se = 0)
    return bool(np.all(dev <= z_set * se + 1e-6)), tv, bound, est


# ---------------------------------------------------------------------------------------------
# AR(1) plus noise with unknown (ρ, σ_x): shared by the PMMH and SMC² tests
# ---------------------------------------------------------------------------------------------


def _ar1_init(p):
    import jax.numpy as jnp
    import numpyro.distributions as dist

    return dist.Normal(0.0, p["sx"] / jnp.sqrt(1.0 - p["rho"] ** 2))


def _ar1_trans(p, t, x):
    import numpyro.distributions as dist

    return dist.Normal(p["rho"] * x, p["sx"])


def _ar1_obs(p, t, x):
    import numpyro.distributions as dist

    return dist.Normal(p["gain"] * x, p["sy"])


def ar1_noise_ssm(rho, sx, sy, gain=1.0, vectorized=False):
    """x_t = ρ x_{t-1} + σ_x ε_t (x_0 stationary), y_t = gain · x_t + σ_y η_t, params a dict
    (``gain`` = 1 is the model; tests break it on purpose)."""
    import jax.numpy as jnp

    from ppl.state_space import StateSpaceModel

    return StateSpaceModel(
        _ar1_init, _ar1_trans, _ar1_obs,
        {"rho": jnp.asarray(rho), "sx": jnp.asarray(sx), "sy": jnp.asarray(sy),
         "gain": jnp.asarray(gain)},
        vectorized=vectorized,
    )


def ar1_noise_log_likelihood(rho, sx, sy, ys):
    """log p(y_{0:T-1}) of :func:`ar1_noise_ssm` (gain 1) for arrays of (ρ, σ_x): a scalar Kalman
    filter in float64 NumPy, independent of the JAX code."""
    m = np.zeros_like(rho)
    P = sx**2 / (1.0 - rho**2)
    ll = np.zeros_like(rho)
    for t, y in enumerate(ys):
        if t > 0:
            m, P = rho * m, rho**2 * P + sx**2
        S = P + sy**2
        ll += -0.5 * (np.log(2 * np.pi * S) + (y - m) ** 2 / S)
        K = P / S
        m, P = m + K * (y - m), (1.0 - K) * P
    return ll
