"""`ppl generate`: streams a completion (embedded SmolLM2 by default; here a tiny GGUF, to keep
the test fast — the SmolLM2 path is exercised by the parity tests and the tutorial notebook)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax

from llm_helpers import _TMP, write_gguf

from app import cli
from models.llm import Sampling, generate_text, load_gguf


def _tiny_gguf():
    path = os.path.join(_TMP, "cli-tiny.gguf")
    if not os.path.exists(path):
        write_gguf(path)
    return path


def test_generate_streams_the_greedy_completion(capsys):
    path = _tiny_gguf()
    argv = ["generate", "hello world", "--gguf", path, "--raw", "--temperature", "0", "--max-new-tokens", "12",
            "--no-cache"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out
    # The same text as the batched while_loop decoder gives for that prompt.
    model, tok, _ = load_gguf(path)
    ref = generate_text(model, tok, ["hello world"], jax.random.key(0), max_new_tokens=12, sampling=Sampling(0.0),
                        chat=False)
    assert text == ref.texts[0] + "\n"
    assert len(text.strip()) > 0
    # the timing line on stderr: tokens, time to the first token, tokens/s
    err = captured.err
    assert "tokens; first token after" in err and "tokens/s]" in err


def test_generate_streams_piece_by_piece():
    from models.llm.generate import stream_text

    model, tok, _ = load_gguf(_tiny_gguf())
    pieces = list(stream_text(model, tok, "abc", jax.random.key(1), max_new_tokens=12, sampling=Sampling(1.0),
                              chat=False))
    assert len(pieces) >= 2 and all(pieces)


def test_generate_rejects_bad_options(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda args: (_ for _ in ()).throw(AssertionError("not reached")))
    assert cli.main(["generate", "hi", "--temperature", "-1", "--no-cache"]) == 2
    assert "temperature must be" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--top-p", "0", "--no-cache"]) == 2
    monkeypatch.undo()
    assert cli.main(["generate", "hi", "--gguf", os.path.join(_TMP, "missing.gguf"), "--no-cache"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    # steering options are checked before any model is loaded
    monkeypatch.setattr(cli, "load_model", lambda args: (_ for _ in ()).throw(AssertionError("not reached")))
    assert cli.main(["generate", "hi", "--particles", "0"]) == 2
    assert "--particles must be >= 1" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--particles", "4", "--constraint", "sonnet"]) == 2
    assert "unknown --constraint 'sonnet'" in capsys.readouterr().err


def test_cli_help_lists_generate():
    r = subprocess.run([sys.executable, "-m", "app.cli", "generate", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"):
        assert opt in r.stdout


def test_cli_help_lists_scale():
    """`ppl scale` is registered in the console script with the issue's options."""
    r = subprocess.run([sys.executable, "-m", "app.cli", "scale", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--task", "--methods", "--budgets", "--seeds", "--output-dir"):
        assert opt in r.stdout


def test_subcommands_and_method_choices_come_from_immutable_registries():
    import types

    from app.methods import METHODS

    assert isinstance(cli.SUBCOMMANDS, types.MappingProxyType) and set(cli.SUBCOMMANDS) == {"generate", "scale", "diffuse"}
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    help_text = sub.choices["scale"].format_help()
    assert all(name in help_text for name in METHODS)
