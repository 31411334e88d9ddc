r"""The Feynman-Kac model of the Markov-chain test bed: an :class:`~models.llm_fk.ssm.LLMFeynmanKac`.

A :class:`models.markov_lm.MarkovTestBed` (target
\(\pi(w) \propto P(w \mid \mathrm{prompt}) \exp \Phi(w)\),
\(\Phi(w) = \sum_j \varphi(w_{j-1}, w_j) + \psi(\mathrm{answer}(w))\), steps drawn from \(P\) or a
proposal \(Q\)) is run by the same model as the transformer,
:class:`~models.llm_fk.ssm.LLMFeynmanKac`, with

- the step LM :class:`~models.llm_fk.step_lm.MarkovStepLM` (steps drawn from the proposal when
  there is one),
- the reward :class:`~models.llm_fk.rewards.TokenPairReward` ``(φ, ψ, per_step=True)`` — the
  step score
  \(\hat r_t = \exp\big(\sum \varphi \text{ over the new tokens} + \mathbf{1}[\text{finished}]\, \psi\big)\),
- :class:`~models.llm_fk.strategies.ProductAggregation` (\(R_t = \prod_{s \le t} \hat r_s\), so
  \(\log R_t\) is \(\Phi\) of the prefix) and :class:`~models.llm_fk.strategies.TwistedWeighting` at
  \(\beta = 1\) (\(G_t = R_t / R_{t-1} = \hat r_t\)),
- ``correct_proposal`` (the \(P/Q\) of each step) when the test bed has a proposal,

so that \(\prod_t G_t = \exp \Phi(w)\, P(w) / Q(w)\) and SMC on it estimates \(Z = \mathbb{E}_P[\exp \Phi]\)
without bias; the exact answers of :mod:`models.markov_lm_exact` check it (``tests/test_markov_lm.py``). The
search score is \(\log R_t = \Phi\) so far; with ``max_step_tokens = 1`` the model enumerates its children
(``expand_all``) for deterministic beam search (``tests/test_search.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Array, Int

from models.llm_fk.rewards import TokenPairReward
from models.llm_fk.ssm import LLMFeynmanKac
from models.llm_fk.step_lm import MarkovStepLM
from models.llm_fk.strategies import ProductAggregation, TwistedWeighting
from models.markov_lm import MarkovTestBed, last_token_answer, toy_test_bed

__all__ = ["from_markov_model", "toy_reasoning_model", "LastTokenAnswer"]


@dataclasses.dataclass(frozen=True)
class LastTokenAnswer:
    """``answer_ids_fn`` of the Markov LM: the last non-EOS token
    (:func:`models.markov_lm.last_token_answer`; hashable by value, so models built twice share
    their compiled programs)."""

    eos_id: int

    def __call__(self, tokens, lengths, prompt_lengths=None) -> Int[Array, " N"]:
        return last_token_answer(tokens, lengths, self.eos_id)


def from_markov_model(bed: MarkovTestBed) -> LLMFeynmanKac:
    """The :class:`~models.llm_fk.ssm.LLMFeynmanKac` of a
    :class:`~models.markov_lm.MarkovTestBed` (see the module docstring). It finishes every
    sequence within ``bed.max_num_steps`` steps (its ``max_num_steps``); run it with
    ``smc(key, model, N, max_steps=model.max_num_steps)``, or with ``num_steps=...`` for a fixed
    horizon (finished particles wait)."""
    if not isinstance(bed, MarkovTestBed):
        raise TypeError(f"expected a MarkovTestBed, got {type(bed).__name__}")
    prompt = [int(i) for i in np.asarray(bed.prompt)]
    reward = TokenPairReward(np.asarray(bed.constraint.log_pair), np.asarray(bed.constraint.log_final),
                             per_step=True)
    return LLMFeynmanKac.build(
        MarkovStepLM(bed.lm, bed.proposal), prompt, reward,
        max_steps=bed.max_num_steps, max_step_tokens=bed.max_step_tokens,
        max_new_tokens=bed.max_length - len(prompt), weighting=TwistedWeighting(),
        aggregation=ProductAggregation(), temperature=1.0,
        correct_proposal=bed.proposal is not None, answer_ids_fn=LastTokenAnswer(bed.lm.eos_id),
    )


def toy_reasoning_model(*, proposal: bool = False, max_step_tokens: int = 3) -> LLMFeynmanKac:
    """The Feynman-Kac model of the standard test bed :func:`models.markov_lm.toy_test_bed`
    (same arguments; its exact answers: :mod:`models.markov_lm_exact` on that test bed)."""
    return from_markov_model(toy_test_bed(proposal=proposal, max_step_tokens=max_step_tokens))
