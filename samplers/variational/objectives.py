r"""Variational objectives as \(\mathbb{E}[\log \hat Z]\) of an estimator, and their gradient estimators.

Every objective here is a lower bound on \(\log Z\) (Jensen: \(\mathbb{E}\log \hat Z \le \log
\mathbb{E} \hat Z = \log Z\) for an unbiased \(\hat Z\)), to be **maximised**; the loss of
:mod:`samplers.variational.optimise` is its negative. With importance weights
\(w_k = p(x, z_k) / q_\phi(z_k)\), \(z_{1:K} \sim q_\phi\) i.i.d.:

\[
\begin{aligned}
\text{ELBO} &= \mathbb{E}_q[\log w_1] = \log p(x) - \mathrm{KL}(q_\phi \,\|\, p(\cdot \mid x)), \\
\text{IWAE}_K &= \mathbb{E}\Big[\log \tfrac1K \textstyle\sum_k w_k\Big]
  \quad (\text{increasing in } K \text{ to } \log p(x);\ \text{Burda et al. 2016}), \\
\mathcal{L}_\alpha &= \mathbb{E}\Big[\tfrac{1}{1-\alpha} \log \tfrac1K \textstyle\sum_k
  w_k^{1-\alpha}\Big], \quad \alpha \in [0, 1)
  \quad (\text{Rényi bound, Li \& Turner 2016; } \alpha = 0 \text{ is IWAE}),
\end{aligned}
\]

and the SMC bound \(\mathbb{E}[\log \hat Z_{\mathrm{SMC}}]\) of a particle filter whose proposal
carries \(\phi\) (FIVO / AESMC / VSMC: Maddison et al. 2017, Le et al. 2018, Naesseth et al.
2018). With one particle the SMC bound is the ELBO of the path; without resampling it is
\(\text{IWAE}_K\) of the path.

**Targets.** A numpyro model built by :func:`ppl.numpyro_model.from_numpyro` (``log_joint`` on the
flat unconstrained space, the Jacobian included) with a family of
:mod:`samplers.variational.families` as ``params``; or a Feynman-Kac model: a callable
``target(params) -> AbstractFeynmanKac`` (the proposal's parameters are ``params``; the path's
weight is \(\prod_t G_t\)), or a fixed :class:`~ppl.feynman_kac.AbstractFeynmanKac`.

**Gradient estimators** (:func:`get_estimator`):

- ``"reparameterisation"``: \(z = g_\phi(\varepsilon)\), differentiate \(\log \hat Z\) through the
  draws (Kingma & Welling 2014); the only one on Feynman-Kac models (through their moves;
  resampling indices carry no gradient);
- ``"score_function"``: \(\nabla_\phi \mathbb{E}[L] = \mathbb{E}[(L - b)\,\nabla_\phi \sum_k
  \log q_\phi(z_k)] + \mathbb{E}[\nabla_\phi L]\) with \(z\) held fixed (Williams 1992; Paisley et
  al. 2012; Ranganath et al. 2014), and the control variate \(b\) the leave-one-out mean of the
  other ``num_samples - 1`` estimates (Kool et al. 2019), which keeps it unbiased; for
  non-reparameterisable families;
- ``"sticking_the_landing"``: the reparameterised ELBO with \(\log q_{\perp(\phi)}(z)\): the score
  term, of mean zero, is dropped, so the gradient vanishes for every draw once \(q_\phi\) equals the
  posterior (Roeder, Wu & Duvenaud 2017). ELBO only (\(K = 1\)): for \(K > 1\) it is biased
  (Tucker et al. 2019).

Each call averages ``num_samples`` independent estimates \(\log \hat Z^{(m)}\); its value is that
Monte Carlo estimate of the bound, and its gradient the chosen estimator.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ppl import checks
from ppl.feynman_kac import AbstractFeynmanKac
from ppl.numpyro_model import NumpyroModel
from ppl.random import fast_key
from samplers.resampling import AbstractResampling, get_resampling
from samplers.smc import smc
from samplers.variational.families import AbstractFamily, stop_gradient

__all__ = [
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
]


# ------------------------------------------------------------------------------------------------
# gradient estimators
# ------------------------------------------------------------------------------------------------


class AbstractGradientEstimator(eqx.Module):
    """How the gradient of a bound is estimated (a strategy; see the module docstring)."""

    name: ClassVar[str] = ""


class Reparameterisation(AbstractGradientEstimator):
    r"""Pathwise gradient through \(z = g_\phi(\varepsilon)\) (Kingma & Welling 2014)."""

    name: ClassVar[str] = "reparameterisation"


class ScoreFunction(AbstractGradientEstimator):
    r"""Score-function (REINFORCE) gradient with a control variate.

    ``baseline="leave_one_out"`` (default): \(b_m = \frac{1}{M-1}\sum_{m' \ne m} L_{m'}\) over the
    ``num_samples`` \(= M \ge 2\) estimates (unbiased: \(b_m\) is independent of \(z^{(m)}\));
    ``"none"``: \(b = 0\) (unbiased, high variance).
    """

    name: ClassVar[str] = "score_function"
    baseline: str = eqx.field(static=True, default="leave_one_out")

    def __check_init__(self):
        if self.baseline not in ("leave_one_out", "none"):
            raise ValueError(
                f"ScoreFunction baseline must be 'leave_one_out' or 'none', got {self.baseline!r}"
            )


class StickingTheLanding(AbstractGradientEstimator):
    r"""Reparameterised ELBO gradient with \(\log q\) at stopped parameters (Roeder et al. 2017)."""

    name: ClassVar[str] = "sticking_the_landing"


class PerLatent(AbstractGradientEstimator):
    r"""A gradient estimator chosen per latent site of a numpyro model (factorised families).

    With a family that factorises over coordinates (:class:`MeanFieldGaussian`), the draws split
    into \(z = (z_R, z_S)\), independent under \(q_\phi\): \(z_R = g_\phi(arepsilon)\) is
    reparameterised and \(z_S \sim q_{\phi,S}\) is not, so

    \[
    
abla_\phi \mathbb{E}[L] = \mathbb{E}ig[
abla_\phi L(g_\phi(arepsilon), z_S)ig]
      + \mathbb{E}ig[(L - b)\, 
abla_\phi 	extstyle\sum_k \log q_{\phi,S}(z_{S,k})ig],
    \]

    the pathwise term through the reparameterised sites and the score-function term (with the
    leave-one-out control variate \(b\) of :class:`ScoreFunction`) for the others. Build it from a
    mapping, ``estimator={"sigma": "score_function"}``: sites not named use ``default``.
    """

    name: ClassVar[str] = "per_latent"
    sites: tuple[tuple[str, str], ...] = eqx.field(static=True)
    default: str = eqx.field(static=True, default="reparameterisation")
    baseline: str = eqx.field(static=True, default="leave_one_out")

    def __check_init__(self):
        for site, est in self.sites + (("<default>", self.default),):
            if est not in ("reparameterisation", "score_function"):
                raise ValueError(
                    f"per-latent estimators are 'reparameterisation' or 'score_function'; got "
                    f"{est!r} for {site!r}"
                )
        if self.baseline not in ("leave_one_out", "none"):
            raise ValueError(
                f"PerLatent baseline must be 'leave_one_out' or 'none', got {self.baseline!r}"
            )

    def score_mask(self, target: NumpyroModel) -> Any:
        """A boolean ``[D]`` mask of the flat coordinates that use the score function."""
        import numpy as np

        names = [name for name, _, _ in target.layout]
        unknown = sorted({site for site, _ in self.sites} - set(names))
        if unknown:
            raise ValueError(f"unknown latent sites {unknown}: the model's latents are {names}")
        chosen = dict(self.sites)
        mask = []
        for name, shape, _ in target.layout:
            mask += [chosen.get(name, self.default) == "score_function"] * math.prod(shape)
        return np.asarray(mask, bool)


_ESTIMATORS = {
    "reparameterisation": Reparameterisation,
    "reparameterization": Reparameterisation,
    "reparam": Reparameterisation,
    "score_function": ScoreFunction,
    "score": ScoreFunction,
    "reinforce": ScoreFunction,
    "sticking_the_landing": StickingTheLanding,
    "stl": StickingTheLanding,
}


def get_estimator(estimator: Any) -> AbstractGradientEstimator:
    """The estimator for a name (``"reparameterisation"``/``"reparam"``, ``"score_function"``/
    ``"score"``, ``"sticking_the_landing"``/``"stl"``), an instance, or a mapping from latent site
    names to names (:class:`PerLatent`; the other sites are reparameterised)."""
    if isinstance(estimator, Mapping):
        sites = []
        for site, est in estimator.items():
            if not isinstance(site, str):
                raise TypeError(f"per-latent estimator keys are site names, got {site!r}")
            sites.append((site, get_estimator(est).name))
        return PerLatent(tuple(sites))
    return checks.strategy("gradient estimator", estimator, AbstractGradientEstimator, _ESTIMATORS)


# ------------------------------------------------------------------------------------------------
# objectives
# ------------------------------------------------------------------------------------------------


def _positive(name, value):
    return checks.positive_int(name, value)


class AbstractObjective(eqx.Module):
    r"""A lower bound \(\mathbb{E}[\log \hat Z]\) on \(\log Z\), estimated from ``num_samples``
    independent estimates, each from ``num_particles`` particles."""

    # subclasses have ``num_samples`` (M, independent estimates averaged per evaluation) and
    # ``num_particles`` (K, particles per estimate)


    @abc.abstractmethod
    def log_z(self, log_weights: Float[Array, " K"]) -> Float[Array, ""]:
        r"""The estimate \(\log \hat Z\) from \(K\) i.i.d. importance log-weights."""

    def fk_log_z(self, key: PRNGKeyArray, model: AbstractFeynmanKac) -> Float[Array, ""]:
        r"""The estimate on a Feynman-Kac model: :meth:`log_z` of the weights
        \(\sum_t \log G_t\) of \(K\) independent paths (:func:`path_log_weights`)."""
        return self.log_z(path_log_weights(key, model, self.num_particles))


class ELBO(AbstractObjective):
    r"""\(\mathbb{E}_q[\log w]\), one particle per estimate."""

    num_samples: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        _positive("num_samples", self.num_samples)

    @property
    def num_particles(self) -> int:
        return 1

    def log_z(self, log_weights):
        return log_weights[0]


class IWAE(AbstractObjective):
    r"""\(\mathbb{E}[\log \frac1K \sum_k w_k]\) (Burda, Grosse & Salakhutdinov 2016)."""

    num_particles: int = eqx.field(static=True)
    num_samples: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        _positive("num_particles", self.num_particles)
        _positive("num_samples", self.num_samples)

    def log_z(self, log_weights):
        return jax.nn.logsumexp(log_weights) - math.log(log_weights.shape[0])


class RenyiBound(AbstractObjective):
    r"""\(\mathbb{E}[\frac{1}{1-\alpha}\log \frac1K \sum_k w_k^{1-\alpha}]\), \(\alpha \in [0, 1)\)
    (Li & Turner 2016): a lower bound on the Rényi bound \(\mathcal{L}_\alpha \le \log p(x)\);
    \(\alpha \to 1\) is the ELBO, \(\alpha = 0\) is IWAE."""

    alpha: float = eqx.field(static=True)
    num_particles: int = eqx.field(static=True)
    num_samples: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a < 1.0:
            raise ValueError(
                f"alpha must be a number in [0, 1) for a lower bound (alpha -> 1 is the ELBO: use "
                f"ELBO), got {a!r}"
            )
        _positive("num_particles", self.num_particles)
        _positive("num_samples", self.num_samples)

    def log_z(self, log_weights):
        s = 1.0 - self.alpha
        return (jax.nn.logsumexp(s * log_weights) - math.log(log_weights.shape[0])) / s


class SMCBound(AbstractObjective):
    r"""\(\mathbb{E}[\log \hat Z]\) of :func:`samplers.smc` with ``num_particles`` particles
    (resampling when \(\mathrm{ESS} <\) ``ess_threshold`` \(\cdot N\); the ancestor indices carry
    no gradient). On a numpyro target it runs on :class:`ImportanceModel` (one step: IWAE)."""

    num_particles: int = eqx.field(static=True)
    num_samples: int = eqx.field(static=True, default=1)
    resampling: Any = "systematic"
    ess_threshold: float = eqx.field(static=True, default=0.5)

    def __check_init__(self):
        _positive("num_particles", self.num_particles)
        _positive("num_samples", self.num_samples)
        checks.probability("ess_threshold", self.ess_threshold)
        get_resampling(self.resampling)

    def log_z(self, log_weights):
        return jax.nn.logsumexp(log_weights) - math.log(log_weights.shape[0])

    def fk_log_z(self, key, model):
        res = smc(key, model, self.num_particles, resampling=self.resampling,
                  ess_threshold=self.ess_threshold)
        return res.log_evidence


# ------------------------------------------------------------------------------------------------
# Feynman-Kac views
# ------------------------------------------------------------------------------------------------


class ImportanceModel(AbstractFeynmanKac):
    r"""A numpyro model and a family as a one-step Feynman-Kac model: \(M_0 = q_\phi\),
    \(G_0(z) = p(x, z) / q_\phi(z)\), so \(Z = p(x)\)."""

    target: NumpyroModel
    family: AbstractFamily
    num_steps: int = eqx.field(static=True, default=1)

    def init(self, key, num_particles):
        z, log_q = self.family.sample_and_log_prob(key, num_particles)
        return {"z": z, "log_q": log_q}

    def move(self, key, t, particles):
        return particles

    def log_potential(self, t, previous, particles):
        return jax.vmap(self.target.log_joint)(particles["z"]) - particles["log_q"]


def path_log_weights(
    key: PRNGKeyArray, model: AbstractFeynmanKac, num_particles: int
) -> Float[Array, " K"]:
    r"""\(\sum_{t<T} \log G_t(x_{t-1}^k, x_t^k)\) of \(K\) independent paths \(x^k \sim M\)
    (sequential importance sampling, no resampling).

    The keys follow :func:`samplers.smc`'s schedule, so ``smc(key, model, K, ess_threshold=0)``
    draws the same paths and its \(\log \hat Z\) is ``logsumexp`` of these minus \(\log K\).
    """
    checks.feynman_kac_model(model)
    k = checks.positive_int("num_particles", num_particles)
    horizon = getattr(model, "num_steps", None)
    if horizon is None:
        raise ValueError(
            "path_log_weights needs a model with a fixed horizon (model.num_steps); use SMCBound "
            "for variable-horizon models"
        )
    if model.is_adaptive:
        raise ValueError("adaptive Feynman-Kac models need the SMC engine: use SMCBound")
    key = fast_key(key)
    k_init, _, k_loop = jax.random.split(key, 3)
    x = model.init(k_init, k)
    log_w = model.log_potential(jnp.asarray(0, jnp.int32), None, x)

    def body(carry, t):
        x, log_w, kt = carry
        nxt, _, k_move, _ = jax.random.split(kt, 4)
        view = model.previous_view(x)
        x_new = model.move(k_move, t, x)
        return (x_new, log_w + model.log_potential(t, view, x_new), nxt), None

    if horizon > 1:
        (x, log_w, _), _ = jax.lax.scan(
            body, (x, log_w, k_loop), jnp.arange(1, horizon, dtype=jnp.int32))
    return log_w


# ------------------------------------------------------------------------------------------------
# the bound
# ------------------------------------------------------------------------------------------------


def _leave_one_out(values: Float[Array, " M"]) -> Float[Array, " M"]:
    m = values.shape[0]
    return (jnp.sum(values) - values) / (m - 1)


def _static_estimates(key, num_samples, objective, family, target, estimator):
    r"""``num_samples`` estimates \(\log \hat Z\) on a numpyro target: values [M] (differentiable per
    the estimator) and, for the score function, \(\sum_k \log q_\phi(z_k)\) per estimate (or its
    score-function sites' part). The \(M K\) draws come from one call of the family (one
    vectorised normal draw: no per-estimate key splitting)."""
    m, k = num_samples, objective.num_particles
    key = fast_key(key)
    if isinstance(estimator, PerLatent):
        mask = jnp.asarray(estimator.score_mask(target))
        z = family.sample(key, m * k)
        z = jnp.where(mask, jax.lax.stop_gradient(z), z)
        log_q = family.log_prob(z)
        score_log_q = jnp.sum(
            jnp.where(mask, family.log_prob_terms(jax.lax.stop_gradient(z)), 0.0), axis=-1)
    else:
        z, log_q = family.sample_and_log_prob(key, m * k)
        if isinstance(estimator, ScoreFunction):
            z = jax.lax.stop_gradient(z)
            log_q = family.log_prob(z)
        elif isinstance(estimator, StickingTheLanding):
            log_q = stop_gradient(family).log_prob(z)
        score_log_q = log_q
    log_w = (jax.vmap(target.log_joint)(z) - log_q).reshape(m, k)
    return jax.vmap(objective.log_z)(log_w), jnp.sum(score_log_q.reshape(m, k), axis=1)


def bound(
    key: PRNGKeyArray,
    objective: AbstractObjective,
    params: PyTree,
    target: NumpyroModel | AbstractFeynmanKac | Callable[[PyTree], AbstractFeynmanKac],
    *,
    estimator: str | AbstractGradientEstimator | Mapping[str, str] = "reparameterisation",
) -> Float[Array, ""]:
    r"""Monte Carlo estimate of ``objective`` (a lower bound on \(\log Z\), to maximise), averaged
    over ``objective.num_samples`` estimates; differentiable in ``params`` with ``estimator``.

    Args:
        key: PRNG key.
        objective: :class:`ELBO`, :class:`IWAE`, :class:`RenyiBound` or :class:`SMCBound`.
        params: a family (:mod:`~samplers.variational.families`) for a numpyro target; the
            argument of ``target`` for a Feynman-Kac builder; ``None`` for a fixed model.
        target: a :class:`~ppl.numpyro_model.NumpyroModel`, a callable
            ``params -> AbstractFeynmanKac``, or an :class:`~ppl.feynman_kac.AbstractFeynmanKac`.
        estimator: see :func:`get_estimator`.

    Raises:
        TypeError / ValueError: mismatched family, target or estimator.
    """
    checks.prng_key("key", key)
    checks.instance("objective", objective, AbstractObjective)
    est = get_estimator(estimator)
    m = objective.num_samples
    if isinstance(est, StickingTheLanding) and objective.num_particles != 1:
        raise ValueError(
            "sticking_the_landing is unbiased only for one particle per estimate (the ELBO); for "
            f"K={objective.num_particles} it is biased (Tucker et al. 2019): use "
            "'reparameterisation'"
        )
    if isinstance(est, (ScoreFunction, PerLatent)) and est.baseline == "leave_one_out" and m < 2:
        raise ValueError(
            "the score-function estimator's leave-one-out baseline needs num_samples >= 2 "
            "(independent estimates); raise num_samples or use ScoreFunction(baseline='none')"
        )
    keys = jax.random.split(key, m)

    if isinstance(target, NumpyroModel):
        if not isinstance(params, AbstractFamily):
            raise TypeError(
                "a numpyro target needs a variational family (samplers.variational.families) as "
                f"params, got {type(params).__name__}"
            )
        if params.dim != target.dim:
            raise ValueError(
                f"the family has dimension {params.dim} but the model's unconstrained latent "
                f"space has dimension {target.dim}"
            )
        if isinstance(objective, SMCBound):
            if not isinstance(est, Reparameterisation):
                raise ValueError("SMCBound supports the 'reparameterisation' estimator only")
            model = ImportanceModel(target, params)
            return jnp.mean(jax.vmap(lambda k: objective.fk_log_z(k, model))(keys))
        if isinstance(est, PerLatent) and not hasattr(params, "log_prob_terms"):
            raise TypeError(
                "a per-latent estimator needs a family that factorises over coordinates "
                f"(MeanFieldGaussian); {type(params).__name__} does not"
            )
        values, sum_log_q = _static_estimates(key, m, objective, params, target, est)
        if isinstance(est, (ScoreFunction, PerLatent)):
            centred = values if est.baseline == "none" else values - _leave_one_out(values)
            score = jax.lax.stop_gradient(centred) * sum_log_q
            values = values + score - jax.lax.stop_gradient(score)  # value unchanged
        return jnp.mean(values)

    if isinstance(target, AbstractFeynmanKac):
        model = target
    elif callable(target):
        model = checks.feynman_kac_model(target(params), "target(params)")
    else:
        raise TypeError(
            "target must be a NumpyroModel (ppl.numpyro_model.from_numpyro), an "
            f"AbstractFeynmanKac or a callable params -> AbstractFeynmanKac; got {type(target).__name__}"
        )
    if not isinstance(est, Reparameterisation):
        raise ValueError(
            f"on a Feynman-Kac model only the 'reparameterisation' estimator is available (the "
            f"protocol exposes no proposal density for {est.name!r})"
        )
    return jnp.mean(jax.vmap(lambda k: objective.fk_log_z(k, model))(keys))


def loss(key: PRNGKeyArray, objective: AbstractObjective, params: PyTree, target: Any, *,
         estimator: str | AbstractGradientEstimator | Mapping[str, str] = "reparameterisation") -> Float[Array, ""]:
    """``-bound(...)``: the quantity to minimise."""
    return -bound(key, objective, params, target, estimator=estimator)


def elbo(key: PRNGKeyArray, params: PyTree, target: Any, *, num_samples: int = 1,
         estimator: str | AbstractGradientEstimator | Mapping[str, str] = "reparameterisation") -> Float[Array, ""]:
    r"""The ELBO \(\mathbb{E}_q[\log p(x, z) - \log q(z)]\) (a bound to maximise), from
    ``num_samples`` draws."""
    return bound(key, ELBO(num_samples), params, target, estimator=estimator)


def iwae(key: PRNGKeyArray, params: PyTree, target: Any, num_particles: int, *,
         num_samples: int = 1,
         estimator: str | AbstractGradientEstimator | Mapping[str, str] = "reparameterisation") -> Float[Array, ""]:
    r"""\(\text{IWAE}_K\) (a bound to maximise), from ``num_samples`` estimates of ``num_particles``."""
    return bound(key, IWAE(num_particles, num_samples), params, target, estimator=estimator)


def renyi_bound(key: PRNGKeyArray, params: PyTree, target: Any, alpha: float, num_particles: int,
                *, num_samples: int = 1,
                estimator: str | AbstractGradientEstimator | Mapping[str, str] = "reparameterisation") -> Float[Array, ""]:
    r"""The Rényi-\(\alpha\) bound, \(\alpha \in [0, 1)\) (to maximise)."""
    return bound(key, RenyiBound(alpha, num_particles, num_samples), params, target,
                 estimator=estimator)


def smc_bound(key: PRNGKeyArray, params: PyTree, target: Any, num_particles: int, *,
              num_samples: int = 1, resampling: str | AbstractResampling = "systematic",
              ess_threshold: float = 0.5) -> Float[Array, ""]:
    r"""The SMC bound \(\mathbb{E}[\log \hat Z_{\mathrm{SMC}}]\) (FIVO / AESMC / VSMC; to maximise)."""
    obj = SMCBound(num_particles, num_samples, resampling, ess_threshold)
    return bound(key, obj, params, target)

