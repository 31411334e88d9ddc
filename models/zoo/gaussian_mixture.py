r"""A two-component Gaussian location mixture: a bimodal posterior (label switching) with an exact,
quadrature reference.

\[
\mu_1 \sim \mathcal{N}(-1, 3^2), \qquad \mu_2 \sim \mathcal{N}(1, 3^2), \qquad
y_i \mid \mu \sim \tfrac12 \mathcal{N}(\mu_1, 1) + \tfrac12 \mathcal{N}(\mu_2, 1), \quad i = 1..30.
\]

The likelihood is symmetric under swapping \(\mu_1 \leftrightarrow \mu_2\), so the posterior has two
well-separated modes, near \((\mu_1, \mu_2) = (-2, 2)\) and \((2, -2)\) for these data (drawn half
from \(\mathcal{N}(-2, 1)\), half from \(\mathcal{N}(2, 1)\), :func:`simulate`, numpy seed 1). The
prior breaks the symmetry: the mode with \(\mu_1 < \mu_2\) carries about 0.72 of the mass, the other
about 0.28 (for mirror-image modes the odds are about
\(\exp\big(2(\hat\mu_2 - \hat\mu_1)/3^2\big)\)). Between the modes the log-density drops by about 47
nats (its maximum on the diagonal \(\mu_1 = \mu_2\)), so an MCMC chain started in one mode stays there.
Measured (numpyro 0.22.0 NUTS, 1 chain, 1000 warm-up steps and 2000 draws from numpyro's default
initialisation, seeds 0 to 3): every chain stayed in the \(\mu_1 < \mu_2\) mode, \(\Pr(\mu_1 < \mu_2)\)
estimated as 1.0 against the exact 0.718, and \(\mathbb{E}[\mu] \approx (-2.15, 2.06)\) against the
exact \((-0.97, 0.88)\) (posterior sds 1.91): off by more than half a posterior sd per coordinate.
Tempered SMC starts from prior draws in both modes and keeps their relative weight through the
tempering path (tests/test_zoo.py checks the recovered weight).

Reference (exact, :func:`exact_reference`): the posterior is two-dimensional, so every moment is a
ratio of integrals computed by quadrature on a uniform grid, in float64, with log-sum-exp:
\(Z = \int \pi_0(\mu) L(\mu)\,d\mu \approx h^2 \sum_{\text{grid}} \pi_0 L\) on
\([-8, 8]^2\) with spacing \(h = 0.005\), and posterior means, sds and the mode weight
\(\Pr(\mu_1 < \mu_2 \mid y)\) as weighted sums. The integrand is smooth and decays like a Gaussian,
so the rule converges faster than any power of \(h\); the stored ``quadrature_check`` is the largest
change of any stored number when the spacing is doubled and when the box is widened to
\([-10, 10]^2\) (below \(10^{-9}\)). Stored in ``models/reference/gaussian_mixture_exact.json``
(``ess: null``: no Monte Carlo error), with ``log_evidence`` and ``mode_weights``.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float

from models.zoo.reference import REFERENCE_DIR, Reference, load_reference, versions, write_reference

__all__ = ["name", "gaussian_mixture", "simulate", "args", "SITES", "reference", "make_reference",
           "exact_reference", "mode_weight", "REFERENCE_PATH"]

name = "gaussian_mixture"
REFERENCE_PATH = os.path.join(REFERENCE_DIR, "gaussian_mixture_exact.json")
SITES = ("mu",)

NUM_OBS, SEED = 30, 1
PRIOR_MEAN, PRIOR_SD, NOISE_SD = (-1.0, 1.0), 3.0, 1.0
CLUSTERS = (-2.0, 2.0)


def gaussian_mixture(y: Float[Array, " n"]) -> None:
    """The numpyro model: latent ``mu`` (2 locations), observed ``y`` (one term per observation)."""
    mu = numpyro.sample("mu", dist.Normal(jnp.asarray(PRIOR_MEAN), PRIOR_SD).to_event(1))
    n = y.shape[0]
    components = dist.Normal(jnp.broadcast_to(mu, (n, 2)), NOISE_SD)
    numpyro.sample("y", dist.MixtureSameFamily(dist.Categorical(probs=jnp.full((n, 2), 0.5)), components),
                   obs=y)


def mode_weight(mu: Float[Array, "... 2"]) -> Float[Array, "..."]:
    r"""Indicator of the first mode, \(\mathbb{1}[\mu_1 < \mu_2]\), per draw (float)."""
    return (mu[..., 0] < mu[..., 1]) * 1.0


def simulate(seed: int = SEED, num_obs: int = NUM_OBS) -> np.ndarray:
    """``num_obs`` observations, half from each cluster in random order (numpy, fixed seed)."""
    rng = np.random.default_rng(seed)
    z = rng.permutation(np.repeat([0, 1], num_obs // 2))
    return np.asarray(CLUSTERS)[z] + NOISE_SD * rng.standard_normal(num_obs)


def args() -> tuple[Float[Array, " 30"]]:
    """The model's arguments ``(y,)`` (float32)."""
    return (jnp.asarray(simulate(), jnp.float32),)


def _quadrature(y: np.ndarray, half_width: float, h: float) -> dict:
    from scipy.special import logsumexp
    from scipy.stats import norm

    g = np.arange(-half_width, half_width + h / 2, h)
    a, b = np.meshgrid(g, g, indexing="ij")
    lp = norm.logpdf(a, PRIOR_MEAN[0], PRIOR_SD) + norm.logpdf(b, PRIOR_MEAN[1], PRIOR_SD)
    for yi in y:
        lp += np.logaddexp(norm.logpdf(yi, a, NOISE_SD), norm.logpdf(yi, b, NOISE_SD)) + np.log(0.5)
    log_norm = logsumexp(lp)
    w = np.exp(lp - log_norm)
    mean = np.array([(w * a).sum(), (w * b).sum()])
    sd = np.sqrt(np.array([(w * (a - mean[0]) ** 2).sum(), (w * (b - mean[1]) ** 2).sum()]))
    first = float(w[a < b].sum())
    diagonal = np.eye(len(g), dtype=bool)
    return {
        "log_evidence": float(log_norm + 2 * np.log(h)),
        "mean": mean,
        "sd": sd,
        "mode_weights": [first, 1.0 - first],
        "log_density_drop_to_diagonal": float(lp.max() - lp[diagonal].max()),
    }


def exact_reference(h: float = 0.005, half_width: float = 8.0) -> dict:
    """The quadrature reference (see the module docstring) and its self-check."""
    y = simulate()
    main = _quadrature(y, half_width, h)
    checks = [_quadrature(y, half_width, 2 * h), _quadrature(y, half_width + 2.0, h)]
    keys = ("log_evidence", "mean", "sd", "mode_weights")
    change = max(float(np.max(np.abs(np.asarray(c[k]) - np.asarray(main[k])))) for c in checks for k in keys)
    return {**main, "quadrature_check": change, "h": h, "half_width": half_width}


def reference() -> Reference:
    """The stored exact reference (``info`` holds ``log_evidence`` and ``mode_weights``)."""
    return load_reference(REFERENCE_PATH)


def make_reference() -> dict:
    """Compute :func:`exact_reference` and write :data:`REFERENCE_PATH`."""
    q = exact_reference()
    record = {
        "name": name,
        "model": f"models.zoo.gaussian_mixture.gaussian_mixture(y), data simulate(seed={SEED})",
        "method": (f"exact: float64 quadrature on a uniform grid over [-{q['half_width']}, "
                   f"{q['half_width']}]^2 with spacing {q['h']} (log-sum-exp); quadrature_check = "
                   "largest change of any stored number at twice the spacing or a box 2 wider"),
        "quadrature_check": q["quadrature_check"],
        "log_evidence": q["log_evidence"],
        "mode_weights": q["mode_weights"],
        "mode_weights_of": ["mu[0] < mu[1]", "mu[0] > mu[1]"],
        "log_density_drop_to_diagonal": q["log_density_drop_to_diagonal"],
        **versions(),
        "sites": {"mu": {"shape": [2], "mean": q["mean"], "sd": q["sd"], "ess": None, "r_hat": None}},
    }
    write_reference(REFERENCE_PATH, record)
    return record
