"""Execute every tutorial in notebooks/ with tiny sizes (PPL_SMALL=1); any cell error fails.

The kernel is the Python running pytest (``sys.executable``, i.e. ``.venv/bin/python`` under
``make test``), whatever kernelspecs are installed on the machine: a fresh clone needs no
``ipykernel install``. Notebooks added to notebooks/ are picked up by the glob.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets import default

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

NOTEBOOK_TIMEOUT_S = 600  # whole notebook, small sizes
CELL_TIMEOUT_S = 300


class _ThisPythonKernelSpecManager(KernelSpecManager):
    """Every kernel name resolves to an ipykernel running on ``sys.executable``."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            resource_dir=str(NOTEBOOK_DIR),
        )


class _ThisPythonKernelManager(AsyncKernelManager):
    @default("kernel_spec_manager")
    def _default_kernel_spec_manager(self):
        return _ThisPythonKernelSpecManager()


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PPL_SMALL"] = "1"
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def execute_notebook(path: Path) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a fresh kernel; raise on the first cell error or timeout."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        kernel_manager_class=_ThisPythonKernelManager,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )

    async def run():
        return await asyncio.wait_for(
            client.async_execute(env=_kernel_env(), cwd=str(NOTEBOOK_DIR)),
            timeout=NOTEBOOK_TIMEOUT_S,
        )

    return asyncio.run(run())


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


def test_kernel_is_this_python():
    spec = _ThisPythonKernelManager(kernel_name="python3").kernel_spec
    assert spec.argv[0] == sys.executable


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path):
    start = time.perf_counter()
    nb = execute_notebook(path)
    elapsed = time.perf_counter() - start
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    print(f"{path.name}: executed in {elapsed:.1f} s")


@pytest.mark.slow
def test_failing_notebook_is_reported(tmp_path: Path):
    """The harness must fail on a cell error, and must pass PPL_SMALL and MPLBACKEND on."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, sys\n"
            "assert os.environ['PPL_SMALL'] == '1'\n"
            "assert os.environ['MPLBACKEND'] == 'Agg'\n"
            f"assert sys.executable == {sys.executable!r}\n"
            "import ppl, samplers"
        ),
        nbformat.v4.new_code_cell("raise ValueError('deliberate failure')"),
    ]
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(CellExecutionError, match="deliberate failure"):
        execute_notebook(path)
