r"""A small trained diffusion model of scikit-learn's handwritten digits, shipped with the project.

**Data.** ``sklearn.datasets.load_digits``: 1797 images of \(8 \times 8\) pixels with grey levels
\(0, \dots, 16\) (bundled with scikit-learn, no download), mapped to \(x = \text{pixel}/8 - 1 \in
[-1, 1]^{64}\). :func:`digits_split` fixes one seeded split into a training set (the network saw only
these) and a held-out set (for nearest-neighbour checks of memorisation).

**Forward process.** The VP SDE of :class:`~models.diffusion.vp_sde.VPSDE` (linear \(\beta\) from 0.1
to 20 on \(s \in [0, 1]\)): \(x_s = \alpha_s x_0 + \sigma_s \varepsilon\),
\(\varepsilon \sim \mathcal{N}(0, I)\), \(\alpha_s^2 + \sigma_s^2 = 1\).

**Network.** :class:`DigitsEpsNet` predicts the noise, \(\hat\varepsilon = \varepsilon_\theta(x_s, s,
c)\), from the state, the noise level (sinusoidal features of \(1000 s\) through a small MLP) and a
class label \(c \in \{0, \dots, 9\}\) or the null class \(\varnothing\) (= :data:`NULL_CLASS`). It is a
residual MLP whose blocks are modulated (FiLM) by the sum of the time and class embeddings. Training
minimises \(\mathbb{E}\,\lVert \varepsilon_\theta(\alpha_s x_0 + \sigma_s \varepsilon, s, c) -
\varepsilon \rVert^2\) (Ho et al. 2020, "Denoising diffusion probabilistic models", NeurIPS) with
\(s \sim U(\varepsilon_{\min}, 1)\), and replaces the label by \(\varnothing\) with probability
\(p_{\mathrm{uncond}}\), so that one network gives both the conditional and the unconditional model
(Ho & Salimans 2022, "Classifier-free diffusion guidance"). The score is
\(\nabla \log p_s(x \mid c) \approx -\varepsilon_\theta(x, s, c) / \sigma_s\), and Tweedie's formula
gives the denoised estimate

\[
\hat x_0 = \mathbb{E}[x_0 \mid x_s = x] = \frac{x - \sigma_s\, \hat\varepsilon}{\alpha_s}.
\]

Classifier-free guidance with weight \(w\) uses
\(\tilde\varepsilon = (1 + w)\, \varepsilon_\theta(x, s, c) - w\, \varepsilon_\theta(x, s, \varnothing)\)
(\(w = 0\): the plain conditional model).

**Reverse kernels** (strategies, each a Gaussian \(x' \sim \mathcal{N}(m, \mathrm{std}^2 I)\) given
\(\hat\varepsilon\) at \((x, s)\), stepping \(s \to s' < s\) on the grid of
:meth:`~models.diffusion.vp_sde.VPSDE.time_grid`):

- :class:`EulerMaruyama`: the reverse VP-SDE step of
  :meth:`~models.diffusion.vp_sde.VPSDE.reverse_mean_std` with the score
  \(-\hat\varepsilon/\sigma_s\)
  (the stochastic "DDPM" sampler of Song et al. 2021, "Score-based generative modeling through
  stochastic differential equations", ICLR);
- :class:`DDIM`: \(m = \alpha_{s'} \hat x_0 + \sqrt{\sigma_{s'}^2 - \eta_s^2}\, \hat\varepsilon\),
  \(\mathrm{std} = \eta_s = \eta\, (\sigma_{s'}/\sigma_s) \sqrt{1 - \alpha_s^2/\alpha_{s'}^2}\)
  (Song, Meng & Ermon 2021, "Denoising diffusion implicit models", ICLR, eq. 16): \(\eta = 0\) is the
  deterministic DDIM sampler, \(\eta = 1\) the ancestral DDPM posterior
  \(q(x_{s'} \mid x_s, \hat x_0)\) of Ho et al. 2020.

Because both kernels expose ``mean_std``, the same reverse step is available to Feynman-Kac models
(moves and their log-transition densities); :class:`DigitsScore` adapts the network to the
``score_fn(x, s)`` interface of :class:`~models.diffusion.fk_model.RewardTiltedDiffusion`.

**Weights.** ``models/diffusion/weights/digits_eps.npz`` (numpy ``.npz``, no pickle) holds the
exponential moving average of the parameters, stored by tree path, and a JSON record of the
architecture and training run; :func:`load_digits_model` rebuilds the model from it. The weights come
from ``python -m models.diffusion.train_digits`` (seeded; see that module for the wall time).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from models.diffusion.vp_sde import VPSDE

__all__ = [
    "NUM_CLASSES",
    "NULL_CLASS",
    "DIGITS_WEIGHTS",
    "DigitsEpsNet",
    "DigitsDiffusion",
    "DigitsScore",
    "EulerMaruyama",
    "DDIM",
    "sample_digits",
    "digits_split",
    "to_pixels",
    "load_digits_model",
    "save_digits_model",
]

DIM = 64  # 8 x 8 pixels
NUM_CLASSES = 10
NULL_CLASS = 10  # the label of the unconditional model ("no class")
DIGITS_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_eps.npz"
_FORMAT = "ppl-digits-eps-v1"


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def digits_split(
    holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""``load_digits`` in model space \(x = \text{pixel}/8 - 1 \in [-1, 1]^{64}\), split at random.

    Returns ``(x_train [n_train, 64], y_train [n_train], x_held [n_held, 64], y_held [n_held])`` as
    numpy arrays (float32, int32). The default split (seed 0, 20 % held out: 1438 / 359 images) is
    the one the shipped weights were trained on.
    """
    from sklearn.datasets import load_digits

    f = float(holdout_fraction)
    if not 0.0 < f < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    d = load_digits()
    x = (d.data / 8.0 - 1.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    n_held = max(1, int(round(f * x.shape[0])))
    held, train = perm[:n_held], perm[n_held:]
    return x[train], y[train], x[held], y[held]


def to_pixels(x: Float[Array, "... 64"]) -> Float[Array, "... 8 8"]:
    r"""Model space back to grey levels: \(\mathrm{clip}(8 (x + 1), 0, 16)\), shaped \(8 \times 8\)."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != DIM:
        raise ValueError(f"x must have shape [..., {DIM}], got {x.shape}")
    return jnp.clip(8.0 * (x + 1.0), 0.0, 16.0).reshape(*x.shape[:-1], 8, 8)


# ------------------------------------------------------------------------------------------------
# the network
# ------------------------------------------------------------------------------------------------


def _time_features(s: Float[Array, ""], num_freqs: int) -> Float[Array, " F"]:
    r"""Sinusoidal features of \(1000 s\) (Vaswani et al. 2017; Ho et al. 2020), periods
    \(2\pi\) to \(2\pi \cdot 10^4\)."""
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(num_freqs) / num_freqs)
    arg = 1000.0 * s * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


class _Block(eqx.Module):
    """h + W2 silu(LN(h) W1 * (1 + scale(e)) + shift(e))."""

    norm: eqx.nn.LayerNorm
    lin1: eqx.nn.Linear
    film: eqx.nn.Linear
    lin2: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray, hidden: int):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm = eqx.nn.LayerNorm(hidden)
        self.lin1 = eqx.nn.Linear(hidden, hidden, key=k1)
        self.film = eqx.nn.Linear(hidden, 2 * hidden, key=k2)
        self.lin2 = eqx.nn.Linear(hidden, hidden, key=k3)

    def __call__(self, h, e):
        scale, shift = jnp.split(self.film(e), 2)
        y = self.lin1(self.norm(h)) * (1.0 + scale) + shift
        return h + self.lin2(jax.nn.silu(y))


class DigitsEpsNet(eqx.Module):
    r"""Noise prediction \(\varepsilon_\theta(x, s, c)\) for one image (vmap for a batch).

    ``x`` [64] in model space, ``s`` the noise level in \([0, 1]\), ``c`` an int in
    \(\{0, \dots, 9\}\) or :data:`NULL_CLASS` for the unconditional model. A residual MLP of
    ``num_blocks`` FiLM-modulated blocks of width ``hidden``; the time embedding is an MLP on
    sinusoidal features of \(1000 s\), the class embedding a table of ``NUM_CLASSES + 1`` rows.
    """

    time_mlp: eqx.nn.MLP
    class_emb: eqx.nn.Embedding
    inp: eqx.nn.Linear
    blocks: tuple[_Block, ...]
    out_norm: eqx.nn.LayerNorm
    out: eqx.nn.Linear
    hidden: int = eqx.field(static=True)
    num_blocks: int = eqx.field(static=True)
    num_freqs: int = eqx.field(static=True)

    def __init__(self, key: PRNGKeyArray, hidden: int = 256, num_blocks: int = 3, num_freqs: int = 32):
        if hidden < 1 or num_blocks < 1 or num_freqs < 1:
            raise ValueError("hidden, num_blocks and num_freqs must be positive")
        kt, kc, ki, kb, ko = jax.random.split(key, 5)
        self.time_mlp = eqx.nn.MLP(2 * num_freqs, hidden, hidden, 1, activation=jax.nn.silu, key=kt)
        self.class_emb = eqx.nn.Embedding(NUM_CLASSES + 1, hidden, key=kc)
        self.inp = eqx.nn.Linear(DIM, hidden, key=ki)
        self.blocks = tuple(_Block(k, hidden) for k in jax.random.split(kb, num_blocks))
        self.out_norm = eqx.nn.LayerNorm(hidden)
        self.out = eqx.nn.Linear(hidden, DIM, key=ko)
        self.hidden, self.num_blocks, self.num_freqs = hidden, num_blocks, num_freqs

    def __call__(
        self, x: Float[Array, " 64"], s: Float[Array, ""], c: Int[Array, ""]
    ) -> Float[Array, " 64"]:
        e = jax.nn.silu(self.time_mlp(_time_features(s, self.num_freqs)) + self.class_emb(c))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        return self.out(jax.nn.silu(self.out_norm(h)))


# ------------------------------------------------------------------------------------------------
# the model: network + schedule
# ------------------------------------------------------------------------------------------------


class DigitsDiffusion(eqx.Module):
    r"""The class-conditional digits diffusion: a :class:`DigitsEpsNet` and its :class:`VPSDE` schedule.

    ``eps(x [n, 64], s, labels [n] or [])`` is the batched network;
    ``guided_eps(..., guidance=w)`` the classifier-free-guided
    \((1 + w) \varepsilon_\theta(x, s, c) - w\, \varepsilon_\theta(x, s, \varnothing)\);
    ``score`` is \(-\hat\varepsilon / \sigma_s\) and ``tweedie`` \((x - \sigma_s \hat\varepsilon) / \alpha_s\).
    ``info`` is the record of the training run read from the weights file (empty for a fresh
    network).
    """

    net: DigitsEpsNet
    sde: VPSDE = VPSDE()
    record: str = eqx.field(static=True, default="{}")  # JSON (a static field must be hashable)

    @property
    def info(self) -> dict:
        return json.loads(self.record)

    def eps(
        self, x: Float[Array, "n 64"], s: Float[Array, ""], labels: Int[Array, "n"] | int
    ) -> Float[Array, "n 64"]:
        labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), x.shape[:-1])
        s = jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape[:-1])
        return jax.vmap(self.net)(x, s, labels)

    def guided_eps(
        self,
        x: Float[Array, "n 64"],
        s: Float[Array, ""],
        labels: Int[Array, "n"] | int,
        guidance: float | Float[Array, ""] | None = None,
    ) -> Float[Array, "n 64"]:
        r"""\(\varepsilon_\theta(x, s, c)\) if ``guidance`` is ``None`` (one network call), else the
        CFG combination \((1 + w)\varepsilon_\theta(x, s, c) - w \varepsilon_\theta(x, s, \varnothing)\)
        (two calls)."""
        e_c = self.eps(x, s, labels)
        if guidance is None:
            return e_c
        e_u = self.eps(x, s, NULL_CLASS)
        return (1.0 + guidance) * e_c - guidance * e_u

    def score(
        self,
        x: Float[Array, "n 64"],
        s: Float[Array, ""],
        labels: Int[Array, "n"] | int,
        guidance: float | Float[Array, ""] | None = None,
    ) -> Float[Array, "n 64"]:
        r"""\(\nabla_x \log p_s(x \mid c) \approx -\hat\varepsilon / \sigma_s\)."""
        return -self.guided_eps(x, s, labels, guidance) / self.sde.sigma(s)

    def tweedie(
        self, x: Float[Array, "n 64"], eps: Float[Array, "n 64"], s: Float[Array, ""]
    ) -> Float[Array, "n 64"]:
        r"""Tweedie's denoised estimate \(\hat x_0 = (x - \sigma_s \hat\varepsilon) / \alpha_s\)."""
        return _tweedie(self.sde, x, eps, s)


def _tweedie(sde: VPSDE, x, eps, s):
    return (x - sde.sigma(s) * eps) / sde.alpha(s)


class DigitsScore(eqx.Module):
    r"""The network as a score function ``score_fn(x [..., 64], s)`` for a fixed label (or labels)
    and guidance, e.g. for :class:`~models.diffusion.fk_model.RewardTiltedDiffusion` or
    :meth:`~models.diffusion.vp_sde.VPSDE.sample_reverse`.
    ``label`` = :data:`NULL_CLASS` is the unconditional model."""

    model: DigitsDiffusion
    label: Int[Array, "..."]
    guidance: Any = None

    def __call__(self, x: Float[Array, "... 64"], s: Float[Array, ""]) -> Float[Array, "... 64"]:
        batch = x.shape[:-1]
        flat = x.reshape(-1, DIM)
        label = jnp.broadcast_to(jnp.asarray(self.label, jnp.int32), batch).reshape(-1)
        return self.model.score(flat, s, label, self.guidance).reshape(x.shape)


# ------------------------------------------------------------------------------------------------
# reverse kernels (strategies)
# ------------------------------------------------------------------------------------------------


class EulerMaruyama(eqx.Module):
    r"""Reverse VP-SDE Euler–Maruyama step with the score \(-\hat\varepsilon / \sigma_s\):
    \(m = x + h\beta(s)[\tfrac12 x - \hat\varepsilon/\sigma_s]\), \(\mathrm{std} = \sqrt{h \beta(s)}\),
    \(h = s - s'\) (Song et al. 2021)."""

    def mean_std(
        self,
        sde: VPSDE,
        x: Float[Array, "n 64"],
        eps: Float[Array, "n 64"],
        s: Float[Array, ""],
        s_next: Float[Array, ""],
    ) -> tuple[Float[Array, "n 64"], Float[Array, ""]]:
        return sde.reverse_mean_std(x, -eps / sde.sigma(s), s, s_next)


class DDIM(eqx.Module):
    r"""The DDIM step (Song, Meng & Ermon 2021, eq. 16) in VP notation (\(\bar\alpha = \alpha^2\)):

    \[
    m = \alpha_{s'} \hat x_0 + \sqrt{\sigma_{s'}^2 - \eta_s^2}\, \hat\varepsilon, \qquad
    \eta_s = \eta\, \frac{\sigma_{s'}}{\sigma_s} \sqrt{1 - \frac{\alpha_s^2}{\alpha_{s'}^2}}, \qquad
    \hat x_0 = \frac{x - \sigma_s \hat\varepsilon}{\alpha_s}.
    \]

    ``eta = 0`` (default): deterministic (std 0); ``eta = 1``: the ancestral DDPM posterior of Ho et
    al. 2020 with \(\hat x_0\) plugged in.
    """

    eta: float | Float[Array, ""] = 0.0

    def mean_std(
        self,
        sde: VPSDE,
        x: Float[Array, "n 64"],
        eps: Float[Array, "n 64"],
        s: Float[Array, ""],
        s_next: Float[Array, ""],
    ) -> tuple[Float[Array, "n 64"], Float[Array, ""]]:
        a, sg = sde.alpha(s), sde.sigma(s)
        a_next, sg_next = sde.alpha(s_next), sde.sigma(s_next)
        x0 = _tweedie(sde, x, eps, s)
        std = self.eta * (sg_next / sg) * jnp.sqrt(jnp.clip(1.0 - (a / a_next) ** 2, 0.0))
        mean = a_next * x0 + jnp.sqrt(jnp.clip(sg_next**2 - std**2, 0.0)) * eps
        return mean, std


def _reverse_chain(key, model, labels, kernel, times, guidance, denoise_final):
    n = labels.shape[0]
    k_init, k_chain = jax.random.split(key)
    x = jax.random.normal(k_init, (n, DIM))
    keys = jax.random.split(k_chain, times.shape[0] - 1)

    def body(x, inp):
        k, s, s_next = inp
        eps = model.guided_eps(x, s, labels, guidance)
        mean, std = kernel.mean_std(model.sde, x, eps, s, s_next)
        return mean + std * jax.random.normal(k, mean.shape, mean.dtype), None

    x, _ = jax.lax.scan(body, x, (keys, times[:-1], times[1:]))
    if denoise_final:
        x = model.tweedie(x, model.guided_eps(x, times[-1], labels, guidance), times[-1])
    return x


_reverse_chain_jit = eqx.filter_jit(_reverse_chain)


def sample_digits(
    key: PRNGKeyArray,
    model: DigitsDiffusion,
    labels: Int[Array, " n"],
    kernel: EulerMaruyama | DDIM,
    *,
    num_steps: int = 50,
    eps: float = 1e-3,
    guidance: float | None = None,
    denoise_final: bool = True,
) -> Float[Array, "n 64"]:
    r"""Draw one image per label by ``num_steps`` reverse steps from \(x_{s_0 = 1} \sim \mathcal{N}(0, I)\)
    down the uniform grid ``model.sde.time_grid(num_steps, eps)``, then (``denoise_final``) return
    Tweedie's \(\hat x_0\) at \(s_K = \varepsilon\).

    ``labels`` [n]: classes \(0..9\), or :data:`NULL_CLASS` for unconditional samples. Network calls
    per image: ``num_steps + denoise_final``, doubled with ``guidance`` (classifier-free). Compiled
    once per (n, num_steps, kernel type, guidance is None); the network is an argument, so another
    set of weights of the same shape reuses the compilation. Returns model-space images (see
    :func:`to_pixels`).
    """
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1 or labels.shape[0] < 1:
        raise ValueError(f"labels must have shape [n] with n >= 1, got {labels.shape}")
    if not isinstance(labels, jax.core.Tracer):
        if bool(jnp.any((labels < 0) | (labels > NULL_CLASS))):
            raise ValueError(f"labels must lie in 0..{NULL_CLASS} ({NULL_CLASS} = unconditional)")
    if not isinstance(kernel, (EulerMaruyama, DDIM)):
        raise TypeError(f"kernel must be EulerMaruyama() or DDIM(eta), got {type(kernel).__name__}")
    times = model.sde.time_grid(num_steps, eps)
    g = None if guidance is None else jnp.asarray(guidance, jnp.float32)
    return _reverse_chain_jit(key, model, labels, kernel, times, g, bool(denoise_final))


# ------------------------------------------------------------------------------------------------
# weights: save and load (.npz, no pickle)
# ------------------------------------------------------------------------------------------------


def _is_leaf_array(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _named_leaves(net: DigitsEpsNet) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(net, _is_leaf_array))[0]
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def save_digits_model(path: str | Path, model: DigitsDiffusion, info: dict | None = None) -> None:
    """Write the network's arrays by tree path and a JSON record (architecture, schedule, ``info``)
    to an ``.npz`` file (plain arrays and one unicode string: loadable with ``allow_pickle=False``)."""
    net = model.net
    record = {
        "format": _FORMAT,
        "hidden": net.hidden,
        "num_blocks": net.num_blocks,
        "num_freqs": net.num_freqs,
        "beta_min": model.sde.beta_min,
        "beta_max": model.sde.beta_max,
        **(info or {}),
    }
    arrays = {name: np.asarray(leaf, np.float32) for name, leaf in _named_leaves(net)}
    if "__record__" in arrays:
        raise ValueError("reserved array name")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, __record__=np.asarray(json.dumps(record, sort_keys=True)), **arrays)


def load_digits_model(path: str | Path | None = None) -> DigitsDiffusion:
    """Load the shipped weights (default :data:`DIGITS_WEIGHTS`) or another file written by
    :func:`save_digits_model`; every array's name and shape is checked against the architecture."""
    path = DIGITS_WEIGHTS if path is None else Path(path)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no digits weights at {path}; train them with `python -m models.diffusion.train_digits`"
        )
    with np.load(path, allow_pickle=False) as f:
        record = json.loads(str(f["__record__"]))
        stored = {k: f[k] for k in f.files if k != "__record__"}
    if record.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a digits-model file (format {record.get('format')!r})")
    # the architecture's skeleton without initialising it (shapes only: no random init to compute)
    net = eqx.filter_eval_shape(
        DigitsEpsNet, jax.random.key(0), record["hidden"], record["num_blocks"], record["num_freqs"]
    )
    named = _named_leaves(net)
    if sorted(stored) != sorted(name for name, _ in named):
        raise ValueError(f"{path}: stored arrays do not match the architecture")
    new = []
    for name, leaf in named:
        if stored[name].shape != leaf.shape:
            raise ValueError(f"{path}: {name} has shape {stored[name].shape}, expected {leaf.shape}")
        new.append(jnp.asarray(stored[name], leaf.dtype))
    params, static = eqx.partition(net, _is_leaf_array)
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)
    net = eqx.combine(params, static)
    sde = VPSDE(record["beta_min"], record["beta_max"])
    return DigitsDiffusion(net, sde, json.dumps(record, sort_keys=True))
