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


# Per-worker resident memory (MB) above which a module's teardown drops JAX's compiled programs.
FREE_COMPILED_ABOVE_MB = float(os.environ.get("PPL_TEST_FREE_ABOVE_MB", "3000"))


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so that the RSS check sees what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs(request):
    """Drop JAX's compiled programs after a test module when the worker has grown large.

    Every ``jit`` keeps each program it compiled for as long as the function lives, and the
    engine's jitted entry points live for the whole session: without this, each xdist worker grew
    to 8-9 GB by the end of the suite (hundreds of SMC programs over the models of every module),
    close to the 24 GB of the CI machine with the notebook kernels and subprocesses beside it (the
    CI run of 2026-12-05 stalled at 480 of 482 tests). Above ``FREE_COMPILED_ABOVE_MB`` of resident
    memory the module's teardown calls ``jax.clear_caches()``; below it, compiled programs stay
    shared across modules (clearing after every module made the suite much slower).
    ``PPL_TEST_MEMLOG=path`` appends each module's peak and current RSS (MB) to ``path``.
    """
    yield
    now = _rss_mb()
    cleared = False
    if "jax" in sys.modules and now > FREE_COMPILED_ABOVE_MB:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()
        _malloc_trim()
        cleared = True
    log = os.environ.get("PPL_TEST_MEMLOG")
    if log:
        import resource
        import time

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(log, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {os.getpid()} {request.module.__name__} peak={peak:.0f} "
                    f"before={now:.0f} after={_rss_mb():.0f} cleared={cleared}\n")


# ------------------------------------------------------------------------------------------------
# scheduling under pytest-xdist (`make test` runs `-n 2`)
# ------------------------------------------------------------------------------------------------
# xdist's default "load" scheduling spreads one module's tests over both workers, and then every
# module-scoped fixture (compiled filters, reference runs, the 8-device subprocess of
# test_sharding, the 10^7-particle resampling draws...) is built on both workers: a probe module
# with one module fixture and 8 tests built it twice at -n 2, in every run. Here a module is one
# unit of work (xdist's "loadscope"), except the modules whose tests share nothing (a notebook, a
# docs page: one unit each); the units known to be slow go first (longest first balances the two
# workers' tails). An explicit `--dist` other than the default keeps xdist's own scheduler.

#: modules whose tests are independent units
_FREE_MODULES = ("test_notebooks.py", "test_docs.py")
#: rough seconds per module (or per test of a free module) on the 2-core CI machine, slowest first;
#: unlisted modules follow in collection order
_SLOW_FIRST = (
    "test_notebooks.py", "test_sharding.py", "test_docs.py", "test_llm_ssm.py", "test_tempering.py",
    "test_smc2.py", "test_zoo.py", "test_llm_methods.py", "test_particle_gibbs.py", "test_demo.py",
    "test_benchmarks.py", "test_diffusion_gmm.py", "test_resampling_scale.py", "test_pmmh.py",
    "test_learned_proposals.py", "test_calibration_harness.py", "test_diffusion_correctors.py",
    "test_llm_parity.py", "test_contract.py", "test_progress.py",
)


def pytest_collection_modifyitems(config, items):
    """Slow modules first (a stable sort: a module's tests stay together and in their order)."""
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


@pytest.hookimpl(optionalhook=True)  # xdist's hook: no error where xdist is absent or disabled
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the slow-first collection order

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return nodeid if module.endswith(_FREE_MODULES) else module

    return ModuleScheduling(config, log)
