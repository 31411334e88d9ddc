r"""MCMC move strategies for SMC samplers: thin wrappers over blackjax kernels.

A strategy runs ``num_steps`` transitions of a blackjax kernel that leaves a given log-density
invariant, for one particle, with a step size ε and a covariance estimate Σ of the current
population (the SMC sampler adapts both between steps, Chopin 2002; Buchholz, Chopin & Jacob 2021):

- :class:`RandomWalk`: Gaussian random-walk Metropolis, proposal z' = z + ε L ξ with Σ = L Lᵀ
  (``blackjax.additive_step_random_walk``); ε starts at 2.38/√D (Roberts & Rosenthal 2001);
- :class:`MALA`: the Metropolis-adjusted Langevin algorithm preconditioned by Σ: blackjax's MALA
  (``blackjax.mcmc.mala``) on \(u = L^{-1} z\), \(\Sigma = L L^\top\), i.e. the proposal
  \(z' = z + \tau \Sigma \nabla \log \pi(z) + \sqrt{2\tau}\, L \xi\) (Roberts & Tweedie 1996;
  \(\tau\) starts at \(d^{-1/3}\), Roberts & Rosenthal 1998);
- :class:`HMC`: Hamiltonian Monte Carlo with inverse mass matrix Σ (``blackjax.hmc``);
- :class:`NUTS`: the No-U-Turn sampler with inverse mass matrix Σ (``blackjax.nuts``).

Each reports its mean acceptance probability, from which the sampler tunes ε towards
``target_acceptance``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import blackjax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ppl import checks

__all__ = ["AbstractMCMCKernel", "RandomWalk", "MALA", "HMC", "NUTS", "get_kernel"]


class AbstractMCMCKernel(eqx.Module):
    """A strategy: ``prepare(ε, Σ)`` once per SMC step (outside the particle ``vmap``), then
    ``build(logdensity_fn, prepared)``, whose blackjax ``init`` / ``step`` the sampler runs per
    particle (``run`` does a fixed number of transitions of one particle)."""

    @property
    @abc.abstractmethod
    def target_acceptance(self) -> float:
        """Acceptance probability that ε is tuned towards."""

    @abc.abstractmethod
    def initial_step_size(self, dim: int) -> float:
        """ε for the first move, for a D-dimensional target preconditioned by Σ."""

    def prepare(self, step_size: Float[Array, ""], cov: Float[Array, "D D"]) -> Any:
        """Per-step kernel parameters shared by all particles (default: (ε, Σ))."""
        return step_size, cov

    @abc.abstractmethod
    def build(self, logdensity_fn: Callable, prepared: Any) -> blackjax.base.SamplingAlgorithm:
        """The blackjax sampling algorithm for ``logdensity_fn`` with the prepared parameters."""

    def randomize(self, key: PRNGKeyArray, prepared: Any) -> Any:
        """Parameters of one transition, drawn once for the whole population from the prepared
        ones (default: unchanged; :class:`HMC` draws its number of leapfrog steps)."""
        del key
        return prepared

    def step_population(self, key: PRNGKeyArray, logdensity_fn: Callable, prepared: Any,
                        states: Any) -> tuple[Any, Any]:
        """One transition of every particle (``states`` batched over particles, one key each
        from ``key``; the shared parameters of :meth:`randomize` from ``fold_in(key, 1)``)."""
        algo = self.build(logdensity_fn, self.randomize(jax.random.fold_in(key, 1), prepared))
        n = jax.tree.leaves(states)[0].shape[0]
        return jax.vmap(algo.step)(jax.random.split(key, n), states)

    def run(
        self,
        key: PRNGKeyArray,
        logdensity_fn: Callable,
        position: Float[Array, " D"],
        prepared: Any,
        num_steps: int,
    ) -> tuple[Float[Array, " D"], Float[Array, ""]]:
        """``num_steps`` transitions from ``position``; returns (new position, mean acceptance)."""
        algo = self.build(logdensity_fn, prepared)

        def body(state, k):
            step = self.build(logdensity_fn, self.randomize(jax.random.fold_in(k, 1), prepared)).step
            state, info = step(k, state)
            return state, info.acceptance_rate

        state, acc = jax.lax.scan(body, algo.init(position), jax.random.split(key, num_steps))
        return state.position, jnp.mean(acc)


class RandomWalk(AbstractMCMCKernel):
    """Gaussian random-walk Metropolis with proposal covariance ε² Σ."""

    acceptance: float = 0.3

    @property
    def target_acceptance(self) -> float:
        return self.acceptance

    def initial_step_size(self, dim: int) -> float:
        return 2.38 / dim**0.5

    def prepare(self, step_size, cov):
        return step_size * jnp.linalg.cholesky(cov)

    def build(self, logdensity_fn, prepared):
        return blackjax.additive_step_random_walk(
            logdensity_fn, blackjax.mcmc.random_walk.normal(prepared)
        )


class _GradientKernel(AbstractMCMCKernel):
    """Shared by the gradient-based kernels: target acceptance and a d^(-1/4) initial step."""

    acceptance: eqx.AbstractVar[float]

    @property
    def target_acceptance(self) -> float:
        return self.acceptance

    def initial_step_size(self, dim: int) -> float:
        return 1.0 / dim**0.25


class PreconditionedMALAState(NamedTuple):
    """State of :class:`MALA`: the position \\(z\\), its log-density (what the SMC samplers read)
    and blackjax's MALA state on \\(u = L^{-1} z\\)."""

    position: Float[Array, " D"]
    logdensity: Float[Array, ""]
    u_state: blackjax.mcmc.mala.MALAState


class MALA(_GradientKernel):
    r"""MALA preconditioned by \(\Sigma = L L^\top\) with step \(\tau\) (``step_size``):
    blackjax's MALA kernel on \(u = L^{-1} z\), whose log-density \(\log\pi(L u)\) differs from
    \(\log \pi(z)\) by the constant \(\log|L|\), so the acceptance ratio is unchanged."""

    acceptance: float = 0.574

    def initial_step_size(self, dim: int) -> float:
        return 1.0 / dim ** (1.0 / 3.0)

    def prepare(self, step_size, cov):
        return step_size, jnp.linalg.cholesky(cov)

    def build(self, logdensity_fn, prepared):
        step_size, chol = prepared
        kernel = blackjax.mcmc.mala.build_kernel()

        def logdensity_u(u):
            return logdensity_fn(chol @ u)

        def init(position):
            u = jax.scipy.linalg.solve_triangular(chol, position, lower=True)
            u_state = blackjax.mcmc.mala.init(u, logdensity_u)
            return PreconditionedMALAState(position, u_state.logdensity, u_state)

        def step(key, state):
            u_state, info = kernel(key, state.u_state, logdensity_u, step_size)
            return PreconditionedMALAState(chol @ u_state.position, u_state.logdensity, u_state), info

        return blackjax.base.SamplingAlgorithm(init, step)


class HMC(_GradientKernel):
    r"""HMC with inverse mass matrix Σ and leapfrog steps of size ε: ``num_integration_steps``
    \(= L\) of them, or with ``random_length`` (default) a number drawn uniformly from
    \(\{1, \dots, 2L - 1\}\) (mean \(L\)) afresh for each transition, shared by all particles.

    Why random: preconditioned by a good Σ, the posterior looks like a standard Gaussian, on which
    a trajectory of fixed length \(L\varepsilon\) rotates every coordinate by the same angle; as the
    step size is tuned towards 0.8 acceptance, \(L\varepsilon\) drifts towards \(\pi\), where a
    transition reflects \(z \mapsto 2\mu - z\) whatever the momentum: duplicated particles stay
    duplicates, the population loses spread step after step, and the evidence comes out several
    nats too high (measured: +4 nats on a 30-dimensional conjugate regression). Randomising the
    integration time breaks the resonance (Neal 2011, sect. 5.4.2.2; Bou-Rabee & Sanz-Serna 2017)."""

    num_integration_steps: int = eqx.field(static=True, default=5)
    acceptance: float = 0.8
    random_length: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        checks.positive_int("num_integration_steps", self.num_integration_steps)

    def prepare(self, step_size, cov):
        return step_size, cov, jnp.asarray(self.num_integration_steps, jnp.int32)

    def randomize(self, key, prepared):
        if not self.random_length:
            return prepared
        step_size, cov, _ = prepared
        return step_size, cov, jax.random.randint(key, (), 1, 2 * self.num_integration_steps)

    def build(self, logdensity_fn, prepared):
        step_size, cov, num_steps = prepared
        return blackjax.hmc(logdensity_fn, step_size, cov, num_steps)


class NUTS(_GradientKernel):
    """NUTS with inverse mass matrix Σ and step size ε."""

    max_num_doublings: int = eqx.field(static=True, default=6)
    acceptance: float = 0.8

    def __check_init__(self):
        checks.positive_int("max_num_doublings", self.max_num_doublings)

    def build(self, logdensity_fn, prepared):
        step_size, cov = prepared
        return blackjax.nuts(
            logdensity_fn, step_size, cov, max_num_doublings=self.max_num_doublings
        )


_KERNELS = {"rwm": RandomWalk, "random_walk": RandomWalk, "mala": MALA, "hmc": HMC, "nuts": NUTS}


def get_kernel(kernel: str | AbstractMCMCKernel) -> AbstractMCMCKernel:
    """A kernel strategy from its name (``"rwm"``, ``"mala"``, ``"hmc"``, ``"nuts"``) or instance."""
    return checks.strategy("MCMC kernel", kernel, AbstractMCMCKernel, _KERNELS)
