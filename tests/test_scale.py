"""The scaling experiment (app.scale): the loop, statistics, PF-vs-BoN line, files and CLI.

Fast tests drive the loop with a fake method (no LLM); the smoke test runs the real methods (pf,
bon from app.methods) end to end on a tiny random Llama with SmolLM2's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
import os
import types

import numpy as np
import pytest

from app import scale
from app.scale import (
    ScaleConfig,
    format_table,
    pf_matching_budget,
    report,
    run_experiment,
    summarize,
)
from app.tasks import get_tasks

# ------------------------------------------------------------------------------------------------
# a fake LM / method: deterministic success probabilities, so accuracies are known exactly
# ------------------------------------------------------------------------------------------------


class _Tok:
    def apply_chat_template(self, messages):
        return "<u>" + messages[0]["content"] + "<a>"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class _LM:
    tokenizer = _Tok()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


# the letter_words family asks for n words starting with a letter: a good completion for task i
def _good(task) -> str:
    letter = task.prompt.rstrip(".")[-1]
    return "".join(f"{'' if i == 0 else f'{i + 1}.'} {letter}{'x' * (i + 2)}\n" for i in range(task.n))


def _fake_run(p_success: dict):
    """run_fn whose success is a deterministic function of (method, budget, key)."""
    import jax

    def run(method, key, lm, prompt_ids, reward, budget, *, answer_fn, max_steps, max_step_tokens, **kw):
        assert isinstance(prompt_ids, list) and max_steps >= 2 and max_step_tokens >= 1
        u = float(jax.random.uniform(jax.random.fold_in(key, budget)))
        prompt = lm.decode(prompt_ids)
        task = next(t for t in get_tasks("letter_words") if t.prompt in prompt)
        text = _good(task) if u < p_success[method](budget) else " nothing"
        ans = answer_fn(lm.tokenizer.encode(text))
        # two final candidates; the correct one has the larger weight (pf-argmax always succeeds)
        cands = [answer_fn(lm.tokenizer.encode(" nothing")), answer_fn(lm.tokenizer.encode(_good(task)))]
        return types.SimpleNamespace(
            answer=ans, text=text, all_answers=cands, weights=[0.4, 0.6],
            compute=types.SimpleNamespace(tokens_generated=budget * 5, reward_calls=budget * 2,
                                          wall_time_s=0.01, compile_time_s=0.0),
            log_evidence=0.0)

    return run


def test_good_completions_are_correct():
    for t in get_tasks("letter_words"):
        assert t.is_correct(_good(t)), _good(t)
        assert not t.is_correct(" nothing")


def test_run_experiment_report_and_resume(tmp_path):
    cfg = ScaleConfig("letter_words", methods=["pf", "bon"], budgets=[1, 2, 4], seeds=2, num_prompts=3,
                      output_dir=str(tmp_path))
    p = {"pf": lambda b: 1.0 if b >= 2 else 0.0, "bon": lambda b: 1.0 if b >= 4 else 0.0}
    rows = run_experiment(cfg, lm=_LM(), progress=False, run_fn=_fake_run(p))
    assert len(rows) == 2 * 3 * 3 * 2
    saved = json.load(open(tmp_path / "results.json"))
    assert len(saved["rows"]) == len(rows) and saved["config"]["task"] == "letter_words"
    assert saved["config"]["max_steps_used"] == 4  # longest list (3) + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = report(cfg, rows)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("only 3 prompt" in m for m in said) and any("only 6 run" in m for m in said)
    s = out["summary"]
    assert s["pf@1"]["accuracy"] == 0.0 and s["pf@2"]["accuracy"] == 1.0 and s["bon@2"]["accuracy"] == 0.0
    assert s["bon@4"]["tokens_generated"] == 20 and s["bon@4"]["reward_calls"] == 8
    assert out["match"]["matching_budget"] == 2 and out["match"]["ratio"] == 2.0
    assert "smallest pf budget reaching it: 2" in out["match_line"]
    # paired differences pf − bon per budget: 0, +1, 0 on every (prompt, seed)
    assert {b: v["mean"] for b, v in out["paired"].items()} == {1: 0.0, 2: 1.0, 4: 0.0}
    p2 = out["paired"][2]
    assert p2["n_pairs"] == 6 and (p2["wins"], p2["losses"]) == (6, 0)
    assert p2["p_value"] == pytest.approx(2 / 2**6)  # exact McNemar: all 6 discordant pairs one way
    assert all(math.isnan(x) for x in p2["ci"])  # 3 prompts < MIN_PROMPTS: no bootstrap interval
    assert "no interval: 3 prompt(s)" in out["paired_line"] and "McNemar p = 0.031" in out["paired_line"]
    assert len(out["warnings"]) == 2  # too few prompts, too few runs (6 per cell)
    assert out["timing_line"].startswith("time: ")
    # the highest-weight candidate, judged from the stored candidates
    assert [s[f"pf-argmax@{b}"]["accuracy"] for b in (1, 2, 4)] == [1.0, 1.0, 1.0]
    assert rows[0]["candidates_correct"] == [False, True]
    assert "smallest pf-argmax budget reaching it: 1" in out["match_line"]
    for name in ("accuracy_vs_budget.png", "table.md", "summary.json"):
        assert os.path.getsize(tmp_path / name) > 0
    # resume: nothing left to run (a method that would fail proves it is not called)
    def boom(*a, **k):
        raise AssertionError("resume re-ran a finished run")

    again = run_experiment(cfg, lm=_LM(), progress=False, resume=True, run_fn=boom)
    assert len(again) == len(rows)
    other = ScaleConfig("letter_words", methods=["pf"], budgets=[1], seeds=1, num_prompts=3,
                        max_step_tokens=5, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot resume.*max_step_tokens"):
        run_experiment(other, lm=_LM(), progress=False, resume=True, run_fn=boom)
    # separate bon runs and a nested pool would give two rows per (bon, budget, prompt, seed)
    nested = ScaleConfig("letter_words", methods=["pf", "bon"], budgets=[1, 2, 4], seeds=2, num_prompts=3,
                         output_dir=str(tmp_path), nested=True)
    with pytest.raises(ValueError, match="cannot resume.*nested"):
        run_experiment(nested, lm=_LM(), progress=False, resume=True, run_fn=boom)


def test_runs_share_the_host_callbacks(tmp_path):
    """Every run of an experiment gets the host's one HostCallbacks (a static field of the model):
    with a reward that has no callbacks of its own (judge, self-certainty, prm, none), a new table
    per run would make every run compile again."""
    seen = []
    inner = _fake_run({"pf": lambda b: 0.5, "rm": lambda b: 0.5})

    def run(*args, **kw):
        seen.append((kw["callbacks"], type(args[4]).__name__))
        return inner(*args, **kw)

    cfg = ScaleConfig("letter_words", methods=["pf", "rm"], budgets=[2], seeds=1, num_prompts=3,
                      reward="self-certainty", output_dir=str(tmp_path))
    rows = run_experiment(cfg, lm=_LM(), progress=False, run_fn=run)
    assert len(rows) == len(seen) == 6
    assert all(c is seen[0][0] for c, _ in seen) and {name for _, name in seen} == {"SelfCertainty"}
    assert all(r["unique_answers"] >= 1 for r in rows)


def test_common_random_numbers_across_methods(tmp_path):
    """Same (seed, prompt) key for every method and budget: identical methods agree run by run."""
    cfg = ScaleConfig("letter_words", methods=["pf", "bon"], budgets=[2], seeds=3, num_prompts=4,
                      output_dir=str(tmp_path))
    half = lambda b: 0.5  # noqa: E731
    rows = run_experiment(cfg, lm=_LM(), progress=False, run_fn=_fake_run({"pf": half, "bon": half}),
                          save=False)
    by = {(r["method"], r["prompt"], r["seed"]): r["correct"] for r in rows}
    assert all(by[("pf", i, s)] == by[("bon", i, s)] for i in range(4) for s in range(3))
    assert 0 < np.mean([r["correct"] for r in rows]) < 1


def _rows(grid, method="pf", budget=4):
    """Rows from a [prompts, seeds] 0/1 grid."""
    return [dict(method=method, budget=budget, prompt=i, seed=s, correct=bool(grid[i][s]),
                 tokens_generated=1, reward_calls=1, wall_time_s=0.0)
            for i in range(len(grid)) for s in range(len(grid[0]))]


def test_summary_intervals():
    rng = np.random.default_rng(0)
    grid = (rng.random((12, 3)) < 0.4).astype(int)
    s = summarize(_rows(grid))["pf@4"]
    assert s["accuracy"] == pytest.approx(grid.mean())
    assert (s["successes"], s["n_runs"]) == (int(grid.sum()), 36)
    assert s["per_seed"] == pytest.approx(grid.mean(axis=0).tolist())
    # Wilson: the p with |k/n − p| = z √(p(1−p)/n), i.e. the roots of a quadratic
    k, n, z = grid.sum(), grid.size, 1.959963984540054
    roots = np.roots([1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2])
    assert s["ci"] == pytest.approx(tuple(sorted(roots)), abs=1e-9)
    # the bootstrap over prompts is close to the normal interval of the per-prompt means
    pp = grid.mean(axis=1)
    se = pp.std(ddof=1) / math.sqrt(len(pp))
    lo, hi = s["ci_prompts"]
    assert lo <= grid.mean() <= hi
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.5 * (2 * 1.96 * se)
    # fewer than MIN_PROMPTS prompts: no bootstrap over prompts (too narrow to mean anything)
    few = summarize(_rows(grid[: scale.MIN_PROMPTS - 1]))["pf@4"]
    assert all(math.isnan(x) for x in few["ci_prompts"])


def test_wilson_interval_is_valid_for_proportions():
    """Inside [0, 1] at 0/n and n/n (where p̂ ± z·se collapses to a point), and covering p at
    about the nominal rate: a broken (Wald) interval fails the coverage check at p = 0.05."""
    assert scale.wilson_interval(0, 10)[0] == 0.0 and scale.wilson_interval(0, 10)[1] > 0.2
    assert scale.wilson_interval(10, 10)[1] == 1.0 and scale.wilson_interval(10, 10)[0] < 0.8
    assert scale.wilson_interval(1, 2) == pytest.approx((0.0945, 0.9055), abs=1e-3)

    def coverage(interval, p, n=20, reps=4000):
        k = np.random.default_rng(1).binomial(n, p, size=reps)
        return np.mean([lo <= p <= hi for lo, hi in (interval(int(x), n) for x in k)])

    def wald(k, n):
        ph = k / n
        h = 1.96 * math.sqrt(ph * (1 - ph) / n)
        return ph - h, ph + h

    for p in (0.05, 0.3, 0.5):
        assert coverage(scale.wilson_interval, p) > 0.92, p
    assert coverage(wald, 0.05) < 0.75


def test_mcnemar_exact():
    from scipy import stats

    for w, l in ((6, 0), (3, 1), (10, 4), (0, 0), (5, 5)):
        expect = 1.0 if w + l == 0 else stats.binomtest(w, w + l, 0.5).pvalue
        assert scale.mcnemar_exact_p(w, l) == pytest.approx(expect, rel=1e-9)


def test_paired_interval_stays_in_range():
    """Paired differences of accuracies: the bootstrap interval lies in [−1, 1] even for extreme
    data (a t interval on 5 prompts gave ranges like [−2.9, +3.4])."""
    rng = np.random.default_rng(3)
    a = (rng.random((6, 2)) < 0.9).astype(int)
    b = (rng.random((6, 2)) < 0.1).astype(int)
    d = scale.paired_difference(_rows(a, "pf", 2) + _rows(b, "bon", 2))[2]
    lo, hi = d["ci"]
    assert -1.0 <= lo <= d["mean"] <= hi <= 1.0
    assert d["mean"] == pytest.approx((a - b).mean())


def test_pf_matching_budget():
    summ = {}
    for b, a in zip((1, 2, 4, 8), (0.1, 0.3, 0.6, 0.7)):
        summ[f"pf@{b}"] = dict(method="pf", budget=b, accuracy=a)
    for b, a in zip((1, 2, 4, 8), (0.1, 0.2, 0.4, 0.55)):
        summ[f"bon@{b}"] = dict(method="bon", budget=b, accuracy=a)
    m = pf_matching_budget(summ)
    assert m["reference_budget"] == 8 and m["matching_budget"] == 4 and m["ratio"] == 2.0
    summ["bon@8"]["accuracy"] = 0.9  # out of reach
    m = pf_matching_budget(summ)
    assert m["matching_budget"] is None and "no pf budget" in scale.matching_line(m)
    assert not pf_matching_budget({k: v for k, v in summ.items() if k.startswith("pf")})["available"]


def test_table_format():
    rng = np.random.default_rng(1)
    rows = _rows((rng.random((5, 2)) < 0.5).astype(int), "pf", 2) + _rows(np.ones((5, 2)), "bon", 2)
    t = format_table(summarize(rows), ["pf", "bon", "sc"], [2, 4])
    lines = t.splitlines()
    assert lines[0] == "| method | B=2 | B=4 |" and len(lines) == 5
    assert lines[3].startswith("| bon | 1.00 [0.72, 1.00] 10/10 | – |")


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        ScaleConfig("arithmetic")
    with pytest.raises(ValueError, match="methods must be among"):
        ScaleConfig("letter_words", methods=["pf", "mcts"])
    with pytest.raises(ValueError, match="seeds"):
        ScaleConfig("letter_words", seeds=0)
    with pytest.raises(ValueError, match="budgets"):
        scale._int_list("1,x", "--budgets")
    with pytest.raises(ValueError, match="positive"):
        scale._int_list("0,2", "--budgets")


def test_cli_parser(tmp_path, capsys):
    # bad budgets: a clear message and exit status 2, nothing run
    assert scale.main(["--task", "letter_words", "--budgets", "1,two"]) == 2
    assert "--budgets must be" in capsys.readouterr().err
    # the sub-command wiring that `ppl scale` uses
    root = argparse.ArgumentParser(prog="ppl")
    sub = root.add_subparsers(dest="command")
    scale.add_scale_parser(sub)
    args = root.parse_args(["scale", "--task", "closed_set", "--methods", "pf,bon", "--budgets", "1,2",
                            "--seeds", "1", "--num-prompts", "2", "--output-dir", str(tmp_path),
                            "--max-steps", "3", "--max-step-tokens", "4"])
    assert args.func is scale.run_scale
    assert (args.task, args.methods, args.budgets, args.seeds, args.num_prompts) == (
        "closed_set", "pf,bon", "1,2", 1, 2)
    assert (args.max_steps, args.max_step_tokens) == (3, 4)
    # the console script `ppl scale` parses the same options (app/cli.py), incl. the pg/ptpg ones
    from app import cli

    args = cli.build_parser().parse_args(["scale", "--task", "acrostic", "--pg-iterations", "1",
                                          "--num-chains", "2"])
    assert (args.command, args.task, args.pg_iterations, args.num_chains) == ("scale", "acrostic", 1, 2)


# ------------------------------------------------------------------------------------------------
# smoke test: the real methods on a tiny random transformer
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_real_methods_tiny_model(tmp_path):
    import jax

    from models.llm import ModelConfig, Sampling, gguf_loader, init_random, smollm2_path
    from models.llm_fk.step_lm import StepLM
    from models.llm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(gguf_loader.open_gguf(smollm2_path()).metadata)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      max_position_embeddings=1024, eos_token_ids=tuple(tok.eos_ids))
    lm = StepLM(init_random(cfg, jax.random.key(0), scale=0.5), tok, tok.token_ids_containing("\n"),
                None, Sampling(temperature=1.0))
    sc = ScaleConfig("letter_words", methods=["bon", "pf"], budgets=[1, 2], seeds=1, num_prompts=2,
                     max_steps=2, max_step_tokens=3, output_dir=str(tmp_path))
    rows = run_experiment(sc, lm=lm, progress=False)
    assert len(rows) == 8
    for r in rows:
        assert 0 < r["tokens_generated"] <= r["budget"] * 2 * 3
        assert r["reward_calls"] >= 1
        assert isinstance(r["correct"], bool) and isinstance(r["text"], str)
    pf = [r for r in rows if r["method"] == "pf"]
    assert all(not math.isnan(r["log_evidence"]) for r in pf)
    out = report(sc, rows)
    assert set(out["summary"]) == {"bon@1", "bon@2", "pf@1", "pf@2", "pf-argmax@1", "pf-argmax@2"}
    for r in pf:  # the particle filter's candidates: one per particle, weights sum to 1
        assert len(r["candidates"]) == len(r["weights"]) == r["budget"]
        assert abs(sum(r["weights"]) - 1) < 1e-5
    assert os.path.getsize(tmp_path / "accuracy_vs_budget.png") > 0


def test_compare_runs_pairs_cells(tmp_path, capsys):
    """app.compare_runs pairs two cells on (prompt, seed); --draw scores a run by Σ W·correct."""
    from app import compare_runs

    def row(method, b, prompt, correct, w, ok):
        return dict(method=method, budget=b, prompt=prompt, seed=0, correct=correct, weights=w,
                    candidates_correct=ok)

    a = [row("pf", 4, p, c, [0.75, 0.25], [True, False]) for p, c in enumerate([1, 1, 0, 1, 0, 1])]
    b = [row("pf", 1, p, c, [1.0], [False]) for p, c in enumerate([0, 1, 0, 0, 0, 0])]
    (tmp_path / "a.json").write_text(json.dumps({"rows": a}))
    (tmp_path / "b.json").write_text(json.dumps(b))
    res = compare_runs.compare(compare_runs.load_cell(f"{tmp_path}/a.json:pf@4"),
                               compare_runs.load_cell(f"{tmp_path}/b.json:pf@1"))
    assert (res["n"], res["wins"], res["losses"]) == (6, 3, 0)
    assert res["diff"] == pytest.approx(0.5) and res["diff_ci"][0] <= 0.5 <= res["diff_ci"][1]
    draw = compare_runs.load_cell(f"{tmp_path}/a.json:pf@4", draw=True)
    assert all(v == pytest.approx(0.75) for v in draw.values())
    assert compare_runs.main([f"{tmp_path}/a.json:pf@4", f"{tmp_path}/b.json:pf@1", "--draw"]) == 0
    assert "sign test" in capsys.readouterr().out
    assert compare_runs.main([f"{tmp_path}/a.json:bon@4", f"{tmp_path}/b.json:pf@1"]) == 2
    assert "no runs of bon@4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# nested budgets (bon / wbon / sc from one pool) and per-method budget caps
# ------------------------------------------------------------------------------------------------


def test_nested_selection_matches_the_search_rules():
    """select_nested reproduces samplers.search's bon / wbon / sc selection (ties, −inf, +inf)."""
    import jax.numpy as jnp

    from samplers.search.best_of_n import _best_scored
    from samplers.search.self_consistency import _majority_vote
    from samplers.search.weighted_best_of_n import _weighted_vote

    rules = {"bon": _best_scored, "wbon": _weighted_vote, "sc": _majority_vote}
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(60):
        n = int(rng.integers(1, 9))
        answers = rng.integers(0, 3, n)
        scores = rng.choice([-2.0, -1.0, -0.5, 0.0, -np.inf], n)  # many ties
        if trial % 10 == 0:
            scores[rng.integers(n)] = np.inf
        for m, rule in rules.items():
            want = int(rule(jnp.asarray(scores, jnp.float32), jnp.asarray(answers)))
            got = scale.select_nested(m, [int(a) for a in answers], scores)
            assert got == want, (m, answers, scores, got, want)
            checked += 1
    assert checked == 180
    # a broken rule (ties to the last index) is caught by the same comparison
    s = np.array([0.0, -1.0, 0.0])
    assert scale.select_nested("bon", [0, 1, 2], s) == 0 != int(np.flatnonzero(s == s.max())[-1])


@pytest.mark.slow
def test_nested_rows_equal_separate_runs_on_the_markov_lm():
    """A wbon pool of B samples, nested at B, selects what bon, wbon and sc select when run
    separately on the same key (same N and key: the same samples), on two keys."""
    import jax

    from app.methods import MarkovStepLM, ProgrammaticStepVerifier, run_method
    from models.markov_lm import toy_test_bed

    lm = MarkovStepLM(toy_test_bed().lm)

    def score(text, finished):
        return 0.2 + 0.8 * (text.count("c") % 3) / 2.0

    def answer(ids):
        return tuple(ids)[:3]

    common = dict(answer_fn=answer, max_steps=5, max_step_tokens=2, max_new_tokens=8)
    b = 8
    for seed in range(2):
        key = jax.random.key(seed)
        pool = run_method("wbon", key, lm, [3], ProgrammaticStepVerifier(score), b, **common)
        d = pool.diagnostics
        assert len(d["scores"]) == len(d["num_tokens"]) == len(pool.all_answers) == b
        assert sum(d["num_tokens"]) == pool.compute.tokens_generated
        row = dict(method=scale.POOL, budget=b, prompt=0, seed=seed, candidates=[str(a) for a in pool.all_answers],
                   candidates_correct=[a[:1] == (0,) for a in pool.all_answers], scores=d["scores"],
                   num_tokens=d["num_tokens"], wall_time_s=1.0, total_time_s=1.0)
        for m in ("bon", "wbon", "sc"):
            sep = run_method(m, key, lm, [3], ProgrammaticStepVerifier(score), b, **common)
            (nested,) = scale.nested_rows(row, [m], [b])
            assert nested["answer"] == str(sep.answer), (m, seed)
            assert nested["tokens_generated"] == sep.compute.tokens_generated
            assert nested["reward_calls"] == sep.compute.reward_calls


def _pool_fake_run(calls: list):
    """run_fn: wbon returns B candidates (answers cycle good / bad / bad; only the good one is
    correct; scores favour a bad one); other methods succeed from budget 2."""
    def run(method, key, lm, prompt_ids, reward, budget, *, answer_fn, **kw):
        calls.append((method, budget))
        prompt = lm.decode(prompt_ids)
        task = next((t for t in get_tasks("letter_words") if t.prompt in prompt), None)
        good = answer_fn(lm.tokenizer.encode(_good(task) if task else "1. 2"))
        bad = [answer_fn(lm.tokenizer.encode(" nothing")), answer_fn(lm.tokenizer.encode(" x"))]
        cands = [good if i % 3 == 0 else bad[i % 3 - 1] for i in range(budget)]
        scores = [-1.0 if i % 3 == 0 else (0.0 if i % 3 == 1 else -5.0) for i in range(budget)]
        ok = method == "wbon" or budget >= 2
        return types.SimpleNamespace(
            answer=good if ok else bad[0], text=_good(task) if ok and task else " nothing", all_answers=cands,
            weights=[1.0 / budget] * budget,
            compute=types.SimpleNamespace(tokens_generated=budget * 5, reward_calls=budget,
                                          wall_time_s=0.01 * budget, compile_time_s=0.0),
            log_evidence=0.0,
            diagnostics=dict(scores=scores, num_tokens=[5] * budget) if method == "wbon" else {})

    return run


def test_nested_experiment_and_budget_caps(tmp_path):
    calls = []
    cfg = ScaleConfig("letter_words", methods=["pf", "bon", "wbon", "sc"], budgets=[1, 2, 4], seeds=1,
                      num_prompts=2, output_dir=str(tmp_path), max_budgets={"pf": 2}, nested=True)
    assert cfg.method_budgets("pf") == [1, 2] and cfg.pooled_methods() == ["bon", "wbon", "sc"]
    rows = run_experiment(cfg, lm=_LM(), progress=False, run_fn=_pool_fake_run(calls))
    # per prompt: one pool run at B=4 and pf at 1, 2 (no pf@4, no separate bon / wbon / sc runs)
    assert sorted(calls) == sorted([("wbon", 4), ("pf", 1), ("pf", 2)] * 2)
    by = {(r["method"], r["budget"], r["prompt"]): r for r in rows}
    assert len([r for r in rows if r["method"] == scale.POOL]) == 2
    assert ("pf", 4, 0) not in by
    # first B of [good, bad(0.0), bad(-5.0), good]: bon picks the 0.0-scored bad one from B=2;
    # sc's tie at B=2 goes to the first (good); at B=4 good has 2 votes of 4
    assert [by[("bon", b, 0)]["correct"] for b in (1, 2, 4)] == [True, False, False]
    assert [by[("sc", b, 0)]["correct"] for b in (1, 2, 4)] == [True, True, True]
    # wbon at B=4: good weighs 2·e^-1 < e^0 of the 0.0-scored bad answer
    assert [by[("wbon", b, 0)]["correct"] for b in (1, 2, 4)] == [True, False, False]
    assert by[("bon", 2, 1)]["tokens_generated"] == 10 and by[("sc", 4, 1)]["reward_calls"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = report(cfg, rows)
    assert not any(k.startswith(scale.POOL) for k in out["summary"])
    assert out["summary"]["sc@4"]["accuracy"] == 1.0 and "pf@4" not in out["summary"]
    # the runs that ran: 2 pools + 4 pf runs in 3 cells (the nested rows did not run)
    assert "(3 method × budget cells)" in out["timing_line"] and " 6 runs " in out["timing_line"]

    def boom(*a, **k):
        raise AssertionError("resume re-ran a finished run")

    assert len(run_experiment(cfg, lm=_LM(), progress=False, resume=True, run_fn=boom)) == len(rows)
    with pytest.raises(ValueError, match="not among the methods"):
        ScaleConfig("letter_words", methods=["pf"], budgets=[1, 2], max_budgets={"pg": 2})
    with pytest.raises(ValueError, match="largest budget"):
        ScaleConfig("letter_words", methods=["pf"], budgets=[2, 4], max_budgets={"pf": 1})


def test_cli_several_families_nested_and_caps(tmp_path, monkeypatch, capsys):
    """`ppl scale --task a,b --nested --max-budget pf=2`: one host and LM for both families, a
    folder each, and the pooled report in --output-dir."""
    import app.methods

    calls, hosts = [], []
    monkeypatch.setattr(scale, "load_step_lm", lambda temperature: _LM())
    monkeypatch.setattr(app.methods, "run_method", _pool_fake_run(calls))
    real = scale.run_experiment

    def spy(cfg, **kw):
        hosts.append(kw["host"])
        return real(cfg, **kw)

    monkeypatch.setattr(scale, "run_experiment", spy)
    argv = ["--task", "letter_words,number_list", "--methods", "pf,bon,sc", "--budgets", "1,2,4",
            "--seeds", "1", "--num-prompts", "5", "--output-dir", str(tmp_path), "--nested",
            "--max-budget", "pf=2", "--no-progress"]
    assert scale.main(argv) == 0
    out = capsys.readouterr().out
    assert "30 runs (3 method × budget cells, bon/sc nested in one pool × 10 prompts of 2 families" in out
    assert len(hosts) == 2 and hosts[0] is hosts[1]
    assert sorted(set(calls)) == [("pf", 1), ("pf", 2), ("wbon", 4)] and len(calls) == 30
    for fam in ("letter_words", "number_list"):
        saved = json.load(open(tmp_path / fam / "results.json"))
        assert saved["config"]["nested"] and saved["config"]["max_budgets"] == {"pf": 2}
    pooled = json.load(open(tmp_path / "summary.json"))["summary"]
    assert pooled["bon@4"]["n_prompts"] == 10 and "pf@4" not in pooled
    assert "letter_words + number_list:" in out
    assert scale.main(["--task", "letter_words,letter_words"]) == 2
    assert scale.main(["--task", "letter_words", "--max-budget", "pf"]) == 2
    assert "METHOD=BUDGET" in capsys.readouterr().err


def test_unique_first_steps_counts_surviving_step_one_ancestors():
    from app.methods.particle_filter import unique_first_steps

    nl = 10  # a delimiter id
    comps = [[1, 2, nl, 5, nl], [1, 2, nl, 6], [3, nl, 5], [1, 2, nl, 5, nl], [4, 4]]  # last: unfinished step
    assert unique_first_steps(comps, (nl,)) == 3
    assert unique_first_steps(comps[:2], (nl,)) == 1  # collapsed onto one first step
    assert unique_first_steps(comps, (99,)) == 4  # no delimiter: whole completions
    rows = [dict(method="pf", budget=2, prompt=i, seed=0, correct=True, tokens_generated=1, reward_calls=1,
                 wall_time_s=0.0, unique_completions=2, unique_first_steps=i + 1) for i in range(2)]
    s = summarize(rows)["pf@2"]
    assert s["unique_first_steps"] == 1.5
    assert "1 / 1 / 2.0 (1.5)" in scale.format_compute_table({"pf@2": s}, ["pf"], [2])
