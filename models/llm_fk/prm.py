r"""A small learned process reward model (PRM): a logistic head on the generator's hidden state.

The generator \(p\) (SmolLM2-135M-Instruct, a :class:`~models.llm_fk.step_lm.StepLM`) already encodes the
prefix \(x_{1:t}\) it has written; the PRM reads its final hidden state at the last token of the prefix,
after the model's final RMS norm,

\[
h(x_{1:t}) = \mathrm{RMSNorm}\big(\mathrm{Transformer}(x_{1:t})_{t}\big) \in \mathbb{R}^H,
\]

standardises it with the training features' mean \(\mu\) and scale \(s\), and applies a logistic head:

\[
\log \hat r(x_{1:t}) = \log \sigma\big(w^\top ((h - \mu) / s) + b\big) \in (-\infty, 0],
\]

\(\hat r\) the predicted probability that the prefix is still correct (no constraint violated yet; for a
finished completion: correct). It is an *imperfect* process reward: the head is fitted
(:mod:`app.train_prm`, an L2-regularised logistic regression) on the task suite's program labels of partial
answers sampled from SmolLM2 for *training* prompts disjoint from the evaluation prompts; the task's
program stays the truth of the experiment.

Cost: one batched forward of one token per particle on top of the generator's own KV cache (the last
token is fed again at its position \(\ell - 1\), which recomputes the K/V entry already in slot \(\ell - 1\)
and the hidden state; the returned cache is dropped, the generator's state is not changed), plus a
dot product. No reward state is kept; ``scores_unfinished = True`` (a process reward).

The shipped head (:meth:`HiddenStatePRM.default`, ``models/llm_fk/weights/prm_smollm2.npz``) holds
``mean``, ``scale``, ``w`` [H] and ``b`` [] (float32) and a JSON ``metadata`` string (training settings,
train / validation / held-out test accuracy and AUC); it loads with ``allow_pickle=False``.

References: Lightman et al. (2023), "Let's verify step by step" (process reward models trained on step
labels); Puri et al. (2025), "A probabilistic inference approach to inference-time scaling of LLMs using
particle-based Monte Carlo methods" (a PRM as the observation model of a particle filter).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from models.llm.transformer import LlamaModel, forward, rms_norm
from models.llm_fk.rewards import RewardModel
from models.llm_fk.step_lm import StepLM

__all__ = ["HiddenStatePRM", "PRM_WEIGHTS", "prefix_hidden_states", "prm_metadata"]

#: the shipped head (trained by ``python -m app.train_prm``)
PRM_WEIGHTS = Path(__file__).resolve().parent / "weights" / "prm_smollm2.npz"

_ARRAYS = ("mean", "scale", "w", "b")


def _transformer(lm) -> LlamaModel:
    """The generator's transformer, or a clear error."""
    if not isinstance(lm, StepLM) or not isinstance(getattr(lm, "model", None), LlamaModel):
        raise TypeError("HiddenStatePRM reads the hidden states of a transformer generator: lm must be a "
                        f"models.llm_fk.StepLM over a models.llm.LlamaModel, got {type(lm).__name__}")
    return lm.model


def prefix_hidden_states(model: LlamaModel, lm_state) -> Float[Array, "N H"]:
    r"""The final-normed hidden state at the last token of every row's prefix, float32 [N, H].

    ``lm_state`` is a :class:`~models.llm.decoding.DecodeState` (``tokens``, ``cache``, ``lengths``):
    the last token of each row is fed again at position \(\ell - 1\) on top of the row's cache, which
    rewrites the same K/V entry at slot \(\ell - 1\) (cache slots below it are the prefix) and returns
    the hidden state there; the returned cache is discarded. Equals a full forward pass over the
    whole prefix up to float32 rounding. Used by :class:`HiddenStatePRM` and by the training script
    (the same code path, so training and scoring features match).
    """
    idx = jnp.maximum(lm_state.lengths - 1, 0).astype(jnp.int32)
    last = jnp.take_along_axis(lm_state.tokens, idx[:, None], axis=1)
    hidden, _ = forward(model, last, idx, lm_state.cache)
    return rms_norm(hidden[:, 0], model.norm, model.config.rms_norm_eps).astype(jnp.float32)


class HiddenStatePRM(RewardModel):
    r"""\(\log \hat r = \log\sigma(w^\top (h - \mu)/s + b)\) of the generator's final-normed hidden
    state \(h\) at the last token of the prefix (see the module docstring).

    ``HiddenStatePRM(mean, scale, w, b)`` (arrays [H], [H], [H], []), :meth:`load` (an ``.npz``
    written by :mod:`app.train_prm`) or :meth:`default` (the shipped head for SmolLM2-135M-Instruct,
    H = 576). The generator must be a :class:`~models.llm_fk.step_lm.StepLM` whose hidden size is H.
    """

    mean: Float[Array, " H"]
    scale: Float[Array, " H"]
    w: Float[Array, " H"]
    b: Float[Array, ""]

    def __init__(self, mean: Float[ArrayLike, " H"], scale: Float[ArrayLike, " H"],
                 w: Float[ArrayLike, " H"], b: Float[ArrayLike, ""]):
        arrays = {k: np.asarray(v, np.float64) for k, v in zip(_ARRAYS, (mean, scale, w, b))}
        h = arrays["w"].shape
        if arrays["w"].ndim != 1 or h[0] < 1:
            raise ValueError(f"w must be a non-empty vector [H], got shape {h}")
        for k in ("mean", "scale"):
            if arrays[k].shape != h:
                raise ValueError(f"{k} must have the shape of w {h}, got {arrays[k].shape}")
        if arrays["b"].shape != ():
            raise ValueError(f"b must be a scalar, got shape {arrays['b'].shape}")
        for k, v in arrays.items():
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{k} must be finite")
        if np.any(arrays["scale"] <= 0):
            raise ValueError("scale must be > 0")
        self.mean, self.scale, self.w, self.b = (jnp.asarray(arrays[k], jnp.float32) for k in _ARRAYS)

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike) -> "HiddenStatePRM":
        """The head stored in an ``.npz`` (arrays ``mean``, ``scale``, ``w``, ``b``; no pickle)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no PRM weights at {path}; train them with "
                                    "`python -m app.train_prm --out models/llm_fk/weights/prm_smollm2.npz`")
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _ARRAYS if k not in f.files]
            if missing:
                raise ValueError(f"{path} is not a PRM head: arrays {missing} are missing (has {f.files})")
            return cls(*(f[k] for k in _ARRAYS))

    @classmethod
    def default(cls) -> "HiddenStatePRM":
        """The shipped head for SmolLM2-135M-Instruct (:data:`PRM_WEIGHTS`)."""
        return cls.load(PRM_WEIGHTS)

    @property
    def hidden_size(self) -> int:
        return int(self.w.shape[0])

    # ------------------------------------------------------------------------------- scoring
    def check_lm(self, lm) -> LlamaModel:
        """The generator's transformer, after checking it fits this head (host, no tracing)."""
        model = _transformer(lm)
        if model.config.hidden_size != self.hidden_size:
            raise ValueError(f"this PRM head expects hidden states of size {self.hidden_size}, but the "
                             f"generator's hidden size is {model.config.hidden_size} (a head trained for "
                             "another model)")
        return model

    def bind(self, lm, prompt_ids, max_new_tokens):
        self.check_lm(lm)
        return self

    def logit(self, hidden: Float[Array, "N H"]) -> Float[Array, " N"]:
        r"""\(w^\top (h - \mu)/s + b\) of final-normed hidden states."""
        return ((hidden - self.mean) / self.scale) @ self.w + self.b

    def log_score(self, lm, state, lm_state, prev_lengths, finished, active):
        model = self.check_lm(lm)
        return jax.nn.log_sigmoid(self.logit(prefix_hidden_states(model, lm_state)))


def prm_metadata(path: str | os.PathLike | None = None) -> dict:
    """The training record stored with a head (default: the shipped one): settings, data sizes,
    train / validation / held-out test accuracy and AUC."""
    path = Path(PRM_WEIGHTS if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"no PRM weights at {path}")
    with np.load(path, allow_pickle=False) as f:
        if "metadata" not in f.files:
            return {}
        return json.loads(str(f["metadata"]))
