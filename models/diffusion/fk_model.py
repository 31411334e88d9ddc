r"""Reward-tilted reverse diffusion as a Feynman-Kac model.

Particles move down a grid of noise levels \(s_0 = 1 > s_1 > \dots > s_K = \varepsilon\) by the
reverse-SDE Euler–Maruyama kernel \(M_t(x_{t-1}, \cdot)\) of :class:`~models.diffusion.vp_sde.VPSDE`
driven by the score of the *untilted* model; the potentials steer them towards the tilted target
\(p_\varepsilon(x) \exp(\lambda r(x))\):

\[
\log G_0 = \lambda \rho_0(x_0), \qquad
\log G_t = \lambda\big(\rho_t(x_t) - \rho_{t-1}(x_{t-1})\big) \quad (t = 1, \dots, K),
\]

where \(\rho_t\) is the reward at a "look-ahead" point, chosen by ``potential``:

- ``"tweedie"`` (default): \(\rho_t = r(\hat x_t)\) with the denoised
  \(\hat x_t = \mathbb{E}[x_0 \mid x_t] = (x_t + \sigma^2\, \mathrm{score}) / \alpha\) (a twisted /
  look-ahead reward, cf. Wu et al. 2023 "TDS", Skreta et al. 2025 "Feynman-Kac correctors"), except
  \(\rho_K = r(x_K)\);
- ``"state"``: \(\rho_t = r(x_t)\) (intermediate tilt at the noisy state);
- ``"final"``: \(\rho_t = 0\) for \(t < K\) and \(\rho_K = r(x_K)\) (plain importance sampling at
  the end).

**Exact target.** In all three cases \(\prod_t G_t = \exp(\lambda r(x_K))\) telescopes *pathwise*,
so for any grid the FK model's final law is exactly

\[
\pi_K(x) = q_K(x) \exp(\lambda r(x)) / Z, \qquad Z = \mathbb{E}_{q_K}[\exp(\lambda r(x_K))],
\]

where \(q_K\) is the law of \(x_K\) under the *discretised* untilted chain (start law, then \(K\)
Euler–Maruyama steps with the given score). SMC estimates \(\pi_K\) and \(Z\) without bias in \(Z\)
(Del Moral 2004); the choice of \(\rho\) only changes the variance. Because Euler–Maruyama is
biased, \(q_K \ne p_\varepsilon\); only as the grid is refined (and with the exact score and start
\(p_1\)) does \(\pi_K \to p_\varepsilon(x) \exp(\lambda r(x)) / Z_\varepsilon\), which for a
Gaussian-mixture \(p\) and linear \(r\) is the exact mixture of :func:`exact_tilted_target`. The
untilted chain itself is available as :meth:`RewardTiltedDiffusion.sample_untilted`, so \(\pi_K\)
can be checked by importance-reweighting its samples by \(\exp(\lambda r)\), which shares the
discretisation. The bias is \(O(1/K)\) on the default uniform grid: for the 2-d, 3-component test
mixture with \(\lambda = 1.5\), \(\log Z_K - \log Z_\varepsilon\) was measured as 0.045, 0.023,
0.014, 0.009 for \(K\) = 50, 100, 200, 400 (and \(\approx 0.24\) for \(K = 10\)).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from models.diffusion.gaussian_mixture import DiffusedMixture, GaussianMixture
from models.diffusion.tilted import tilt, tilt_log_normaliser
from models.diffusion.vp_sde import VPSDE
from ppl.feynman_kac import AbstractFeynmanKac

__all__ = [
    "LinearReward",
    "DiffusionParticles",
    "RewardTiltedDiffusion",
    "tilted_gmm_diffusion",
    "exact_tilted_target",
    "exact_log_normaliser",
    "POTENTIALS",
]

POTENTIALS = ("tweedie", "state", "final")


class LinearReward(eqx.Module):
    r"""\(r(x) = a^\top x\) (batched over leading axes)."""

    direction: Float[Array, " d"]

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "..."]:
        return x @ self.direction


class DiffusionParticles(NamedTuple):
    r"""Particle state at step \(t\): position, cached score at \((x, s_t)\), and \(\rho_t\) (see module
    doc)."""

    x: Float[Array, "N d"]
    score: Float[Array, "N d"]
    reward: Float[Array, " N"]


class RewardTiltedDiffusion(AbstractFeynmanKac):
    r"""Reverse VP diffusion tilted by \(\exp(\lambda r(x))\) at the end; ``num_steps = K + 1`` (\(t = 0\) is
    \(s_0\)).

    Fields: ``sde``; ``score_fn(x [..., d], s)`` (a pytree callable, e.g. a
    :class:`~models.diffusion.gaussian_mixture.DiffusedMixture` or a network);
    ``reward(x [..., d])`` (a pytree callable, e.g. :class:`LinearReward`); ``lam``;
    ``times`` (decreasing, [K+1]); ``init_dist`` (anything with ``sample(key, n)``, e.g. the exact
    marginal \(p_1\); ``None`` draws \(\mathcal{N}(0, I)\)); static ``dim`` and ``potential`` (one of
    :data:`POTENTIALS`). One score evaluation per particle per step: the score at the new state is cached in
    the particle and reused by the next move and by the Tweedie look-ahead.
    """

    sde: VPSDE
    score_fn: Any
    reward: Any
    lam: Float[Array, ""]
    times: Float[Array, " T"]
    init_dist: Any
    dim: int = eqx.field(static=True)
    potential: str = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)

    def __init__(
        self,
        sde: VPSDE,
        score_fn: Callable,
        reward: Callable,
        lam: float | Float[Array, ""],
        times: Float[Array, " T"],
        dim: int,
        *,
        init_dist: Any = None,
        potential: str = "tweedie",
    ):
        if potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
        if not callable(score_fn) or not callable(reward):
            raise TypeError("score_fn and reward must be callable")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        times = jnp.asarray(times, jnp.result_type(float))
        if times.ndim != 1 or times.shape[0] < 2:
            raise ValueError(f"times must be a 1-D grid with >= 2 levels, got shape {times.shape}")
        if not isinstance(times, jax.core.Tracer):
            if not bool(jnp.all(jnp.diff(times) < 0)) or not (
                0.0 < float(times[-1]) and float(times[0]) <= 1.0
            ):
                raise ValueError("times must be strictly decreasing within (0, 1]")
        if init_dist is not None and not hasattr(init_dist, "sample"):
            raise TypeError("init_dist must have a sample(key, n) method (or be None)")
        self.sde = sde
        self.score_fn = score_fn
        self.reward = reward
        self.lam = jnp.asarray(lam, jnp.result_type(float))
        self.times = times
        self.init_dist = init_dist
        self.dim = dim
        self.potential = potential
        self.num_steps = int(times.shape[0])

    # ---- helpers ------------------------------------------------------------------------------
    def _rho(self, t, x, score):
        r"""Look-ahead reward \(\rho_t\) at step \(t\) (\(\rho_K = r(x_K)\) in every variant)."""
        last = t == self.num_steps - 1
        if self.potential == "tweedie":
            x_hat = self.sde.denoise(x, score, self.times[t])
            return jnp.where(last, self.reward(x), self.reward(x_hat))
        if self.potential == "state":
            return self.reward(x)
        return jnp.where(last, self.reward(x), jnp.zeros(x.shape[:-1], x.dtype))

    def _particles(self, t, x):
        score = self.score_fn(x, self.times[t])
        return DiffusionParticles(x, score, self._rho(t, x, score))

    # ---- Feynman-Kac protocol -----------------------------------------------------------------
    def init(self, key: PRNGKeyArray, num_particles: int) -> DiffusionParticles:
        if self.init_dist is None:
            x = jax.random.normal(key, (num_particles, self.dim))
        else:
            x = self.init_dist.sample(key, num_particles)
        return self._particles(jnp.asarray(0, jnp.int32), x)

    def move(
        self, key: PRNGKeyArray, t: Int[Array, ""], particles: DiffusionParticles
    ) -> DiffusionParticles:
        mean, std = self.sde.reverse_mean_std(
            particles.x, particles.score, self.times[t - 1], self.times[t]
        )
        x = mean + std * jax.random.normal(key, mean.shape, mean.dtype)
        return self._particles(t, x)

    def log_potential(
        self, t: Int[Array, ""], previous: DiffusionParticles | None, particles: DiffusionParticles
    ) -> Float[Array, " N"]:
        if previous is None:
            return self.lam * particles.reward
        return self.lam * (particles.reward - previous.reward)

    def log_transition(
        self, t: Int[Array, ""], previous: DiffusionParticles, particles: DiffusionParticles
    ) -> Float[Array, " N"]:
        return self.sde.reverse_log_transition(
            previous.x, previous.score, particles.x, self.times[t - 1], self.times[t]
        )

    # ---- the untilted discretised sampler (for references) ------------------------------------
    def sample_untilted(self, key: PRNGKeyArray, num_samples: int) -> Float[Array, "n d"]:
        r"""\(x_K \sim q_K\): the same start law and Euler–Maruyama chain, without potentials.

        Runs :meth:`VPSDE.sample_reverse` (score evaluated afresh at every step), a code path
        separate from :meth:`move`'s cached score, so references built from it check ``move``.
        """
        k_init, k_chain = jax.random.split(key)
        if self.init_dist is None:
            x0 = jax.random.normal(k_init, (num_samples, self.dim))
        else:
            x0 = self.init_dist.sample(k_init, num_samples)
        return self.sde.sample_reverse(k_chain, self.score_fn, x0, self.times)


def tilted_gmm_diffusion(
    data: GaussianMixture,
    direction: Float[Array, " d"],
    lam: float | Float[Array, ""],
    *,
    num_levels: int = 100,
    eps: float = 1e-3,
    sde: VPSDE | None = None,
    potential: str = "tweedie",
    exact_init: bool = True,
) -> RewardTiltedDiffusion:
    r"""Reward-tilted diffusion for Gaussian-mixture data with the exact score and \(r(x) = a^\top x\).

    ``exact_init=True`` starts from the exact noised marginal \(p_1\) (a mixture), so the only error
    relative to :func:`exact_tilted_target` is the Euler–Maruyama discretisation; ``False`` starts
    from \(\mathcal{N}(0, I)\) as a learned model would (\(\alpha_1 \approx 0.0066\) for the default
    schedule).
    """
    sde = VPSDE() if sde is None else sde
    direction = jnp.asarray(direction, jnp.result_type(float))
    if direction.shape != (data.dim,):
        raise ValueError(f"direction must have shape [{data.dim}], got {direction.shape}")
    times = sde.time_grid(num_levels, eps)
    score = DiffusedMixture(data, sde)
    return RewardTiltedDiffusion(
        sde,
        score,
        LinearReward(direction),
        lam,
        times,
        data.dim,
        init_dist=score.marginal(times[0]) if exact_init else None,
        potential=potential,
    )


def _gmm_parts(model: RewardTiltedDiffusion):
    if not (isinstance(model.score_fn, DiffusedMixture) and isinstance(model.reward, LinearReward)):
        raise TypeError(
            "the exact answer needs a DiffusedMixture score and a LinearReward "
            "(build the model with tilted_gmm_diffusion)"
        )
    p_eps = model.score_fn.marginal(model.times[-1])
    return p_eps, model.reward.direction


def exact_tilted_target(model: RewardTiltedDiffusion) -> GaussianMixture:
    r"""The fine-discretisation limit of the FK target:
    \(p_\varepsilon(x) \exp(\lambda a^\top x) / Z_\varepsilon\) (a mixture)."""
    p_eps, a = _gmm_parts(model)
    return tilt(p_eps, a, model.lam)


def exact_log_normaliser(model: RewardTiltedDiffusion) -> Float[Array, ""]:
    r"""\(\log Z_\varepsilon = \log \mathbb{E}_{p_\varepsilon}[\exp(\lambda a^\top x)]\), the limit of the FK
    model's \(\log Z\)."""
    p_eps, a = _gmm_parts(model)
    return tilt_log_normaliser(p_eps, a, model.lam)
