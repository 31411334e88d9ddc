r"""Adaptive tempered SMC (an SMC sampler) as a Feynman-Kac model.

Target path \(\pi_\lambda(z) \propto \pi_0(z)\, L(z)^\lambda\) from the prior (\(\lambda = 0\)) to the
posterior (\(\lambda = 1\)). With \(\lambda_{-1} = 0\) and particles \(z \sim \pi_0\) at step 0, step
\(t\) of the engine is

- **move:** \(z_t \sim K_{\lambda_{t-1}}(z_{t-1}, \cdot)\), MCMC steps leaving \(\pi_{\lambda_{t-1}}\)
  invariant (none at \(t = 0\)): at least ``num_mcmc_steps``, then more (up to ``max_mcmc_steps``)
  until the particles have moved away from where the move started (below);
- **adapt:** \(\lambda_t\) chosen from the weighted population so that the conditional ESS
  \(\mathrm{CESS}(\lambda_t) = N (\sum_i W_i g_i)^2 / \sum_i W_i g_i^2\),
  \(g_i = L(z_t^i)^{\lambda_t - \lambda_{t-1}}\), equals \(\rho N\) (Zhou, Johansen & Aston 2016), or
  \(\lambda_t = 1\) when even \(\mathrm{CESS}(1) \ge \rho N\); also the kernel's covariance \(\Sigma\)
  (weighted particle covariance under \(\pi_{\lambda_t}\)) and step size \(\varepsilon\) (nudged
  towards the kernel's target acceptance);
- **potential:** \(\log G_t(z_t) = (\lambda_t - \lambda_{t-1}) \log L(z_t)\);

until \(\lambda\) reaches 1 (``done``). Then the product of the \(G_t\) over the path telescopes and
\(\hat Z = \prod_t \frac1N \sum_i G_t(z_t^i)\) estimates \(Z = \int \pi_0 L\) (Del Moral, Doucet &
Jasra 2006). With ``ess_threshold=1`` the engine resamples every step, so \(W_i = 1/N\) and CESS is
the ESS of the incremental weights (``criterion="ess"`` uses \(\mathrm{ESS}(W g)\) for any \(W\)).
Choosing \(\lambda_t\) and \(\Sigma\) from the particles makes \(\hat Z\) slightly biased, with a bias
of order \(1/N\) (Beskos, Jasra, Kantas & Thiery 2016).

How much MCMC is enough. Resampling duplicates particles; the move must spread them out again, or
the population collapses and the posterior comes out too narrow and off-centre *with nothing
looking wrong* (a random walk at a healthy 0.3 acceptance in 31 dimensions does this). The move
therefore measures the mean squared jump of the particles from their starting points in the
metric of the population covariance \(\Sigma\),

\[
J = \frac{1}{ND} \sum_i (z^i - z_0^i)^\top \Sigma^{-1} (z^i - z_0^i)
\]

(\(J = 2\) for independent draws; \(J = 2(1 - \rho)\) for an AR(1) chain of lag-correlation
\(\rho\)), and the same for the log-density \(\ell = \log\pi_{\lambda}(z)\) carried by the MCMC
states (no extra evaluation),
\(J_\ell = \frac1N \sum_i (\ell^i - \ell_0^i)^2 / \widehat{\mathrm{Var}}(\ell_0)\),
and keeps moving until \(\max(J, J_\ell) \ge\) ``target_jump`` (default 1: correlation with the
start at most 1/2), as ``particles``' adaptive MCMC sequences do with the jump distance (Chopin &
Papaspiliopoulos 2020, ch. 17; Dau & Chopin 2022). \(J_\ell\) is there for multimodal posteriors:
\(\Sigma\) then spans the modes, moves within a mode look short in its metric (\(J\) stalls
near 0.5 on the zoo's two-mode mixture) while the log-densities, which set the next weights,
have decorrelated. A stage that reaches ``max_mcmc_steps`` below the target is counted
and reported (a ``RuntimeWarning`` after :func:`tempered_smc`). The default move is HMC preconditioned
by Σ, which mixes in dimensions where a random walk does not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks
from ppl import progress as progress_bar
from ppl.feynman_kac import AbstractFeynmanKac
from ppl.numpyro_model import NumpyroModel, from_numpyro
from samplers.mcmc_kernels import AbstractMCMCKernel, get_kernel
from samplers.resampling import AbstractResampling, log_ess, normalise
from samplers.smc import SMCResult, smc

__all__ = ["TemperedParticles", "AdaptiveTempering", "TemperedSMCResult", "tempered_smc",
           "adaptive_mcmc_move", "log_likelihood_from_move", "population_scale", "warn_unmixed",
           "plot_smc_path"]


class TemperedParticles(NamedTuple):
    r"""Particles of the tempering model: unconstrained positions, their log-likelihood (cached),
    and of their last move (NaN / 0 before any move): each particle's mean acceptance probability,
    its squared jump \((z - z_{\mathrm{start}})^\top \Sigma^{-1} (z - z_{\mathrm{start}}) / D\) and the
    number of MCMC transitions."""

    z: Float[Array, "N D"]
    log_likelihood: Float[Array, " N"]
    acceptance: Float[Array, " N"]
    jump: Float[Array, " N"]
    mcmc_steps: Int[Array, " N"]


def _densities(target, z):
    if hasattr(target, "log_densities"):
        return target.log_densities(z)
    return target.log_prior(z), target.log_likelihood(z)


def adaptive_mcmc_move(
    key: PRNGKeyArray,
    kernel: AbstractMCMCKernel,
    logdensity: Callable,
    z0: Float[Array, "N D"],
    step_size: Float[Array, ""],
    cov: Float[Array, "D D"],
    num_mcmc_steps: int,
    max_mcmc_steps: int,
    target_jump: float,
) -> tuple[Float[Array, "N D"], Float[Array, " N"], Float[Array, " N"], Int[Array, " N"],
           Float[Array, " N"]]:
    r"""MCMC transitions of every particle, invariant for ``logdensity``: ``num_mcmc_steps``, then
    more while the mean squared jump \(\max(J, J_\ell)\) (module docstring) is below
    ``target_jump`` and fewer than ``max_mcmc_steps`` were made. Returns the positions, each
    particle's mean acceptance, its squared jump (\((z - z_0)^\top \Sigma^{-1} (z - z_0) / D\), or
    \((\ell - \ell_0)^2 / \widehat{\mathrm{Var}}(\ell_0)\) when \(J_\ell > J\)), the number of
    transitions and the
    log-density at the final positions (from the MCMC states: no re-evaluation)."""
    prepared = kernel.prepare(step_size, cov)
    n, d = z0.shape
    chol = jnp.linalg.cholesky(cov)

    algo = kernel.build(logdensity, prepared)
    states0 = jax.vmap(algo.init)(z0)
    ld0 = states0.logdensity
    ok0 = jnp.isfinite(ld0)
    count0 = jnp.maximum(jnp.sum(ok0), 1)
    ld0_mean = jnp.sum(jnp.where(ok0, ld0, 0.0)) / count0
    ld0_var = jnp.sum(jnp.where(ok0, (ld0 - ld0_mean) ** 2, 0.0)) / count0

    def jumps(states):
        r"""Per particle: the squared jump of the position (\(J\)) or of the log-density
        (\(J_\ell\)), whichever has the larger population mean."""
        w = jax.scipy.linalg.solve_triangular(chol, (states.position - z0).T, lower=True)
        jz = jnp.sum(w * w, axis=0) / d
        dl = states.logdensity - ld0
        jl = jnp.where(jnp.isfinite(dl) & (ld0_var > 0), dl * dl / jnp.where(ld0_var > 0, ld0_var, 1.0), 0.0)
        return jnp.where(jnp.mean(jl) > jnp.mean(jz), jl, jz)

    def cond(c):
        _, states, _, count = c
        short = ~(jnp.mean(jumps(states)) >= target_jump)
        return (count < num_mcmc_steps) | ((count < max_mcmc_steps) & short)

    def body(c):
        k, states, acc_sum, count = c
        k, sub = jax.random.split(k)
        states, info = kernel.step_population(sub, logdensity, prepared, states)
        return k, states, acc_sum + info.acceptance_rate, count + 1

    init = (key, states0, jnp.zeros((n,), z0.dtype), jnp.asarray(0, jnp.int32))
    _, states, acc_sum, count = jax.lax.while_loop(cond, body, init)
    z = states.position
    return (z, acc_sum / count.astype(acc_sum.dtype), jumps(states), jnp.full((n,), count, jnp.int32),
            states.logdensity)


def log_likelihood_from_move(
    target: Any, lam: Float[Array, ""], z: Float[Array, "N D"], logdensity: Float[Array, " N"],
    tol: float = 1e-3,
) -> Float[Array, " N"]:
    r"""\(\log L(z)\) of moved particles, read from the MCMC states instead of re-evaluated.

    The move's states carry \(\ell = \log \pi_0(z) + \lambda \log L(z)\) at their final positions, so
    \(\log L = (\ell - \log \pi_0(z)) / \lambda\) costs a prior evaluation only. The rounding error
    of that difference, about \(2\epsilon (|\ell| + |\log \pi_0|) / \lambda\), enters the next
    weights multiplied by \(\lambda_{t} - \lambda_{t-1} \le 1 - \lambda\); the cached values are
    used when that bound is at most ``tol`` nats for every particle (always from moderate
    \(\lambda\) on in float64; in float32 once \(\lambda\) is not small), otherwise
    \(\log L\) is evaluated (also at \(\lambda = 0\) and when any \(\ell\) is not finite)."""
    lp = jax.vmap(lambda x: _densities(target, x)[0])(z)
    eps = jnp.finfo(logdensity.dtype).eps
    safe_lam = jnp.where(lam > 0, lam, 1.0)
    bound = (1.0 - lam) * 2 * eps * jnp.max(jnp.abs(logdensity) + jnp.abs(lp)) / safe_lam
    use = (lam > 0) & jnp.all(jnp.isfinite(logdensity) & jnp.isfinite(lp)) & (bound <= tol)
    return jax.lax.cond(
        use,
        lambda: (logdensity - lp) / safe_lam,
        lambda: jax.vmap(lambda x: _densities(target, x)[1])(z).astype(logdensity.dtype),
    )


def population_scale(
    z: Float[Array, "N D"], log_weights: Float[Array, " N"], fallback: Float[Array, "D D"],
    step_size: Float[Array, ""], acceptance: Float[Array, ""], target_acceptance: float,
) -> tuple[Float[Array, "D D"], Float[Array, ""]]:
    r"""The next move's covariance \(\Sigma\) (weighted particle covariance, jittered; ``fallback``
    when degenerate) and step size (nudged by \(\exp(\text{acceptance} - \text{target})\))."""
    w = jnp.exp(normalise(log_weights))
    mean = w @ z
    zc = z - mean
    cov = (w[:, None] * zc).T @ zc
    cov = 0.5 * (cov + cov.T)
    d = z.shape[1]
    jitter = 1e-6 * (jnp.trace(cov) / d) + 1e-12
    cov = cov + jitter * jnp.eye(d, dtype=cov.dtype)
    cov = jnp.where(jnp.all(jnp.isfinite(cov)) & (jnp.trace(cov) > 0), cov, fallback)
    step = jnp.where(jnp.isfinite(acceptance),
                     step_size * jnp.exp(acceptance - target_acceptance), step_size)
    return cov, step.astype(step_size.dtype)


class AdaptiveTempering(AbstractFeynmanKac):
    r"""Adaptive tempering from \(\pi_0\) to \(\pi_0 L\) (see the module docstring).

    Args:
        target: a :class:`~ppl.numpyro_model.NumpyroModel`, or any module with ``dim``,
            ``log_prior(z)``, ``log_likelihood(z)`` and ``sample_prior(key, n)`` on \(\mathbb{R}^D\).
        kernel: the MCMC move, ``"hmc"`` (default), ``"nuts"``, ``"mala"``, ``"rwm"`` or an
            :class:`~samplers.mcmc_kernels.AbstractMCMCKernel`.
        num_mcmc_steps: MCMC transitions per SMC step, at least.
        max_mcmc_steps: at most (default ``max(50, num_mcmc_steps)``); between the two, the move
            continues while the mean squared jump \(J <\) ``target_jump``. ``max_mcmc_steps =
            num_mcmc_steps`` gives a fixed number of transitions.
        target_jump: \(J\) to reach in each move (see the module docstring; 2 = independent).
        target_ess: \(\rho \in (0, 1)\), the (conditional) ESS fraction kept at each step.
        criterion: ``"cess"`` (conditional ESS, default) or ``"ess"`` (ESS of \(W g\)).
        bisection_steps: bisection iterations for \(\lambda_t\).
        progress: report \(\lambda_t\) to the open progress bar (:mod:`ppl.progress`) at every step.

    Array leaves (changed by ``adapt``): ``lam`` (\(\lambda\) of the current step), ``lam_prev``, the next
    move's ``step_size`` and ``cov``, and of this step's move ``acceptance`` (mean acceptance),
    ``jump`` (\(J\)) and ``mcmc_steps`` (transitions). ``info()`` records ``{"lam", "acceptance",
    "step_size", "jump", "mcmc_steps"}`` per step.
    Run with ``smc(key, model, N, ess_threshold=1.0, max_steps=cap)``.
    """

    target: Any
    kernel: AbstractMCMCKernel
    lam: Float[Array, ""]
    lam_prev: Float[Array, ""]
    step_size: Float[Array, ""]
    cov: Float[Array, "D D"]
    acceptance: Float[Array, ""]
    jump: Float[Array, ""]
    mcmc_steps: Int[Array, ""]
    num_mcmc_steps: int = eqx.field(static=True)
    max_mcmc_steps: int = eqx.field(static=True)
    target_jump: float = eqx.field(static=True)
    progress: bool = eqx.field(static=True)
    target_ess: float = eqx.field(static=True)
    criterion: str = eqx.field(static=True)
    bisection_steps: int = eqx.field(static=True)

    is_adaptive: ClassVar[bool] = True
    num_steps: ClassVar[None] = None

    def __init__(
        self,
        target: Any,
        *,
        kernel: str | AbstractMCMCKernel = "hmc",
        num_mcmc_steps: int = 5,
        max_mcmc_steps: int | None = None,
        target_jump: float = 1.0,
        target_ess: float = 0.5,
        criterion: str = "cess",
        bisection_steps: int = 40,
        progress: bool = False,
    ):
        for attr in ("dim", "log_prior", "log_likelihood", "sample_prior"):
            if not hasattr(target, attr):
                raise TypeError(
                    f"target must provide `{attr}` (e.g. a ppl.numpyro_model.NumpyroModel from "
                    f"from_numpyro), got {type(target).__name__}"
                )
        checks.positive_int("num_mcmc_steps", num_mcmc_steps)
        if max_mcmc_steps is None:
            max_mcmc_steps = max(50, num_mcmc_steps)
        checks.positive_int("max_mcmc_steps", max_mcmc_steps, minimum=num_mcmc_steps)
        if not isinstance(target_jump, (int, float)) or not 0.0 < target_jump <= 2.0:
            raise ValueError(
                f"target_jump must be a number in (0, 2] (2: independent draws), got {target_jump!r}"
            )
        checks.probability("target_ess", target_ess, strict=True)
        if criterion not in ("cess", "ess"):
            raise ValueError(f"criterion must be 'cess' or 'ess', got {criterion!r}")
        checks.positive_int("bisection_steps", bisection_steps)
        dim = int(target.dim)
        self.target = target
        self.kernel = get_kernel(kernel)
        dtype = jnp.zeros(()).dtype
        self.lam = jnp.zeros((), dtype)
        self.lam_prev = jnp.zeros((), dtype)
        self.step_size = jnp.asarray(self.kernel.initial_step_size(dim), dtype)
        self.cov = jnp.eye(dim, dtype=dtype)
        self.acceptance = jnp.full((), jnp.nan, dtype)
        self.jump = jnp.full((), jnp.nan, dtype)
        self.mcmc_steps = jnp.zeros((), jnp.int32)
        self.num_mcmc_steps = num_mcmc_steps
        self.max_mcmc_steps = int(max_mcmc_steps)
        self.target_jump = float(target_jump)
        self.progress = bool(progress)
        self.target_ess = float(target_ess)
        self.criterion = criterion
        self.bisection_steps = bisection_steps

    # ---- Feynman-Kac protocol -----------------------------------------------------------------
    def init(self, key: PRNGKeyArray, num_particles: int) -> TemperedParticles:
        z = self.target.sample_prior(key, num_particles)
        ll = jax.vmap(lambda x: _densities(self.target, x)[1])(z)
        nan = jnp.full((num_particles,), jnp.nan, ll.dtype)
        return TemperedParticles(z, ll, nan, nan, jnp.zeros((num_particles,), jnp.int32))

    def tempered_log_density(self, lam: Float[Array, ""]) -> Callable:
        r"""\(z \mapsto \log \pi_0(z) + \lambda \log L(z)\) (the \(\lambda = 0\) case ignores \(L\), even
        where it is \(-\infty\))."""

        def logdensity(z):
            lp, ll = _densities(self.target, z)
            return lp + jnp.where(lam > 0, lam * ll, 0.0)

        return logdensity

    def move(self, key: PRNGKeyArray, t: Int[Array, ""], particles: TemperedParticles):
        r"""Transitions of every particle (one blackjax state per particle, carried through a
        ``while_loop``): ``num_mcmc_steps`` of them, then more while the mean squared jump
        \(J <\) ``target_jump`` and fewer than ``max_mcmc_steps`` were made."""
        logdensity = self.tempered_log_density(self.lam)  # λ_{t-1}: adapt has not run yet
        z, acc, jumps, steps, ld = adaptive_mcmc_move(
            key, self.kernel, logdensity, particles.z, self.step_size, self.cov,
            self.num_mcmc_steps, self.max_mcmc_steps, self.target_jump)
        ll = log_likelihood_from_move(self.target, self.lam, z, ld)
        return TemperedParticles(z, ll, acc, jumps, steps)

    def log_potential(self, t, previous, particles: TemperedParticles) -> Float[Array, " N"]:
        delta = self.lam - self.lam_prev
        return jnp.where(delta > 0, delta * particles.log_likelihood, 0.0)

    def done(self, particles: TemperedParticles) -> Bool[Array, " N"]:
        return jnp.broadcast_to(self.lam >= 1.0, particles.log_likelihood.shape)

    def info(self) -> PyTree:
        return {"lam": self.lam, "acceptance": self.acceptance, "step_size": self.step_size,
                "jump": self.jump, "mcmc_steps": self.mcmc_steps}

    # ---- adaptation ---------------------------------------------------------------------------
    def _log_criterion(self, delta, log_w, ll):
        r"""\(\log\) of \(\mathrm{CESS}/N\) (or \(\mathrm{ESS}/N\)) of the increments \(L^\delta\) under
        normalised weights ``log_w``."""
        lg = jnp.where(delta > 0, delta * ll, 0.0)
        if self.criterion == "cess":
            return 2 * jax.nn.logsumexp(log_w + lg) - jax.nn.logsumexp(log_w + 2 * lg)
        return log_ess(log_w + lg) - math.log(log_w.shape[0])

    def next_lambda(
        self, log_weights: Float[Array, " N"], log_likelihood: Float[Array, " N"]
    ) -> Float[Array, ""]:
        r"""\(\lambda_t\): the largest \(\lambda \le 1\) with
        \(\mathrm{criterion}(\lambda - \lambda_{t-1}) \ge \rho\), by bisection (the criterion decreases in the
        increment, since tilted means of \(\log L\) increase with the tilt)."""
        ll = jnp.where(jnp.isnan(log_likelihood), -jnp.inf, log_likelihood)
        log_w = normalise(log_weights)
        lam_prev = self.lam
        remaining = 1.0 - lam_prev
        log_rho = math.log(self.target_ess)

        def ok(delta):
            c = self._log_criterion(delta, log_w, ll)
            return jnp.isfinite(c) & (c >= log_rho)

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            good = ok(mid)
            return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

        lo, hi = jax.lax.fori_loop(
            0, self.bisection_steps, body, (jnp.zeros_like(remaining), remaining)
        )
        inner = jnp.minimum(lam_prev + 0.5 * (lo + hi), 1.0)
        return jnp.where(ok(remaining), jnp.ones_like(lam_prev), inner)

    def adapt(self, t, particles: TemperedParticles, log_weights) -> "AdaptiveTempering":
        lam = self.next_lambda(log_weights, particles.log_likelihood)
        if self.progress:
            progress_bar.tick(lam)
        ll = jnp.where(jnp.isnan(particles.log_likelihood), -jnp.inf, particles.log_likelihood)
        delta = lam - self.lam
        acc = jnp.mean(particles.acceptance)
        cov, step = population_scale(particles.z, log_weights + jnp.where(delta > 0, delta * ll, 0.0),
                                     self.cov, self.step_size, acc, self.kernel.target_acceptance)
        return eqx.tree_at(
            lambda m: (m.lam, m.lam_prev, m.step_size, m.cov, m.acceptance, m.jump, m.mcmc_steps),
            self,
            (lam, self.lam, step, cov, acc,
             jnp.mean(particles.jump), jnp.max(particles.mcmc_steps)),
        )


class TemperedSMCResult(NamedTuple):
    r"""Output of :func:`tempered_smc` (per-step arrays have length ``max_steps``, NaN past
    ``num_steps``).

    Attributes:
        samples: constrained posterior draws (latent and deterministic sites), leading axis N,
            weighted by ``exp(log_weights)``.
        log_weights: normalised final log-weights.
        log_evidence: \(\log \hat Z\), estimate of \(\log p(y)\).
        lambdas: the tempering schedule \(\lambda_0 < \lambda_1 < \dots < \lambda_{T-1} = 1\).
        ess: ESS after weighting at each step.
        acceptance_rate: mean MCMC acceptance of each step's move (NaN at step 0).
        jump: mean squared jump \(J\) of each step's move (NaN at step 0; module docstring).
        mcmc_steps: MCMC transitions of each step's move (0 at step 0, −1 past ``num_steps``).
        num_unmixed_steps: moves that ended at ``max_mcmc_steps`` with \(J <\) ``target_jump``
            (failure flag: the particles may not represent the posterior).
        num_steps: \(T\), number of SMC steps run.
        reached_max_steps: \(\lambda\) did not reach 1 within ``max_steps`` (failure flag).
        extinct: every particle had zero weight at some step (failure flag).
        num_nan_potentials: NaN log-likelihoods seen (treated as \(-\infty\)).
        particles: final unconstrained particles \(z\), shape [N, D].
        smc: the engine's :class:`~samplers.smc.SMCResult`.
    """

    samples: dict
    log_weights: Float[Array, " N"]
    log_evidence: Float[Array, ""]
    lambdas: Float[Array, " T"]
    ess: Float[Array, " T"]
    acceptance_rate: Float[Array, " T"]
    jump: Float[Array, " T"]
    mcmc_steps: Int[Array, " T"]
    num_unmixed_steps: Int[Array, ""]
    num_steps: Int[Array, ""]
    reached_max_steps: Bool[Array, ""]
    extinct: Bool[Array, ""]
    num_nan_potentials: Int[Array, ""]
    particles: Float[Array, "N D"]
    smc: SMCResult

    def to_inference_data(self, key: PRNGKeyArray | None = None):
        """arviz ``InferenceData``: ``posterior`` holds N equally weighted draws (one chain; the
        weighted particles resampled systematically with ``key``, default ``jax.random.key(0)``),
        ``sample_stats`` their log-likelihood (``total_log_likelihood``), and the group ``smc_path`` the path
        per step (λ, ESS, acceptance, mean squared jump, MCMC transitions) with ``log_evidence``,
        ``num_steps`` and ``num_unmixed_steps`` as attributes. Not under ``jit``."""
        from samplers.mcmc_output import smc_inference_data

        t = int(self.num_steps)
        path = {"lambda": self.lambdas, "ess": self.ess, "acceptance_rate": self.acceptance_rate,
                "jump": self.jump, "mcmc_steps": self.mcmc_steps}
        return smc_inference_data(
            jax.random.key(0) if key is None else key, self.samples, self.log_weights,
            {k: np.asarray(v)[:t] for k, v in path.items()},
            {"log_evidence": float(self.log_evidence), "num_steps": t,
             "num_unmixed_steps": int(self.num_unmixed_steps),
             "reached_max_steps": bool(self.reached_max_steps)},
            sample_stats={"total_log_likelihood": self.smc.particles.log_likelihood})

    def plot(self, axes=None):
        r"""Two panels: the tempering path \(\lambda_t\) (log scale) and the ESS after each step,
        with the number of MCMC transitions per step on a twin axis. Returns the matplotlib
        figure (``axes``: two axes to draw into)."""
        return plot_smc_path(np.arange(int(self.num_steps)), np.asarray(self.lambdas),
                             np.asarray(self.ess), np.asarray(self.mcmc_steps),
                             int(self.log_weights.shape[0]), "λ", axes, log_y=True)


def tempered_smc(
    key: PRNGKeyArray,
    numpyro_model: Callable | NumpyroModel,
    *model_args: Any,
    num_particles: int = 256,
    target_ess: float = 0.5,
    kernel: str | AbstractMCMCKernel = "hmc",
    num_mcmc_steps: int = 5,
    max_mcmc_steps: int | None = None,
    target_jump: float = 1.0,
    max_steps: int = 100,
    resampling: str | AbstractResampling = "systematic",
    criterion: str = "cess",
    progress: bool = True,
    waste_free: int | None = None,
    **model_kwargs: Any,
) -> TemperedSMCResult:
    r"""Adaptive tempered SMC on a numpyro model: posterior samples and log evidence.

    ``numpyro_model(*model_args, **model_kwargs)`` is the model (or pass a prebuilt
    :class:`~ppl.numpyro_model.NumpyroModel` and no model arguments). Resamples every step
    (``ess_threshold=1``). Can be ``vmap``-ed over ``key`` for independent runs.

    The MCMC effort adapts (see the module docstring): each move makes ``num_mcmc_steps`` to
    ``max_mcmc_steps`` transitions of ``kernel`` (HMC by default), until the particles' mean squared
    jump reaches ``target_jump``. Called eagerly, it warns (``RuntimeWarning``) when a move ended
    below that target, when \(\lambda\) did not reach 1 within ``max_steps``, and (from the engine) about NaN
    log-likelihoods and extinction; the result carries the same facts as fields. ``progress``: a
    progress bar of \(\lambda\) from 0 to 1 (stderr; only for an eager call).
    ``waste_free=P``: the waste-free variant (:mod:`samplers.waste_free`, Dau & Chopin 2022), M = N/P
    chains of P states from M resampled starts (``num_particles`` a multiple of P); the adaptive
    number of moves and its warning then do not apply.
    """
    if isinstance(numpyro_model, NumpyroModel):
        if model_args or model_kwargs:
            raise ValueError("model arguments are already bound in a NumpyroModel; pass none")
        target = numpyro_model
    else:
        target = from_numpyro(numpyro_model, *model_args, **model_kwargs)
    checks.positive_int("num_particles", num_particles, minimum=2)
    checks.positive_int("max_steps", max_steps)
    enabled = bool(progress) and not progress_bar.is_traced(key, target)
    with progress_bar.bar(100, "tempered SMC (λ %)", enabled, unit="%", scale=100.0) as on:
        fk = AdaptiveTempering(
            target,
            kernel=kernel,
            num_mcmc_steps=num_mcmc_steps,
            max_mcmc_steps=max_mcmc_steps,
            target_jump=target_jump,
            target_ess=target_ess,
            criterion=criterion,
            progress=on,
        )
        if waste_free is not None:
            from samplers.waste_free import WasteFreeTempering

            fk = WasteFreeTempering(fk, waste_free)
        res = smc(key, fk, num_particles, resampling=resampling, ess_threshold=1.0, max_steps=max_steps)
    past = jnp.arange(max_steps) >= res.num_steps
    info = res.model_info
    moved = ~past & (jnp.arange(max_steps) > 0)
    if waste_free is None:  # a waste-free move has no target jump: its chains are all kept
        unmixed = moved & (info["mcmc_steps"] >= fk.max_mcmc_steps) & ~(info["jump"] >= fk.target_jump)
    else:
        unmixed = jnp.zeros_like(moved)
    out = TemperedSMCResult(
        samples=target.constrain(res.particles.z),
        log_weights=res.log_weights,
        log_evidence=res.log_evidence,
        lambdas=jnp.where(past, jnp.nan, info["lam"]),
        ess=jnp.where(past, jnp.nan, res.ess),
        acceptance_rate=jnp.where(past, jnp.nan, info["acceptance"]),
        jump=jnp.where(past, jnp.nan, info["jump"]),
        mcmc_steps=jnp.where(past, -1, info["mcmc_steps"]),
        num_unmixed_steps=jnp.sum(unmixed.astype(jnp.int32)),
        num_steps=res.num_steps,
        reached_max_steps=res.reached_max_steps,
        extinct=res.extinct,
        num_nan_potentials=res.num_nan_potentials,
        particles=res.particles.z,
        smc=res,
    )
    _warn(out, fk if waste_free is None else fk.base)
    return out


def plot_smc_path(steps, path, ess, mcmc_steps, num_particles: int, label: str, axes=None,
                  log_y: bool = False):
    """Shared by the SMC samplers' ``plot`` methods: ``path`` (λ, or observations seen) and the
    ESS per step, MCMC transitions on a twin axis; returns the figure."""
    t = len(steps)
    if axes is None:
        from matplotlib.figure import Figure  # no pyplot: no global state

        fig = Figure(figsize=(9, 3.2), constrained_layout=True)
        axes = fig.subplots(1, 2)
    ax_path, ax_ess = axes
    ax_path.plot(steps, path[:t], "o-")
    ax_path.set(xlabel="step", ylabel=label, title=f"path ({label})")
    if log_y:
        ax_path.set_yscale("log")
    ax_ess.plot(steps, ess[:t], "o-", label="ESS")
    ax_ess.axhline(num_particles, color="k", lw=0.7, ls=":")
    ax_ess.set(xlabel="step", ylabel="ESS", ylim=(0, 1.05 * num_particles), title="ESS after each step")
    twin = ax_ess.twinx()
    twin.bar(steps[1:], mcmc_steps[1:t], alpha=0.25, color="C1", label="MCMC transitions")
    twin.set_ylabel("MCMC transitions")
    return ax_path.figure


def warn_unmixed(sampler: str, bad: int, moves: int, jumps, max_mcmc_steps: int, target_jump: float,
                 stacklevel: int = 3) -> None:
    """The ``RuntimeWarning`` of an SMC sampler whose ``bad`` of ``moves`` MCMC moves stopped at
    ``max_mcmc_steps`` below ``target_jump`` (``jumps``: the per-move mean squared jumps)."""
    if not bad:
        return
    worst = float(np.nanmin(np.asarray(jumps)))
    warnings.warn(
        f"{sampler}: {bad} of {moves} MCMC moves stopped at max_mcmc_steps={max_mcmc_steps} with "
        f"the particles still close to where they started (mean squared jump down to {worst:.3g} < "
        f"target_jump={target_jump}): the posterior may be too narrow or biased; raise "
        "max_mcmc_steps or use kernel='hmc' / 'nuts' (result.jump, result.num_unmixed_steps)",
        RuntimeWarning, stacklevel=stacklevel,
    )


def _warn(out: TemperedSMCResult, fk: AdaptiveTempering) -> None:
    """Warnings after an eager call (silent under a transformation: the fields say it all)."""
    if isinstance(out.num_steps, jax.core.Tracer) or jnp.ndim(out.num_steps) != 0:
        return
    t = int(out.num_steps)
    warn_unmixed("tempered SMC", int(out.num_unmixed_steps), t - 1, np.asarray(out.jump)[1:t],
                 fk.max_mcmc_steps, fk.target_jump, stacklevel=4)
    if bool(out.reached_max_steps):
        warnings.warn(
            f"tempered SMC: λ reached only {float(np.nanmax(np.asarray(out.lambdas))):.3g} < 1 "
            f"within max_steps={len(out.lambdas)}: the particles target a tempered posterior, not "
            "the posterior, and log_evidence is partial; raise max_steps (or lower target_ess)",
            RuntimeWarning, stacklevel=3,
        )
