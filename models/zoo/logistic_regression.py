r"""Bayesian logistic regression on the breast-cancer data: the zoo entry of
:mod:`models.logistic_regression` (model, data and stored reference live there; this module only
gives them the zoo's interface).

\[
\beta_0 \sim \mathcal{N}(0, 5^2), \qquad \beta_j \sim \mathcal{N}(0, 1) \ (j = 1..30), \qquad
y_i \sim \mathrm{Bernoulli}\big(\sigma(\beta_0 + x_i^\top \beta)\big),
\]

on the 569 standardised rows of scikit-learn's ``load_breast_cancer`` (\(D = 31\)). Latent sites
``b0`` and ``b``; observed ``y``.

Reference: the NUTS run of :func:`models.logistic_regression.make_reference` (4 chains × 5000
draws after 2000 warm-up steps, numpyro, seed 0), stored in
``models/reference/logistic_breast_cancer_nuts.json`` as flat arrays of the 31 coordinates
(\(\beta_0\) first); :func:`reference` splits them into the sites ``b0`` and ``b``. That file
records no \(\hat R\), versions or date; ``python -m models.zoo.make_references
logistic_regression`` regenerates it through :func:`models.logistic_regression.make_reference`.
"""

from __future__ import annotations

import numpy as np

from models.logistic_regression import REFERENCE_PATH, breast_cancer_data, logistic_regression, nuts_reference
from models.zoo.reference import Reference

__all__ = ["name", "logistic_regression", "args", "SITES", "reference", "make_reference", "REFERENCE_PATH"]

name = "logistic_regression"
SITES = ("b0", "b")


def args():
    """The model's arguments ``(x, y)``: :func:`models.logistic_regression.breast_cancer_data`."""
    return breast_cancer_data()


def reference() -> Reference:
    """The stored NUTS reference, split into the sites ``b0`` (scalar) and ``b`` (30)."""
    raw = nuts_reference()
    split = {k: {"b0": np.float64(raw[k][0]), "b": np.asarray(raw[k][1:], np.float64)}
             for k in ("mean", "sd", "ess")}
    info = {k: v for k, v in raw.items() if k not in ("mean", "sd", "ess")}
    info["min_ess"] = float(np.min(raw["ess"]))
    return Reference(name, {k: np.asarray(v) for k, v in split["mean"].items()},
                     {k: np.asarray(v) for k, v in split["sd"].items()},
                     {k: np.asarray(v) for k, v in split["ess"].items()}, info)


def make_reference(seed: int = 0) -> dict:
    """Regenerate the reference with :func:`models.logistic_regression.make_reference`."""
    from models.logistic_regression import make_reference as make

    return make(seed=seed)
