r"""Train the learned process reward model (:class:`models.llm_fk.prm.HiddenStatePRM`) for SmolLM2.

``python -m app.train_prm --out models/llm_fk/weights/prm_smollm2.npz`` (about 10 minutes on 2 CPU cores).

Data. SmolLM2-135M-Instruct writes partial answers exactly as in the scaling experiment
(:func:`app.scale.load_step_lm`: temperature 0.7, steps = lines of at most 8 tokens, at most 4 steps, the
prompts of :mod:`app.tasks` rendered by ``task.prompt_ids``): ``--samples`` completions per prompt, and the
prefix after every step is one example. Its label is the task's program on that prefix:
\(y = 1\) iff ``task.step_score(text, finished) == 1`` (no constraint violated yet; a finished text:
correct), else 0. Its feature is the generator's final-normed hidden state at the last token of the prefix,
computed by :func:`models.llm_fk.prm.prefix_hidden_states` on the decoding state — the code path of the
reward itself, so training and scoring features are the same.

Prompts. Training prompts come from :func:`app.tasks.train_tasks` (the four families on other letters,
bounds, categories and words, disjoint from the evaluation prompts), split by *prompt* into a fitting set
and a validation set (every fourth prompt of each family). The held-out test set is made of prefixes
generated for the first ``--test-prompts`` evaluation prompts of each family (:data:`app.tasks.FAMILIES`),
never used for fitting or for choosing anything.

Fit. Features are standardised with the fitting set's mean and standard deviation; an L2-regularised
logistic regression (scikit-learn, lbfgs) is fitted for each inverse regularisation \(C\) of a grid, and
the \(C\) with the smallest validation log-loss is kept (the shipped head is the one fitted on the fitting
set with that \(C\)). Accuracy (threshold 1/2), ROC AUC and log-loss are reported on the three sets,
against the constant predictor (the fitting set's label frequency: AUC 1/2).

Output: an ``.npz`` (no pickle) with ``mean``, ``scale``, ``w``, ``b`` (float32) and ``metadata`` (a
JSON string: settings, sizes, the C grid and every metric). ``--data PATH`` caches the generated features
and labels (rerunning with the same path refits without generating).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

__all__ = ["generate_examples", "fit_head", "metrics", "main"]

FAMILY_NAMES = ("letter_words", "number_list", "closed_set", "acrostic")
MAX_STEPS = 4  # as app.scale: the largest task.max_steps of every family (n + 1 with n ≤ 3)
MAX_STEP_TOKENS = 8  # app.scale's default
TEMPERATURE = 0.7
PROMPT_WIDTH = 64  # the task prompts have 36-61 tokens
C_GRID = tuple(float(c) for c in np.logspace(-4, 1, 11))


def generate_examples(lm, tasks, groups, key, *, samples: int, batch_prompts: int,
                      max_steps: int = MAX_STEPS, max_step_tokens: int = MAX_STEP_TOKENS,
                      progress: bool = True) -> dict:
    """Partial answers of ``samples`` completions per task, one example per (completion, step).

    Returns ``{"x": [M, H] float32, "y": [M] int8, "group": [M] (the prompt's entry of groups),
    "finished": [M] bool, "step": [M], "score": [M] (task.step_score)}``.
    """
    import jax

    from models.llm import prefill
    from models.llm_fk.prm import prefix_hidden_states

    model = lm.model
    step_fn = jax.jit(lambda k, s: lm.generate_step(k, s, max_step_tokens))
    feat_fn = jax.jit(lambda s: prefix_hidden_states(model, s))
    out = {k: [] for k in ("x", "y", "group", "finished", "step", "score")}
    t0 = time.perf_counter()
    for b0 in range(0, len(tasks), batch_prompts):
        batch = list(range(b0, min(b0 + batch_prompts, len(tasks))))
        prompts = [tasks[i].prompt_ids(lm.tokenizer) for i in batch]
        owners = [i for i in batch for _ in range(samples)]
        n = len(owners)
        # one padded width and cache length for every batch: one compiled program
        tokens = np.zeros((n, PROMPT_WIDTH), np.int32)
        lengths = np.zeros(n, np.int32)
        for r, i in enumerate(owners):
            ids = prompts[batch.index(i)]
            if len(ids) > PROMPT_WIDTH:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, more than {PROMPT_WIDTH}")
            tokens[r, :len(ids)] = ids
            lengths[r] = len(ids)
        state = prefill(model, tokens, lengths, PROMPT_WIDTH + max_steps * max_step_tokens)
        done = np.zeros(n, bool)
        num_steps = np.zeros(n, np.int32)
        for t in range(max_steps):
            key, sub = jax.random.split(key)
            state, _ = step_fn(sub, state)
            active = ~done
            num_steps += active
            finished = active & (np.asarray(state.done) | (num_steps >= max_steps))
            done = done | finished
            state = state._replace(done=state.done | jax.numpy.asarray(done))
            x = np.asarray(feat_fn(state))
            toks, p0, ln = np.asarray(state.tokens), np.asarray(state.prompt_lengths), np.asarray(state.lengths)
            for r in np.flatnonzero(active):
                task = tasks[owners[r]]
                text = lm.decode(toks[r, p0[r]:ln[r]].tolist())
                score = float(task.step_score(text, bool(finished[r])))
                out["x"].append(x[r])
                out["y"].append(int(score == 1.0))
                out["group"].append(groups[owners[r]])
                out["finished"].append(bool(finished[r]))
                out["step"].append(t + 1)
                out["score"].append(score)
            if done.all():
                break
        if progress:
            print(f"  prompts {b0 + len(batch)}/{len(tasks)}: {len(out['y'])} prefixes "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return {"x": np.asarray(out["x"], np.float32).reshape(-1, model.config.hidden_size),
            "y": np.asarray(out["y"], np.int8), "group": np.asarray(out["group"]),
            "finished": np.asarray(out["finished"], bool), "step": np.asarray(out["step"], np.int32),
            "score": np.asarray(out["score"], np.float32)}


def metrics(y, p, constant: float) -> dict:
    """Accuracy (threshold 1/2), ROC AUC and log-loss of probabilities ``p``, and of the constant
    predictor ``constant`` (AUC 1/2)."""
    from sklearn.metrics import log_loss, roc_auc_score

    y = np.asarray(y, int)
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    c = np.full_like(p, np.clip(constant, 1e-7, 1 - 1e-7))
    both = len(np.unique(y)) == 2
    return {
        "n": int(y.size), "positive_rate": float(y.mean()),
        "accuracy": float(np.mean((p > 0.5) == y)),
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "baseline_accuracy": float(np.mean((c > 0.5) == y)),
        "baseline_log_loss": float(log_loss(y, c, labels=[0, 1])),
    }


def fit_head(x_fit, y_fit, x_val, y_val, c_grid=C_GRID):
    """Standardise, fit an L2 logistic regression per C, keep the C of smallest validation
    log-loss. Returns ``(mean, scale, w, b, chosen_C, table)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    x_fit = np.asarray(x_fit, np.float64)
    mean = x_fit.mean(axis=0)
    scale = x_fit.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    z_fit = (x_fit - mean) / scale
    z_val = (np.asarray(x_val, np.float64) - mean) / scale
    table, best = [], None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=5000, tol=1e-6)
        clf.fit(z_fit, y_fit)
        val = float(log_loss(y_val, clf.predict_proba(z_val)[:, 1], labels=[0, 1]))
        table.append({"C": c, "val_log_loss": val})
        if best is None or val < best[0]:
            best = (val, c, clf)
    _, c, clf = best
    return mean, scale, clf.coef_[0], float(clf.intercept_[0]), c, table


def _datasets(lm, args):
    import jax

    from app.tasks import get_tasks, train_tasks

    train, groups = [], []
    for f in FAMILY_NAMES:
        for i, t in enumerate(train_tasks(f)):
            train.append(t)
            groups.append(f"train/{f}/{i}")
    test, tgroups = [], []
    for f in FAMILY_NAMES:
        for i, t in enumerate(get_tasks(f, args.test_prompts)):
            test.append(t)
            tgroups.append(f"test/{f}/{i}")
    key = jax.random.key(args.seed)
    k_train, k_test = jax.random.split(key)
    print(f"generating: {len(train)} training prompts x {args.samples} samples", file=sys.stderr)
    tr = generate_examples(lm, train, groups, k_train, samples=args.samples, batch_prompts=args.batch_prompts)
    print(f"generating: {len(test)} evaluation prompts x {args.samples} samples (held out)", file=sys.stderr)
    te = generate_examples(lm, test, tgroups, k_test, samples=args.samples, batch_prompts=args.batch_prompts)
    return tr, te


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m app.train_prm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/llm_fk/weights/prm_smollm2.npz")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=16, help="completions per prompt")
    ap.add_argument("--test-prompts", type=int, default=5, help="evaluation prompts per family (held out)")
    ap.add_argument("--batch-prompts", type=int, default=10, help="prompts per generation batch")
    ap.add_argument("--data", default=None, help="cache of the generated features and labels (.npz)")
    args = ap.parse_args(argv)
    if args.samples < 1 or args.test_prompts < 1 or args.batch_prompts < 1:
        ap.error("--samples, --test-prompts and --batch-prompts must be positive")

    t0 = time.perf_counter()
    if args.data and os.path.exists(args.data):
        with np.load(args.data, allow_pickle=False) as f:
            tr = {k[3:]: f[k] for k in f.files if k.startswith("tr_")}
            te = {k[3:]: f[k] for k in f.files if k.startswith("te_")}
            gen_s = float(f["generation_seconds"]) if "generation_seconds" in f.files else float("nan")
        print(f"loaded the generated data from {args.data}", file=sys.stderr)
    else:
        from app.scale import load_step_lm

        lm = load_step_lm(TEMPERATURE)
        tr, te = _datasets(lm, args)
        gen_s = time.perf_counter() - t0
        if args.data:
            np.savez(args.data, **{f"tr_{k}": v for k, v in tr.items()}, **{f"te_{k}": v for k, v in te.items()},
                     generation_seconds=gen_s)

    # validation: every fourth training prompt of each family (a split by prompt)
    prompt_index = np.asarray([int(g.rsplit("/", 1)[1]) for g in tr["group"]])
    val = prompt_index % 4 == 3
    fit = ~val
    mean, scale, w, b, c, table = fit_head(tr["x"][fit], tr["y"][fit], tr["x"][val], tr["y"][val])

    def prob(x):
        z = ((np.asarray(x, np.float64) - mean) / scale) @ w + b
        return 1.0 / (1.0 + np.exp(-z))

    const = float(tr["y"][fit].mean())
    report = {
        "train": metrics(tr["y"][fit], prob(tr["x"][fit]), const),
        "validation": metrics(tr["y"][val], prob(tr["x"][val]), const),
        "test": metrics(te["y"], prob(te["x"]), const),
    }
    fams = np.asarray([g.split("/")[1] for g in te["group"]])
    report["test_by_family"] = {f: metrics(te["y"][fams == f], prob(te["x"][fams == f]), const)
                                for f in FAMILY_NAMES}
    meta = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "feature": "final-normed hidden state at the last token of the prefix (models.llm_fk.prm."
                   "prefix_hidden_states)",
        "label": "task.step_score(text, finished) == 1",
        "generation": {"temperature": TEMPERATURE, "delimiter": "\\n", "max_steps": MAX_STEPS,
                       "max_step_tokens": MAX_STEP_TOKENS, "samples_per_prompt": args.samples,
                       "seed": args.seed},
        "prompts": {"train": int(len(np.unique(tr["group"][fit]))), "validation": int(len(np.unique(tr["group"][val]))),
                    "test": int(len(np.unique(te["group"]))),
                    "train_source": "app.tasks.train_tasks (20 per family; validation: every 4th)",
                    "test_source": f"app.tasks.get_tasks(family, {args.test_prompts}) (evaluation prompts)"},
        "regularisation": {"chosen_C": c, "grid": table, "criterion": "validation log-loss"},
        "constant_baseline": const,
        "metrics": report,
        "generation_seconds": round(gen_s, 1),
        "command": (f"python -m app.train_prm --out {args.out} --seed {args.seed} --samples {args.samples} "
                    f"--test-prompts {args.test_prompts} --batch-prompts {args.batch_prompts}"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, mean=mean.astype(np.float32), scale=scale.astype(np.float32), w=w.astype(np.float32),
             b=np.float32(b), metadata=np.asarray(json.dumps(meta)))
    print(f"chosen C = {c:.3g} (validation log-loss); constant baseline p = {const:.3f}")
    print(f"{'set':<12}{'prefixes':>9}{'pos.':>7}{'acc':>7}{'base acc':>9}{'AUC':>7}{'logloss':>9}{'base ll':>9}")
    for name in ("train", "validation", "test"):
        m = report[name]
        print(f"{name:<12}{m['n']:>9}{m['positive_rate']:>7.3f}{m['accuracy']:>7.3f}{m['baseline_accuracy']:>9.3f}"
              f"{m['auc']:>7.3f}{m['log_loss']:>9.3f}{m['baseline_log_loss']:>9.3f}")
    for f, m in report["test_by_family"].items():
        print(f"  test {f:<14}{m['n']:>5}{m['positive_rate']:>7.3f}{m['accuracy']:>7.3f}{m['baseline_accuracy']:>9.3f}"
              f"{m['auc']:>7.3f}")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    return meta


if __name__ == "__main__":
    main()
