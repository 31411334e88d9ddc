r"""Maximising a variational bound with any optax ``GradientTransformation`` (blackjax/optax style).

``state = init(params, optimizer)``, then ``state, info = step(key, state, objective, target,
optimizer)`` per iteration: \(\phi \leftarrow \phi + \text{optimizer}(-\nabla_\phi
\widehat{\mathcal{L}})\), i.e. the optimiser minimises the loss \(-\widehat{\mathcal{L}}\) of
:func:`samplers.variational.objectives.loss`. A step whose loss or gradient is not finite leaves
``params`` and ``opt_state`` unchanged and says so (``info.finite``).

:func:`fit` runs ``num_steps`` steps as compiled ``lax.scan`` chunks (the key of step \(s\) is
``fold_in(key, s)``), shows a progress bar, and returns the loss trace. It stops at the first
non-finite loss or gradient with a ``RuntimeWarning`` and ``nan_stopped=True``; the returned
parameters are then those before that step.

The trainable parameters are the inexact array leaves of ``params``; ``paramax.NonTrainable``
leaves (flowjax) stay fixed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree
from ppl import progress as progress_bar
from samplers.variational.objectives import (
    AbstractGradientEstimator,
    AbstractObjective,
    get_estimator,
    loss as loss_fn,
)

__all__ = ["VIState", "VIInfo", "VIResult", "init", "step", "fit"]


class VIState(NamedTuple):
    """State of the optimisation: the parameters, the optimiser's state (of the trainable part)
    and the number of steps taken."""

    params: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]


class VIInfo(NamedTuple):
    """What one :func:`step` did: the loss (minus the bound estimate) at the parameters before
    the step, the global norm of its gradient, and whether both were finite (else no update)."""

    loss: Float[Array, ""]
    grad_norm: Float[Array, ""]
    finite: Bool[Array, ""]


class VIResult(NamedTuple):
    """Output of :func:`fit`.

    Attributes:
        params: the fitted parameters (with ``nan_stopped``, those before the failing step).
        losses: the loss of every step run, shape [num_steps_run] (the last one non-finite when
            ``nan_stopped``).
        state: the final :class:`VIState`.
        num_steps_run: steps run (``num_steps`` unless stopped).
        nan_stopped: the run stopped at a non-finite loss or gradient.
    """

    params: PyTree
    losses: Float[Array, " S"]
    state: VIState
    num_steps_run: int
    nan_stopped: bool


def _frozen(x) -> bool:
    try:
        import paramax
    except ImportError:  # pragma: no cover - flowjax brings paramax
        return False
    return isinstance(x, paramax.NonTrainable)


def _partition(params):
    return eqx.partition(params, eqx.is_inexact_array, is_leaf=_frozen)


def _check_optimizer(optimizer):
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "optimizer must be an optax GradientTransformation (e.g. optax.adam(1e-2)), got "
            f"{type(optimizer).__name__}"
        )


def init(params: PyTree, optimizer: optax.GradientTransformation) -> VIState:
    """The state at step 0: ``optimizer.init`` on the trainable leaves of ``params``."""
    _check_optimizer(optimizer)
    diff, _ = _partition(params)
    if not jax.tree.leaves(diff):
        raise ValueError("params has no inexact array leaves: there is nothing to optimise")
    return VIState(params, optimizer.init(diff), jnp.asarray(0, jnp.int32))


def step(
    key: PRNGKeyArray,
    state: VIState,
    objective: AbstractObjective,
    target: Any,
    optimizer: optax.GradientTransformation,
    *,
    estimator: str | AbstractGradientEstimator | Mapping[str, str] = "reparameterisation",
) -> tuple[VIState, VIInfo]:
    """One optimiser step on the loss ``-bound(key, objective, params, target)``."""
    _check_optimizer(optimizer)
    est = get_estimator(estimator)
    diff, static = _partition(state.params)

    def f(d):
        return loss_fn(key, objective, eqx.combine(d, static), target, estimator=est)

    value, grads = jax.value_and_grad(f)(diff)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(gnorm)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, diff)
    new_diff = optax.apply_updates(diff, updates)
    new_diff = tree.where(finite, new_diff, diff)
    opt_state = tree.where(finite, opt_state, state.opt_state)
    new = VIState(eqx.combine(new_diff, static), opt_state, state.step + 1)
    return new, VIInfo(value, gnorm, finite)


@eqx.filter_jit
def _chunk(key, state, objective, target, optimizer, estimator, num_steps, *, length):
    # the scan carries the array leaves; the rest of the state (functions of a flow) is static
    arrays, static = eqx.partition(state, eqx.is_array)

    def body(carry, _):
        st_arrays, stopped = carry
        st = eqx.combine(st_arrays, static)
        new, info = step(jax.random.fold_in(key, st.step), st, objective, target, optimizer,
                         estimator=estimator)
        active = ~stopped & (st.step < num_steps)
        ok = active & info.finite
        st_out = tree.where(ok, eqx.filter(new, eqx.is_array), st_arrays)
        return (st_out, stopped | (active & ~info.finite)), (info.loss, active, info.finite)

    (arrays, _), out = jax.lax.scan(body, (arrays, jnp.asarray(False)), None, length)
    return eqx.combine(arrays, static), out


def fit(
    key: PRNGKeyArray,
    params: PyTree,
    objective: AbstractObjective,
    target: Any,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    *,
    estimator: str | AbstractGradientEstimator | Mapping[str, str] = "reparameterisation",
    chunk_size: int = 100,
    progress: bool = True,
) -> VIResult:
    r"""Maximise ``objective`` over ``params`` for ``num_steps`` steps of ``optimizer``.

    Args:
        key: PRNG key (step \(s\) uses ``fold_in(key, s)``).
        params: initial parameters (a family for a numpyro target; the argument of a Feynman-Kac
            builder otherwise; see :func:`samplers.variational.objectives.bound`).
        objective: the bound to maximise.
        target: the model.
        optimizer: any optax ``GradientTransformation``.
        num_steps: steps to run.
        estimator: the gradient estimator.
        chunk_size: steps per compiled ``lax.scan`` (one compilation whatever ``num_steps``).
        progress: a progress bar (stderr; eager calls only).

    Returns:
        :class:`VIResult`; with ``nan_stopped`` a ``RuntimeWarning`` says at which step.
    """
    checks.prng_key("key", key)
    checks.instance("objective", objective, AbstractObjective)
    n = checks.positive_int("num_steps", num_steps)
    chunk = min(checks.positive_int("chunk_size", chunk_size), n)
    est = get_estimator(estimator)
    state = init(params, optimizer)
    total = jnp.asarray(n, jnp.int32)
    traces = []
    stopped = False
    enabled = bool(progress) and not progress_bar.is_traced(key, params)
    with progress_bar.bar(n, "VI", enabled) as on:
        done = 0
        while done < n:
            state, out = _chunk(key, state, objective, target, optimizer, est, total, length=chunk)
            losses, active, finite = (np.asarray(x) for x in out)
            losses, finite = losses[active], finite[active]
            bad = np.flatnonzero(~finite)
            if bad.size:
                traces.append(losses[: bad[0] + 1])
                stopped = True
                break
            traces.append(losses)
            done += int(active.sum())
            if on:
                progress_bar.tick(done)
    trace = np.concatenate(traces) if traces else np.zeros((0,), np.float32)
    if stopped:
        warnings.warn(
            f"variational fit: the loss or its gradient was not finite at step {trace.size - 1} "
            f"(loss {trace[-1]}); stopped there, the returned params are those before that step "
            "(result.nan_stopped). Lower the learning rate, or check the model and the initial "
            "parameters",
            RuntimeWarning,
            stacklevel=2,
        )
    return VIResult(state.params, jnp.asarray(trace), state, int(trace.size), stopped)
