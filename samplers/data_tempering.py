r"""Data-tempered (sequential) SMC for numpyro models: the posterior given the first batches.

With observations split into consecutive batches \(B_0, \dots, B_{K-1}\) of the data axis (sizes
given by ``batch_sizes``), step \(t\) targets
\(\pi_t(\theta) \propto p(\theta) \prod_{j \in B_0 \cup \dots \cup B_t} p(y_j \mid \theta)\):

- **init:** \(z \sim \pi_0\) (the prior, in the unconstrained space);
- **move** (\(t \ge 1\)): MCMC transitions invariant for \(\pi_{t-1}\), as many as the particles need
  (the mean-squared-jump rule of :mod:`samplers.tempering`);
- **potential:** \(\log G_t(z) = \sum_{j \in B_t} \ell_j(z)\), the new batch's log-likelihood
  (:meth:`~ppl.numpyro_model.NumpyroModel.pointwise_log_likelihood`).

So \(\hat Z_t\) estimates \(p(y_{B_0 \cup \dots \cup B_t})\) and each increment
\(\log \hat Z_t - \log \hat Z_{t-1}\) the one-step-ahead log predictive density
\(\log p(y_{B_t} \mid y_{B_{<t}})\) of the new batch: the prequential score of the model, for model
comparison on streaming data (Chopin 2002; Dawid 1984). The horizon is fixed (\(K\) steps), so
the engine runs a ``lax.scan``; the move's covariance and step size adapt from the weighted
population at every step.

Reference: Chopin (2002), "A sequential particle filter method for static models", Biometrika 89(3).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ppl import checks
from ppl.feynman_kac import AbstractFeynmanKac
from ppl.numpyro_model import NumpyroModel
from samplers.mcmc_kernels import AbstractMCMCKernel, get_kernel
from samplers.tempering import adaptive_mcmc_move, population_scale, warn_unmixed

__all__ = ["DataParticles", "DataTempering", "DataTemperedResult", "data_tempered_smc"]


class DataParticles(NamedTuple):
    """Unconstrained positions, the log-likelihood of the step's new batch at them (computed once,
    read by the potential and the adaptation) and, of the last move, each particle's mean
    acceptance, squared jump and number of MCMC transitions (NaN / 0 before any move)."""

    z: Float[Array, "N D"]
    batch_log_likelihood: Float[Array, " N"]
    acceptance: Float[Array, " N"]
    jump: Float[Array, " N"]
    mcmc_steps: Int[Array, " N"]


class DataTempering(AbstractFeynmanKac):
    r"""Sequential SMC over observation batches (module docstring).

    Args:
        target: a :class:`~ppl.numpyro_model.NumpyroModel` whose likelihood sites share a leading
            data axis of length \(n\).
        batch_sizes: sizes of the consecutive batches (positive, summing to \(n\)); ``None``: one
            observation per step.
        kernel: ``"hmc"`` (default), ``"nuts"``, ``"rwm"`` or an
            :class:`~samplers.mcmc_kernels.AbstractMCMCKernel`.
        num_mcmc_steps, max_mcmc_steps, target_jump: the adaptive move of
            :func:`samplers.tempering.adaptive_mcmc_move`.

    ``info()`` records ``{"seen", "acceptance", "step_size", "jump", "mcmc_steps"}`` per step
    (``seen``: observations included after the step).
    """

    target: NumpyroModel
    kernel: AbstractMCMCKernel
    step: Int[Array, ""]
    step_size: Float[Array, ""]
    cov: Float[Array, "D D"]
    acceptance: Float[Array, ""]
    jump: Float[Array, ""]
    mcmc_steps: Int[Array, ""]
    ends: tuple[int, ...] = eqx.field(static=True)
    num_mcmc_steps: int = eqx.field(static=True)
    max_mcmc_steps: int = eqx.field(static=True)
    target_jump: float = eqx.field(static=True)

    is_adaptive: ClassVar[bool] = True

    def __init__(self, target: NumpyroModel, batch_sizes=None, *, kernel: Any = "hmc",
                 num_mcmc_steps: int = 5, max_mcmc_steps: int | None = None, target_jump: float = 1.0):
        if not isinstance(target, NumpyroModel):
            raise TypeError(f"target must be a NumpyroModel (from_numpyro), got {type(target).__name__}")
        n = int(jax.eval_shape(target.pointwise_log_likelihood, jnp.zeros(target.dim)).shape[0])
        sizes = [1] * n if batch_sizes is None else [int(b) for b in batch_sizes]
        if not sizes or any(b < 1 for b in sizes) or sum(sizes) != n:
            raise ValueError(f"batch_sizes must be positive and sum to the {n} observations, got {sizes}")
        checks.positive_int("num_mcmc_steps", num_mcmc_steps)
        max_mcmc_steps = max(50, num_mcmc_steps) if max_mcmc_steps is None else max_mcmc_steps
        checks.positive_int("max_mcmc_steps", max_mcmc_steps, minimum=num_mcmc_steps)
        if not 0.0 < float(target_jump) <= 2.0:
            raise ValueError(f"target_jump must be in (0, 2], got {target_jump!r}")
        dtype = jnp.zeros(()).dtype
        self.target = target
        self.kernel = get_kernel(kernel)
        self.step = jnp.zeros((), jnp.int32)
        self.step_size = jnp.asarray(self.kernel.initial_step_size(target.dim), dtype)
        self.cov = jnp.eye(target.dim, dtype=dtype)
        self.acceptance = jnp.full((), jnp.nan, dtype)
        self.jump = jnp.full((), jnp.nan, dtype)
        self.mcmc_steps = jnp.zeros((), jnp.int32)
        self.ends = tuple(int(e) for e in np.cumsum(sizes))
        self.num_mcmc_steps = int(num_mcmc_steps)
        self.max_mcmc_steps = int(max_mcmc_steps)
        self.target_jump = float(target_jump)

    @property
    def num_steps(self) -> int:
        """K, the number of batches."""
        return len(self.ends)

    def _seen(self, t) -> Int[Array, ""]:
        """Observations included after step t."""
        return jnp.asarray(self.ends, jnp.int32)[t]

    def _batch_log_lik(self, t, z: Float[Array, "N D"]) -> Float[Array, " N"]:
        r"""\(\sum_{j \in B_t} \ell_j(z)\) for every particle."""
        lo = jnp.where(t > 0, self._seen(jnp.maximum(t - 1, 0)), 0)
        hi = self._seen(t)

        def one(x):
            ell = self.target.pointwise_log_likelihood(x)
            j = jnp.arange(ell.shape[0])
            return jnp.sum(jnp.where((j >= lo) & (j < hi), ell, 0.0))

        return jax.vmap(one)(z)

    def _log_lik_first(self, z, count) -> Float[Array, ""]:
        ell = self.target.pointwise_log_likelihood(z)
        return jnp.sum(jnp.where(jnp.arange(ell.shape[0]) < count, ell, 0.0))

    # ---- Feynman-Kac protocol -----------------------------------------------------------------
    def init(self, key: PRNGKeyArray, num_particles: int) -> DataParticles:
        z = self.target.sample_prior(key, num_particles)
        nan = jnp.full((num_particles,), jnp.nan, z.dtype)
        return DataParticles(z, self._batch_log_lik(0, z), nan, nan,
                             jnp.zeros((num_particles,), jnp.int32))

    def move(self, key: PRNGKeyArray, t: Int[Array, ""], particles: DataParticles) -> DataParticles:
        seen = self._seen(t - 1)  # π_{t-1}: the batches up to t-1

        def logdensity(z):
            return self.target.log_prior(z) + self._log_lik_first(z, seen)

        z, acc, jumps, steps, _ = adaptive_mcmc_move(
            key, self.kernel, logdensity, particles.z, self.step_size, self.cov,
            self.num_mcmc_steps, self.max_mcmc_steps, self.target_jump)
        return DataParticles(z, self._batch_log_lik(t, z), acc, jumps, steps)

    def log_potential(self, t, previous, particles: DataParticles) -> Float[Array, " N"]:
        return particles.batch_log_likelihood

    def info(self) -> PyTree:
        return {"seen": self._seen(self.step), "acceptance": self.acceptance,
                "step_size": self.step_size, "jump": self.jump, "mcmc_steps": self.mcmc_steps}

    def adapt(self, t, particles: DataParticles, log_weights) -> "DataTempering":
        """Record step t and set the next move's \\(\\Sigma\\) and step size from the population
        weighted by the new batch (the weights of \\(\\pi_t\\))."""
        log_g = particles.batch_log_likelihood
        acc = jnp.mean(particles.acceptance)
        cov, step = population_scale(particles.z, log_weights + jnp.where(jnp.isnan(log_g), -jnp.inf, log_g),
                                     self.cov, self.step_size, acc, self.kernel.target_acceptance)
        return eqx.tree_at(
            lambda m: (m.step, m.step_size, m.cov, m.acceptance, m.jump, m.mcmc_steps), self,
            (jnp.asarray(t, jnp.int32), step, cov, acc, jnp.mean(particles.jump),
             jnp.max(particles.mcmc_steps)))



class DataTemperedResult(NamedTuple):
    r"""Output of :func:`data_tempered_smc` (per-step arrays of length \(K\), one per batch).

    Attributes:
        samples: constrained posterior draws given all the data, weighted by ``exp(log_weights)``.
        log_weights: normalised final log-weights.
        log_evidence: \(\log \hat Z\), estimate of \(\log p(y)\).
        log_predictive: \(\log \hat p(y_{B_t} \mid y_{B_{<t}})\) per batch (they sum to ``log_evidence``).
        seen: observations included after each step.
        ess, acceptance_rate, jump, mcmc_steps: per step (NaN / 0 at step 0, which does not move).
        num_unmixed_steps: moves that stopped at ``max_mcmc_steps`` below ``target_jump``.
        particles: final unconstrained particles.
        smc: the engine's :class:`~samplers.smc.SMCResult`.
    """

    samples: dict
    log_weights: Float[Array, " N"]
    log_evidence: Float[Array, ""]
    log_predictive: Float[Array, " K"]
    seen: Int[Array, " K"]
    ess: Float[Array, " K"]
    acceptance_rate: Float[Array, " K"]
    jump: Float[Array, " K"]
    mcmc_steps: Int[Array, " K"]
    num_unmixed_steps: Int[Array, ""]
    particles: Float[Array, "N D"]
    smc: Any

    def to_inference_data(self, key: PRNGKeyArray | None = None):
        """arviz ``InferenceData`` as :meth:`samplers.tempering.TemperedSMCResult.to_inference_data`,
        with the group ``smc_path`` holding, per step, the observations seen, the log predictive
        density of the batch, ESS, acceptance, jump and MCMC transitions."""
        from samplers.mcmc_output import smc_inference_data

        path = {"seen": self.seen, "log_predictive": self.log_predictive, "ess": self.ess,
                "acceptance_rate": self.acceptance_rate, "jump": self.jump, "mcmc_steps": self.mcmc_steps}
        return smc_inference_data(
            jax.random.key(0) if key is None else key, self.samples, self.log_weights, path,
            {"log_evidence": float(self.log_evidence), "num_unmixed_steps": int(self.num_unmixed_steps)})

    def plot(self, axes=None):
        """Observations seen and the ESS per step (MCMC transitions on a twin axis)."""
        from samplers.tempering import plot_smc_path

        k = len(np.asarray(self.seen))
        return plot_smc_path(np.arange(k), np.asarray(self.seen), np.asarray(self.ess),
                             np.asarray(self.mcmc_steps), int(self.log_weights.shape[0]),
                             "observations seen", axes)


def data_tempered_smc(
    key: PRNGKeyArray,
    numpyro_model: Any,
    *model_args: Any,
    batch_sizes=None,
    num_particles: int = 256,
    kernel: Any = "hmc",
    num_mcmc_steps: int = 5,
    max_mcmc_steps: int | None = None,
    target_jump: float = 1.0,
    ess_threshold: float = 0.5,
    resampling: Any = "systematic",
    **model_kwargs: Any,
) -> DataTemperedResult:
    r"""Sequential SMC on a numpyro model, one batch of observations per step (module docstring).

    ``numpyro_model(*model_args, **model_kwargs)`` (or a prebuilt
    :class:`~ppl.numpyro_model.NumpyroModel`). Resamples when the ESS falls below
    ``ess_threshold`` \(\cdot N\). Called eagerly it warns (``RuntimeWarning``) when a move stopped at
    ``max_mcmc_steps`` below ``target_jump``, besides the engine's warnings.
    """
    from ppl.numpyro_model import from_numpyro
    from samplers.smc import smc

    if isinstance(numpyro_model, NumpyroModel):
        if model_args or model_kwargs:
            raise ValueError("model arguments are already bound in a NumpyroModel; pass none")
        target = numpyro_model
    else:
        target = from_numpyro(numpyro_model, *model_args, **model_kwargs)
    checks.positive_int("num_particles", num_particles, minimum=2)
    fk = DataTempering(target, batch_sizes, kernel=kernel, num_mcmc_steps=num_mcmc_steps,
                       max_mcmc_steps=max_mcmc_steps, target_jump=target_jump)
    res = smc(key, fk, num_particles, resampling=resampling, ess_threshold=ess_threshold)
    info = res.model_info
    moved = jnp.arange(fk.num_steps) > 0
    unmixed = moved & (info["mcmc_steps"] >= fk.max_mcmc_steps) & ~(info["jump"] >= fk.target_jump)
    out = DataTemperedResult(
        samples=target.constrain(res.particles.z), log_weights=res.log_weights,
        log_evidence=res.log_evidence, log_predictive=res.log_evidence_increments,
        seen=info["seen"], ess=res.ess, acceptance_rate=info["acceptance"], jump=info["jump"],
        mcmc_steps=info["mcmc_steps"], num_unmixed_steps=jnp.sum(unmixed.astype(jnp.int32)),
        particles=res.particles.z, smc=res,
    )
    if not isinstance(out.num_unmixed_steps, jax.core.Tracer):
        warn_unmixed("data-tempered SMC", int(out.num_unmixed_steps), fk.num_steps - 1,
                     np.asarray(out.jump)[1:], fk.max_mcmc_steps, fk.target_jump)
    return out
