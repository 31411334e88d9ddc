"""Diffusion models as Feynman-Kac models, with Gaussian-mixture data as the exact reference."""

from models.diffusion.digits import (
    DDIM,
    DIGITS_WEIGHTS,
    NULL_CLASS,
    DigitsDiffusion,
    DigitsEpsNet,
    DigitsScore,
    EulerMaruyama,
    digits_split,
    load_digits_model,
    sample_digits,
    to_pixels,
)
from models.diffusion.fk_model import (
    POTENTIALS,
    DiffusionParticles,
    LinearReward,
    RewardTiltedDiffusion,
    exact_log_normaliser,
    exact_tilted_target,
    tilted_gmm_diffusion,
)
from models.diffusion.gaussian_mixture import DiffusedMixture, GaussianMixture
from models.diffusion.tilted import tilt, tilt_log_normaliser
from models.diffusion.verifiers import (
    ClassLogProb,
    DigitsClassifier,
    DigitsMLPClassifier,
    digits_halves,
    fit_digits_classifier,
    fit_digits_evaluator,
)
from models.diffusion.vp_sde import VPSDE, ScoreFn

__all__ = [
    "GaussianMixture",
    "DiffusedMixture",
    "VPSDE",
    "ScoreFn",
    "tilt",
    "tilt_log_normaliser",
    "LinearReward",
    "DiffusionParticles",
    "RewardTiltedDiffusion",
    "tilted_gmm_diffusion",
    "exact_tilted_target",
    "exact_log_normaliser",
    "POTENTIALS",
    "DigitsEpsNet",
    "DigitsDiffusion",
    "DigitsScore",
    "EulerMaruyama",
    "DDIM",
    "NULL_CLASS",
    "DIGITS_WEIGHTS",
    "sample_digits",
    "load_digits_model",
    "digits_split",
    "to_pixels",
    "DigitsClassifier",
    "DigitsMLPClassifier",
    "ClassLogProb",
    "digits_halves",
    "fit_digits_classifier",
    "fit_digits_evaluator",
]
