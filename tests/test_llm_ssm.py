"""The LLM state-space model (models.llm_fk.ssm) on the Markov-chain LM, against exact answers.

The Markov LM of models.markov_lm (5 tokens, 5461 complete sequences) is run through the generic
step-LM adapter (MarkovStepLM) with a token-level reward model, and every number is compared with
an exact reference computed here in float64 NumPy by enumerating the sequences and their step
segmentation (independent of the JAX code), and with the forward recursion of
models.markov_lm_exact:

- particle filtering (``samplers.smc`` itself): E[Ẑ/Z] = 1 and the answer law, for the twisted
  weighting with the aggregations last / product / min, and the puri weighting, which is shown to
  target a *different* law (its own exact product-of-rewards target) than the twisted posterior;
- the compute counters (tokens, reward calls) against counts taken from the stored genealogy;
- particle Gibbs (with ancestor sampling) and parallel-tempering particle Gibbs leave the exact
  tempered posteriors invariant: chains started from exact draws stay exact.

Tolerances come from the Monte Carlo error (z = 4, Bonferroni over cells), and each check has a
companion that breaks the algorithm (a non-telescoping potential, unpinned references, swaps
always accepted) and asserts that the same check rejects it.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import samplers.parallel_tempering as pt
from exact_checks import evidence_check, posterior_check
from models.llm_fk.rewards import ProgrammaticStepVerifier, TokenPairReward
from models.llm_fk.ssm import LLMFeynmanKac
from models.llm_fk.strategies import (
    LastAggregation,
    LogitLink,
    LogLink,
    MinAggregation,
    ProductAggregation,
    PuriWeighting,
    TwistedWeighting,
)
from models.llm_fk.step_lm import MarkovStepLM
from models.markov_lm import token_constraint, toy_test_bed
from models.markov_lm_exact import enumerate_sequences, forward_answer_posterior
from samplers.smc import smc

Z_SCORE = 4.0
ALPHA = 2 * scipy.stats.norm.sf(Z_SCORE)
EOS, DOT = 4, 3
BETA = 2.0  # inverse temperature of the potential (τ = 0.5)
K_ANSWERS = 4  # answers a, b, c, '.' (the last non-EOS token)
R_RUNS, N_PF = 192, 64

# reward: each 'b' costs a factor 0.7, 'b b' is forbidden, final answers a/b/c/'.' score .5/.2/.9/.3
PHI = np.zeros((5, 5))
PHI[:, 1] += np.log(0.7)
PHI[1, 1] = -np.inf
PSI = np.log([0.5, 0.2, 0.9, 0.3, 1.0])


def last_answer(tokens, lengths, prompt_lengths=None):
    """Last non-EOS token (jnp, batched)."""
    idx = jnp.maximum(lengths - 1, 0)
    last = jnp.take_along_axis(tokens, idx[:, None], axis=1)[:, 0]
    before = jnp.take_along_axis(tokens, jnp.maximum(idx - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.where(last == EOS, before, last).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# exact references (float64 NumPy)
# ------------------------------------------------------------------------------------------------


def _segments(row, n, p=1, cap=3):
    """Lengths after each step (delimiter/EOS ends a step, at most ``cap`` tokens per step)."""
    ends, count, stop = [], 0, True
    for j in range(p, n):
        if stop or count == cap:
            if j > p:
                ends.append(j)
            count = 0
        count += 1
        stop = row[j] in (DOT, EOS)
    ends.append(n)
    return ends


class Exact:
    """Every complete sequence with its prior, answer and per-step rewards."""

    def __init__(self):
        toy = toy_test_bed(proposal=True)
        states = enumerate_sequences(toy)
        tok, length = states.tokens.astype(np.int64), states.lengths.astype(np.int64)
        log_p_tab = np.asarray(toy.lm.log_probs, np.float64)
        log_q_tab = np.asarray(toy.proposal.log_probs, np.float64)
        self.num = len(length)
        self.log_prior = np.zeros(self.num)
        self.log_proposal = np.zeros(self.num)
        self.answer = np.zeros(self.num, np.int64)
        self.prefix = []  # log r̂ of each prefix (finished flag on the last one)
        self.step = []  # log r̂ of each step alone
        with np.errstate(invalid="ignore"):
            for s in range(self.num):
                row, n = tok[s], length[s]
                self.log_prior[s] = sum(log_p_tab[row[j - 1], row[j]] for j in range(1, n))
                self.log_proposal[s] = sum(log_q_tab[row[j - 1], row[j]] for j in range(1, n))
                last = row[n - 1]
                self.answer[s] = row[n - 2] if last == EOS else last
                ends = _segments(row, n)
                pre, st, lo = [], [], 1
                for t, e in enumerate(ends):
                    fin = t == len(ends) - 1
                    bonus = PSI[self.answer[s]] if fin else 0.0
                    pre.append(sum(PHI[row[j - 1], row[j]] for j in range(1, e)) + bonus)
                    st.append(sum(PHI[row[j - 1], row[j]] for j in range(lo, e)) + bonus)
                    lo = e
                self.prefix.append(np.array(pre))
                self.step.append(np.array(st))

    def law(self, log_potential, base=None):
        """(log Z, answer law) of the target base(x) exp(log_potential(x)), base = the LM p or
        the proposal q."""
        lt = (self.log_prior if base is None else base) + log_potential
        m = np.max(lt)
        w = np.exp(lt - m)
        z = w.sum()
        return float(np.log(z) + m), np.bincount(self.answer, weights=w / z, minlength=K_ANSWERS)

    def twisted(self, beta):
        return self.law(beta * np.array([p[-1] for p in self.prefix]))

    def minimum(self, beta):
        return self.law(beta * np.array([np.min(s) for s in self.step]))

    def puri(self, beta, link, base=None):
        def f(lr):
            r = np.clip(np.exp(lr), 1e-7, 1 - 1e-7)
            return {"logit": np.log(r) - np.log1p(-r), "log": lr, "identity": np.exp(lr)}[link]

        with np.errstate(divide="ignore", invalid="ignore"):
            return self.law(beta * np.array([np.sum(f(p)) for p in self.prefix]), base)


@pytest.fixture(scope="module")
def exact():
    return Exact()


def _build(proposal: bool):
    toy = toy_test_bed(proposal=proposal)
    return LLMFeynmanKac.build(
        MarkovStepLM(toy.lm, toy.proposal), [DOT], TokenPairReward(PHI, PSI), max_steps=6,
        max_step_tokens=3, max_new_tokens=6, temperature=1.0 / BETA, answer_ids_fn=last_answer,
    )


@pytest.fixture(scope="module")
def base_model():
    """Steps drawn from the LM itself (particle Gibbs tests)."""
    return _build(proposal=False)


@pytest.fixture(scope="module")
def pf_model():
    """Steps drawn from a flatter proposal q (particle filter tests: twisted weights carry p/q)."""
    return _build(proposal=True)


# checks (shared by the real tests and their broken companions); evidence_check and
# posterior_check are in tests/exact_checks.py


def draws_check(samples, probs, z=Z_SCORE):
    """Exact draws: multinomial frequencies of [C, M] samples vs probs [C, K], every cell within
    z' sqrt(p(1−p)/M), z' Bonferroni-corrected over the C·K cells. Returns (ok, max |dev|/se)."""
    c, k = probs.shape
    m = samples.shape[1]
    freq = np.stack([np.bincount(samples[i], minlength=k)[:k] / m for i in range(c)])
    se = np.sqrt(probs * (1 - probs) / m)
    z_cell = scipy.stats.norm.isf(2 * scipy.stats.norm.sf(z) / 2 / (c * k))
    dev = np.abs(freq - probs)
    return bool(np.all(dev <= z_cell * se + 1e-12)), float(np.max(dev / np.maximum(se, 1e-300)))


# ------------------------------------------------------------------------------------------------
# exact references agree with the forward recursion
# ------------------------------------------------------------------------------------------------


def test_exact_reference_matches_forward_recursion(exact):
    """The twisted target p(x) R(x)^β of the reward is a Markov-LM constraint (β φ, β ψ): its log Z
    and answer law by the forward recursion equal our enumeration; the product of step rewards is
    the prefix reward (aggregation 'product' targets the same law)."""
    c = token_constraint(5, pair_log_potential=BETA * PHI, answer_log_reward=BETA * PSI)
    log_z_fwd, ans_fwd = forward_answer_posterior(dataclasses.replace(toy_test_bed(), constraint=c))
    log_z, ans = exact.twisted(BETA)
    assert exact.num == 5461
    np.testing.assert_allclose(log_z, log_z_fwd, atol=1e-10)
    np.testing.assert_allclose(ans, ans_fwd[:K_ANSWERS], atol=1e-12)
    with np.errstate(invalid="ignore"):
        for pre, st in zip(exact.prefix, exact.step):
            assert pre[-1] == pytest.approx(np.sum(st)) or (pre[-1] == -np.inf and np.sum(st) == -np.inf)
    # the biased target of puri differs from the twisted posterior
    _, puri = exact.puri(BETA, "logit")
    assert 0.5 * np.abs(puri - ans).sum() > 0.1


# ------------------------------------------------------------------------------------------------
# particle filtering: every weighting mode in one compiled call
# ------------------------------------------------------------------------------------------------

# (weighting, aggregation, per-step reward, p/q correction); steps are drawn from q. Strategies are
# classes (each its own compiled program); per-step and p/q are array leaves (vmapped over)
CONFIGS = {
    "twisted_last": (TwistedWeighting(), LastAggregation(), False, True),
    "twisted_product": (TwistedWeighting(), ProductAggregation(), True, True),
    "twisted_min": (TwistedWeighting(), MinAggregation(), True, True),
    "puri_logit": (PuriWeighting(link=LogitLink()), LastAggregation(), False, False),
    "broken_no_ratio": (PuriWeighting(link=LogLink()), LastAggregation(), False, True),  # R_t^β, not R_t^β / R_{t-1}^β
    "broken_no_correction": (TwistedWeighting(), LastAggregation(), False, False),  # targets q R^β
}


def _configured(model, weighting, aggregation):
    return dataclasses.replace(model, weighting=weighting, aggregation=aggregation)


@eqx.filter_jit
def _pf_many(m, flags, keys):
    def per_config(flag, ks):
        per_step, correct = flag
        mc = eqx.tree_at(lambda x: (x.reward.per_step, x.correct_proposal), m, (per_step, correct))

        def one(k):
            res = smc(k, mc, N_PF, resampling="systematic", ess_threshold=0.5,
                      max_steps=mc.max_steps, store_history=True)
            h = res.history
            # independent compute count: growth of every particle over its ancestor, every step
            prev_len = jnp.take_along_axis(h.particles.lm.lengths[:-1], h.ancestors[1:], axis=1)
            grown = h.particles.lm.lengths[1:] - prev_len
            valid = jnp.arange(1, mc.max_steps) < res.num_steps
            first = h.particles.lm.lengths[0] - mc.prompt_state.lengths[0]
            tokens = jnp.sum(first) + jnp.sum(jnp.where(valid[:, None], grown, 0))
            calls = N_PF + jnp.sum(jnp.where(valid[:, None], grown > 0, False))
            return dict(log_z=res.log_evidence, log_w=res.log_weights,
                        answer=mc.answer(res.particles), done=res.particles.done,
                        extinct=res.extinct, nan=res.num_nan_potentials,
                        tokens=jnp.sum(res.step_info["tokens"]),
                        calls=jnp.sum(res.step_info["reward_calls"]),
                        tokens_hist=tokens, calls_hist=calls)

        return jax.vmap(one)(ks)

    return jax.vmap(per_config)(flags, keys)


@pytest.fixture(scope="module")
def pf_runs(pf_model):
    keys = jax.random.split(jax.random.key(7), len(CONFIGS) * R_RUNS).reshape(len(CONFIGS), R_RUNS)
    groups: dict = {}  # configurations with the same strategies share one compiled program
    for i, (name, (w, a, per_step, correct)) in enumerate(CONFIGS.items()):
        groups.setdefault((w, a), []).append((i, name, per_step, correct))
    runs = {}
    for (w, a), members in groups.items():
        flags = (jnp.asarray([p for _, _, p, _ in members]), jnp.asarray([c for _, _, _, c in members]))
        ks = keys[jnp.asarray([i for i, _, _, _ in members])]
        out = jax.tree.map(np.asarray, _pf_many(_configured(pf_model, w, a), flags, ks))
        for j, (_, name, _, _) in enumerate(members):
            runs[name] = jax.tree.map(lambda x, j=j: x[j], out)
    return runs


def _sane(run):
    assert run["done"].all() and not run["extinct"].any() and run["nan"].sum() == 0


def test_pf_twisted_evidence_and_posterior(pf_runs, exact):
    """Twisted weighting with steps drawn from a proposal q and weights carrying p/q, aggregation
    'last' (prefix reward) and 'product' (step rewards): unbiased Ẑ of Z = E_p[R^β] (forward
    recursion) and the exact answer posterior; 'min' against its own enumerated target
    p(x) min_t r̂_t^β."""
    targets = {"twisted_last": exact.twisted(BETA), "twisted_product": exact.twisted(BETA),
               "twisted_min": exact.minimum(BETA)}
    for name, (log_z, probs) in targets.items():
        run = pf_runs[name]
        _sane(run)
        ok, mean, se = evidence_check(run["log_z"], log_z)
        assert ok, f"{name}: E[Ẑ/Z] = {mean:.4f} ± {se:.4f}"
        ok, tv, bound, est = posterior_check(run["log_z"], run["log_w"], run["answer"], probs)
        assert ok, f"{name}: TV {tv:.4f} > bound {bound:.4f} (est {est}, exact {probs})"


def test_pf_check_rejects_broken_weights(pf_runs, exact):
    """Broken: potentials R_t^β instead of R_t^β / R_{t−1}^β (reward counted again at every step),
    or twisted weights without the p/q correction: the checks against Z and π reject them."""
    log_z, probs = exact.twisted(BETA)
    for name in ("broken_no_ratio", "broken_no_correction"):
        run = pf_runs[name]
        _sane(run)
        ok, mean, se = evidence_check(run["log_z"], log_z)
        assert not ok, f"{name}: E[Ẑ/Z] = {mean:.4f} ± {se:.4f} should be rejected"
    run = pf_runs["broken_no_correction"]
    ok, tv, bound, _ = posterior_check(run["log_z"], run["log_w"], run["answer"], probs)
    assert not ok, f"uncorrected proposal: TV {tv:.4f} within {bound:.4f}"


def test_pf_puri_targets_a_different_biased_law(pf_runs, exact):
    """puri (resample ∝ logit-reward^β every step, as the paper's code): its particles follow its
    own exact target p(x) ∏_t f(R_t)^β, which the posterior check against the twisted posterior
    p(x) R(x)^β rejects. (Its Ẑ estimates the normaliser of that product, here e^149 from
    logit(1 − 1e-7)-sized potentials: too heavy-tailed for a CLT check with 192 runs.)"""
    run = pf_runs["puri_logit"]
    _sane(run)
    _, probs_p = exact.puri(BETA, "logit", base=exact.log_proposal)  # steps drawn from q
    ok, tv, bound, _ = posterior_check(run["log_z"], run["log_w"], run["answer"], probs_p)
    assert ok, f"puri vs its own target: TV {tv:.4f} > {bound:.4f}"
    ok, tv, bound, _ = posterior_check(run["log_z"], run["log_w"], run["answer"],
                                       exact.twisted(BETA)[1])
    assert not ok and tv > 0.1, f"puri vs the twisted posterior: TV {tv:.4f} (bound {bound:.4f})"


def test_compute_counters_match_genealogy(pf_runs):
    """Tokens generated and reward calls (the model's per-step ``step_info``, summed) equal counts
    taken from the stored genealogy: each step, every particle's growth over its ancestor, resampled-away particles
    included."""
    for name, run in pf_runs.items():
        np.testing.assert_array_equal(run["tokens"], run["tokens_hist"], err_msg=name)
        np.testing.assert_array_equal(run["calls"], run["calls_hist"], err_msg=name)
        assert run["tokens"].min() >= N_PF


# ------------------------------------------------------------------------------------------------
# particle Gibbs and parallel tempering: invariance of the exact tempered posteriors
# ------------------------------------------------------------------------------------------------

REPS, POOL, N_PG = 1024, 96, 4


def _temper(model, beta):
    return model.with_inv_temperature(beta)


def _path(model, particle):
    return model.path(particle)


def _record_answer(path):
    return last_answer(path.lm.tokens[-1:], path.lm.lengths[-1:])[0]


def _record_answer_broken(path):  # same record, a distinct function: a separate compilation
    return last_answer(path.lm.tokens[-1:], path.lm.lengths[-1:])[0]


def _exact_draws(model, key, betas, reps, pool):
    """reps × C exact draws of π_c ∝ p R^{β_c}: rejection sampling from the LM (rollouts of the
    model itself), accepting with probability R^{β_c} ≤ 1. Returns paths [reps, C, T, ...] and
    whether every (rep, chain) accepted one of its ``pool`` proposals."""
    c = betas.shape[0]
    k_roll, k_u = jax.random.split(key)

    def rollout(k):
        k0, k1 = jax.random.split(k)
        p = model.init(k0, pool)
        p = jax.lax.fori_loop(1, model.max_steps,
                              lambda t, x: model.move(jax.random.fold_in(k1, t), t, x), p)
        return p

    finals = jax.vmap(rollout)(jax.random.split(k_roll, reps * c))  # [reps*c, pool]
    beta = jnp.tile(betas, reps)
    u = jax.random.uniform(k_u, (reps * c, pool))
    accept = finals.done & (jnp.log(u) < beta[:, None] * finals.log_reward)
    idx = jnp.argmax(accept, axis=1)
    chosen = jax.tree.map(lambda x: x[jnp.arange(reps * c), idx], finals)
    paths = jax.vmap(model.path)(chosen)
    paths = jax.tree.map(lambda x: x.reshape((reps, c) + x.shape[1:]), paths)
    return paths, jnp.all(jnp.any(accept, axis=1))


@eqx.filter_jit
def _draws_jit(model, betas, key):
    paths, all_accepted = _exact_draws(model, key, betas, REPS, POOL)
    start = jax.vmap(jax.vmap(_record_answer))(paths)
    lm = paths.lm  # path(final) repeats the final state; earlier steps are prefixes of it
    prefix_ok = jnp.all(jnp.where(jnp.arange(lm.tokens.shape[-1]) < lm.lengths[..., None],
                                  lm.tokens == lm.tokens[:, :, -1:, :], True))
    return paths, start, all_accepted, prefix_ok


@eqx.filter_jit
def _pg_invariance(model, betas, paths, key, *, iterations, ancestor_sampling, swap, record_fn,
                   log_target=None):
    def one(k, p):
        return pt.parallel_tempering_pg(
            k, model, betas, p, N_PG, iterations, tempered=_temper, path_fn=_path,
            ancestor_sampling=ancestor_sampling, max_steps=model.max_steps, swap=swap,
            record_fn=record_fn, log_target=log_target)

    out = jax.vmap(one)(jax.random.split(key, REPS), paths)
    return dict(end=out.records[:, -1], accepted=out.swap_accepted, proposed=out.swap_proposed,
                extinct=out.num_extinct)


PT_BETAS = (BETA, BETA / 2, BETA / 4)


@pytest.fixture(scope="module")
def exact_pt(exact):
    return np.stack([exact.twisted(b)[1] for b in PT_BETAS])


@pytest.fixture(scope="module")
def draws(base_model):
    """REPS exact draws of each tempered posterior (chains of PT_BETAS), as reference paths."""
    paths, start, all_accepted, prefix_ok = _draws_jit(base_model, jnp.asarray(PT_BETAS),
                                                       jax.random.key(10))
    return paths, np.asarray(start), bool(all_accepted), bool(prefix_ok)


def _cold(paths):
    return jax.tree.map(lambda x: x[:, :1], paths)


def test_exact_draws(draws, exact_pt):
    """The starting draws (rejection sampling from the model's own rollouts) are exact."""
    _, start, all_accepted, prefix_ok = draws
    assert all_accepted and prefix_ok
    ok, worst = draws_check(start.T, exact_pt)
    assert ok, f"initial draws not exact ({worst:.2f} se)"


@pytest.fixture(scope="module")
def ptpg_run(base_model, draws):
    out = _pg_invariance(base_model, jnp.asarray(PT_BETAS), draws[0], jax.random.key(11),
                         iterations=2, ancestor_sampling=False, swap=True, record_fn=_record_answer)
    return jax.tree.map(np.asarray, out)


def test_ptpg_leaves_tempered_posteriors_invariant(ptpg_run, exact_pt):
    """Three chains at β, β/2, β/4 started from exact draws: after two sweeps with neighbour swaps
    every chain's answers are still exact draws of its tempered posterior."""
    r = ptpg_run
    assert r["extinct"].sum() == 0
    ok, worst = draws_check(r["end"].T, exact_pt)
    assert ok, f"PT-PG does not preserve the tempered posteriors ({worst:.2f} se)"
    rate = r["accepted"].sum((0, 1)) / r["proposed"].sum((0, 1))
    assert np.all(rate > 0.2) and np.all(rate < 1.0), rate


def test_ptpg_check_rejects_always_accepted_swaps(base_model, draws, exact_pt):
    """Broken: swaps accepted without the Metropolis test; the hot chains' draws leak into the
    cold chain and the invariance check rejects it."""
    out = _pg_invariance(base_model, jnp.asarray(PT_BETAS), draws[0], jax.random.key(12),
                         iterations=2, ancestor_sampling=False, swap=True,
                         record_fn=_record_answer_broken, log_target=_zero_log_target)
    ok, worst = draws_check(np.asarray(out["end"]).T, exact_pt)
    assert not ok, f"always-accepted swaps not detected ({worst:.2f} se)"


def _zero_log_target(model, path):
    return jnp.zeros(())


@pytest.fixture(scope="module")
def pgas_run(base_model, draws):
    out = _pg_invariance(base_model, jnp.asarray([BETA]), _cold(draws[0]), jax.random.key(13),
                         iterations=2, ancestor_sampling=True, swap=False, record_fn=_record_answer)
    return jax.tree.map(np.asarray, out)


def test_pgas_leaves_posterior_invariant(pgas_run, exact):
    """Particle Gibbs with ancestor sampling (N = 4 particles): exact draws stay exact."""
    r = pgas_run
    assert r["extinct"].sum() == 0
    ok, worst = draws_check(r["end"].T, exact.twisted(BETA)[1][None])
    assert ok, f"PGAS does not preserve the posterior ({worst:.2f} se)"


def test_pg_check_rejects_unpinned_reference(base_model, draws, exact, monkeypatch):
    """Broken: the reference is not pinned (plain SMC, a draw ∝ W_T): the sweep's output follows
    the biased law of a 4-particle filter, and the invariance check rejects it."""
    real_smc = pt.smc

    def unpinned(key, model, n, **kw):
        kw.pop("reference", None)
        kw.pop("ancestor_sampling", None)
        return real_smc(key, model, n, **kw)

    monkeypatch.setattr(pt, "smc", unpinned)
    out = _pg_invariance(base_model, jnp.asarray([BETA]), _cold(draws[0]), jax.random.key(14),
                         iterations=2, ancestor_sampling=False, swap=False,
                         record_fn=_record_answer_broken)
    ok, worst = draws_check(np.asarray(out["end"]).T, exact.twisted(BETA)[1][None])
    assert not ok, f"unpinned reference not detected ({worst:.2f} se)"


GENERIC_REPS = 512


@eqx.filter_jit
def _generic_pt(model, betas, paths, key):
    def one(k, p):
        return pt.parallel_tempering_pg(k, model, betas, p, N_PG, 2, tempered=_temper,
                                        max_steps=model.max_num_steps, record_fn=_record_answer)

    out = jax.vmap(one)(jax.random.split(key, paths.num_steps.shape[0]), paths)
    return out.records[:, -1]


@pytest.mark.slow
def test_ptpg_generic_path_leaves_tempered_posteriors_invariant(base_model, draws, exact_pt):
    """The generic path (no ``path_fn``: the new reference is drawn from the genealogy of
    ``samplers.particle_gibbs.csmc_kernel``, which stores the whole particle history): chains
    started from exact draws stay exact."""
    paths = jax.tree.map(lambda x: x[:GENERIC_REPS], draws[0])
    end = np.asarray(_generic_pt(base_model, jnp.asarray(PT_BETAS), paths, jax.random.key(5)))
    ok, worst = draws_check(end.T, exact_pt)
    assert ok, f"generic PT-PG does not preserve the tempered posteriors ({worst:.2f} se)"


# ------------------------------------------------------------------------------------------------
# host-side text verifier and deterministic pieces
# ------------------------------------------------------------------------------------------------


def _text_reward(text: str, finished: bool) -> float:
    """The reward of TokenPairReward(PHI, PSI) computed from the decoded text (prompt '.')."""
    names = {"a": 0, "b": 1, "c": 2, ".": 3, "<eos>": 4}
    ids = [DOT] + [names[w] for w in text.split()]
    log_r = sum(PHI[u, v] for u, v in zip(ids[:-1], ids[1:]))
    if finished:
        ans = ids[-2] if ids[-1] == EOS else ids[-1]
        log_r += PSI[ans]
    return float(np.exp(log_r))


@eqx.filter_jit
def _both_scores(model_tok, model_txt, key):
    p = model_tok.init(key, 16)
    p = model_tok.move(jax.random.fold_in(key, 1), jnp.asarray(1), p)
    q = model_txt.init(key, 16)
    q = model_txt.move(jax.random.fold_in(key, 1), jnp.asarray(1), q)
    return p, q


def test_text_verifier_matches_token_verifier(base_model):
    """A Python verifier on decoded text (jax.pure_callback from the compiled step) gives the same
    particles and rewards as the table-lookup verifier on token ids."""
    lm = base_model.lm
    model_txt = LLMFeynmanKac.build(lm, [DOT], ProgrammaticStepVerifier(_text_reward), max_steps=6,
                                    max_step_tokens=3, max_new_tokens=6, answer_ids_fn=last_answer)
    p, q = _both_scores(base_model, model_txt, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(p.lm.tokens), np.asarray(q.lm.tokens))
    np.testing.assert_allclose(np.asarray(p.log_reward), np.asarray(q.log_reward), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(p.hist_scored), np.asarray(q.hist_scored))


def test_done_and_validation(base_model):
    """Finished particles are absorbing (reweight_finished only for puri: they compete again until
    all are done); bad options give clear errors."""
    done = jnp.asarray([True, False])
    parts = base_model.initial_state(2)._replace(done=done)
    np.testing.assert_array_equal(np.asarray(base_model.done(parts)), [True, False])
    paper = base_model.with_options(weighting="puri", reweight_finished=True)
    np.testing.assert_array_equal(np.asarray(paper.done(parts)), [False, False])
    assert paper.weighting == PuriWeighting(link=LogitLink(), reweight_finished=True)
    assert isinstance(paper.aggregation, LastAggregation)
    lm = base_model.lm
    rew = TokenPairReward(PHI, PSI)
    with pytest.raises(ValueError, match="weighting"):
        LLMFeynmanKac.build(lm, [DOT], rew, max_steps=6, max_step_tokens=3, weighting="bogus")
    with pytest.raises(ValueError, match="temperature"):
        LLMFeynmanKac.build(lm, [DOT], rew, max_steps=6, max_step_tokens=3, temperature=0.0)
    with pytest.raises(ValueError, match="reweight_finished"):
        LLMFeynmanKac.build(lm, [DOT], rew, max_steps=6, max_step_tokens=3, reweight_finished=True)
    with pytest.raises(ValueError, match="prompt"):
        LLMFeynmanKac.build(lm, [], rew, max_steps=6, max_step_tokens=3)
    with pytest.raises(ValueError, match="max_steps"):
        LLMFeynmanKac.build(lm, [DOT], rew, max_steps=0, max_step_tokens=3)
    with pytest.raises(ValueError, match="score_steps"):
        LLMFeynmanKac.build(lm, [DOT], rew, max_steps=6, max_step_tokens=3, aggregation="min",
                            score_steps=False)


# ------------------------------------------------------------------------------------------------
# no global state, engine hooks, log-scale host rewards
# ------------------------------------------------------------------------------------------------


def _module_containers():
    """Sizes of every module-level dict / list / set of our LLM Feynman-Kac and app modules."""
    import sys

    out = {}
    for name, mod in list(sys.modules.items()):
        if not (name.startswith("models.llm_fk") or name.startswith("app") or name.startswith("models.markov_lm")):
            continue
        for attr, v in vars(mod).items():
            if isinstance(v, (dict, list, set)) and not attr.startswith("__"):
                out[(name, attr)] = len(v)
    return out


def _first_word(ids):
    return ids[0] if ids else -1


def test_host_callbacks_are_per_object_and_no_module_registry_grows(base_model):
    """Host functions and answer tables live in the HostCallbacks object the caller passes: two
    objects share nothing, and running host verifiers and answers leaves every module-level
    container of models.llm_fk / app unchanged (there is no module-level registry)."""
    from models.llm_fk import rewards

    assert not any(hasattr(rewards, n) for n in ("_HOST_FNS", "_HOST_IDS", "host_fn_id", "host_fn"))
    import models.llm_fk.ssm as ssm_mod

    assert not hasattr(ssm_mod, "_ANSWER_TABLES") and not hasattr(ssm_mod, "answer_table")
    before = _module_containers()
    a, b = rewards.HostCallbacks(), rewards.HostCallbacks()
    lm = base_model.lm
    models = [LLMFeynmanKac.build(lm, [DOT], ProgrammaticStepVerifier(_text_reward, callbacks=cb), max_steps=6,
                                  max_step_tokens=3, max_new_tokens=6, answer_fn=_first_word)
              for cb in (a, b)]
    assert models[0].callbacks is a and models[1].callbacks is b  # the reward's object by default
    p = models[0].init(jax.random.key(0), 8)
    ids_a = np.asarray(models[0].answer(p))
    assert a.answers(models[0].answer_fn_id).values and not b._tables  # only a's table grew
    ids_b = np.asarray(models[1].answer(p))
    np.testing.assert_array_equal(ids_a, ids_b)  # same interning order, separate tables
    assert a.answers(models[0].answer_fn_id) is not b.answers(models[1].answer_fn_id)
    assert a.fn(0) is _text_reward and b.fn(0) is _text_reward
    c = rewards.HostCallbacks()
    with pytest.raises(KeyError, match="no host function"):
        c.fn(0)
    # another task's function in the same object: same pytree structure (no recompilation),
    # another id; the same function in another object: another structure
    r1, r2 = (ProgrammaticStepVerifier(fn, callbacks=a) for fn in (_text_reward, lambda t, f: 1.0))
    assert jax.tree.structure(r1) == jax.tree.structure(r2) and int(r1.fn_id) != int(r2.fn_id)
    assert jax.tree.structure(ProgrammaticStepVerifier(_text_reward, callbacks=b)) != jax.tree.structure(r1)
    assert _module_containers() == before


def test_step_info_previous_view_and_move_keeps_done(base_model):
    """The protocol hooks: ``previous_view`` holds log R and the step count only (no KV cache or
    token buffer); ``step_info`` counts the tokens and reward calls of the particles that moved;
    ``move`` leaves done particles bit-for-bit unchanged (every leaf), so ``move_keeps_done``
    (the Markov-chain LM; the transformer in the next test)."""
    m = base_model
    assert m.move_keeps_done and not m.is_adaptive
    p = m.init(jax.random.key(4), 32)
    view = m.previous_view(p)
    assert set(view._fields) == {"log_reward", "num_steps"}
    info0 = m.step_info(jnp.asarray(0), None, p)
    assert int(info0["tokens"]) == int(jnp.sum(p.step_tokens)) and int(info0["reward_calls"]) == 32
    for t in range(1, 4):
        q = m.move(jax.random.key(10 + t), jnp.asarray(t), p)
        done = np.asarray(p.done)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
            np.testing.assert_array_equal(np.asarray(a)[done], np.asarray(b)[done])
        info = m.step_info(jnp.asarray(t), m.previous_view(p), q)
        grown = np.asarray(q.lm.lengths - p.lm.lengths)
        assert int(info["tokens"]) == grown.sum() and int(info["reward_calls"]) == (~done).sum()
        # the potential from the view equals the potential from the full previous particles
        np.testing.assert_array_equal(np.asarray(m.log_potential(jnp.asarray(t), m.previous_view(p), q)),
                                      np.asarray(m.log_potential(jnp.asarray(t), p, q)))
        p = q
    assert np.asarray(p.done).any()


def test_transformer_step_lm_keeps_done_rows():
    """The transformer's step LM leaves finished rows unchanged in everything it can read: tokens,
    lengths, logits, log-prob, done flag and every KV-cache slot below the row's length (only the
    scratch slot at the length is written by the batched forward). This is what lets the engine
    skip its row select (``move_keeps_done``)."""
    from models.llm import ModelConfig, init_random
    from models.llm_fk.rewards import TokenVerifier
    from models.llm_fk.ssm import LLMFeynmanKac
    from models.llm_fk.step_lm import StepLM

    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(1,))
    lm = StepLM(init_random(cfg, jax.random.key(0), scale=0.5), None, (2, 3), (1,))
    model = LLMFeynmanKac.build(lm, [4, 5, 6], TokenVerifier(lambda tok, n, p0, prev, fin: jnp.ones(tok.shape[:1])),
                                max_steps=8, max_step_tokens=2)
    assert StepLM.keeps_done_rows and model.move_keeps_done
    p = model.init(jax.random.key(1), 16)
    seen_done = 0
    for t in range(1, 8):
        q = model.move(jax.random.key(10 + t), jnp.asarray(t), p)
        done = np.asarray(p.done)
        seen_done += done.sum()
        for name in ("tokens", "lengths", "logits", "done", "logprob", "prompt_lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(p.lm, name))[done],
                                          np.asarray(getattr(q.lm, name))[done], err_msg=name)
        slots = np.arange(p.lm.tokens.shape[1])[None, :] < np.asarray(p.lm.lengths)[:, None]  # [N, T]
        for a, b in zip(p.lm.cache.k + p.lm.cache.v, q.lm.cache.k + q.lm.cache.v):
            a, b = np.asarray(a), np.asarray(b)  # [N, K, T, D]
            keep = (slots[:, None, :, None] & done[:, None, None, None]) & np.ones(a.shape, bool)
            np.testing.assert_array_equal(a[keep], b[keep])
        for a, b in zip(jax.tree.leaves(p._replace(lm=None)), jax.tree.leaves(q._replace(lm=None))):
            np.testing.assert_array_equal(np.asarray(a)[done], np.asarray(b)[done])
        p = q
    assert seen_done > 0, "the test needs finished particles"


def test_log_scale_host_rewards_do_not_underflow(base_model):
    """A host reward returning log r̂ = −200 survives in float32, where the probability e^−200
    underflows to 0 (log r̂ = −∞, a killed particle); invalid log-scores (> 0) are NaN."""
    from models.llm_fk.rewards import FinalAnswerVerifier

    lm = base_model.lm

    def build(reward):
        return LLMFeynmanKac.build(lm, [DOT], reward, max_steps=6, max_step_tokens=3, max_new_tokens=6,
                                   answer_ids_fn=last_answer)

    log_step = build(ProgrammaticStepVerifier(lambda text, fin: -200.0, log_scale=True))
    prob_step = build(ProgrammaticStepVerifier(lambda text, fin: float(np.exp(-200.0))))
    bad = build(ProgrammaticStepVerifier(lambda text, fin: 0.5, log_scale=True))
    log_final = build(FinalAnswerVerifier(lambda text: -200.0, log_scale=True))
    key = jax.random.key(2)
    np.testing.assert_allclose(np.asarray(log_step.init(key, 4).log_reward), -200.0)
    assert np.all(np.asarray(prob_step.init(key, 4).log_reward) == -np.inf)
    assert np.all(np.isnan(np.asarray(bad.init(key, 4).log_reward)))
    p = log_final.init(key, 16)
    fin = np.asarray(p.done)
    lr = np.asarray(p.log_reward)
    np.testing.assert_allclose(lr[fin], -200.0)
    np.testing.assert_array_equal(lr[~fin], 0.0)
