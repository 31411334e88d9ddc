r"""Resampling schemes, in plain and conditional form, and the effective sample size.

A scheme maps normalised log-weights ``log_w`` (length \(N\)) to \(M\) ancestor indices ``a`` whose
offspring counts \(O_i = \#\{k : a_k = i\}\) are unbiased: \(\mathbb{E}[O_i] = M W_i\). All four
schemes here satisfy this; stratified, systematic and residual have lower variance than multinomial
(Douc, Cappé & Moulines 2005).

The *conditional* form keeps a pinned particle (conditional SMC / particle Gibbs, Andrieu, Doucet &
Holenstein 2010): ``conditional(key, log_w, pin)`` returns \(N\) ancestors with ``a_0 = pin`` and the
other ancestors drawn from the scheme's law conditioned on the pinned slot choosing ``pin``. For the
low-variance schemes this conditional law is \(\propto O_{\mathrm{pin}}\) (the reference slot is
exchangeable among the \(O_{\mathrm{pin}}\) offspring of ``pin``), which we sample exactly (cf. Chopin & Singh
2015, "On particle Gibbs sampling").
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ppl import checks

__all__ = [
    "AbstractResampling",
    "Multinomial",
    "Stratified",
    "Systematic",
    "Residual",
    "ess",
    "log_ess",
    "normalise",
    "offspring_counts",
    "get_resampling",
]


def normalise(log_weights: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""Normalised log-weights \(\log W_i = \log w_i - \log \sum_j w_j\)."""
    return log_weights - jax.nn.logsumexp(log_weights)


def log_ess(log_weights: Float[Array, " N"]) -> Float[Array, ""]:
    r"""\(\log \mathrm{ESS} = 2 \log \sum_i w_i - \log \sum_i w_i^2\) (Kong 1992); accepts unnormalised
    log-weights."""
    return 2 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2 * log_weights)


def ess(log_weights: Float[Array, " N"]) -> Float[Array, ""]:
    r"""Effective sample size \((\sum_i w_i)^2 / \sum_i w_i^2 \in [1, N]\)."""
    return jnp.exp(log_ess(log_weights))


def offspring_counts(ancestors: Int[Array, " M"], num_particles: int) -> Int[Array, " N"]:
    r"""\(O_i\) = number of children of particle \(i\)."""
    return jnp.zeros(num_particles, jnp.int32).at[ancestors].add(1)


_BLOCK = 32


def _cumsum(x: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""Inclusive cumulative sum by blocked triangular matmuls.

    Same values as ``jnp.cumsum`` up to float rounding, but \(O(N)\) work in a handful of fused
    kernels: XLA:CPU lowers ``cumsum`` to an associative scan of \(\sim 4 \log_2 N\) small kernels,
    about 5x slower at \(N = 10^4\). Rows of ``_BLOCK`` entries are summed by one matmul with an upper
    triangular matrix of ones, the row totals recursively.
    """
    n = x.shape[0]
    if n <= _BLOCK:
        return jnp.cumsum(x)
    rows = -(-n // _BLOCK)
    blocks = jnp.pad(x, (0, rows * _BLOCK - n)).reshape(rows, _BLOCK)
    tri = jnp.triu(jnp.ones((_BLOCK, _BLOCK), x.dtype))
    within = jnp.matmul(blocks, tri, precision=jax.lax.Precision.HIGHEST)
    totals = within[:, -1]
    offsets = _cumsum(totals) - totals
    return (within + offsets[:, None]).reshape(-1)[:n]


def _weights(log_weights: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""Weights proportional to \(\exp(\log w)\), scaled by the largest (the CDF divides by the total)."""
    m = jnp.max(log_weights)
    return jnp.exp(log_weights - jnp.where(jnp.isfinite(m), m, 0.0))


def _cdf(weights: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""Normalised cumulative weights \(C_i = \sum_{j \le i} W_j / \sum_j W_j\) (blocked ``_cumsum``).

    In float32, \(C\) can rise by a rounding error across a zero weight: :func:`_alive` makes sure
    that such a sliver never revives a killed particle.
    """
    cumulative = _cumsum(weights)
    return cumulative / cumulative[-1]


def _alive(ancestors: Int[Array, " M"], weights: Float[Array, " N"]) -> Int[Array, " M"]:
    r"""Never resample a zero-weight particle.

    The blocked cumulative sum rounds each entry on its own, so \(C_i - C_{i-1}\) can be a rounding
    error (\(\approx \varepsilon\)) instead of 0 at a killed particle \(i\), and a position can fall in
    that sliver (probability \(\approx N \varepsilon\) per draw). Such an ancestor is replaced by the largest
    live ancestor of the draw (an ``argmax`` of the weights costs several times more on CPU): a change of the
    law at the float-rounding level, which keeps zero-weight particles dead. (An exact running maximum over
    the CDF does the same but cost ≈ 80–200 µs per resampling at \(N = 10^4\) on CPU.)
    """
    alive = jnp.take(weights, ancestors) > 0
    return jnp.where(alive, ancestors, jnp.max(jnp.where(alive, ancestors, 0)))


def _sorted_search(weights: Float[Array, " N"], positions: Float[Array, " M"]) -> Int[Array, " M"]:
    r"""Indices \(i\) with \(C_{i-1} \le u < C_i\) (\(C\) = ``cumsum(W)``) for sorted uniforms
    \(u \in [0, 1)\)."""
    cumulative = _cdf(weights)
    idx = jnp.searchsorted(cumulative, positions, side="right")
    return _alive(jnp.clip(idx, 0, weights.shape[0] - 1).astype(jnp.int32), weights)


def _stratified_search(
    weights: Float[Array, " N"], offsets: Float[Array, "*M"], num_samples: int
) -> Int[Array, " M"]:
    r"""Inverse CDF at one position per stratum, \(p_k = (k + u_k) / M\) with \(u_k \in [0, 1]\), in
    \(O(N + M)\).

    Returns \(a_k = \#\{i : C_i \le p_k\}\) (clipped to \(N - 1\)), \(C\) the normalised cumulative
    weights: the same indices as ``searchsorted(C, p, side="right")``. ``offsets`` is one shared
    \(u\) (systematic) or one per stratum (stratified). The count \(c_i = \#\{k : p_k < C_i\}\) only
    depends on the strata \(j - 1, j, j + 1\) around \(j = \lfloor M C_i \rfloor\) (all lower strata
    count, all higher ones do not, whatever the float rounding of \(M C_i\)); then
    \(a_k = \#\{i : c_i \le k\}\) is a cumulative sum of the histogram of \(c\). This replaces a
    binary search (\(\log_2 N\) dependent gathers per position).
    """
    n = weights.shape[0]
    m = num_samples
    cumulative = _cdf(weights)
    shared = jnp.ndim(offsets) == 0
    j = jnp.clip(jnp.floor(m * cumulative).astype(jnp.int32), 0, m)
    count = jnp.clip(j - 1, 0, m)
    for d in (-1, 0, 1):
        k = j + d
        valid = (k >= 0) & (k < m)
        u_k = offsets if shared else jnp.take(offsets, jnp.clip(k, 0, m - 1))
        p_k = (k + u_k) / m  # the same float operations as (arange(m) + u) / m
        count = count + (valid & (p_k < cumulative)).astype(jnp.int32)
    hist = jnp.zeros(m + 1, jnp.int32).at[count].add(1)
    if m + 1 < 2**24:  # integer counts are exact in float32 below 2^24
        ancestors = _cumsum(hist[:m].astype(jnp.float32)).astype(jnp.int32)
    else:
        ancestors = jnp.cumsum(hist[:m])
    return _alive(jnp.clip(ancestors, 0, n - 1).astype(jnp.int32), weights)


class AbstractResampling(eqx.Module):
    """Strategy interface: ``__call__(key, log_w, M)`` and ``conditional(key, log_w, pin)``."""

    @abc.abstractmethod
    def __call__(
        self, key: PRNGKeyArray, log_weights: Float[Array, " N"], num_samples: int | None = None
    ) -> Int[Array, " M"]:
        r"""Ancestor indices with \(\mathbb{E}[O_i] = M W_i\) (\(M = N\) by default)."""

    @abc.abstractmethod
    def _conditional_at_zero(
        self, key: PRNGKeyArray, weights: Float[Array, " N"]
    ) -> Int[Array, " N"]:
        """Conditional resampling keeping particle 0 in slot 0 (normalised weights)."""

    def conditional(
        self, key: PRNGKeyArray, log_weights: Float[Array, " N"], pin: Int[Array, ""] | int = 0
    ) -> Int[Array, " N"]:
        """N ancestors with slot 0 pinned to particle ``pin`` (conditional SMC).

        Implemented by rotating the particle order so that ``pin`` comes first (every scheme here
        is valid for any fixed order), resampling conditionally on particle 0 and rotating back.
        """
        n = log_weights.shape[0]
        pin = jnp.asarray(pin, jnp.int32)
        weights = jnp.exp(normalise(log_weights))
        rolled = jnp.roll(weights, -pin)
        a = self._conditional_at_zero(key, rolled)
        return ((a + pin) % n).astype(jnp.int32)


class Multinomial(AbstractResampling):
    """i.i.d. draws from the categorical distribution of the weights."""

    def __call__(self, key, log_weights, num_samples=None):
        m = log_weights.shape[0] if num_samples is None else num_samples
        return jax.random.categorical(key, log_weights, shape=(m,)).astype(jnp.int32)

    def _conditional_at_zero(self, key, weights):
        n = weights.shape[0]
        a = jax.random.categorical(key, jnp.log(weights), shape=(n,)).astype(jnp.int32)
        return a.at[0].set(0)


def _tilted_bernoulli_for_first(key, weights, m_total):
    r"""For the first particle with expected count \(c = m_{\mathrm{total}} W_0 = k + f\): return
    \(B\) with \(P(B = 1) = f(k+1) / \big(f(k+1) + (1-f)k\big)\), the law of the fractional stratum's
    hit under tilting by \(O_0\)."""
    c = m_total * weights[0]
    k = jnp.floor(c)
    f = c - k
    p_one = f * (k + 1) / (f * (k + 1) + (1 - f) * k)
    p_one = jnp.where(k == 0, 1.0, p_one)
    return jax.random.bernoulli(key, p_one), k, f


class Stratified(AbstractResampling):
    """One uniform per stratum [k/M, (k+1)/M) (Kitagawa 1996)."""

    def __call__(self, key, log_weights, num_samples=None):
        m = log_weights.shape[0] if num_samples is None else num_samples
        u = jax.random.uniform(key, (m,))
        return _stratified_search(_weights(log_weights), u, m)

    def _conditional_at_zero(self, key, weights):
        # Particle 0 owns [0, W_0): strata k < floor(N W_0) always hit it, the stratum
        # floor(N W_0) hits it with probability f. Tilt that stratum's uniform by O_0.
        n = weights.shape[0]
        k_bern, k_unif, k_frac = jax.random.split(key, 3)
        hit, k, f = _tilted_bernoulli_for_first(k_bern, weights, n)
        u = jax.random.uniform(k_unif, (n,))
        v = jax.random.uniform(k_frac)
        u_frac = jnp.where(hit, v * f, f + v * (1 - f))
        idx = jnp.clip(k.astype(jnp.int32), 0, n - 1)
        u = jnp.where((jnp.arange(n) == idx) & (k < n), u_frac, u)
        # slot 0 already falls in [0, W_0) when W_0 > 0; force it so that a pinned weight that
        # underflowed to 0 (or float rounding at the boundary) cannot lose the reference
        return _stratified_search(weights, u, n).at[0].set(0)


class Systematic(AbstractResampling):
    """One shared uniform for all strata (Carpenter, Clifford & Fearnhead 1999)."""

    def __call__(self, key, log_weights, num_samples=None):
        m = log_weights.shape[0] if num_samples is None else num_samples
        u = jax.random.uniform(key)
        return _stratified_search(_weights(log_weights), u, m)

    def _conditional_at_zero(self, key, weights):
        # O_0(u) = k + 1[u < f] for the shared uniform u: tilt u's law by O_0.
        n = weights.shape[0]
        k_bern, k_unif = jax.random.split(key)
        hit, k, f = _tilted_bernoulli_for_first(k_bern, weights, n)
        v = jax.random.uniform(k_unif)
        u = jnp.where(hit, v * f, f + v * (1 - f))
        # as for Stratified: exact when W_0 > 0, and keeps the pin when W_0 underflows to 0
        return _stratified_search(weights, u, n).at[0].set(0)


class Residual(AbstractResampling):
    r"""\(\lfloor M W_i \rfloor\) deterministic copies, the rest multinomial on the residuals (Liu & Chen
    1998)."""

    def __call__(self, key, log_weights, num_samples=None):
        m = log_weights.shape[0] if num_samples is None else num_samples
        weights = jnp.exp(normalise(log_weights))
        return self._residual(key, weights, m, force_first=False)

    def _residual(self, key, weights, m, force_first):
        n = weights.shape[0]
        copies = jnp.floor(m * weights).astype(jnp.int32)
        n_det = jnp.sum(copies)
        residual = jnp.clip(m * weights - copies, 0.0, None)
        # deterministic part: slot j < n_det maps to the particle whose cumulative count exceeds j
        cum = jnp.cumsum(copies)
        slots = jnp.arange(m)
        det = jnp.searchsorted(cum, slots, side="right").astype(jnp.int32)
        log_r = jnp.log(residual)
        draws = jax.random.categorical(key, log_r, shape=(m,)).astype(jnp.int32)
        # a forced residual draw of particle 0 (conditional form) goes to the first random slot
        draws = jnp.where(force_first & (slots == n_det), 0, draws)
        a = jnp.where(slots < n_det, jnp.clip(det, 0, n - 1), draws)
        return jnp.sort(a)

    def _conditional_at_zero(self, key, weights):
        # O_0 = k + B, B ~ residual count; law tilted by O_0 is the mixture
        # k/(k + R r_0) · (untilted) + R r_0/(k + R r_0) · (one residual draw forced to 0).
        n = weights.shape[0]
        k_mix, k_draw = jax.random.split(key)
        k = jnp.floor(n * weights[0])
        r_total = n - jnp.sum(jnp.floor(n * weights))
        r0 = n * weights[0] - k
        p_force = r0 / (k + r0)  # R · (r0 / R) = r0
        p_force = jnp.where(k + r0 > 0, p_force, 1.0)
        force = jax.random.bernoulli(k_mix, p_force) & (r_total > 0)
        return self._residual(k_draw, weights, n, force_first=force)


_SCHEMES = {
    "multinomial": Multinomial,
    "stratified": Stratified,
    "systematic": Systematic,
    "residual": Residual,
}


def get_resampling(scheme: str | AbstractResampling) -> AbstractResampling:
    """Return a resampling strategy from a name or an instance (clear error otherwise)."""
    return checks.strategy("resampling scheme", scheme, AbstractResampling, _SCHEMES)
