"""The layers import only downwards: app → models → samplers → ppl (docs/concepts.md, "Layers").

Every ``.py`` file of the four packages is parsed with :mod:`ast` (no import is executed, so a
violation inside a function body or an ``if TYPE_CHECKING:`` block is found too), and each import
(absolute, relative, or ``importlib.import_module("...")`` with a literal name) is resolved to the
top-level package it reaches. A package may import itself and the packages below it, never one
above it.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bottom to top; each layer may import itself and the layers before it
LAYERS = ("ppl", "samplers", "models", "app")
FORBIDDEN = {layer: set(LAYERS[i + 1:]) for i, layer in enumerate(LAYERS)}


def _package_of(relpath: str) -> list[str]:
    """Dotted package containing the module at ``relpath`` (e.g. models/llm/x.py -> [models, llm])."""
    parts = relpath[:-len(".py")].split(os.sep)
    return parts[:-1]  # a module's package; for __init__.py the package itself


def imported_modules(source: str, relpath: str) -> list[tuple[int, str]]:
    """(line, absolute dotted module name) of every import in ``source``, the file at ``relpath``."""
    package = _package_of(relpath)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=relpath)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                if node.level - 1 > len(package):
                    raise ValueError(f"{relpath}:{node.lineno}: relative import above the top level")
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if node.module is None:  # `from . import x`: x is a submodule (or a name) of base
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str, relpath: str) -> list[str]:
    """Imports in ``source`` (the file at ``relpath``) that point up or sideways out of its layer."""
    layer = relpath.split(os.sep)[0]
    bad = []
    for line, module in imported_modules(source, relpath):
        top = module.split(".")[0]
        if top in FORBIDDEN[layer]:
            bad.append(f"{relpath}:{line}: {layer} imports {module} (layer {top} is above {layer})")
    return bad


def layer_files() -> list[str]:
    files = []
    for layer in LAYERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, layer)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            files += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in sorted(filenames) if f.endswith(".py")]
    return files


def test_every_layer_is_a_package():
    for layer in LAYERS:
        assert os.path.isfile(os.path.join(ROOT, layer, "__init__.py")), layer
    files = layer_files()
    for layer in LAYERS:  # the scan below is not vacuous
        assert any(f.startswith(layer + os.sep) and not f.endswith("__init__.py") for f in files), layer


def test_imports_point_down_only():
    bad = []
    for relpath in layer_files():
        with open(os.path.join(ROOT, relpath), encoding="utf-8") as fh:
            bad += violations(fh.read(), relpath)
    assert not bad, "imports against the layering app → models → samplers → ppl:\n" + "\n".join(bad)


@pytest.mark.parametrize("relpath, source", [
    (os.path.join("ppl", "x.py"), "import samplers\n"),
    (os.path.join("ppl", "x.py"), "def f():\n    from models.llm import load_gguf\n"),
    (os.path.join("samplers", "x.py"), "from models.markov_lm import MarkovLM\n"),
    (os.path.join("samplers", "x.py"), "import importlib\nm = importlib.import_module('app.cli')\n"),
    (os.path.join("models", "llm", "x.py"), "from app.methods import run_method\n"),
    (os.path.join("models", "llm", "x.py"), "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import app\n"),
])
def test_checker_rejects_upward_imports(relpath, source):
    assert violations(source, relpath)


@pytest.mark.parametrize("relpath, source", [
    (os.path.join("app", "x.py"), "import ppl, samplers, models\nfrom models.llm_fk import StepLM\n"),
    (os.path.join("models", "llm", "x.py"), "from .decoding import start\nfrom .. import markov_lm\n"),
    (os.path.join("models", "x.py"), "from samplers.smc import smc\nfrom ppl import AbstractFeynmanKac\n"),
    (os.path.join("samplers", "x.py"), "from ppl.feynman_kac import AbstractFeynmanKac\nimport jax\n"),
    (os.path.join("ppl", "x.py"), "import numpyro\nfrom . import feynman_kac\n"),
])
def test_checker_accepts_downward_imports(relpath, source):
    assert violations(source, relpath) == []


def test_relative_imports_resolve():
    assert imported_modules("from ..llm import x\n", os.path.join("models", "llm_fk", "a.py")) == [(1, "models.llm")]
    assert imported_modules("from . import b\n", os.path.join("models", "llm", "__init__.py")) == [(1, "models.llm.b")]
