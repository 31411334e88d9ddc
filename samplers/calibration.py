r"""Calibration checks of posterior samplers: simulation-based calibration (SBC) and TARP.

Both take the output of *any* sampler run on simulated data: for \(s = 1..S\), a parameter
\(\theta^*_s \sim p(\theta)\) and data \(x_s \sim p(x \mid \theta^*_s)\) are simulated, the sampler
returns \(L\) draws \(\theta_{s,1:L} \approx p(\theta \mid x_s)\) (``posterior_draws`` [S, L, ...],
``truths`` [S, ...]; dicts of such arrays, e.g. numpyro sample dicts, are flattened per site).
The draws should be independent (thin MCMC chains to their effective sample size), or
calibrated samplers fail.

**SBC** (Talts et al. 2018). The rank \(r_s = \#\{l : \theta_{s,l} < \theta^*_s\} \in \{0..L\}\)
of each coordinate is uniform on \(\{0, \dots, L\}\) when the draws are exact (the \(L+1\) values
are exchangeable). Ties (discrete or stuck samplers) are broken at random. The ranks are binned
and compared with their exact bin probabilities by Pearson's \(\chi^2\) test (\(B-1\) degrees of
freedom); over-confident posteriors give U-shaped, under-confident \(\cap\)-shaped and biased
posteriors skewed histograms.

**TARP** (Lemos, Coogan, Hezaveh & Perreault-Levasseur 2023). With a reference point
\(\theta^r_s\) drawn at random, the credibility level of the ball around \(\theta^r_s\) that reaches
the truth is

\[
f_s = \frac{1}{L} \sum_l \mathbf{1}\big[d(\theta_{s,l}, \theta^r_s) < d(\theta^*_s, \theta^r_s)\big]
\]

(randomised over ties, so that \(f_s \sim \mathcal{U}(0, 1)\) exactly for a calibrated posterior),
and the expected coverage probability is \(\mathrm{ECP}(\alpha) = \frac1S \sum_s \mathbf{1}[f_s \le
\alpha]\). A posterior is calibrated iff \(\mathrm{ECP}(\alpha) = \alpha\) for every \(\alpha\) (and every
reference distribution, Lemos et al. Thm. 3). Reported: the curve, its signed area
\(\mathrm{ATC} = \int_0^1 (\mathrm{ECP}(\alpha) - \alpha)\,\mathrm{d}\alpha\) (0 when calibrated; its sign
depends on where the references fall, see Lemos et al.), the distance \(\sup_\alpha
|\mathrm{ECP}(\alpha) - \alpha|\) (the Kolmogorov-Smirnov statistic of the \(f_s\)) and its
p-value. Distances are Euclidean after scaling every coordinate by the spread of the truths;
references are uniform on the box spanned by the (scaled) truths unless given.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, PRNGKeyArray, PyTree

from ppl import checks

__all__ = ["SBCResult", "TARPResult", "sbc_ranks", "sbc", "tarp", "flatten_draws"]


class SBCResult(NamedTuple):
    """Output of :func:`sbc`.

    Attributes:
        ranks: [S, D] rank of each truth among its L draws (0..L).
        num_draws: L.
        histograms: [D, B] rank counts per bin.
        expected: [B] expected count per bin under uniformity.
        chi2: [D] Pearson statistic per coordinate.
        p_values: [D] chi-square p-values (B − 1 degrees of freedom).
        passed: every p-value is at least ``alpha / D`` (Bonferroni over the coordinates).
    """

    ranks: np.ndarray
    num_draws: int
    histograms: np.ndarray
    expected: np.ndarray
    chi2: np.ndarray
    p_values: np.ndarray
    passed: bool


class TARPResult(NamedTuple):
    """Output of :func:`tarp`.

    Attributes:
        alpha: [G] credibility levels in [0, 1].
        coverage: [G] expected coverage probability ECP(α).
        credibility: [S] the per-simulation levels f_s (uniform when calibrated).
        atc: signed area between the curve and the diagonal, ∫ (ECP − α) dα.
        distance: sup_α |ECP(α) − α| (Kolmogorov-Smirnov statistic of f).
        p_value: Kolmogorov-Smirnov p-value of f against U(0, 1).
        passed: ``p_value >= alpha``.
    """

    alpha: np.ndarray
    coverage: np.ndarray
    credibility: np.ndarray
    atc: float
    distance: float
    p_value: float
    passed: bool


def flatten_draws(posterior_draws: PyTree, truths: PyTree) -> tuple[np.ndarray, np.ndarray]:
    """``([S, L, D], [S, D])`` float64 arrays from arrays (``[S, L]``/``[S, L, ...]`` and
    ``[S]``/``[S, ...]``) or dicts of them (the sites concatenated in sorted-key order)."""
    if isinstance(posterior_draws, dict) != isinstance(truths, dict):
        raise TypeError("posterior_draws and truths must both be arrays or both be dicts")
    if isinstance(posterior_draws, dict):
        if sorted(posterior_draws) != sorted(truths):
            raise ValueError(
                f"posterior_draws and truths have different sites: {sorted(posterior_draws)} vs "
                f"{sorted(truths)}"
            )
        pairs = [flatten_draws(np.asarray(posterior_draws[k]), np.asarray(truths[k]))
                 for k in sorted(posterior_draws)]
        return np.concatenate([p[0] for p in pairs], -1), np.concatenate([p[1] for p in pairs], -1)
    draws = np.asarray(posterior_draws, np.float64)
    truth = np.asarray(truths, np.float64)
    if draws.ndim < 2 or truth.ndim < 1 or truth.shape[0] != draws.shape[0] \
            or truth.shape[1:] != draws.shape[2:]:
        raise ValueError(
            "posterior_draws must have shape [S, L, ...] and truths [S, ...] (the same trailing "
            f"shape), got {draws.shape} and {truth.shape}"
        )
    s, l = draws.shape[:2]
    if s < 2 or l < 1:
        raise ValueError(f"need at least 2 simulations and 1 draw each, got S={s}, L={l}")
    draws, truth = draws.reshape(s, l, -1), truth.reshape(s, -1)
    if not (np.all(np.isfinite(draws)) and np.all(np.isfinite(truth))):
        raise ValueError("posterior_draws and truths must be finite (a sampler failed?)")
    return draws, truth


def sbc_ranks(key: PRNGKeyArray, posterior_draws: PyTree, truths: PyTree) -> np.ndarray:
    r"""Ranks \(r_{s,d} = \#\{l : \theta_{s,l,d} < \theta^*_{s,d}\}\), ties broken uniformly at random:
    an int array [S, D] with values in \(0..L\)."""
    checks.prng_key("key", key)
    draws, truth = flatten_draws(posterior_draws, truths)
    below = np.sum(draws < truth[:, None, :], axis=1)
    ties = np.sum(draws == truth[:, None, :], axis=1)
    u = np.asarray(jax.random.uniform(key, below.shape), np.float64)
    return below + np.floor(u * (ties + 1)).astype(below.dtype)


def _chi2_sf(x: np.ndarray, dof: int) -> np.ndarray:
    return np.asarray(jax.scipy.special.gammaincc(dof / 2.0, jnp.asarray(x / 2.0, jnp.float32)),
                      np.float64)


def sbc(
    key: PRNGKeyArray,
    posterior_draws: PyTree,
    truths: PyTree,
    *,
    num_bins: int | None = None,
    alpha: float = 0.01,
) -> SBCResult:
    r"""Simulation-based calibration: rank statistics and a \(\chi^2\) uniformity test per coordinate.

    Args:
        key: PRNG key (tie-breaking).
        posterior_draws: [S, L, ...] independent posterior draws per simulated data set.
        truths: [S, ...] the parameters that generated each data set.
        num_bins: B (default: at most 20, at most \(L + 1\), about \(S / 10\) so that every bin
            expects at least 5 counts); bin \(b\) holds ranks \(\lfloor b(L+1)/B \rfloor ..\).
        alpha: test level (Bonferroni-corrected over the D coordinates).
    """
    a = checks.probability("alpha", alpha, strict=True)
    ranks = sbc_ranks(key, posterior_draws, truths)
    s, d = ranks.shape
    num_draws = int(np.asarray(flatten_draws(posterior_draws, truths)[0]).shape[1])
    values = num_draws + 1
    if num_bins is None:
        num_bins = max(2, min(20, values, s // 10))
    b = checks.positive_int("num_bins", num_bins, minimum=2)
    if b > values:
        raise ValueError(f"num_bins={b} exceeds the {values} possible rank values (L + 1)")
    edges = np.floor(np.arange(b + 1) * values / b).astype(int)  # rank r is in bin b iff edges[b] <= r < edges[b+1]
    expected = s * np.diff(edges) / values
    if expected.min() < 5:
        raise ValueError(
            f"num_bins={b} expects {expected.min():.1f} < 5 counts in a bin with S={s} "
            "simulations: use fewer bins or more simulations"
        )
    which = np.searchsorted(edges, ranks, side="right") - 1
    hist = np.stack([np.bincount(which[:, j], minlength=b) for j in range(d)])
    chi2 = np.sum((hist - expected) ** 2 / expected, axis=1)
    p = _chi2_sf(chi2, b - 1)
    return SBCResult(ranks, num_draws, hist, expected, chi2, p, bool(np.all(p >= a / d)))


def _ks_p_value(distance: float, n: int) -> float:
    """Asymptotic Kolmogorov p-value with Stephens' small-sample correction (Stephens 1970)."""
    x = distance * (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n))
    if x < 0.2:
        return 1.0
    k = np.arange(1, 101)
    return float(np.clip(2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * x**2)), 0.0, 1.0))


def tarp(
    key: PRNGKeyArray,
    posterior_draws: PyTree,
    truths: PyTree,
    *,
    references: ArrayLike | None = None,
    num_alpha: int = 101,
    alpha: float = 0.01,
) -> TARPResult:
    r"""TARP expected coverage test (Lemos et al. 2023).

    Args:
        key: PRNG key (reference points, tie-breaking).
        posterior_draws: [S, L, ...] posterior draws per simulated data set.
        truths: [S, ...] the generating parameters.
        references: optional [S, D] reference points (in the flattened coordinates of the
            draws); default uniform on the bounding box of the truths.
        num_alpha: G, points of the coverage curve.
        alpha: level of the Kolmogorov-Smirnov test of \(f_s \sim \mathcal{U}(0, 1)\).
    """
    checks.prng_key("key", key)
    a = checks.probability("alpha", alpha, strict=True)
    g = checks.positive_int("num_alpha", num_alpha, minimum=2)
    draws, truth = flatten_draws(posterior_draws, truths)
    s, l, d = draws.shape
    k_ref, k_tie = jax.random.split(key)
    centre = truth.mean(0)
    spread = truth.std(0)
    spread = np.where(spread > 0, spread, 1.0)
    draws_n = (draws - centre) / spread
    truth_n = (truth - centre) / spread
    if references is None:
        lo, hi = truth_n.min(0), truth_n.max(0)
        u = np.asarray(jax.random.uniform(k_ref, (s, d)), np.float64)
        ref_n = lo + u * (hi - lo)
    else:
        ref = np.asarray(references, np.float64)
        if ref.shape != (s, d):
            raise ValueError(f"references must have shape [S, D] = [{s}, {d}], got {ref.shape}")
        ref_n = (ref - centre) / spread
    d_draws = np.linalg.norm(draws_n - ref_n[:, None, :], axis=-1)
    d_truth = np.linalg.norm(truth_n - ref_n, axis=-1)
    below = np.sum(d_draws < d_truth[:, None], axis=1)
    ties = np.sum(d_draws == d_truth[:, None], axis=1)
    u = np.asarray(jax.random.uniform(k_tie, (s,)), np.float64)
    # the rank of d* among the L + 1 exchangeable distances, jittered: exactly U(0, 1)
    f = (below + u * (ties + 1)) / (l + 1)
    levels = np.linspace(0.0, 1.0, g)
    ecp = np.mean(f[None, :] <= levels[:, None], axis=1)
    atc = float(np.trapezoid(ecp - levels, levels))
    fs = np.sort(f)
    i = np.arange(1, s + 1)
    distance = float(max(np.max(i / s - fs), np.max(fs - (i - 1) / s)))
    p = _ks_p_value(distance, s)
    return TARPResult(levels, ecp, f, atc, distance, p, bool(p >= a))
