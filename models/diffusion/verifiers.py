r"""Verifiers (rewards) for the digits diffusion model: classifiers of real digits in model space.

**Data.** ``sklearn.datasets.load_digits`` (1797 images, \(8 \times 8\), grey levels \(0..16\)) in
the model space of :mod:`models.diffusion.digits`, \(x = \text{pixel}/8 - 1 \in [-1, 1]^{64}\).
:func:`digits_halves` cuts it into two disjoint seeded halves, **A** (899 images) and **B** (898):
the *verifier* used by a search is fitted on A, the *independent evaluator* that judges the search
is fitted on B, so that a search which exploits the verifier's idiosyncrasies ("reward hacking")
shows up as a gap between verifier and evaluator accuracy. (The halves do not follow the diffusion
model's own train / held-out split of :func:`~models.diffusion.digits.digits_split`; both halves
hold images the diffusion model was trained on.)

**Classifiers.** :class:`DigitsClassifier` is a multinomial logistic regression

\[
\log p(y = k \mid x) = w_k^\top \tilde x + b_k - \operatorname{logsumexp}_j (w_j^\top \tilde x + b_j),
\qquad \tilde x = \mathrm{clip}(x, -1, 1),
\]

(the clip is what a user sees: grey levels clipped to \(0..16\); switch it off with
``clip=False`` for gradients outside the box). :class:`DigitsMLPClassifier` is a one-hidden-layer
ReLU network with the same interface, \(\log \mathrm{softmax}(W_2 \mathrm{relu}(W_1 \tilde x + b_1)
+ b_2)\). Both are fitted by scikit-learn (``LogisticRegression`` with L-BFGS; ``MLPClassifier``
with Adam, seeded), one BLAS thread, deterministic, and their weights copied into JAX arrays, so
they are pure, jittable and differentiable ``eqx.Module`` s. :func:`fit_digits_classifier` fits
either on either half; :func:`fit_digits_evaluator` is the default independent judge (an MLP on
half B: another model class *and* other data than the verifier, a logistic regression on A).

**Reward.** :class:`ClassLogProb` is the verifier as a reward \(r(x) = \log p(y = c \mid x)\) for a
target class \(c\), batched over any leading shape, for \(\hat x_0\) (Tweedie's estimate at a
noise level) or a final sample \(x_0\), inside or outside ``jit``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = [
    "DigitsClassifier",
    "DigitsMLPClassifier",
    "ClassLogProb",
    "digits_halves",
    "fit_digits_classifier",
    "fit_digits_evaluator",
]

DIM = 64
NUM_CLASSES = 10
_SPLITS = ("A", "B")


def digits_halves(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r"""The two disjoint seeded halves of ``load_digits`` in model space, ``{"A": (x, y), "B": (x, y)}``.

    ``x`` float32 \([n, 64]\) with \(x = \text{pixel}/8 - 1\), ``y`` int32 \([n]\); A has
    \(\lceil 1797/2 \rceil = 899\) images, B the other 898 (a random permutation with
    ``numpy.random.default_rng(seed)``).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 8.0 - 1.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    half = (x.shape[0] + 1) // 2
    a, b = perm[:half], perm[half:]
    return {"A": (x[a], y[a]), "B": (x[b], y[b])}


def _check_x(x):
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != DIM:
        raise ValueError(f"x must have shape [..., {DIM}], got {x.shape}")
    return x


class DigitsClassifier(eqx.Module):
    r"""Multinomial logistic regression of the digit class, \(\log p(y \mid x) =
    \log\mathrm{softmax}(W \tilde x + b)\), \(\tilde x = \mathrm{clip}(x, -1, 1)\) if ``clip``.

    ``weight`` \([10, 64]\), ``bias`` \([10]\). Build with :func:`fit_digits_classifier`.
    """

    weight: Float[Array, "10 64"]
    bias: Float[Array, "10"]
    clip: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.weight.shape != (NUM_CLASSES, DIM) or self.bias.shape != (NUM_CLASSES,):
            raise ValueError(
                f"weight must be [10, 64] and bias [10], got {self.weight.shape}, {self.bias.shape}"
            )

    def logits(self, x: Float[Array, "... 64"]) -> Float[Array, "... 10"]:
        x = _check_x(x)
        if self.clip:
            x = jnp.clip(x, -1.0, 1.0)
        return x @ self.weight.T + self.bias

    def log_probs(self, x: Float[Array, "... 64"]) -> Float[Array, "... 10"]:
        r"""\(\log p(y = k \mid x)\) for \(k = 0..9\), batched over the leading axes."""
        return jax.nn.log_softmax(self.logits(x), axis=-1)

    def predict(self, x: Float[Array, "... 64"]) -> Int[Array, "..."]:
        """The most probable class."""
        return jnp.argmax(self.logits(x), axis=-1)


class DigitsMLPClassifier(eqx.Module):
    r"""One-hidden-layer ReLU classifier, \(\log\mathrm{softmax}(W_2\, \mathrm{relu}(W_1 \tilde x + b_1)
    + b_2)\), same interface as :class:`DigitsClassifier` (a different model class, for an
    independent evaluator). Build with ``fit_digits_classifier(..., kind="mlp")``."""

    w1: Float[Array, "H 64"]
    b1: Float[Array, " H"]
    w2: Float[Array, "10 H"]
    b2: Float[Array, "10"]
    clip: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        h = self.w1.shape[0]
        if self.w1.shape != (h, DIM) or self.b1.shape != (h,) or self.w2.shape != (NUM_CLASSES, h):
            raise ValueError("w1 must be [H, 64], b1 [H], w2 [10, H], b2 [10]")
        if self.b2.shape != (NUM_CLASSES,):
            raise ValueError(f"b2 must be [10], got {self.b2.shape}")

    def logits(self, x: Float[Array, "... 64"]) -> Float[Array, "... 10"]:
        x = _check_x(x)
        if self.clip:
            x = jnp.clip(x, -1.0, 1.0)
        return jax.nn.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2

    def log_probs(self, x: Float[Array, "... 64"]) -> Float[Array, "... 10"]:
        return jax.nn.log_softmax(self.logits(x), axis=-1)

    def predict(self, x: Float[Array, "... 64"]) -> Int[Array, "..."]:
        return jnp.argmax(self.logits(x), axis=-1)


def fit_digits_classifier(
    split: str = "A",
    *,
    kind: str = "logistic",
    C: float = 1.0,
    hidden: int = 64,
    seed: int = 0,
    clip: bool = True,
) -> DigitsClassifier | DigitsMLPClassifier:
    r"""Fit a digits classifier on half ``split`` (``"A"`` or ``"B"``) of :func:`digits_halves`.

    ``kind="logistic"``: :class:`DigitsClassifier`, scikit-learn ``LogisticRegression(C=C)``
    (multinomial, L-BFGS, 1000 iterations; deterministic). ``kind="mlp"``:
    :class:`DigitsMLPClassifier` with ``hidden`` ReLU units, ``MLPClassifier`` (Adam, L2
    \(10^{-3}\), ``random_state=seed``; deterministic on one thread). ``seed`` also fixes the halves.
    The fit runs on one BLAS/OpenMP thread (on a busy small machine the default threads are far
    slower) and takes under a second. Accuracy on the *other* half (seed 0): 0.969 (logistic on
    A), 0.962 (logistic on B), 0.972 (MLP on B).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    if split not in _SPLITS:
        raise ValueError(f"split must be 'A' or 'B', got {split!r}")
    if kind not in ("logistic", "mlp"):
        raise ValueError(f"kind must be 'logistic' or 'mlp', got {kind!r}")
    if not C > 0:
        raise ValueError(f"C must be positive, got {C!r}")
    if not (isinstance(hidden, int) and hidden >= 1):
        raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
    x, y = digits_halves(seed)[split]
    with threadpool_limits(1):
        if kind == "logistic":
            clf = LogisticRegression(C=C, max_iter=1000).fit(x, y)
            return DigitsClassifier(
                jnp.asarray(clf.coef_, jnp.float32), jnp.asarray(clf.intercept_, jnp.float32), clip
            )
        clf = MLPClassifier(
            hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=500, random_state=seed
        ).fit(x, y)
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return DigitsMLPClassifier(f(w1.T), f(b1), f(w2.T), f(b2), clip)


def fit_digits_evaluator(seed: int = 0) -> DigitsMLPClassifier:
    """The default independent judge of a search: an MLP fitted on half B (the verifier of the
    searches is ``fit_digits_classifier("A")``, a logistic regression on half A)."""
    return fit_digits_classifier("B", kind="mlp", seed=seed)


class ClassLogProb(eqx.Module):
    r"""Reward \(r(x) = \log p(y = c \mid x)\) of a classifier for a target class \(c\).

    ``classifier``: anything with ``log_probs(x [..., 64]) -> [..., 10]`` (e.g.
    :class:`DigitsClassifier`); ``target``: an int in \(0..9\), or an int array broadcastable
    against the batch shape of ``x`` (one target per sample). ``__call__(x [..., 64]) -> [...]``;
    jittable and differentiable (a pytree: the classifier's weights are leaves).
    """

    classifier: eqx.Module
    target: Int[Array, "..."]

    def __init__(self, classifier: eqx.Module, target: int | Int[Array, "..."]):
        if not callable(getattr(classifier, "log_probs", None)):
            raise TypeError(f"classifier needs a log_probs method, got {type(classifier).__name__}")
        t = jnp.asarray(target)
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise TypeError(f"target must be an int class label, got dtype {t.dtype}")
        if not isinstance(t, jax.core.Tracer) and bool(jnp.any((t < 0) | (t >= NUM_CLASSES))):
            raise ValueError(f"target must lie in 0..{NUM_CLASSES - 1}, got {target!r}")
        self.classifier = classifier
        self.target = t.astype(jnp.int32)

    def __call__(self, x: Float[Array, "... 64"]) -> Float[Array, "..."]:
        lp = self.classifier.log_probs(x)
        t = jnp.broadcast_to(self.target, lp.shape[:-1])
        return jnp.take_along_axis(lp, t[..., None], axis=-1)[..., 0]
