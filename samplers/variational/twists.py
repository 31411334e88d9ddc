r"""Learned twists (look-ahead potentials) for the Markov-chain language model, trained through the
SMC bound, against the exact optimal twist of the backward recursion.

**Model.** A Markov-chain test bed (:class:`models.markov_lm.MarkovTestBed`, read by duck typing:
``lm.log_probs``, ``lm.eos_id``, ``constraint.log_pair``, ``constraint.log_final``, ``prompt``,
``max_length``) generates \(G\) = ``max_length − len(prompt)`` tokens \(w_0, \dots, w_{G-1}\)
after the last prompt token \(w_{-1}\), one per SMC step, ending early at EOS. Its target is
\(\pi(w) \propto P(w) \exp \Phi(w)\), \(Z = \mathbb{E}_P[e^{\Phi}]\), the target of
:mod:`models.markov_lm_exact`. With the one-token factor (EOS: the answer is the previous token;
a full buffer: the last one)

\[
k_t(u, v) = P(u, v)\, e^{\varphi(u, v)} \times
\begin{cases} e^{\psi(u)} & v = \mathrm{EOS}, \\ e^{\psi(v)} & t = G - 1, \\ 1 & \text{else,}\end{cases}
\qquad Z = \sum_{w} \prod_t k_t(w_{t-1}, w_t),
\]

(a finished sequence stays finished with factor 1). The state of a particle is its last token and
whether it is done.

**Optimal twist.** \(\psi^*_t(v) = \sum_{w_{t+1:}} \prod_{s>t} k_s(w_{s-1}, w_s)\), the expected
future potential of an unfinished prefix ending in \(v\), by the backward recursion
\(\psi^*_{G-1} \equiv 1\), \(\psi^*_{t-1}(u) = \sum_v k_t(u, v)\, \psi^*_t(v)\) (\(\psi \equiv 1\)
on finished states), and \(Z = \sum_v k_0(w_{-1}, v)\, \psi^*_0(v)\) (:func:`optimal_twist`).

**Twisted SMC** with a twist \(\psi_t\) (\(\psi_{-1} = \psi_{G-1} = 1\)) targets
\(\pi_t \propto \gamma_t(w_{0:t})\, \psi_t(w_t)\) at step \(t\); \(\hat Z\) stays unbiased for \(Z\)
whatever \(\psi\) (the ratios telescope). Two proposals (:class:`TwistedMarkovLM`):

- ``twisted_proposal=False``: draw \(v \sim P(u, \cdot)\) and weight
  \(G_t = e^{\varphi(u,v)} \times (\text{final factor}) \times \psi_t(v) / \psi_{t-1}(u)\), the
  potential-only twist (Lew et al. 2023 "SMC steering"; weights \(G_t \psi_t / \psi_{t-1}\));
- ``twisted_proposal=True``: draw \(v \sim q_t(v \mid u) \propto k_t(u, v)\, \psi_t(v)\) (exact over
  the vocabulary) and weight \(G_t = \sum_v k_t(u, v)\, \psi_t(v) / \psi_{t-1}(u)\) (Zhao,
  Brekelmans, Makhzani & Grosse 2024 "twisted SMC"; Whiteley & Lee 2014). With
  \(\psi = \psi^*\), \(G_0 = Z\) and \(G_{t \ge 1} = 1\): \(\log \hat Z = \log Z\) for every draw.

**Learning** a twist :class:`TableTwist` \(\log \psi_\phi[t, v]\) by maximising the SMC bound
\(\mathbb{E}[\log \hat Z]\) (Lawson, Tucker, Dai & Ranganath 2018 "twisted variational SMC";
Naesseth et al. 2018). With the twisted proposal, the bound is \(\log Z\) exactly at
\(\psi \propto \psi^*\) (per \(t\), on every reachable state) and only there, so its maximiser is the
optimal twist up to a constant per step. The draws are discrete, so the gradient must include the
score terms of the proposal draws and of the resampling indices; the pathwise part alone (the
FIVO/VSMC gradient with the indices under stop-gradient) is *not* enough for a twist: holding the
draws fixed, raising \(\psi_t(v)\) raises step \(t\)'s weights by \(\hat\pi_t(v)\) and lowers step
\(t+1\)'s by \(\hat\pi_{t+1}(w_t = v)\), which does not depend on \(\psi_t\) — so the fixed point
\(\psi^*\) is repelling and that ascent runs away from it. :class:`TwistedSMCBound` is the SMC bound
with the full, unbiased gradient:

\[
\nabla_\phi \mathbb{E}[\log \hat Z] = \mathbb{E}\Big[\nabla_\phi \log \hat Z\big|_{\text{draws fixed}}
+ (\log \hat Z - b)\, \nabla_\phi \log p_\phi(\text{draws})\Big],
\]

\(\log p_\phi(\text{draws}) = \sum_{t,i} \log q_t(w_t^i \mid w_{t-1}^{a_t^i}) + \sum_{t \ge 1, i}
\log W_{t-1}^{a_t^i}\) (multinomial resampling at every step), \(b\) the leave-one-out mean of the
other runs' \(\log \hat Z\) (Williams 1992; Kool, van Hoof & Welling 2019), via the
surrogate \(\log \hat Z + \perp(\log \hat Z - b)\,(\log p - \perp \log p)\) whose value is
\(\log \hat Z\).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ppl import checks
from ppl.feynman_kac import AbstractFeynmanKac
from samplers.smc import smc
from samplers.variational.objectives import AbstractObjective

__all__ = [
    "AbstractTwist",
    "TableTwist",
    "TwistedMarkovLM",
    "TwistTarget",
    "twist_target",
    "optimal_twist",
    "twist_distance",
    "TwistedSMCBound",
]

_LOG_ZERO = -1e4  # log ψ* of a state with no admissible future (finite: keeps gradients clean)


class AbstractTwist(eqx.Module):
    r"""A twist: ``log_twist(t) -> [V]``, \(\log \psi_t(v)\) of an unfinished prefix ending in
    token \(v\) at step \(t\) (the model sets \(\psi = 1\) at the last step and on finished
    states)."""

    @abc.abstractmethod
    def log_twist(self, t: Int[Array, ""]) -> Float[Array, " V"]:
        """\\(\\log \\psi_t\\) over the vocabulary."""


class TableTwist(AbstractTwist):
    r"""\(\log \psi_t(v)\) = ``log_psi[t, v]``, a table per (step, token) (rows \(t \ge G-1\) are
    not used)."""

    log_psi: Float[Array, "G V"]

    @classmethod
    def zeros(cls, num_steps: int, vocab_size: int) -> "TableTwist":
        """\\(\\psi \\equiv 1\\): no twist."""
        return cls(jnp.zeros((checks.positive_int("num_steps", num_steps),
                              checks.positive_int("vocab_size", vocab_size))))

    def log_twist(self, t):
        return self.log_psi[jnp.minimum(t, self.log_psi.shape[0] - 1)]


def _arrays(testbed) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    log_p = np.asarray(testbed.lm.log_probs, np.float64)
    phi = np.asarray(testbed.constraint.log_pair, np.float64)
    psi = np.asarray(testbed.constraint.log_final, np.float64)
    prompt = np.asarray(testbed.prompt)
    g = int(testbed.max_length) - int(prompt.shape[0])
    return log_p, phi, psi, int(prompt[-1]), g, int(testbed.lm.eos_id)


def _log_k(log_p, phi, psi, eos, g, t, xp=jnp):
    """log k_t(u, v) [V, V] (NumPy or JAX)."""
    v = log_p.shape[0]
    base = log_p + phi
    last = xp.where(xp.asarray(t) == g - 1, psi[None, :] * xp.ones((v, 1)), 0.0)
    final = xp.where((xp.arange(v) == eos)[None, :], psi[:, None] * xp.ones((1, v)), last)
    return base + final


def optimal_twist(testbed: Any) -> tuple[TableTwist, float]:
    r"""The optimal twist \(\log \psi^*\) ``[G, V]`` (row \(G-1\) zero; the EOS column zero) by
    the backward recursion, in float64, and \(\log Z\) from it."""
    log_p, phi, psi, first, g, eos = _arrays(testbed)
    v = log_p.shape[0]
    with np.errstate(divide="ignore", over="ignore"):
        beta = np.ones(v)  # ψ*_{G−1}
        out = np.zeros((g, v))
        for t in range(g - 1, 0, -1):
            k = np.exp(_log_k(log_p, phi, psi, eos, g, t, np))
            beta = k @ beta
            beta[eos] = 1.0
            out[t - 1] = np.log(beta)
        z = float(np.exp(_log_k(log_p, phi, psi, eos, g, 0, np))[first] @ np.exp(out[0]))
    out[:, eos] = 0.0
    out[g - 1] = 0.0
    return TableTwist(jnp.asarray(np.maximum(out, _LOG_ZERO), jnp.float32)), math.log(z)


def twist_distance(twist: TableTwist, reference: TableTwist, eos_id: int, *,
                   centred: bool = False) -> float:
    r"""RMS over steps \(t < G-1\) and non-EOS tokens of \(\log \psi_t - \log \psi^{\mathrm{ref}}_t\)
    (states with \(\psi^{\mathrm{ref}} = 0\) left out). ``centred=True`` removes the mean per step
    first (the distance up to a constant per step). In :class:`TwistedMarkovLM` the finished state
    has \(\psi = 1\) at every step, which pins that constant whenever EOS can be drawn: the
    uncentred distance is then the one that matters."""
    a, b = np.asarray(twist.log_psi, np.float64), np.asarray(reference.log_psi, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"twists of shapes {a.shape} and {b.shape}")
    diffs = []
    for t in range(a.shape[0] - 1):
        keep = (b[t] > _LOG_ZERO / 2) & (np.arange(b.shape[1]) != eos_id)
        dt = a[t, keep] - b[t, keep]
        diffs.append(dt - dt.mean() if centred else dt)
    return float(np.sqrt(np.mean(np.concatenate(diffs) ** 2)))


class TwistedMarkovLM(AbstractFeynmanKac):
    r"""Token-level twisted SMC model of a Markov-chain test bed (see the module docstring).

    Particles: ``{"token": int32 [N], "done": bool [N], "log_q": [N]}``; ``log_q`` is the
    log-probability of the draw that produced the particle (0 once done), read by
    :class:`TwistedSMCBound`. The EOS "token" of a particle means finished.
    """

    log_p: Float[Array, "V V"]
    log_pair: Float[Array, "V V"]
    log_final: Float[Array, " V"]
    first_token: Int[Array, ""]
    twist: AbstractTwist
    num_steps: int = eqx.field(static=True)
    eos_id: int = eqx.field(static=True)
    twisted_proposal: bool = eqx.field(static=True, default=True)

    def _log_k(self, t):
        return _log_k(self.log_p, self.log_pair, self.log_final, self.eos_id, self.num_steps, t)

    def _log_psi(self, t):
        """log ψ_t [V]: 0 at the last step, on EOS and for t < 0."""
        lp = self.twist.log_twist(jnp.maximum(t, 0))
        lp = jnp.where(jnp.arange(lp.shape[0]) == self.eos_id, 0.0, lp)
        return jnp.where((t < 0) | (t >= self.num_steps - 1), 0.0, lp)

    def _proposal_logits(self, t, u):
        if self.twisted_proposal:
            return self._log_k(t)[u] + self._log_psi(t)[None, :]
        return self.log_p[u]

    def _draw(self, key, t, u, done):
        logits = self._proposal_logits(t, u)
        log_q = jax.nn.log_softmax(logits, axis=-1)
        v = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        lq = jnp.take_along_axis(log_q, v[:, None], axis=1)[:, 0]
        v = jnp.where(done, u, v)
        finished = done | (v == self.eos_id) | (t >= self.num_steps - 1)
        return {"token": v, "done": finished, "log_q": jnp.where(done, 0.0, lq)}

    def init(self, key, num_particles):
        u = jnp.full((num_particles,), self.first_token, jnp.int32)
        return self._draw(key, jnp.asarray(0, jnp.int32), u, jnp.zeros((num_particles,), bool))

    def move(self, key, t, particles):
        return self._draw(key, t, particles["token"], particles["done"])

    def log_potential(self, t, previous, particles):
        n = particles["token"].shape[0]
        if previous is None:
            u = jnp.full((n,), self.first_token, jnp.int32)
            was_done = jnp.zeros((n,), bool)
        else:
            u, was_done = previous["token"], previous["done"]
        psi_prev = self._log_psi(t - 1)[u]
        if self.twisted_proposal:
            log_g = jax.nn.logsumexp(self._log_k(t)[u] + self._log_psi(t)[None, :], axis=-1)
        else:
            v = particles["token"]
            log_g = (self._log_k(t)[u, v] - self.log_p[u, v]) + self._log_psi(t)[v]
        return jnp.where(was_done, 0.0, log_g - psi_prev)


class TwistTarget(eqx.Module):
    r"""``target(twist) -> TwistedMarkovLM`` of a test bed (the chain and constraint are held
    fixed; the twist is the trainable ``params``)."""

    log_p: Float[Array, "V V"]
    log_pair: Float[Array, "V V"]
    log_final: Float[Array, " V"]
    first_token: Int[Array, ""]
    num_steps: int = eqx.field(static=True)
    eos_id: int = eqx.field(static=True)
    twisted_proposal: bool = eqx.field(static=True, default=True)

    def __call__(self, twist: AbstractTwist) -> TwistedMarkovLM:
        checks.instance("twist", twist, AbstractTwist)
        return TwistedMarkovLM(self.log_p, self.log_pair, self.log_final, self.first_token, twist,
                               self.num_steps, self.eos_id, self.twisted_proposal)


def twist_target(testbed: Any, *, twisted_proposal: bool = True) -> TwistTarget:
    """The :class:`TwistTarget` of a :class:`~models.markov_lm.MarkovTestBed` (its ``proposal``
    chain, if any, is not used: the twisted model brings its own)."""
    log_p, phi, psi, first, g, eos = _arrays(testbed)
    if g < 1:
        raise ValueError("the test bed generates no token (max_length <= prompt length)")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return TwistTarget(f32(log_p), f32(phi), f32(psi), jnp.asarray(first, jnp.int32), g, eos,
                       bool(twisted_proposal))


class TwistedSMCBound(AbstractObjective):
    r"""The SMC bound \(\mathbb{E}[\log \hat Z]\) (multinomial resampling at every step) with the
    full gradient: pathwise plus the score terms of the discrete draws and resampling indices,
    with a leave-one-out baseline over ``num_runs`` \(\ge 2\) independent runs per estimate (see
    the module docstring). Its value is the plain SMC bound. For models whose particles carry
    ``log_q`` (the log-probability of the draw that made them), e.g. :class:`TwistedMarkovLM`.
    """

    num_particles: int = eqx.field(static=True)
    num_samples: int = eqx.field(static=True, default=1)
    num_runs: int = eqx.field(static=True, default=4)

    def __check_init__(self):
        checks.positive_int("num_particles", self.num_particles)
        checks.positive_int("num_samples", self.num_samples)
        checks.positive_int("num_runs", self.num_runs, minimum=2)

    def log_z(self, log_weights):
        return jax.nn.logsumexp(log_weights) - math.log(log_weights.shape[0])

    def fk_log_z(self, key: PRNGKeyArray, model: AbstractFeynmanKac) -> Float[Array, ""]:
        schedule = jnp.ones((model.num_steps,), bool)  # resample before every step

        def one(k):
            res = smc(k, model, self.num_particles, resampling="multinomial", ess_threshold=0.0,
                      resample_schedule=schedule, store_history=True)
            h = res.history
            log_q = jnp.sum(h.particles["log_q"], axis=1)  # draws of step t [T]
            prev_w = h.log_weights[:-1]  # W_{t-1}, read by the resampling before step t
            log_a = jnp.sum(jnp.take_along_axis(prev_w, h.ancestors[1:], axis=1), axis=1)
            # the choices of step t (resampling, then the draws) reach the increments s >= t only
            to_go = jnp.cumsum(res.log_evidence_increments[::-1])[::-1]
            return res.log_evidence, log_q + jnp.pad(log_a, (1, 0)), to_go

        log_z, score, to_go = jax.vmap(one)(jax.random.split(key, self.num_runs))
        m = self.num_runs
        baseline = (jnp.sum(to_go, axis=0) - to_go) / (m - 1)  # leave-one-out, per step
        adv = jax.lax.stop_gradient(to_go - baseline)
        surrogate = jnp.sum(adv * (score - jax.lax.stop_gradient(score)), axis=1)
        return jnp.mean(log_z + surrogate)
