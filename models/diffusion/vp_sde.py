r"""The variance-preserving (VP) SDE and its reverse-time Euler–Maruyama discretisation.

Forward, for \(s \in [0, 1]\) with a linear schedule
\(\beta(s) = \beta_{\min} + s (\beta_{\max} - \beta_{\min})\):

\[
\begin{gathered}
dx = -\tfrac12 \beta(s)\, x\, ds + \sqrt{\beta(s)}\, dW, \qquad
x_s \mid x_0 \sim \mathcal{N}(\alpha_s x_0, \sigma_s^2 I), \\
\alpha_s = \exp\big(-\tfrac12 B(s)\big), \quad \sigma_s^2 = 1 - \alpha_s^2, \quad
B(s) = \int_0^s \beta = \beta_{\min} s + \tfrac12 (\beta_{\max} - \beta_{\min}) s^2.
\end{gathered}
\]

Reverse (Anderson 1982), integrated from \(s = 1\) down to \(s = \varepsilon\):

\[
dx = \big[-\tfrac12 \beta(s)\, x - \beta(s) \nabla \log p_s(x)\big]\, ds + \sqrt{\beta(s)}\, d\bar W.
\]

One Euler–Maruyama step from \(s\) to \(s' < s\) (\(h = s - s'\)) is the Gaussian kernel

\[
x' \sim \mathcal{N}\big(x + h \beta(s) [\tfrac12 x + \mathrm{score}(x, s)],\ h \beta(s) I\big).
\]

It is *biased*: the law of the chain at \(s_K = \varepsilon\) differs from \(p_\varepsilon\) by
\(O(\text{max step})\) even with the exact score and an exact start. Defaults
\(\beta_{\min} = 0.1\), \(\beta_{\max} = 20\) follow Song et al. (2021), "Score-based
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
    r"""VP SDE with a linear \(\beta\) schedule on \(s \in [0, 1]\)."""

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
        r"""\(B(s) = \int_0^s \beta(u)\, du\)."""
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def alpha(self, s: Float[Array, "..."]) -> Float[Array, "..."]:
        r"""Signal scale \(\alpha_s = \exp(-B(s)/2)\)."""
        return jnp.exp(-0.5 * self.integrated_beta(s))

    def sigma(self, s: Float[Array, "..."]) -> Float[Array, "..."]:
        r"""Noise scale \(\sigma_s = \sqrt{1 - \alpha_s^2}\) (computed as \(\sqrt{-\mathrm{expm1}(-B)}\) for
        small \(s\))."""
        return jnp.sqrt(-jnp.expm1(-self.integrated_beta(s)))

    def time_grid(self, num_levels: int, eps: float = 1e-3) -> Float[Array, " K+1"]:
        r"""Uniform noise levels \(s_0 = 1 > s_1 > \dots > s_K = \varepsilon\) (\(K\) = ``num_levels``
        steps)."""
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
        r"""Mean and std of one Euler–Maruyama step \(s \to s_{\mathrm{next}} < s\) given the score at
        \((x, s)\)."""
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
        r"""\(x' = x + h \beta(s) [\frac12 x + \mathrm{score\_fn}(x, s)] + \sqrt{h \beta(s)}\, z\),
        \(z \sim \mathcal{N}(0, I)\)."""
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
        r"""\(\log \mathcal{N}(x; \mathrm{mean}, \mathrm{std}^2 I)\) of the Euler–Maruyama kernel (for
        ancestor/backward sampling)."""
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
        r"""Tweedie's formula
        \(\mathbb{E}[x_0 \mid x_s = x] = (x + \sigma_s^2 \nabla \log p_s(x)) / \alpha_s\)."""
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
