"""Contract tests: every sampler of the toolkit, on tiny models, against four contracts.

For each entry of :data:`REGISTRY`:

(a) **jit** — it runs compiled: under the sampler's own ``jit`` (``smc``, particle Gibbs, PMMH,
    parallel tempering, tempering, the search methods) or under ``jax.jit`` in the entry (the
    kernel ``init``/``step``, smoothing), with a traced key;
(b) **finite** — the outputs that must be finite are (log Ẑ, weights, particles, scores ...);
    −inf is allowed only where documented (a killed particle's log-weight, an invalid beam's or a
    forbidden sequence's score), NaN only where documented (self-consistency never scores);
(c) **pytree** — the particles come back with the treedef, dtypes and event shapes of the model's
    own ``init`` output, with the expected leading axes (particles, chains, draws, time);
(d) **no retrace** — a second call with another key traces and compiles nothing: no jaxpr is
    traced and no XLA program is compiled during it (JAX's monitoring events).

Adding a sampler: write a small ``_name(...) -> Entry`` builder below (or reuse one) and add one line
to :data:`REGISTRY`. A builder returns an :class:`Entry`: ``run(key) -> Outputs`` plus the expected
particle structure (``like``, one particle from the model's ``init``) and leading axes (``lead``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

from models.linear_gaussian import LGSSMParams, lgssm
from models.llm_fk.markov import toy_reasoning_model
from ppl.feynman_kac import AbstractFeynmanKac
from ppl.numpyro_model import from_numpyro
from ppl.state_space import StateSpaceModel
from samplers import smc_kernel
from samplers.parallel_tempering import parallel_tempering_pg
from samplers.particle_gibbs import particle_gibbs
from samplers.pmmh import pmmh
from samplers.smc2 import smc2
from samplers.search import beam_search, best_of_n, dvts, self_consistency, weighted_best_of_n
from samplers.smc import smc
from samplers.smoothing import ffbs, mcmc_backward_sampling, sample_genealogy
from samplers.tempering import AdaptiveTempering, tempered_smc
from samplers.waste_free import WasteFreeTempering
from samplers.data_tempering import DataTempering
from samplers import variational as vi
from models import diffusion as dm

N = 8  # particles
T = 5  # steps of the state-space models


class Outputs(NamedTuple):
    """What an entry's run returns.

    particles: the particle pytree to check against the model (``None``: not applicable).
    finite: pytree of arrays that must be finite everywhere.
    not_nan: pytree of arrays that may hold −inf (documented) but neither NaN nor +inf.
    """

    particles: Any
    finite: Any
    not_nan: Any = None


class Entry(NamedTuple):
    """A registered sampler: ``run(key) -> Outputs``; ``like``: one particle as returned by the
    model's ``init(key, 1)`` (shapes via ``jax.eval_shape``), or ``None``; ``lead``: the leading
    axes that replace the particle axis of size 1 in the outputs' particles."""

    run: Callable[[jax.Array], Outputs]
    like: Any
    lead: tuple[int, ...]


# ------------------------------------------------------------------------------------------------
# tiny models (built once per process)
# ------------------------------------------------------------------------------------------------


def _lgssm():
    ssm = lgssm(LGSSMParams.scalar(0.9, 0.5, 1.0))
    xs, ys = ssm.simulate(jax.random.key(0), T)
    return ssm, xs, ys


def _one_particle(model) -> Any:
    return jax.eval_shape(lambda: model.init(jax.random.key(0), 1))


def _dict_init(p):
    return dist.Normal(0.0, jnp.sqrt(p["q"]))


def _dict_trans(p, t, x):
    return dist.Normal(0.7 * x, jnp.sqrt(p["q"]))


def _dict_obs(p, t, x):
    return dist.Normal(x, 0.5)


def _numpyro_normal(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


class _Tempered(AbstractFeynmanKac):
    """The potentials of a model raised to the power β (for parallel tempering)."""

    base: AbstractFeynmanKac
    beta: jax.Array

    @property
    def num_steps(self):
        return self.base.num_steps

    def init(self, key, num_particles):
        return self.base.init(key, num_particles)

    def move(self, key, t, particles):
        return self.base.move(key, t, particles)

    def log_potential(self, t, previous, particles):
        return self.beta * self.base.log_potential(t, previous, particles)

    def log_transition(self, t, previous, particles):
        return self.base.log_transition(t, previous, particles)


def _temper(model, beta):
    return _Tempered(model, beta)


# ------------------------------------------------------------------------------------------------
# entry builders: one small function per sampler family
# ------------------------------------------------------------------------------------------------


def _smc_outputs(res, steps=None) -> Outputs:
    ess = res.ess if steps is None else res.ess[:steps]
    return Outputs(res.particles, finite=(res.log_evidence, res.particles, ess),
                   not_nan=res.log_weights)


def _smc_lgssm(**kwargs) -> Entry:
    ssm, xs, ys = _lgssm()
    model = ssm.bootstrap(ys)
    ref = xs if kwargs.pop("conditional", False) else None

    def run(key):
        res = smc(key, model, N, reference=ref, **kwargs)
        return _smc_outputs(res)

    return Entry(run, _one_particle(model), (N,))


def _smc_markov_lm(**options) -> Entry:
    model = toy_reasoning_model()  # an LLMFeynmanKac on the Markov-chain LM
    if options:  # power target / resample-move (models.llm_fk.ssm)
        model = model.with_options(**options)

    def run(key):
        res = smc(key, model, N, max_steps=model.max_num_steps)
        # a particle's log rewards are −inf once it breaks the hard constraint ('b b')
        return Outputs(res.particles, finite=(res.log_evidence, res.particles.lm),
                       not_nan=(res.log_weights, res.ess[0], res.particles))

    return Entry(run, _one_particle(model), (N,))


def _kernel() -> Entry:
    ssm, _, ys = _lgssm()
    model = ssm.bootstrap(ys)

    @jax.jit
    def run(key):
        k0, k = jax.random.split(key)
        state = smc_kernel.init(k0, model, N)

        def body(st, kt):
            st, info = smc_kernel.step(kt, st, model, ess_threshold=1.0)
            return st, info.log_evidence_increment

        state, incs = jax.lax.scan(body, state, jax.random.split(k, T - 1))
        return Outputs(state.particles, finite=(state.log_evidence, state.log_weights, state.ess,
                                                state.particles, incs))

    return Entry(run, _one_particle(model), (N,))


def _smoothing(method: str) -> Entry:
    ssm, _, ys = _lgssm()
    model = ssm.bootstrap(ys)
    m = 3

    @jax.jit
    def run(key):
        k1, k2 = jax.random.split(key)
        res = smc(k1, model, N, store_history=True)
        if method == "genealogy":
            out = sample_genealogy(k2, res, m)
        elif method == "ffbs":
            out = ffbs(k2, model, res, m)
        else:
            out = mcmc_backward_sampling(k2, model, res, m, num_mcmc_steps=2)
        return Outputs(out.trajectories, finite=out.trajectories,
                       not_nan=() if method == "genealogy" else out.acceptance_rate)

    return Entry(run, _one_particle(model), (m, T))


def _particle_gibbs() -> Entry:
    ssm, _, ys = _lgssm()
    s = 2

    def run(key):
        res = particle_gibbs(key, ssm, ys, num_particles=4, num_samples=s)
        return Outputs(res.trajectories, finite=(res.trajectories, res.log_evidence,
                                                 res.update_rate))

    return Entry(run, _one_particle(ssm.bootstrap(ys)), (1, s, T))


def _pmmh() -> Entry:
    ssm = StateSpaceModel(_dict_init, _dict_trans, _dict_obs, {"q": jnp.asarray(1.0)})
    _, ys = ssm.simulate(jax.random.key(0), T)
    prior = {"q": dist.InverseGamma(4.0, 3.0)}
    s = 3

    def run(key):
        res = pmmh(key, ssm, ys, prior, num_particles=4, num_samples=s, num_warmup=2,
                   init_params={"q": 1.0})
        return Outputs(res.params, finite=(res.params, res.log_likelihood, res.log_prior,
                                           res.proposal_cov))

    like = jax.eval_shape(lambda: {k: d.sample(jax.random.key(0), (1,)) for k, d in prior.items()})
    return Entry(run, like, (1, s))


def _smc2() -> Entry:
    ssm = StateSpaceModel(_dict_init, _dict_trans, _dict_obs, {"q": jnp.asarray(1.0)})
    _, ys = ssm.simulate(jax.random.key(0), T)
    prior = {"q": dist.InverseGamma(4.0, 3.0)}

    def run(key):
        # N_x capped at its start: a doubling would (by design) compile the program for 2 N_x
        res = smc2(key, ssm, ys, prior, num_theta_particles=N, num_x_particles=4,
                   max_num_x_particles=4, num_mcmc_steps=1, progress=False)
        # a θ-particle whose filter died has log-weight −inf (documented)
        return Outputs(res.params, finite=(res.params, res.log_evidence, res.ess,
                                           res.log_evidence_increments, res.filters.particles),
                       not_nan=res.log_weights)

    like = jax.eval_shape(lambda: {k: d.sample(jax.random.key(0), (1,)) for k, d in prior.items()})
    return Entry(run, like, (N,))


def _tempering() -> Entry:
    target = from_numpyro(_numpyro_normal, jnp.linspace(-0.5, 0.5, 5))

    def run(key):
        res = tempered_smc(key, target, num_particles=N, max_steps=8, num_mcmc_steps=1)
        p = res.smc.particles  # acceptance is NaN before the first move (documented)
        return Outputs(p, finite=(res.log_evidence, res.log_weights, p.z, p.log_likelihood,
                                  res.samples, res.lambdas[:1]))

    return Entry(run, _one_particle(AdaptiveTempering(target)), (N,))


def _waste_free() -> Entry:
    target = from_numpyro(_numpyro_normal, jnp.linspace(-0.5, 0.5, 5))
    model = WasteFreeTempering(AdaptiveTempering(target, kernel="rwm"), 2)

    def run(key):
        res = smc(key, model, N, ess_threshold=1.0, max_steps=8)
        p = res.particles
        return Outputs(p, finite=(res.log_evidence, res.log_weights, p.z, p.log_likelihood))

    return Entry(run, _one_particle(model.base), (N,))  # the base model's particles


def _data_tempering() -> Entry:
    target = from_numpyro(_numpyro_normal, jnp.linspace(-0.5, 0.5, 5))
    model = DataTempering(target, (2, 3), kernel="rwm", max_mcmc_steps=5)

    def run(key):
        res = smc(key, model, N)
        p = res.particles  # acceptance is NaN before the first move (documented)
        return Outputs(p, finite=(res.log_evidence, res.log_weights, p.z))

    return Entry(run, _one_particle(model), (N,))


def _search(method: Callable, *args, lead: int, scored: bool = True) -> Entry:
    model = toy_reasoning_model()

    def run(key):
        res = method(key, model, *args, max_steps=model.max_num_steps)
        c = res.compute
        # forbidden sequences ('b b') have −inf scores and log rewards
        return Outputs(res.particles, finite=(res.particles.lm, c.tokens_generated, c.reward_calls,
                                              c.num_steps, c.wall_time_s),
                       not_nan=(res.particles, res.scores) if scored else res.particles)

    return Entry(run, _one_particle(model), (lead,))


def _dict_proposal(p, t, x_prev, y):
    loc = p["b"] * y if x_prev is None else p["a"] * x_prev + p["b"] * y
    return dist.Normal(loc, 1.0)


def _variational(objective) -> Entry:
    """A few optimiser steps of ``vi.fit``: a mean-field guide on a numpyro model, or a learned
    proposal of a guided filter (Feynman-Kac target) for the SMC bound."""
    opt = optax.adam(1e-2)
    if isinstance(objective, vi.SMCBound):
        ssm = StateSpaceModel(_dict_init, _dict_trans, _dict_obs, {"q": jnp.asarray(1.0)})
        _, ys = ssm.simulate(jax.random.key(0), T)
        target = lambda phi: ssm.with_params({"q": jnp.asarray(1.0), **phi}).guided(  # noqa: E731
            ys, _dict_proposal)
        params = {"a": jnp.asarray(0.5), "b": jnp.asarray(0.5)}
    else:
        target = from_numpyro(_numpyro_normal, jnp.linspace(-0.5, 0.5, 5))
        params = vi.MeanFieldGaussian.init(1)

    def run(key):
        res = vi.fit(key, params, objective, target, opt, 4, chunk_size=2, progress=False)
        return Outputs(None, finite=(res.losses, res.params, res.state.opt_state))

    return Entry(run, None, ())


def _learned_proposal() -> Entry:
    """A few ``vi.fit`` steps of an MLP proposal (samplers.variational.proposals) on the guided
    filter of the scalar linear-Gaussian model."""
    ssm, _, ys = _lgssm()
    target = vi.guided_target(ssm, ys)
    q0 = vi.MLPProposal.init(jax.random.key(0), 1, 1, width=4, depth=1)
    opt = optax.adam(1e-2)

    def run(key):
        res = vi.fit(key, q0, vi.SMCBound(N, 2, ess_threshold=1.0), target, opt, 4,
                     chunk_size=2, progress=False)
        return Outputs(None, finite=(res.losses, res.params, res.state.opt_state))

    return Entry(run, None, ())


def _learned_twist() -> Entry:
    """A few ``vi.fit`` steps of a table twist with ``TwistedSMCBound`` (samplers.variational.twists)
    on the toy Markov-chain test bed."""
    from models.markov_lm import toy_test_bed

    bed = toy_test_bed()
    target = vi.twist_target(bed)
    tw0 = vi.TableTwist.zeros(target.num_steps, bed.lm.vocab_size)
    opt = optax.adam(1e-2)

    def run(key):
        res = vi.fit(key, tw0, vi.TwistedSMCBound(4, 1, 2), target, opt, 4,
                     chunk_size=2, progress=False)
        return Outputs(None, finite=(res.losses, res.params, res.state.opt_state))

    return Entry(run, None, ())


def _parallel_tempering() -> Entry:
    ssm, xs, ys = _lgssm()
    model = ssm.bootstrap(ys)
    betas = jnp.asarray([1.0, 0.5])
    paths = jax.tree.map(lambda x: jnp.stack([x, x]), xs)

    def run(key):
        res = parallel_tempering_pg(key, model, betas, paths, 4, 2, tempered=_temper,
                                    ancestor_sampling=True)
        return Outputs(res.paths, finite=(res.paths, res.records, res.sweeps))

    return Entry(run, _one_particle(model), (2, T))


# ------------------------------------------------------------------------------------------------
# the registry: one line per sampler
# ------------------------------------------------------------------------------------------------

def _small_mixture():
    return dm.GaussianMixture(jnp.array([0.4, 0.6]), jnp.array([[-1.0, 0.0], [1.5, 0.5]]),
                              jnp.stack([0.3 * jnp.eye(2)] * 2))


def _fk_steering(potential, best_of_n: bool = False) -> Entry:
    """FK steering (models.diffusion.steering) on a 2-D mixture with the exact score: the engine with a
    k-step resampling window, or the equal-NFE best-of-N chains."""
    model = dm.gmm_fk_steering(_small_mixture(), jnp.array([1.0, 0.0]), 1.5, potential, num_levels=5)
    sched = dm.resampling_window(model.num_steps, 2)

    def run(key):
        if best_of_n:
            b = dm.best_of_n_chains(key, model, N)
            return Outputs(b.samples, finite=(b.samples, b.sample, b.rewards, b.reward))
        res = smc(key, model, N, ess_threshold=0.0, resample_schedule=sched)
        p = res.particles
        return Outputs(p, finite=(res.log_evidence, res.log_weights, p.x, p.x0, p.log_g_sum),
                       not_nan=res.log_weights)

    return Entry(run, None if best_of_n else _one_particle(model), (N,))


def _fk_corrector(kind: str) -> Entry:
    """Feynman-Kac correctors (models.diffusion.correctors) on 1-D mixtures with exact scores."""
    sde = dm.VPSDE()
    gmm = dm.GaussianMixture(jnp.array([0.4, 0.6]), jnp.array([[-1.0], [1.5]]), jnp.full((2, 1, 1), 0.3))
    score = dm.DiffusedMixture(gmm, sde)
    times = sde.time_grid(32)
    if kind == "product":
        model = dm.product_of_experts(sde, (score, score), times, 1, form=dm.ScaledDrift())
    elif kind == "annealed":
        model = dm.annealed(sde, score, 2.0, times, 1)
    else:
        model = dm.classifier_free_guidance(sde, score, dm.DiffusedMixture(gmm, sde), 1.0, times, 1)

    def run(key):
        return _smc_outputs(smc(key, model, N))

    return Entry(run, _one_particle(model), (N,))


def _noise_search(method: str) -> Entry:
    """Noise search (models.diffusion.noise_search) on a 2-D mixture with the exact score."""
    sde = dm.VPSDE()
    den = dm.ScoreDenoiser(dm.DiffusedMixture(_small_mixture(), sde), sde, 2)
    reward = dm.LinearReward(jnp.array([1.0, 0.0]))

    def run(key):
        if method == "random":
            r = dm.random_search(key, den, reward, num_candidates=4, num_steps=4)
        elif method == "zero-order":
            r = dm.zero_order_search(key, den, reward, num_neighbours=2, num_rounds=2, num_steps=4)
        else:
            r = dm.path_search(key, den, reward, num_beams=2, num_children=2, start_step=0,
                               forward_steps=0, backward_steps=2, num_steps=4)
        return Outputs(r.samples, finite=(r.sample, r.score, r.samples, r.scores, r.noise))

    return Entry(run, None, None)


REGISTRY: dict[str, Callable[[], Entry]] = {
    "smc-systematic": lambda: _smc_lgssm(resampling="systematic", ess_threshold=1.0),
    "smc-stratified": lambda: _smc_lgssm(resampling="stratified", ess_threshold=1.0),
    "smc-residual": lambda: _smc_lgssm(resampling="residual", ess_threshold=1.0),
    "smc-multinomial": lambda: _smc_lgssm(resampling="multinomial", ess_threshold=1.0),
    "smc-variable-horizon": _smc_markov_lm,
    "smc-llm-power-target": lambda: _smc_markov_lm(power=2.0),
    "smc-llm-resample-move": lambda: _smc_markov_lm(rejuvenation=1),
    "smc-kernel": _kernel,
    "csmc": lambda: _smc_lgssm(conditional=True),
    "csmc-ancestor-sampling": lambda: _smc_lgssm(conditional=True, ancestor_sampling=True),
    "particle-gibbs": _particle_gibbs,
    "pmmh": _pmmh,
    "smc2": _smc2,
    "smoothing-genealogy": lambda: _smoothing("genealogy"),
    "smoothing-ffbs": lambda: _smoothing("ffbs"),
    "smoothing-mcmc": lambda: _smoothing("mcmc"),
    "tempering": _tempering,
    "waste-free": _waste_free,
    "data-tempering": _data_tempering,
    "best-of-n": lambda: _search(best_of_n, N, lead=N),
    "weighted-best-of-n": lambda: _search(weighted_best_of_n, N, lead=N),
    "self-consistency": lambda: _search(self_consistency, N, lead=N, scored=False),
    "beam-search": lambda: _search(beam_search, 2, 2, lead=2),
    "dvts": lambda: _search(dvts, 2, 2, lead=2),
    "parallel-tempering": _parallel_tempering,
    "variational-elbo": lambda: _variational(vi.ELBO(2)),
    "variational-iwae": lambda: _variational(vi.IWAE(4, 2)),
    "variational-smc-bound": lambda: _variational(vi.SMCBound(N, 2, ess_threshold=1.0)),
    "variational-learned-proposal": _learned_proposal,
    "variational-learned-twist": _learned_twist,
    "fk-steering-diff": lambda: _fk_steering(dm.Diff()),
    "fk-steering-max": lambda: _fk_steering(dm.Max()),
    "fk-steering-best-of-n": lambda: _fk_steering(dm.Diff(), best_of_n=True),
    "fk-corrector-product": lambda: _fk_corrector("product"),
    "fk-corrector-annealed": lambda: _fk_corrector("annealed"),
    "fk-corrector-cfg": lambda: _fk_corrector("cfg"),
    "noise-search-random": lambda: _noise_search("random"),
    "noise-search-zero-order": lambda: _noise_search("zero-order"),
    "noise-search-paths": lambda: _noise_search("paths"),
}


# ------------------------------------------------------------------------------------------------
# the contracts
# ------------------------------------------------------------------------------------------------


class _Events:
    """Counts jaxpr traces and XLA compilations (JAX's monitoring events) while active."""

    NAMES = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seen: list[str] = []
        self.active = False

    def __call__(self, event, duration, **kwargs):
        if self.active and event in self.NAMES:
            self.seen.append(event)

    def __enter__(self):
        self.seen.clear()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


_EVENTS = _Events()
jax.monitoring.register_event_duration_secs_listener(_EVENTS)


def _check_finite(tree, what, allow_neg_inf):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        x = np.asarray(leaf)
        if not np.issubdtype(x.dtype, np.floating):
            continue
        bad = np.isnan(x) | (x == np.inf) if allow_neg_inf else ~np.isfinite(x)
        assert not bad.any(), (
            f"{what}{jax.tree_util.keystr(path)}: {int(bad.sum())} of {x.size} values are not "
            f"{'finite or -inf' if allow_neg_inf else 'finite'}: {x.ravel()[bad.ravel()][:5]}"
        )


def _check_structure(particles, like, lead):
    got_leaves, got_def = jax.tree.flatten(particles)
    like_leaves, like_def = jax.tree.flatten(like)
    assert got_def == like_def, f"particle pytree changed: {got_def} != {like_def}"
    for g, e in zip(got_leaves, like_leaves):
        want = tuple(lead) + tuple(e.shape[1:])
        assert (tuple(g.shape), g.dtype) == (want, e.dtype), (
            f"particle leaf {g.shape} {g.dtype}, expected {want} {e.dtype}"
        )


@pytest.mark.parametrize("name", list(REGISTRY))
def test_contract(name):
    entry = REGISTRY[name]()
    # (a) runs compiled, with a traced key (first call: trace + compile)
    out = entry.run(jax.random.key(1))
    jax.block_until_ready(out)
    # (b) finite
    _check_finite(out.finite, "finite", allow_neg_inf=False)
    _check_finite(out.not_nan, "not_nan", allow_neg_inf=True)
    # (c) pytree of the particles
    if entry.like is not None:
        _check_structure(out.particles, entry.like, entry.lead)
    # (d) a second call with another key traces and compiles nothing
    with _EVENTS as events:
        out2 = entry.run(jax.random.key(2))
        jax.block_until_ready(out2)
    assert not events.seen, f"second call retraced/recompiled: {events.seen}"
    assert jax.tree.structure(out2) == jax.tree.structure(out)


def test_registry_covers_every_sampler():
    """A sampler module added without a registry entry fails here (update the list with it)."""
    covered = {"smc", "smc_kernel", "particle_gibbs", "pmmh", "smc2", "smoothing", "tempering",
               "waste_free",
               "data_tempering",
               "parallel_tempering", "best_of_n", "weighted_best_of_n", "self_consistency",
               "beam_search", "dvts", "variational"}
    assert len(REGISTRY) >= len(covered)
    import pkgutil

    import samplers
    import samplers.search

    helpers = {"gather", "resampling", "mcmc_kernels", "mcmc_output", "parameters", "base",
               "search", "sharding", "sharded_gather", "calibration"}
    found = {m.name for pkg in (samplers, samplers.search) for m in pkgutil.iter_modules(pkg.__path__)}
    assert found - helpers <= covered, f"samplers without a contract entry: {found - helpers - covered}"

