r"""Noise search (models/diffusion/noise_search.py) and the digits verifiers (models/diffusion/verifiers.py).

Exact references on a 2-d Gaussian mixture with its closed-form score, for which the DDIM sampler
(eta = 0) is a deterministic map from noise to sample, re-implemented here as a plain loop:
- random search returns exactly the argmax of the reward over its N candidates (brute force);
- the NFE of every search equals a count of the score function's evaluated rows (a host callback
  inside the compiled program), search and final generation apart;
- zero-order neighbours have exactly the requested cosine and norm; the pivots of successive rounds
  are such neighbours; the history is the running best;
- search over paths with no re-noising (forward_steps = 0) selects its beam as a brute-force
  simulation of the beam on the deterministic trajectories says; the forward re-noising kernel maps
  p_s to p_s' (exact Gaussian-mixture moments, Monte Carlo tolerance);
and broken variants (a search that minimises, a Gaussian-perturbation neighbour, a re-noising that
forgets the signal decay) are rejected by the same checks. On the digits model, best-of-16 under the
verifier (logistic regression, half A) raises the accuracy judged by the independent evaluator (MLP,
half B) over best-of-1, beyond three binomial standard errors.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.diffusion.digits import DDIM, NULL_CLASS, EulerMaruyama, load_digits_model
from models.diffusion.gaussian_mixture import DiffusedMixture, GaussianMixture
from models.diffusion.noise_search import (
    DigitsDenoiser,
    ScoreDenoiser,
    generate,
    path_search,
    path_search_nfe,
    random_search,
    random_search_nfe,
    renoise,
    sphere_neighbours,
    zero_order_search,
    zero_order_search_nfe,
)
from models.diffusion.verifiers import (
    ClassLogProb,
    DigitsClassifier,
    digits_halves,
    fit_digits_classifier,
    fit_digits_evaluator,
)
from models.diffusion.vp_sde import VPSDE

SDE = VPSDE()
K = 8  # DDIM steps on the mixture
GMM = GaussianMixture(
    jnp.array([0.5, 0.3, 0.2]),
    jnp.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]]),
    jnp.stack([0.3 * jnp.eye(2), 0.5 * jnp.eye(2), jnp.array([[0.4, 0.1], [0.1, 0.2]])]),
)
DM = DiffusedMixture(GMM, SDE)


class LinearReward(eqx.Module):
    """r(x) = w . x (a pytree: the weights are traced, so w and -w share one compilation)."""

    w: jax.Array

    def __call__(self, x):
        return x @ self.w


reward = LinearReward(jnp.array([1.0, 0.5]))  # prefers the upper right; separates the components
neg_reward = LinearReward(-reward.w)  # a search with it picks the worst candidates


class Counter:
    def __init__(self):
        self.rows = 0

    def add(self, n):
        self.rows += int(n)


COUNTER = Counter()  # one object: every mixture search below shares its compilations


class CountingScore(eqx.Module):
    """The exact mixture score, counting the rows it is evaluated on at run time (host callback)."""

    dm: DiffusedMixture
    counter: Counter = eqx.field(static=True)

    def __call__(self, x, s):
        jax.debug.callback(self.counter.add, x.shape[0])
        return self.dm(x, s)


DEN = ScoreDenoiser(CountingScore(DM, COUNTER), SDE, 2)


def counted(fn):
    jax.effects_barrier()
    COUNTER.rows = 0
    res = fn(DEN)
    jax.block_until_ready(res.sample)
    jax.effects_barrier()
    return res, COUNTER.rows


# --- the reference sampler: numpy, float64, one plain DDIM step at a time -----------------------
_W = np.asarray(GMM.weights, np.float64)
_MU = np.asarray(GMM.means, np.float64)
_COV = np.asarray(GMM.covariances, np.float64)


def _alpha_sigma(s):
    b = SDE.beta_min * s + 0.5 * (SDE.beta_max - SDE.beta_min) * s**2
    return np.exp(-0.5 * b), np.sqrt(-np.expm1(-b))


def np_score(x, s):
    """Closed-form score of the noised mixture p_s at x [n, 2] (float64)."""
    a, sg = _alpha_sigma(s)
    cov = a**2 * _COV + sg**2 * np.eye(2)
    prec = np.linalg.inv(cov)
    diff = x[:, None, :] - a * _MU  # [n, K, 2]
    sol = np.einsum("kij,nkj->nki", prec, diff)
    logn = -0.5 * np.sum(diff * sol, -1) - 0.5 * np.log(np.linalg.det(cov)) + np.log(_W)
    g = np.exp(logn - logn.max(1, keepdims=True))
    g /= g.sum(1, keepdims=True)
    return -np.einsum("nk,nkd->nd", g, sol)


def ddim_reference(noise, num_steps=K, eps=1e-3, record=()):
    """Plain DDIM (Song et al. 2021, eq. 12 with sigma = 0) on the exact score; returns x0 and
    Tweedie's x̂0 at the levels (indices) in ``record``."""
    times = np.linspace(1.0, eps, num_steps + 1)
    x = np.asarray(noise, np.float64)
    xhat = {}
    for k in range(num_steps + 1):
        a, sg = _alpha_sigma(times[k])
        e = -sg * np_score(x, times[k])
        x0 = (x - sg * e) / a
        if k in record:
            xhat[k] = x0
        if k == num_steps:
            return x0, xhat
        a2, sg2 = _alpha_sigma(times[k + 1])
        x = a2 * x0 + sg2 * e


def np_reward(x):
    return np.asarray(x, np.float64) @ np.asarray(reward.w, np.float64)


def check_best_of_n(res, tol=2e-4):
    """res is best-of-N of its noises under `reward`, by brute force."""
    ref, _ = ddim_reference(res.noises)
    np.testing.assert_allclose(res.samples, ref, atol=tol)
    r = np_reward(ref)
    i = int(np.argmax(r))
    np.testing.assert_allclose(res.sample, ref[i], atol=tol)
    np.testing.assert_allclose(res.noise, res.noises[i], atol=0)
    assert abs(float(res.score) - r[i]) < tol


# ------------------------------------------------------------------------------------------------
# random search
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture_runs():
    """One counted run of each search on the mixture (compiled once each, shared by the tests)."""
    out = {}
    out["random"] = counted(lambda d: random_search(jax.random.key(0), d, reward, num_candidates=16,
                                                    num_steps=K, final_steps=12))
    out["zero"] = counted(lambda d: zero_order_search(jax.random.key(1), d, reward,
                                                      num_neighbours=4, num_rounds=5, cosine=0.8,
                                                      num_steps=K))
    out["paths"] = counted(lambda d: path_search(jax.random.key(2), d, reward, num_beams=6,
                                                 num_children=2, start_step=0, forward_steps=0,
                                                 backward_steps=4, num_steps=K))
    out["paths_em"] = counted(lambda d: path_search(jax.random.key(4), d, reward, num_beams=2,
                                                    num_children=3, start_step=2, forward_steps=1,
                                                    backward_steps=4, num_steps=K,
                                                    kernel=EulerMaruyama()))
    return out


def test_random_search_is_best_of_n(mixture_runs):
    res, _ = mixture_runs["random"]
    # the final regeneration (12 steps) of the chosen noise: compare with the reference at 12 steps
    ref12, _ = ddim_reference(res.noise[None], num_steps=12)
    np.testing.assert_allclose(res.sample, ref12[0], atol=2e-4)
    assert abs(float(res.score) - np_reward(ref12)[0]) < 2e-4
    # the search itself: best of its 16 candidates, by brute force
    best = int(np.argmax(res.scores))
    check_best_of_n(res._replace(sample=res.samples[best], score=res.scores[best]))
    assert int(res.nonfinite) == 0
    # the noises are iid N(0, I): a weak sanity check (16 x 2 draws)
    assert abs(float(jnp.mean(res.noises))) < 4 / np.sqrt(32)


def test_random_search_broken_variant_rejected():
    good = random_search(jax.random.key(3), DEN, reward, num_candidates=16, num_steps=K,
                         final_steps=12)  # the fixture's compilation
    check_best_of_n(good._replace(sample=good.samples[int(np.argmax(good.scores))],
                                  score=jnp.max(good.scores)))
    broken = random_search(jax.random.key(3), DEN, neg_reward, num_candidates=16, num_steps=K,
                           final_steps=12)  # a search that picks the worst candidate
    broken = broken._replace(sample=broken.samples[int(np.argmax(broken.scores))],
                             score=jnp.max(broken.scores))
    with pytest.raises(AssertionError):
        check_best_of_n(broken)


def test_nfe_is_exact(mixture_runs):
    res, rows = mixture_runs["random"]
    assert res.nfe_search == random_search_nfe(16, K) == 16 * (K + 1)
    assert res.nfe_final == 12 + 1
    assert rows == res.nfe == res.nfe_search + res.nfe_final
    assert rows != 16 * K + 12  # a count that forgets the final Tweedie evaluation is wrong
    res, rows = mixture_runs["zero"]
    assert rows == res.nfe == zero_order_search_nfe(4, 5, K) == (1 + 5 * 4) * (K + 1)
    assert res.nfe_final == 0
    res, rows = mixture_runs["paths"]
    # N k0 + R N M (Δb + 1) with R = 2
    assert rows == res.nfe == path_search_nfe(6, 2, K, 0, 0, 4) == 2 * 6 * 2 * 5
    # guidance doubles the count (digits network, counted by formula)
    model = load_digits_model()
    assert DigitsDenoiser(model, 3).nfe_per_call == 1 and DigitsDenoiser(model, 3, 1.5).nfe_per_call == 2
    assert random_search_nfe(4, 30, 2) == 4 * 31 * 2


# ------------------------------------------------------------------------------------------------
# zero-order search
# ------------------------------------------------------------------------------------------------


def _cos(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def check_neighbours(pivot, ys, c, tol=1e-5):
    np.testing.assert_allclose(np.linalg.norm(ys, axis=-1), np.linalg.norm(pivot), rtol=tol)
    np.testing.assert_allclose(_cos(ys, pivot[None]), c, atol=tol)


def test_sphere_neighbours_exact():
    neighbours = jax.jit(sphere_neighbours, static_argnums=2)
    for d, c in [(64, 0.9), (64, -0.3), (2, 0.5)]:
        pivot = np.asarray(jax.random.normal(jax.random.key(d), (d,)))
        ys = np.asarray(neighbours(jax.random.key(5), jnp.asarray(pivot), 400, c))
        check_neighbours(pivot, ys, c)
        # the orthogonal directions are spread out: their mean is near 0 (Monte Carlo, 400 draws)
        v = ys - c * pivot
        assert np.linalg.norm(v.mean(0)) < 4 * np.linalg.norm(v[0]) / np.sqrt(400)
    # broken: a Gaussian step rescaled to the pivot's norm has the right norm, not the right cosine
    rng = np.random.default_rng(6)
    pivot = rng.standard_normal(64)
    bad = pivot + 0.5 * rng.standard_normal((400, 64))
    bad *= np.linalg.norm(pivot) / np.linalg.norm(bad, axis=-1, keepdims=True)
    with pytest.raises(AssertionError):
        check_neighbours(pivot, bad, float(np.mean(_cos(bad, pivot[None]))))


def test_zero_order_search_moves_pivot_on_sphere(mixture_runs):
    res, _ = mixture_runs["zero"]
    p = np.asarray(res.noises)  # pivots after each round
    # elitist=False: every round's pivot is a neighbour of the previous one
    check_neighbours(p[0], p[1:2], 0.8)
    for t in range(1, p.shape[0]):
        check_neighbours(p[t - 1], p[t : t + 1], 0.8)
    # pivots' samples are the sampler's map of their noises, scored by the reward
    ref, _ = ddim_reference(p)
    np.testing.assert_allclose(res.samples, ref, atol=2e-4)
    np.testing.assert_allclose(res.scores, np_reward(ref), atol=2e-4)
    # the history is the running best, and the result is the best seen
    np.testing.assert_allclose(res.history, np.maximum.accumulate(np.asarray(res.scores)), atol=0)
    assert float(res.score) == float(res.history[-1])
    ref_best, _ = ddim_reference(res.noise[None])
    np.testing.assert_allclose(res.sample, ref_best[0], atol=2e-4)


# ------------------------------------------------------------------------------------------------
# search over paths
# ------------------------------------------------------------------------------------------------


def beam_reference(noises, num_children, backward_steps, reward_fn=np_reward):
    """Brute force for forward_steps = 0, start_step = 0: deterministic paths, so a child is its
    root's trajectory; simulate the beam (top-N of N M children by x̂0 reward at each landing level)
    on root indices. Returns the sorted root indices of the last round's children."""
    n = noises.shape[0]
    levels = list(range(backward_steps, K + 1, backward_steps))
    _, xhat = ddim_reference(noises, record=levels)
    beam = np.arange(n)
    for level in levels:
        children = np.repeat(beam, num_children)
        sc = reward_fn(xhat[level])[children]
        order = np.argsort(-sc, kind="stable")
        last = children
        beam = children[order[:n]]
    return np.sort(last)


def check_paths(res, num_children, backward_steps):
    # every noise drawn by the search: the roots' noises are a subset; recover root indices
    roots_noise = np.asarray(res.noises)
    ref, _ = ddim_reference(roots_noise)
    np.testing.assert_allclose(res.samples, ref, atol=2e-4)  # Δf = 0: a child is its root's path
    # brute-force beam on the distinct roots drawn (the initial noises): recover them from the
    # first round — with N beams and M children the N initial noises all appear as roots of the
    # first round; here we use the noises the search drew (the first key split, like random search)
    init = np.asarray(jax.random.normal(jax.random.split(jax.random.key(2), 3)[0], (6, 2)))
    expect = beam_reference(init, num_children, backward_steps)
    got = np.sort([int(np.argmin(np.abs(init - r).sum(1))) for r in roots_noise])
    np.testing.assert_array_equal(got, expect)
    i = int(np.argmax(res.scores))
    np.testing.assert_allclose(res.sample, res.samples[i], atol=0)


def test_path_search_beam_matches_brute_force(mixture_runs):
    res, _ = mixture_runs["paths"]
    check_paths(res, 2, 4)
    assert res.history.shape == (2,)
    assert float(res.score) == float(np.max(res.scores)) == float(res.history[-1])
    # broken: a beam that keeps the worst children
    broken = path_search(jax.random.key(2), DEN, neg_reward, num_beams=6,
                         num_children=2, start_step=0, forward_steps=0, backward_steps=4,
                         num_steps=K)
    with pytest.raises(AssertionError):
        check_paths(broken, 2, 4)


def test_path_search_with_renoising(mixture_runs):
    """Δf > 0, k0 > 0, Euler–Maruyama: finite, right shapes, exact NFE (R = 2 rounds), and the
    returned child is the best of the last round, the best score of the last round."""
    res, rows = mixture_runs["paths_em"]
    assert res.samples.shape == (6, 2) and res.history.shape == (2,)
    assert rows == res.nfe == path_search_nfe(2, 3, K, 2, 1, 4) == 2 * 2 + 2 * 2 * 3 * 5
    assert bool(jnp.all(jnp.isfinite(res.samples))) and int(res.nonfinite) == 0
    i = int(jnp.argmax(res.scores))
    assert float(res.score) == float(res.scores[i]) == float(res.history[-1])
    np.testing.assert_allclose(res.sample, res.samples[i], atol=0)
    np.testing.assert_allclose(res.score, np_reward(res.sample[None])[0], atol=1e-5)


def check_renoise(x_next, s2, n):
    """x_next ~ p_s2: exact mixture mean and per-coordinate variance, 4 Monte Carlo standard errors
    (the variance's from the sample's own fourth moments: the mixture is not Gaussian)."""
    a, sg = _alpha_sigma(s2)
    mean = a * _W @ _MU
    second = a**2 * (np.einsum("k,kii->i", _W, _COV) + _W @ _MU**2) + sg**2
    var = second - mean**2
    np.testing.assert_array_less(np.abs(x_next.mean(0) - mean), 4 * np.sqrt(var / n))
    d2 = (x_next - mean) ** 2
    np.testing.assert_array_less(np.abs(d2.mean(0) - var), 4 * d2.std(0) / np.sqrt(n))


def test_renoise_maps_marginals():
    n = 20000
    s, s2 = 0.2, 0.45
    rng = np.random.default_rng(7)
    a, sg = _alpha_sigma(s)
    comp = rng.choice(3, size=n, p=_W)
    chol = np.linalg.cholesky(_COV)
    x0 = _MU[comp] + np.einsum("nij,nj->ni", chol[comp], rng.standard_normal((n, 2)))
    x = (a * x0 + sg * rng.standard_normal((n, 2))).astype(np.float32)  # exact draws from p_s
    x_next = jax.jit(renoise, static_argnums=1)(jax.random.key(8), SDE, jnp.asarray(x),
                                                 jnp.asarray(s), jnp.asarray(s2))
    check_renoise(np.asarray(x_next, np.float64), s2, n)
    # broken: the noise variance without the signal decay, x + sqrt(σ'^2 - σ^2) z
    a2, sg2 = _alpha_sigma(s2)
    with pytest.raises(AssertionError):
        check_renoise(x + np.sqrt(sg2**2 - sg**2) * rng.standard_normal((n, 2)), s2, n)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    den = ScoreDenoiser(DM, SDE, 2)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_candidates"):
        random_search(key, den, reward, num_candidates=0)
    with pytest.raises(TypeError, match="denoiser"):
        random_search(key, DM, reward, num_candidates=2)
    with pytest.raises(TypeError, match="kernel"):
        random_search(key, den, reward, num_candidates=2, kernel="ddim")
    with pytest.raises(ValueError, match="cosine"):
        zero_order_search(key, den, reward, num_neighbours=2, num_rounds=1, cosine=1.0)
    with pytest.raises(ValueError, match="divide"):
        path_search(key, den, reward, num_beams=2, num_children=2, start_step=0,
                    forward_steps=0, backward_steps=3, num_steps=K)
    with pytest.raises(ValueError, match="must exceed"):
        path_search(key, den, reward, num_beams=2, num_children=2, start_step=2,
                    forward_steps=2, backward_steps=2, num_steps=K)
    with pytest.raises(ValueError, match="start_step"):
        path_search(key, den, reward, num_beams=2, num_children=2, start_step=0,
                    forward_steps=1, backward_steps=3, num_steps=K)
    with pytest.raises(ValueError, match="reward must map"):
        random_search(key, den, lambda x: x, num_candidates=2, num_steps=2)
    with pytest.raises(ValueError, match="noise must have shape"):
        generate(key, den, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="label"):
        DigitsDenoiser(load_digits_model(), 11)
    with pytest.raises(ValueError, match="split"):
        fit_digits_classifier("C")
    with pytest.raises(ValueError, match="target"):
        ClassLogProb(DigitsClassifier(jnp.zeros((10, 64)), jnp.zeros(10)), 10)


# ------------------------------------------------------------------------------------------------
# verifiers and the digits model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judges():
    return fit_digits_classifier("A"), fit_digits_evaluator()


def test_verifiers(judges):
    verifier, evaluator = judges
    halves = digits_halves()
    (xa, ya), (xb, yb) = halves["A"], halves["B"]
    assert len(xa) + len(xb) == 1797
    assert len(set(map(bytes, xa)) & set(map(bytes, xb))) <= 2  # disjoint halves (up to duplicates)

    @eqx.filter_jit
    def run(verifier, evaluator, xa, xb):
        r = ClassLogProb(verifier, 3)
        grad = jax.grad(lambda x: r(x).sum())(xb[:2])
        return (verifier.predict(xb), evaluator.predict(xa), verifier.log_probs(xb[:6].reshape(3, 2, 64)),
                r(xb[:6].reshape(3, 2, 64)), ClassLogProb(verifier, jnp.arange(6))(xb[:6]), grad)

    pb, pa, lp, r3, r_each, grad = run(verifier, evaluator, jnp.asarray(xa), jnp.asarray(xb))
    # competent judges on the half they did not see (measured 0.969 and 0.972)
    assert float(np.mean(np.asarray(pb) == yb)) >= 0.94
    assert float(np.mean(np.asarray(pa) == ya)) >= 0.94
    assert lp.shape == (3, 2, 10) and r3.shape == (3, 2)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(r3, lp[..., 3], rtol=1e-6)
    np.testing.assert_allclose(r_each, np.asarray(lp).reshape(6, 10)[np.arange(6), np.arange(6)],
                               rtol=1e-6)
    assert grad.shape == (2, 64) and bool(jnp.all(jnp.isfinite(grad)))
    # the logistic regression is scikit-learn's: softmax(W x + b) on the clipped image
    w, b = np.asarray(verifier.weight, np.float64), np.asarray(verifier.bias, np.float64)
    z = np.clip(xb[:6], -1, 1) @ w.T + b
    np.testing.assert_allclose(np.asarray(lp).reshape(6, 10), z - np.log(np.exp(z).sum(1, keepdims=True)),
                               atol=1e-4)


def test_digits_random_search_raises_evaluator_accuracy(judges):
    verifier, evaluator = judges
    model = load_digits_model()
    den = DigitsDenoiser(model, NULL_CLASS)  # unconditional model: the verifier must find the class
    n_cand, per_class = 16, 3
    hit1, hit8, ver8 = [], [], []
    traced = TraceCounting(verifier, Counter())
    for c in range(10):
        for j in range(per_class):
            res = random_search(jax.random.key(100 * c + j), den, ClassLogProb(traced, c),
                                num_candidates=n_cand, num_steps=20)
            # candidate 0 is a plain sample from iid noise: the best-of-1 baseline
            hit1.append(int(evaluator.predict(res.samples[0])) == c)
            hit8.append(int(evaluator.predict(res.sample)) == c)
            ver8.append(int(verifier.predict(res.sample)) == c)
    n = len(hit1)
    p1, p8 = np.mean(hit1), np.mean(hit8)
    se = np.sqrt(p1 * (1 - p1) / n + p8 * (1 - p8) / n + 1e-12)
    print(f"evaluator accuracy N=1 {p1:.3f}, N=16 {p8:.3f} (verifier {np.mean(ver8):.3f}), se {se:.3f}")
    assert p8 - p1 > 3 * se
    assert traced.counter.rows == 1  # 30 searches, 10 targets, one trace: compiled once


class TraceCounting(eqx.Module):
    """A classifier that counts how often it is traced (a Python side effect runs at trace time)."""

    clf: eqx.Module
    counter: Counter = eqx.field(static=True)

    def log_probs(self, x):
        self.counter.add(1)
        return self.clf.log_probs(x)


def test_nonfinite_scores_warn():
    """NaN rewards are ranked as -inf, counted in ``nonfinite`` and reported by a warning."""
    import equinox as eqx
    from models.diffusion import DiffusedMixture, GaussianMixture, ScoreDenoiser, VPSDE, random_search

    class NanRight(eqx.Module):
        def __call__(self, x):
            return jnp.where(x[..., 0] > 0, jnp.nan, x[..., 0])

    sde = VPSDE()
    gmm = GaussianMixture(jnp.array([0.4, 0.6]), jnp.array([[-1.0, 0.0], [1.5, 0.5]]),
                          jnp.stack([0.3 * jnp.eye(2)] * 2))
    den = ScoreDenoiser(DiffusedMixture(gmm, sde), sde, 2)
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        res = random_search(jax.random.key(0), den, NanRight(), num_candidates=8, num_steps=4)
    assert int(res.nonfinite) > 0 and bool(jnp.isfinite(res.score))
