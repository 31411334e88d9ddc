r"""Feynman-Kac steering of a reverse diffusion (Singhal et al. 2025) as Feynman-Kac models.

Reference: R. Singhal, Z. Horvitz, R. Teehan, M. Ren, Z. Yu, K. McKeown, R. Ranganath (2025), "A
general framework for inference-time scaling and steering of diffusion models", ICML
(arXiv:2501.06848), and its reference code (``fkd_class.py`` of the authors' repository).

**Chain.** Particles move down a grid of noise levels \(s_0 = 1 > s_1 > \dots > s_K = \varepsilon\)
(engine steps \(t = 0, \dots, K\), so ``num_steps = K + 1``) by a Gaussian reverse kernel
\(x_t \sim \mathcal{N}(m, \mathrm{std}^2 I)\), \((m, \mathrm{std}) =\) ``kernel.mean_std(sde,
x_{t-1}, eps_{t-1}, s_{t-1}, s_t)``, driven by the noise prediction
\(\hat\varepsilon_{t} = \hat\varepsilon(x_t, s_t)\) of the *unsteered* model: the digits model's
:class:`~models.diffusion.digits.EulerMaruyama` or :class:`~models.diffusion.digits.DDIM` with
\(\eta > 0\), and any score model through :class:`EpsFromScore`
(\(\hat\varepsilon = -\sigma_s \nabla \log p_s\), so ``EulerMaruyama`` is exactly
:meth:`~models.diffusion.vp_sde.VPSDE.reverse_mean_std` with that score). One network evaluation
per particle and step: \(\hat\varepsilon_t\) is cached in the particle and serves both the next
move and Tweedie's denoised estimate

\[
\hat x_0(x_t) = \frac{x_t - \sigma_{s_t} \hat\varepsilon_t}{\alpha_{s_t}}
\qquad\Big(= \mathbb{E}[x_0 \mid x_t] \text{ for the exact } \hat\varepsilon\Big).
\]

**Rewards.** \(r_t = r(\hat x_0(x_t))\) for \(t < K\) and \(r_K = r(y)\) for the output
\(y = \hat x_0(x_K)\) (``denoise_final=True``, as :func:`~models.diffusion.digits.sample_digits`)
or \(y = x_K\). The target is the reward-tilted law of the output,

\[
\pi(y) \propto q(y)\, \exp(\lambda\, r(y)),
\]

with \(q\) the law of \(y\) under the discretised unsteered chain (as in
:mod:`models.diffusion.fk_model`: for the exact score and a refined grid, \(q \to p_\varepsilon\)).

**Potentials** (strategies: the examples of the paper and of its code; \(t\) counts *our* steps,
from noise to data):

- :class:`Diff`: \(\log G_0 = \lambda r_0\), \(\log G_t = \lambda (r_t - r_{t-1})\). The product
  telescopes to \(\exp(\lambda r_K)\) pathwise: **exact** target, no correction needed (the
  "tweedie" potential of :class:`~models.diffusion.fk_model.RewardTiltedDiffusion`).
- :class:`Max`: \(\log G_t = \lambda \max_{u \le t} r_u\).
- :class:`Sum`: \(\log G_t = \lambda \sum_{u \le t} r_u\).
- :class:`RT`: \(\log G_t = \lambda r_t\) (the current reward only).

For ``Max``, ``Sum`` and ``RT`` the product of the intermediate potentials is *not*
\(\exp(\lambda r_K)\); with ``correct_final=True`` (default) the last potential is replaced by

\[
\log G_K = \lambda r_K - \sum_{t < K} \log G_t \quad\text{(along the particle's ancestral line)},
\]

so that \(\prod_t G_t = \exp(\lambda r_K)\) pathwise and the final weighted particles target
\(\pi\) **exactly** (and \(\hat Z\) is unbiased for \(Z = \mathbb{E}_q[e^{\lambda r(y)}]\)): the
intermediate potentials only steer the population, and their product is divided out at the end.
The running sum \(\sum_{t<K} \log G_t\) is a particle field (``log_g_sum``) that resampling copies
with the particle. With ``correct_final=False`` the last potential is the intermediate formula at
\(t = K\): the product is \(\exp(\lambda \sum_t \max_{u \le t} r_u)\),
\(\exp(\lambda \sum_t \sum_{u \le t} r_u)\) or \(\exp(\lambda \sum_t r_t)\), a **heuristic**
(greedier) target that is not \(\pi\). (The authors' code divides at the end by the product of
the applied potentials but multiplies by \(e^{\lambda m_K}\) with \(m_K\) the potential's own
statistic (the running max or sum for MAX/SUM), which is exact for RT and DIFF only.)

**Where the potential is evaluated.** By default at every step, and the engine carries the
weights \(W_t \propto W_{t-1} G_t\) over steps that do not resample. ``potential_steps`` (boolean
[K+1]) restricts the reward calls to some steps (\(\log G_t = 0\) elsewhere; the statistics of
``Max``/``Sum``/``Diff`` run over the evaluated steps only, as in the authors' code, which scores
only at its resampling steps); the last step is always evaluated. Either way the corrected product
is \(\exp(\lambda r_K)\).

**Resampling** is the engine's (:func:`samplers.smc.smc`): every step (``ess_threshold=1``),
ESS-triggered (``ess_threshold`` in (0, 1)), or on a schedule (``ess_threshold=0`` and
``resample_schedule=resampling_window(...)``: every \(k\) steps within a window, the authors'
``resample_frequency``, ``resampling_t_start``, ``resampling_t_end``). ``resample_final=True`` in
``smc`` draws equally weighted final particles.

**Diagnostics.** :meth:`FKSteering.step_info` records per step the number of network evaluations
(exact: rows actually passed to ``eps_fn``, times ``evals_per_call``), the reward calls, the number
of distinct parents chosen by that step's resampling and the number of distinct step-0 ancestors
("roots") still alive; :func:`steering_diagnostics` collects them with the engine's ESS.

**Baseline.** :func:`best_of_n_chains` runs the same model's chains without resampling (the engine
with ``ess_threshold=0``, \(\lambda = 0\), reward at the end only) and keeps the highest reward: with
the same number of chains as FK particles it spends exactly the same network evaluations. (The
fixed-horizon diffusion counterpart of :func:`samplers.search.best_of_n`, which serves models with
absorbing ``done`` states such as LLMs.)
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from models.diffusion.digits import DDIM, DigitsDiffusion, EulerMaruyama, NULL_CLASS
from models.diffusion.fk_model import LinearReward
from models.diffusion.gaussian_mixture import DiffusedMixture, GaussianMixture
from models.diffusion.vp_sde import VPSDE
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.smc import smc

__all__ = [
    "AbstractFKPotential",
    "Diff",
    "Max",
    "Sum",
    "RT",
    "EpsFromScore",
    "DigitsEps",
    "SteeringParticles",
    "SteeringStepInfo",
    "FKSteering",
    "SteeringDiagnostics",
    "BestOfN",
    "resampling_window",
    "steps_before_resampling",
    "steering_diagnostics",
    "best_sample",
    "best_of_n_chains",
    "gmm_fk_steering",
    "digits_fk_steering",
]


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ------------------------------------------------------------------------------------------------
# potentials (strategies)
# ------------------------------------------------------------------------------------------------


class AbstractFKPotential(eqx.Module):
    r"""A choice of FK-steering potential: a running statistic \(m_t\) of the rewards and the
    intermediate log-potential \(\log G_t\) computed from it.

    ``initial()`` is \(m\) before any evaluation; ``update(m_prev, r)`` the statistic after a
    reward evaluation; ``log_potential(lam, m_prev, m, r)`` the intermediate \(\log G_t\);
    ``correct_final`` whether the last potential is replaced by
    \(\lambda r_K - \sum_{t<K} \log G_t\) (exact target; see the module doc).
    """

    @abc.abstractmethod
    def initial(self) -> float:
        """The statistic before the first evaluated reward."""

    @abc.abstractmethod
    def update(self, stat_prev: Float[Array, " N"], r: Float[Array, " N"]) -> Float[Array, " N"]:
        """The statistic after evaluating the reward ``r``."""

    @abc.abstractmethod
    def log_potential(
        self,
        lam: Float[Array, ""],
        stat_prev: Float[Array, " N"],
        stat: Float[Array, " N"],
        r: Float[Array, " N"],
    ) -> Float[Array, " N"]:
        """The intermediate log-potential."""

    @property
    def corrected(self) -> Bool[Array, ""]:
        return jnp.asarray(getattr(self, "correct_final", False), bool)

    @property
    def exact(self) -> bool:
        """Whether the product of potentials is \\(\\exp(\\lambda r_K)\\) (concrete flags only)."""
        return bool(self.corrected)


class Diff(AbstractFKPotential):
    r"""Difference potential \(\log G_t = \lambda (r_t - r_{t'})\), \(t'\) the previous evaluated
    step (\(r_{t'} = 0\) before the first): the product telescopes to \(\exp(\lambda r_K)\) pathwise,
    so the target is **exact** without any final correction (Singhal et al. 2025, "difference";
    the look-ahead potential of twisted SMC, Wu et al. 2023)."""

    def initial(self) -> float:
        return 0.0

    def update(self, stat_prev, r):
        return r

    def log_potential(self, lam, stat_prev, stat, r):
        return lam * (r - stat_prev)

    @property
    def exact(self) -> bool:
        return True


class _Corrected(AbstractFKPotential):
    correct_final: Bool[Array, ""] = eqx.field(default=True, converter=lambda b: jnp.asarray(b, bool))


class Max(_Corrected):
    r"""Max potential \(\log G_t = \lambda \max_{u \le t} r_u\) (over evaluated steps): favours
    particles that have *ever* looked good. **Exact** with ``correct_final=True`` (the last
    potential \(\lambda r_K - \sum_{t<K} \log G_t\)); with ``False`` a heuristic whose product is
    \(\exp(\lambda \sum_t \max_{u \le t} r_u)\)."""

    def initial(self) -> float:
        return -math.inf

    def update(self, stat_prev, r):
        return jnp.maximum(stat_prev, r)

    def log_potential(self, lam, stat_prev, stat, r):
        return lam * stat


class Sum(_Corrected):
    r"""Sum potential \(\log G_t = \lambda \sum_{u \le t} r_u\) (over evaluated steps; "add" in the
    authors' code). **Exact** with ``correct_final=True``; with ``False`` a heuristic whose product
    is \(\exp(\lambda \sum_t \sum_{u \le t} r_u)\)."""

    def initial(self) -> float:
        return 0.0

    def update(self, stat_prev, r):
        return stat_prev + r

    def log_potential(self, lam, stat_prev, stat, r):
        return lam * stat


class RT(_Corrected):
    r"""Current-reward potential \(\log G_t = \lambda r_t\) ("rt" in the authors' code). **Exact** with
    ``correct_final=True``; with ``False`` a heuristic whose product is
    \(\exp(\lambda \sum_t r_t)\)."""

    def initial(self) -> float:
        return 0.0

    def update(self, stat_prev, r):
        return r

    def log_potential(self, lam, stat_prev, stat, r):
        return lam * r


# ------------------------------------------------------------------------------------------------
# noise predictions
# ------------------------------------------------------------------------------------------------


class EpsFromScore(eqx.Module):
    r"""A score model as a noise prediction: \(\hat\varepsilon(x, s) = -\sigma_s \nabla \log p_s(x)\)
    (e.g. the exact score :class:`~models.diffusion.gaussian_mixture.DiffusedMixture`)."""

    score_fn: Any
    sde: VPSDE

    def __call__(self, x: Float[Array, "N d"], s: Float[Array, ""]) -> Float[Array, "N d"]:
        return -self.sde.sigma(s) * self.score_fn(x, s)


class DigitsEps(eqx.Module):
    r"""The digits network \(\hat\varepsilon_\theta(x, s, c)\) for a fixed label (or
    :data:`~models.diffusion.digits.NULL_CLASS`), with optional classifier-free ``guidance``
    (two network calls per evaluation then)."""

    model: DigitsDiffusion
    label: Int[Array, "..."]
    guidance: Any = None

    def __call__(self, x: Float[Array, "N 64"], s: Float[Array, ""]) -> Float[Array, "N 64"]:
        return self.model.guided_eps(x, s, self.label, self.guidance)


# ------------------------------------------------------------------------------------------------
# the Feynman-Kac model
# ------------------------------------------------------------------------------------------------


class SteeringParticles(NamedTuple):
    r"""FK-steering particles at step \(t\).

    ``x`` the state \(x_t\); ``eps`` \(\hat\varepsilon(x_t, s_t)\) (zeros where it was not needed:
    the last step without ``denoise_final``); ``x0`` Tweedie's \(\hat x_0(x_t)\), at the last step
    the output \(y\); ``reward`` the last evaluated reward; ``stat`` the potential's running
    statistic; ``log_g`` this step's \(\log G_t\); ``log_g_sum`` \(\sum_{u \le t} \log G_u\) along
    the ancestral line; ``root`` the index of the step-0 ancestor; ``slot`` the particle's own
    index (after a resampling, the previous step's ``slot`` are the ancestors).
    """

    x: Float[Array, "N d"]
    eps: Float[Array, "N d"]
    x0: Float[Array, "N d"]
    reward: Float[Array, " N"]
    stat: Float[Array, " N"]
    log_g: Float[Array, " N"]
    log_g_sum: Float[Array, " N"]
    root: Int[Array, " N"]
    slot: Int[Array, " N"]


class SteeringStepInfo(NamedTuple):
    """Per-step statistics (recorded by the engine in ``SMCResult.step_info``)."""

    nfe: Int[Array, ""]
    reward_calls: Int[Array, ""]
    unique_parents: Int[Array, ""]
    unique_roots: Int[Array, ""]


def _num_unique(ids: Int[Array, " N"]) -> Int[Array, ""]:
    """Distinct values among ids in [0, N) (a scatter: cheaper to compile than a sort)."""
    return jnp.sum(jnp.zeros(ids.shape, bool).at[ids].set(True), dtype=jnp.int32)


class FKSteering(AbstractFeynmanKac):
    r"""FK steering of a reverse diffusion towards \(q(y) \exp(\lambda r(y))\) (see the module doc).

    Args:
        sde: the :class:`~models.diffusion.vp_sde.VPSDE` schedule (\(\alpha_s\), \(\sigma_s\)).
        eps_fn: ``eps_fn(x [N, d], s) -> [N, d]``, the unsteered noise prediction (e.g.
            :class:`DigitsEps`, or :class:`EpsFromScore` around a score model).
        kernel: a reverse kernel with ``mean_std(sde, x, eps, s, s_next) -> (mean, std)``
            (:class:`~models.diffusion.digits.EulerMaruyama`, ``DDIM(eta > 0)``).
        reward: ``reward(y [N, d]) -> [N]``, any jittable callable (e.g.
            :class:`~models.diffusion.verifiers.ClassLogProb`, :class:`LinearReward`).
        potential: :class:`Diff`, :class:`Max`, :class:`Sum` or :class:`RT` (a strategy object).
        lam: \(\lambda\), the tilt strength.
        times: decreasing noise levels \([K+1]\) in \((0, 1]\) (``sde.time_grid(K, eps)``).
        dim: \(d\).
        init_dist: law of \(x_{s_0}\) (anything with ``sample(key, n)``); ``None``:
            \(\mathcal{N}(0, I)\).
        denoise_final: the output is \(\hat x_0(x_K)\) (one more network evaluation) instead of
            \(x_K\).
        potential_steps: optional boolean \([K+1]\): evaluate the reward and apply a potential
            only at these steps (the last step always); ``None``: every step.
        evals_per_call: network evaluations per row of one ``eps_fn`` call (2 with
            classifier-free guidance), for the NFE count.
    """

    sde: VPSDE
    eps_fn: Any
    kernel: Any
    reward: Any
    potential: AbstractFKPotential
    lam: Float[Array, ""]
    times: Float[Array, " T"]
    potential_steps: Bool[Array, " T"]
    init_dist: Any
    dim: int = eqx.field(static=True)
    denoise_final: bool = eqx.field(static=True)
    evals_per_call: int = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)

    def __init__(
        self,
        sde: VPSDE,
        eps_fn: Callable,
        kernel: Any,
        reward: Callable,
        potential: AbstractFKPotential,
        lam: float | Float[Array, ""],
        times: Float[Array, " T"],
        dim: int,
        *,
        init_dist: Any = None,
        denoise_final: bool = False,
        potential_steps: Bool[Array, " T"] | None = None,
        evals_per_call: int = 1,
    ):
        if not isinstance(sde, VPSDE):
            raise TypeError(f"sde must be a VPSDE, got {type(sde).__name__}")
        if not isinstance(potential, AbstractFKPotential):
            raise TypeError(
                "potential must be a strategy object Diff(), Max(), Sum() or RT(), got "
                f"{potential!r}"
            )
        if not callable(eps_fn) or not callable(reward):
            raise TypeError("eps_fn and reward must be callable")
        if not callable(getattr(kernel, "mean_std", None)):
            raise TypeError(
                "kernel needs a mean_std(sde, x, eps, s, s_next) method (EulerMaruyama(), DDIM(eta))"
            )
        eta = getattr(kernel, "eta", None)
        if isinstance(kernel, DDIM) and _concrete(eta) and not float(eta) > 0.0:
            raise ValueError(
                "FK steering needs a stochastic kernel: DDIM(eta) with eta > 0 (eta = 0 is "
                "deterministic, so resampled copies would never separate)"
            )
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(evals_per_call, int) or evals_per_call < 1:
            raise ValueError(f"evals_per_call must be a positive int, got {evals_per_call!r}")
        times = jnp.asarray(times, jnp.result_type(float))
        if times.ndim != 1 or times.shape[0] < 2:
            raise ValueError(f"times must be a 1-D grid with >= 2 levels, got shape {times.shape}")
        if _concrete(times) and not (
            bool(jnp.all(jnp.diff(times) < 0)) and 0.0 < float(times[-1]) and float(times[0]) <= 1.0
        ):
            raise ValueError("times must be strictly decreasing within (0, 1]")
        lam = jnp.asarray(lam, jnp.result_type(float))
        if lam.ndim != 0:
            raise ValueError(f"lam must be a scalar, got shape {lam.shape}")
        if _concrete(lam) and not bool(jnp.isfinite(lam)):
            raise ValueError(f"lam must be finite, got {float(lam)}")
        num_steps = int(times.shape[0])
        if potential_steps is None:
            steps = jnp.ones((num_steps,), bool)
        else:
            steps = jnp.asarray(potential_steps)
            if steps.dtype != jnp.bool_ or steps.shape != (num_steps,):
                raise ValueError(
                    f"potential_steps must be a boolean array of shape [{num_steps}], got "
                    f"{steps.dtype} {steps.shape}"
                )
            steps = steps.at[-1].set(True)
        if init_dist is not None and not hasattr(init_dist, "sample"):
            raise TypeError("init_dist must have a sample(key, n) method (or be None)")
        self.sde = sde
        self.eps_fn = eps_fn
        self.kernel = kernel
        self.reward = reward
        self.potential = potential
        self.lam = lam
        self.times = times
        self.potential_steps = steps
        self.init_dist = init_dist
        self.dim = dim
        self.denoise_final = bool(denoise_final)
        self.evals_per_call = evals_per_call
        self.num_steps = num_steps

    # ---- helpers ------------------------------------------------------------------------------
    def _needs_eps(self, t):
        if self.denoise_final:
            return jnp.asarray(True)
        return t < self.num_steps - 1

    def _eps(self, t, x):
        s = self.times[t]
        if self.denoise_final:
            return self.eps_fn(x, s)
        return jax.lax.cond(
            self._needs_eps(t), lambda: self.eps_fn(x, s).astype(x.dtype), lambda: jnp.zeros_like(x)
        )

    def _reward(self, y):
        r = self.reward(y)
        if jnp.shape(r) != y.shape[:1]:
            raise ValueError(f"reward(y [N, d]) must return shape [N], got {jnp.shape(r)}")
        return jnp.asarray(r, y.dtype)

    def _weigh(self, t, x, eps, reward_prev, stat_prev, log_g_sum_prev, root):
        n = x.shape[0]
        last = t == self.num_steps - 1
        s = self.times[t]
        x0 = (x - self.sde.sigma(s) * eps) / self.sde.alpha(s)
        if not self.denoise_final:
            x0 = jnp.where(last, x, x0)
        evaluate = self.potential_steps[t]
        r = jax.lax.cond(evaluate, lambda: self._reward(x0), lambda: reward_prev)
        pot = self.potential
        stat_new = pot.update(stat_prev, r)
        log_g = pot.log_potential(self.lam, stat_prev, stat_new, r)
        log_g = jnp.where(last & pot.corrected, self.lam * r - log_g_sum_prev, log_g)
        log_g = jnp.where(evaluate, log_g, 0.0)
        stat = jnp.where(evaluate, stat_new, stat_prev)
        return SteeringParticles(
            x=x, eps=eps, x0=x0, reward=r, stat=stat, log_g=log_g,
            log_g_sum=log_g_sum_prev + log_g, root=root, slot=jnp.arange(n, dtype=jnp.int32),
        )

    # ---- Feynman-Kac protocol -----------------------------------------------------------------
    def init(self, key: PRNGKeyArray, num_particles: int) -> SteeringParticles:
        n = num_particles
        if self.init_dist is None:
            x = jax.random.normal(key, (n, self.dim))
        else:
            x = jnp.asarray(self.init_dist.sample(key, n))
        if x.shape != (n, self.dim):
            raise ValueError(f"the initial particles must have shape [{n}, {self.dim}], got {x.shape}")
        t = jnp.asarray(0, jnp.int32)
        zeros = jnp.zeros((n,), x.dtype)
        stat0 = jnp.full((n,), self.potential.initial(), x.dtype)
        return self._weigh(t, x, self._eps(t, x), zeros, stat0, zeros, jnp.arange(n, dtype=jnp.int32))

    def move(
        self, key: PRNGKeyArray, t: Int[Array, ""], particles: SteeringParticles
    ) -> SteeringParticles:
        p = particles
        mean, std = self.kernel.mean_std(self.sde, p.x, p.eps, self.times[t - 1], self.times[t])
        x = mean + std * jax.random.normal(key, mean.shape, mean.dtype)
        return self._weigh(t, x, self._eps(t, x), p.reward, p.stat, p.log_g_sum, p.root)

    def log_potential(
        self, t: Int[Array, ""], previous: SteeringParticles | None, particles: SteeringParticles
    ) -> Float[Array, " N"]:
        return particles.log_g

    def step_info(
        self, t: Int[Array, ""], previous: SteeringParticles | None, particles: SteeringParticles
    ) -> SteeringStepInfo:
        n = particles.x.shape[0]
        nfe = jnp.where(self._needs_eps(t), n * self.evals_per_call, 0).astype(jnp.int32)
        calls = jnp.where(self.potential_steps[t], n, 0).astype(jnp.int32)
        parents = jnp.asarray(n, jnp.int32) if previous is None else _num_unique(previous.slot)
        return SteeringStepInfo(nfe, calls, parents, _num_unique(particles.root))


# ------------------------------------------------------------------------------------------------
# schedules, diagnostics, selection, best-of-N
# ------------------------------------------------------------------------------------------------


def resampling_window(
    num_steps: int, every: int, start: int = 0, end: int | None = None
) -> Bool[Array, " T"]:
    r"""The engine's ``resample_schedule`` [``num_steps``] for resampling every ``every`` steps in a
    window: after the weighting of steps \(p = \) ``start``, ``start + every``, ... \(\le\) ``end``
    (default ``num_steps - 2``, the last step that can be followed by a move), i.e.
    ``schedule[p + 1] = True`` (the engine resamples *before* moving at step \(p + 1\)). Steps are
    counted from the noise end (\(t = 0\) at \(s_0 = 1\)). Use with ``ess_threshold=0``;
    ``every=1, start=0`` is every-step resampling. The final resampling, if wanted, is
    ``resample_final=True``.
    """
    for name, v in (("num_steps", num_steps), ("every", every), ("start", start)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    end = num_steps - 2 if end is None else end
    if not isinstance(end, int) or isinstance(end, bool):
        raise TypeError(f"end must be an int or None, got {end!r}")
    if not 0 <= start <= end <= num_steps - 2:
        raise ValueError(
            f"need 0 <= start <= end <= num_steps - 2 = {num_steps - 2}, got start={start}, end={end}"
        )
    sched = [False] * num_steps
    for p in range(start, end + 1, every):
        sched[p + 1] = True
    return jnp.asarray(sched, bool)


def steps_before_resampling(resample_schedule: Bool[Array, " T"]) -> Bool[Array, " T"]:
    r"""The steps whose weighting a scheduled resampling uses (``schedule[p + 1]``), plus the last
    step: pass as ``potential_steps`` to evaluate the reward only there, as the authors' code does."""
    sched = jnp.asarray(resample_schedule)
    if sched.dtype != jnp.bool_ or sched.ndim != 1 or sched.shape[0] < 2:
        raise ValueError("resample_schedule must be a 1-D boolean array of length >= 2")
    return jnp.concatenate([sched[1:], jnp.ones((1,), bool)])


class SteeringDiagnostics(NamedTuple):
    r"""Diagnostics of one FK-steering run (leading batch axes if the run was vmapped).

    ``ess`` [T]: the engine's ESS after weighting at each step; ``resampled`` [T]: whether step
    \(t\) resampled before moving; ``unique_parents`` [T]: distinct ancestors drawn at step \(t\)
    (\(N\) where it did not resample); ``unique_roots`` [T]: distinct step-0 ancestors alive after
    step \(t\); ``nfe``: network evaluations in all (exact); ``reward_calls``: reward evaluations
    (per row); ``log_evidence``: \(\log \hat Z\)."""

    ess: Float[Array, "... T"]
    resampled: Bool[Array, "... T"]
    unique_parents: Int[Array, "... T"]
    unique_roots: Int[Array, "... T"]
    nfe: Int[Array, "..."]
    reward_calls: Int[Array, "..."]
    log_evidence: Float[Array, "..."]


def steering_diagnostics(result: Any) -> SteeringDiagnostics:
    """Collect the diagnostics of an :class:`~samplers.smc.SMCResult` of an :class:`FKSteering` run."""
    info = getattr(result, "step_info", None)
    if not isinstance(info, SteeringStepInfo):
        raise TypeError("result must be an SMCResult of an FKSteering model (its step_info is missing)")
    return SteeringDiagnostics(
        ess=result.ess,
        resampled=result.resampled,
        unique_parents=info.unique_parents,
        unique_roots=info.unique_roots,
        nfe=jnp.sum(info.nfe, axis=-1),
        reward_calls=jnp.sum(info.reward_calls, axis=-1),
        log_evidence=result.log_evidence,
    )


def best_sample(particles: SteeringParticles) -> tuple[Float[Array, " d"], Float[Array, ""]]:
    """The output with the highest final reward among the particles (weights ignored), and its reward."""
    i = jnp.argmax(particles.reward)
    return particles.x0[i], particles.reward[i]


class BestOfN(NamedTuple):
    """Best-of-N: the chosen output and its reward, all N outputs and rewards, and the costs."""

    sample: Float[Array, " d"]
    reward: Float[Array, ""]
    samples: Float[Array, "N d"]
    rewards: Float[Array, " N"]
    nfe: Int[Array, ""]
    reward_calls: Int[Array, ""]


def best_of_n_chains(key: PRNGKeyArray, model: FKSteering, num_samples: int) -> BestOfN:
    r"""Best-of-N with the model's own chain: ``num_samples`` independent chains (same start law,
    kernel, grid and network), the reward of each output, the highest kept.

    Runs the engine with ``ess_threshold=0`` and an all-false schedule (no resampling) on ``model``
    with \(\lambda = 0\) (every potential is 1) and the reward evaluated at the last step only, so
    the NFE equals that of FK steering with as many particles,
    ``num_samples * (K + denoise_final) * evals_per_call``; ``num_samples`` reward calls. With the
    same potential class and a schedule, the FK run and this one share one compilation.
    """
    if not isinstance(model, FKSteering):
        raise TypeError(f"model must be an FKSteering, got {type(model).__name__}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    only_last = jnp.zeros((model.num_steps,), bool).at[-1].set(True)
    # lam = 0 makes every potential (and every final correction) 0: the same pytree structure as
    # the FK run, and a (never-resampling) schedule, so that both share one compilation
    plain = eqx.tree_at(
        lambda m: (m.lam, m.potential_steps), model, (jnp.zeros_like(model.lam), only_last)
    )
    never = jnp.zeros((model.num_steps,), bool)
    res = smc(key, plain, num_samples, ess_threshold=0.0, resample_schedule=never)
    diag = steering_diagnostics(res)
    x, r = best_sample(res.particles)
    return BestOfN(x, r, res.particles.x0, res.particles.reward, diag.nfe, diag.reward_calls)


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------


def gmm_fk_steering(
    data: GaussianMixture,
    direction: Float[Array, " d"],
    lam: float | Float[Array, ""],
    potential: AbstractFKPotential,
    *,
    num_levels: int = 100,
    eps: float = 1e-3,
    sde: VPSDE | None = None,
    exact_init: bool = True,
    potential_steps: Bool[Array, " T"] | None = None,
) -> FKSteering:
    r"""FK steering of Gaussian-mixture data with the exact score (through :class:`EpsFromScore`), the
    Euler–Maruyama kernel and \(r(x) = a^\top x\); output \(x_K\) (no final denoising), start from
    the exact \(p_1\) (``exact_init``) or \(\mathcal{N}(0, I)\). Its target's fine-grid limit is
    ``exact_tilted_target(tilted_gmm_diffusion(data, direction, lam, num_levels=num_levels))``."""
    sde = VPSDE() if sde is None else sde
    direction = jnp.asarray(direction, jnp.result_type(float))
    if direction.shape != (data.dim,):
        raise ValueError(f"direction must have shape [{data.dim}], got {direction.shape}")
    times = sde.time_grid(num_levels, eps)
    score = DiffusedMixture(data, sde)
    return FKSteering(
        sde, EpsFromScore(score, sde), EulerMaruyama(), LinearReward(direction), potential, lam,
        times, data.dim, init_dist=score.marginal(times[0]) if exact_init else None,
        denoise_final=False, potential_steps=potential_steps,
    )


def digits_fk_steering(
    model: DigitsDiffusion,
    reward: Callable,
    lam: float | Float[Array, ""],
    potential: AbstractFKPotential,
    *,
    label: int | Int[Array, ""] = NULL_CLASS,
    num_steps: int = 30,
    kernel: Any = None,
    guidance: float | None = None,
    eps: float = 1e-3,
    potential_steps: Bool[Array, " T"] | None = None,
) -> FKSteering:
    r"""FK steering of the digits model (:mod:`models.diffusion.digits`): ``num_steps`` reverse steps
    of ``kernel`` (default :class:`~models.diffusion.digits.EulerMaruyama`) from \(\mathcal{N}(0, I)\)
    on ``model.sde.time_grid(num_steps, eps)``, output Tweedie's \(\hat x_0\) at \(s_K\) (as
    :func:`~models.diffusion.digits.sample_digits`), network label ``label`` (default the
    unconditional model) with optional classifier-free ``guidance``; ``reward`` e.g.
    ``ClassLogProb(fit_digits_classifier("A"), target)``. NFE per particle:
    ``(num_steps + 1) * (2 if guidance else 1)``."""
    if not isinstance(model, DigitsDiffusion):
        raise TypeError(f"model must be a DigitsDiffusion, got {type(model).__name__}")
    kernel = EulerMaruyama() if kernel is None else kernel
    times = model.sde.time_grid(num_steps, eps)
    g = None if guidance is None else jnp.asarray(guidance, jnp.float32)
    return FKSteering(
        model.sde, DigitsEps(model, jnp.asarray(label, jnp.int32), g), kernel, reward, potential,
        lam, times, 64, denoise_final=True, potential_steps=potential_steps,
        evals_per_call=1 if guidance is None else 2,
    )
