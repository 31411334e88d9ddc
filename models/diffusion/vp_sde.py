"""The variance-preserving (VP) SDE and its reverse-time Euler–Maruyama discretisation.

Forward, for s ∈ [0, 1] with a linear schedule β(s) = β_min + s (β_max − β_min):

    dx = −½ β(s) x ds + √β(s) dW,    x_s | x_0 ~ N(α_s x_0, σ_s² I),
    α_s = exp(−½ B(s)),  σ_s² = 1 − α_s²,  B(s) = ∫_0^s β = β_min s + ½ (β_max − β_min) s².

Reverse (Anderson 1982), integrated from s = 1 down to s = ε:

    dx = [−½ β(s) x − β(s) ∇ log p_s(x)] ds + √β(s) dW̄.

One Euler–Maruyama step from s to s' < s (h = s − s') is the Gaussian kernel

    x' ~ N(x + h β(s) [½ x + score(x, s)], h β(s) I).

It is *biased*: the law of the chain at s_K = ε differs from p_ε by O(max step) even with the exact
score and an exact start. Defaults β_min = 0.1, β_max = 20 follow Song et al. (2021), "Score-based
generative modeling through stochastic differential equations", ICLR.
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["VPSDE", "ScoreFn"]

ScoreFn = Callable[[Float[Array, "... d"], Float[Array, ""]], Float[Array, "... d"]]
"""A score model: ``score_fn(x [..., d], s) -> ∇ log p_s(x) [..., d]`` (batched over x)."""


class VPSDE(eqx.Module):
    """VP SDE with a linear β schedule on s ∈ [0, 1]."""

    beta_min: float = eqx.field(static=True, default=0.1)
    beta_max: float = eqx.field(static=True, default=20.0)

    def __check_init__(self):
        if not (0 < self.beta_min <= self.beta_max):
            raise ValueError(
                f"need 0 < beta_min <= beta_max, got {self.beta_min!r}, {self.beta_max!r}"
            )

    # ---- schedule -----------------------------------------------------------------------------
    def beta(self, s: Float[Array, "..."]) -> Float[Array, "..."]:
        return self.beta_min + s * (self.beta_max - self.beta_min)

    def integrated_beta(self, s: Float[Array, "..."]) -> Float[Array, "..."]:
        """B(s) = ∫_0^s β(u) du."""
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def alpha(self, s: Float[Array, "..."]) -> Float[Array, "..."]:
        """Signal scale α_s = exp(−B(s)/2)."""
        return jnp.exp(-0.5 * self.integrated_beta(s))

    def sigma(self, s: Float[Array, "..."]) -> Float[Array, "..."]:
        """Noise scale σ_s = √(1 − α_s²) (computed as √(−expm1(−B)) for small s)."""
        return jnp.sqrt(-jnp.expm1(-self.integrated_beta(s)))

    def time_grid(self, num_levels: int, eps: float = 1e-3) -> Float[Array, " K+1"]:
        """Uniform noise levels s_0 = 1 > s_1 > ... > s_K = ε (K = ``num_levels`` steps)."""
        if not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
        return jnp.linspace(1.0, eps, num_levels + 1)

    # ---- reverse-time kernel ------------------------------------------------------------------
    def reverse_mean_std(
        self,
        x: Float[Array, "... d"],
        score: Float[Array, "... d"],
        s: Float[Array, ""],
        s_next: Float[Array, ""],
    ) -> tuple[Float[Array, "... d"], Float[Array, ""]]:
        """Mean and std of one Euler–Maruyama step s → s_next < s given the score at (x, s)."""
        h = s - s_next
        b = self.beta(s)
        return x + h * b * (0.5 * x + score), jnp.sqrt(h * b)

    def reverse_step(
        self,
        key: PRNGKeyArray,
        score_fn: ScoreFn,
        x: Float[Array, "... d"],
        s: Float[Array, ""],
        s_next: Float[Array, ""],
    ) -> Float[Array, "... d"]:
        """x' = x + h β(s) [½ x + score_fn(x, s)] + √(h β(s)) z, z ~ N(0, I)."""
        mean, std = self.reverse_mean_std(x, score_fn(x, s), s, s_next)
        return mean + std * jax.random.normal(key, mean.shape, mean.dtype)

    def reverse_log_transition(
        self,
        x_prev: Float[Array, "... d"],
        score_prev: Float[Array, "... d"],
        x: Float[Array, "... d"],
        s: Float[Array, ""],
        s_next: Float[Array, ""],
    ) -> Float[Array, "..."]:
        """log N(x; mean, std² I) of the Euler–Maruyama kernel (for ancestor/backward sampling)."""
        mean, std = self.reverse_mean_std(x_prev, score_prev, s, s_next)
        d = x.shape[-1]
        return (
            -0.5 * jnp.sum((x - mean) ** 2, axis=-1) / std**2
            - d * jnp.log(std)
            - 0.5 * d * math.log(2 * math.pi)
        )

    def denoise(
        self, x: Float[Array, "... d"], score: Float[Array, "... d"], s: Float[Array, ""]
    ) -> Float[Array, "... d"]:
        """Tweedie's formula E[x_0 | x_s = x] = (x + σ_s² ∇ log p_s(x)) / α_s."""
        return (x + self.sigma(s) ** 2 * score) / self.alpha(s)

    def sample_reverse(
        self,
        key: PRNGKeyArray,
        score_fn: ScoreFn,
        x_init: Float[Array, "n d"],
        times: Float[Array, " K+1"],
    ) -> Float[Array, "n d"]:
        """Run the Euler–Maruyama chain from ``x_init`` at ``times[0]`` down to ``times[-1]``."""
        times = jnp.asarray(times)
        keys = jax.random.split(key, times.shape[0] - 1)

        def body(x, inp):
            k, s, s_next = inp
            return self.reverse_step(k, score_fn, x, s, s_next), None

        x, _ = jax.lax.scan(body, x_init, (keys, times[:-1], times[1:]))
        return x
