r"""Waste-free tempered SMC (Dau & Chopin 2022) as a Feynman-Kac model.

Standard SMC samplers resample \(N\) particles and apply \(k\) MCMC steps to each, keeping only the
last state of every chain: \(N k\) likelihood evaluations buy \(N\) particles. The *waste-free*
variant resamples only \(M = N / P\) particles and runs from each a chain of \(P - 1\) MCMC steps
that leave the current tempered target \(\pi_{\lambda_{t-1}}\) invariant, keeping **every** state:
the \(M\) chains of length \(P\) (start included) are the \(N = M P\) new particles, equally weighted,
which the next step reweights by \(L^{\lambda_t - \lambda_{t-1}}\) as usual. Each state is marginally
distributed as \(\pi_{\lambda_{t-1}}\) (the chain is stationary), so the weighted population targets
\(\pi_{\lambda_t}\) and \(\hat Z = \prod_t \frac1N \sum_i G_t(z^i_t)\) is consistent, for a fixed
number of likelihood evaluations per step, with no tuning of the number of MCMC steps: long chains
(large \(P\)) and few starting points trade variance for mixing automatically (Dau & Chopin 2022,
Prop. 1 and Sect. 4).

Here the engine resamples all \(N\) particles every step (``ess_threshold=1``, systematic); the move
keeps a uniformly random subset of \(M\) of them as chain starts, which is an unbiased resampling of
\(M\) from the weighted population (each start has the weighted law, counts have expectation
\(M W_i\)). The chains use the tempering model's kernel, step size and population covariance, adapted
as in :class:`~samplers.tempering.AdaptiveTempering`.

Reference: Dau & Chopin (2022), "Waste-free sequential Monte Carlo", JRSS B 84(1).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.tempering import log_likelihood_from_move

__all__ = ["WasteFreeTempering"]


class WasteFreeTempering(AbstractFeynmanKac):
    r"""Waste-free move around an :class:`~samplers.tempering.AdaptiveTempering` model (see the
    module docstring). ``chain_length`` is \(P \ge 2\); the number of particles must be a multiple
    of it. λ, Σ, ε and the potentials are the base model's; only the move differs."""

    base: AbstractFeynmanKac
    chain_length: int = eqx.field(static=True)

    is_adaptive: ClassVar[bool] = True
    num_steps: ClassVar[None] = None

    def __check_init__(self):
        checks.positive_int("chain_length", self.chain_length, minimum=2)

    def init(self, key: PRNGKeyArray, num_particles: int):
        if num_particles % self.chain_length:
            raise ValueError(
                f"waste-free SMC needs num_particles to be a multiple of chain_length "
                f"({num_particles} particles, chain_length {self.chain_length})"
            )
        return self.base.init(key, num_particles)

    def move(self, key: PRNGKeyArray, t: Int[Array, ""], particles):
        b = self.base
        z = particles.z
        n, d = z.shape
        p = self.chain_length
        m = n // p
        k_pick, k_run = jax.random.split(key)
        pick = jax.random.permutation(k_pick, n)[:m]
        starts = z[pick]  # M of the N resampled particles
        logdensity = b.tempered_log_density(b.lam)
        prepared = b.kernel.prepare(b.step_size, b.cov)
        algo = b.kernel.build(logdensity, prepared)

        def body(states, k):
            states, info = b.kernel.step_population(k, logdensity, prepared, states)
            return states, (states.position, states.logdensity, info.acceptance_rate)

        state0 = jax.vmap(algo.init)(starts)
        _, (chain, ld, acc) = jax.lax.scan(body, state0, jax.random.split(k_run, p - 1))  # [P-1, M, ...]
        states = jnp.concatenate([starts[None], chain], axis=0)  # [P, M, D]: every state kept
        z_new = states.reshape(n, d)
        # log L of the chain states from their MCMC states (the starts keep theirs)
        ll_chain = log_likelihood_from_move(b.target, b.lam, chain.reshape(-1, d), ld.reshape(-1))
        ll = jnp.concatenate([particles.log_likelihood[pick], ll_chain.astype(particles.log_likelihood.dtype)])
        chol = jnp.linalg.cholesky(b.cov)
        w = jax.scipy.linalg.solve_triangular(chol, (chain[-1] - starts).T, lower=True)
        jump_end = jnp.sum(w * w, axis=0) / d  # chain ends against their starts
        acc_chain = jnp.mean(acc, axis=0)  # [M]
        per = lambda v: jnp.broadcast_to(v[None], (p, m)).reshape(n)  # noqa: E731
        return type(particles)(z_new, ll, per(acc_chain), per(jump_end),
                               jnp.full((n,), p - 1, jnp.int32))

    def log_potential(self, t, previous, particles) -> Float[Array, " N"]:
        return self.base.log_potential(t, previous, particles)

    def done(self, particles) -> Bool[Array, " N"]:
        return self.base.done(particles)

    def info(self) -> PyTree:
        return self.base.info()

    def adapt(self, t, particles, log_weights) -> "WasteFreeTempering":
        return WasteFreeTempering(self.base.adapt(t, particles, log_weights), self.chain_length)
