"""Next-token sampling under ``jit``: temperature, top-k, top-p (nucleus), greedy.

Every sampler returns the token, its log-probability under the model (temperature 1, no
truncation) and under the proposal actually sampled from (temperature and truncation applied);
the ratio of the two is what importance weights need. Sampling uses one uniform per row and an
inverse CDF (blocked, so no full-vocabulary sort or per-token Gumbel noise is needed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_BLOCK = 256  # vocabulary block for the two-level inverse CDF
_NUCLEUS_CANDIDATES = 256  # top-p first looks among this many most likely tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings (hashable: a static argument of the jitted decoders).

    ``temperature=0`` is greedy decoding. ``top_k`` keeps the k most likely tokens, ``top_p`` the
    smallest set of most likely tokens whose probability reaches ``top_p`` (applied after top-k).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _inverse_cdf(u: Float[Array, " B"], w: Float[Array, "B K"]) -> Int[Array, " B"]:
    """Index drawn with probability proportional to the non-negative weights ``w`` (small K)."""
    c = jnp.cumsum(w, axis=-1)
    j = jnp.sum(c <= (u * c[:, -1])[:, None], axis=-1)
    last_nonzero = w.shape[-1] - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1)
    return jnp.minimum(j, last_nonzero)


def _sample_blocked(u: Float[Array, " B"], w: Float[Array, "B V"]) -> Int[Array, " B"]:
    """Inverse-CDF draw over a large vocabulary: pick a block by its mass, then a token inside it."""
    B, V = w.shape
    nb = -(-V // _BLOCK)
    if nb * _BLOCK != V:
        w = jnp.pad(w, ((0, 0), (0, nb * _BLOCK - V)))
    wb = w.reshape(B, nb, _BLOCK)
    mass = wb.sum(-1)
    cm = jnp.cumsum(mass, axis=-1)
    target = u * cm[:, -1]
    bi = jnp.sum(cm <= target[:, None], axis=-1)
    last_block = nb - 1 - jnp.argmax((mass > 0)[:, ::-1], axis=-1)
    bi = jnp.minimum(bi, last_block)
    inside = jnp.take_along_axis(wb, bi[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    before = jnp.take_along_axis(cm - mass, bi[:, None], axis=1)[:, 0]
    rest = jnp.clip((target - before) / jnp.maximum(inside.sum(-1), 1e-38), 0.0, 1.0 - 1e-7)
    j = _inverse_cdf(rest, inside)
    return bi * _BLOCK + j


def _nucleus_keep(probs_sorted: Array, top_p: float) -> Array:
    """Keep mask over descending-sorted probabilities: tokens until the mass reaches ``top_p``."""
    before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    return before < top_p


def sample_tokens(
    key: Array, logits: Float[Array, "B V"], sampling: Sampling
) -> tuple[Int[Array, " B"], Float[Array, " B"], Float[Array, " B"]]:
    """Draw one token per row. Returns ``(tokens, model_logprob, proposal_logprob)``."""
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    lse = jax.nn.logsumexp(logits, axis=-1)
    rows = jnp.arange(B)
    if sampling.greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, logits[rows, tok] - lse, jnp.zeros((B,), jnp.float32)

    u = jax.random.uniform(key, (B,), jnp.float32)
    scaled = logits / sampling.temperature if sampling.temperature != 1 else logits
    top_k = sampling.top_k if sampling.top_k is not None and sampling.top_k < V else None
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1 else None

    def from_candidates(vals, idx):
        # vals: [B, K] scaled logits sorted descending (with -inf for dropped), idx: their token ids
        w = jnp.exp(vals - vals[:, :1])
        j = _inverse_cdf(u, w)
        tok = jnp.take_along_axis(idx, j[:, None], axis=1)[:, 0].astype(jnp.int32)
        q = jnp.take_along_axis(vals, j[:, None], axis=1)[:, 0] - jax.nn.logsumexp(vals, axis=-1)
        return tok, q

    if top_k is not None:
        vals, idx = jax.lax.top_k(scaled, top_k)
        if top_p is not None:
            keep = _nucleus_keep(jax.nn.softmax(vals, axis=-1), top_p)
            vals = jnp.where(keep, vals, -jnp.inf)
        tok, q = from_candidates(vals, idx)
    elif top_p is not None:
        slse = jax.nn.logsumexp(scaled, axis=-1)
        K = min(V, _NUCLEUS_CANDIDATES)
        vals, idx = jax.lax.top_k(scaled, K)
        p_sorted = jnp.exp(vals - slse[:, None])

        def within_candidates(_):
            keep = _nucleus_keep(p_sorted, top_p)
            return from_candidates(jnp.where(keep, vals, -jnp.inf), idx)

        def by_threshold(_):
            # The nucleus is wider than the candidates: bisect a probability threshold instead.
            probs = jnp.exp(scaled - slse[:, None])

            def body(_, lohi):
                lo, hi = lohi
                mid = 0.5 * (lo + hi)
                mass = jnp.sum(jnp.where(probs >= mid[:, None], probs, 0.0), axis=-1)
                ok = mass >= top_p
                return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

            lo, _ = jax.lax.fori_loop(0, 40, body, (jnp.zeros((B,)), probs.max(-1) * (1 + 1e-6)))
            kept = jnp.where(probs >= lo[:, None], probs, 0.0)
            tok = _sample_blocked(u, kept).astype(jnp.int32)
            q = jnp.log(kept[rows, tok]) - jnp.log(kept.sum(-1))
            return tok, q

        needs_all = jnp.any(p_sorted.sum(-1) < top_p) if K < V else jnp.array(False)
        tok, q = jax.lax.cond(needs_all, by_threshold, within_candidates, None)
    else:
        w = jnp.exp(scaled - scaled.max(-1, keepdims=True))
        tok = _sample_blocked(u, w).astype(jnp.int32)
        q = scaled[rows, tok] - jax.nn.logsumexp(scaled, axis=-1)
    return tok, logits[rows, tok] - lse, q
