"""MCMC chains as arviz ``InferenceData``, so that R-hat, ESS and trace plots come from arviz.

Every sampler here returns draws with leading axes [chain, draw, ...]; this module only converts
them (numpy copies) and names the dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["to_inference_data", "smc_inference_data"]


def to_inference_data(
    posterior: Mapping[str, Any],
    *,
    sample_stats: Mapping[str, Any] | None = None,
    observed_data: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
):
    """Build ``arviz.InferenceData`` from dicts of arrays with leading [chain, draw] axes.

    Args:
        posterior: ``{name: array [C, S, ...]}``.
        sample_stats: ``{name: array [C, S]}`` (acceptance flags, log-likelihood estimates, ...).
        observed_data: ``{name: array}`` without chain/draw axes.
        dims, coords: arviz dimension names and coordinates of the extra axes.
    """
    import arviz as az

    if not isinstance(posterior, Mapping):
        raise TypeError("posterior must be a dict {name: array [chain, draw, ...]}")
    post = {k: np.asarray(jax.device_get(v)) for k, v in posterior.items()}
    for k, v in post.items():
        if v.ndim < 2:
            raise ValueError(f"posterior[{k!r}] needs leading [chain, draw] axes, got {v.shape}")
    stats = None
    if sample_stats:
        stats = {k: np.asarray(jax.device_get(v)) for k, v in sample_stats.items()}
    obs = None
    if observed_data:
        obs = {k: np.asarray(jax.device_get(v)) for k, v in observed_data.items()}
    dims = {k: list(v) for k, v in (dims or {}).items()}
    return az.from_dict(
        posterior=post,
        sample_stats=stats,
        observed_data=obs,
        dims=dims or None,
        coords=dict(coords) if coords else None,
    )


def smc_inference_data(key, samples: Mapping[str, Any], log_weights, path: Mapping[str, Any],
                       attrs: Mapping[str, Any], sample_stats: Mapping[str, Any] | None = None):
    """``InferenceData`` of a weighted SMC population: ``posterior`` holds the N particles
    resampled systematically with ``key`` (one chain of N equally weighted draws), ``sample_stats``
    the per-particle ``sample_stats`` (leading axis N) at the same indices, and the group
    ``smc_path`` the per-step arrays of ``path`` (dimension ``step``) with ``attrs``."""
    import xarray as xr

    from samplers.resampling import Systematic

    n = jax.numpy.shape(log_weights)[0]
    idx = np.asarray(Systematic()(key, log_weights, n))
    stats = {k: np.asarray(v)[idx][None] for k, v in (sample_stats or {}).items()}
    idata = to_inference_data({k: np.asarray(v)[idx][None] for k, v in samples.items()},
                              sample_stats=stats or None)
    steps = len(next(iter(path.values())))
    ds = xr.Dataset({k: ("step", np.asarray(v)) for k, v in path.items()},
                    coords={"step": np.arange(steps)}, attrs=dict(attrs))
    idata.add_groups({"smc_path": ds}, warn_on_custom_groups=False)
    return idata
