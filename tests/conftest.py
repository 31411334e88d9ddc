"""Shared test settings.

JAX compilation dominates this suite's run time on a small CPU; XLA's backend optimisation level 0
cuts compile time 2-3x while leaving the results (and the runtime of the matmul-heavy tests, which
call into Eigen/oneDNN) essentially unchanged. Set before jax is imported anywhere.

The jaxtyping annotations of the ``ppl`` and ``samplers`` packages are checked at runtime in the
tests (shapes, dtypes and the consistency of named axes across the arguments and the return value
of each call), with beartype: the import hook must be installed before anything imports them, so
it is done here, first.
Tests that pass ill-typed input on purpose, to check the library's own boundary errors (which users
see: they run without the checker), take the ``no_shape_checks`` fixture.
"""

import os
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("MPLBACKEND", "Agg")

from jaxtyping import install_import_hook  # noqa: E402  (after the XLA flags)

SHAPE_CHECKED_PACKAGES = ("ppl", "samplers")

_already = sorted(m for m in sys.modules if m.split(".")[0] in SHAPE_CHECKED_PACKAGES)
if _already:  # imported before the hook: their annotations would silently go unchecked
    raise RuntimeError(f"imported before the jaxtyping import hook: {_already}")
install_import_hook(list(SHAPE_CHECKED_PACKAGES), "beartype.beartype")


@pytest.fixture
def no_shape_checks():
    """Switch the runtime type checks off for one test (jaxtyping reads the flag at every call)."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
