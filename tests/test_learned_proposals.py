"""Learned proposals and twists (samplers.variational.proposals, samplers.variational.twists)
against exact answers.

References: the Kalman log-likelihood of a 5-D linear-Gaussian SSM (models.linear_gaussian) and
the exact log Z of the Markov-chain language model by enumeration and forward recursion
(models.markov_lm_exact). Tolerances are Z = 4 standard errors of the Monte Carlo estimates;
"zero variance" checks use float32 round-off (1e-3 nats over a 10-step filter). Every test has a
broken variant that it rejects: a proposal whose log-density is off by a constant, a locally optimal
proposal with a wrong mean, a twist not divided by the previous twist, the pathwise-only gradient
for a twist. Sizes are small and the compiled evaluators are shared by module fixtures.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

from models.linear_gaussian import LGSSMParams, kalman_filter, lgssm
from models.markov_lm import MarkovTestBed, token_constraint, toy_test_bed
from models.markov_lm_exact import exact_posterior, forward_answer_posterior
from samplers import variational as vi
from samplers.smc import smc

Z = 4.0
D, T, N = 5, 10, 4


def _mean_se(x):
    x = np.asarray(x, np.float64)
    return x.mean(), x.std(ddof=1) / np.sqrt(x.size)


# ------------------------------------------------------------------------------------------------
# linear-Gaussian model, shared compiled evaluator
# ------------------------------------------------------------------------------------------------


class _ShiftedLaw(dist.Distribution):
    """A law that samples like ``base`` but whose log-density is off by ``shift``."""

    def __init__(self, base, shift):
        self.base, self.shift = base, shift
        super().__init__(base.batch_shape, base.event_shape)

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape)

    def log_prob(self, value):
        return self.base.log_prob(value) + self.shift


class _Shifted(vi.AbstractProposal):
    """``base`` with its log-density off by ``shift`` nats (0: correct; else broken, G_t off by
    -shift). Every linear proposal of these tests goes through this wrapper with T Cholesky rows,
    so one compiled evaluator serves them all."""

    base: vi.LinearGaussianProposal
    shift: jax.Array

    def __call__(self, t, x_prev, y):
        return _ShiftedLaw(self.base(t, x_prev, y), self.shift)


def _wrap(q, shift=0.0):
    """``q`` with T rows (row min(t, R-1) repeated) and a Cholesky factor, in :class:`_Shifted`."""
    idx = np.minimum(np.arange(T), q.c.shape[0] - 1)
    tril = q.tril if q.tril is not None else jnp.zeros_like(q.A)
    full = vi.LinearGaussianProposal(q.A[idx], q.B[idx], q.c[idx], q.log_diag[idx], tril[idx])
    return _Shifted(full, jnp.asarray(shift, jnp.float32))


@pytest.fixture(scope="module")
def lg():
    p = LGSSMParams(jnp.zeros(D), jnp.eye(D), 0.9 * jnp.eye(D), jnp.eye(D), jnp.eye(D),
                    0.3**2 * jnp.eye(D))
    ssm = lgssm(p)
    _, ys = ssm.simulate(jax.random.key(0), T)
    target = vi.guided_target(ssm, ys)

    @eqx.filter_jit
    def evaluate(q, keys, resample):
        """log Ẑ per key; ``resample`` (traced) forces resampling before every step or never."""
        schedule = jnp.full((T,), resample)
        return jax.vmap(lambda k: smc(k, target(q), N, ess_threshold=0.0,
                                      resample_schedule=schedule).log_evidence)(keys)

    return p, ssm, ys, target, evaluate, float(kalman_filter(p, ys).log_likelihood)


def test_smoothing_proposal_has_zero_variance(lg):
    """p(x_t | x_{t-1}, y_{t:}) without resampling: every path weighs p(y) (log Ẑ = Kalman, every
    draw); a log-density off by a constant gives a bound above log Z, which the check rejects."""
    p, _, ys, _, evaluate, log_lik = lg
    keys = jax.random.split(jax.random.key(1), 16)
    q = vi.LinearGaussianProposal.smoothing(p, ys)
    vals = np.asarray(evaluate(_wrap(q), keys, False), np.float64)
    print(f"smoothing proposal: log Ẑ {vals.mean():.5f} ± sd {vals.std():.2e}, Kalman {log_lik:.5f}")
    assert vals.std() < 1e-3 and np.max(np.abs(vals - log_lik)) < 1e-3
    broken = np.asarray(evaluate(_wrap(q, -0.5), keys, False), np.float64)
    print(f"log q off by -0.5: log Ẑ {broken.mean():.3f} (Kalman + {broken.mean() - log_lik:.2f})")
    assert broken.mean() > log_lik + Z * max(broken.std(), 1e-3) / np.sqrt(broken.size)


def test_locally_optimal_weight_is_predictive_likelihood(lg):
    """With q = p(x_t | x_{t-1}, y_t), G_t = p(y_t | x_{t-1}) = N(y_t; H A x_{t-1}, H Q H' + R),
    whatever x_t; a mean with the wrong sign of the y-term breaks it."""
    p, _, ys, target, _, _ = lg
    t = jnp.asarray(3, jnp.int32)
    xp = jax.random.normal(jax.random.key(2), (6, D))
    x = jax.random.normal(jax.random.key(3), (6, D))
    exact = dist.MultivariateNormal(xp @ (p.H @ p.A).T, p.H @ p.Q @ p.H.T + p.R).log_prob(ys[3])
    q = vi.LinearGaussianProposal.locally_optimal(p)
    pot = eqx.filter_jit(lambda q: target(q).log_potential(t, xp, x))
    np.testing.assert_allclose(pot(q), exact, rtol=1e-4, atol=1e-3)
    bad = eqx.tree_at(lambda m: m.B, q, -q.B)
    assert np.max(np.abs(np.asarray(pot(bad) - exact))) > 1.0


def test_locally_optimal_bound_against_kalman(lg):
    """The locally optimal proposal's E log Ẑ (100 runs, N = 4, resampling every step) lies below
    the Kalman log-likelihood, within a nat of it (the bootstrap filter's gap, hundreds of nats,
    is measured in benchmarks/bench_learned_proposals.py)."""
    p, ssm, ys, _, evaluate, log_lik = lg
    keys = jax.random.split(jax.random.key(4), 100)
    lo, slo = _mean_se(evaluate(_wrap(vi.LinearGaussianProposal.locally_optimal(p)), keys, True))
    print(f"E log Ẑ: locally optimal {lo:.3f} ± {slo:.3f}, Kalman {log_lik:.3f}")
    assert lo <= log_lik + Z * slo
    assert log_lik - lo < 1.0


def test_fit_learned_proposal_closes_gap(lg):
    """A short fit of the SMC bound (100 steps) closes most of the (hundreds of nats) gap of the
    initial linear proposal, and the trained bound stays below the Kalman log-likelihood."""
    p, _, ys, target, evaluate, log_lik = lg
    keys = jax.random.split(jax.random.key(5), 100)
    q0 = vi.LinearGaussianProposal.init(D, D, cholesky=True)
    before, _ = _mean_se(evaluate(_wrap(q0), keys, True))
    res = vi.fit(jax.random.key(7), q0, vi.SMCBound(N, 2, ess_threshold=1.0), target,
                 optax.adam(8e-2), 100, progress=False)
    assert not res.nan_stopped
    after, se = _mean_se(evaluate(_wrap(res.params), keys, True))
    print(f"linear: E log Ẑ {before:.1f} -> {after:.2f} ± {se:.2f}; Kalman {log_lik:.2f}")
    assert after <= log_lik + Z * se
    assert log_lik - before > 100.0 and log_lik - after < 0.25 * (log_lik - before)


# ------------------------------------------------------------------------------------------------
# twists on the Markov-chain language model
# ------------------------------------------------------------------------------------------------


def _hard_bed() -> MarkovTestBed:
    base = toy_test_bed()
    cons = token_constraint(5, token_log_reward=[0.3, 0, 0, 0, 0], forbid_repeat=(1,),
                            answer_log_reward=[0.0, -5.0, 5.0, 0.0, 0.0])
    return MarkovTestBed(base.lm, cons, base.prompt, max_length=7, max_step_tokens=3)


class _UndividedTwist(vi.TwistedMarkovLM):
    """Broken: weights G_t ψ_t without the division by ψ_{t-1}."""

    def log_potential(self, t, previous, particles):
        lp = super().log_potential(t, previous, particles)
        if previous is None:
            return lp
        back = self._log_psi(t - 1)[previous["token"]]
        return jnp.where(previous["done"], lp, lp + back)


@pytest.fixture(scope="module")
def twist_setup():
    bed = _hard_bed()
    exact, log_z_rec = vi.optimal_twist(bed)
    targets = {tp: vi.twist_target(bed, twisted_proposal=tp) for tp in (False, True)}

    @eqx.filter_jit
    def evaluate(model_or_twist, keys, tp, n=8):
        model = (model_or_twist if isinstance(model_or_twist, vi.TwistedMarkovLM)
                 else targets[tp](model_or_twist))
        return jax.vmap(lambda k: smc(k, model, n, ess_threshold=1.0).log_evidence)(keys)

    return bed, exact, log_z_rec, targets, evaluate


def test_optimal_twist_recursion_matches_exact_log_z(twist_setup):
    """The backward recursion's log Z equals the forward recursion and the enumeration (toy bed
    and the harder bed), and ψ*_{G-2}(v) = Σ_w k_{G-1}(v, w)."""
    bed = twist_setup[0]
    for b in (toy_test_bed(), bed):
        _, log_z = vi.optimal_twist(b)
        np.testing.assert_allclose(log_z, forward_answer_posterior(b)[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(vi.optimal_twist(toy_test_bed())[1],
                               exact_posterior(toy_test_bed()).log_evidence, rtol=0, atol=1e-10)
    exact = twist_setup[1]
    lp = np.asarray(bed.lm.log_probs, np.float64) + np.asarray(bed.constraint.log_pair, np.float64)
    psi = np.asarray(bed.constraint.log_final, np.float64)
    k_last = np.exp(lp + psi[None, :])  # last step: answer = the token drawn
    k_last[:, 4] = np.exp(lp[:, 4] + psi)  # EOS: answer = the previous token
    g = exact.log_psi.shape[0]
    np.testing.assert_allclose(np.asarray(exact.log_psi[g - 2, :4]),
                               np.log(k_last.sum(axis=1))[:4], rtol=1e-5)


def test_exact_twist_zero_variance_and_unbiased_twists(twist_setup):
    """Twisted proposal + ψ*: log Ẑ = log Z for every draw. Any twist leaves Ẑ unbiased
    (E[Ẑ/Z] = 1 within 4 se); a twist not divided by the previous twist is biased."""
    bed, exact, log_z, targets, evaluate = twist_setup
    keys = jax.random.split(jax.random.key(8), 400)
    vals = np.asarray(evaluate(exact, keys[:32], True), np.float64)
    print(f"exact twist: log Ẑ sd {vals.std():.2e}, max |log Ẑ - log Z| "
          f"{np.max(np.abs(vals - log_z)):.2e}")
    assert np.max(np.abs(vals - log_z)) < 1e-4
    rough = vi.TableTwist(exact.log_psi + jax.random.normal(jax.random.key(9), exact.log_psi.shape))
    for tp in (False, True):
        ratio = np.exp(np.asarray(evaluate(rough, keys, tp), np.float64) - log_z)
        m, se = _mean_se(ratio)
        print(f"perturbed twist, twisted_proposal={tp}: E[Ẑ/Z] = {m:.4f} ± {se:.4f}")
        assert abs(m - 1.0) < Z * se
    broken = _UndividedTwist(*(getattr(targets[False](rough), f) for f in (
        "log_p", "log_pair", "log_final", "first_token", "twist", "num_steps", "eos_id",
        "twisted_proposal")))
    ratio = np.exp(np.asarray(evaluate(broken, keys, False), np.float64) - log_z)
    m, se = _mean_se(ratio)
    print(f"undivided twist: E[Ẑ/Z] = {m:.3g} ± {se:.3g}")
    assert abs(m - 1.0) > Z * se


def test_learned_twist_through_smc_bound(twist_setup):
    """From a perturbed optimal twist, a short fit of TwistedSMCBound (full gradient) moves the
    twist towards ψ* and raises E log Ẑ towards log Z; the pathwise-only gradient (SMCBound, draws
    and indices held fixed) moves it away from ψ* and lowers the bound (broken)."""
    bed, exact, log_z, targets, evaluate = twist_setup
    eos = bed.lm.eos_id
    start = vi.TableTwist(exact.log_psi + jax.random.normal(jax.random.key(9), exact.log_psi.shape))
    keys = jax.random.split(jax.random.key(10), 500)
    opt = optax.adam(optax.cosine_decay_schedule(0.08, 80, alpha=0.1))
    out = {}
    for name, obj in (("full", vi.TwistedSMCBound(8, 1, 8)),
                      ("pathwise", vi.SMCBound(8, 8, "multinomial", 1.0))):
        res = vi.fit(jax.random.key(11), start, obj, targets[True], opt, 80, progress=False)
        out[name] = (*_mean_se(evaluate(res.params, keys, True)),
                     vi.twist_distance(res.params, exact, eos))
    b, sb = _mean_se(evaluate(start, keys, True))
    d0 = vi.twist_distance(start, exact, eos)
    (a, sa, d1), (c, sc, d2) = out["full"], out["pathwise"]
    print(f"log Z {log_z:.3f}: start {b:.3f} ± {sb:.3f} (distance {d0:.2f}); full gradient "
          f"{a:.3f} ± {sa:.3f} ({d1:.2f}); pathwise only {c:.3f} ± {sc:.3f} ({d2:.2f})")
    assert a <= log_z + Z * sa
    assert a - b > Z * np.hypot(sa, sb) and d1 < 0.8 * d0
    assert c < b - Z * np.hypot(sb, sc) and d2 > d0
