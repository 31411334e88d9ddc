r"""Feynman-Kac correctors (FKC): annealing, products of experts and classifier-free guidance.

Skreta et al. (2025), "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
Experts", ICML. Given score models \(S_i(x, s) = \nabla \log p^i_s(x)\) of \(M\) diffusions sharing
one VP SDE (:class:`~models.diffusion.vp_sde.VPSDE`, forward drift \(f = -\frac12 \beta(s) x\),
\(g^2 = \beta(s)\)), the target at every noise level is the geometric product

\[
\pi_s(x) \propto \prod_{i=1}^M p^i_s(x)^{\gamma_i}, \qquad
S_\pi = \nabla \log \pi_s = \sum_i \gamma_i S_i, \qquad \Gamma = \sum_i \gamma_i > 0,
\]

which covers annealing \(p^\beta\) (\(M = 1\), \(\gamma = \beta\)), the product of experts
\(p^1 p^2\) (\(\gamma = (1, 1)\)) and classifier-free guidance
\(p(x \mid c)^{1+w} p(x)^{-w}\) (\(\gamma = (1 + w, -w)\), \(\Gamma = 1\)). In reverse time
\(\tau\) (\(d\tau = -ds\)) particles move by

\[
dx = \big[-c f + \tfrac12 (g^2 + h^2)\, S_\pi\big]\, d\tau + h\, dW,
\]

with the noise \(h^2 = \lambda g^2\) and \(c\) chosen by a strategy: :class:`TargetScore`
(\(\lambda = c = 1\): the reverse SDE driven by the target score, e.g. \(\beta \nabla \log p_s\)),
:class:`TemperedNoise` (\(\lambda = 1/\Gamma\), \(c = 1\): noise \(g/\sqrt\beta\) and drift
\(\frac{1+\beta}{2} g^2 \nabla \log p_s\) for annealing), both from the paper, or
:class:`ScaledDrift` (\(\lambda = 1\), \(c = \Gamma\); not in the paper, lower weight variance). Neither moves along \(\pi_s\); the
Feynman-Kac PDE \(\partial_\tau \tilde\pi = \mathcal L^*_\tau \tilde\pi + \tilde\pi\, \rho_\tau\) of
the unnormalised \(\tilde\pi_s = \prod_i (p^i_s)^{\gamma_i}\) holds with the weight rate

\[
\rho_\tau(x) = (\Gamma - c)\, \nabla\!\cdot\! f + (1 - c)\, f \cdot S_\pi
+ \frac{g^2}{2}\Big(\lVert S_\pi \rVert^2 - \sum_i \gamma_i \lVert S_i \rVert^2\Big),
\]

for every \(\lambda\) (the Laplacian terms cancel because the drift is \(\frac12(g^2 + h^2) S_\pi\)),
so the weights need scores only. Special cases with \(c = 1\) (the paper's propositions): annealing
\(\rho = (\beta - 1)[\nabla\cdot f + \frac{g^2}{2} \beta \lVert S \rVert^2]\); product
\(\rho = \nabla\cdot f + g^2 \langle S_1, S_2 \rangle\); guidance
\(\rho = \frac{g^2}{2} w (1 + w) \lVert S_c - S_\varnothing \rVert^2\).

**Discretisation** on the grid \(s_0 = 1 > \dots > s_K = \varepsilon\) (\(h_t = s_{t-1} - s_t\)):
the move is the Euler–Maruyama step of the SDE above; \(\log G_t\) integrates \(\rho\) by the
trapezoidal rule between \((x_{t-1}, s_{t-1})\) and \((x_t, s_t)\) (the score at \(x_t\) is computed
anyway for the next move and cached), and the \(x\)-independent \(\nabla\cdot f = -\frac d2 \beta(s)\)
term exactly, \(-(\Gamma - c)\frac d2 (B(s_{t-1}) - B(s_t))\). Because the weight then tracks the
unnormalised \(\tilde\pi\), \(\log \hat Z \to \log \int \tilde\pi_\varepsilon - \log \int
\tilde\pi_1\). Particles start from \(\mathcal N(0, I/\Gamma)\), the target at \(s = 1\) when every
\(p^i_1 \approx \mathcal N(0, I)\) (\(\alpha_1 \approx 0.0066\) for the default schedule), with
\(G_0 = 1\). The engine (:func:`samplers.smc.smc`) resamples and estimates \(\log Z\); this module
only supplies the Feynman-Kac model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from models.diffusion.gaussian_mixture import GaussianMixture
from models.diffusion.vp_sde import VPSDE
from ppl.feynman_kac import AbstractFeynmanKac

__all__ = [
    "TargetScore",
    "TemperedNoise",
    "ScaledDrift",
    "CorrectorParticles",
    "FeynmanKacCorrector",
    "annealed",
    "product_of_experts",
    "classifier_free_guidance",
    "corrected_samples",
    "mixture_product",
]


# ------------------------------------------------------------------------------------------------
# strategies: the noise of the move
# ------------------------------------------------------------------------------------------------


class TargetScore(eqx.Module):
    r"""Move with the target score and the model's noise: \(h^2 = g^2\), drift
    \(-f + g^2 S_\pi\) (for annealing, \(g^2 \beta \nabla \log p_s\); Skreta et al. 2025)."""

    def noise_factor(self, total_exponent: float) -> float:
        r"""\(\lambda = h^2 / g^2 = 1\)."""
        return 1.0

    def drift_factor(self, total_exponent: float) -> float:
        r"""\(c = 1\): the forward drift enters the move unscaled."""
        return 1.0


class TemperedNoise(eqx.Module):
    r"""Tempered noise \(h^2 = g^2 / \Gamma\), drift \(-f + \frac{1 + 1/\Gamma}{2} g^2 S_\pi\) (for
    annealing: noise \(g/\sqrt\beta\), drift \(\frac{1+\beta}{2} g^2 \nabla \log p_s\); Skreta et al.
    2025). Needs \(\Gamma > 0\)."""

    def noise_factor(self, total_exponent: float) -> float:
        r"""\(\lambda = h^2 / g^2 = 1 / \Gamma\)."""
        if total_exponent <= 0:
            raise ValueError(f"TemperedNoise needs a positive sum of exponents, got {total_exponent}")
        return 1.0 / total_exponent

    def drift_factor(self, total_exponent: float) -> float:
        r"""\(c = 1\)."""
        return 1.0


class ScaledDrift(eqx.Module):
    r"""Not in the paper: the model's noise \(h^2 = g^2\) and the forward drift scaled by \(\Gamma\),
    \(dx = [-\Gamma f + g^2 S_\pi]\, d\tau + g\, dW\) (for annealing, \(\beta\) times the model's own
    reverse drift). The weight rate gains \((1 - \Gamma) f \cdot S_\pi\) and loses the divergence term;
    it vanishes wherever every \(p^i_s\) is \(\mathcal N(0, I)\) (high noise), which is where the
    other two forms spend most of their weight variance."""

    def noise_factor(self, total_exponent: float) -> float:
        r"""\(\lambda = 1\)."""
        return 1.0

    def drift_factor(self, total_exponent: float) -> float:
        r"""\(c = \Gamma\)."""
        return float(total_exponent)


# ------------------------------------------------------------------------------------------------
# the Feynman-Kac model
# ------------------------------------------------------------------------------------------------


class CorrectorParticles(NamedTuple):
    r"""Particle state at step \(t\): position, the experts' scores at \((x, s_t)\) (cached for the
    next move and weight), and the score part of the weight rate \(\rho\) at \((x, s_t)\)."""

    x: Float[Array, "N d"]
    scores: Float[Array, "N M d"]
    rate: Float[Array, " N"]


def _as_grid(times) -> Float[Array, " T"]:
    times = jnp.asarray(times, jnp.result_type(float))
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid with >= 2 levels, got shape {times.shape}")
    if not isinstance(times, jax.core.Tracer):
        if not bool(jnp.all(jnp.diff(times) < 0)) or not (
            0.0 < float(times[-1]) and float(times[0]) <= 1.0
        ):
            raise ValueError("times must be strictly decreasing within (0, 1]")
    return times


class FeynmanKacCorrector(AbstractFeynmanKac):
    r"""Reverse diffusion towards \(\pi_s \propto \prod_i (p^i_s)^{\gamma_i}\) with Feynman-Kac
    corrector weights (see the module docstring; Skreta et al. 2025).

    Fields: ``sde``; ``score_fns`` (a tuple of pytree callables ``score_fn(x [..., d], s)``, e.g.
    :class:`~models.diffusion.gaussian_mixture.DiffusedMixture` or
    :class:`~models.diffusion.digits.DigitsScore`); ``exponents`` \(\gamma\) [M]; ``times``
    (decreasing, [K+1]); ``noise_factor`` \(\lambda = h^2/g^2\) (set by the ``form`` strategy,
    :class:`TargetScore` or :class:`TemperedNoise`); ``correction`` (1: the corrector weights; 0: the uncorrected sampler with
    the same moves and unit weights; other values only for ablations); ``init_dist`` (anything with
    ``sample(key, n)``; ``None`` draws \(\mathcal N(0, I/\Gamma)\)); ``total_exponent``
    \(\Gamma\); static ``dim``. Models of one shape (dimension, number of experts, score-model
    structure) share a compiled sampler whatever their form, exponents or correction. ``num_steps =
    K + 1``. Build with :func:`annealed`, :func:`product_of_experts` or
    :func:`classifier_free_guidance`.
    """

    sde: VPSDE
    score_fns: tuple
    exponents: Float[Array, " M"]
    times: Float[Array, " T"]
    noise_factor: Float[Array, ""]
    drift_factor: Float[Array, ""]
    correction: Float[Array, ""]
    init_dist: Any
    total_exponent: Float[Array, ""]
    dim: int = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)

    def __init__(
        self,
        sde: VPSDE,
        score_fns: Sequence[Callable],
        exponents: Sequence[float] | Float[Array, " M"],
        times: Float[Array, " T"],
        dim: int,
        *,
        form: TargetScore | TemperedNoise | ScaledDrift = TargetScore(),
        correction: float | Float[Array, ""] = 1.0,
        init_dist: Any = None,
    ):
        if not isinstance(sde, VPSDE):
            raise TypeError(f"sde must be a VPSDE, got {type(sde).__name__}")
        score_fns = tuple(score_fns)
        if not score_fns or not all(callable(f) for f in score_fns):
            raise TypeError("score_fns must be a non-empty sequence of callables score_fn(x, s)")
        exponents = jnp.asarray(exponents, jnp.result_type(float))
        if exponents.shape != (len(score_fns),):
            raise ValueError(
                f"exponents must have shape [{len(score_fns)}] (one per score_fn), "
                f"got {exponents.shape}"
            )
        if isinstance(exponents, jax.core.Tracer):
            raise ValueError("exponents must be concrete (their sum fixes the noise and start law)")
        total = float(jnp.sum(exponents))
        if not math.isfinite(total) or total <= 0:
            raise ValueError(f"the exponents must sum to a finite positive number, got {total}")
        if not isinstance(form, (TargetScore, TemperedNoise, ScaledDrift)):
            raise TypeError(
                f"form must be TargetScore(), TemperedNoise() or ScaledDrift(), got {form!r}"
            )
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if init_dist is not None and not hasattr(init_dist, "sample"):
            raise TypeError("init_dist must have a sample(key, n) method (or be None)")
        self.sde = sde
        self.score_fns = score_fns
        self.exponents = exponents
        self.times = _as_grid(times)
        self.correction = jnp.asarray(correction, jnp.result_type(float))
        self.init_dist = init_dist
        self.noise_factor = jnp.asarray(form.noise_factor(total), jnp.result_type(float))
        self.drift_factor = jnp.asarray(form.drift_factor(total), jnp.result_type(float))
        self.dim = dim
        self.total_exponent = jnp.asarray(total, jnp.result_type(float))
        self.num_steps = int(self.times.shape[0])

    # ---- helpers ------------------------------------------------------------------------------
    def target_score(self, scores: Float[Array, "N M d"]) -> Float[Array, "N d"]:
        r"""\(S_\pi = \sum_i \gamma_i S_i\)."""
        return jnp.einsum("m,nmd->nd", self.exponents, scores)

    def _state(self, x, s):
        scores = jnp.stack([f(x, s) for f in self.score_fns], axis=-2)  # [N, M, d]
        target = self.target_score(scores)
        rate = 0.5 * self.sde.beta(s) * (
            jnp.sum(target**2, axis=-1)
            - jnp.einsum("m,nm->n", self.exponents, jnp.sum(scores**2, axis=-1))
            - (1.0 - self.drift_factor) * jnp.sum(x * target, axis=-1)
        )
        return CorrectorParticles(x, scores, rate)

    def _mean_std(self, particles, s, s_next):
        lam = self.noise_factor
        h = s - s_next
        b = self.sde.beta(s)
        drift = 0.5 * self.drift_factor * particles.x + 0.5 * (1.0 + lam) * self.target_score(
            particles.scores
        )
        return particles.x + h * b * drift, jnp.sqrt(lam * h * b)

    # ---- Feynman-Kac protocol -----------------------------------------------------------------
    def init(self, key: PRNGKeyArray, num_particles: int) -> CorrectorParticles:
        if self.init_dist is None:
            x = jax.random.normal(key, (num_particles, self.dim)) / jnp.sqrt(self.total_exponent)
        else:
            x = self.init_dist.sample(key, num_particles)
        return self._state(x, self.times[0])

    def move(
        self, key: PRNGKeyArray, t: Int[Array, ""], particles: CorrectorParticles
    ) -> CorrectorParticles:
        mean, std = self._mean_std(particles, self.times[t - 1], self.times[t])
        x = mean + std * jax.random.normal(key, mean.shape, mean.dtype)
        return self._state(x, self.times[t])

    def log_potential(
        self, t: Int[Array, ""], previous: CorrectorParticles | None, particles: CorrectorParticles
    ) -> Float[Array, " N"]:
        if previous is None:
            return jnp.zeros(particles.rate.shape, particles.rate.dtype)
        s_prev, s = self.times[t - 1], self.times[t]
        trapezoid = 0.5 * (s_prev - s) * (previous.rate + particles.rate)
        div_f = -(self.total_exponent - self.drift_factor) * 0.5 * self.dim * (
            self.sde.integrated_beta(s_prev) - self.sde.integrated_beta(s)
        )
        return self.correction * (trapezoid + div_f)

    def log_transition(
        self, t: Int[Array, ""], previous: CorrectorParticles, particles: CorrectorParticles
    ) -> Float[Array, " N"]:
        mean, std = self._mean_std(previous, self.times[t - 1], self.times[t])
        return (
            -0.5 * jnp.sum((particles.x - mean) ** 2, axis=-1) / std**2
            - self.dim * jnp.log(std)
            - 0.5 * self.dim * math.log(2 * math.pi)
        )


# ------------------------------------------------------------------------------------------------
# constructors
# ------------------------------------------------------------------------------------------------


def _correction(correct: bool) -> float:
    if not isinstance(correct, bool):
        raise TypeError(f"correct must be a bool, got {correct!r}")
    return 1.0 if correct else 0.0


def annealed(
    sde: VPSDE,
    score_fn: Callable,
    beta: float,
    times: Float[Array, " T"],
    dim: int,
    *,
    form: TargetScore | TemperedNoise | ScaledDrift = TargetScore(),
    correct: bool = True,
    init_dist: Any = None,
) -> FeynmanKacCorrector:
    r"""Annealing \(\pi_s \propto p_s^\beta\) (\(\beta > 0\)): weight rate
    \((\beta - 1)[\nabla\cdot f + \frac{g^2}{2} \beta \lVert \nabla \log p_s \rVert^2]\) (Skreta et al.
    2025). ``correct=False`` gives the uncorrected sampler (same moves, unit weights)."""
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite positive number, got {beta!r}")
    return FeynmanKacCorrector(
        sde, (score_fn,), [beta], times, dim, form=form, correction=_correction(correct),
        init_dist=init_dist,
    )


def product_of_experts(
    sde: VPSDE,
    score_fns: Sequence[Callable],
    times: Float[Array, " T"],
    dim: int,
    *,
    exponents: Sequence[float] | None = None,
    form: TargetScore | TemperedNoise | ScaledDrift = TargetScore(),
    correct: bool = True,
    init_dist: Any = None,
) -> FeynmanKacCorrector:
    r"""Product of experts \(\pi_s \propto \prod_i (p^i_s)^{\gamma_i}\) (default \(\gamma_i = 1\)):
    for two experts the weight rate is \(\nabla\cdot f + g^2 \langle S_1, S_2 \rangle\) (Skreta et al.
    2025). ``correct=False`` gives the uncorrected sampler (moves with \(\sum_i \gamma_i S_i\), unit
    weights)."""
    score_fns = tuple(score_fns)
    if len(score_fns) < 2:
        raise ValueError(f"a product of experts needs at least two score_fns, got {len(score_fns)}")
    if exponents is None:
        exponents = [1.0] * len(score_fns)
    return FeynmanKacCorrector(
        sde, score_fns, exponents, times, dim, form=form, correction=_correction(correct),
        init_dist=init_dist,
    )


def classifier_free_guidance(
    sde: VPSDE,
    cond_score: Callable,
    uncond_score: Callable,
    guidance: float,
    times: Float[Array, " T"],
    dim: int,
    *,
    correct: bool = True,
    init_dist: Any = None,
) -> FeynmanKacCorrector:
    r"""Classifier-free guidance as the geometric average \(\pi_s \propto p_s(x \mid c)^{1+w}
    p_s(x)^{-w}\): the move is the usual CFG reverse step with
    \((1 + w) S_c - w S_\varnothing\) and the weight rate is
    \(\frac{g^2}{2} w (1 + w) \lVert S_c - S_\varnothing \rVert^2\) (Skreta et al. 2025).
    ``correct=False`` is plain CFG sampling. Needs \(w \ge 0\)."""
    w = float(guidance)
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    return FeynmanKacCorrector(
        sde, (cond_score, uncond_score), [1.0 + w, -w], times, dim, form=TargetScore(),
        correction=_correction(correct), init_dist=init_dist,
    )


def corrected_samples(
    key: PRNGKeyArray,
    model: FeynmanKacCorrector,
    num_particles: int,
    *,
    denoise: bool = False,
    ess_threshold: float = 0.5,
) -> tuple[Float[Array, "n d"], Any]:
    r"""Run :func:`samplers.smc.smc` on ``model`` and return equally weighted samples (resampled
    once at the end) and the :class:`~samplers.smc.SMCResult`. ``denoise=True`` maps each sample to
    Tweedie's \(\hat x_0 = (x + \sigma^2 S_\pi / \Gamma) / \alpha\) at the last level (for images,
    with \(S_\pi / \Gamma\) the score of the normalised geometric average's first-order
    approximation)."""
    from samplers.smc import smc

    if not isinstance(model, FeynmanKacCorrector):
        raise TypeError(f"model must be a FeynmanKacCorrector, got {type(model).__name__}")
    res = smc(key, model, num_particles, ess_threshold=ess_threshold, resample_final=True)
    x = res.particles.x
    if denoise:
        s = model.times[-1]
        score = model.target_score(res.particles.scores) / model.total_exponent
        x = model.sde.denoise(x, score, s)
    return x, res


# ------------------------------------------------------------------------------------------------
# exact reference: the product of two Gaussian mixtures
# ------------------------------------------------------------------------------------------------


def mixture_product(
    p: GaussianMixture, q: GaussianMixture
) -> tuple[GaussianMixture, Float[Array, ""]]:
    r"""\(p(x) q(x) = Z\, r(x)\) in closed form: components \((j, k)\) with
    \(\Sigma = (\Sigma_j^{-1} + \Sigma_k^{-1})^{-1}\), \(\mu = \Sigma(\Sigma_j^{-1}\mu_j +
    \Sigma_k^{-1}\mu_k)\) and weights \(\propto w_j v_k \mathcal N(\mu_j; \mu_k, \Sigma_j +
    \Sigma_k)\), whose sum is \(Z = \int p q\). Returns ``(r, log Z)``."""
    if p.dim != q.dim:
        raise ValueError(f"the mixtures must have the same dimension, got {p.dim} and {q.dim}")
    d = p.dim
    prec_p = jnp.linalg.inv(p.covariances)  # [J, d, d]
    prec_q = jnp.linalg.inv(q.covariances)  # [K, d, d]
    prec = prec_p[:, None] + prec_q[None, :]  # [J, K, d, d]
    cov = jnp.linalg.inv(prec)
    lin = jnp.einsum("jab,jb->ja", prec_p, p.means)[:, None] + jnp.einsum(
        "kab,kb->ka", prec_q, q.means
    )[None, :]
    mean = jnp.einsum("jkab,jkb->jka", cov, lin)
    s = p.covariances[:, None] + q.covariances[None, :]
    diff = p.means[:, None] - q.means[None, :]
    sol = jnp.linalg.solve(s, diff[..., None])[..., 0]
    _, logdet = jnp.linalg.slogdet(s)
    log_c = -0.5 * (jnp.sum(diff * sol, -1) + logdet + d * math.log(2 * math.pi))
    log_w = p.log_weights[:, None] + q.log_weights[None, :] + log_c
    mixture = GaussianMixture.from_log_weights(
        log_w.reshape(-1), mean.reshape(-1, d), cov.reshape(-1, d, d)
    )
    return mixture, jax.nn.logsumexp(log_w)
