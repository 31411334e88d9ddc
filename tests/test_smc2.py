"""SMC² against exact answers on a linear-Gaussian model, and against PMMH on stochastic volatility.

Linear-Gaussian: θ = (ρ, σ_x) of x_t = ρ x_{t-1} + σ_x ε_t, y_t = x_t + σ_y η_t (σ_y known; x_0
stationary), priors ρ ~ U(−1, 1), σ_x ~ HalfNormal(2). The reference is quadrature on a fine grid
with the exact likelihood p_θ(y) of a scalar Kalman filter in float64 NumPy (independent of the JAX
code): the posterior mean and sd of ρ and σ_x, and the evidence log p(y) = log ∫ p_θ(y) p(θ) dθ.

Tolerances come from the Monte Carlo error over R independent SMC² runs (fixed keys):
- posterior moments: each run gives a (weighted) estimate of E[ρ], sd(ρ), E[σ_x], sd(σ_x); their
  mean over the runs is within a CLT bound of the exact value, |mean − exact| ≤ q · s/√R with s the
  spread over runs and q the Student-t quantile for R − 1 degrees of freedom at family-wise level
  1e-3 (Bonferroni over the 4 moments). The O(1/N_θ) bias of a self-normalised, adaptive SMC
  estimate is far below this bound at these sizes;
- evidence: Ẑ is unbiased, E[Ẑ/Z] = 1: |mean(Ẑ_r/Z) − 1| ≤ 4 · sd/√R (``exact_checks``).

Broken variant: the rejuvenation's random walk without the Jacobian of θ = T(u), which targets
p(θ | y) / |det J| instead of p(θ | y): the posterior check must reject it.

N_x doubling: runs started with N_x = 32 and ``acceptance_threshold=1`` (every rejuvenation counts
as low acceptance) double once to 64 (the cap) through the exchange step; posterior and evidence
must still match.

Stochastic volatility (no closed form): SMC² posterior means of (μ, σ) against PMMH (C chains
started at draws of an extra SMC² run, so without a burn-in bias common to all chains, and long
enough to forget their start), Welch's test with both Monte Carlo errors.

Sizes are small (one compiled program per model and N_x, shared by all runs).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

from exact_checks import ar1_noise_log_likelihood, ar1_noise_ssm, evidence_check
from models.stochastic_volatility import SVParams, stochastic_volatility
from samplers.pmmh import pmmh
from samplers.smc2 import SMC2Result, smc2

T, NTHETA, NX = 30, 128, 64
R, R_BROKEN, R_DOUBLING = 10, 6, 8
RHO, SX, SY = 0.8, 1.0, 0.5
FAMILY_ALPHA = 1e-3
PRIOR = {"rho": dist.Uniform(-1.0, 1.0), "sx": dist.HalfNormal(2.0)}


def _ssm(gain=1.0):
    """gain = 1 is the model (gain = NaN breaks every potential, for the warnings)."""
    return ar1_noise_ssm(RHO, SX, SY, gain, vectorized=True)


_, YS = _ssm().simulate(jax.random.key(0), T)


def _run(seed, **kw):
    kw = {"num_theta_particles": NTHETA, "num_x_particles": NX, "max_num_x_particles": NX,
          "progress": False, **kw}
    return smc2(jax.random.key(seed), _ssm(kw.pop("gain", 1.0)), kw.pop("ys", YS), PRIOR, **kw)


def _summary(res: SMC2Result, names=("rho", "sx")):
    """[mean, sd] of each parameter under the normalised weights, and log Ẑ."""
    w = np.exp(np.asarray(res.log_weights, np.float64))
    w /= w.sum()
    out = []
    for k in names:
        x = np.asarray(res.params[k], np.float64)
        m = w @ x
        out += [m, np.sqrt(w @ (x - m) ** 2)]
    return np.asarray(out), float(res.log_evidence)


@pytest.fixture(scope="module")
def exact():
    """Quadrature on a 800 x 800 grid: (mean ρ, sd ρ, mean σ_x, sd σ_x) and log p(y)."""
    rho = np.linspace(-0.9995, 0.9995, 800)
    sx = np.linspace(0.01, 3.5, 800)
    Rg, Sg = np.meshgrid(rho, sx, indexing="ij")
    log_joint = (ar1_noise_log_likelihood(Rg, Sg, SY, np.asarray(YS, np.float64)) + np.log(0.5)
                 + stats.halfnorm.logpdf(Sg, scale=2.0))
    top = log_joint.max()
    f = np.exp(log_joint - top)
    log_z = top + np.log(np.trapezoid(np.trapezoid(f, sx, axis=1), rho))
    w = f / f.sum()
    # the grid holds the posterior: its edge rows carry < 1e-3 of the mass
    assert w[[0, -1], :].sum() + w[:, [0, -1]].sum() < 1e-3
    mr, ms = (w * Rg).sum(), (w * Sg).sum()
    moments = np.array([mr, np.sqrt((w * (Rg - mr) ** 2).sum()),
                        ms, np.sqrt((w * (Sg - ms) ** 2).sum())])
    return moments, log_z


def _runs(seeds, **kw):
    out = [_summary(_run(s, **kw)) for s in seeds]
    return np.stack([m for m, _ in out]), np.array([z for _, z in out])


@pytest.fixture(scope="module")
def good():
    return _runs(range(100, 100 + R))


def _z(per_run, exact_moments):
    se = per_run.std(0, ddof=1) / np.sqrt(per_run.shape[0])
    z = np.abs(per_run.mean(0) - exact_moments) / se
    bound = stats.t.ppf(1 - FAMILY_ALPHA / (2 * z.size), df=per_run.shape[0] - 1)
    return z, bound


def test_posterior_matches_exact(good, exact):
    z, bound = _z(good[0], exact[0])
    assert z.max() < bound, f"SMC² vs quadrature: |z| = {z} (bound {bound:.2f})"


def test_evidence_matches_exact(good, exact):
    ok, mean, se = evidence_check(good[1], exact[1])
    assert ok, f"E[Ẑ/Z] estimated {mean:.3f} ± {se:.3f}, expected 1"


def test_rejuvenation_without_jacobian_is_rejected(exact):
    broken, _ = _runs(range(200, 200 + R_BROKEN), _broken="no_jacobian")
    z, bound = _z(broken, exact[0])
    assert z.max() > bound, f"SMC² without the Jacobian passed: |z| = {z} (bound {bound:.2f})"


def test_doubling_num_x_particles(exact):
    results = [_run(s, num_x_particles=NX // 2, acceptance_threshold=1.0)
               for s in range(300, 300 + R_DOUBLING)]
    for res in results:
        nx = np.asarray(res.num_x_particles)
        t_ex = np.flatnonzero(np.asarray(res.exchanged))
        assert t_ex.size == 1, t_ex  # one doubling, at the first rejuvenation: then at the cap
        t = int(t_ex[0])
        assert t == int(np.flatnonzero(np.asarray(res.resampled))[0])
        assert np.all(nx[:t] == NX // 2) and np.all(nx[t:] == NX), nx
        assert res.filters.log_weights.shape == (NTHETA, NX)
    summaries = [_summary(r) for r in results]
    log_z = np.array([s[1] for s in summaries])
    ok, mean, se = evidence_check(log_z, exact[1])
    assert ok, f"with the exchange step: E[Ẑ/Z] estimated {mean:.3f} ± {se:.3f}, expected 1"
    z, bound = _z(np.stack([s[0] for s in summaries]), exact[0])
    assert z.max() < bound, (
        f"SMC² with the exchange step vs quadrature: |z| = {z} (bound {bound:.2f})")


def test_result_fields():
    res = _run(1)
    assert set(res.params) == {"rho", "sx"} and res.params["rho"].shape == (NTHETA,)
    assert res.ess.shape == res.acceptance_rate.shape == res.log_evidence_increments.shape == (T,)
    np.testing.assert_allclose(float(res.log_evidence), float(jnp.sum(res.log_evidence_increments)),
                               rtol=1e-5)
    resampled = np.asarray(res.resampled)
    assert resampled.any() and np.all(np.isnan(np.asarray(res.acceptance_rate)[~resampled]))
    assert np.all(np.asarray(res.num_x_particles) == NX) and not np.asarray(res.exchanged).any()
    assert abs(float(jax.nn.logsumexp(res.log_weights))) < 1e-4
    assert int(res.num_nan_potentials) == 0 and not bool(res.extinct)
    idata = res.to_inference_data()
    assert idata.posterior["rho"].shape == (1, NTHETA)
    np.testing.assert_allclose(idata.smc_path["ess"].values, np.asarray(res.ess))
    assert idata.smc_path.attrs["log_evidence"] == float(res.log_evidence)
    # equally weighted draws: their mean is the weighted mean up to resampling noise
    w = np.exp(np.asarray(res.log_weights, np.float64))
    rho = np.asarray(res.params["rho"], np.float64)
    sd = np.sqrt(w @ (rho - w @ rho) ** 2)
    assert abs(float(idata.posterior["rho"].mean()) - w @ rho) < 4 * sd / np.sqrt(float(res.ess[-1]))


# ------------------------------------------------------------------------------------------------
# stochastic volatility: SMC² against PMMH
# ------------------------------------------------------------------------------------------------

SV_T, SV_R, SV_C = 50, 8, 8
SV_PRIOR = {"mu": dist.Normal(-1.0, 1.0), "sigma": dist.Gamma(4.0, 10.0)}


def test_stochastic_volatility_against_pmmh():
    ssm = stochastic_volatility(SVParams(jnp.asarray(-1.0), jnp.asarray(0.9), jnp.asarray(0.4)))
    _, ys = ssm.simulate(jax.random.key(5), SV_T)
    kw = dict(num_theta_particles=NTHETA, num_x_particles=NX, max_num_x_particles=NX,
              progress=False)
    runs = [smc2(jax.random.key(10 + r), ssm, ys, SV_PRIOR, **kw) for r in range(SV_R + 1)]
    means = np.stack([_summary(r, ("mu", "sigma"))[0][::2] for r in runs[:SV_R]])
    # PMMH chains start at draws of the extra run (resampled by its weights)
    extra = runs[SV_R]
    idx = jax.random.categorical(jax.random.key(7), extra.log_weights, shape=(SV_C,))
    init = {k: v[idx] for k, v in extra.params.items()}
    chains = pmmh(jax.random.key(3), ssm, ys, SV_PRIOR, num_particles=NX, num_warmup=150,
                  num_samples=300, num_chains=SV_C, init_params=init, progress=False)
    chain_means = np.stack([np.asarray(chains.params[k]).mean(1) for k in SV_PRIOR], axis=1)
    se = np.sqrt(means.var(0, ddof=1) / SV_R + chain_means.var(0, ddof=1) / SV_C)
    z = np.abs(means.mean(0) - chain_means.mean(0)) / se
    bound = stats.t.ppf(1 - FAMILY_ALPHA / (2 * z.size), df=min(SV_R, SV_C) - 1)
    assert z.max() < bound, (
        f"SMC² {means.mean(0)} vs PMMH {chain_means.mean(0)}: |z| = {z} (bound {bound:.2f})")


# ------------------------------------------------------------------------------------------------
# errors and warnings
# ------------------------------------------------------------------------------------------------


def test_bad_input_errors(no_shape_checks):
    ssm, key = _ssm(), jax.random.key(0)
    kw = dict(num_theta_particles=4, num_x_particles=4)

    def call(**over):
        args = {"key": key, "ssm": ssm, "observations": YS, "prior": PRIOR, **kw, **over}
        return smc2(args.pop("key"), args.pop("ssm"), args.pop("observations"), args.pop("prior"),
                    **args)

    with pytest.raises(TypeError, match="PRNG key"):
        call(key=0)
    with pytest.raises(TypeError, match="StateSpaceModel"):
        call(ssm=ssm.bootstrap(YS))
    with pytest.raises(ValueError, match="num_theta_particles"):
        call(num_theta_particles=1)
    with pytest.raises(ValueError, match="num_x_particles"):
        call(num_x_particles=0)
    with pytest.raises(ValueError, match="num_mcmc_steps"):
        call(num_mcmc_steps=0)
    with pytest.raises(ValueError, match="ess_threshold"):
        call(ess_threshold=1.5)
    with pytest.raises(ValueError, match="acceptance_threshold"):
        call(acceptance_threshold=-0.1)
    with pytest.raises(ValueError, match="max_num_x_particles"):
        call(max_num_x_particles=2)
    with pytest.raises(ValueError, match="scale"):
        call(scale=0.0)
    with pytest.raises(TypeError, match="numpyro Distribution"):
        call(prior={"rho": 0.5})
    with pytest.raises(ValueError, match="not fields of the model's params"):
        call(prior={"phi": dist.Normal(0.0, 1.0)})
    with pytest.raises(ValueError, match="observations"):
        call(observations=jnp.zeros((T, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        call(observations=np.asarray(YS).copy() * np.where(np.arange(T) == 3, np.nan, 1.0))
    with pytest.raises(ValueError, match="resampling"):
        call(resampling="bogus")


def _messages(record):
    return " | ".join(str(w.message) for w in record if issubclass(w.category, RuntimeWarning))


def test_warnings():
    # proposals a thousand times too wide: nothing is accepted
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = _run(5, scale=1000.0)
    assert np.nanmax(np.asarray(res.acceptance_rate)) < 0.01
    assert "accepted fewer than 1%" in _messages(rec)
    # an outlier: one θ-particle explains it far better than all others, the θ-ESS collapses
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = _run(6, ys=YS.at[12].set(60.0))
    assert float(res.ess[12]) < 1.5 and "θ-ESS fell" in _messages(rec)
    # NaN potentials everywhere: counted, every θ-particle dies, reported
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = _run(7, gain=float("nan"))
    msg = _messages(rec)
    assert int(res.num_nan_potentials) > 0 and bool(res.extinct)
    assert float(res.log_evidence) == -np.inf
    assert "NaN" in msg and "zero weight" in msg
    # a healthy run is silent
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _run(8)
    assert not _messages(rec), _messages(rec)
