"""Smoke test of the main demo (`python -m app.demo`) at a tiny size, and its quantile helper."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from app.demo import main, weighted_quantiles


@pytest.mark.slow
def test_demo_runs_and_writes_plot(tmp_path, capsys):
    out = tmp_path / "plots" / "sv.png"
    n, steps = 32, 20
    summary = main(["--num-particles", str(n), "--num-steps", str(steps), "--seed", "1",
                    "--num-runs", "2", "--output", str(out), "--no-llm"])
    printed = capsys.readouterr().out
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {out}" in printed
    assert "log-evidence" in printed and "ESS" in printed and "run time" in printed
    assert np.isfinite(summary["log_evidence"]) and np.isfinite(summary["log_evidence_sd"])
    assert 1.0 <= summary["ess_min"] <= summary["ess_median"] <= n
    assert 0 <= summary["num_resampling_steps"] <= steps - 1
    assert not summary["extinct"] and summary["num_nan_potentials"] == 0
    assert 0.0 <= summary["band_coverage"] <= 1.0


@pytest.mark.parametrize("argv", [["--num-particles", "0"], ["--num-steps", "0"],
                                  ["--num-runs", "1"], ["--num-particles", "ten"]])
def test_demo_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_weighted_quantiles():
    # sorted values 1, 2, 3, 4 with weights .2, .3, .1, .4: cumulative .2, .5, .6, 1.
    x = jnp.array([[3.0, 1.0, 2.0, 4.0]])
    lw = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    q = weighted_quantiles(x, lw + 7.0, (0.05, 0.15, 0.45, 0.55, 0.95))  # unnormalised is fine
    np.testing.assert_array_equal(np.asarray(q), [[1.0, 1.0, 2.0, 3.0, 4.0]])


@pytest.mark.slow
def test_demo_llm_steering_part_runs(capsys):
    """Part 2 at toy size (2 particles, 3 word-steps, 1 run): both methods run on SmolLM2 and the
    rates are printed."""
    from app.demo import llm_steering

    out = llm_steering(runs=1, particles=2, seed=0, max_steps=3)
    printed = capsys.readouterr().out
    assert "particle filter over words" in printed and "pf run 0" in printed and "bon run 0" in printed
    assert set(out) >= {"pf_satisfied", "bon_satisfied", "plain_sample_rate"}
    assert 0.0 <= out["plain_sample_rate"] <= 1.0 and out["pf_tokens"] > 0


def test_lipogram_constraint():
    from app.steer import CONSTRAINTS

    c = CONSTRAINTS["lipogram"]
    assert c.satisfied("A fun and playful cat with a wagging tail.")
    assert not c.satisfied("A cat with a smile.")                    # an e
    assert not c.satisfied("A cat sat on a mat")                      # no final stop
    assert not c.satisfied("A cat sat.")                              # < 5 words
    assert not c.satisfied("Amazing cat 🐦🐦 is so big.")              # not ASCII letters
    # the step score: exp(−4 · violations so far); an unfinished prefix is not judged on length
    assert c.step_score("A cat", False) == 1.0
    assert abs(c.step_score("The cat", False) - np.exp(-4.0)) < 1e-12
    assert abs(c.step_score("The cat sees", False) - np.exp(-12.0)) < 1e-12
