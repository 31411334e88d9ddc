"""Beam search over reasoning steps, guided by a step reward (PRM); also the core of DVTS.

K beams are kept. Each step, every unfinished beam is expanded into M candidates — M sampled next
steps (``move`` on M copies of the beam), or, for models that can enumerate their next steps, all
of them (``expand_all``) — each candidate is scored by the reward model, and the K best-scored
candidates become the new beams. A finished beam is absorbing: it stays a single candidate with
its cached score and competes with the new ones. Step 0 expands the prompt into K·M candidates
(``init``; with ``expand_all``: the root's children). The search stops when every beam is finished
(or at ``max_steps``) and returns the best-scored beam.

In Hugging Face search-and-learn terms (Beeching et al. 2024), a budget of n = K·M candidates per
step with ``beam_width`` M keeps n / M beams (their finished beams leave the beam set instead of
competing). With ``groups`` G > 1 the top-K selection is done separately in G independent groups of
K beams (DVTS, :mod:`samplers.search.dvts`); the final choice is over all G·K beams.

Exactness with ``expand_all``: with K ≥ the number of distinct candidates at every step nothing is
pruned (exhaustive search), and with a score equal to the best total reward reachable from the
prefix (an oracle value) even K = 1 returns an optimal complete sequence.

Compute: each new candidate counts its step's tokens and one reward call.

Reference: Snell et al. (2024), "Scaling LLM test-time compute optimally..."; Beeching, Tunstall &
Rush (2024), "Scaling test-time compute with open models".
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ppl import checks, tree
from samplers.search import base
from samplers.search.base import SearchModel, SearchResult

__all__ = ["beam_search"]


def beam_search(
    key: PRNGKeyArray | None,
    model: SearchModel,
    num_beams: int,
    expansions: int | None,
    *,
    max_steps: int | None = None,
) -> SearchResult:
    """Beam search with K = ``num_beams`` beams and M = ``expansions`` sampled candidates per beam.

    Args:
        key: PRNG key.
        model: a :class:`~samplers.search.base.SearchModel`; with ``expansions=None`` an
            :class:`~samplers.search.base.ExpandableSearchModel` (deterministic expansion into all
            ``model.num_children`` next steps; ``key`` is then unused and may be ``None``).
        num_beams: K ≥ 1 (static).
        expansions: M ≥ 1 sampled children per beam (static), or ``None`` for ``expand_all``.
        max_steps: step cap (default ``model.max_num_steps``).

    Returns:
        :class:`~samplers.search.base.SearchResult` whose ``particles`` are the K final beams
        (best first).
    """
    return run_beams(key, model, 1, num_beams, expansions, max_steps=max_steps)


def run_beams(key, model, groups, num_beams, expansions, *, max_steps=None) -> SearchResult:
    """Beam search in ``groups`` independent groups of ``num_beams`` beams (validated, timed)."""
    expand_all = expansions is None
    base.check_search_model(model, expandable=expand_all)
    g = checks.positive_int("groups", groups)
    k = checks.positive_int("num_beams", num_beams)
    if expand_all:
        m = checks.positive_int("model.num_children", model.num_children)
    else:
        m = checks.positive_int("expansions", expansions)
        if key is None:
            raise ValueError("sampled expansions need a PRNG key (key=None: expand_all only)")
    max_steps = base.resolve_max_steps(model, max_steps)
    return base.timed_call(
        _beams_jit, _beams, key, model, groups=g, num_beams=k, width=m, expand_all=expand_all,
        max_steps=max_steps,
    )


def _rank_key(scores, eligible):
    """Eligible candidates rank by score, a −inf score just above every ineligible slot."""
    floor = jnp.finfo(scores.dtype).min
    return jnp.where(eligible, jnp.where(scores == -jnp.inf, floor, scores), -jnp.inf)


def _select(cand, cand_scores, eligible, groups, num_beams):
    """Top-K per group of K·M candidates: (beams, scores, valid)."""
    per_group = cand_scores.shape[0] // groups
    rank = _rank_key(cand_scores, eligible).reshape(groups, per_group)
    idx = base.top_k(rank, num_beams)
    idx = (idx + per_group * jnp.arange(groups, dtype=jnp.int32)[:, None]).reshape(-1)
    return tree.gather(cand, idx), cand_scores[idx], eligible[idx]


def _beams(key, model, *, groups, num_beams, width, expand_all, max_steps):
    p = groups * num_beams  # beams
    c = p * width  # candidates per step
    copy0 = (jnp.arange(c) % width) == 0
    k0, k_loop = (None, None) if expand_all else jax.random.split(key)

    # ---- step 0: expand the prompt ----------------------------------------------------------
    if expand_all:
        root = model.initial_state(p)
        cand, log_probs = model.expand_all(root)
        root_of = (jnp.arange(c) // width) % num_beams == 0  # one root per group
        eligible = root_of & (log_probs.reshape(-1) > -jnp.inf)
        new_tokens = model.num_tokens(cand) - jnp.repeat(model.num_tokens(root), width)
    else:
        cand = model.init(k0, c)
        eligible = jnp.ones((c,), bool)
        new_tokens = model.num_tokens(cand)
    raw = model.score(cand)
    scores = jnp.where(jnp.isnan(raw), -jnp.inf, raw)
    nans = jnp.sum(eligible & jnp.isnan(raw))
    tokens = jnp.sum(jnp.where(eligible, new_tokens, 0))
    calls = jnp.sum(eligible)
    beams, beam_scores, valid = _select(cand, scores, eligible, groups, num_beams)

    def active(beams, valid):
        return valid & ~model.done(beams)

    def cond(state):
        t, beams, _, valid, *_ = state
        return (t < max_steps) & jnp.any(active(beams, valid))

    def body(state):
        t, beams, beam_scores, valid, tokens, calls, nans, key = state
        if not expand_all:
            key, sub = jax.random.split(key)
        parent = jnp.repeat(jnp.arange(p, dtype=jnp.int32), width)
        parents = tree.gather(beams, parent)
        if expand_all:
            children, log_probs = model.expand_all(beams)
            possible = log_probs.reshape(-1) > -jnp.inf
        else:
            children = model.move(sub, t, parents)
            possible = jnp.ones((c,), bool)
        p_done = model.done(beams)[parent]
        children = tree.where_rows(p_done, parents, children)
        eligible = valid[parent] & jnp.where(p_done, copy0, possible)
        fresh = eligible & ~p_done
        raw = model.score(children)
        new_scores = jnp.where(jnp.isnan(raw), -jnp.inf, raw)
        cand_scores = jnp.where(p_done, beam_scores[parent], new_scores)
        grown = model.num_tokens(children) - model.num_tokens(parents)
        tokens = tokens + jnp.sum(jnp.where(fresh, grown, 0))
        calls = calls + jnp.sum(fresh)
        nans = nans + jnp.sum(fresh & jnp.isnan(raw))
        beams, beam_scores, valid = _select(children, cand_scores, eligible, groups, num_beams)
        return t + 1, beams, beam_scores, valid, tokens, calls, nans, key

    state = (jnp.asarray(1, jnp.int32), beams, beam_scores, valid, tokens, calls, nans, k_loop)
    steps, beams, beam_scores, valid, tokens, calls, nans, _ = jax.lax.while_loop(cond, body, state)

    beam_scores = jnp.where(valid, beam_scores, -jnp.inf)
    answers = model.answer(beams)
    best = base.argmax_first(_rank_key(beam_scores, valid))
    return SearchResult(
        particles=beams,
        scores=beam_scores,
        answers=answers,
        valid=valid,
        selected=best,
        answer=answers[best],
        compute=base.untimed_compute(tokens, calls, steps),
        reached_max_steps=jnp.any(active(beams, valid)),
        num_nan_scores=nans,
    )


_beams_jit = eqx.filter_jit(_beams)
