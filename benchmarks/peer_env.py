"""The peer environment for benchmarks against the ``particles`` library (Chopin's NumPy SMC).

``particles`` 0.4 needs NumPy < 2, while the project's environment has NumPy 2, so the peer runs in
its own virtual environment ``.venv-particles/`` at the repository root, in a subprocess:

    from benchmarks.peer_env import run_in_peer
    out = run_in_peer("import numpy as np\\nRESULT = {'x': float(np.pi)}")   # -> {'x': 3.14...}

The snippet must assign a JSON-serialisable dict to ``RESULT``; its prints go to this process's
stderr (so they show up, but do not mix with the result). The environment is created on first
use (``python3 -m venv`` + ``pip install 'particles==0.4' 'numpy<2' scipy``; a few minutes, needs
the package index). Note that ``particles.__version__`` of release 0.4 still reads "0.3alpha";
the installed distribution version is checked instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ROOT", "PEER_VENV", "PEER_REQUIREMENTS", "peer_python", "run_in_peer"]

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".venv-particles"
PEER_REQUIREMENTS = ("particles==0.4", "numpy<2", "scipy")
_MARKER = "__PEER_RESULT_JSON__"
_CHECK = (
    "import importlib.metadata as m, particles, numpy, scipy; "
    "assert m.version('particles') == '0.4', m.version('particles'); "
    "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__"
)


def _python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _ok(python: Path) -> bool:
    if not python.exists():
        return False
    r = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True)
    return r.returncode == 0


def peer_python(venv: Path = PEER_VENV, *, verbose: bool = True) -> Path:
    """Path of the peer interpreter, creating ``venv`` with ``PEER_REQUIREMENTS`` when missing."""
    python = _python_in(venv)
    if _ok(python):
        return python
    base = shutil.which("python3") or sys.executable
    if verbose:
        print(f"[peer_env] creating {venv} with {' '.join(PEER_REQUIREMENTS)} ...", file=sys.stderr)
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
    if not _ok(python):
        raise RuntimeError(
            f"the peer environment {venv} does not import particles==0.4 with numpy<2 after "
            f"installation; remove it and retry (requirements: {PEER_REQUIREMENTS})"
        )
    return python


def run_in_peer(code: str, *, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``code`` with the peer interpreter and return the dict it assigns to ``RESULT``.

    Args:
        code: Python source; must define ``RESULT`` (a JSON-serialisable dict).
        timeout: seconds before the subprocess is killed (``None``: no limit).
        env: extra environment variables for the subprocess.

    Raises:
        RuntimeError: the snippet failed (its stderr is included) or defined no ``RESULT``.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a string of Python source, got {type(code).__name__}")
    python = peer_python()
    wrapped = (
        "import sys as _sys, json as _json\n"
        "_out, _sys.stdout = _sys.stdout, _sys.stderr\n"  # the snippet's prints go to stderr
        + code
        + "\n_sys.stdout = _out\n"
        + f"print({_MARKER!r} + _json.dumps(RESULT))\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(wrapped)
        path = f.name
    try:
        proc = subprocess.run(
            [str(python), path],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            cwd=str(ROOT),
        )
    finally:
        os.unlink(path)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"peer snippet failed (exit code {proc.returncode}); stderr tail:\n"
            + proc.stderr[-3000:]
        )
    return json.loads(lines[-1][len(_MARKER):])
