"""Learned proposals (VSMC/AESMC/FIVO) and learned twists, against exact answers.

Part 1: a 5-dimensional linear-Gaussian state-space model, T = 10, N = 4 particles, observation
noise sd 0.3 (the bootstrap filter's E log Ẑ lies hundreds of nats below the Kalman
log-likelihood). E log Ẑ of the bootstrap filter, of the exactly locally optimal proposal
p(x_t | x_{t-1}, y_t), of the smoothing proposal p(x_t | x_{t-1}, y_{t:T-1}) without resampling
(zero variance), and of learned proposals (linear-Gaussian diagonal / Cholesky, MLP) before and
after maximising the SMC bound with ``samplers.variational.fit``.

Part 2: a Markov-chain language model (the toy chain of ``models.markov_lm.toy_test_bed`` with 10
generated tokens and a strong answer reward): E log Ẑ with no twist, a learned twist and the
exact optimal twist (backward recursion), under the potential-only twist (bootstrap proposal,
weights G_t psi_t / psi_{t-1}) and the twisted proposal, and the learned twist's distance to the
optimal one; the exact log Z is the forward recursion of ``models.markov_lm_exact``.

Every E log Ẑ is the mean of 1000 independent runs (± its standard error); "sd" is the standard
deviation of log Ẑ over runs. Run: ``.venv/bin/python benchmarks/bench_learned_proposals.py``.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.linear_gaussian import LGSSMParams, kalman_filter, lgssm
from models.markov_lm import MarkovTestBed, token_constraint, toy_test_bed
from models.markov_lm_exact import forward_answer_posterior
from samplers import variational as vi
from samplers.smc import smc

D, T, N, SIGMA_Y = 5, 10, 4, 0.3
RUNS = 1000


def _stats(values):
    v = np.asarray(values, np.float64)
    return v.mean(), v.std(ddof=1) / np.sqrt(v.size), v.std(ddof=1)


def _row(name, values, ref, extra=""):
    m, se, sd = _stats(values)
    print(f"| {name:<44} | {m:10.2f} ± {se:5.2f} | {sd:8.3f} | {ref - m:9.2f} |{extra}")


def lgssm_part(key):
    p = LGSSMParams(jnp.zeros(D), jnp.eye(D), 0.9 * jnp.eye(D), jnp.eye(D), jnp.eye(D),
                    SIGMA_Y**2 * jnp.eye(D))
    ssm = lgssm(p)
    _, ys = ssm.simulate(jax.random.key(0), T)
    log_lik = float(kalman_filter(p, ys).log_likelihood)
    target = vi.guided_target(ssm, ys)
    keys = jax.random.split(key, RUNS)

    @eqx.filter_jit
    def evaluate(q, ks, ess=1.0):
        return jax.vmap(lambda k: smc(k, target(q), N, ess_threshold=ess).log_evidence)(ks)

    boot = jax.jit(jax.vmap(lambda k: smc(k, ssm.bootstrap(ys), N, ess_threshold=1.0).log_evidence))
    print(f"\nlinear-Gaussian SSM: d = {D}, T = {T}, N = {N}, observation sd {SIGMA_Y}; "
          f"Kalman log p(y) = {log_lik:.2f}\n")
    print(f"| {'filter / proposal':<44} | {'E log Ẑ':>18} | {'sd':>8} | {'gap':>9} |")
    print(f"|{'-' * 46}|{'-' * 20}|{'-' * 10}|{'-' * 11}|")
    _row("bootstrap", boot(keys), log_lik)
    _row("locally optimal p(x_t ∣ x_t-1, y_t)", evaluate(vi.LinearGaussianProposal.locally_optimal(p), keys), log_lik)
    _row("smoothing p(x_t ∣ x_t-1, y_t:T-1), no resampling",
         evaluate(vi.LinearGaussianProposal.smoothing(p, ys), keys, 0.0), log_lik)
    obj = vi.SMCBound(N, 4, ess_threshold=1.0)
    learned = {
        "linear, diagonal": (vi.LinearGaussianProposal.init(D, D), 1500, 3e-2),
        "linear, Cholesky": (vi.LinearGaussianProposal.init(D, D, cholesky=True), 1500, 3e-2),
        "MLP (2 x 32 tanh)": (vi.MLPProposal.init(jax.random.key(3), D, D), 2000, 3e-3),
    }
    for name, (q0, steps, lr) in learned.items():
        _row(f"{name}: initial", evaluate(q0, keys), log_lik)
        t0 = time.perf_counter()
        opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
        res = vi.fit(jax.random.key(2), q0, obj, target, opt, steps, progress=False)
        secs = time.perf_counter() - t0
        _row(f"{name}: trained ({steps} steps)", evaluate(res.params, keys), log_lik,
             f" {secs:.0f} s")


def markov_test_bed() -> MarkovTestBed:
    """The toy chain (V = 5: a b c . <eos>), 10 generated tokens, answer reward c: e^5, b: e^-5,
    each `a` e^0.3, no `b b`."""
    base = toy_test_bed()
    cons = token_constraint(5, token_log_reward=[0.3, 0, 0, 0, 0], forbid_repeat=(1,),
                            answer_log_reward=[0.0, -5.0, 5.0, 0.0, 0.0])
    return MarkovTestBed(base.lm, cons, base.prompt, max_length=11, max_step_tokens=3)


def twist_part(key, n=8, steps=1500):
    bed = markov_test_bed()
    log_z, _ = forward_answer_posterior(bed)
    exact, log_z_rec = vi.optimal_twist(bed)
    eos = bed.lm.eos_id
    targets = {tp: vi.twist_target(bed, twisted_proposal=tp) for tp in (False, True)}
    g = targets[True].num_steps
    keys = jax.random.split(key, RUNS)

    @eqx.filter_jit
    def evaluate(tw, ks, tp):
        return jax.vmap(lambda k: smc(k, targets[tp](tw), n, ess_threshold=1.0).log_evidence)(ks)

    none = vi.TableTwist.zeros(g, bed.lm.vocab_size)
    opt = optax.adam(optax.cosine_decay_schedule(0.1, steps, alpha=0.05))
    t0 = time.perf_counter()
    full = vi.fit(jax.random.key(4), none, vi.TwistedSMCBound(n, 1, 16), targets[True], opt, steps,
                  progress=False)
    secs = time.perf_counter() - t0
    pathwise = vi.fit(jax.random.key(4), none, vi.SMCBound(n, 16, "multinomial", 1.0),
                      targets[True], opt, steps, progress=False)
    print(f"\nMarkov-chain LM: V = 5, G = {g} tokens, N = {n}; exact log Z = {log_z:.4f} "
          f"(backward recursion {log_z_rec:.4f})\n")
    print("| twist | E log Ẑ, potential-only twist | E log Ẑ, twisted proposal | sd (twisted) "
          "| distance to ψ* (centred) |")
    print("|---|---|---|---|---|")
    for name, tw in (("none (ψ = 1)", none),
                     (f"learned: TwistedSMCBound, {steps} steps ({secs:.0f} s)", full.params),
                     (f"pathwise gradient only (SMCBound), {steps} steps", pathwise.params),
                     ("exact ψ* (backward recursion)", exact)):
        cells = []
        for tp in (False, True):
            m, se, sd = _stats(evaluate(tw, keys, tp))
            cells.append(f"{m:.3f} ± {se:.3f}")
        dist = vi.twist_distance(tw, exact, eos)
        cdist = vi.twist_distance(tw, exact, eos, centred=True)
        print(f"| {name} | {cells[0]} | {cells[1]} | {sd:.3f} | {dist:.2f} ({cdist:.2f}) |")


if __name__ == "__main__":
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}")
    lgssm_part(jax.random.key(1))
    twist_part(jax.random.key(5))
