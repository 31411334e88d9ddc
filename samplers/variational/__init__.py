r"""Variational inference over the toolkit's models: every objective is \(\mathbb{E}[\log \hat Z]\).

- :mod:`~samplers.variational.objectives`: ELBO, IWAE(K), Rényi-α and the SMC bound, over numpyro
  models (a family on the unconstrained latents) and Feynman-Kac models; gradient estimators
  (reparameterisation, score function with a control variate, sticking-the-landing);
- :mod:`~samplers.variational.families`: mean-field and full-rank Gaussians, flowjax flows;
- :mod:`~samplers.variational.optimise`: ``init``/``step`` with any optax optimiser and ``fit``.
- :mod:`~samplers.variational.proposals`: learned proposals of a guided filter (VSMC / AESMC / FIVO);
- :mod:`~samplers.variational.twists`: learned twists of the Markov-chain language model.
- :mod:`~samplers.variational.aevb`: variational autoencoders (amortised encoder, ELBO / IWAE
  training, held-out log-likelihood by importance sampling).
"""

from samplers.variational.families import (
    AbstractFamily,
    FlowFamily,
    FullRankGaussian,
    MeanFieldGaussian,
    coupling_flow,
)
from samplers.variational.objectives import (
    ELBO,
    IWAE,
    AbstractGradientEstimator,
    AbstractObjective,
    ImportanceModel,
    RenyiBound,
    Reparameterisation,
    SMCBound,
    ScoreFunction,
    PerLatent,
    StickingTheLanding,
    bound,
    elbo,
    get_estimator,
    iwae,
    loss,
    path_log_weights,
    renyi_bound,
    smc_bound,
)
from samplers.variational.optimise import VIInfo, VIResult, VIState, fit, init, step
from samplers.variational.proposals import (
    AbstractProposal,
    GuidedTarget,
    LinearGaussianProposal,
    MLPProposal,
    guided_target,
)
from samplers.variational.twists import (
    AbstractTwist,
    TableTwist,
    TwistedMarkovLM,
    TwistedSMCBound,
    TwistTarget,
    optimal_twist,
    twist_distance,
    twist_target,
)
from samplers.variational.aevb import (
    VAE,
    AmortisedTarget,
    BernoulliDecoder,
    GaussianEncoder,
    LinearGaussianDecoder,
    heldout_log_likelihood,
)

__all__ = [
    "AbstractFamily",
    "MeanFieldGaussian",
    "FullRankGaussian",
    "FlowFamily",
    "coupling_flow",
    "AbstractObjective",
    "ELBO",
    "IWAE",
    "RenyiBound",
    "SMCBound",
    "AbstractGradientEstimator",
    "Reparameterisation",
    "ScoreFunction",
    "StickingTheLanding",
    "PerLatent",
    "get_estimator",
    "ImportanceModel",
    "bound",
    "loss",
    "elbo",
    "iwae",
    "renyi_bound",
    "smc_bound",
    "path_log_weights",
    "VIState",
    "VIInfo",
    "VIResult",
    "init",
    "step",
    "fit",
    "AbstractProposal",
    "LinearGaussianProposal",
    "MLPProposal",
    "GuidedTarget",
    "guided_target",
    "AbstractTwist",
    "TableTwist",
    "TwistedMarkovLM",
    "TwistTarget",
    "twist_target",
    "optimal_twist",
    "twist_distance",
    "TwistedSMCBound",
    "VAE",
    "GaussianEncoder",
    "BernoulliDecoder",
    "LinearGaussianDecoder",
    "AmortisedTarget",
    "heldout_log_likelihood",
]
