"""Data-tempered SMC (samplers/data_tempering.py) against the conjugate Gaussian model: the
evidence of every prefix of the data (E[Ẑ_t / Z_t] = 1), and the final posterior, with the
statistical checks and broken kernel of tests/test_tempering.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_tempering import FAST_COMPILE, PoweredRandomWalk, _z, passes, problem, zscores  # noqa: F401

from samplers.data_tempering import DataTempering
from samplers.smc import smc

N, R = 256, 64
BATCHES = (3, 3, 6, 8)  # the 20 observations of the problem, in four batches


@pytest.fixture(scope="module")
def dt_runs(problem):  # noqa: F811
    target = problem["target"]

    def one(key, power):
        model = DataTempering(target, BATCHES, kernel=PoweredRandomWalk(power=power))
        res = smc(key, model, N, ess_threshold=0.5)
        return dict(log_evidence=res.log_evidence, increments=res.log_evidence_increments,
                    log_weights=res.log_weights, samples=target.constrain(res.particles.z),
                    seen=res.model_info["seen"], steps=res.model_info["mcmc_steps"])

    def run(keys, powers):
        return jax.vmap(jax.vmap(one, (0, None)), (None, 0))(keys, powers)

    keys = jax.random.split(jax.random.key(11), R)
    powers = jnp.asarray([1.0, 0.5])
    out = jax.tree.map(np.asarray, jax.jit(run).lower(keys, powers).compile(FAST_COMPILE)(keys, powers))
    return [jax.tree.map(lambda v: v[i], out) for i in range(2)]


def _prefix_log_z(problem):
    cm, y = problem["cm"], problem["y"]
    ends = np.cumsum(BATCHES)
    return np.array([float(cm.log_evidence(y[:e])) for e in ends])


def test_every_prefix_evidence_and_the_posterior_match_exact(dt_runs, problem):  # noqa: F811
    good = dt_runs[0]
    np.testing.assert_array_equal(good["seen"][0], np.cumsum(BATCHES))
    log_z = _prefix_log_z(problem)
    cum = np.cumsum(good["increments"].astype(np.float64), axis=1)  # [R, K]
    z_prefix = _z(np.exp(cum - log_z[None]), 1.0)
    print("prefix evidence z:", z_prefix)
    assert np.all(np.abs(z_prefix) <= 4.0), z_prefix
    from types import SimpleNamespace

    z = zscores(SimpleNamespace(**good), problem)
    print("final z-scores:", z)
    assert passes(z), z
    assert np.all(good["steps"][:, 1:] >= 5)


def test_broken_kernel_is_rejected(dt_runs, problem):  # noqa: F811
    from types import SimpleNamespace

    z = zscores(SimpleNamespace(**dt_runs[1]), problem)
    print("broken kernel z-scores:", z)
    assert not passes(z), z


def test_bad_batches(problem):  # noqa: F811
    target = problem["target"]
    with pytest.raises(ValueError, match="sum to the 20 observations"):
        DataTempering(target, (3, 3))
    with pytest.raises(ValueError, match="positive"):
        DataTempering(target, (0, 20))
    assert DataTempering(target).num_steps == 20  # one observation per step by default


def test_entry_point_on_a_numpyro_model(problem):  # noqa: F811
    """``data_tempered_smc`` with the default HMC moves: the per-batch log predictive densities
    sum to log Ẑ, and no warning. (The exact checks are the 64-run tests above; this one checks
    the entry point, with a loose 0.5-nat bound on one run's log Ẑ.)"""
    import warnings

    from samplers.data_tempering import data_tempered_smc

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = data_tempered_smc(jax.random.key(4), problem["target"], batch_sizes=BATCHES,
                                num_particles=N)
    np.testing.assert_allclose(float(res.log_predictive.sum()), float(res.log_evidence), rtol=1e-5)
    assert abs(float(res.log_evidence) - problem["log_z"]) < 0.5
    np.testing.assert_array_equal(res.seen, np.cumsum(BATCHES))
    assert int(res.num_unmixed_steps) == 0 and res.samples["mu"].shape == (N, 2)


def test_inference_data_and_plot(problem, tmp_path):  # noqa: F811
    from samplers.data_tempering import data_tempered_smc
    from samplers.tempering import tempered_smc

    res = data_tempered_smc(jax.random.key(5), problem["target"], batch_sizes=BATCHES, num_particles=64)
    idata = res.to_inference_data()
    assert idata.posterior["mu"].shape == (1, 64, 2)
    assert list(idata.smc_path["seen"].values) == list(np.cumsum(BATCHES))
    np.testing.assert_allclose(float(idata.smc_path["log_predictive"].sum()), float(res.log_evidence),
                               rtol=1e-5)
    fig = res.plot()
    fig.savefig(tmp_path / "dt.png")
    tem = tempered_smc(jax.random.key(5), problem["target"], num_particles=64, progress=False)
    tem.plot().savefig(tmp_path / "t.png")
    for name in ("dt.png", "t.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert len(fig.axes) == 3  # path, ESS and its twin axis
