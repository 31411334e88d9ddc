r"""The Bayesian model zoo: numpyro programs with stored reference posteriors.

Each entry of :data:`ZOO` is a :class:`ZooModel`: the numpyro model function, its arguments (data
generated with a fixed seed inside the module, or the classic eight-schools data), the constrained
sites to compare, and the loader of its reference (:class:`models.zoo.reference.Reference`:
posterior mean, sd and effective sample size per site). ``from_numpyro(entry.model,
*entry.args())`` (or :meth:`ZooModel.target`) builds the tempering target.

| name | posterior | D | reference |
|---|---|---|---|
| ``eight_schools`` | hierarchical normal, non-centred | 10 | NUTS |
| ``logistic_regression`` | breast-cancer logistic regression | 31 | NUTS |
| ``hierarchical_poisson`` | Poisson counts, log-normal rates, non-centred | 12 | NUTS |
| ``gaussian_mixture`` | two-mode location mixture (label switching) | 2 | exact (quadrature) |
| ``stochastic_volatility`` | SV parameters and latent path, \(T = 50\) | 53 | NUTS |

The references are stored in ``models/reference/`` and made by one script,
``python -m models.zoo.make_references [name ...]`` (:mod:`models.zoo.make_references`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from models.zoo import eight_schools, gaussian_mixture, hierarchical_poisson, logistic_regression
from models.zoo import stochastic_volatility
from models.zoo.reference import Reference

__all__ = ["ZooModel", "ZOO", "get", "Reference"]


class ZooModel(NamedTuple):
    """One zoo entry.

    Attributes:
        name: identifier (also the reference file's stem).
        model: the numpyro model function.
        args: returns the model's positional arguments (data included).
        sites: the constrained sites (latent or deterministic) compared with the reference.
        reference: loads the stored reference.
        reference_path: where it is stored.
        make_reference: regenerates it (a long run; see :mod:`models.zoo.make_references`).
        exact: whether the reference is exact (no Monte Carlo error) rather than from NUTS.
    """

    name: str
    model: Callable
    args: Callable[[], tuple]
    sites: tuple[str, ...]
    reference: Callable[[], Reference]
    reference_path: str
    make_reference: Callable[[], dict]
    exact: bool = False

    def target(self):
        """The tempering target, :func:`ppl.numpyro_model.from_numpyro` of the model and its data."""
        from ppl.numpyro_model import from_numpyro

        return from_numpyro(self.model, *self.args())


def _entry(module, model, exact: bool = False) -> ZooModel:
    return ZooModel(module.name, model, module.args, module.SITES, module.reference,
                    module.REFERENCE_PATH, module.make_reference, exact)


ZOO: tuple[ZooModel, ...] = (
    _entry(eight_schools, eight_schools.eight_schools),
    _entry(logistic_regression, logistic_regression.logistic_regression),
    _entry(hierarchical_poisson, hierarchical_poisson.hierarchical_poisson),
    _entry(gaussian_mixture, gaussian_mixture.gaussian_mixture, exact=True),
    _entry(stochastic_volatility, stochastic_volatility.stochastic_volatility),
)


def get(name: str) -> ZooModel:
    """The zoo entry called ``name``."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(f"no zoo model {name!r}; the zoo has {[e.name for e in ZOO]}")
