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

from benchmarks import bench_llm_decode  # noqa: E402


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
                           "--dtype", "mixed", "--torch-dtype", "bfloat16", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["batch"], r["dtype"], r["torch_dtype"]) for r in rows] == [(2, "mixed", "bfloat16")]
    for r in rows:
        assert r["jax"]["decode_tok_s"] > 0 and r["transformers"]["decode_tok_s"] > 0 and r["speedup"] > 0
    assert "| 2 | mixed | bfloat16 |" in capsys.readouterr().out
