"""Peer environments for benchmarks against other libraries, each in its own virtual environment.

A peer library whose requirements clash with the project's environment runs in a virtual
environment of its own at the repository root, in a subprocess. :class:`PeerEnv` describes one
(folder, pip requirements, an import check); two are defined:

- :data:`PARTICLES` — ``.venv-particles/``: ``particles`` 0.4 (Chopin's NumPy SMC), which needs
  NumPy < 2 while the project has NumPy 2. The module-level :func:`peer_python` and
  :func:`run_in_peer` use it by default. Note that ``particles.__version__`` of release 0.4 still
  reads "0.3alpha"; the installed distribution version is checked instead.
- :data:`LLAMPPL` — ``.venv-llamppl/``: ``llamppl`` 0.2.3 with ``genlm-control`` 0.4.1 and
  ``torch==2.13.0`` (the CPU wheel; pinned so that pip takes the release it already has rather
  than downloading another).

    from benchmarks.peer_env import run_in_peer, LLAMPPL
    out = run_in_peer("import numpy as np\\nRESULT = {'x': float(np.pi)}")   # -> {'x': 3.14...}
    out = LLAMPPL.run("import llamppl\\nRESULT = {'ok': True}")

The snippet must assign a JSON-serialisable dict to ``RESULT``; its prints go to this process's
stderr (so they show up, but do not mix with the result). An environment is created on first use
(``python3 -m venv`` + ``pip install <requirements>``; a few minutes, needs the package index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "PEER_VENV", "PEER_REQUIREMENTS", "PeerEnv", "PARTICLES", "LLAMPPL", "peer_python",
           "run_in_peer"]

ROOT = Path(__file__).resolve().parent.parent
_MARKER = "__PEER_RESULT_JSON__"


def _python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@dataclass(frozen=True)
class PeerEnv:
    """One peer environment.

    Attributes:
        venv: folder of the virtual environment.
        requirements: pip requirement strings installed into it.
        check: Python source that must run without error in a ready environment (imports and
            version assertions).
        pip_args: extra arguments of ``pip install`` (e.g. an index URL).
    """

    venv: Path
    requirements: tuple[str, ...]
    check: str
    pip_args: tuple[str, ...] = ()

    def ok(self) -> bool:
        """Whether the environment exists and passes its check."""
        python = _python_in(self.venv)
        if not python.exists():
            return False
        r = subprocess.run([str(python), "-c", self.check], capture_output=True, text=True)
        return r.returncode == 0

    def python(self, *, verbose: bool = True) -> Path:
        """Path of the interpreter, creating the environment when missing or broken."""
        python = _python_in(self.venv)
        if self.ok():
            return python
        base = shutil.which("python3") or sys.executable
        if verbose:
            print(f"[peer_env] creating {self.venv} with {' '.join(self.requirements)} ...", file=sys.stderr)
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(self.venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *self.pip_args, *self.requirements],
                       check=True)
        if not self.ok():
            raise RuntimeError(
                f"the peer environment {self.venv} fails its check after installation; remove it and "
                f"retry (requirements: {self.requirements}; check: {self.check!r})"
            )
        return python

    def run(self, code: str, *, timeout: float | None = None, env: dict | None = None) -> dict:
        """Run ``code`` with this environment's interpreter and return the dict it assigns to
        ``RESULT`` (see :func:`run_in_peer`)."""
        return _run(self.python(), code, timeout=timeout, env=env)


PARTICLES = PeerEnv(
    venv=ROOT / ".venv-particles",
    requirements=("particles==0.4", "numpy<2", "scipy"),
    check=(
        "import importlib.metadata as m, particles, numpy, scipy; "
        "assert m.version('particles') == '0.4', m.version('particles'); "
        "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__"
    ),
)

LLAMPPL = PeerEnv(
    venv=ROOT / ".venv-llamppl",
    requirements=("llamppl==0.2.3", "genlm-control==0.4.1", "torch==2.13.0"),
    check=(
        "import importlib.metadata as m, llamppl, genlm.control, torch, transformers; "
        "assert m.version('llamppl') == '0.2.3', m.version('llamppl'); "
        "assert m.version('genlm-control') == '0.4.1', m.version('genlm-control'); "
        "assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
    ),
)

# the original single-peer API (the ``particles`` environment)
PEER_VENV = PARTICLES.venv
PEER_REQUIREMENTS = PARTICLES.requirements


def peer_python(venv: Path = PEER_VENV, *, verbose: bool = True) -> Path:
    """Path of the ``particles`` peer interpreter (or of another folder with the same
    requirements), creating ``venv`` with ``PEER_REQUIREMENTS`` when missing."""
    peer = PARTICLES if Path(venv) == PARTICLES.venv else PeerEnv(Path(venv), PARTICLES.requirements,
                                                                  PARTICLES.check)
    return peer.python(verbose=verbose)


def run_in_peer(code: str, *, timeout: float | None = None, env: dict | None = None,
                peer: PeerEnv | None = None) -> dict:
    """Run ``code`` with a peer interpreter and return the dict it assigns to ``RESULT``.

    Args:
        code: Python source; must define ``RESULT`` (a JSON-serialisable dict).
        timeout: seconds before the subprocess is killed (``None``: no limit).
        env: extra environment variables for the subprocess.
        peer: the :class:`PeerEnv` (default :data:`PARTICLES`).

    Raises:
        RuntimeError: the snippet failed (its stderr is included) or defined no ``RESULT``.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a string of Python source, got {type(code).__name__}")
    python = peer_python() if peer is None else peer.python()
    return _run(python, code, timeout=timeout, env=env)


def _run(python: Path, code: str, *, timeout: float | None, env: dict | None) -> dict:
    if not isinstance(code, str):
        raise TypeError(f"code must be a string of Python source, got {type(code).__name__}")
    wrapped = (
        "import sys as _sys, json as _json\n"
        "_out, _sys.stdout = _sys.stdout, _sys.stderr\n"  # the snippet's prints go to stderr
        + code
        + "\n_sys.stdout = _out\n"
        + f"print({_MARKER!r} + _json.dumps(RESULT))\n"
    )
    # the script's folder becomes sys.path[0] of the peer: a fresh one, so that stray modules in
    # the system's temporary folder (a /tmp/timeit.py) cannot shadow the standard library
    with tempfile.TemporaryDirectory(prefix="peer-") as folder:
        path = os.path.join(folder, "peer_snippet.py")
        with open(path, "w") as f:
            f.write(wrapped)
        proc = subprocess.run(
            [str(python), path],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            cwd=str(ROOT),
        )
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"peer snippet failed (exit code {proc.returncode}); stderr tail:\n"
            + proc.stderr[-3000:]
        )
    return json.loads(lines[-1][len(_MARKER):])
