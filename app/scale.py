"""Inference-time scaling experiment: accuracy versus budget of every method on a task family.

For each method × budget × prompt × seed, :func:`app.methods.run_method` runs SmolLM2 on the
prompt (steps = lines) with the task's programmatic step verifier as reward model, and the task's
program decides whether the selected completion is correct. The accuracy of a (method, budget) cell
is the mean success over its n = prompts × seeds runs. Intervals (95%):

- a Wilson score interval for that proportion over the n runs (valid for a proportion, never
  outside [0, 1]; it treats the runs as independent, so it describes *these* prompts);
- over prompts: a percentile bootstrap resampling prompts (each with its mean over seeds), the
  uncertainty about the task family's accuracy, given only with at least ``MIN_PROMPTS`` prompts
  (a bootstrap of fewer prompts is far too narrow);
- paired comparisons (pf − bon on the same prompt and key): the mean difference, the discordant
  pairs (one method right, the other wrong) with McNemar's exact p-value, and a paired bootstrap
  over prompts (at least ``MIN_PROMPTS``). Differences of accuracies lie in [−1, 1] and so do
  these intervals.

:func:`report` warns (and ``ppl scale`` prints) when the prompts or runs are too few to conclude.

The "scaling rate" comparison of Puri et al. (2025) is the smallest particle-filter budget whose
accuracy reaches best-of-N at the largest budget run (e.g. 32): a PF that matches BoN@32 with 4
particles scales 8× faster.

Command line: ``python -m app.scale --task letter_words --methods pf,bon --budgets 1,2,4``
(``ppl scale`` is the same parser, registered in ``app/cli.py``). Writes ``results.json`` (every
run), ``table.md`` and ``accuracy_vs_budget.png`` under ``--output-dir``.

Reference: Puri et al. (2025), "A probabilistic inference approach to inference-time scaling of
LLMs using particle-based Monte Carlo methods", Fig. 1/Table 1 (accuracy vs budget).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "ScaleConfig",
    "method_names",
    "load_step_lm",
    "make_reward",
    "ExperimentHost",
    "run_experiment",
    "summarize",
    "pf_matching_budget",
    "paired_difference",
    "argmax_rows",
    "format_paired",
    "format_table",
    "plot_scaling",
    "add_scale_parser",
    "run_scale",
    "main",
]

REWARDS = ("step", "final", "judge", "self-certainty", "prm", "none")
#: methods that draw B independent samples and select among them: with ``nested`` budgets they
#: are scored on the first B samples of one pool drawn at the largest budget (see nested_rows)
NESTED_METHODS = ("bon", "wbon", "sc")
#: the method name of the pool's own rows in results.json (a wbon run at the largest budget)
POOL = "iid-pool"
#: rewards the task's program computes (the truth); the others are imperfect stand-ins for it
PROGRAM_REWARDS = ("step", "final")


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


def method_names() -> tuple[str, ...]:
    """The names of the registered methods (:data:`app.methods.METHODS`), the ``--methods``
    choices."""
    from app.methods import METHODS

    return tuple(METHODS)


def _int_list(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return vals


class ScaleConfig:
    """Settings of one experiment (validated on construction)."""

    def __init__(
        self,
        task: str,
        methods: Sequence[str] | None = None,
        budgets: Sequence[int] = (1, 2, 4, 8, 16, 32),
        seeds: int = 2,
        num_prompts: int | None = None,
        max_steps: int | None = None,
        max_step_tokens: int = 8,
        temperature: float = 0.7,
        reward: str = "step",
        output_dir: str = "outputs/scale",
        method_options: dict | None = None,
        max_budgets: dict | None = None,
        nested: bool = False,
    ):
        from app.tasks import FAMILIES

        if task not in FAMILIES:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(FAMILIES)}")
        known = method_names()
        methods = list(known) if methods is None else [m.strip() for m in methods if m.strip()]
        bad = [m for m in methods if m not in known]
        if not methods or bad:
            raise ValueError(f"methods must be among {known}, got {bad or methods}")
        budgets = sorted(set(int(b) for b in budgets))
        if not budgets or budgets[0] < 1:
            raise ValueError(f"budgets must be positive integers, got {budgets}")
        if not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
        for name, v in (("max_steps", max_steps), ("num_prompts", num_prompts)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(max_step_tokens, int) or max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be a positive integer, got {max_step_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        self.task, self.methods, self.budgets, self.seeds = task, methods, budgets, seeds
        self.num_prompts, self.max_steps, self.max_step_tokens = num_prompts, max_steps, max_step_tokens
        self.temperature, self.reward, self.output_dir = float(temperature), reward, output_dir
        self.method_options = dict(method_options or {})
        max_budgets = {str(k): v for k, v in dict(max_budgets or {}).items()}
        for m, cap in max_budgets.items():
            if m not in methods:
                raise ValueError(f"max_budgets names {m!r}, which is not among the methods {methods}")
            if not isinstance(cap, int) or cap < budgets[0]:
                raise ValueError(f"the largest budget of {m!r} must be an integer >= {budgets[0]} (the smallest "
                                 f"budget), got {cap!r}")
        self.max_budgets = max_budgets
        self.nested = bool(nested)

    def method_budgets(self, method: str) -> list[int]:
        """The budgets ``method`` runs at: ``budgets`` up to its ``max_budgets`` cap."""
        cap = self.max_budgets.get(method)
        return [b for b in self.budgets if cap is None or b <= cap]

    def pooled_methods(self) -> list[str]:
        """The methods scored on nested budgets of one sample pool (``nested``): bon, wbon, sc."""
        return [m for m in self.methods if m in NESTED_METHODS] if self.nested else []

    def as_dict(self) -> dict:
        return dict(task=self.task, methods=self.methods, budgets=self.budgets, seeds=self.seeds,
                    num_prompts=self.num_prompts, max_steps=self.max_steps,
                    max_step_tokens=self.max_step_tokens, temperature=self.temperature,
                    reward=self.reward, method_options=self.method_options,
                    max_budgets=self.max_budgets, nested=self.nested)


# ------------------------------------------------------------------------------------------------
# model, rewards, one run
# ------------------------------------------------------------------------------------------------


@functools.cache
def _smollm2():
    from models.llm import load_smollm2

    return load_smollm2()


def load_step_lm(temperature: float = 0.7, delimiter: str = "\n"):
    """SmolLM2-135M-Instruct as a :class:`~models.llm_fk.step_lm.StepLM` whose steps are lines."""
    from models.llm import Sampling
    from models.llm_fk.step_lm import StepLM

    model, tokenizer, _ = _smollm2()
    return StepLM(model, tokenizer, tokenizer.token_ids_containing(delimiter), None,
                  Sampling(temperature=float(temperature)))


def make_reward(task, kind: str = "step", callbacks=None):
    """The reward model of a run. From the task's program (the truth): ``step``, its step verifier
    (process reward), ``final``, its final verifier (outcome), registered in ``callbacks`` (a
    :class:`~models.llm_fk.rewards.HostCallbacks`). Imperfect rewards (the program only judges the
    selected answer): ``judge``, SmolLM2 asked whether the steps so far are correct on its own
    cache (:class:`~models.llm_fk.rewards.LLMJudge`); ``self-certainty``, the mean token
    log-probability (:class:`~models.llm_fk.rewards.SelfCertainty`); ``prm``, the learned process
    reward head on SmolLM2's hidden states (:class:`~models.llm_fk.prm.HiddenStatePRM`, shipped
    weights); ``none``, no reward (:class:`~models.llm_fk.rewards.ConstantReward`)."""
    from models.llm_fk import rewards

    if kind not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
    if kind == "step":
        return rewards.ProgrammaticStepVerifier(task.step_score, callbacks=callbacks)
    if kind == "final":
        return rewards.FinalAnswerVerifier(task.final_score, callbacks=callbacks)
    if kind == "judge":
        return rewards.LLMJudge()
    if kind == "self-certainty":
        return rewards.SelfCertainty()
    if kind == "prm":
        from models.llm_fk.prm import HiddenStatePRM

        return HiddenStatePRM.default()
    return rewards.ConstantReward()


class ExperimentHost:
    """The host side of one experiment: one :class:`~models.llm_fk.rewards.HostCallbacks` shared by
    every run (rewards of different tasks differ only in a function id, so a (method, budget) cell
    compiles once), and one reward model and answer function per task. Lives as long as the
    experiment (no module-level cache)."""

    def __init__(self, kind: str = "step"):
        from models.llm_fk.rewards import HostCallbacks

        if kind not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
        self.kind = kind
        self.callbacks = HostCallbacks()
        self._rewards: dict = {}
        self._answers: dict = {}

    def reward(self, task):
        if task not in self._rewards:
            self._rewards[task] = make_reward(task, self.kind, self.callbacks)
        return self._rewards[task]

    def answer_fn(self, task, lm) -> Callable[[list[int]], str]:
        if task not in self._answers:
            decode = lm.decode
            self._answers[task] = lambda ids: task.answer(decode(ids))
        return self._answers[task]


def run_key(seed: int, prompt_index: int):
    """Common random numbers: every method and budget sees the same key for (seed, prompt)."""
    import jax

    return jax.random.fold_in(jax.random.PRNGKey(seed), prompt_index)


def run_one(method: str, task, prompt_index: int, seed: int, budget: int, lm, cfg: ScaleConfig,
            max_steps: int, run_fn: Callable | None = None, host: ExperimentHost | None = None) -> dict:
    """One run; returns a JSON-able row (correctness decided by the task's program). ``host``: the
    experiment's host functions (default: a new :class:`ExperimentHost`, for a single run)."""
    if run_fn is None:
        from app.methods import run_method as run_fn
    if host is None:
        host = ExperimentHost(cfg.reward)
    prompt_ids = task.prompt_ids(lm.tokenizer)
    t0 = time.perf_counter()
    res = run_fn(method, run_key(seed, prompt_index), lm, prompt_ids, host.reward(task),
                 budget, answer_fn=host.answer_fn(task, lm), max_steps=max_steps,
                 max_step_tokens=cfg.max_step_tokens, callbacks=host.callbacks, **cfg.method_options)
    elapsed = time.perf_counter() - t0
    c = res.compute
    cands = [str(a) for a in (getattr(res, "all_answers", None) or [])]
    diag = getattr(res, "diagnostics", None) or {}
    weights = [float(w) for w in (getattr(res, "weights", None) or [])]
    return dict(
        method=method, budget=budget, prompt=prompt_index, seed=seed,
        correct=bool(task.is_correct(res.text)), answer=str(res.answer), text=res.text,
        tokens_generated=int(c.tokens_generated), reward_calls=int(c.reward_calls),
        wall_time_s=float(c.wall_time_s), compile_time_s=float(getattr(c, "compile_time_s", 0.0)),
        total_time_s=elapsed,
        log_evidence=float(getattr(res, "log_evidence", float("nan"))),
        candidates=cands, weights=weights,
        candidates_correct=[bool(task.answer_is_correct(a)) for a in cands],
        unique_answers=len(set(cands)),
        unique_completions=int(diag.get("unique_completions", len(set(cands)))),
        **({"unique_first_steps": int(diag["unique_first_steps"])} if "unique_first_steps" in diag else {}),
        **({"scores": [float(x) for x in diag["scores"]], "num_tokens": [int(x) for x in diag["num_tokens"]]}
           if "scores" in diag and "num_tokens" in diag else {}),
    )


def _first_max(values: np.ndarray) -> int:
    """Index of the largest value, ties to the lowest index (``samplers.search.base.argmax_first``)."""
    return int(np.argmax(values))


def _vote(answers: list, weights: np.ndarray) -> int:
    """``samplers.search.base.vote``: the first candidate whose answer has the largest total weight."""
    totals = np.array([sum(w for b, w in zip(answers, weights) if b == a) for a in answers])
    return _first_max(totals)


def select_nested(method: str, answers: list, scores: np.ndarray) -> int:
    """The candidate ``method`` (bon, wbon or sc) selects among samples with these answers and
    reward scores (log scale, −inf for unscorable): the selection rules of
    :mod:`samplers.search` (``best_of_n``, ``weighted_best_of_n``, ``self_consistency``) in NumPy."""
    s = np.asarray(scores, np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    if method == "bon":
        return _first_max(s)
    if method == "sc":
        return _vote(answers, np.ones(len(answers)))
    if method != "wbon":
        raise ValueError(f"nested budgets apply to {NESTED_METHODS}, not {method!r}")
    top = np.max(s)
    shift = top if np.isfinite(top) else 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.where(s > -np.inf, np.exp(s - shift), 0.0)
    if top == np.inf:
        w = (s == np.inf).astype(float)
    winner = _vote(answers, w)
    best = _first_max(np.where([a == answers[winner] for a in answers], s, -np.inf))
    return best if np.isfinite(s[best]) else winner


def nested_rows(pool: dict, methods: Sequence[str], budgets: Sequence[int]) -> list[dict]:
    r"""Rows of the sampling baselines (bon, wbon, sc) at every budget B, scored on the first B
    samples of one pool of \(B_{\max}\) i.i.d. samples (a ``wbon`` run at the largest budget,
    its row storing every sample's answer, correctness, reward score and tokens).

    The first B of \(B_{\max}\) i.i.d. samples are B i.i.d. samples, so each derived row has the
    law of a separate run at budget B (its selection rule is :func:`select_nested`); rows at
    different budgets of one prompt are dependent (nested), which a comparison at one budget
    does not see. Compute is counted for the B samples used: their tokens, B reward calls (0 for
    sc), wall time B/\(B_{\max}\) of the pool's.
    """
    answers, ok = list(pool["candidates"]), list(pool["candidates_correct"])
    scores, ntok = np.asarray(pool["scores"], np.float64), list(pool["num_tokens"])
    n = len(answers)
    if not (len(ok) == len(scores) == len(ntok) == n == int(pool["budget"])):
        raise ValueError(f"the pool row holds {n} candidates for budget {pool['budget']}: cannot nest")
    out = []
    for m in methods:
        for b in budgets:
            if b > n:
                raise ValueError(f"budget {b} exceeds the pool's {n} samples")
            i = select_nested(m, answers[:b], scores[:b])
            if m == "sc":
                w = np.full(b, 1.0 / b)
            elif m == "wbon":
                from app.methods.base import normalised

                w = normalised(np.where(np.isnan(scores[:b]), -np.inf, scores[:b]))
            else:
                best = scores[:b] == scores[:b].max()
                w = best / best.sum()
            out.append(dict(
                method=m, budget=b, prompt=pool["prompt"], seed=pool["seed"], correct=bool(ok[i]),
                answer=answers[i], text="", tokens_generated=int(sum(ntok[:b])),
                reward_calls=0 if m == "sc" else b,
                wall_time_s=float(pool["wall_time_s"]) * b / n, compile_time_s=0.0,
                total_time_s=float(pool["total_time_s"]) * b / n,
                log_evidence=float("nan"), candidates=answers[:b], weights=[float(x) for x in w],
                candidates_correct=ok[:b], unique_answers=len(set(answers[:b])),
                unique_completions=len(set(answers[:b])), nested_from=f"{POOL}@{n}",
            ))
    return out


def _row_key(r: dict) -> tuple:
    return (r["method"], int(r["budget"]), int(r["prompt"]), int(r["seed"]))


def run_experiment(cfg: ScaleConfig, *, lm=None, progress: bool = True, resume: bool = False,
                   run_fn: Callable | None = None, save: bool = True,
                   host: ExperimentHost | None = None) -> list[dict]:
    """Every (method, budget, prompt, seed) run, with a progress bar; rows are saved as they come
    (``results.json`` in ``cfg.output_dir``), and ``resume`` skips rows already saved there.
    ``host``: an :class:`ExperimentHost` of the same reward kind to share with other experiments
    (e.g. several task families in one process: each method × budget cell then compiles once)."""
    from tqdm import tqdm

    from app.tasks import get_tasks

    tasks = get_tasks(cfg.task, cfg.num_prompts)
    max_steps = cfg.max_steps or max(t.max_steps for t in tasks)  # one static shape per family
    if lm is None:
        lm = load_step_lm(cfg.temperature)
    path = os.path.join(cfg.output_dir, "results.json")
    rows: list[dict] = []
    if resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        prev = old.get("config", {})
        keys = ("task", "max_step_tokens", "temperature", "reward", "method_options", "nested")
        diff = {k: (prev.get(k), cfg.as_dict()[k]) for k in keys if prev.get(k) != cfg.as_dict()[k]}
        if prev.get("max_steps_used", max_steps) != max_steps:
            diff["max_steps"] = (prev.get("max_steps_used"), max_steps)
        if diff:
            raise ValueError(f"cannot resume {path}: its settings differ (saved, now): {diff}")
        rows = old["rows"]
    done = {_row_key(r) for r in rows}
    # prompt-major order: a run stopped early still has every (method, budget) cell on the same
    # prompts (compiled programs are cached per cell, so the order costs no extra compilation)
    pooled = cfg.pooled_methods()
    pool_budget = max((max(cfg.method_budgets(m)) for m in pooled), default=0)
    jobs = []
    for i in range(len(tasks)):
        for s in range(cfg.seeds):
            if pooled:  # one wbon run at the largest budget scores bon / wbon / sc at every budget
                jobs.append((POOL, pool_budget, i, s))
            jobs += [(m, b, i, s) for m in cfg.methods if m not in pooled for b in cfg.method_budgets(m)]
    todo = [j for j in jobs if j not in done]
    if host is None:
        host = ExperimentHost(cfg.reward)
    elif host.kind != cfg.reward:
        raise ValueError(f"the host's reward is {host.kind!r}, the experiment's {cfg.reward!r}")
    # tqdm's own ETA is dominated by the first run of each cell (it compiles): ours separates the
    # two, remaining runs × mean run time + remaining new cells × mean compile time
    bar = tqdm(todo, desc=f"scale {cfg.task}", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    last_save = time.perf_counter()
    seen_cells = {(r["method"], int(r["budget"])) for r in rows}
    run_s, compile_s, n_done = 0.0, 0.0, 0
    for k, (m, b, i, s) in enumerate(bar):
        eta = ""
        if n_done:
            cells_left = len({(mm, bb) for mm, bb, _, _ in todo[k:]} - seen_cells)
            comp = compile_s / max(len(seen_cells), 1)
            left = (len(todo) - k) * run_s / n_done + cells_left * comp
            eta = f" | eta {left / 60:.0f} min (run {run_s / n_done:.1f} s, compile {comp:.0f} s/cell)"
        bar.set_postfix_str(f"{m}@{b} prompt {i} seed {s}{eta}")
        if m == POOL:
            row = dict(run_one("wbon", tasks[i], i, s, b, lm, cfg, max_steps, run_fn, host), method=POOL)
            rows.append(row)
            for pm in pooled:
                rows += nested_rows(row, [pm], cfg.method_budgets(pm))
        else:
            row = run_one(m, tasks[i], i, s, b, lm, cfg, max_steps, run_fn, host)
            rows.append(row)
        seen_cells.add((m, b))
        run_s += float(row.get("wall_time_s", 0.0))
        compile_s += float(row.get("compile_time_s", 0.0))
        n_done += 1
        if save and time.perf_counter() - last_save > 30:
            _save_rows(path, cfg, rows, max_steps)
            last_save = time.perf_counter()
    if save:
        _save_rows(path, cfg, rows, max_steps)
    wanted = set(jobs)  # the pool rows too (their run time; report() leaves them out of the tables)
    wanted |= {(m, b, i, s) for (p, _, i, s) in jobs if p == POOL for m in pooled for b in cfg.method_budgets(m)}
    return [r for r in rows if _row_key(r) in wanted]


def _save_rows(path: str, cfg: ScaleConfig, rows: list[dict], max_steps: int) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"config": {**cfg.as_dict(), "max_steps_used": max_steps}, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------

# Fewer prompts than this: no bootstrap over prompts (the percentile bootstrap of 2-4 values is
# far too narrow), and a warning that the results describe these prompts only.
MIN_PROMPTS = 5
# Fewer runs per cell than this: a warning (a Wilson interval is then wider than ±0.2).
MIN_RUNS = 20
_Z975 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = _Z975) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927): the p with
    |k/n − p| ≤ z √(p(1−p)/n); inside [0, 1], sensible at k = 0 or n (unlike p̂ ± z·se)."""
    if n < 1:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test: P(a Binomial(wins + losses, 1/2) split at least this
    uneven); 1 when there is no discordant pair."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def _bootstrap_mean(values: np.ndarray, rng, n_boot: int) -> tuple[float, float]:
    boot = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(axis=1)
    return (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975)))


def summarize(rows: Sequence[dict], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per (method, budget): accuracy, successes / runs, the Wilson 95% interval over runs, the
    95% bootstrap interval over prompts (NaN below ``MIN_PROMPTS`` prompts), per-seed accuracies,
    mean tokens generated, reward calls and times. Keys are ``"method@budget"``."""
    rng = np.random.default_rng(seed)
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], int(r["budget"])), []).append(r)
    out = {}
    for (m, b), rs in sorted(cells.items()):
        prompts = sorted({r["prompt"] for r in rs})
        seeds = sorted({r["seed"] for r in rs})
        grid = np.full((len(prompts), len(seeds)), np.nan)
        for r in rs:
            grid[prompts.index(r["prompt"]), seeds.index(r["seed"])] = float(r["correct"])
        k, n = int(np.nansum(grid)), int(np.sum(~np.isnan(grid)))
        per_prompt = np.nanmean(grid, axis=1)
        ci_prompts = (_bootstrap_mean(per_prompt, rng, n_boot) if len(prompts) >= MIN_PROMPTS
                      else (float("nan"), float("nan")))
        out[f"{m}@{b}"] = dict(
            method=m, budget=b, accuracy=k / n, successes=k, n_runs=n, ci=wilson_interval(k, n),
            ci_prompts=ci_prompts, per_seed=np.nanmean(grid, axis=0).tolist(),
            n_prompts=len(prompts), n_seeds=len(seeds),
            tokens_generated=float(np.mean([r["tokens_generated"] for r in rs])),
            reward_calls=float(np.mean([r["reward_calls"] for r in rs])),
            wall_time_s=float(np.mean([r["wall_time_s"] for r in rs])),
            unique_completions=float(np.mean([r.get("unique_completions", np.nan) for r in rs])),
            unique_first_steps=_mean_present(rs, "unique_first_steps"),
        )
    return out


def _mean_present(rows: Sequence[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if vals else float("nan")


def argmax_rows(rows: Sequence[dict], method: str = "pf", name: str = "pf-argmax") -> list[dict]:
    """Rows of ``method`` re-judged with the highest-weight candidate as the answer (``run_method``'s
    ``selection="argmax"``; same particles, only the final choice differs), from the candidates,
    weights and per-candidate correctness every row stores."""
    out = []
    for r in rows:
        w, ok = r.get("weights") or [], r.get("candidates_correct") or []
        if r["method"] == method and w and len(w) == len(ok):
            out.append(dict(r, method=name, correct=bool(ok[int(np.argmax(w))])))
    return out


def paired_difference(rows: Sequence[dict], method: str = "pf", reference: str = "bon", *,
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """Per budget, over the (prompt, seed) pairs both methods ran (same prompt, same key): the
    mean of (success of ``method`` − success of ``reference``), the discordant pairs (``wins``:
    only ``method`` right; ``losses``: only ``reference`` right) with McNemar's exact two-sided
    p-value, and a 95% paired bootstrap interval over prompts (each prompt's mean difference;
    NaN below ``MIN_PROMPTS`` prompts). Pairing removes the prompt-difficulty variance."""
    rng = np.random.default_rng(seed)
    ok = {(r["method"], int(r["budget"]), r["prompt"], r["seed"]): float(r["correct"]) for r in rows}
    out = {}
    for b in sorted({int(r["budget"]) for r in rows}):
        diffs: dict = {}
        for (m, bb, p, s), v in ok.items():
            if m == method and bb == b and (reference, b, p, s) in ok:
                diffs.setdefault(p, []).append(v - ok[(reference, b, p, s)])
        if not diffs:
            continue
        flat = np.concatenate([np.asarray(v) for v in diffs.values()])
        wins, losses = int(np.sum(flat > 0)), int(np.sum(flat < 0))
        per_prompt = np.array([np.mean(v) for v in diffs.values()])
        ci = (_bootstrap_mean(per_prompt, rng, n_boot) if len(per_prompt) >= MIN_PROMPTS
              else (float("nan"), float("nan")))
        out[b] = dict(mean=float(np.mean(flat)), ci=ci, wins=wins, losses=losses,
                      p_value=mcnemar_exact_p(wins, losses), n_prompts=len(per_prompt),
                      n_pairs=int(flat.size))
    return out


def format_paired(diff: dict, method: str = "pf", reference: str = "bon") -> str:
    if not diff:
        return ""

    def cell(b, v):
        lo, hi = v["ci"]
        interval = (f"[{lo:+.2f}, {hi:+.2f}]" if math.isfinite(lo) and math.isfinite(hi)
                    else f"[no interval: {v['n_prompts']} prompt(s) < {MIN_PROMPTS}]")
        return (f"B={b}: {v['mean']:+.2f} {interval}, {v['wins']} better / {v['losses']} worse of "
                f"{v['n_pairs']} pairs, McNemar p = {v['p_value']:.2g}")

    cells = [cell(b, v) for b, v in diff.items()]
    return (f"paired accuracy difference {method} − {reference} (95% bootstrap CI over prompts): "
            + "; ".join(cells))


def sample_size_warnings(summary: dict) -> list[str]:
    """Why the numbers cannot support a conclusion, if they cannot: too few prompts for an
    interval about the task family, too few runs per cell for a useful proportion interval."""
    if not summary:
        return []
    msgs = []
    n_prompts = min(v["n_prompts"] for v in summary.values())
    n_runs = min(v["n_runs"] for v in summary.values())
    if n_prompts < MIN_PROMPTS:
        msgs.append(f"only {n_prompts} prompt(s) per cell (< {MIN_PROMPTS}): the intervals describe "
                    "these prompts, not the task family, and no bootstrap over prompts is given")
    if n_runs < MIN_RUNS:
        msgs.append(f"only {n_runs} run(s) per cell (< {MIN_RUNS}): accuracy intervals reach "
                    "±0.2; differences between methods are not established (use more prompts or "
                    "seeds)")
    return msgs


def pf_matching_budget(summary: dict, reference: str = "bon", method: str = "pf") -> dict:
    """Smallest ``method`` budget whose accuracy reaches ``reference`` at its largest budget."""
    ref = [v for v in summary.values() if v["method"] == reference]
    own = sorted((v for v in summary.values() if v["method"] == method), key=lambda v: v["budget"])
    if not ref or not own:
        return dict(reference=reference, method=method, available=False)
    top = max(ref, key=lambda v: v["budget"])
    match = next((v for v in own if v["accuracy"] >= top["accuracy"] - 1e-12), None)
    res = dict(reference=reference, method=method, available=True, reference_budget=top["budget"],
               reference_accuracy=top["accuracy"], matching_budget=None, ratio=None)
    if match is not None:
        res.update(matching_budget=match["budget"], matching_accuracy=match["accuracy"],
                   ratio=top["budget"] / match["budget"])
    return res


def matching_line(match: dict) -> str:
    if not match.get("available"):
        return f"{match['method']} vs {match['reference']}: not both run."
    head = (f"{match['reference']}@{match['reference_budget']} accuracy "
            f"{match['reference_accuracy']:.3f}; ")
    if match["matching_budget"] is None:
        return head + f"no {match['method']} budget run reaches it."
    return head + (f"smallest {match['method']} budget reaching it: {match['matching_budget']} "
                   f"(accuracy {match['matching_accuracy']:.3f}; budget ratio "
                   f"{match['ratio']:.3g}x).")


def format_table(summary: dict, methods: Sequence[str], budgets: Sequence[int]) -> str:
    """Markdown table: rows = methods, columns = budgets, cells ``acc [Wilson 95% CI] k/n``."""
    head = "| method | " + " | ".join(f"B={b}" for b in budgets) + " |"
    sep = "|---|" + "---|" * len(budgets)
    lines = [head, sep]
    for m in methods:
        cells = []
        for b in budgets:
            v = summary.get(f"{m}@{b}")
            if v is None:
                cells.append("–")
                continue
            lo, hi = v["ci"]
            cells.append(f"{v['accuracy']:.2f} [{lo:.2f}, {hi:.2f}] {v['successes']}/{v['n_runs']}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_compute_table(summary: dict, methods: Sequence[str], budgets: Sequence[int]) -> str:
    """Markdown table of mean tokens generated / reward calls / distinct final candidates per run
    (for pf and rm: distinct completions among the particles, the collapse diagnostic, then the
    distinct first steps among them, ``(a)``: the surviving step-1 ancestors; for the others:
    distinct answers)."""
    head = "| method | " + " | ".join(f"B={b}" for b in budgets) + " |"
    lines = [head, "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            v = summary.get(f"{m}@{b}")
            if v is None:
                cells.append("–")
                continue
            u = v.get("unique_completions", float("nan"))
            a = v.get("unique_first_steps", float("nan"))
            cells.append(f"{v['tokens_generated']:.0f} / {v['reward_calls']:.0f}"
                         + ("" if not np.isfinite(u) else f" / {u:.1f}")
                         + ("" if not np.isfinite(a) else f" ({a:.1f})"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scaling(summary: dict, methods: Sequence[str], budgets: Sequence[int], path: str,
                 title: str = "", x_axis: str = "budget") -> str:
    """Accuracy vs budget (``x_axis="budget"``) or vs mean tokens generated per run
    (``"tokens"``: equal-compute comparison), log2 x-axis, one line per method, error bars = the
    bootstrap interval over prompts (the Wilson interval over runs below 5 prompts)."""
    if x_axis not in ("budget", "tokens"):
        raise ValueError(f"x_axis must be 'budget' or 'tokens', got {x_axis!r}")
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, m in enumerate(methods):
        vs = [summary[f"{m}@{b}"] for b in budgets if f"{m}@{b}" in summary]
        if not vs:
            continue
        # a small horizontal offset per method keeps overlapping error bars readable
        key = "budget" if x_axis == "budget" else "tokens_generated"
        x = np.array([v[key] for v in vs], float) * 2.0 ** (0.04 * (k - (len(methods) - 1) / 2))
        y = np.array([v["accuracy"] for v in vs])
        ci = [v["ci_prompts"] if np.all(np.isfinite(v["ci_prompts"])) else v["ci"] for v in vs]
        lo = np.maximum(y - np.array([c[0] for c in ci]), 0.0)
        hi = np.maximum(np.array([c[1] for c in ci]) - y, 0.0)
        style = (dict(lw=2.2, marker="o") if m == "pf" else dict(lw=1.6, marker="s", ls="--")
                 if m == "pf-argmax" else dict(lw=1.3, marker="."))
        ax.errorbar(x, y, yerr=[lo, hi], capsize=2, label=m, **style)
    ax.set_xscale("log", base=2)
    if x_axis == "budget":
        ax.set_xticks(list(budgets))
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_xlabel("budget (particles / samples)")
    else:
        ax.set_xlabel("tokens generated per run (mean)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COMPUTE_HEADING = ("mean tokens generated / reward calls / distinct final candidates (pf, rm: distinct "
                   "first steps, the surviving step-1 ancestors) per run")
TABLE_HEADING = ("Accuracy: mean [95% Wilson interval over the runs] successes/runs "
                 "(runs = prompts × seeds)")


def timing_line(rows: Sequence[dict]) -> str:
    """Compile and run time apart: the summed ``compile_time_s`` of the runs (the first run of each
    method × budget cell compiles its programs) and the summed run time."""
    comp = sum(float(r.get("compile_time_s", 0.0)) for r in rows)
    run = sum(float(r.get("wall_time_s", 0.0)) for r in rows)
    cells = len({(r["method"], int(r["budget"])) for r in rows})
    return (f"time: {comp:.0f} s compiling ({cells} method × budget cells) + {run:.0f} s running "
            f"{len(rows)} runs ({run / max(len(rows), 1):.1f} s per run)")


def report(cfg: ScaleConfig, rows: Sequence[dict], *, write: bool = True, label: str | None = None) -> dict:
    """Summary, markdown tables, the PF-vs-BoN line, and (``write``) table.md + the PNG.
    ``label``: what the plots' title calls the rows (default: the task family)."""
    # the runs themselves (pf-argmax re-judges pf's runs; nested rows are scored on a pool's samples)
    timing = timing_line([r for r in rows if not r.get("nested_from")])
    rows = [r for r in rows if r["method"] != POOL]
    rows = rows + argmax_rows(rows)
    summary = summarize(rows)
    budgets = sorted({int(r["budget"]) for r in rows})
    methods = [m for m in list(cfg.methods) + ["pf-argmax"] if any(r["method"] == m for r in rows)]
    table = format_table(summary, methods, budgets)
    compute = format_compute_table(summary, methods, budgets)
    match = pf_matching_budget(summary)
    line = matching_line(match)
    paired = paired_difference(rows) if {"pf", "bon"} <= set(methods) else {}
    paired_line = format_paired(paired)
    if {"pf-argmax", "bon"} <= set(methods):
        match2 = pf_matching_budget(summary, method="pf-argmax")
        line += "\n" + matching_line(match2)
        paired_line += "\n" + format_paired(paired_difference(rows, "pf-argmax"), "pf-argmax")
    if {"rm", "bon"} <= set(methods):
        paired_line += "\n" + format_paired(paired_difference(rows, "rm"), "rm")
    if {"rm", "pf"} <= set(methods):
        paired_line += "\n" + format_paired(paired_difference(rows, "rm", "pf"), "rm", "pf")
    notes = sample_size_warnings(summary)
    for msg in notes:
        warnings.warn(f"ppl scale: {msg}", UserWarning, stacklevel=2)
    out = dict(summary=summary, table=table, compute_table=compute, match=match, match_line=line,
               paired=paired, paired_line=paired_line, warnings=notes, timing_line=timing)
    if write:
        os.makedirs(cfg.output_dir, exist_ok=True)
        n_prompts = len({r["prompt"] for r in rows})
        n_seeds = len({r["seed"] for r in rows})
        title = f"{label or cfg.task}: {n_prompts} prompts × {n_seeds} seeds (SmolLM2-135M), reward {cfg.reward}"
        png = plot_scaling(summary, methods, budgets,
                           os.path.join(cfg.output_dir, "accuracy_vs_budget.png"), title=title)
        plot_scaling(summary, methods, budgets, os.path.join(cfg.output_dir, "accuracy_vs_tokens.png"),
                     title=title, x_axis="tokens")
        with open(os.path.join(cfg.output_dir, "table.md"), "w") as f:
            warn_md = "".join(f"\n**Warning:** {m}.\n" for m in notes)
            f.write(f"{TABLE_HEADING}\n\n{table}\n{warn_md}\n"
                    f"{COMPUTE_HEADING[0].upper() + COMPUTE_HEADING[1:]}\n\n{compute}\n\n{line}\n\n"
                    f"{paired_line}\n\n{out['timing_line']}\n")
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(dict(config=cfg.as_dict(), summary=summary, match=match,
                           paired={str(k): v for k, v in paired.items()}), f, indent=1)
        out["png"] = png
    return out


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------



# Measured on a 2-core CPU (AMD EPYC, SmolLM2-135M, letter_words): 3-5 s per run at budgets 4-8,
# roughly proportional to the budget above that, plus about 15 s compiling per method × budget cell.
_SECONDS_PER_RUN_AT_8 = 4.5
_COMPILE_SECONDS_PER_CELL = 15.0


def estimate_seconds(num_methods: int, budgets: Sequence[int], num_prompts: int, seeds: int) -> float:
    """Rough wall time of an experiment on a 2-core CPU (see the constants above)."""
    per_prompt_seed = sum(_SECONDS_PER_RUN_AT_8 * max(b, 4) / 8 for b in budgets) * num_methods
    return per_prompt_seed * num_prompts * seeds + _COMPILE_SECONDS_PER_CELL * num_methods * len(budgets)


def _help_epilog() -> str:
    from app.tasks import FAMILIES, get_tasks

    n = len(get_tasks(sorted(FAMILIES)[0], None))
    m = len(method_names())
    budgets = (1, 2, 4, 8, 16, 32)
    runs = m * len(budgets) * n * 2
    hours = estimate_seconds(m, budgets, n, 2) / 3600
    small = estimate_seconds(2, (1, 4), 2, 2) / 60
    return (f"Run time: the defaults make {m} methods × {len(budgets)} budgets × {n} prompts × 2 seeds = "
            f"{runs} runs, about {hours:.0f} hours on a 2-core CPU (about {_SECONDS_PER_RUN_AT_8:g} s per "
            f"run at budget 8, growing with the budget, plus ≈ {_COMPILE_SECONDS_PER_CELL:g} s compiling "
            f"per method × budget). Try first: --methods pf,bon --budgets 1,4 --num-prompts 2 "
            f"(about {small:.0f} min). The command prints its own estimate before it starts.")


def add_scale_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``scale`` sub-command to an ``argparse`` sub-parser set; it dispatches to
    :func:`run_scale` (``args.func``)."""
    p = subparsers.add_parser(
        "scale", help="accuracy vs budget of inference-time scaling methods on a task family",
        description=__doc__.split("\n\n")[0], epilog=_help_epilog())
    _add_arguments(p)
    p.set_defaults(func=run_scale)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from app.tasks import FAMILIES

    p.add_argument("--task", required=True, metavar="FAMILY[,FAMILY...]",
                   help="task family, among " + ", ".join(sorted(FAMILIES)) + "; several, comma-separated: each "
                        "in its own folder under --output-dir (one process: every method × budget compiles "
                        "once), plus the families pooled (prompts of every family) in --output-dir itself")
    names = method_names()
    p.add_argument("--methods", default=",".join(names),
                   help="comma-separated, among " + ",".join(names) + " (the registry app.methods.METHODS)")
    p.add_argument("--budgets", default="1,2,4,8,16,32", help="comma-separated budgets")
    p.add_argument("--seeds", type=int, default=2, help="independent seeds per prompt")
    p.add_argument("--num-prompts", type=int, default=None, help="first prompts of the family (default all)")
    p.add_argument("--output-dir", default="outputs/scale", help="results.json, table.md, PNG")
    p.add_argument("--max-steps", type=int, default=None,
                   help="step cap (default: the family's longest list + 1)")
    p.add_argument("--max-step-tokens", type=int, default=8, help="token cap of one step (a line)")
    p.add_argument("--temperature", type=float, default=0.7, help="LM sampling temperature")
    p.add_argument("--reward", default="step", choices=REWARDS,
                   help="step: the task's programmatic step verifier (process reward); final: its outcome "
                        "only; imperfect rewards (the program stays the judge of the answer): judge (SmolLM2 "
                        "asked Yes/No), self-certainty (mean token log-probability), prm (learned head on "
                        "SmolLM2's hidden states), none")
    p.add_argument("--power", type=float, default=None,
                   help="α of the power target p^α R^β (pf, rm: weights p^α/q per step; use "
                        "--temperature 1/α for the proposal)")
    p.add_argument("--rejuvenation", type=int, default=None,
                   help="Metropolis-Hastings re-generations of the last step per move (rm; default 1)")
    p.add_argument("--reward-temperature", type=float, default=None,
                   help="τ of the potential, G_t = (r_t / r_{t-1})^(1/τ) (default 1; < 1 sharpens)")
    p.add_argument("--selection", choices=("vote", "argmax", "sample"), default=None,
                   help="final answer of pf / pg / ptpg (default: weighted vote)")
    p.add_argument("--beam-width", type=int, default=None, help="children per beam (beam, dvts)")
    p.add_argument("--pg-iterations", type=int, default=None, help="sweeps of pg / ptpg")
    p.add_argument("--num-chains", type=int, default=None, help="tempered chains of ptpg (default 4)")
    p.add_argument("--max-budget", default=None, metavar="M=B,...",
                   help="largest budget of some methods, e.g. pg=16,ptpg=4 (the costly ones; default: "
                        "every budget for every method)")
    p.add_argument("--nested", action="store_true",
                   help="bon, wbon and sc: one pool of samples per prompt and seed at the largest budget, "
                        "each smaller budget B scored on its first B samples (the same law as separate "
                        "runs, one run instead of one per method and budget)")
    p.add_argument("--resume", action="store_true", help="skip runs already in results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_scale(args: argparse.Namespace) -> int:
    """Run the experiment described by parsed arguments; print the table and the PF-vs-BoN line."""
    opts = {}
    if getattr(args, "beam_width", None) is not None:
        opts["beam_width"] = args.beam_width
    if getattr(args, "pg_iterations", None) is not None:
        opts["pg_iterations"] = args.pg_iterations
    if getattr(args, "num_chains", None) is not None:
        opts["num_chains"] = args.num_chains
    if getattr(args, "reward_temperature", None) is not None:
        if not args.reward_temperature > 0:
            print("error: --reward-temperature must be > 0", file=sys.stderr)
            return 2
        opts["temperature"] = args.reward_temperature
    if getattr(args, "selection", None) is not None:
        opts["selection"] = args.selection
    if getattr(args, "power", None) is not None:
        if not (math.isfinite(args.power) and args.power > 0):
            print("error: --power must be a finite number > 0", file=sys.stderr)
            return 2
        opts["power"] = args.power
    if getattr(args, "rejuvenation", None) is not None:
        if args.rejuvenation < 1:
            print("error: --rejuvenation must be >= 1", file=sys.stderr)
            return 2
        opts["rejuvenation"] = args.rejuvenation
    try:
        caps = {}
        for item in str(getattr(args, "max_budget", None) or "").split(","):
            if item.strip():
                name, sep, val = item.partition("=")
                if not sep:
                    raise ValueError(f"--max-budget takes METHOD=BUDGET items, got {item!r}")
                caps[name.strip()] = _int_list(val, f"--max-budget {name.strip()}")[0]
        families = [t.strip() for t in str(args.task).split(",") if t.strip()]
        if not families or len(set(families)) != len(families):
            raise ValueError(f"--task takes distinct family names, got {args.task!r}")
        several = len(families) > 1
        cfgs = [ScaleConfig(
            task=fam, methods=str(args.methods).split(","),
            budgets=_int_list(args.budgets, "--budgets"), seeds=args.seeds,
            num_prompts=args.num_prompts, max_steps=args.max_steps,
            max_step_tokens=args.max_step_tokens, temperature=args.temperature,
            reward=args.reward, output_dir=os.path.join(args.output_dir, fam) if several else args.output_dir,
            method_options=opts, max_budgets=caps, nested=bool(getattr(args, "nested", False)),
        ) for fam in families]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from app.tasks import get_tasks

    cfg = cfgs[0]
    n_prompts = sum(len(get_tasks(c.task, c.num_prompts)) for c in cfgs)
    pooled = cfg.pooled_methods()
    own = [m for m in cfg.methods if m not in pooled]
    cells = [(m, cfg.method_budgets(m)) for m in own]
    if pooled:
        cells.append((POOL, [max(max(cfg.method_budgets(m)) for m in pooled)]))
    n_runs = sum(len(bs) for _, bs in cells) * n_prompts * cfg.seeds
    est = sum(estimate_seconds(1, bs, n_prompts, cfg.seeds) for _, bs in cells)
    what = (f"{len(cfg.methods)} methods × {len(cfg.budgets)} budgets" if not (pooled or cfg.max_budgets)
            else f"{sum(len(bs) for _, bs in cells)} method × budget cells"
            + (f", {'/'.join(pooled)} nested in one pool" if pooled else ""))
    print(f"{n_runs} runs ({what} × {n_prompts} prompts{' of ' + str(len(cfgs)) + ' families' if several else ''}"
          f" × {cfg.seeds} seeds); rough estimate on a 2-core CPU: {est / 60:.0f} min", flush=True)
    t0 = time.perf_counter()
    host = ExperimentHost(cfg.reward)  # shared: each method × budget cell compiles once
    lm = load_step_lm(cfg.temperature)
    all_rows = []
    for c in cfgs:
        rows = run_experiment(c, lm=lm, host=host, progress=not args.no_progress, resume=args.resume)
        _print_report(c, rows)
        all_rows += [dict(r, prompt=f"{c.task}:{r['prompt']}") for r in rows]
    if several:
        pooled_cfg = ScaleConfig(
            task=cfg.task, methods=cfg.methods, budgets=cfg.budgets, seeds=cfg.seeds,
            reward=cfg.reward, output_dir=args.output_dir, max_budgets=cfg.max_budgets, nested=cfg.nested)
        _print_report(pooled_cfg, all_rows, label=" + ".join(families))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


def _print_report(cfg: ScaleConfig, rows: list[dict], label: str | None = None) -> None:
    with warnings.catch_warnings():  # printed below, once
        warnings.simplefilter("ignore", UserWarning)
        out = report(cfg, rows, label=label)
    print(f"\n{label or cfg.task}: {TABLE_HEADING}\n")
    print(out["table"])
    for msg in out["warnings"]:
        print(f"warning: {msg}", file=sys.stderr)
    print(f"\n{COMPUTE_HEADING}\n")
    print(out["compute_table"])
    print("\n" + out["match_line"])
    if out["paired_line"]:
        print(out["paired_line"])
    print(out["timing_line"])
    print(f"\nwrote {out['png']}, {os.path.join(cfg.output_dir, 'table.md')}"
          + ("" if label else f", {os.path.join(cfg.output_dir, 'results.json')}"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.scale", description=__doc__.split("\n\n")[0],
                                epilog=_help_epilog())
    _add_arguments(p)
    return run_scale(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
