r"""Strategies of the LLM Feynman-Kac model: how step rewards become potentials.

Three small families of final ``eqx.Module`` classes (no strings or integer codes inside the maths):

- **aggregations** turn the step scores \(\hat r_1, \dots, \hat r_t\) into the reward \(R_t\) of the prefix
  \(x_{1:t}\) (:class:`LastAggregation`, :class:`MinAggregation`, :class:`ProductAggregation`,
  :class:`ModelAggregation`);
- **links** \(f\) used by the puri weighting (:class:`LogitLink`, :class:`IdentityLink`,
  :class:`LogLink`), each returning \(\log f(r)\) from \(\log r\);
- **weightings** give the potential \(G_t\) from \(R_{t-1}\), \(R_t\) and the inverse temperature \(\beta\)
  (:class:`TwistedWeighting`, :class:`PuriWeighting`).

All work in log space: ``log_r`` is \(\log R_t\) (or \(\log \hat r_t\)) \(\in [-\infty, 0]\). Strings name
them for convenience (``weighting("puri", link="log")``, ``aggregation("min")``, ``link("logit")``); an
unknown name is a ``ValueError`` listing the known ones (``ppl.checks.strategy``).

A model that holds strategies of a different class is a different compiled program; models that
differ only in array leaves (the inverse temperature β, ``correct_proposal``) share one, which
parallel tempering needs.

Reference: Puri et al. (2025) (the puri weighting and its logit link, as in its_hub);
Zhao et al. (2024), "Probabilistic inference in language models via twisted SMC" (twisted).
"""

from __future__ import annotations

import abc
from types import MappingProxyType
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ppl import checks

__all__ = [
    "AbstractAggregation",
    "LastAggregation",
    "MinAggregation",
    "ProductAggregation",
    "ModelAggregation",
    "AbstractLink",
    "LogitLink",
    "IdentityLink",
    "LogLink",
    "AbstractWeighting",
    "TwistedWeighting",
    "PuriWeighting",
    "aggregation",
    "link",
    "weighting",
    "AGGREGATION_NAMES",
    "LINK_NAMES",
    "WEIGHTING_NAMES",
]

LOGIT_EPS = 1e-7  # its_hub clips rewards to [1e-7, 1 - 1e-7] before the logit


# ------------------------------------------------------------------------------------------------
# aggregations: R_t from the step scores
# ------------------------------------------------------------------------------------------------


class AbstractAggregation(eqx.Module):
    r"""\(\log R_t\) from \(\log R_{t-1}\) and the new step's \(\log \hat r_t\) (batched over particles).

    ``first`` marks particles taking their first step (\(\log R_{t-1} = 0\) there)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, reward, log_prev: Float[Array, " N"], log_r: Float[Array, " N"],
                 first: Bool[Array, " N"]) -> Float[Array, " N"]:
        r"""\(\log R_t\); ``reward`` is the reward model (used by :class:`ModelAggregation`)."""


class LastAggregation(AbstractAggregation):
    r"""\(R_t = \hat r_t\): the latest score (a prefix reward that already sees the whole prefix)."""

    name: ClassVar[str] = "last"

    def __call__(self, reward, log_prev, log_r, first):
        return log_r


class MinAggregation(AbstractAggregation):
    r"""\(R_t = \min_{s \le t} \hat r_s\): the weakest step so far."""

    name: ClassVar[str] = "min"

    def __call__(self, reward, log_prev, log_r, first):
        return jnp.where(first, log_r, jnp.minimum(log_prev, log_r))


class ProductAggregation(AbstractAggregation):
    r"""\(R_t = \prod_{s \le t} \hat r_s\), i.e. \(\log R_t = \log R_{t-1} + \log \hat r_t\) (step scores
    multiply)."""

    name: ClassVar[str] = "product"

    def __call__(self, reward, log_prev, log_r, first):
        return log_prev + log_r  # log_prev = 0 before the first step


class ModelAggregation(AbstractAggregation):
    r"""\(R_t\) = the reward model's own rule: ``reward.aggregate(log R_{t−1}, log r̂_t, first)``."""

    name: ClassVar[str] = "model"

    def __call__(self, reward, log_prev, log_r, first):
        return reward.aggregate(log_prev, log_r, first)


# ------------------------------------------------------------------------------------------------
# links of the puri weighting
# ------------------------------------------------------------------------------------------------


class AbstractLink(eqx.Module):
    r"""\(\log f(r)\) from \(\log r\), for the puri potential \(G_t = f(R_t)^\beta\)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, log_r: Float[Array, " N"]) -> Float[Array, " N"]:
        r"""\(\log f(r)\) of every particle."""


class LogitLink(AbstractLink):
    r"""\(f(r) = r / (1 - r)\) with \(r\) clipped to \([10^{-7}, 1 - 10^{-7}]\):
    \(\log f = \log r - \log(1 - r)\), the logit of the public code of Puri et al. and its_hub
    (\(\mathrm{softmax}(\mathrm{logit}(\hat r)/\tau)\))."""

    name: ClassVar[str] = "logit"

    def __call__(self, log_r):
        r = jnp.clip(jnp.exp(log_r), LOGIT_EPS, 1.0 - LOGIT_EPS)
        return jnp.log(r) - jnp.log1p(-r)


class IdentityLink(AbstractLink):
    r"""\(f(r) = e^r\): \(\log f = r\), the paper's softmax of rewards (\(\mathrm{softmax}(\hat r/\tau)\))."""

    name: ClassVar[str] = "identity"

    def __call__(self, log_r):
        return jnp.exp(log_r)


class LogLink(AbstractLink):
    r"""\(f(r) = r\): \(\log f = \log r\), so \(G_t = R_t^\beta\)."""

    name: ClassVar[str] = "log"

    def __call__(self, log_r):
        return log_r


# ------------------------------------------------------------------------------------------------
# weightings: G_t
# ------------------------------------------------------------------------------------------------


class AbstractWeighting(eqx.Module):
    r"""\(\log G_t\) from \(\log R_{t-1}\) (``None`` at \(t = 0\): \(R_{-1} = 1\)), \(\log R_t\) and
    \(\beta\).

    ``resample_every_step`` (class variable): the weighting is meant to resample at every step
    (its default ESS threshold is 1 instead of 0.5)."""

    name: ClassVar[str]
    resample_every_step: ClassVar[bool] = False

    @abc.abstractmethod
    def log_potential(self, beta: Float[Array, ""], log_prev: Float[Array, " N"] | None,
                      log_r: Float[Array, " N"]) -> Float[Array, " N"]:
        r"""\(\log G_t\) of every particle."""

    def done(self, done: Bool[Array, " N"]) -> Bool[Array, " N"]:
        """The absorbing flags the engine sees, from the particles' finished flags (default: the
        finished particles are absorbing)."""
        return done

    @property
    def default_ess_threshold(self) -> float:
        return 1.0 if self.resample_every_step else 0.5


class TwistedWeighting(AbstractWeighting):
    r"""\(G_t = R_t^\beta / R_{t-1}^\beta\) (\(R_{-1} = 1\)), so \(\prod_t G_t = R_T^\beta\): proper
    incremental weights of \(\pi(x) \propto p(x) R(x)^\beta\) (an unbiased \(\hat Z\) of
    \(\mathbb{E}_p[R^\beta]\)). A particle whose \(R_{t-1} = 0\) stays dead (\(\log G_t = -\infty\))."""

    name: ClassVar[str] = "twisted"

    def log_potential(self, beta, log_prev, log_r):
        if log_prev is None:
            return beta * log_r
        inc = beta * (log_r - jnp.where(jnp.isfinite(log_prev), log_prev, 0.0))
        return jnp.where(log_prev == -jnp.inf, -jnp.inf, inc)


class PuriWeighting(AbstractWeighting):
    r"""\(G_t = f(R_t)^\beta\), i.e. \(\log G_t = \beta \log f(R_t)\) with \(f\) the ``link``,
    resampling every step (Puri et al. 2025). Targets
    \(\pi_{\mathrm{puri}}(x) \propto p(x) \prod_{t \le T(x)} f(R_t)^\beta\) — a different, biased law.

    ``reweight_finished`` (static): finished particles are not absorbing while some particle is
    unfinished (they keep competing with weight \(f(R_T)^\beta\) at every step, as the paper's code)."""

    link: AbstractLink = LogitLink()
    reweight_finished: bool = eqx.field(static=True, default=False)

    name: ClassVar[str] = "puri"
    resample_every_step: ClassVar[bool] = True

    def __check_init__(self):
        if not isinstance(self.link, AbstractLink):
            raise TypeError(f"link must be an AbstractLink (LogitLink(), ...), got {type(self.link).__name__}")

    def log_potential(self, beta, log_prev, log_r):
        return beta * self.link(log_r)

    def done(self, done):
        if not self.reweight_finished:
            return done
        return done & jnp.all(done)


# ------------------------------------------------------------------------------------------------
# names (a convenience of LLMFeynmanKac.build and the method runner)
# ------------------------------------------------------------------------------------------------

_AGGREGATIONS = MappingProxyType(
    {c.name: c for c in (LastAggregation, MinAggregation, ProductAggregation, ModelAggregation)})
_LINKS = MappingProxyType({c.name: c for c in (LogitLink, IdentityLink, LogLink)})
_WEIGHTINGS = MappingProxyType({"twisted": TwistedWeighting, "puri": PuriWeighting})
AGGREGATION_NAMES = tuple(_AGGREGATIONS)
LINK_NAMES = tuple(_LINKS)
WEIGHTING_NAMES = ("twisted", "puri")


def _lookup(kind: str, table, spec, base):
    return checks.strategy(kind, spec, base, dict(table))


def aggregation(spec: str | AbstractAggregation) -> AbstractAggregation:
    """The aggregation named ``spec`` (``last|min|product|model``), or ``spec`` itself."""
    return _lookup("aggregation", _AGGREGATIONS, spec, AbstractAggregation)


def link(spec: str | AbstractLink) -> AbstractLink:
    """The puri link named ``spec`` (``logit|identity|log``), or ``spec`` itself."""
    return _lookup("puri_link", _LINKS, spec, AbstractLink)


def weighting(spec: str | AbstractWeighting, *, link: str | AbstractLink | None = None,
              reweight_finished: bool | None = None) -> AbstractWeighting:
    """The weighting named ``spec`` (``twisted|puri``; ``link`` and ``reweight_finished`` apply to
    ``puri`` only), or ``spec`` itself (then the options must be left out)."""
    if isinstance(spec, AbstractWeighting):
        if link is not None or reweight_finished is not None:
            raise ValueError("give puri_link / reweight_finished as fields of the weighting object")
        return spec
    if spec == "twisted":
        if link is not None:  # validated, unused (a puri option)
            _lookup("puri_link", _LINKS, link, AbstractLink)
        if reweight_finished:
            raise ValueError("reweight_finished reproduces the paper's puri weighting only")
        return TwistedWeighting()
    if spec == "puri":
        lk = _lookup("puri_link", _LINKS, "logit" if link is None else link, AbstractLink)
        return PuriWeighting(link=lk, reweight_finished=bool(reweight_finished))
    return _lookup("weighting", _WEIGHTINGS, spec, AbstractWeighting)  # raises: an unknown name
