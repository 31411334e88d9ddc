"""The Markov-chain LM's Feynman-Kac model as an :class:`~models.llm_fk.ssm.LLMFeynmanKac`.

:class:`models.markov_lm.MarkovLMFeynmanKac` (the exact test bed: G_t = exp(Σ φ over the step's
tokens + ψ(answer) on finishing) × p/q) is the LLM Feynman-Kac model with

- the step LM :class:`~models.llm_fk.step_lm.MarkovStepLM` (steps drawn from the proposal when
  there is one),
- the reward :class:`~models.llm_fk.rewards.TokenPairReward` ``(φ, ψ, per_step=True)`` — the
  step score r̂_t = exp(Σ φ over the new tokens + 1[finished] ψ),
- :class:`~models.llm_fk.strategies.ProductAggregation` (R_t = ∏ r̂_s) and
  :class:`~models.llm_fk.strategies.TwistedWeighting` at β = 1 (G_t = R_t / R_{t−1} = r̂_t),
- ``correct_proposal`` (the p/q of each step) when the model has a proposal.

:func:`from_markov_model` builds it. With the same keys both draw the same tokens (the same
``generate_step`` calls) and give the same potentials up to float32 rounding, so SMC on either
gives the same log Ẑ; ``tests/test_markov_lm.py`` checks this, which carries the exact tests of
the Markov model (forward recursion) over to :class:`~models.llm_fk.ssm.LLMFeynmanKac`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from models.llm_fk.rewards import TokenPairReward
from models.llm_fk.ssm import LLMFeynmanKac
from models.llm_fk.step_lm import MarkovStepLM
from models.llm_fk.strategies import ProductAggregation, TwistedWeighting

__all__ = ["from_markov_model", "LastTokenAnswer"]


@dataclasses.dataclass(frozen=True)
class LastTokenAnswer:
    """``answer_ids_fn`` of the Markov LM: the last non-EOS token (hashable by value, so models
    built twice share their compiled programs)."""

    eos_id: int

    def __call__(self, tokens, lengths, prompt_lengths=None):
        idx = jnp.maximum(lengths - 1, 0)
        last = jnp.take_along_axis(tokens, idx[:, None], axis=1)[:, 0]
        before = jnp.take_along_axis(tokens, jnp.maximum(idx - 1, 0)[:, None], axis=1)[:, 0]
        return jnp.where(last == self.eos_id, before, last).astype(jnp.int32)


def from_markov_model(model) -> LLMFeynmanKac:
    """The :class:`~models.llm_fk.ssm.LLMFeynmanKac` of a
    :class:`~models.markov_lm.MarkovLMFeynmanKac` (see the module docstring)."""
    from models.markov_lm import MarkovLMFeynmanKac

    if not isinstance(model, MarkovLMFeynmanKac):
        raise TypeError(f"expected a MarkovLMFeynmanKac, got {type(model).__name__}")
    if model.num_steps is not None:
        raise ValueError("from_markov_model supports the variable horizon only (num_steps=None)")
    prompt = [int(i) for i in np.asarray(model.prompt)]
    reward = TokenPairReward(np.asarray(model.constraint.log_pair), np.asarray(model.constraint.log_final),
                             per_step=True)
    return LLMFeynmanKac.build(
        MarkovStepLM(model.lm, model.proposal), prompt, reward,
        max_steps=model.max_num_steps, max_step_tokens=model.max_step_tokens,
        max_new_tokens=model.max_length - len(prompt), weighting=TwistedWeighting(),
        aggregation=ProductAggregation(), temperature=1.0,
        correct_proposal=model.proposal is not None, answer_ids_fn=LastTokenAnswer(model.lm.eos_id),
    )
