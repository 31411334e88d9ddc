"""Smoothing (genealogy tracing, FFBS, MCMC backward sampling) against the Rauch-Tung-Striebel
smoother of a linear-Gaussian model.

R independent filter runs (vmapped into one compiled call) each give M smoothing paths per method;
the per-run averages of x_t and x_t² are independent across runs, so their mean over runs is within
a CLT bound of the exact smoothing moments. The bound uses the Student-t quantile for R − 1 degrees
of freedom at a family-wise level of 1e-3, Bonferroni-corrected over the 2T moments of a method.
The particle bias (O(1/N)) is far below the bound at these sizes.

The same compiled program, fed a broken input, must fail the check: backward weights that ignore
the transition (β = 0: the backward kernel becomes the filter, so the paths have filtering, not
smoothing, marginals) and, for genealogy tracing, ancestry replaced by the identity.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

from models.linear_gaussian import LGSSMParams, rts_smoother
from ppl.feynman_kac import AbstractFeynmanKac
from ppl.state_space import StateSpaceModel
from samplers.smc import SMCHistory, SMCResult, smc
from samplers.smoothing import (
    backward_sampling,
    ffbs,
    genealogy_paths,
    mcmc_backward_sampling,
    sample_genealogy,
    trace_genealogy,
)

T, N, M, R = 10, 128, 32, 48
RHO, SX, SY = 0.9, 1.0, 0.5
FAMILY_ALPHA = 1e-3


def _init(p):
    return dist.Normal(0.0, p["sx"] / jnp.sqrt(1.0 - p["rho"] ** 2))


def _trans(p, t, x):
    return dist.Normal(p["rho"] * x, p["sx"])


def _obs(p, t, x):
    return dist.Normal(x, p["sy"])


SSM = StateSpaceModel(
    _init, _trans, _obs, {"rho": jnp.asarray(RHO), "sx": jnp.asarray(SX), "sy": jnp.asarray(SY)}
)
_, YS = SSM.simulate(jax.random.key(0), T)
FK = SSM.bootstrap(YS)


class ScaledTransition(AbstractFeynmanKac):
    """The bootstrap model with log_transition multiplied by β (β = 1: correct; β = 0: broken)."""

    base: AbstractFeynmanKac
    beta: jax.Array
    num_steps: int = eqx.field(static=True)

    def init(self, key, n):
        return self.base.init(key, n)

    def move(self, key, t, x):
        return self.base.move(key, t, x)

    def log_potential(self, t, prev, x):
        return self.base.log_potential(t, prev, x)

    def log_transition(self, t, prev, x):
        return self.beta * self.base.log_transition(t, prev, x)


@jax.jit
def _run_all(keys, beta, corrupt):
    """Per-run means of x_t and x_t² for (genealogy, FFBS, MCMC-BS): arrays [R, 3, 2, T]."""
    model = ScaledTransition(FK, beta, T)

    def one(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        res = smc(k1, model, N, ess_threshold=1.0, store_history=True)
        anc = jnp.where(corrupt, jnp.arange(N, dtype=jnp.int32)[None], res.history.ancestors)
        res_g = res._replace(history=res.history._replace(ancestors=anc))
        paths = [
            sample_genealogy(k2, res_g, M).trajectories,
            ffbs(k3, model, res, M).trajectories,
            mcmc_backward_sampling(k4, model, res, M, num_mcmc_steps=3).trajectories,
        ]
        return jnp.stack([jnp.stack([p.mean(0), (p**2).mean(0)]) for p in paths])

    return jax.vmap(one)(keys)


@pytest.fixture(scope="module")
def exact():
    means, covs = rts_smoother(LGSSMParams.scalar(RHO, SX, SY), YS[:, None])
    m = np.asarray(means[:, 0])
    return np.stack([m, m**2 + np.asarray(covs[:, 0, 0])])  # [2, T]


@pytest.fixture(scope="module")
def runs():
    keys = jax.random.split(jax.random.key(1), R)
    good = np.asarray(_run_all(keys, jnp.asarray(1.0), jnp.asarray(False)))
    broken = np.asarray(_run_all(keys, jnp.asarray(0.0), jnp.asarray(True)))
    return good, broken


def _max_z(per_run, exact_moments):
    """max over moments of |mean over runs − exact| / (sd / √R), and the Bonferroni t bound."""
    mean = per_run.mean(0)
    se = per_run.std(0, ddof=1) / np.sqrt(per_run.shape[0])
    z = np.abs(mean - exact_moments) / se
    bound = stats.t.ppf(1 - FAMILY_ALPHA / (2 * z.size), df=per_run.shape[0] - 1)
    return z.max(), bound


METHODS = ["genealogy", "ffbs", "mcmc"]


@pytest.mark.parametrize("i", range(3), ids=METHODS)
def test_smoothing_moments_match_rts(runs, exact, i):
    z, bound = _max_z(runs[0][:, i], exact)
    assert z < bound, f"{METHODS[i]}: max |z| = {z:.2f} over the moments (bound {bound:.2f})"


@pytest.mark.parametrize("i", range(3), ids=METHODS)
def test_broken_smoothers_are_rejected(runs, exact, i):
    z, bound = _max_z(runs[1][:, i], exact)
    assert z > bound, f"the broken {METHODS[i]} smoother passed the check (max |z| = {z:.2f})"


def test_trace_genealogy_by_hand():
    # T = 4, N = 3; ancestors[t, i] is the parent (at t-1) of particle i at t
    anc = jnp.array([[0, 1, 2], [2, 2, 0], [1, 0, 0], [2, 1, 1]], jnp.int32)
    parts = jnp.arange(12.0).reshape(4, 3)  # x_t^i = 3t + i
    hist = SMCHistory(parts, anc, jnp.zeros((4, 3)))
    b = np.asarray(trace_genealogy(hist, jnp.array([0, 1, 2])))
    # particle 0 at t=3: parent 2 at t=2 -> parent 0 at t=1 -> parent 2 at t=0
    np.testing.assert_array_equal(b[0], [2, 0, 2, 0])
    np.testing.assert_array_equal(b[1], [2, 0, 1, 1])
    np.testing.assert_array_equal(b[2], [2, 0, 1, 2])
    paths = np.asarray(genealogy_paths(hist, jnp.array([0])))
    np.testing.assert_array_equal(paths[0], [2.0, 3.0, 8.0, 9.0])
    # variable horizon: only 2 steps run, rows 2-3 are padding and repeat the final state
    b2 = np.asarray(trace_genealogy(hist, jnp.array([1]), num_steps=2))
    np.testing.assert_array_equal(b2[0], [2, 1, 1, 1])
    p2 = np.asarray(genealogy_paths(hist, jnp.array([1]), num_steps=2))
    np.testing.assert_array_equal(p2[0], [2.0, 4.0, 4.0, 4.0])


def _fake_result(history):
    z = jnp.zeros(4)
    return SMCResult(z, z, jnp.asarray(0.0), jnp.zeros(T), jnp.zeros(T, bool), jnp.zeros(T),
                     jnp.asarray(T), jnp.asarray(0), jnp.asarray(False), jnp.asarray(False),
                     history, None, None)


def test_bad_input_errors():
    res = _fake_result(history=None)
    with pytest.raises(ValueError, match="store_history"):
        ffbs(jax.random.key(0), FK, res, 2)
    with pytest.raises(ValueError, match="store_history"):
        sample_genealogy(jax.random.key(0), res, 2)
    with pytest.raises(ValueError, match="unknown backward sampling method"):
        backward_sampling(jax.random.key(0), FK, res, 2, method="rejection")
    with pytest.raises(TypeError, match="SMCHistory"):
        trace_genealogy(res, jnp.array([0]))
    res_h = _fake_result(SMCHistory(jnp.zeros((T, 4)), jnp.zeros((T, 4), jnp.int32),
                                    jnp.zeros((T, 4))))
    with pytest.raises(ValueError, match="num_samples"):
        ffbs(jax.random.key(0), FK, res_h, 0)
    with pytest.raises(ValueError, match="num_mcmc_steps"):
        mcmc_backward_sampling(jax.random.key(0), FK, res_h, 2, num_mcmc_steps=0)
