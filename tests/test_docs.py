"""The documentation site builds without warnings, and its tutorial code runs.

``mkdocs build --strict`` turns every warning into an error: a page missing from the nav of
mkdocs.yml, a nav entry without a file, a broken link or anchor, a docstring mkdocstrings cannot
render. mkdocs is a test dependency (the ``docs`` extra, installed by ``make test``); if it is
missing these tests fail, they do not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
         "-d", str(site_dir)],
        cwd=config.parent,
        # the docstring extension (mkdocs_ext/) is imported from the repository root
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_site_sources(dest: Path) -> Path:
    """A copy of mkdocs.yml + docs/ whose mkdocstrings still finds the packages in ROOT."""
    shutil.copytree(DOCS, dest / "docs")
    config = (ROOT / "mkdocs.yml").read_text()
    config = re.sub(r"paths: \[\.\]", f"paths: [{ROOT}]", config)
    assert str(ROOT) in config, "mkdocs.yml no longer has `paths: [.]`; update this test"
    (dest / "mkdocs.yml").write_text(config)
    return dest / "mkdocs.yml"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    proc = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    for page in DOCS.glob("*.md"):
        name = "" if page.stem == "index" else page.stem
        assert (tmp_path / "site" / name / "index.html").is_file(), f"{page.name} not built"
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for obj in ("samplers.smc.smc", "samplers.smc.SMCResult", "samplers.smc_kernel.step",
                "samplers.smc_kernel.SMCState", "samplers.tempering.tempered_smc",
                "app.scale", "models.diffusion", "ppl.feynman_kac.AbstractFeynmanKac",
                "samplers.resampling.Systematic", "ppl.state_space.StateSpaceModel"):
        assert f'id="{obj}"' in api, f"API reference lacks {obj}"
    # offline: every script and stylesheet is served with the site (MathJax and its fonts too)
    site = tmp_path / "site"
    for page in site.rglob("*.html"):
        text = page.read_text()
        remote = re.findall(r'<script[^>]+src="(https?://[^"]+)"', text)
        remote += re.findall(r'<link[^>]+href="(https?://[^"]+\.css[^"]*)"', text)
        assert not remote, f"{page.relative_to(site)} loads {remote} from the network"
        # docstrings' Sphinx roles were turned into cross-references (mkdocs_ext/sphinx_roles.py)
        raw = re.findall(r":(?:func|class|meth|mod|data):`[^`]+`", text)
        assert not raw, f"{page.relative_to(site)} shows raw roles {raw[:3]}"
    assert (site / "javascripts/mathjax/tex-chtml-full.js").stat().st_size > 1_000_000
    assert len(list((site / "javascripts/mathjax/output/chtml/fonts/woff-v2").glob("*.woff"))) >= 20
    assert api.count('class="autorefs autorefs-internal"') >= 50, "docstring roles are not links"


@pytest.mark.slow
def test_strict_build_rejects_broken_docs(tmp_path):
    """The strict build is a real check: an orphan page, or a dead link, makes it fail."""
    # the unmodified sources build (test_mkdocs_build_strict): the failures below are the edits'
    config = _copy_site_sources(tmp_path)
    orphan = tmp_path / "docs" / "orphan_page.md"
    orphan.write_text("# Orphan\n")
    proc = _mkdocs_build(config, tmp_path / "site")
    assert proc.returncode != 0 and "orphan_page.md" in proc.stderr, proc.stderr
    orphan.unlink()

    with open(tmp_path / "docs" / "index.md", "a") as f:
        f.write("\nSee [nowhere](no_such_page.md).\n")
    proc = _mkdocs_build(config, tmp_path / "site")
    assert proc.returncode != 0 and "no_such_page.md" in proc.stderr, proc.stderr


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


@pytest.mark.slow
def test_getting_started_code_runs(tmp_path):
    """Every ```python block of getting_started.md, run in order as one script."""
    blocks = _python_blocks((DOCS / "getting_started.md").read_text())
    assert len(blocks) >= 4, "getting_started.md lost its code blocks"
    script = tmp_path / "getting_started.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"getting_started.md code failed:\n{proc.stdout}\n{proc.stderr}"
    assert "mean Z-hat/Z" in proc.stdout


@pytest.mark.slow
def test_smc_kernel_page_code_runs(tmp_path):
    """The online-filtering example of smc_kernel.md runs, compiles its step once and tracks the
    Kalman filter."""
    blocks = _python_blocks((DOCS / "smc_kernel.md").read_text())
    assert blocks, "smc_kernel.md lost its code block"
    script = tmp_path / "smc_kernel_page.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"smc_kernel.md code failed:\n{proc.stdout}\n{proc.stderr}"
    assert "step compiled 1 time(s)" in proc.stdout


@pytest.mark.slow
def test_tempering_page_code_runs(tmp_path):
    """The logistic-regression example of tempering.md runs, silently, and lands near NUTS."""
    blocks = _python_blocks((DOCS / "tempering.md").read_text())
    assert blocks, "tempering.md lost its code block"
    script = tmp_path / "tempering_page.py"
    script.write_text("import warnings\nwarnings.simplefilter('error', RuntimeWarning)\n\n" + "\n\n".join(blocks))
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"tempering.md code failed:\n{proc.stdout}\n{proc.stderr}"
    err = float(re.search(r"largest posterior-mean error: ([0-9.]+)", proc.stdout).group(1))
    assert err < 0.45, proc.stdout  # N = 256: the 3.5-standard-error bound of test_tempering, × √2


# Every ```python block of these pages runs, in order, as one script (pages with their own test
# above are not repeated). Long runs are shrunk by textual substitutions, each of which must still
# match the page (so the page and its test cannot drift apart silently).
_PAGES = {
    "README.md": {},
    "docs/llm_runtime.md": {},
    "docs/llm_as_ssm.md": {
        "power, 2048, ess_threshold=1.0": "power, 256, ess_threshold=1.0",
        "max_steps=3, max_step_tokens=16, temperature=0.5": "max_steps=2, max_step_tokens=6, temperature=0.5",
    },
    "docs/diffusion.md": {},
    "docs/noise_search.md": {},
    "docs/fk_steering.md": {},
    "docs/diffusion_correctors.md": {},
    "docs/variational.md": {"num_steps=500,": "num_steps=50,"},
    "docs/scaling.md": {},
    "docs/bayesian_workflow.md": {
        "num_particles=1024, progress=False": "num_particles=128, progress=False",
    },
    "docs/particle_mcmc.md": {
        "num_particles=256, num_warmup=1000, num_samples=2000": "num_particles=32, num_warmup=20, num_samples=20",
        "num_chains=4)                      # 4 chains": "num_chains=2)                      # 2 chains",
        "num_particles=32, num_warmup=200, num_samples=800": "num_particles=8, num_warmup=5, num_samples=5",
        "num_chains=4, theta_update=step": "num_chains=2, theta_update=step",
        "num_theta_particles=1000, num_x_particles=100)":
            "num_theta_particles=32, num_x_particles=16, max_num_x_particles=16)",
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(_PAGES))
def test_docs_code_blocks_run(page, tmp_path):
    text = (ROOT / page).read_text()
    blocks = _python_blocks(text)
    assert blocks, f"{page} has no python blocks"
    code = "\n\n".join(blocks)
    for old, new in _PAGES[page].items():
        assert old in code, f"{page} no longer contains {old!r}: update _PAGES"
        code = code.replace(old, new)
    script = tmp_path / "page.py"
    script.write_text(code)
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{page} code failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
