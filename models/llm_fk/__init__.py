"""The Feynman-Kac view of the LLM runtime: LLM generation as a state-space model.

- :mod:`models.llm_fk.step_lm`: the step protocol over language models (the JAX transformer of
  :mod:`models.llm`, and the exact Markov-chain LM of :mod:`models.markov_lm`);
- :mod:`models.llm_fk.rewards`: reward models (verifiers, judges), scored incrementally per step;
- :mod:`models.llm_fk.ssm`: :class:`LLMFeynmanKac`, the model the samplers run.

The runtime itself (loaders, tokenizer, transformer, decoding) is :mod:`models.llm`.
See docs/llm_as_ssm.md.
"""

from models.llm_fk.rewards import (
    FinalAnswerVerifier,
    LLMJudge,
    ProgrammaticStepVerifier,
    RewardModel,
    TokenPairReward,
    TokenVerifier,
    host_fn,
    host_fn_id,
    host_rows,
)
from models.llm_fk.ssm import (
    AGGREGATIONS,
    PURI_LINKS,
    WEIGHTINGS,
    HostAnswer,
    LLMFeynmanKac,
    LLMParticle,
    answer_table,
)
from models.llm_fk.step_lm import (
    AbstractStepLM,
    MarkovDecodeState,
    MarkovStepLM,
    StepInfo,
    StepLM,
    generated_span,
)

__all__ = [
    # step_lm
    "AbstractStepLM", "StepLM", "MarkovStepLM", "MarkovDecodeState", "StepInfo", "generated_span",
    # rewards
    "RewardModel", "TokenPairReward", "TokenVerifier", "ProgrammaticStepVerifier", "FinalAnswerVerifier",
    "LLMJudge", "host_rows", "host_fn_id", "host_fn",
    # ssm
    "LLMParticle", "LLMFeynmanKac", "HostAnswer", "answer_table", "WEIGHTINGS", "AGGREGATIONS", "PURI_LINKS",
]
