r"""Smoothing from a stored SMC run: genealogy tracing and backward sampling.

Given a run with ``store_history=True`` (particles \(x_t^{1:N}\), ancestors \(a_t^{1:N}\), normalised
weights \(W_t^{1:N}\)), the smoothing distribution \(p(x_{0:T-1} \mid y_{0:T-1})\) of a state-space
model (more generally the Feynman-Kac path measure) is approximated by

- **genealogy tracing** (Kitagawa 1996): draw \(b_{T-1} \sim W_{T-1}\), then
  \(b_{t-1} = a_t^{b_t}\). Cheap (\(O(T)\) per path) but degenerate: the early steps of all paths
  share few ancestors.
- **backward sampling** (FFBS; Godsill, Doucet & West 2004): \(b_{T-1} \sim W_{T-1}\), then
  \(P(b_t = i \mid b_{t+1}) \propto W_t^i\, m_{t+1}(x_t^i, x_{t+1}^{b_{t+1}})\). \(O(N)\) per path
  and step, \(O(N^2)\) for \(N\) paths, and free of path degeneracy.
- **MCMC backward sampling** (Bunch & Godsill 2013; Dau & Chopin 2023, "On backward smoothing
  algorithms", Ann. Statist.): start from the genealogy parent \(a_{t+1}^{b_{t+1}}\) (an exact draw
  of the backward kernel given the particles, under multinomial resampling) and apply \(K\)
  independent Metropolis-Hastings steps with proposal \(W_t\), which leave the backward kernel
  invariant. \(O(K)\) per path and step.

The backward kernel uses ``model.log_transition(t, x_{t-1}, x_t)``: it must be the
\(x_{t-1}\)-dependent part of the path measure's factor \(m_t(x_{t-1}, x_t)\, G_t(x_{t-1}, x_t)\) —
for a bootstrap filter the transition density, for a guided filter of a state-space model the
*model* transition \(p(x_t \mid x_{t-1})\) (its potential's \(x_{t-1}\)-dependence cancels the
proposal's). For a Feynman-Kac model whose ``log_transition`` is the density of \(M_t\) alone and
whose potential depends on \(x_{t-1}\), pass ``include_potential=True`` to add
\(\log G_t(x_{t-1}^i, x_t)\). The same convention is used by the engine's ancestor sampling.

Reference: Chopin & Papaspiliopoulos (2020), *An Introduction to Sequential Monte Carlo*, ch. 12.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.smc import SMCHistory, SMCResult

__all__ = [
    "SmoothingSamples",
    "trace_genealogy",
    "genealogy_paths",
    "sample_genealogy",
    "backward_sampling",
    "ffbs",
    "mcmc_backward_sampling",
]


class SmoothingSamples(NamedTuple):
    r"""\(M\) smoothing trajectories of a stored run.

    Attributes:
        trajectories: pytree with leaves [M, T, ...]; ``trajectories[m]`` is one path \(x_{0:T-1}\).
        indices: [M, T] particle index of path \(m\) at step \(t\).
        acceptance_rate: mean MH acceptance of the MCMC backward sampler (1 for FFBS, NaN for
            genealogy tracing).
    """

    trajectories: PyTree
    indices: Int[Array, "M T"]
    acceptance_rate: Float[Array, ""]


def _history_length(history: SMCHistory) -> int:
    if not isinstance(history, SMCHistory):
        raise TypeError(
            "expected an SMCHistory: run smc(..., store_history=True) and pass result.history"
        )
    return int(history.ancestors.shape[0])


def trace_genealogy(
    history: SMCHistory,
    indices: Int[Array, " M"],
    num_steps: Int[Array, ""] | int | None = None,
) -> Int[Array, "M T"]:
    r"""Indices \(b[m, t]\) of the ancestors at step \(t\) of the final particles ``indices[m]``.

    \(b[m, T-1] = \mathrm{indices}[m]\) and \(b[m, t-1] = a_t^{b[m, t]}\). For a variable-horizon run, pass
    ``num_steps`` (``result.num_steps``): rows at or beyond it are padding, and the trace starts at
    row ``num_steps - 1`` (padding rows repeat the final index).
    """
    length = _history_length(history)
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim != 1:
        raise ValueError(
            f"indices must be a 1-D array of final particle indices, got {indices.shape}"
        )
    stop = length if num_steps is None else jnp.asarray(num_steps, jnp.int32)

    def step(b, t):
        parent = jnp.take(history.ancestors[t], b)
        b_prev = jnp.where((t < stop) & (t > 0), parent, b)
        return b_prev, b

    _, rows = jax.lax.scan(step, indices, jnp.arange(length - 1, -1, -1, dtype=jnp.int32))
    return rows[::-1].T


def _paths_from_indices(history: SMCHistory, b: Int[Array, "M T"], num_steps=None) -> PyTree:
    length = history.ancestors.shape[0]
    rows = jnp.arange(length)
    if num_steps is not None:
        rows = jnp.minimum(rows, jnp.asarray(num_steps, jnp.int32) - 1)

    def leaf(x):  # x: [T, N, ...] -> [M, T, ...]
        return x[rows[None, :], b]

    return jax.tree.map(leaf, history.particles)


def genealogy_paths(
    history: SMCHistory,
    indices: Int[Array, " M"],
    num_steps: Int[Array, ""] | int | None = None,
) -> PyTree:
    r"""Trajectories (leaves [M, T, ...]) of the final particles ``indices`` through the genealogy.

    Padding rows of a variable-horizon run (\(t \ge\) ``num_steps``) repeat the final state, which is
    how a finished (``done``) particle stays.
    """
    b = trace_genealogy(history, indices, num_steps)
    return _paths_from_indices(history, b, num_steps)


def sample_genealogy(
    key: PRNGKeyArray, result: SMCResult, num_samples: int
) -> SmoothingSamples:
    r"""Draw ``num_samples`` final particles from \(W_{T-1}\) and trace their genealogy."""
    _check_result(result)
    checks.positive_int("num_samples", num_samples)
    idx = jax.random.categorical(key, result.log_weights, shape=(num_samples,)).astype(jnp.int32)
    b = trace_genealogy(result.history, idx, result.num_steps)
    paths = _paths_from_indices(result.history, b, result.num_steps)
    return SmoothingSamples(paths, b, jnp.asarray(jnp.nan))


def _check_result(result):
    if not isinstance(result, SMCResult):
        raise TypeError(f"expected an SMCResult, got {type(result).__name__}")
    if result.history is None:
        raise ValueError("the SMC run stored no history: call smc(..., store_history=True)")


def _backward_log_weights(model, t_next, x_t, x_next_one, include_potential):
    r"""\(\log m_{t+1}(x_t^i, x_{t+1})\) (\(+ \log G_{t+1}\)) for all \(i\), for one \(x_{t+1}\).

    No particle axis on \(x_{t+1}\).
    """
    batch = tree.broadcast_rows(x_next_one, tree.num_particles(x_t))
    lw = model.log_transition(t_next, x_t, batch)
    if include_potential:
        lw = lw + model.log_potential(t_next, x_t, batch)
    return jnp.where(jnp.isnan(lw), -jnp.inf, lw)


def _check_backward_inputs(model, result):
    _check_result(result)
    checks.feynman_kac_model(model)
    if getattr(model, "num_steps", None) is None:
        raise ValueError(
            "backward sampling needs a fixed-horizon model (num_steps); for variable horizons use "
            "sample_genealogy"
        )
    if model.is_adaptive:
        raise ValueError("backward sampling is not defined for adaptive models (e.g. tempering)")


def ffbs(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    result: SMCResult,
    num_samples: int,
    *,
    include_potential: bool = False,
) -> SmoothingSamples:
    r"""Forward filtering, backward sampling: ``num_samples`` independent paths, \(O(TNM)\).

    \(P(b_t = i \mid b_{t+1}) \propto W_t^i \exp(\mathrm{log\_transition}(t+1, x_t^i, x_{t+1}^{b_{t+1}}))\).
    """
    _check_backward_inputs(model, result)
    checks.positive_int("num_samples", num_samples)
    return _ffbs(key, model, result.history, result.log_weights, num_samples, include_potential)


def _ffbs(key, model, history, final_log_w, m, include_potential):
    length = history.ancestors.shape[0]
    k_last, k_loop = jax.random.split(key)
    b_last = jax.random.categorical(k_last, final_log_w, shape=(m,)).astype(jnp.int32)

    def step(b_next, inp):
        t, k = inp  # sample b_t given b_{t+1}
        x_t = tree.index_time(history.particles, t)
        x_next = tree.index_time(history.particles, t + 1)
        chosen = tree.gather(x_next, b_next)  # [M, ...]
        log_m = jax.vmap(
            lambda one: _backward_log_weights(model, t + 1, x_t, one, include_potential)
        )(chosen)  # [M, N]
        logits = history.log_weights[t][None, :] + log_m
        b_t = jax.random.categorical(k, logits, axis=-1).astype(jnp.int32)
        return b_t, b_t

    ts = jnp.arange(length - 2, -1, -1, dtype=jnp.int32)
    keys = jax.random.split(k_loop, max(length - 1, 1))[: length - 1]
    _, rows = jax.lax.scan(step, b_last, (ts, keys))
    b = jnp.concatenate([rows[::-1], b_last[None]], axis=0).T  # [M, T]
    return SmoothingSamples(_paths_from_indices(history, b), b, jnp.asarray(1.0))


def mcmc_backward_sampling(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    result: SMCResult,
    num_samples: int,
    *,
    num_mcmc_steps: int = 5,
    include_potential: bool = False,
) -> SmoothingSamples:
    r"""Backward sampling by independent Metropolis-Hastings, \(O(TMK)\) (Dau & Chopin 2023).

    At step \(t\), start from the genealogy parent \(i_0 = a_{t+1}^{b_{t+1}}\), then \(K\) times
    propose \(i' \sim W_t\) and accept with probability
    \(\min\big(1, m_{t+1}(x_t^{i'}, x_{t+1}) / m_{t+1}(x_t^{i}, x_{t+1})\big)\): each step leaves the
    FFBS backward kernel invariant.
    """
    _check_backward_inputs(model, result)
    checks.positive_int("num_samples", num_samples)
    checks.positive_int("num_mcmc_steps", num_mcmc_steps)
    return _mcmc_backward(
        key, model, result.history, result.log_weights, num_samples, num_mcmc_steps,
        include_potential,
    )


def _log_m_pairs(model, t_next, x_t, idx, x_next_chosen, include_potential):
    r"""\(\log m_{t+1}(x_t^{\mathrm{idx}[m]}, x^{\mathrm{next}}_m)\) for \(m = 1..M\) (batched over \(M\)).

    \(x^{\mathrm{next}}_m\) is ``x_next_chosen[m]``.
    """
    prev = tree.gather(x_t, idx)
    lw = model.log_transition(t_next, prev, x_next_chosen)
    if include_potential:
        lw = lw + model.log_potential(t_next, prev, x_next_chosen)
    return jnp.where(jnp.isnan(lw), -jnp.inf, lw)


def _mcmc_backward(key, model, history, final_log_w, m, num_mcmc_steps, include_potential):
    length = history.ancestors.shape[0]
    k_last, k_loop = jax.random.split(key)
    b_last = jax.random.categorical(k_last, final_log_w, shape=(m,)).astype(jnp.int32)

    def step(carry, inp):
        b_next, n_acc = carry
        t, k = inp
        x_t = tree.index_time(history.particles, t)
        x_next = tree.index_time(history.particles, t + 1)
        chosen = tree.gather(x_next, b_next)
        cur = jnp.take(history.ancestors[t + 1], b_next)
        log_cur = _log_m_pairs(model, t + 1, x_t, cur, chosen, include_potential)
        w = jnp.exp(history.log_weights[t])
        cdf = jnp.cumsum(w)
        k_prop, k_acc = jax.random.split(k)
        u_prop = jax.random.uniform(k_prop, (num_mcmc_steps, m)) * cdf[-1]
        props = jnp.clip(jnp.searchsorted(cdf, u_prop, side="right"), 0, w.shape[0] - 1)
        log_u = jnp.log(jax.random.uniform(k_acc, (num_mcmc_steps, m)))

        def mh(c, inp2):
            cur, log_cur, acc = c
            prop, lu = inp2
            log_prop = _log_m_pairs(model, t + 1, x_t, prop.astype(jnp.int32), chosen,
                                    include_potential)
            accept = lu < log_prop - log_cur
            # a current state of zero density (possible under adaptive resampling) always moves
            accept = accept | (~jnp.isfinite(log_cur) & jnp.isfinite(log_prop))
            cur = jnp.where(accept, prop.astype(jnp.int32), cur)
            log_cur = jnp.where(accept, log_prop, log_cur)
            return (cur, log_cur, acc + jnp.sum(accept)), None

        (b_t, _, acc), _ = jax.lax.scan(mh, (cur, log_cur, jnp.asarray(0)), (props, log_u))
        return (b_t, n_acc + acc), b_t

    ts = jnp.arange(length - 2, -1, -1, dtype=jnp.int32)
    keys = jax.random.split(k_loop, max(length - 1, 1))[: length - 1]
    (_, n_acc), rows = jax.lax.scan(step, (b_last, jnp.asarray(0)), (ts, keys))
    b = jnp.concatenate([rows[::-1], b_last[None]], axis=0).T
    total = max((length - 1) * m * num_mcmc_steps, 1)
    return SmoothingSamples(_paths_from_indices(history, b), b, n_acc / total)


def backward_sampling(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    result: SMCResult,
    num_samples: int,
    *,
    method: str = "ffbs",
    num_mcmc_steps: int = 5,
    include_potential: bool = False,
) -> SmoothingSamples:
    """Backward sampling with ``method="ffbs"`` (exact backward kernel, O(N) per path and step)
    or ``method="mcmc"`` (independent MH from the genealogy parent, O(K) per path and step)."""
    if method == "ffbs":
        return ffbs(key, model, result, num_samples, include_potential=include_potential)
    if method == "mcmc":
        return mcmc_backward_sampling(
            key, model, result, num_samples, num_mcmc_steps=num_mcmc_steps,
            include_potential=include_potential,
        )
    raise ValueError(f"unknown backward sampling method {method!r}: use 'ffbs' or 'mcmc'")
