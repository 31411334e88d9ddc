r"""Stored reference posteriors of the model zoo: the :class:`Reference` record, its JSON files, and
the long NUTS run that makes most of them.

A reference holds, for every posterior site \(s\) (latent and deterministic, constrained values),
the posterior mean \(\bar\theta_s\), standard deviation \(\hat\sigma_s\) and effective sample size
\(\mathrm{ESS}_s\), elementwise. Its own Monte Carlo error is then
\(\hat\sigma_s / \sqrt{\mathrm{ESS}_s}\) for a mean and \(\approx \hat\sigma_s / \sqrt{2\,
\mathrm{ESS}_s}\) for a standard deviation (normal approximation); an exact reference (quadrature)
stores ``ess = null`` and has error 0 (\(\mathrm{ESS} = \infty\)).

NUTS references (:func:`nuts_reference`) come from numpyro's NUTS, several chains run sequentially
after their own warm-up, summarised with numpyro's diagnostics (``effective_sample_size``,
``split_gelman_rubin``); the JSON records the settings, the numpyro and jax versions, the date, the
number of divergent transitions and the worst \(\hat R\) and ESS, and :func:`nuts_reference`
refuses to write a run with \(\hat R \ge 1.01\) or a minimum ESS below 1000.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Reference", "REFERENCE_DIR", "load_reference", "write_reference", "nuts_reference"]

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference")


class Reference(NamedTuple):
    r"""A stored reference posterior.

    Attributes:
        name: the zoo model's name.
        mean: posterior mean per site (numpy arrays of the site's shape).
        sd: posterior standard deviation per site.
        ess: effective sample size per site (``inf`` for an exact reference).
        info: everything else in the JSON (method, settings, diagnostics, versions, date; for an
            exact reference also e.g. ``log_evidence`` and ``mode_weights``).
    """

    name: str
    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]
    ess: dict[str, np.ndarray]
    info: dict[str, Any]

    def mean_se(self, site: str) -> np.ndarray:
        r"""Monte Carlo standard error of the reference mean, \(\hat\sigma / \sqrt{\mathrm{ESS}}\)."""
        return self.sd[site] / np.sqrt(self.ess[site])

    def sd_se(self, site: str) -> np.ndarray:
        r"""Monte Carlo standard error of the reference sd, \(\approx \hat\sigma / \sqrt{2\,\mathrm{ESS}}\)."""
        return self.sd[site] / np.sqrt(2.0 * self.ess[site])


def load_reference(path: str) -> Reference:
    """Read a reference JSON written by :func:`write_reference`."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no stored reference at {path}: run `python -m models.zoo.make_references`"
        )
    with open(path) as fh:
        raw = json.load(fh)
    sites = raw.pop("sites")
    mean = {k: np.asarray(v["mean"], np.float64) for k, v in sites.items()}
    sd = {k: np.asarray(v["sd"], np.float64) for k, v in sites.items()}
    ess = {k: (np.full(np.shape(v["mean"]), np.inf) if v.get("ess") is None
               else np.asarray(v["ess"], np.float64)) for k, v in sites.items()}
    info = dict(raw)
    info["r_hat"] = {k: np.asarray(v["r_hat"]) for k, v in sites.items() if v.get("r_hat") is not None}
    return Reference(raw["name"], mean, sd, ess, info)


def write_reference(path: str, record: dict) -> None:
    """Write ``record`` (a dict with ``name`` and ``sites``; numpy arrays allowed) as JSON."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, (np.ndarray, np.generic)):
            return plain(x.tolist())
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"non-finite value in a reference record: {x}")
        return x

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(plain(record), fh, indent=1)
        fh.write("\n")


def versions() -> dict[str, str]:
    import jax
    import numpyro

    return {"numpyro": numpyro.__version__, "jax": jax.__version__,
            "date": datetime.date.today().isoformat()}


def nuts_reference(
    name: str,
    model: Callable,
    args: tuple,
    path: str,
    *,
    description: str,
    seed: int = 0,
    num_chains: int = 4,
    num_warmup: int = 2000,
    num_samples: int = 5000,
    target_accept_prob: float = 0.8,
    max_rhat: float = 1.01,
    min_ess: float = 1000.0,
) -> dict:
    r"""Run numpyro NUTS on ``model(*args)`` (``num_chains`` chains in sequence, each with
    ``num_warmup`` adaptation steps), summarise every site and write the JSON to ``path``.

    Raises:
        RuntimeError: the run is not trustworthy (worst split \(\hat R \ge\) ``max_rhat`` or minimum
            ESS below ``min_ess``); nothing is written then.
    """
    import jax
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(model, target_accept_prob=target_accept_prob), num_warmup=num_warmup,
                num_samples=num_samples, num_chains=num_chains, chain_method="sequential",
                progress_bar=False)
    mcmc.run(jax.random.key(seed), *args, extra_fields=("diverging", "num_steps"))
    draws = {k: np.asarray(v, np.float64) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    extra = mcmc.get_extra_fields(group_by_chain=True)
    sites = {}
    for k, d in draws.items():
        flat = d.reshape((-1,) + d.shape[2:])
        sites[k] = {
            "shape": list(d.shape[2:]),
            "mean": flat.mean(0),
            "sd": flat.std(0, ddof=1),
            "ess": np.asarray(effective_sample_size(d)),
            "r_hat": np.asarray(split_gelman_rubin(d)),
        }
    worst_rhat = max(float(np.max(s["r_hat"])) for s in sites.values())
    min_ess_found = min(float(np.min(s["ess"])) for s in sites.values())
    record = {
        "name": name,
        "model": description,
        "method": (f"numpyro NUTS (target_accept_prob {target_accept_prob}), {num_chains} chains x "
                   f"{num_samples} draws after {num_warmup} warm-up steps each, chains run "
                   f"sequentially, seed {seed}"),
        "num_chains": num_chains,
        "num_warmup": num_warmup,
        "num_samples": num_samples,
        "num_draws": num_chains * num_samples,
        "seed": seed,
        "divergences": int(np.asarray(extra["diverging"]).sum()),
        "mean_tree_steps": float(np.asarray(extra["num_steps"]).mean()),
        "max_r_hat": worst_rhat,
        "min_ess": min_ess_found,
        **versions(),
        "sites": sites,
    }
    if not worst_rhat < max_rhat or not min_ess_found >= min_ess:
        raise RuntimeError(
            f"{name}: NUTS reference not converged (max split R-hat {worst_rhat:.4f}, min ESS "
            f"{min_ess_found:.0f}); not written"
        )
    write_reference(path, record)
    return record
