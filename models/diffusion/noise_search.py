r"""Noise search for diffusion models: random search, zero-order search and search over paths.

Ma et al. (2025), "Inference-time scaling for diffusion models beyond scaling denoising steps"
(arXiv:2501.09732), §3: spend inference compute on *searching the sampler's noise* under a
verifier instead of on more denoising steps. A diffusion sampler is a map from noise to data,
\(x_0 = \Phi(\xi)\) (deterministic for the DDIM/ODE sampler); a verifier (reward) \(r\) scores
samples, and the search looks for noise with a high \(r(\Phi(\xi))\).

**Sampler.** The VP schedule \(x_s = \alpha_s x_0 + \sigma_s \varepsilon\) on the uniform grid
\(1 = s_0 > s_1 > \dots > s_K = \epsilon\) of :meth:`~models.diffusion.vp_sde.VPSDE.time_grid`; a
reverse kernel (:class:`~models.diffusion.digits.DDIM` or
:class:`~models.diffusion.digits.EulerMaruyama`) steps \(s_k \to s_{k+1}\) given the noise prediction
\(\hat\varepsilon(x, s)\); the final sample is Tweedie's estimate at \(s_K\),
\(x_0 = (x_{s_K} - \sigma_{s_K} \hat\varepsilon) / \alpha_{s_K}\). One generation from noise costs
\(K + 1\) network evaluations. The noise prediction comes from a *denoiser* adapter:
:class:`DigitsDenoiser` (the digits network for a label, optionally with classifier-free guidance, 2
evaluations per call) or :class:`ScoreDenoiser` (any score function, e.g. the exact score of a Gaussian
mixture, \(\hat\varepsilon = -\sigma_s \nabla \log p_s\)).

**Verifier.** Any reward ``reward(x [n, d]) -> [n]`` (jittable; e.g.
:class:`~models.diffusion.verifiers.ClassLogProb`), applied to final samples \(x_0\) or to Tweedie
estimates \(\hat x_0\) at an intermediate level (search over paths). Larger is better;
non-finite scores count as \(-\infty\) and are reported (``nonfinite``).

**(a) Random search** (best-of-\(N\)): \(\xi_1, \dots, \xi_N \sim \mathcal{N}(0, I)\) iid,
return \(\Phi(\xi_{i^*})\), \(i^* = \arg\max_i r(\Phi(\xi_i))\). NFE \(= N (K + 1)\).

**(b) Zero-order search**: a pivot \(p_0 \sim \mathcal{N}(0, I)\); in round \(t = 1..T\), \(N\)
neighbours on the pivot's sphere at cosine similarity \(c\),

\[
y_i = \lVert p \rVert \big( c\, u + \sqrt{1 - c^2}\, v_i \big), \qquad u = p / \lVert p \rVert, \qquad
v_i = \frac{z_i - (z_i^\top u) u}{\lVert z_i - (z_i^\top u) u \rVert}, \quad z_i \sim \mathcal{N}(0, I),
\]

so that \(\lVert y_i \rVert = \lVert p \rVert\) and \(\cos(y_i, p) = c\) exactly (:func:`sphere_neighbours`;
Ma et al. define the neighbourhood by a distance \(\lambda\), here \(\lVert y - p \rVert =
\lVert p \rVert \sqrt{2 (1 - c)}\)); the best neighbour becomes the pivot (``elitist=True``: only if it
beats the pivot). The best sample seen is returned. NFE \(= (1 + T N) (K + 1)\).

**(c) Search over paths**: \(N\) noises are denoised to level \(k_0\) (``start_step``); each round, every
beam member gets \(M\) children re-noised by the forward process from \(s_k\) up to \(s_{k - \Delta_f}\),

\[
x_{s'} = \frac{\alpha_{s'}}{\alpha_s} x_s + \sqrt{\sigma_{s'}^2 - \frac{\alpha_{s'}^2}{\alpha_s^2} \sigma_s^2}\; z,
\qquad z \sim \mathcal{N}(0, I),
\]

(:func:`renoise`), which are denoised \(\Delta_b > \Delta_f\) steps to \(s_{k - \Delta_f + \Delta_b}\) and scored on Tweedie's
\(\hat x_0\) there (one evaluation each); the top \(N\) of the \(N M\) children form the next beam.
After \(R = (K - k_0) / (\Delta_b - \Delta_f)\) rounds the beam is at \(s_K\), where \(\hat x_0\) is the
final sample, and the best child is returned. NFE \(= N k_0 + R N M (\Delta_b + 1)\).

**Compute.** Every count is in per-sample network evaluations (NFE, as in Ma et al.): a call on a
batch of \(n\) states costs \(n\) (\(2n\) with guidance). ``nfe_search`` counts every evaluation of the
search (the returned candidate's own generation included); ``nfe_final`` the optional regeneration
of the chosen noise with ``final_steps`` steps (random and zero-order search; 0 without it); the total
is their sum. The counts are exact formulas, checked against counted runs in the tests.

Each search is one compiled program (compiled once per configuration: sizes, steps, kernel type;
the network, labels and the reward's arrays are traced arguments, so another target class or another
set of weights reuses it), with the \(N\) candidates of a round in one batched network call.
"""

from __future__ import annotations

import warnings

from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from models.diffusion.digits import DDIM, NULL_CLASS, DigitsDiffusion, EulerMaruyama
from models.diffusion.vp_sde import VPSDE

__all__ = [
    "DigitsDenoiser",
    "ScoreDenoiser",
    "NoiseSearchResult",
    "sphere_neighbours",
    "renoise",
    "generate",
    "random_search",
    "zero_order_search",
    "path_search",
    "random_search_nfe",
    "zero_order_search_nfe",
    "path_search_nfe",
]

Reward = Callable[[Float[Array, "n d"]], Float[Array, " n"]]
"""A verifier: ``reward(x [n, d]) -> [n]``, larger is better (jittable)."""


# ------------------------------------------------------------------------------------------------
# denoisers: the noise prediction eps(x, s) of a model
# ------------------------------------------------------------------------------------------------


class DigitsDenoiser(eqx.Module):
    r"""The digits network as a denoiser: \(\hat\varepsilon(x, s) = \varepsilon_\theta(x, s, c)\), or
    with guidance \(w\) the CFG combination \((1 + w)\varepsilon_\theta(x, s, c) - w\,\varepsilon_\theta(x, s, \varnothing)\)
    (2 network evaluations per state). ``label``: a class \(0..9\) or
    :data:`~models.diffusion.digits.NULL_CLASS` (unconditional); it is a traced array, so searches for
    different labels share one compilation."""

    model: DigitsDiffusion
    label: Int[Array, ""]
    guidance: Float[Array, ""] | None = None

    def __init__(
        self,
        model: DigitsDiffusion,
        label: int | Int[Array, ""] = NULL_CLASS,
        guidance: float | Float[Array, ""] | None = None,
    ):
        if not isinstance(model, DigitsDiffusion):
            raise TypeError(f"model must be a DigitsDiffusion, got {type(model).__name__}")
        lab = jnp.asarray(label)
        if lab.ndim != 0 or not jnp.issubdtype(lab.dtype, jnp.integer):
            raise ValueError(f"label must be one int, got {label!r}")
        if not isinstance(lab, jax.core.Tracer) and not 0 <= int(lab) <= NULL_CLASS:
            raise ValueError(f"label must lie in 0..{NULL_CLASS} ({NULL_CLASS} = unconditional)")
        self.model = model
        self.label = lab.astype(jnp.int32)
        self.guidance = None if guidance is None else jnp.asarray(guidance, jnp.float32)

    @property
    def sde(self) -> VPSDE:
        return self.model.sde

    @property
    def dim(self) -> int:
        return self.model.net.inp.in_features

    @property
    def nfe_per_call(self) -> int:
        return 1 if self.guidance is None else 2

    def __call__(self, x: Float[Array, "n d"], s: Float[Array, ""]) -> Float[Array, "n d"]:
        return self.model.guided_eps(x, s, self.label, self.guidance)


class ScoreDenoiser(eqx.Module):
    r"""A score function as a denoiser: \(\hat\varepsilon(x, s) = -\sigma_s\, \mathrm{score\_fn}(x, s)\)
    (one evaluation per state). E.g. ``ScoreDenoiser(DiffusedMixture(gmm, sde), sde, gmm.dim)``: the exact
    score of a Gaussian mixture, for which the DDIM sampler is a deterministic map of the noise."""

    score_fn: Callable
    sde: VPSDE
    dim: int = eqx.field(static=True)

    def __check_init__(self):
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError(f"dim must be an int >= 1, got {self.dim!r}")
        if not callable(self.score_fn):
            raise TypeError("score_fn must be callable: score_fn(x [n, d], s) -> [n, d]")

    @property
    def nfe_per_call(self) -> int:
        return 1

    def __call__(self, x: Float[Array, "n d"], s: Float[Array, ""]) -> Float[Array, "n d"]:
        return -self.sde.sigma(s) * self.score_fn(x, s)


Denoiser = DigitsDenoiser | ScoreDenoiser


# ------------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------------


class NoiseSearchResult(NamedTuple):
    r"""Result of one noise search.

    Attributes:
        sample: [d] the returned sample \(x_0\) (the best candidate, or its regeneration with
            ``final_steps``).
        score: [] its reward.
        noise: [d] the starting noise \(\xi\) of the returned sample (for search over paths: the
            initial noise of its path's root).
        samples: the candidates the method reports — random search: all \(N\) final samples
            [N, d]; zero-order search: the pivot's sample after each round [T + 1, d] (row 0: the
            initial pivot); search over paths: the last round's \(N M\) children [N M, d].
        scores: their rewards, [N], [T + 1] or [N M].
        noises: the starting noises of ``samples`` (for search over paths: of their roots), same
            leading size.
        history: per-round best score — random search: [1] (the best score); zero-order: the best
            score seen after each round [T + 1]; paths: the beam's best score after each round [R].
        nonfinite: [] number of candidate scores that were NaN or infinite (treated as \(-\infty\)).
        nfe_search: network evaluations of the search (the returned candidate's generation included).
        nfe_final: network evaluations of the final regeneration (0 without ``final_steps``).
    """

    sample: Float[Array, " d"]
    score: Float[Array, ""]
    noise: Float[Array, " d"]
    samples: Float[Array, "m d"]
    scores: Float[Array, " m"]
    noises: Float[Array, "m d"]
    history: Float[Array, " h"]
    nonfinite: Int[Array, ""]
    nfe_search: int
    nfe_final: int

    @property
    def nfe(self) -> int:
        """All network evaluations, ``nfe_search + nfe_final``."""
        return self.nfe_search + self.nfe_final


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------


def sphere_neighbours(
    key: PRNGKeyArray, pivot: Float[Array, " d"], num: int, cosine: float | Float[Array, ""]
) -> Float[Array, "num d"]:
    r"""``num`` random points \(y\) with \(\lVert y \rVert = \lVert p \rVert\) and
    \(\cos(y, p) = c\) exactly: \(y = \lVert p \rVert (c u + \sqrt{1 - c^2} v)\), \(u = p / \lVert p
    \rVert\), \(v\) a uniformly random unit vector orthogonal to \(u\) (a Gaussian projected off
    \(u\) and normalised). Needs \(d \ge 2\) and \(-1 < c < 1\) (checked at the public search
    functions)."""
    p = jnp.asarray(pivot)
    norm = jnp.linalg.norm(p)
    u = p / norm
    z = jax.random.normal(key, (num, p.shape[-1]), p.dtype)
    v = z - (z @ u)[:, None] * u
    v = v - (v @ u)[:, None] * u  # twice (Gram-Schmidt): float32 cancellation when z is near u
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    return norm * (cosine * u + jnp.sqrt(1.0 - cosine**2) * v)


def renoise(
    key: PRNGKeyArray,
    sde: VPSDE,
    x: Float[Array, "n d"],
    s: Float[Array, ""],
    s_next: Float[Array, ""],
) -> Float[Array, "n d"]:
    r"""The forward process from level \(s\) up to \(s' \ge s\):
    \(x' = (\alpha_{s'}/\alpha_s) x + \sqrt{\sigma_{s'}^2 - (\alpha_{s'}/\alpha_s)^2 \sigma_s^2}\, z\);
    if \(x \sim p_s\) then \(x' \sim p_{s'}\)."""
    ratio = sde.alpha(s_next) / sde.alpha(s)
    var = jnp.clip(sde.sigma(s_next) ** 2 - ratio**2 * sde.sigma(s) ** 2, 0.0)
    return ratio * x + jnp.sqrt(var) * jax.random.normal(key, x.shape, x.dtype)


def _chain(key, denoiser, kernel, x, times):
    """Reverse steps from times[0] down to times[-1] (times.shape[0] - 1 network calls)."""
    m = times.shape[0] - 1
    if m == 0:
        return x
    keys = jax.random.split(key, m)

    def body(x, inp):
        k, s, s_next = inp
        mean, std = kernel.mean_std(denoiser.sde, x, denoiser(x, s), s, s_next)
        return mean + std * jax.random.normal(k, mean.shape, mean.dtype), None

    x, _ = jax.lax.scan(body, x, (keys, times[:-1], times[1:]))
    return x


def _tweedie(denoiser, x, s):
    return (x - denoiser.sde.sigma(s) * denoiser(x, s)) / denoiser.sde.alpha(s)


def _generate(key, denoiser, kernel, noise, times):
    return _tweedie(denoiser, _chain(key, denoiser, kernel, noise, times), times[-1])


def _score(reward, x):
    r = jnp.asarray(reward(x))
    if r.shape != x.shape[:1]:
        raise ValueError(f"reward must map x [n, d] to scores [n]; got shape {r.shape} for x {x.shape}")
    ok = jnp.isfinite(r)
    return jnp.where(ok, r, -jnp.inf), jnp.sum(~ok)


def generate(
    key: PRNGKeyArray,
    denoiser: Denoiser,
    noise: Float[Array, "n d"],
    *,
    kernel: DDIM | EulerMaruyama = DDIM(),
    num_steps: int = 30,
    eps: float = 1e-3,
) -> Float[Array, "n d"]:
    r"""The sampler \(\Phi\): ``num_steps`` reverse steps from ``noise`` at \(s = 1\), then Tweedie's
    \(\hat x_0\) at \(s = \epsilon\) (\(K + 1\) evaluations per row; deterministic for ``DDIM()``).
    The same map the searches use (same key use: one key split over the steps)."""
    _check_common(denoiser, kernel, num_steps, eps)
    noise = jnp.asarray(noise)
    if noise.ndim != 2 or noise.shape[1] != denoiser.dim:
        raise ValueError(f"noise must have shape [n, {denoiser.dim}], got {noise.shape}")
    return _generate_jit(key, denoiser, kernel, noise, denoiser.sde.time_grid(num_steps, eps))


_generate_jit = eqx.filter_jit(_generate)


# ------------------------------------------------------------------------------------------------
# validation and NFE formulas
# ------------------------------------------------------------------------------------------------


def _pos_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def _check_common(denoiser, kernel, num_steps, eps, reward=None):
    if not isinstance(denoiser, (DigitsDenoiser, ScoreDenoiser)):
        raise TypeError(
            "denoiser must be DigitsDenoiser(model, label, guidance) or ScoreDenoiser(score_fn, sde, dim), "
            f"got {type(denoiser).__name__}"
        )
    if not isinstance(kernel, (DDIM, EulerMaruyama)):
        raise TypeError(f"kernel must be DDIM(eta) or EulerMaruyama(), got {type(kernel).__name__}")
    _pos_int("num_steps", num_steps)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    if reward is not None and not callable(reward):
        raise TypeError("reward must be callable: reward(x [n, d]) -> [n]")


def _final_nfe(denoiser, final_steps):
    if final_steps is None:
        return 0
    _pos_int("final_steps", final_steps)
    return (final_steps + 1) * denoiser.nfe_per_call


def _warn_nonfinite(result: NoiseSearchResult) -> NoiseSearchResult:
    """Warn (after the compiled call) when some candidate scores were NaN or infinite."""
    bad = result.nonfinite
    if not isinstance(bad, jax.core.Tracer) and int(bad) > 0:
        warnings.warn(
            f"noise search: {int(bad)} candidate scores were NaN or infinite (ranked as -inf; "
            "result.nonfinite); check the reward and the denoiser",
            RuntimeWarning,
            stacklevel=3,
        )
    return result


def random_search_nfe(num_candidates: int, num_steps: int, nfe_per_call: int = 1) -> int:
    r"""Search NFE of random search: \(N (K + 1)\) (times 2 with guidance)."""
    return num_candidates * (num_steps + 1) * nfe_per_call


def zero_order_search_nfe(
    num_neighbours: int, num_rounds: int, num_steps: int, nfe_per_call: int = 1
) -> int:
    r"""Search NFE of zero-order search: \((1 + T N) (K + 1)\) (times 2 with guidance)."""
    return (1 + num_rounds * num_neighbours) * (num_steps + 1) * nfe_per_call


def path_search_nfe(
    num_beams: int,
    num_children: int,
    num_steps: int,
    start_step: int,
    forward_steps: int,
    backward_steps: int,
    nfe_per_call: int = 1,
) -> int:
    r"""NFE of search over paths: \(N k_0 + R N M (\Delta_b + 1)\),
    \(R = (K - k_0) / (\Delta_b - \Delta_f)\) (times 2 with guidance)."""
    rounds = (num_steps - start_step) // (backward_steps - forward_steps)
    per = num_beams * start_step + rounds * num_beams * num_children * (backward_steps + 1)
    return per * nfe_per_call


# ------------------------------------------------------------------------------------------------
# (a) random search
# ------------------------------------------------------------------------------------------------


def _regenerate(key, denoiser, kernel, noise, score, sample, reward, final_times):
    if final_times is None:
        return sample, score
    x = _generate(key, denoiser, kernel, noise[None], final_times)
    return x[0], _score(reward, x)[0][0]


def _random_core(key, denoiser, reward, kernel, num_candidates, times, final_times):
    k_noise, k_chain, k_final = jax.random.split(key, 3)
    noise = jax.random.normal(k_noise, (num_candidates, denoiser.dim))
    x0 = _generate(k_chain, denoiser, kernel, noise, times)
    scores, bad = _score(reward, x0)
    i = jnp.argmax(scores)
    sample, score = _regenerate(k_final, denoiser, kernel, noise[i], scores[i], x0[i], reward,
                                final_times)
    return sample, score, noise[i], x0, scores, noise, scores[i][None], bad


_random_core_jit = eqx.filter_jit(_random_core)


def random_search(
    key: PRNGKeyArray,
    denoiser: Denoiser,
    reward: Reward,
    *,
    num_candidates: int,
    kernel: DDIM | EulerMaruyama = DDIM(),
    num_steps: int = 30,
    eps: float = 1e-3,
    final_steps: int | None = None,
) -> NoiseSearchResult:
    r"""Best-of-\(N\) over starting noises (Ma et al. 2025, §3.2 "Random Search").

    Draws \(\xi_{1..N} \sim \mathcal{N}(0, I)\) (one ``[N, d]`` draw from the first of three keys
    split from ``key``), generates all \(N\) with the sampler of :func:`generate` in one batched
    chain, scores \(r(x_0^{(i)})\) and returns the argmax (ties: the first). ``final_steps``:
    regenerate the chosen noise with that many steps (e.g. search cheaply with few steps, generate
    the final image with more); its reward is ``score``. ``samples``/``scores`` hold all \(N\)
    candidates. NFE: :func:`random_search_nfe`.
    """
    _check_common(denoiser, kernel, num_steps, eps, reward)
    _pos_int("num_candidates", num_candidates)
    nfe_final = _final_nfe(denoiser, final_steps)
    times = denoiser.sde.time_grid(num_steps, eps)
    final_times = None if final_steps is None else denoiser.sde.time_grid(final_steps, eps)
    out = _random_core_jit(key, denoiser, reward, kernel, num_candidates, times, final_times)
    nfe = random_search_nfe(num_candidates, num_steps, denoiser.nfe_per_call)
    return _warn_nonfinite(NoiseSearchResult(*out, nfe, nfe_final))


# ------------------------------------------------------------------------------------------------
# (b) zero-order search
# ------------------------------------------------------------------------------------------------


def _zero_order_core(key, denoiser, reward, kernel, num_neighbours, num_rounds, cosine, elitist,
                     times, final_times):
    k_pivot, k_chain0, k_rounds, k_final = jax.random.split(key, 4)
    pivot = jax.random.normal(k_pivot, (denoiser.dim,))
    x0 = _generate(k_chain0, denoiser, kernel, pivot[None], times)[0]
    s0, bad0 = _score(reward, x0[None])
    s0 = s0[0]

    def round_(carry, k):
        pivot, p_score, p_sample, b_noise, b_score, b_sample, bad = carry
        k_nb, k_ch = jax.random.split(k)
        ys = sphere_neighbours(k_nb, pivot, num_neighbours, cosine)
        xs = _generate(k_ch, denoiser, kernel, ys, times)
        sc, nbad = _score(reward, xs)
        j = jnp.argmax(sc)
        move = (sc[j] > p_score) if elitist else jnp.asarray(True)
        pivot = jnp.where(move, ys[j], pivot)
        p_score = jnp.where(move, sc[j], p_score)
        p_sample = jnp.where(move, xs[j], p_sample)
        better = sc[j] > b_score
        b_noise = jnp.where(better, ys[j], b_noise)
        b_score = jnp.where(better, sc[j], b_score)
        b_sample = jnp.where(better, xs[j], b_sample)
        carry = (pivot, p_score, p_sample, b_noise, b_score, b_sample, bad + nbad)
        return carry, (p_score, p_sample, pivot, b_score)

    carry0 = (pivot, s0, x0, pivot, s0, x0, bad0)
    carry, (p_scores, p_samples, p_noises, b_scores) = jax.lax.scan(
        round_, carry0, jax.random.split(k_rounds, num_rounds)
    )
    _, _, _, b_noise, b_score, b_sample, bad = carry
    sample, score = _regenerate(k_final, denoiser, kernel, b_noise, b_score, b_sample, reward,
                                final_times)
    samples = jnp.concatenate([x0[None], p_samples])
    scores = jnp.concatenate([s0[None], p_scores])
    noises = jnp.concatenate([pivot[None], p_noises])
    history = jnp.concatenate([s0[None], b_scores])
    return sample, score, b_noise, samples, scores, noises, history, bad


_zero_order_core_jit = eqx.filter_jit(_zero_order_core)


def zero_order_search(
    key: PRNGKeyArray,
    denoiser: Denoiser,
    reward: Reward,
    *,
    num_neighbours: int,
    num_rounds: int,
    cosine: float = 0.9,
    elitist: bool = False,
    kernel: DDIM | EulerMaruyama = DDIM(),
    num_steps: int = 30,
    eps: float = 1e-3,
    final_steps: int | None = None,
) -> NoiseSearchResult:
    r"""Zero-order search (Ma et al. 2025, §3.2): hill climbing on the noise with random neighbours.

    A pivot \(p_0 \sim \mathcal{N}(0, I)\) is generated and scored; in each of ``num_rounds`` rounds
    ``num_neighbours`` neighbours at cosine similarity ``cosine`` with the pivot and the pivot's
    norm (:func:`sphere_neighbours`) are generated in one batched chain and scored; the best becomes
    the pivot (``elitist=True``: only if it beats the pivot's score — the scores are then
    non-decreasing). The best sample seen overall is returned (its noise in ``noise``);
    ``samples``/``scores`` are the pivots after each round (row 0: the initial pivot), ``history``
    the best score so far. NFE: :func:`zero_order_search_nfe`. With a stochastic kernel the chain
    noise is fresh for every candidate, so only the starting noise is searched.
    """
    _check_common(denoiser, kernel, num_steps, eps, reward)
    _pos_int("num_neighbours", num_neighbours)
    _pos_int("num_rounds", num_rounds, minimum=0)
    c = float(cosine)
    if not -1.0 < c < 1.0:
        raise ValueError(f"cosine must lie in (-1, 1), got {cosine!r}")
    if denoiser.dim < 2:
        raise ValueError("zero-order search needs dimension d >= 2")
    nfe_final = _final_nfe(denoiser, final_steps)
    times = denoiser.sde.time_grid(num_steps, eps)
    final_times = None if final_steps is None else denoiser.sde.time_grid(final_steps, eps)
    out = _zero_order_core_jit(key, denoiser, reward, kernel, num_neighbours, num_rounds,
                               jnp.asarray(c, jnp.float32), bool(elitist), times, final_times)
    nfe = zero_order_search_nfe(num_neighbours, num_rounds, num_steps, denoiser.nfe_per_call)
    return _warn_nonfinite(NoiseSearchResult(*out, nfe, nfe_final))


# ------------------------------------------------------------------------------------------------
# (c) search over paths
# ------------------------------------------------------------------------------------------------


def _path_core(key, denoiser, reward, kernel, num_beams, num_children, start_step, forward_steps,
               backward_steps, times):
    n, m, df, db = num_beams, num_children, forward_steps, backward_steps
    num_steps = times.shape[0] - 1
    rounds = (num_steps - start_step) // (db - df)
    k_noise, k_start, k_rounds = jax.random.split(key, 3)
    noise = jax.random.normal(k_noise, (n, denoiser.dim))
    beam = _chain(k_start, denoiser, kernel, noise, times[: start_step + 1])
    roots = jnp.arange(n)
    levels = start_step + jnp.arange(rounds) * (db - df)  # the beam's level at the round's start
    parent = jnp.arange(n * m) // m

    def round_(carry, inp):
        beam, roots, _, _, _, bad = carry
        k, level = inp
        k_re, k_ch = jax.random.split(k)
        up = level - df
        children = renoise(k_re, denoiser.sde, beam[parent], times[level], times[up])
        seg = jax.lax.dynamic_slice(times, (up,), (db + 1,))
        children = _chain(k_ch, denoiser, kernel, children, seg)
        x0 = _tweedie(denoiser, children, seg[-1])
        sc, nbad = _score(reward, x0)
        child_roots = roots[parent]
        top_scores, top = jax.lax.top_k(sc, n)
        carry = (children[top], child_roots[top], x0, sc, child_roots, bad + nbad)
        return carry, top_scores[0]

    carry0 = (beam, roots, jnp.zeros((n * m, denoiser.dim)), jnp.zeros(n * m),
              jnp.zeros(n * m, jnp.int32), jnp.asarray(0))
    (_, _, x0, sc, child_roots, bad), history = jax.lax.scan(
        round_, carry0, (jax.random.split(k_rounds, rounds), levels)
    )
    i = jnp.argmax(sc)
    return x0[i], sc[i], noise[child_roots[i]], x0, sc, noise[child_roots], history, bad


_path_core_jit = eqx.filter_jit(_path_core)


def path_search(
    key: PRNGKeyArray,
    denoiser: Denoiser,
    reward: Reward,
    *,
    num_beams: int,
    num_children: int,
    start_step: int,
    forward_steps: int,
    backward_steps: int,
    kernel: DDIM | EulerMaruyama = DDIM(),
    num_steps: int = 30,
    eps: float = 1e-3,
) -> NoiseSearchResult:
    r"""Search over paths (Ma et al. 2025, §3.2): a beam of denoising paths, re-noised and denoised.

    ``num_beams`` \(N\) noises are denoised ``start_step`` \(k_0\) steps; then, for
    \(R = (K - k_0)/(\Delta_b - \Delta_f)\) rounds, each beam member at level \(k\) gets
    ``num_children`` \(M\) children re-noised to level \(k - \Delta_f\) (:func:`renoise`,
    ``forward_steps`` \(\Delta_f\)), denoised ``backward_steps`` \(\Delta_b\) steps with the kernel
    and scored on Tweedie's \(\hat x_0\) at the new level; the top \(N\) children are the next beam.
    The last round lands on \(s_K = \epsilon\), where \(\hat x_0\) is the final sample: the best
    child is returned. ``samples``/``scores``: the last round's \(N M\) children; ``history``: the
    best child's score in each round; ``noise``: the initial noise of the returned path's root.
    Needs \(0 \le \Delta_f \le k_0 < K\), \(\Delta_b > \Delta_f\) and \(\Delta_b - \Delta_f\)
    dividing \(K - k_0\). NFE: :func:`path_search_nfe` (no separate final generation).
    """
    _check_common(denoiser, kernel, num_steps, eps, reward)
    _pos_int("num_beams", num_beams)
    _pos_int("num_children", num_children)
    _pos_int("start_step", start_step, minimum=0)
    _pos_int("forward_steps", forward_steps, minimum=0)
    _pos_int("backward_steps", backward_steps)
    if not forward_steps <= start_step < num_steps:
        raise ValueError(
            f"need forward_steps <= start_step < num_steps, got {forward_steps}, {start_step}, "
            f"{num_steps} (a child cannot be re-noised above s = 1)"
        )
    if backward_steps <= forward_steps:
        raise ValueError(f"backward_steps ({backward_steps}) must exceed forward_steps "
                         f"({forward_steps}) for the paths to progress")
    if (num_steps - start_step) % (backward_steps - forward_steps):
        raise ValueError(
            f"backward_steps - forward_steps = {backward_steps - forward_steps} must divide "
            f"num_steps - start_step = {num_steps - start_step} (the last round must land on s = eps)"
        )
    times = denoiser.sde.time_grid(num_steps, eps)
    out = _path_core_jit(key, denoiser, reward, kernel, num_beams, num_children, start_step,
                         forward_steps, backward_steps, times)
    nfe = path_search_nfe(num_beams, num_children, num_steps, start_step, forward_steps,
                          backward_steps, denoiser.nfe_per_call)
    return _warn_nonfinite(NoiseSearchResult(*out, nfe, 0))

