"""The search baselines' common part (:mod:`samplers.search` runs them; this turns their result
into a :class:`~app.methods.base.MethodResult`)."""

from __future__ import annotations

import abc

import numpy as np

from app.methods.base import Compute, Method, MethodResult, RunContext, normalised

__all__ = ["SearchMethod"]


class SearchMethod(Method):
    """A method of :mod:`samplers.search`: :meth:`search` runs it, :meth:`candidate_weights` gives
    the weights reported for its valid candidates."""

    @abc.abstractmethod
    def search(self, ctx: RunContext):
        """The ``samplers.search`` result on ``ctx.model``."""

    def candidate_weights(self, res, valid: np.ndarray, num_answers: int) -> np.ndarray:
        """Default: uniform over the best-scored valid candidates."""
        sc = np.asarray(res.scores, np.float64)[valid]
        w = (sc == sc.max()).astype(float) if sc.size else sc
        return w / w.sum() if w.sum() > 0 else w

    def reward_calls(self, ctx: RunContext, res) -> int:
        return int(res.compute.reward_calls)

    def run(self, ctx: RunContext) -> MethodResult:
        res = self.search(ctx)
        table = ctx.model.answer_table()
        ids = np.asarray(res.answers)
        valid = np.asarray(res.valid)
        all_answers = [table.values[int(a)] for a, v in zip(ids, valid) if v]
        sel = int(res.selected)
        parts = res.particles
        lengths = np.asarray(parts.lm.lengths)
        prompt_len = np.asarray(parts.lm.prompt_lengths)
        toks = np.asarray(parts.lm.tokens[sel])[int(prompt_len[sel]): int(lengths[sel])].tolist()
        w = self.candidate_weights(res, valid, len(all_answers))
        ntok = (lengths - prompt_len)[valid]
        # per valid candidate, in particle order (the order of ``all_answers``): the reward score
        # (NaN where the method never scores) and the tokens it generated; app.scale derives the
        # sampling baselines at every smaller budget from these (nested budgets)
        diag = dict(reached_max_steps=bool(res.reached_max_steps), num_nan_scores=int(res.num_nan_scores),
                    num_steps=int(res.compute.num_steps),
                    scores=[float(x) for x in np.asarray(res.scores, np.float64)[valid]],
                    num_tokens=[int(x) for x in ntok])
        return MethodResult(
            table.values[int(res.answer)], ctx.lm.decode(toks), toks, all_answers,
            list(np.asarray(w, float)),
            Compute(int(res.compute.tokens_generated), self.reward_calls(ctx, res),
                    float(res.compute.wall_time_s), float(res.compute.compile_time_s)),
            self.name, float("nan"), diag,
        )


def sample_weights_by_score(res) -> np.ndarray:
    return normalised(np.asarray(res.scores, np.float64))
