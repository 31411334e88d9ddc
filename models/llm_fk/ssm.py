r"""Step-by-step LLM generation as a Feynman-Kac (state-space) model, over any step LM.

Following Puri et al. (2025), a completion is built in reasoning steps \(x_1, x_2, \dots\): the state
is the prefix \(x_{1:t}\) (a :class:`LLMParticle`: token buffer + KV cache + lengths + step count +
done flag), the transition \(M_t\) is the LM sampling the next step (tokens up to a delimiter, EOS,
or a per-step cap), and a reward model gives \(\hat r_t = \hat r(x_{1:t}) \in [0, 1]\)
(:mod:`models.llm_fk.rewards`), aggregated over steps into \(R_t\) (``aggregation``): ``last``
\(R_t = \hat r_t\); ``min`` \(R_t = \min_{s \le t} \hat r_s\); ``product``
\(R_t = \prod_{s \le t} \hat r_s\); ``model`` the reward model's own rule. With a softmax
temperature \(\tau\) (\(\beta = 1/\tau\)) the potentials are (``weighting``):

- ``twisted`` (default): \(G_t = R_t^\beta / R_{t-1}^\beta\) (\(R_{-1} = 1\)), so
  \(\prod_t G_t = R_T^\beta\): proper incremental importance weights of the twisted target
  \(\pi(x) \propto p(x) R(x)^\beta\); SMC on it gives an unbiased \(\hat Z\) of
  \(Z = \mathbb{E}_p[R(x)^\beta]\). \(R_t^\beta\) acts as a twist (a look-ahead guess of the final
  reward).
- ``puri``: \(G_t = f(R_t)^\beta\) with \(f\) the link of ``puri_link`` (``logit``: \(r/(1-r)\), the
  public code of Puri et al. and its_hub, which resample
  \(\propto \mathrm{softmax}(\mathrm{logit}(\hat r_t)/\tau)\); ``identity``: \(e^{r}\), the paper's
  softmax of rewards; ``log``: \(r\)), resampling at every step. This targets
  \(\pi_{\mathrm{puri}}(x) \propto p(x) \prod_{t \le T(x)} f(R_t(x_{1:t}))^\beta\) — every
  intermediate reward counts once more at every step, so long completions and early steps are
  over-weighted: a different, biased target, and \(\log \hat Z\) estimates the normaliser of that
  product, not of \(\pi\). ``reweight_finished=True`` also re-weights finished particles by
  \(f(R_T)^\beta\) at every step until all are done (they get cloned,
  as in the paper's code), which makes the target depend on the population.

Weightings, aggregations and links are small ``eqx.Module`` classes (:mod:`models.llm_fk.strategies`:
``TwistedWeighting()``, ``PuriWeighting(link=LogitLink(), reweight_finished=False)``,
``LastAggregation()``, ...); :meth:`LLMFeynmanKac.build` also takes their names.

Finished particles are absorbing (the engine neither moves nor re-weights them). With
``correct_proposal`` the weights also carry \(p/q\) of every step (\(q\) the sampling law, e.g. a
temperature or top-p), so the targets use the LM \(p\) at temperature 1 instead of \(q\).

The model also provides the search interface of :mod:`samplers.search` (``score`` = \(\log R_t\),
``answer``, ``num_tokens``, ``max_num_steps``; for single-token steps ``expand_all``, every next
token of every particle, for deterministic beam search), ``log_transition`` for ancestor sampling, and
:meth:`LLMFeynmanKac.path` to rebuild the trajectory \(x_{0:T-1}\) of a particle from its final state (the
state stores its own history, so conditional SMC needs no genealogy). Compute is counted exactly by
the protocol's ``step_info`` hook: the engine records, per step, the tokens generated and the
reward calls of the particles that moved (``result.step_info``; :func:`total_compute` sums it);
the model is not adaptive. ``previous_view`` hands the engine only \(\log R_{t-1}\) and the step count
of \(x_{t-1}\), so the KV cache can be updated in place.

Reference: Puri, Sudalairaj, Xu, Xu & Srivastava (2025), "A probabilistic inference approach to
inference-time scaling of LLMs using particle-based Monte Carlo methods"; Zhao, Brekelmans,
Makhzani & Grosse (2024), "Probabilistic inference in language models via twisted SMC".
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from models.llm_fk import strategies
from models.llm_fk.rewards import HostCallbacks, RewardModel, host_rows
from models.llm_fk.step_lm import AbstractStepLM, StepInfo
from models.llm_fk.strategies import (
    AGGREGATION_NAMES,
    LINK_NAMES,
    WEIGHTING_NAMES,
    AbstractAggregation,
    AbstractWeighting,
    LastAggregation,
)
from ppl import checks, tree
from ppl.feynman_kac import AbstractFeynmanKac

__all__ = [
    "LLMParticle",
    "LLMFeynmanKac",
    "PreviousView",
    "total_compute",
    "WEIGHTINGS",
    "AGGREGATIONS",
    "PURI_LINKS",
]

WEIGHTINGS = WEIGHTING_NAMES  # names accepted by build(weighting=...)
AGGREGATIONS = AGGREGATION_NAMES
PURI_LINKS = LINK_NAMES


class LLMParticle(NamedTuple):
    r"""Particles of :class:`LLMFeynmanKac` (every leaf has the particle axis N first).

    Attributes:
        lm: the step LM's decoding state (token buffer, KV cache, lengths, done).
        reward: the reward model's incremental state (e.g. a judge's cache), or ``None``.
        num_steps: steps generated so far.
        done: finished (EOS, full buffer, or ``max_steps`` steps); absorbing.
        step_tokens, step_logprob, step_logq: tokens of the last step, its log-probability under
            the LM (temperature 1) and under the sampling law.
        scored: the last step was sent to the reward model (a reward call).
        log_step_reward: \(\log \hat r\) of the last scoring; ``log_reward``: aggregated \(\log R_t\).
        hist_*: [N, max_steps] per-step records (length after the step, \(\log R\), \(\log \hat r\),
            \(\log p\), \(\log q\), scored), 0 past ``num_steps``; they rebuild the trajectory
            (:meth:`~LLMFeynmanKac.path`).
        rejuv_*: the resample-move of the last move (``rejuvenation > 0``): a re-generation of the
            previous step proposed / accepted, its tokens and reward calls (0 otherwise).
    """

    lm: Any
    reward: Any
    num_steps: Int[Array, " N"]
    done: Bool[Array, " N"]
    step_tokens: Int[Array, " N"]
    step_logprob: Float[Array, " N"]
    step_logq: Float[Array, " N"]
    scored: Bool[Array, " N"]
    log_step_reward: Float[Array, " N"]
    log_reward: Float[Array, " N"]
    hist_lengths: Int[Array, "N S"]
    hist_log_reward: Float[Array, "N S"]
    hist_log_step_reward: Float[Array, "N S"]
    hist_logprob: Float[Array, "N S"]
    hist_logq: Float[Array, "N S"]
    hist_scored: Bool[Array, "N S"]
    rejuv_proposed: Bool[Array, " N"]
    rejuv_accepted: Bool[Array, " N"]
    rejuv_tokens: Int[Array, " N"]
    rejuv_calls: Int[Array, " N"]


def _tuple_answer(ids):
    return tuple(ids)


def _no_rejuvenation(num: int) -> dict:
    return dict(rejuv_proposed=jnp.zeros((num,), bool), rejuv_accepted=jnp.zeros((num,), bool),
                rejuv_tokens=jnp.zeros((num,), jnp.int32), rejuv_calls=jnp.zeros((num,), jnp.int32))


class PreviousView(NamedTuple):
    r"""The part of \(x_{t-1}\) that :meth:`LLMFeynmanKac.log_potential` / ``step_info`` read (a full
    :class:`LLMParticle` has the same fields and works too)."""

    log_reward: Float[Array, " N"]
    num_steps: Int[Array, " N"]


def total_compute(step_info) -> tuple[Array, Array]:
    """(tokens generated, reward calls) of a run: the sums of the engine's per-step
    ``result.step_info`` (leading step axis; any extra leading axes are summed too)."""
    if step_info is None:
        raise ValueError("the result has no step_info (not an LLMFeynmanKac run?)")
    return jnp.sum(step_info["tokens"]), jnp.sum(step_info["reward_calls"])


def _check_power(power) -> None:
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not np.isfinite(power) or power <= 0:
        raise ValueError(f"power must be a finite number > 0, got {power!r}")


def _check_rejuvenation(rejuvenation, weighting, score_steps, reward) -> None:
    if isinstance(rejuvenation, bool) or not isinstance(rejuvenation, int) or rejuvenation < 0:
        raise ValueError(f"rejuvenation must be an int >= 0 (Metropolis-Hastings moves per step), "
                         f"got {rejuvenation!r}")
    if rejuvenation == 0:
        return
    if not score_steps:
        raise ValueError("rejuvenation needs score_steps=True (the acceptance ratio uses the step's reward)")
    if getattr(weighting, "reweight_finished", False):
        raise ValueError("rejuvenation needs absorbing finished particles (not reweight_finished=True)")


class LLMFeynmanKac(AbstractFeynmanKac):
    """The LLM state-space model (see the module docstring). Build it with :meth:`build`.

    Run it with ``samplers.smc(key, model, N, max_steps=model.max_num_steps)`` (``puri``: with
    ``ess_threshold=1``). ``result.step_info`` holds the exact compute of every step
    (``{"tokens", "reward_calls"}``); :func:`total_compute` sums it.
    """

    lm: AbstractStepLM
    reward: RewardModel
    prompt_state: Any
    inv_temperature: Float[Array, ""]
    weighting: AbstractWeighting
    aggregation: AbstractAggregation
    correct_proposal: Bool[Array, ""]
    max_steps: int = eqx.field(static=True)
    max_step_tokens: int = eqx.field(static=True)
    score_steps: bool = eqx.field(static=True, default=True)
    answer_fn_id: Any = None
    answer_ids_fn: Any = eqx.field(static=True, default=None)
    callbacks: HostCallbacks | None = eqx.field(static=True, default=None)
    power: Float[Array, ""] = eqx.field(default_factory=lambda: jnp.asarray(1.0, jnp.float32))
    rejuvenation: int = eqx.field(static=True, default=0)

    num_steps = None

    @property
    def move_keeps_done(self) -> bool:  # the protocol's class variable, per step LM and reward
        """Whether :meth:`move` leaves done particles bit-for-bit unchanged (so the engine skips
        its row select): true when the step LM and the reward model keep done rows (the
        Markov-chain LM with a stateless reward: yes; the transformer: no, its batched forward
        writes a K/V entry past the length of done rows — never attended, but not
        bit-identical). With ``rejuvenation``, a particle that finished at the previous step may be
        replaced by another finished continuation (an MCMC move of the current target), which is
        why the engine must not restore it either."""
        return bool(self.lm.keeps_done_rows and self.reward.keeps_done_rows)

    @property
    def supports_conditional_smc(self) -> bool:
        """Particle Gibbs pins a reference path; resample-move (``rejuvenation > 0``) would change
        the particles of the previous step behind it, so it is refused there."""
        return self.rejuvenation == 0

    # ---------------------------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        lm: AbstractStepLM,
        prompt_ids: Sequence[int],
        reward: RewardModel,
        *,
        max_steps: int,
        max_step_tokens: int,
        max_new_tokens: int | None = None,
        weighting: str | AbstractWeighting = "twisted",
        aggregation: str | AbstractAggregation = "last",
        temperature: float = 1.0,
        puri_link: str | None = None,
        reweight_finished: bool | None = None,
        correct_proposal: bool = False,
        score_steps: bool = True,
        answer_fn: Callable[[list[int]], Hashable] | None = None,
        answer_ids_fn: Callable | None = None,
        callbacks: HostCallbacks | None = None,
        power: float = 1.0,
        rejuvenation: int = 0,
    ) -> "LLMFeynmanKac":
        r"""Prefill the prompt and bind the reward model (host side).

        Args:
            lm: a step LM (:class:`~models.llm_fk.step_lm.StepLM`,
                :class:`~models.llm_fk.step_lm.MarkovStepLM`).
            prompt_ids: the prompt's token ids (chat template already applied).
            reward: a :class:`~models.llm_fk.rewards.RewardModel`.
            max_steps: step cap; a particle is finished after ``max_steps`` steps.
            max_step_tokens: token cap of one step.
            max_new_tokens: buffer for the completion (default ``max_steps · max_step_tokens``);
                a full buffer finishes a particle.
            weighting: an :class:`~models.llm_fk.strategies.AbstractWeighting`
                (:class:`~models.llm_fk.strategies.TwistedWeighting`,
                :class:`~models.llm_fk.strategies.PuriWeighting`) or its name
                ``"twisted"`` / ``"puri"``; aggregation: an
                :class:`~models.llm_fk.strategies.AbstractAggregation` or its name
                ``last|min|product|model``.
            temperature: \(\tau > 0\) of the potential (\(\beta = 1/\tau\)).
            puri_link: ``logit|identity|log`` (with ``weighting="puri"``; default logit);
                reweight_finished: ``puri`` only (fields of ``PuriWeighting`` when an object is given).
            correct_proposal: weight by \(p/q\) of each step (\(p\) the LM at temperature 1, \(q\) the
                sampling law), so that the base measure is \(p\).
            score_steps: score every step during the move (needed by SMC, particle Gibbs, beam
                search); ``False`` scores only when :meth:`score` is called (best-of-N, voting),
                with ``aggregation="last"``.
            answer_fn: ``fn(completion_ids) -> Hashable`` for votes (default: the ids themselves),
                registered in ``callbacks`` and passed to the compiled code by id;
                answer_ids_fn: a jnp alternative
                ``fn(tokens, lengths, prompt_lengths) -> int [N]``.
            callbacks: the :class:`~models.llm_fk.rewards.HostCallbacks` of the experiment
                (answer function and its interning table); default: the reward model's own
                (a host verifier's), else a new one.
            power: \(\alpha > 0\): the base measure becomes \(p^\alpha\) (power target, see
                :meth:`log_potential`); with \(\alpha \ne 1\) the weights always carry \(p^\alpha/q\) of
                every step. Draw the steps at temperature \(1/\alpha\) for a good proposal.
            rejuvenation: resample-move: this many Metropolis-Hastings re-generations of the last
                step of every particle before each move (see :meth:`move`); 0: none.
        """
        if not isinstance(lm, AbstractStepLM):
            raise TypeError(f"lm must be an AbstractStepLM (StepLM, MarkovStepLM), got {type(lm).__name__}")
        if not isinstance(reward, RewardModel):
            raise TypeError(f"reward must be a RewardModel, got {type(reward).__name__}")
        checks.positive_int("max_steps", max_steps)
        checks.positive_int("max_step_tokens", max_step_tokens)
        if max_new_tokens is None:
            max_new_tokens = max_steps * max_step_tokens
        checks.positive_int("max_new_tokens", max_new_tokens)
        weighting = strategies.weighting(weighting, link=puri_link, reweight_finished=reweight_finished)
        aggregation = strategies.aggregation(aggregation)
        if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        _check_power(power)
        _check_rejuvenation(rejuvenation, weighting, score_steps, reward)
        if not score_steps and not isinstance(aggregation, LastAggregation):
            raise ValueError("score_steps=False (score on demand) needs aggregation='last'")
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if any(not 0 <= i < lm.vocab_size for i in prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {lm.vocab_size})")
        reward = reward.bind(lm, prompt_ids, max_new_tokens)
        extra = int(reward.extra_context(lm))
        total = len(prompt_ids) + max_new_tokens + extra
        limit = getattr(lm, "max_context", None)
        if limit is not None and total > limit:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) + judge "
                             f"question ({extra}) = {total} tokens exceed the model context of {limit}")
        prompt_state = lm.prefill(prompt_ids, max_new_tokens + extra)
        if answer_fn is not None and answer_ids_fn is not None:
            raise ValueError("give answer_fn or answer_ids_fn, not both")
        if callbacks is None:
            callbacks = getattr(reward, "callbacks", None)
        if callbacks is None:
            callbacks = HostCallbacks()
        checks.instance("callbacks", callbacks, HostCallbacks)
        answer_fn_id = None
        if answer_ids_fn is None:
            if answer_fn is not None:
                checks.function("answer_fn", answer_fn, "answer_fn(completion_ids) -> Hashable")
            answer_fn_id = jnp.asarray(callbacks.register(_tuple_answer if answer_fn is None else answer_fn),
                                       jnp.int32)
        return cls(
            lm=lm,
            reward=reward,
            prompt_state=prompt_state,
            inv_temperature=jnp.asarray(1.0 / temperature, jnp.float32),
            weighting=weighting,
            aggregation=aggregation,
            correct_proposal=jnp.asarray(bool(correct_proposal)),
            max_steps=max_steps,
            max_step_tokens=max_step_tokens,
            score_steps=bool(score_steps),
            answer_fn_id=answer_fn_id,
            answer_ids_fn=answer_ids_fn,
            callbacks=callbacks,
            power=jnp.asarray(float(power), jnp.float32),
            rejuvenation=int(rejuvenation),
        )

    def with_inv_temperature(self, beta) -> "LLMFeynmanKac":
        r"""The same model at inverse temperature \(\beta\) (a traced value is fine: parallel tempering)."""
        return eqx.tree_at(lambda m: m.inv_temperature, self, jnp.asarray(beta, jnp.float32))

    def with_options(
        self,
        *,
        weighting: str | AbstractWeighting | None = None,
        aggregation: str | AbstractAggregation | None = None,
        puri_link: str | None = None,
        temperature: float | None = None,
        reweight_finished: bool | None = None,
        correct_proposal: bool | None = None,
        score_steps: bool | None = None,
        power: float | None = None,
        rejuvenation: int | None = None,
    ) -> "LLMFeynmanKac":
        """A copy with options changed. ``temperature`` and ``correct_proposal`` are array leaves,
        so models that differ only in them share one compiled program (and can be ``vmap``-ed
        over); another weighting or aggregation class is another program. ``puri_link`` and
        ``reweight_finished`` alone change the current puri weighting."""
        import dataclasses

        m = self
        if weighting is None and (puri_link is not None or reweight_finished is not None):
            w = self.weighting
            if not isinstance(w, strategies.PuriWeighting):
                raise ValueError("puri_link / reweight_finished apply to the puri weighting only")
            m = dataclasses.replace(
                m, weighting=strategies.PuriWeighting(
                    link=w.link if puri_link is None else strategies.link(puri_link),
                    reweight_finished=w.reweight_finished if reweight_finished is None else bool(reweight_finished)))
        elif weighting is not None:
            m = dataclasses.replace(m, weighting=strategies.weighting(
                weighting, link=puri_link, reweight_finished=reweight_finished))
        if aggregation is not None:
            m = dataclasses.replace(m, aggregation=strategies.aggregation(aggregation))
        if temperature is not None:
            if not np.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
            m = m.with_inv_temperature(1.0 / temperature)
        if correct_proposal is not None:
            m = eqx.tree_at(lambda x: x.correct_proposal, m, jnp.asarray(bool(correct_proposal)))
        if score_steps is not None:
            m = dataclasses.replace(m, score_steps=bool(score_steps))
        if power is not None:
            _check_power(power)
            m = eqx.tree_at(lambda x: x.power, m, jnp.asarray(float(power), jnp.float32))
        if rejuvenation is not None:
            _check_rejuvenation(rejuvenation, m.weighting, m.score_steps, m.reward)
            m = dataclasses.replace(m, rejuvenation=int(rejuvenation))
        if not m.score_steps and not isinstance(m.aggregation, LastAggregation):
            raise ValueError("score_steps=False (score on demand) needs aggregation='last'")
        _check_rejuvenation(m.rejuvenation, m.weighting, m.score_steps, m.reward)
        return m

    # ---------------------------------------------------------------------------------- shapes
    @property
    def prompt_length(self) -> int:
        return int(np.asarray(self.prompt_state.lengths)[0])

    @property
    def max_num_steps(self) -> int:
        """Steps that finish every particle (the search methods' and ``smc``'s step cap)."""
        return self.max_steps

    def initial_state(self, num: int) -> LLMParticle:
        """``num`` copies of the prompt, no step taken."""
        lm_state = self.lm.broadcast(self.prompt_state, num)
        s = self.max_steps
        zf = jnp.zeros((num,), jnp.float32)
        return LLMParticle(
            lm=lm_state,
            reward=self.reward.init_state(self.lm, lm_state),
            num_steps=jnp.zeros((num,), jnp.int32),
            done=jnp.zeros((num,), bool),
            step_tokens=jnp.zeros((num,), jnp.int32),
            step_logprob=zf,
            step_logq=zf,
            scored=jnp.zeros((num,), bool),
            log_step_reward=zf,
            log_reward=zf,
            hist_lengths=jnp.zeros((num, s), jnp.int32),
            hist_log_reward=jnp.zeros((num, s), jnp.float32),
            hist_log_step_reward=jnp.zeros((num, s), jnp.float32),
            hist_logprob=jnp.zeros((num, s), jnp.float32),
            hist_logq=jnp.zeros((num, s), jnp.float32),
            hist_scored=jnp.zeros((num, s), bool),
            **_no_rejuvenation(num),
        )

    # ---------------------------------------------------------------------------------- one step
    def _advance(self, key: PRNGKeyArray, p: LLMParticle) -> LLMParticle:
        lm_in = p.lm._replace(done=p.lm.done | p.done)
        lm_state, info = self.lm.generate_step(key, lm_in, self.max_step_tokens)
        return self._after_step(p, lm_state, info)

    def _after_step(self, p: LLMParticle, lm_state, info: StepInfo) -> LLMParticle:
        """The particles after the step LM appended one step (``lm_state``, ``info``) to the rows
        of ``p`` that were not done: step count, done flag, reward, records."""
        active = ~p.done
        prev_len = p.lm.lengths
        num_steps = p.num_steps + active.astype(jnp.int32)
        finished = active & (lm_state.done | (num_steps >= self.max_steps))
        done = p.done | finished
        lm_state = lm_state._replace(done=lm_state.done | done)
        rstate = self.reward.update(self.lm, p.reward, lm_state, prev_len, active, self.max_step_tokens,
                                    step=info)
        if self.score_steps:
            scored = active & (done | self.reward.scores_unfinished)
            log_r = self.reward.log_score(self.lm, rstate, lm_state, prev_len, done, active)
            log_r = jnp.where(scored, log_r, 0.0)
            log_reward = self.aggregation(self.reward, p.log_reward, log_r, p.num_steps == 0)
        else:
            scored = jnp.zeros_like(active)
            log_r = jnp.zeros_like(p.log_reward)
            log_reward = p.log_reward
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        step_tokens = keep(info.num_tokens, p.step_tokens)
        logp = keep(info.logprob, p.step_logprob)
        logq = keep(info.proposal_logprob, p.step_logq)
        log_r = keep(log_r, p.log_step_reward)
        log_reward = keep(log_reward, p.log_reward)
        scored = keep(scored, p.scored)
        slot = (jnp.arange(self.max_steps)[None, :] == (num_steps - 1)[:, None]) & active[:, None]

        def put(h, v):
            return jnp.where(slot, v[:, None].astype(h.dtype), h)

        return LLMParticle(
            lm=lm_state,
            reward=rstate,
            num_steps=num_steps,
            done=done,
            step_tokens=step_tokens,
            step_logprob=logp,
            step_logq=logq,
            scored=scored,
            log_step_reward=log_r,
            log_reward=log_reward,
            hist_lengths=put(p.hist_lengths, lm_state.lengths),
            hist_log_reward=put(p.hist_log_reward, log_reward),
            hist_log_step_reward=put(p.hist_log_step_reward, log_r),
            hist_logprob=put(p.hist_logprob, logp),
            hist_logq=put(p.hist_logq, logq),
            hist_scored=put(p.hist_scored, scored),
            **_no_rejuvenation(active.shape[0]),
        )

    # ---------------------------------------------------------------------------------- protocol
    def init(self, key: PRNGKeyArray, num_particles: int) -> LLMParticle:
        return self._advance(key, self.initial_state(num_particles))

    def move(self, key: PRNGKeyArray, t: Int[Array, ""], particles: LLMParticle) -> LLMParticle:
        r"""Extend every unfinished particle by one step. With ``rejuvenation = k > 0``
        (resample-move), first apply \(k\) Metropolis-Hastings moves to \(x_{t-1}\) that leave the
        current target \(\gamma_{t-1}\) invariant (:meth:`rejuvenate`)."""
        if self.rejuvenation == 0:
            return self._advance(key, particles)
        k_mh, k_adv = jax.random.split(key)
        x = self.rejuvenate(k_mh, t, particles)
        out = self._advance(k_adv, x)
        return out._replace(rejuv_proposed=x.rejuv_proposed, rejuv_accepted=x.rejuv_accepted,
                            rejuv_tokens=x.rejuv_tokens, rejuv_calls=x.rejuv_calls)

    def parent(self, particles: LLMParticle, which: Bool[Array, " N"]) -> LLMParticle:
        r"""The particles with their last step removed (\(x_{t-2}\) of \(x_{t-1}\)) on the rows
        ``which`` (they must have taken at least one step; a particle finished by that step gets
        its unfinished parent back); the other rows are returned unchanged but marked done (so a
        move leaves them alone)."""
        p = particles
        k = p.num_steps
        prev_len = jnp.where(which, p.lm.lengths - p.step_tokens, p.lm.lengths)
        log_prev = self._log_reward_before_last_step(p)
        lm = self.lm.truncate(p.lm, prev_len)
        reward = self.reward.truncate(self.lm, p.reward, p.lm, prev_len)
        return p._replace(
            lm=lm._replace(done=~which), reward=reward, num_steps=jnp.where(which, k - 1, k),
            done=~which, log_reward=jnp.where(which, log_prev, p.log_reward))

    def _log_reward_before_last_step(self, p: LLMParticle) -> Float[Array, " N"]:
        r"""\(\log R\) of each particle's parent (before its last step; 0 before the first), from
        its per-step records."""
        idx = jnp.clip(p.num_steps - 2, 0, self.max_steps - 1)[:, None]
        return jnp.where(p.num_steps >= 2, jnp.take_along_axis(p.hist_log_reward, idx, axis=1)[:, 0], 0.0)

    def _log_acceptance(self, log_g_proposed, log_g_current):
        """Log Metropolis-Hastings ratio of the independence move of :meth:`rejuvenate`."""
        return log_g_proposed - log_g_current

    def rejuvenate(self, key: PRNGKeyArray, t: Int[Array, ""], particles: LLMParticle) -> LLMParticle:
        r"""``rejuvenation`` independent Metropolis-Hastings moves on the last step of every particle
        that took step \(t-1\) (resample-move; Gilks & Berzuini 2001).

        The current target is \(\gamma_{t-1}(x_{0:t-1}) = \gamma_{t-2}(x_{0:t-2})\, q(x_{t-1} \mid
        x_{0:t-2})\, G_{t-1}(x_{0:t-1})\), so its conditional given the prefix \(x_{0:t-2}\) is
        \(\propto q \cdot G_{t-1}\): re-generate the last step from the same prefix with the move's own
        law \(q\) and accept with probability \(\min(1, G_{t-1}(x') / G_{t-1}(x))\) (an independence
        sampler on that conditional; \(G\) includes the reward twist, \(p/q\) and the power
        correction). A proposal must stay in the particle's class: an unfinished particle only
        moves to an unfinished continuation, a particle that finished at step \(t-1\) only to a
        finished one (finished particles are absorbing, and the move must not change which
        particles the engine treats as finished). The kernel is the Metropolis-Hastings kernel of
        \(\gamma_{t-1}\) restricted to each class (and the identity on particles that finished
        earlier), so \(\gamma_{t-1}\) stays invariant and properly weighted particles stay properly
        weighted (it may be applied whether or not the step resampled). Just-finished particles are
        rejuvenated only when the engine does not restore finished rows after a move
        (``move_keeps_done``). Re-generating the last step is what separates particles that
        resampling made copies of.

        Compute is counted: ``rejuv_tokens`` / ``rejuv_calls`` (in ``step_info``). Not for
        conditional SMC (particle Gibbs pins a reference path the move would not see).
        """
        x = particles
        eligible = (x.num_steps == t) & (~x.done | self.move_keeps_done)
        parent = self.parent(x, eligible)
        view = PreviousView(log_reward=parent.log_reward, num_steps=parent.num_steps)
        log_gx = self.log_potential(t - 1, view, x)

        def one(i, carry):
            cur, log_g, proposed, accepted, tokens, calls = carry
            k_step, k_u = jax.random.split(jax.random.fold_in(key, i))
            y = self._advance(k_step, parent)
            log_gy = self.log_potential(t - 1, view, y)
            log_u = jnp.log(jax.random.uniform(k_u, log_g.shape, minval=1e-38))
            same_class = y.done == x.done  # finished stays finished, unfinished stays unfinished
            ok = eligible & same_class & (log_u < self._log_acceptance(log_gy, log_g)) & ~jnp.isnan(log_gy)
            cur = tree.where_rows(ok, y, cur)
            return (cur, jnp.where(ok, log_gy, log_g), proposed | eligible, accepted | ok,
                    tokens + jnp.where(eligible, y.step_tokens, 0),
                    calls + (eligible & y.scored).astype(jnp.int32))

        z = jnp.zeros_like(x.num_steps)
        init = (x, log_gx, jnp.zeros_like(eligible), jnp.zeros_like(eligible), z, z)
        cur, _, proposed, accepted, tokens, calls = jax.lax.fori_loop(0, self.rejuvenation, one, init)
        return cur._replace(rejuv_proposed=proposed, rejuv_accepted=accepted, rejuv_tokens=tokens,
                            rejuv_calls=calls)

    def log_potential(self, t, previous, particles):
        r"""\(\log G_t\) = the weighting's term (from \(R_{t-1}, R_t\)) plus, for a particle that took
        step \(t\) with log-probabilities \(\log p\) (the LM at temperature 1) and \(\log q\) (the
        law it was drawn from),

        - \(\log p - \log q\) with ``correct_proposal`` (the base measure is \(p\));
        - \(\alpha \log p - \log q\) with ``power`` \(\alpha \ne 1\): the base measure is
          \(p^\alpha\), a token-level twist \(p^{\alpha-1}\) on \(p\), so that over a whole sequence
          \(\prod_t G_t = p(x)^\alpha R(x)^\beta / q(x)\) and SMC targets
          \(\pi_\alpha(x) \propto p(x)^\alpha R(x)^\beta\) with \(\hat Z\) unbiased for
          \(\sum_x p(x)^\alpha R(x)^\beta\). With \(q\) = the LM at temperature \(1/\alpha\) the step
          weight is \(\prod_j \sum_v p(v \mid x_{<j})^\alpha\): the normalisers that temperature
          sampling drops (which is why sampling at \(1/\alpha\) alone is *not* \(p^\alpha\)).
          A finished sequence is absorbing, so EOS and the length cap are part of \(x\).

        References: Azizi, Baghaei Potraghloo, Ahmadi, Kundu & Pedram (2026), "Power-SMC:
        low-latency sequence-level power sampling for training-free LLM reasoning"
        (arXiv:2602.10273); Karan & Du (2025), "Reasoning with sampling: your base model is
        smarter than you think" (Metropolis-Hastings on \(p^\alpha\))."""
        log_prev = None if previous is None else previous.log_reward
        if previous is not None and self.rejuvenation > 0:
            # the engine's view of x_{t-1} predates the move, which rejuvenated x_{t-1} first
            log_prev = self._log_reward_before_last_step(particles)
        log_g = self.weighting.log_potential(self.inv_temperature, log_prev, particles.log_reward)
        before = 0 if previous is None else previous.num_steps
        moved = particles.num_steps == before + 1
        powered = self.power != 1.0
        logp, logq = particles.step_logprob, particles.step_logq
        ratio = jnp.where(self.correct_proposal | powered, self.power * logp - logq, 0.0)
        return log_g + jnp.where(moved, ratio, 0.0)

    def log_transition(self, t, previous, particles):
        r"""\(\log M_t(x_{t-1} \to x_t)\) pairwise: the step's log-probability under the sampling law
        when ``particles`` extends ``previous`` by one step (same tokens up to the previous length),
        0 when ``previous`` is finished and ``particles`` equals it, else \(-\infty\)."""
        prev_len = previous.lm.lengths
        ref_len = particles.lm.lengths
        pos = jnp.arange(previous.lm.tokens.shape[1])
        same = jnp.all(jnp.where(pos[None, :] < prev_len[:, None],
                                 previous.lm.tokens == particles.lm.tokens, True), axis=1)
        extends = (~previous.done & same & (particles.num_steps == previous.num_steps + 1)
                   & (prev_len == ref_len - particles.step_tokens))
        stays = (same & particles.done & (particles.num_steps == previous.num_steps)
                 & (prev_len == ref_len))
        return jnp.where(previous.done, jnp.where(stays, 0.0, -jnp.inf),
                         jnp.where(extends, particles.step_logq, -jnp.inf))

    def done(self, particles):
        return self.weighting.done(particles.done)

    def previous_view(self, particles: LLMParticle) -> "PreviousView":
        r"""What :meth:`log_potential` and :meth:`step_info` read of \(x_{t-1}\): \(\log R_{t-1}\) and the
        step count (not the KV cache, so that the engine can move the particles in place)."""
        return PreviousView(log_reward=particles.log_reward, num_steps=particles.num_steps)

    def step_info(self, t, previous, particles) -> dict:
        r"""Compute of the move ``previous → particles``: ``tokens`` generated and ``reward_calls``
        (particles scored) by the particles that took a step (all of them at \(t = 0\))."""
        before = 0 if previous is None else previous.num_steps
        moved = particles.num_steps == before + 1
        p = particles
        # resample-move fields are fresh on every row after a move, unless the engine restored a
        # finished row (not move_keeps_done): then only rows that moved carry this move's values
        fresh = moved | self.move_keeps_done
        return {"tokens": jnp.sum(jnp.where(moved, p.step_tokens, 0) + jnp.where(fresh, p.rejuv_tokens, 0)
                                  ).astype(jnp.int32),
                "reward_calls": jnp.sum(jnp.where(moved, p.scored, 0) + jnp.where(fresh, p.rejuv_calls, 0)
                                        ).astype(jnp.int32),
                "moves_proposed": jnp.sum(fresh & p.rejuv_proposed).astype(jnp.int32),
                "moves_accepted": jnp.sum(fresh & p.rejuv_accepted).astype(jnp.int32)}

    # ---------------------------------------------------------------------------------- search
    def score(self, particles: LLMParticle) -> Float[Array, " N"]:
        r"""\(\log R_t\) of every particle (scored now when ``score_steps=False``: one reward call per
        particle)."""
        if self.score_steps:
            return particles.log_reward
        prev = particles.lm.lengths - particles.step_tokens
        return self.reward.log_score(self.lm, particles.reward, particles.lm, prev, particles.done,
                                     jnp.ones_like(particles.done))

    def answer(self, particles: LLMParticle) -> Int[Array, " N"]:
        """Integer answer ids (equal answers, equal ids)."""
        s = particles.lm
        if self.answer_ids_fn is not None:
            return jnp.asarray(self.answer_ids_fn(s.tokens, s.lengths, s.prompt_lengths), jnp.int32)
        callbacks = self.callbacks

        def row(fid, tok, p, n):
            table = callbacks.answers(fid)
            return table.intern(table.fn([int(x) for x in tok[int(p): int(n)]]))

        return host_rows(row, np.int32, self.answer_fn_id, s.tokens, s.prompt_lengths, s.lengths)

    def answer_table(self):
        """Host: the interning table of this model's answer function (``values[id]`` = answer)."""
        if self.answer_fn_id is None:
            raise ValueError("this model votes with answer_ids_fn (integer answers): no table")
        return self.callbacks.answers(self.answer_fn_id)

    def num_tokens(self, particles: LLMParticle) -> Int[Array, " N"]:
        """Generated tokens (prompt excluded)."""
        return (particles.lm.lengths - particles.lm.prompt_lengths).astype(jnp.int32)

    # ---------------------------------------------------------------------------------- expansion
    @property
    def num_children(self) -> int:
        r"""Children of a particle in :meth:`expand_all`: the vocabulary size \(V\) (single-token steps
        only, ``max_step_tokens = 1``)."""
        if self.max_step_tokens != 1:
            raise ValueError(
                f"expand_all enumerates single-token steps only (max_step_tokens = 1), this model "
                f"has max_step_tokens = {self.max_step_tokens}"
            )
        return self.lm.vocab_size

    def expand_all(self, particles: LLMParticle) -> tuple[LLMParticle, Float[Array, "N V"]]:
        r"""Every next step of every particle, for single-token steps (deterministic beam search).

        Child ``i * V + v`` is particle \(i\) after the step "append token \(v\)" (the step LM's ``force``),
        finished, scored and recorded exactly as a sampled step would be (EOS, a full buffer or
        ``max_steps`` finish it). ``log_probs[i, v]`` is the log-probability of token \(v\) under the
        law the steps are drawn from (the step LM's ``next_token_proposal_logprobs`` if it has one,
        else ``next_token_logprobs``, the LM at temperature 1); \(-\infty\) marks an impossible child.
        Children of finished particles are the particle itself (callers keep the parent). Costs a
        forward pass over \(N V\) rows: for small vocabularies (the Markov-chain LM).
        """
        v = self.num_children
        n = particles.num_steps.shape[0]
        s = particles.lm
        logp = self.lm.next_token_logprobs(s)
        proposal = getattr(self.lm, "next_token_proposal_logprobs", None)
        logq = logp if proposal is None else proposal(s)
        parent = jnp.repeat(jnp.arange(n), v)
        tok = jnp.tile(jnp.arange(v, dtype=jnp.int32), n)
        p = tree.gather(particles, parent)
        active = ~p.done
        lm_in = p.lm._replace(done=p.lm.done | p.done)
        lm_state = self.lm.force(lm_in, tok[:, None], active.astype(jnp.int32))
        eos = jnp.isin(tok, jnp.asarray(self.lm.eos_ids, jnp.int32))
        grown = lm_state.lengths - lm_in.lengths
        lm_state = lm_state._replace(done=lm_in.done | (active & (eos | lm_state.done)))
        info = StepInfo(grown.astype(jnp.int32), logp.reshape(-1), logq.reshape(-1))
        return self._after_step(p, lm_state, info), logq

    # ---------------------------------------------------------------------------------- paths
    def path(self, particle: LLMParticle) -> LLMParticle:
        r"""The trajectory \(x_0, \dots, x_{S-1}\) (\(S\) = ``max_steps``) of one particle (leaves without
        the particle axis), rebuilt from its final state: \(x_t\) is the particle after step \(t+1\), and
        after its last step the finished state repeats (absorption). The reference of conditional SMC."""
        p = particle
        s = self.max_steps
        ts = jnp.arange(s)
        total = jnp.maximum(p.num_steps, 1)
        idx = jnp.minimum(ts, total - 1)
        lengths = p.hist_lengths[idx]
        prompt_len = p.lm.prompt_lengths
        before = jnp.where(idx > 0, p.hist_lengths[jnp.maximum(idx - 1, 0)], prompt_len)
        done = p.done & (ts >= total - 1)
        lm = self.lm.rewind(p.lm, lengths)
        lm = lm._replace(done=lm.done | done)
        reward = self.reward.rewind(self.lm, p.reward, prompt_len, lengths)
        upto = jnp.arange(s)[None, :] <= idx[:, None]

        def hist(h):
            return jnp.where(upto, h[None, :], jnp.zeros((), h.dtype))

        return LLMParticle(
            lm=lm,
            reward=reward,
            num_steps=(idx + 1).astype(jnp.int32),
            done=done,
            step_tokens=(lengths - before).astype(jnp.int32),
            step_logprob=p.hist_logprob[idx],
            step_logq=p.hist_logq[idx],
            scored=p.hist_scored[idx],
            log_step_reward=p.hist_log_step_reward[idx],
            log_reward=p.hist_log_reward[idx],
            hist_lengths=hist(p.hist_lengths),
            hist_log_reward=hist(p.hist_log_reward),
            hist_log_step_reward=hist(p.hist_log_step_reward),
            hist_logprob=hist(p.hist_logprob),
            hist_logq=hist(p.hist_logq),
            hist_scored=hist(p.hist_scored),
            **_no_rejuvenation(s),
        )

    # ---------------------------------------------------------------------------------- host
    def completions(self, particles: LLMParticle) -> list[list[int]]:
        """Host: the generated token ids of every particle."""
        toks = np.asarray(particles.lm.tokens)
        p, n = np.asarray(particles.lm.prompt_lengths), np.asarray(particles.lm.lengths)
        return [toks[i, p[i]: n[i]].tolist() for i in range(toks.shape[0])]

    def answers(self, particles: LLMParticle) -> list[Hashable]:
        """Host: the canonical answer of every particle (``answer_fn``; with ``answer_ids_fn``,
        the integer ids)."""
        if self.answer_fn_id is None:
            return [int(a) for a in np.asarray(self.answer(particles))]
        fn = self.callbacks.fn(self.answer_fn_id)
        return [fn(ids) for ids in self.completions(particles)]
