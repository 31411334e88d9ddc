"""``pf``: particle filtering — ``samplers.smc`` on the LLM Feynman-Kac model, N = B particles; the
answer is the weighted majority Σ_i W_i 1{a_i = a} (or ``selection``)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
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
    timed,
    weighted_choice,
)
from models.llm_fk.ssm import total_compute
from samplers.smc import smc

__all__ = ["ParticleFilter"]


@eqx.filter_jit
def _pf_core(key, model, *, n, resampling, ess_threshold):
    res = smc(key, model, n, resampling=resampling, ess_threshold=ess_threshold,
              max_steps=model.max_steps)
    flags = dict(extinct=res.extinct, num_nan_potentials=res.num_nan_potentials,
                 reached_max_steps=res.reached_max_steps, num_steps=res.num_steps,
                 moves_proposed=jnp.sum(res.step_info["moves_proposed"]),
                 moves_accepted=jnp.sum(res.step_info["moves_accepted"]))
    tokens, calls = total_compute(res.step_info)
    return final(res.particles, res.log_weights), res.log_evidence, tokens, calls, flags


class ParticleFilter(Method):
    name: ClassVar[str] = "pf"
    uses_potentials: ClassVar[bool] = True
    summary: ClassVar[str] = "particle filtering (samplers.smc), N = B particles"

    def run(self, ctx: RunContext) -> MethodResult:
        o, budget = ctx.options, ctx.budget
        ess = o["ess_threshold"]
        if ess is None:
            ess = ctx.model.weighting.default_ess_threshold
        (fin, log_z, tok, calls, flags), wall, comp = timed(
            _pf_core, ctx.key, ctx.model, n=budget, resampling=o["resampling"], ess_threshold=float(ess))
        comps = [completion(fin, i) for i in range(budget)]
        answers = [ctx.answer_fn(c) for c in comps]
        log_w = np.asarray(fin.log_weights, np.float64)
        w = normalised(log_w)
        i = weighted_choice(answers, w, log_w, ctx.selection, ctx.rng)
        return MethodResult(
            answers[i], ctx.lm.decode(comps[i]), comps[i], answers, w.tolist(),
            Compute(int(tok), int(calls), wall, comp), self.name, float(log_z),
            {**{k: np.asarray(v).item() for k, v in flags.items()},
             "unique_completions": len({tuple(c) for c in comps}),
             "unique_first_steps": unique_first_steps(comps, ctx.lm.delimiter_ids)},
        )


def unique_first_steps(completions: list[list[int]], delimiter_ids) -> int:
    """Distinct first steps (tokens up to and including the first delimiter) among the final
    particles: how many different step-1 ancestors survive, the path-degeneracy diagnostic of a
    particle filter (1 = every particle descends from one first step)."""
    stops = set(int(d) for d in delimiter_ids)
    firsts = set()
    for c in completions:
        k = next((j + 1 for j, t in enumerate(c) if int(t) in stops), len(c))
        firsts.add(tuple(c[:k]))
    return len(firsts)
