"""Shared pieces of the search baselines: the model interface, the result types, rollouts, votes.

Search methods (best-of-N, voting, beam search, DVTS) run on Feynman-Kac models with absorbing
``done`` states, e.g. an LLM whose particle is a token buffer + length + steps + done flag and whose
move appends one reasoning step. Besides ``init`` / ``move`` / ``done`` they need:

- ``score(particles) -> [N]``: the reward model's *log-scale* score of each (partial or complete)
  particle, e.g. log of a PRM / verifier probability (one reward-model call per particle scored).
  Selection uses only its order; weighted voting uses ``exp(score)`` as the vote weight.
- ``answer(particles) -> int [N]``: a canonical answer id (equal ids = equal answers) for voting.
- ``num_tokens(particles) -> int [N]``: generated tokens so far (prompt excluded); the tokens a
  move generates are ``num_tokens(after) − num_tokens(before)``.

Deterministic beam search additionally uses (see :class:`ExpandableSearchModel`)
``initial_state(n)`` (the prompt, before any step), ``expand_all(particles)`` (every possible next
step of each particle) and the static ``num_children``.

A model supplies these as methods, or :class:`SearchAdapter` attaches them to any Feynman-Kac model.

Compute is counted exactly (:class:`Compute`): tokens generated, reward-model calls (particles
scored; finished particles keep their cached score and are not re-scored), steps, and wall time
measured outside ``jit`` around the compiled call (compilation reported apart).

References: Snell, Lee, Xu & Kumar (2024), "Scaling LLM test-time compute optimally can be more
effective than scaling model parameters"; Beeching, Tunstall & Rush (2024), "Scaling test-time
compute with open models" (Hugging Face search-and-learn); Puri et al. (2025), "A probabilistic
inference approach to inference-time scaling of LLMs using particle-based Monte Carlo methods".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree

Particles = PyTree

__all__ = [
    "SearchModel",
    "ExpandableSearchModel",
    "SearchAdapter",
    "Compute",
    "SearchResult",
    "rollout",
    "vote",
    "select_particle",
    "sample_and_select",
    "run_sample_and_select",
]


# ------------------------------------------------------------------------------------------------
# interface
# ------------------------------------------------------------------------------------------------


@runtime_checkable
class SearchModel(Protocol):
    """What the search methods call (all batched over a leading particle axis N)."""

    def init(self, key: PRNGKeyArray, num_particles: int) -> Particles: ...

    def move(self, key: PRNGKeyArray, t: Int[Array, ""], particles: Particles) -> Particles: ...

    def done(self, particles: Particles) -> Bool[Array, " N"]: ...

    def score(self, particles: Particles) -> Float[Array, " N"]: ...

    def answer(self, particles: Particles) -> Int[Array, " N"]: ...

    def num_tokens(self, particles: Particles) -> Int[Array, " N"]: ...


@runtime_checkable
class ExpandableSearchModel(SearchModel, Protocol):
    r"""A search model that can enumerate its next steps (deterministic beam search).

    ``expand_all(particles)`` returns ``(children, log_probs)``: ``children`` has leaves with
    leading axis ``N * num_children`` (parent-major: row ``i * C + c`` is child \(c\) of parent \(i\))
    and ``log_probs`` [N, C] the move's log-probability of each child (\(-\infty\): not a possible
    child; such slots are ignored). Children of finished parents are ignored (the parent is kept instead).
    ``initial_state(n)`` is ``n`` copies of the root (the prompt, no step taken).
    """

    num_children: int

    def initial_state(self, num: int) -> Particles: ...

    def expand_all(self, particles: Particles) -> tuple[Particles, Float[Array, "N C"]]: ...


_REQUIRED = ("init", "move", "done", "score", "answer", "num_tokens")
_EXPANDABLE = ("initial_state", "expand_all", "num_children")


def check_search_model(model: Any, *, expandable: bool = False) -> None:
    """Raise a clear ``TypeError`` when ``model`` lacks part of the search interface."""
    needed = _REQUIRED + (_EXPANDABLE if expandable else ())
    missing = []
    for name in needed:
        try:
            ok = hasattr(model, name)
        except (NotImplementedError, ValueError):  # a property that refuses (e.g. num_children)
            ok = True
        if not ok:
            missing.append(name)
    if missing:
        what = "deterministic expansion (expand_all)" if expandable else "search"
        raise TypeError(
            f"{type(model).__name__} lacks {missing} needed for {what}; implement them or wrap the "
            "model in samplers.search.SearchAdapter(model, score_fn=..., answer_fn=..., "
            "num_tokens_fn=...)"
        )


class SearchAdapter(eqx.Module):
    """Attach the search interface to a Feynman-Kac model with ``done``.

    Every function receives the wrapped model first: ``score_fn(model, particles) -> [N]`` and
    likewise ``answer_fn``, ``num_tokens_fn``, ``initial_state_fn(model, n)``,
    ``expand_all_fn(model, particles)``. Omitted functions fall back to the model's own method of
    the same name. Functions are pytree nodes: define them once (module level) or pass a
    ``jax.tree_util.Partial`` whose arguments (e.g. reward-model weights) are then traced, not
    baked into the compiled program.
    """

    model: Any
    score_fn: Callable | None = None
    answer_fn: Callable | None = None
    num_tokens_fn: Callable | None = None
    initial_state_fn: Callable | None = None
    expand_all_fn: Callable | None = None
    children: int | None = eqx.field(static=True, default=None)

    def _call(self, fn, name, *args):
        if fn is not None:
            return fn(self.model, *args)
        method = getattr(self.model, name, None)
        if method is None:
            raise TypeError(f"SearchAdapter needs {name}_fn: {type(self.model).__name__} has no "
                            f"method {name}")
        return method(*args)

    @property
    def max_num_steps(self) -> int | None:
        return getattr(self.model, "max_num_steps", None)

    @property
    def num_children(self) -> int:
        if self.children is not None:
            return self.children
        return self.model.num_children

    def init(self, key, num_particles):
        return self.model.init(key, num_particles)

    def move(self, key, t, particles):
        return self.model.move(key, t, particles)

    def done(self, particles):
        d = self.model.done(particles)
        if d is None:
            raise TypeError(f"{type(self.model).__name__}.done returns None: search methods need "
                            "absorbing done states")
        return d

    def score(self, particles):
        return self._call(self.score_fn, "score", particles)

    def answer(self, particles):
        return self._call(self.answer_fn, "answer", particles)

    def num_tokens(self, particles):
        return self._call(self.num_tokens_fn, "num_tokens", particles)

    def initial_state(self, num):
        return self._call(self.initial_state_fn, "initial_state", num)

    def expand_all(self, particles):
        return self._call(self.expand_all_fn, "expand_all", particles)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


class Compute(NamedTuple):
    """Exact compute of one search run.

    Attributes:
        tokens_generated: sum over every generated candidate of the tokens its steps appended
            (siblings of a beam each count their own step; finished particles add nothing).
        reward_calls: particles scored by the reward model (cached scores of finished particles
            are reused, not re-counted).
        num_steps: generation steps run (step 0 = the first step from the prompt).
        wall_time_s: seconds of the compiled call (``block_until_ready``); NaN when the method
            was called under a JAX transformation (``vmap`` / ``jit``), where it cannot be timed.
        compile_time_s: seconds spent tracing + compiling (≈ 0 when cached); NaN under tracing.
    """

    tokens_generated: Int[Array, ""]
    reward_calls: Int[Array, ""]
    num_steps: Int[Array, ""]
    wall_time_s: Float[Array, ""]
    compile_time_s: Float[Array, ""]


class SearchResult(NamedTuple):
    r"""Output of every search method.

    Attributes:
        particles: the final population, leaves [P, ...] (best-of-N and voting: the N samples;
            beam search: the kept beams; DVTS: the beams of every subtree).
        scores: [P] reward score of each final particle (NaN where the method never scores,
            i.e. self-consistency; \(-\infty\) for ``valid = False`` slots).
        answers: [P] answer id of each final particle.
        valid: [P] slot holds a real candidate (beam search with fewer candidates than beams
            leaves empty slots; always True for sampling methods).
        selected: index in ``particles`` of the chosen particle.
        answer: the chosen answer id.
        compute: :class:`Compute`.
        reached_max_steps: some particle was still unfinished at the step cap (failure flag).
        num_nan_scores: NaN scores seen (each treated as \(-\infty\)).
    """

    particles: PyTree
    scores: Float[Array, " P"]
    answers: Int[Array, " P"]
    valid: Bool[Array, " P"]
    selected: Int[Array, ""]
    answer: Int[Array, ""]
    compute: Compute
    reached_max_steps: Bool[Array, ""]
    num_nan_scores: Int[Array, ""]

    def selected_particle(self) -> PyTree:
        """The chosen particle (leaves without the particle axis)."""
        return select_particle(self.particles, self.selected)


def select_particle(particles: Particles, index: Int[Array, ""]) -> PyTree:
    """Row ``index`` of every leaf (:func:`ppl.tree.row`)."""
    return tree.row(particles, index)


# ------------------------------------------------------------------------------------------------
# helpers shared by the methods (module attributes: tests replace some to break the methods)
# ------------------------------------------------------------------------------------------------


def argmax_first(values: Float[Array, " N"]) -> Int[Array, ""]:
    """Index of the largest value; ties go to the lowest index."""
    return jnp.argmax(values).astype(jnp.int32)


def top_k(values: Float[Array, "G M"], k: int) -> Int[Array, "G k"]:
    """Indices of the k largest values of each row, best first; ties go to the lower index."""
    return jax.lax.top_k(values, k)[1].astype(jnp.int32)


def sanitise_scores(scores: Float[Array, " N"]) -> tuple[Float[Array, " N"], Int[Array, ""]]:
    r"""NaN \(\to -\infty\), and the number of NaNs."""
    nan = jnp.isnan(scores)
    return jnp.where(nan, -jnp.inf, scores), jnp.sum(nan).astype(jnp.int32)


def vote(
    answers: Int[Array, " N"], weights: Float[Array, " N"]
) -> tuple[Int[Array, ""], Float[Array, " N"]]:
    r"""Weighted vote: \(\mathrm{totals}_i = \sum_j w_j \mathbf{1}\{a_j = a_i\}\); the winner is the answer of
    the first particle whose answer has the largest total (so tied answers win in proportion to their number
    of votes, the particles being exchangeable). Returns (index of that particle, totals)."""
    same = answers[:, None] == answers[None, :]
    totals = jnp.sum(jnp.where(same, weights[None, :], 0.0), axis=1)
    return argmax_first(totals), totals


def rollout(
    key: PRNGKeyArray, model: SearchModel, num_particles: int, max_steps: int
) -> tuple[Particles, Int[Array, ""], Bool[Array, ""]]:
    """Generate ``num_particles`` independent complete particles: ``init`` then ``move`` until all
    are done (finished ones stay put) or ``max_steps`` steps ran. Returns (particles, steps run,
    reached the cap with some particle unfinished)."""
    k0, k1 = jax.random.split(key)
    particles = model.init(k0, num_particles)

    def cond(state):
        t, p, _ = state
        return (t < max_steps) & ~jnp.all(model.done(p))

    def body(state):
        t, p, k = state
        k, sub = jax.random.split(k)
        moved = model.move(sub, t, p)
        return t + 1, tree.where_rows(model.done(p), p, moved), k

    steps, particles, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), particles, k1))
    return particles, steps, ~jnp.all(model.done(particles))


# ------------------------------------------------------------------------------------------------
# validation and timed calls
# ------------------------------------------------------------------------------------------------


def resolve_max_steps(model: Any, max_steps: int | None) -> int:
    if max_steps is None:
        max_steps = getattr(model, "max_num_steps", None)
        if max_steps is None:
            raise ValueError(
                f"{type(model).__name__} has no max_num_steps: pass max_steps (the step cap)"
            )
    return checks.positive_int("max_steps", max_steps)


def _is_traced(args: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


def untimed_compute(tokens, reward_calls, num_steps) -> Compute:
    nan = jnp.asarray(jnp.nan, jnp.float32)
    return Compute(
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(reward_calls, jnp.int32),
        jnp.asarray(num_steps, jnp.int32),
        nan,
        nan,
    )


def timed_call(jitted: Callable, core: Callable, key, model, **static) -> SearchResult:
    """Run ``core(key, model, **static)``: under a JAX transformation call it directly (wall time
    NaN); otherwise compile ``jitted`` ahead of time (cached by JAX), then time the compiled call
    to ``block_until_ready``."""
    if _is_traced((key, model)):
        return core(key, model, **static)
    t0 = time.perf_counter()
    compiled = jitted.lower(key, model, **static).compile()
    t1 = time.perf_counter()
    result = compiled(key, model, **static)
    jax.block_until_ready(result)
    t2 = time.perf_counter()
    compute = result.compute._replace(
        wall_time_s=jnp.asarray(t2 - t1, jnp.float32),
        compile_time_s=jnp.asarray(t1 - t0, jnp.float32),
    )
    return result._replace(compute=compute)


# ------------------------------------------------------------------------------------------------
# the sampling methods (best-of-N, weighted best-of-N, self-consistency): sample N, then select
# ------------------------------------------------------------------------------------------------


def sample_and_select(
    key: PRNGKeyArray,
    model: SearchModel,
    n: int,
    max_steps: int,
    select_fn: Callable,
    *,
    scored: bool = True,
) -> SearchResult:
    r"""\(N\) complete particles drawn independently (:func:`rollout`), then one chosen by a rule.

    ``select_fn(scores, answers) -> index`` is the method's selection rule. With ``scored`` the
    reward model scores every sample (NaN \(\to -\infty\), counted; \(N\) reward calls); without it
    nothing is scored and ``scores`` are NaN (``select_fn`` receives them). Compute:
    \(\sum_i \mathrm{num\_tokens}(x^i)\) tokens. Untimed (see :func:`run_sample_and_select`).
    """
    particles, steps, at_cap = rollout(key, model, n, max_steps)
    answers = model.answer(particles)
    if scored:
        scores, nans = sanitise_scores(model.score(particles))
    else:
        scores, nans = jnp.full((n,), jnp.nan, jnp.float32), jnp.asarray(0, jnp.int32)
    selected = select_fn(scores, answers)
    compute = untimed_compute(jnp.sum(model.num_tokens(particles)), n if scored else 0, steps)
    return SearchResult(
        particles=particles,
        scores=scores,
        answers=answers,
        valid=jnp.ones((n,), bool),
        selected=selected,
        answer=answers[selected],
        compute=compute,
        reached_max_steps=at_cap,
        num_nan_scores=nans,
    )


_sample_and_select_jit = eqx.filter_jit(sample_and_select)


def run_sample_and_select(
    key: PRNGKeyArray,
    model: SearchModel,
    num_particles: int,
    max_steps: int | None,
    select_fn: Callable,
    *,
    scored: bool = True,
) -> SearchResult:
    """:func:`sample_and_select` with its arguments checked, compiled and timed
    (:func:`timed_call`). ``select_fn`` is static: pass a module-level function."""
    check_search_model(model)
    n = checks.positive_int("num_particles", num_particles)
    max_steps = resolve_max_steps(model, max_steps)
    return timed_call(
        _sample_and_select_jit, sample_and_select, key, model, n=n, max_steps=max_steps,
        select_fn=select_fn, scored=scored,
    )
