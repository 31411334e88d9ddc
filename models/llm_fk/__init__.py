"""The Feynman-Kac view of the LLM runtime: LLM generation as a state-space model.

- :mod:`models.llm_fk.step_lm`: the step protocol over language models (the JAX transformer of
  :mod:`models.llm`, and the exact Markov-chain LM of :mod:`models.markov_lm`);
- :mod:`models.llm_fk.rewards`: reward models (verifiers, judges, self-certainty), scored
  incrementally per step, and :class:`HostCallbacks` (the per-experiment table of Python callbacks);
- :mod:`models.llm_fk.prm`: :class:`HiddenStatePRM`, a learned process reward on the generator's
  hidden states (shipped weights, trained by ``python -m app.train_prm``);
- :mod:`models.llm_fk.strategies`: weightings, aggregations and links (small ``eqx.Module`` s);
- :mod:`models.llm_fk.ssm`: :class:`LLMFeynmanKac`, the model the samplers run;
- :mod:`models.llm_fk.markov`: that model for the Markov-chain test bed
  (:func:`from_markov_model`, :func:`toy_reasoning_model`).

The runtime itself (loaders, tokenizer, transformer, decoding) is :mod:`models.llm`.
See docs/llm_as_ssm.md.
"""

from models.llm_fk.rewards import (
    ConstantReward,
    FinalAnswerVerifier,
    LLMJudge,
    ProgrammaticStepVerifier,
    RewardModel,
    SelfCertainty,
    TokenPairReward,
    TokenVerifier,
    HostAnswer,
    HostCallbacks,
    host_rows,
)
from models.llm_fk.markov import from_markov_model, toy_reasoning_model
from models.llm_fk.prm import HiddenStatePRM
from models.llm_fk.ssm import (
    AGGREGATIONS,
    PURI_LINKS,
    WEIGHTINGS,
    LLMFeynmanKac,
    LLMParticle,
)
from models.llm_fk.strategies import (
    AbstractAggregation,
    AbstractLink,
    AbstractWeighting,
    IdentityLink,
    LastAggregation,
    LogitLink,
    LogLink,
    MinAggregation,
    ModelAggregation,
    ProductAggregation,
    PuriWeighting,
    TwistedWeighting,
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
    "LLMJudge", "SelfCertainty", "ConstantReward", "HiddenStatePRM", "host_rows", "HostCallbacks", "HostAnswer",
    # strategies
    "AbstractWeighting", "TwistedWeighting", "PuriWeighting", "AbstractAggregation", "LastAggregation",
    "MinAggregation", "ProductAggregation", "ModelAggregation", "AbstractLink", "LogitLink", "IdentityLink",
    "LogLink",
    # ssm
    "LLMParticle", "LLMFeynmanKac", "WEIGHTINGS", "AGGREGATIONS", "PURI_LINKS",
    # the Markov-chain test bed's model (an LLMFeynmanKac)
    "from_markov_model", "toy_reasoning_model",
]
