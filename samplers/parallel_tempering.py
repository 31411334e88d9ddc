r"""Particle Gibbs and parallel-tempering particle Gibbs over any Feynman-Kac model.

**Particle Gibbs** (Andrieu, Doucet & Holenstein 2010) iterates the conditional-SMC kernel
\(x^* \mapsto x'\) (reference \(x^*\) pinned in slot 0, new path drawn from the particle system),
which leaves the Feynman-Kac path measure

\[
\pi(x_{0:T-1}) \propto M_0(x_0)\, G_0(x_0) \prod_t M_t(x_{t-1}, x_t)\, G_t(x_{t-1}, x_t)
\]

invariant for any \(N \ge 1\); optionally with ancestor sampling (Lindsten, Jordan & Schön 2014).

**Parallel tempering** (Geyer 1991; Puri et al. 2025, Algorithm 3) runs \(C\) such chains on a
family of models \(\pi_c\) that share the kernels \(M_t\) and differ in their potentials — typically
tempered, \(G_t^{(c)} = G_t^{\beta_c}\) with \(\beta_0 = 1 > \beta_1 > \dots\) — and after every
sweep proposes to swap the references of neighbouring chains \(c, c+1\) (even pairs on even
iterations, odd pairs on odd ones: deterministic even-odd swaps, Okabe et al. 2001, Syed et al.
2021), accepted with probability

\[
\min\left(1, \frac{\gamma_c(x_{c+1})\, \gamma_{c+1}(x_c)}{\gamma_c(x_c)\, \gamma_{c+1}(x_{c+1})}\right),
\qquad
\log \gamma_c(x) = \sum_t \log G_t^{(c)}(x_{t-1}, x_t) + (\text{terms shared by all chains})
\]

(:func:`path_log_potential`). Each sweep leaves \(\prod_c \pi_c\) invariant and so does each swap (a
Metropolis move on the product), hence chain 0 targets \(\pi_0\). With one chain this is particle
Gibbs.

Two ways of drawing the new path: the engine's genealogy (``path_fn=None``: the generic
:func:`samplers.particle_gibbs.csmc_kernel`, which stores the whole particle history), or, for
models whose particle stores its own past (an LLM prefix), ``path_fn(model, particle)`` rebuilding
the path from the final particle — no history, so no copy of every KV cache at every step.

Everything (all sweeps, all chains, the swaps) is one compiled program: a ``lax.scan`` over
iterations of a ``vmap`` over chains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ppl import checks, tree
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.particle_gibbs import csmc_kernel
from samplers.smc import SMCResult, smc

__all__ = [
    "PTPGResult",
    "parallel_tempering_pg",
    "particle_gibbs_fk",
    "csmc_sweep",
    "path_log_potential",
    "initial_paths",
]


def path_log_potential(model: AbstractFeynmanKac, path: PyTree) -> Float[Array, ""]:
    r"""\(\sum_t \log G_t(x_{t-1}, x_t)\) along one path (leaves [T, ...]); steps whose previous
    state is ``done`` contribute 0 (absorbing states, as in the engine). NaN counts as \(-\infty\)."""
    t_len = tree.leading_size(path, "path")
    x0 = tree.add_axis(tree.row(path, 0))
    total = model.log_potential(jnp.asarray(0, jnp.int32), None, x0)[0]
    if t_len > 1:
        prev, cur = tree.consecutive(path)

        def one(t, p, c):
            p1, c1 = tree.add_axis(p), tree.add_axis(c)
            g = model.log_potential(t, p1, c1)[0]
            d = model.done(p1)
            return g if d is None else jnp.where(d[0], 0.0, g)

        ts = jnp.arange(1, t_len, dtype=jnp.int32)
        total = total + jnp.sum(jax.vmap(one)(ts, prev, cur))
    return jnp.where(jnp.isnan(total), -jnp.inf, total)


def csmc_sweep(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    reference: PyTree,
    num_particles: int,
    *,
    path_fn: Callable | None = None,
    ancestor_sampling: bool = False,
    resampling: Any = "multinomial",
    ess_threshold: float = 1.0,
    max_steps: int | None = None,
) -> tuple[PyTree, Any]:
    r"""One conditional-SMC update of ``reference`` (leaves [T, ...]). Returns ``(path, out)``:
    with ``path_fn`` the engine's :class:`~samplers.smc.SMCResult` (\(k \sim W_T\), path =
    ``path_fn(model, particle_k)``; the reference is kept if every particle died), else the
    :class:`~samplers.particle_gibbs.CSMCOutput` of :func:`~samplers.particle_gibbs.csmc_kernel`."""
    if path_fn is None:
        out = csmc_kernel(key, model, reference, num_particles, resampling=resampling,
                          ess_threshold=ess_threshold, ancestor_sampling=ancestor_sampling,
                          max_steps=max_steps)
        return out.trajectory, out
    k_smc, k_sel = jax.random.split(key)
    res = smc(k_smc, model, num_particles, resampling=resampling, ess_threshold=ess_threshold,
              max_steps=max_steps, reference=reference, ancestor_sampling=ancestor_sampling)
    k = jax.random.categorical(k_sel, res.log_weights)
    new = path_fn(model, tree.row(res.particles, k))
    new = tree.where(~res.extinct, new, reference)
    return new, res


class PTPGResult(NamedTuple):
    r"""Output of :func:`parallel_tempering_pg` (\(S\) iterations, \(C\) chains).

    Attributes:
        records: ``record_fn(path)`` of every chain after every iteration (after the swaps),
            leaves [S, C, ...]; chain 0 samples \(\pi_0\).
        sweeps: ``sweep_fn(out)`` of every conditional-SMC sweep (before the swaps), [S, C, ...].
        swap_proposed, swap_accepted: [S, C−1] per neighbouring pair \((c, c+1)\).
        paths: the final references, leaves [C, T, ...].
        num_extinct: [C] sweeps in which every particle died (the reference was kept).
    """

    records: PyTree
    sweeps: PyTree
    swap_proposed: Bool[Array, "S Cm1"]
    swap_accepted: Bool[Array, "S Cm1"]
    paths: PyTree
    num_extinct: Int[Array, " C"]

    @property
    def swap_rate(self) -> Float[Array, " Cm1"]:
        """Acceptance rate of each neighbouring swap (NaN where never proposed)."""
        prop = jnp.sum(self.swap_proposed, axis=0)
        return jnp.sum(self.swap_accepted, axis=0) / jnp.where(prop > 0, prop, jnp.nan)


def _default_record(path):
    return path


def _default_sweep(out):
    return out.log_evidence


def _check(num_particles, num_iterations, betas):
    checks.positive_int("num_particles", num_particles)
    checks.positive_int("num_iterations", num_iterations)
    b = jnp.asarray(betas)
    if b.ndim != 1 or b.shape[0] < 1:
        raise ValueError(f"betas must be a 1-D array of C >= 1 inverse temperatures, got shape {b.shape}")
    return b.shape[0]


def parallel_tempering_pg(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    betas: Float[Array, " C"],
    init_paths: PyTree,
    num_particles: int,
    num_iterations: int,
    *,
    tempered: Callable[[AbstractFeynmanKac, Array], AbstractFeynmanKac],
    path_fn: Callable | None = None,
    ancestor_sampling: bool = False,
    resampling: Any = "multinomial",
    ess_threshold: float = 1.0,
    max_steps: int | None = None,
    swap: bool = True,
    record_fn: Callable[[PyTree], PyTree] = _default_record,
    sweep_fn: Callable[[Any], PyTree] = _default_sweep,
    log_target: Callable[[AbstractFeynmanKac, PyTree], Array] | None = None,
) -> PTPGResult:
    r"""Parallel-tempering particle Gibbs with \(C\) = ``len(betas)`` chains (see the module doc).

    Args:
        key: PRNG key.
        model: the base model; chain \(c\) runs ``tempered(model, betas[c])`` (a static function, e.g.
            ``lambda m, b: m.with_inv_temperature(b)``; the chains must share their kernels \(M_t\)).
        betas: [C] inverse temperatures, chain 0 the target (usually \(\beta_0 = 1 > \beta_1 > \dots\)).
        init_paths: initial references, leaves [C, T, ...] (\(T \ge\) the horizon / ``max_steps``).
        num_particles: \(N\) per conditional-SMC sweep (static).
        num_iterations: \(S\) sweeps of every chain (static).
        tempered, path_fn: see above (``path_fn(model, particle) -> path``).
        ancestor_sampling: PGAS (needs ``model.log_transition``).
        resampling, ess_threshold, max_steps: passed to the engine.
        swap: ``False`` runs \(C\) independent particle-Gibbs chains.
        record_fn: what to keep of every chain's path after every iteration (default: the path).
        sweep_fn: what to keep of every sweep's output (default: its \(\log \hat Z\)).
        log_target: ``log_target(model_c, path)``, the part of \(\log \gamma_c(\mathrm{path})\) that
            differs between chains, for the swap test (default :func:`path_log_potential`; supply the
            full log density when the chains' kernels \(M_t\) differ).

    Returns:
        :class:`PTPGResult`.
    """
    c = _check(num_particles, num_iterations, betas)
    checks.function("tempered", tempered, "tempered(model, beta) -> model")
    for leaf in jax.tree.leaves(init_paths):
        if jnp.shape(leaf)[:1] != (c,):
            raise ValueError(f"init_paths leaves need a leading chain axis of {c}, got {jnp.shape(leaf)}")
    cfg = dict(num_particles=num_particles, num_iterations=num_iterations, tempered=tempered,
               path_fn=path_fn, ancestor_sampling=bool(ancestor_sampling), resampling=resampling,
               ess_threshold=float(ess_threshold), max_steps=max_steps, swap=bool(swap) and c > 1,
               record_fn=record_fn, sweep_fn=sweep_fn,
               log_target=path_log_potential if log_target is None else log_target)
    return _pt_jit(key, model, jnp.asarray(betas, jnp.float32), init_paths, **cfg)


@eqx.filter_jit
def _pt_jit(key, model, betas, paths, *, num_particles, num_iterations, tempered, path_fn,
            ancestor_sampling, resampling, ess_threshold, max_steps, swap, record_fn, sweep_fn,
            log_target):
    c = betas.shape[0]

    def sweep_chain(k, beta, ref):
        m = tempered(model, beta)
        return csmc_sweep(k, m, ref, num_particles, path_fn=path_fn,
                          ancestor_sampling=ancestor_sampling, resampling=resampling,
                          ess_threshold=ess_threshold, max_steps=max_steps)

    def log_gamma(beta, path):
        return jnp.asarray(log_target(tempered(model, beta), path), jnp.float32)

    def body(carry, inp):
        paths, n_ext = carry
        i, k = inp
        k_sweep, k_swap = jax.random.split(k)
        new, out = jax.vmap(sweep_chain)(jax.random.split(k_sweep, c), betas, paths)
        extinct = out.extinct
        n_ext = n_ext + extinct.astype(jnp.int32)
        summary = jax.vmap(sweep_fn)(out)
        if swap:
            # L[a, b] = log γ_a(x_b)
            mat = jax.vmap(lambda b: jax.vmap(lambda p: log_gamma(b, p))(new))(betas)
            lo = jnp.arange(c - 1)
            proposed = (lo % 2) == (i % 2)
            log_a = mat[lo, lo + 1] + mat[lo + 1, lo] - mat[lo, lo] - mat[lo + 1, lo + 1]
            log_a = jnp.where(jnp.isnan(log_a), -jnp.inf, log_a)
            u = jax.random.uniform(k_swap, (c - 1,))
            accepted = proposed & (jnp.log(u) < log_a)
            perm = jnp.arange(c)
            up = jnp.concatenate([accepted, jnp.zeros((1,), bool)])  # chain a swaps with a + 1
            down = jnp.concatenate([jnp.zeros((1,), bool), accepted])  # chain a swaps with a − 1
            perm = jnp.where(up, perm + 1, jnp.where(down, perm - 1, perm))
            new = tree.gather(new, perm)
        else:
            proposed = accepted = jnp.zeros((max(c - 1, 0),), bool)
        rec = jax.vmap(record_fn)(new)
        return (new, n_ext), (rec, summary, proposed, accepted)

    keys = jax.random.split(key, num_iterations)
    carry = (paths, jnp.zeros((c,), jnp.int32))
    (paths, n_ext), (rec, summ, prop, acc) = jax.lax.scan(
        body, carry, (jnp.arange(num_iterations), keys)
    )
    return PTPGResult(rec, summ, prop, acc, paths, n_ext)


def particle_gibbs_fk(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    init_path: PyTree,
    num_particles: int,
    num_iterations: int,
    **kwargs,
) -> PTPGResult:
    r"""Particle Gibbs on any Feynman-Kac model: :func:`parallel_tempering_pg` with one chain at
    \(\beta = 1\) (``tempered`` = identity; ``init_path`` leaves [T, ...]). Results have a chain axis of 1."""
    paths = tree.add_axis(init_path)
    kwargs.setdefault("tempered", _identity_tempered)
    return parallel_tempering_pg(key, model, jnp.ones((1,)), paths, num_particles, num_iterations,
                                 swap=False, **kwargs)


def _identity_tempered(model, beta):
    return model


def initial_paths(
    key: PRNGKeyArray,
    model: AbstractFeynmanKac,
    betas: Float[Array, " C"],
    num_particles: int,
    *,
    tempered: Callable,
    path_fn: Callable,
    resampling: Any = "multinomial",
    ess_threshold: float = 1.0,
    max_steps: int | None = None,
) -> tuple[PyTree, SMCResult]:
    r"""Initial references of \(C\) chains: one unconditional SMC run per chain on
    ``tempered(model, betas[c])``, one particle drawn \(\propto W_T\), its path by ``path_fn``. Returns
    ``(paths [C, T, ...], the C SMC results)``."""
    c = _check(num_particles, 1, betas)
    return _init_jit(key, model, jnp.asarray(betas, jnp.float32), num_particles=num_particles, c=c,
                     tempered=tempered, path_fn=path_fn, resampling=resampling,
                     ess_threshold=float(ess_threshold), max_steps=max_steps)


@eqx.filter_jit
def _init_jit(key, model, betas, *, num_particles, c, tempered, path_fn, resampling, ess_threshold,
              max_steps):
    def one(k, beta):
        m = tempered(model, beta)
        k1, k2 = jax.random.split(k)
        res = smc(k1, m, num_particles, resampling=resampling, ess_threshold=ess_threshold,
                  max_steps=max_steps)
        i = jax.random.categorical(k2, res.log_weights)
        return path_fn(m, tree.row(res.particles, i)), res

    return jax.vmap(one)(jax.random.split(key, c), betas)
