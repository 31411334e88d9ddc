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
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree

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
# Below this many strata every integer partial sum of the position arithmetic (at most M plus a
# rounding margin) is exact in float32 (2^24), so it runs as float matmuls; above, in int32.
_FLOAT_INT_LIMIT = 2**24 - 2**16
# Block totals up to this many are offset by one dense triangular matmul (rows² work, few kernels).
_DENSE_ROWS = 32


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


def _int_cumsum(x: Int[Array, " N"], bound: int) -> Int[Array, " N"]:
    """Exact inclusive cumulative sum of non-negative integers whose total is at most ``bound``
    (float matmuls below 2^24)."""
    if bound < _FLOAT_INT_LIMIT:
        return _cumsum(x.astype(jnp.float32)).astype(jnp.int32)
    return jnp.cumsum(x.astype(jnp.int32))


def _offsets(ints, fracs, float_ints: bool):
    r"""Exclusive cumulative sums of \(x_b = \mathrm{ints}_b + \mathrm{fracs}_b\) (block totals) as a
    pair (\(H_b\) int32, \(L_b \in [0, 1)\)): :func:`_split_cumsum` shifted by one, or one dense
    strictly triangular matmul when there are few blocks (fewer kernels: the common case)."""
    rows = ints.shape[0]
    whole = jnp.floor(fracs)
    fracs = fracs - whole
    ints = ints + (whole if float_ints else whole.astype(jnp.int32))
    if rows <= _DENSE_ROWS and float_ints:
        strict = jnp.triu(jnp.ones((rows, rows), jnp.float32), 1)
        hp = jax.lax.Precision.HIGHEST
        oi = jnp.matmul(ints, strict, precision=hp)
        of = jnp.matmul(fracs, strict, precision=hp)
        k = jnp.floor(of)
        return (oi + k).astype(jnp.int32), of - k
    h, l = _split_cumsum(ints, fracs, float_ints, rows)
    return (jnp.concatenate([jnp.zeros((1,), jnp.int32), h[:-1]]),
            jnp.concatenate([jnp.zeros((1,), jnp.float32), l[:-1]]))


def _split_cumsum(ints, fracs, float_ints: bool, length: int | None = None, flat: bool = True):
    r"""Inclusive cumulative sum of \(x_i = \mathrm{ints}_i + \mathrm{fracs}_i\) as a pair
    (\(H\) int32, \(L \in [0, 1)\) float32) with \(\sum_{j \le i} x_j \approx H_i + L_i\).

    The integer parts add exactly; the fractional parts are summed within blocks of ``_BLOCK``
    entries (partial sums \(\le\) ``_BLOCK``) and the block totals, split again into an integer and a
    fraction, recursively (:func:`_offsets`). Locally, \((H_i + L_i) - (H_{i-1} + L_{i-1})\) is
    \(x_i\) up to a few units in the last place of ``_BLOCK`` (\(\sim 10^{-6}\)), whatever the size of
    the sum (a float32 sum resolves \(\sim 10^{-7} \sum_j x_j\)); globally the rounding errors of
    the block totals add up, a slowly varying drift (measured: \(4 \cdot 10^{-3}\) after
    \(10^7\) terms summing to \(10^7\), against \(\sim 1\) for a float32 cumulative sum). The result is padded to a multiple of ``_BLOCK`` entries (the padding
    repeats the total), unless ``length`` is given; with ``flat=False``, as [blocks, ``_BLOCK``]
    (a reshape in the consumer's fusion costs index arithmetic per element on CPU).
    """
    n = ints.shape[0]
    whole = jnp.floor(fracs)
    fracs = fracs - whole
    ints = ints + (whole if float_ints else whole.astype(jnp.int32))
    if n <= _BLOCK:  # a short scan (no matmul kernel), the fraction renormalised
        wi, wf = jnp.cumsum(ints), jnp.cumsum(fracs)
        k = jnp.floor(wf)
        hi = wi.astype(jnp.int32) + k.astype(jnp.int32)
        return (hi, wf - k) if flat else (hi[None], (wf - k)[None])
    rows = -(-n // _BLOCK)
    pad = rows * _BLOCK - n
    ib = jnp.pad(ints, (0, pad)).reshape(rows, _BLOCK)
    fb = jnp.pad(fracs, (0, pad)).reshape(rows, _BLOCK)
    tri = jnp.triu(jnp.ones((_BLOCK, _BLOCK), jnp.float32))
    hp = jax.lax.Precision.HIGHEST
    wi = jnp.matmul(ib, tri, precision=hp) if float_ints else jnp.cumsum(ib, axis=1)
    wf = jnp.matmul(fb, tri, precision=hp)
    hi0, lo0 = _offsets(wi[:, -1], wf[:, -1], float_ints)
    v = wf + lo0[:, None]
    k = jnp.floor(v)
    hi = wi.astype(jnp.int32) + hi0[:, None] + k.astype(jnp.int32)
    lo = v - k
    if not flat:
        return hi, lo
    hi, lo = hi.reshape(-1), lo.reshape(-1)
    return (hi, lo) if length is None else (hi[:length], lo[:length])


def _weights(log_weights: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""Weights proportional to \(\exp(\log w)\), scaled by the largest (positions divide by the total)."""
    m = jnp.max(log_weights)
    return jnp.exp(log_weights - jnp.where(jnp.isfinite(m), m, 0.0))


def _scaled(weights: Float[Array, " N"], total) -> Float[Array, " N"]:
    r"""\(E_i = \mathrm{total} \cdot w_i / \sum_j w_j\) (expected offspring counts; 0 if all weights are 0)."""
    t = jnp.sum(weights)
    return weights * jnp.where(t > 0, total / jnp.where(t > 0, t, 1.0), 0.0)


def _positions(weights: Float[Array, " N"], total: int):
    r"""Right edges \(S_i = M C_i\) of the particles on the stratum axis \([0, M)\), \(M\) = ``total``,
    as a pair (\(H_i\) int32, \(L_i\) float32) with \(S_i = H_i + L_i\) (\(L_i\) within a few units of
    \([0, 1)\): :func:`_normal` brings it there), shaped [blocks, ``_BLOCK``], the padding at \(S = M\).

    Particle \(i\) owns \([S_{i-1}, S_i)\), of length \(M W_i\). A float32 CDF \(C_i \in [0, 1]\) is only
    resolved to \(6 \cdot 10^{-8}\), i.e. to \(0.6\) strata at \(M = 10^7\): it gave particles of equal
    weight 0 or 2 children instead of 1. Here the integer part is exact and each length
    \(S_i - S_{i-1}\) is accurate to \(\sim 10^{-6}\) strata at any \(M\) (:func:`_split_cumsum`;
    the positions themselves drift slowly, by up to \(\sim 0.05\) strata at \(M = 10^7\) with the
    float32 rounding of the expected counts: locally a shift of the uniforms, which leaves the
    law and the offspring bounds unchanged), and the end is pinned to
    \(S_{N-1} = M\): the relative error \(\delta \approx 10^{-7}\) of the float32 scale
    \(M / \sum_j w_j\) would move it by \(M \delta\), so \(S\) is corrected by
    \(-(S_{N-1} - M)\, S_i / S_{N-1}\) (a change of \(\sim M\delta\, W_i\) of each length,
    \(\sim 10^{-7}\) strata).
    """
    n = weights.shape[0]
    e = _scaled(weights, total)
    whole = jnp.floor(e)
    float_ints = total < _FLOAT_INT_LIMIT
    h, l = _split_cumsum(whole if float_ints else whole.astype(jnp.int32), e - whole, float_ints,
                         flat=False)  # [blocks, _BLOCK]
    last = ((n - 1) // _BLOCK, (n - 1) % _BLOCK)
    end = (h[last] - total).astype(jnp.float32) + l[last]
    span = h[last].astype(jnp.float32) + l[last]
    slope = end / jnp.where(span > 0, span, 1.0)  # one scalar division, not one per particle
    # S_i = h_i + v_i with v_i within a few units of [0, 1) (callers split it with _normal); the
    # padding (zero weights) sits at S ≈ M: callers mask it with _padding
    return h, l - (h.astype(jnp.float32) + l) * slope


def _padding(h: Int[Array, "R B"], n: int) -> Bool[Array, "R B"]:
    """The padding entries (index >= n) of a [blocks, _BLOCK] array."""
    rows, cols = h.shape
    return jnp.arange(rows)[:, None] * cols + jnp.arange(cols)[None, :] >= n


def _normal(h, v):
    """``(h + floor(v), v - floor(v))``: the same sum with the fraction in [0, 1)."""
    k = jnp.floor(v)
    return h + k.astype(jnp.int32), v - k


def _alive(ancestors: Int[Array, " M"], weights: Float[Array, " N"]) -> Int[Array, " M"]:
    r"""Never resample a zero-weight particle.

    The blocked cumulative sum rounds each entry on its own, so \(S_i - S_{i-1}\) can be a rounding
    error (\(\approx 10^{-6}\) strata) instead of 0 at a killed particle \(i\), and a position can fall in
    that sliver. Such an ancestor is replaced by the largest live ancestor of the draw (an ``argmax``
    of the weights costs several times more on CPU): a change of the law at the float-rounding level,
    which keeps zero-weight particles dead. (An exact running maximum over the CDF does the same but
    cost ≈ 80–200 µs per resampling at \(N = 10^4\) on CPU.)
    """
    alive = jnp.take(weights, ancestors) > 0
    return jnp.where(alive, ancestors, jnp.max(jnp.where(alive, ancestors, 0)))


def _stratified_search(
    weights: Float[Array, " N"], offsets: Float[Array, "*M"], num_samples: int
) -> Int[Array, " M"]:
    r"""Inverse CDF at one position per stratum, \(p_k = k + u_k\) on \([0, M)\) with
    \(u_k \in [0, 1]\), in \(O(N + M)\).

    Returns \(a_k = \#\{i : S_i \le p_k\}\) (clipped to \(N - 1\)), \(S_i = H_i + L_i\) the right edges
    of :func:`_positions`. ``offsets`` is one shared \(u\) (systematic) or one per stratum
    (stratified). The number of positions below \(S_i\) is \(c_i = H_i + [u_{H_i} < L_i]\) (the
    strata below \(H_i\) all count, those above none: an exact integer comparison, whatever \(M\));
    then \(a_k = \#\{i : c_i \le k\}\) is a cumulative sum of the histogram of \(c\). Particle \(i\)
    gets \(c_i - c_{i-1}\) children, \(\lfloor M W_i \rfloor\) or \(\lceil M W_i \rceil\) for systematic
    resampling up to the \(\sim 10^{-6}\)-strata rounding of the lengths (no binary search: that is
    \(\log_2 N\) dependent gathers per position).
    """
    n = weights.shape[0]
    m = num_samples
    h, v = _positions(weights, m)
    if jnp.ndim(offsets) == 0:
        # one shared u: c_i = #{k >= 0 : k + u < h_i + v_i} = h_i + ceil(v_i - u) (h_i an integer)
        u = jax.lax.optimization_barrier(jnp.asarray(offsets, jnp.float32))  # not recomputed per i
        count = h + jnp.ceil(v - u).astype(jnp.int32)
    else:
        h, l = _normal(h, v)
        inside = (h >= 0) & (h < m)
        u = jnp.take(offsets, jnp.clip(h, 0, m - 1))
        count = h + (inside & (u < l)).astype(jnp.int32)
    # the padding's count is m: outside the histogram below
    count = jnp.where(_padding(h, n), m, jnp.clip(count, 0, m)).reshape(-1)
    hist = jnp.zeros(m + 1, jnp.int32).at[count].add(1)
    ancestors = _int_cumsum(hist[:m], n)
    return _alive(jnp.clip(ancestors, 0, n - 1).astype(jnp.int32), weights)


def _multinomial_search(
    key: PRNGKeyArray, weights: Float[Array, " N"], num_samples: int
) -> Int[Array, " M"]:
    r"""\(M\) i.i.d. draws from the categorical law of ``weights`` by inverse CDF, in
    \(O(N + M \log_2 K)\) (\(K\): the most particles whose edge \(S_i\) falls in one stratum).

    A uniform position on \([0, M)\) is drawn as \(k + v\), \(k\) a uniform integer and \(v \sim U[0, 1)\)
    (full float32 resolution inside every stratum), and located among the edges
    \(S_i = H_i + L_i\) of :func:`_positions`: the particles with \(H_i = k\) form one run (a
    histogram of \(H\)), bisected on \(L\). ``jax.random.categorical`` with ``shape=(M,)`` draws an
    \(M \times N\) Gumbel array: \(4 \cdot 10^8\) bytes at \(N = M = 10^4\), impossible at \(10^7\).
    """
    n = weights.shape[0]
    m = num_samples
    h, l = _normal(*_positions(weights, m))
    h = jnp.where(_padding(h, n), m, h).reshape(-1)
    l = l.reshape(-1)
    k_int, k_frac = jax.random.split(key)
    k = jax.random.randint(k_int, (m,), 0, m, dtype=jnp.int32)
    v = jax.random.uniform(k_frac, (m,))
    per_stratum = jnp.zeros(m + 1, jnp.int32).at[jnp.clip(h, 0, m)].add(1)
    at_most = _int_cumsum(per_stratum, n)  # at_most[k] = #{i : H_i <= k}
    hi = jnp.take(at_most, k)
    lo = hi - jnp.take(per_stratum, k)

    def cond(c):
        return jnp.any(c[0] < c[1])

    def body(c):
        lo, hi = c
        active = lo < hi
        mid = (lo + hi) // 2
        right = jnp.take(l, jnp.clip(mid, 0, n - 1)) <= v
        return jnp.where(active & right, mid + 1, lo), jnp.where(active & ~right, mid, hi)

    lo, _ = jax.lax.while_loop(cond, body, (lo, hi))
    return _alive(jnp.clip(lo, 0, n - 1).astype(jnp.int32), weights)


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

    def log_weights_after(self, log_weights: Float[Array, " N"]) -> Float[Array, " N"] | float:
        r"""Normalised log-weights of the resampled particles: \(-\log N\) (equal weights) for the
        schemes here; :class:`samplers.sharding.Islands` keeps each island's mass."""
        return -math.log(log_weights.shape[0])

    def gather(self, particles: PyTree, ancestors: Int[Array, " N"]) -> PyTree:
        """The resampled rows ``particles[ancestors]`` (every leaf along its leading axis)."""
        return tree.gather(particles, ancestors)

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
        return _multinomial_search(key, _weights(log_weights), m)

    def _conditional_at_zero(self, key, weights):
        return _multinomial_search(key, weights, weights.shape[0]).at[0].set(0)


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
        return self._residual(key, _weights(log_weights), m, force_first=False)

    def _residual(self, key, weights, m, force_first):
        # expected counts M W_i = M w_i / sum_j w_j with one float32 scale: exact for equal weights
        # (M W_i = 1 stays 1, where exp(-log N) * N rounds to 0.99999994 at N = 10^7)
        n = weights.shape[0]
        expected = _scaled(weights, m)
        copies = jnp.floor(expected).astype(jnp.int32)
        n_det = jnp.sum(copies)
        residual = jnp.clip(expected - copies, 0.0, None)
        # deterministic part: slot j < n_det maps to the particle whose cumulative count exceeds j,
        # #{i : cum_i <= j} (a histogram of the cumulative counts, O(N + M))
        cum = _int_cumsum(copies, m + n)
        slots = jnp.arange(m)
        det = _int_cumsum(jnp.zeros(m + 1, jnp.int32).at[jnp.clip(cum, 0, m)].add(1)[:m], n)
        draws = _multinomial_search(key, residual, m)
        # a forced residual draw of particle 0 (conditional form) goes to the first random slot
        draws = jnp.where(force_first & (slots == n_det), 0, draws)
        a = jnp.where(slots < n_det, jnp.clip(det, 0, n - 1), draws)
        return jnp.sort(a)

    def _conditional_at_zero(self, key, weights):
        # O_0 = k + B, B ~ residual count; law tilted by O_0 is the mixture
        # k/(k + R r_0) · (untilted) + R r_0/(k + R r_0) · (one residual draw forced to 0).
        n = weights.shape[0]
        k_mix, k_draw = jax.random.split(key)
        expected = _scaled(weights, n)  # the same expected counts as _residual
        k = jnp.floor(expected[0])
        r_total = n - jnp.sum(jnp.floor(expected))
        r0 = expected[0] - k
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
