"""``pg``: particle Gibbs — a particle filter draws the first reference, then ``pg_iterations``
conditional-SMC sweeps of N = B particles (optionally with ancestor sampling); the answer is the
weighted vote over the particle systems of every sweep. Shares its compiled core with ``ptpg``
(:mod:`app.methods.parallel_tempering`), which is the same with several tempered chains."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from app.methods.base import (
    Compute,
    Method,
    MethodResult,
    RunContext,
    completion,
    final,
    normalised,
    positive_int_option,
    timed,
    weighted_choice,
)
from models.llm_fk.ssm import total_compute
from samplers.parallel_tempering import initial_paths, parallel_tempering_pg

__all__ = ["ParticleGibbs"]


def _temper(model, beta):
    return model.with_inv_temperature(beta)


def _path(model, particle):
    return model.path(particle)


def _record(path):
    return path.lm.lengths[-1]


def _sweep_summary(res):
    tokens, calls = total_compute(res.step_info)
    return final(res.particles, res.log_weights), tokens, calls, res.extinct, res.num_nan_potentials


@eqx.filter_jit
def _pt_core(key, model, betas, *, n, iterations, ancestor_sampling, resampling, ess_threshold,
             swap):
    k0, k1 = jax.random.split(key)
    paths, init = initial_paths(k0, model, betas, n, tempered=_temper, path_fn=_path,
                                resampling=resampling, ess_threshold=ess_threshold,
                                max_steps=model.max_steps)
    out = parallel_tempering_pg(
        k1, model, betas, paths, n, iterations, tempered=_temper, path_fn=_path,
        ancestor_sampling=ancestor_sampling, resampling=resampling, ess_threshold=ess_threshold,
        max_steps=model.max_steps, swap=swap, record_fn=_record, sweep_fn=_sweep_summary,
    )
    finals, tok, calls, extinct, nans = out.sweeps
    init_tokens, init_calls = total_compute(init.step_info)  # summed over the chains too
    tokens = init_tokens + jnp.sum(tok)
    reward_calls = init_calls + jnp.sum(calls)
    flags = dict(num_extinct_sweeps=jnp.sum(extinct) + jnp.sum(init.extinct),
                 num_nan_potentials=jnp.sum(nans) + jnp.sum(init.num_nan_potentials),
                 swap_proposed=out.swap_proposed, swap_accepted=out.swap_accepted)
    cold = jax.tree.map(lambda x: x[:, 0], finals)  # [S, N, ...] of the target chain
    return cold, tokens, reward_calls, flags


class ParticleGibbs(Method):
    name: ClassVar[str] = "pg"
    uses_potentials: ClassVar[bool] = True
    summary: ClassVar[str] = "particle Gibbs: a PF, then pg_iterations conditional-SMC sweeps of B particles"
    swap: ClassVar[bool] = False

    def check_options(self, options):
        positive_int_option(options, "pg_iterations")

    def betas(self, beta: float, options: dict) -> np.ndarray:
        """Inverse temperatures of the chains (one: the target's)."""
        return np.asarray([beta])

    def run(self, ctx: RunContext) -> MethodResult:
        o, budget = ctx.options, ctx.budget
        iterations = positive_int_option(o, "pg_iterations")
        betas = self.betas(float(ctx.model.inv_temperature), o)
        (cold, tok, calls, flags), wall, comp = timed(
            _pt_core, ctx.key, ctx.model, jnp.asarray(betas, jnp.float32), n=budget,
            iterations=iterations, ancestor_sampling=bool(o["ancestor_sampling"]),
            resampling="multinomial", ess_threshold=1.0, swap=self.swap)
        answers, weights, comps, logs = [], [], [], []
        for s in range(iterations):
            fin = jax.tree.map(lambda x: np.asarray(x[s]), cold)
            w = normalised(fin.log_weights) / iterations
            for i in range(budget):
                c = completion(fin, i)
                comps.append(c)
                answers.append(ctx.answer_fn(c))
                weights.append(w[i])
                logs.append(np.log(w[i]) if w[i] > 0 else -np.inf)
        weights = np.asarray(weights)
        i = weighted_choice(answers, weights, np.asarray(logs), ctx.selection, ctx.rng)
        last = slice((iterations - 1) * budget, iterations * budget)
        prop = np.asarray(flags["swap_proposed"]).sum(0)
        acc = np.asarray(flags["swap_accepted"]).sum(0)
        diag = dict(num_extinct_sweeps=int(flags["num_extinct_sweeps"]),
                    num_nan_potentials=int(flags["num_nan_potentials"]),
                    swap_rate=[float(a / p) if p else float("nan") for a, p in zip(acc, prop)],
                    betas=betas.tolist())
        return MethodResult(
            answers[i], ctx.lm.decode(comps[i]), comps[i], answers[last],
            (weights[last] * iterations).tolist(), Compute(int(tok), int(calls), wall, comp), self.name,
            float("nan"), diag,
        )
