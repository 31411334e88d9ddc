"""Smoke tests of the benchmark scripts at toy size: a script that crashes must fail CI, not the
one device session that a task may be lent (see DEVELOPERS.md: device time is scarce).

The SV and PMMH benchmarks need the ``particles`` peer environment, which is built on first use
(network): they are run by hand and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_llm_decode, gpu_check  # noqa: E402


def test_llm_benchmark_gpu_mode_runs_on_a_toy_model(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    bench_llm_decode.main(["--mode", "gpu", "--tiny", "--batch-sizes", "1", "3", "--new-tokens", "4",
                           "--repeats", "1", "--gather-batch", "3", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["mode"] == "gpu" and [r["batch"] for r in res["rows"]] == [1, 3]
    for r in res["rows"]:
        j = r["jax"]
        assert j["decode_tok_s"] > 0 and 0 < j["fraction_of_floor"]
    assert "inplace_fraction_of_step" in res["rows"][1]["jax"]
    assert "| 3 |" in capsys.readouterr().out


@pytest.mark.slow
def test_llm_benchmark_cpu_mode_runs_against_transformers(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    bench_llm_decode.main(["--batch-sizes", "2", "--new-tokens", "3", "--repeats", "1", "--gather-batch", "2",
                           "--dtype", "mixed", "--torch-dtype", "bfloat16", "--tiny", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["batch"], r["dtype"], r["torch_dtype"]) for r in rows] == [(2, "mixed", "bfloat16")]
    for r in rows:
        assert r["jax"]["decode_tok_s"] > 0 and r["transformers"]["decode_tok_s"] > 0 and r["speedup"] > 0
    assert "| 2 | mixed | bfloat16 |" in capsys.readouterr().out


def test_gpu_check_runs_at_toy_size(tmp_path, capsys):
    """benchmarks/gpu_check.py end to end on CPU at toy sizes: every part runs, log Ẑ of the engine
    and of the minimal JAX filter agree, the table and the JSON are written."""
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--toy", "--json", str(out)])
    res = json.loads(out.read_text())
    assert [r["n"] for r in res["sv"]] == [64]
    for r in res["sv"]:
        assert r["ours_s"] > 0 and r["peer_s"] > 0
        ours, peer = r["ours_logz"], r["peer_logz"]
        assert abs(sum(ours) / len(ours) - sum(peer) / len(peer)) < 1.0  # T = 20, N >= 64
    assert {r["resampling"] for r in res["sharded"]} == {"global", "islands"}
    assert [r["batch"] for r in res["llm_decode"]["rows"]] == [1, 2]
    pf = res["llm_pf"]  # the LLM particle filter (a tiny random transformer under --toy)
    assert [r["n"] for r in pf["rows"]] == [8] and all(r["tok_s"] > 0 for r in pf["rows"])
    tf = res["transformers_decode"]  # transformers' decode, or skipped with the reason
    assert ("skipped" in tf) or [r["batch"] for r in tf["rows"]] == [1, 2]
    text = capsys.readouterr().out
    assert "SV bootstrap filter" in text and "| 64 |" in text
    assert "LLM particle filter" in text and "transformers decode" in text


def test_llm_pf_peers_benchmark_runs_at_toy_size(tmp_path, capsys):
    """benchmarks/bench_llm_pf_peers.py with a random tiny Llama (no llamppl): our filter and the
    hand-written transformers filter run the same problem, every particle makes every token, and
    the table and the JSON are written."""
    from benchmarks import bench_llm_pf_peers

    out = tmp_path / "pf_peers.json"
    bench_llm_pf_peers.main(["--tiny", "--skip-llamppl", "--particles", "3", "--tokens", "3", "--repeats", "1",
                             "--json", str(out)])
    res = json.loads(out.read_text())
    assert "llamppl" not in res
    for name in ("ours", "transformers"):
        r = res[name]
        assert r["run_s"] > 0 and r["tokens"] == [3 * 3]
    assert res["ours"]["compile_s"] > 0 and res["ratios"]["transformers_over_ours"] > 0
    assert "| transformers |" in capsys.readouterr().out
