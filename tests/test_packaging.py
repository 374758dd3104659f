"""The package as users get it: a wheel built from the repository holds every subpackage and module, and the top
level offers the names the README shows."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "contrastive_explanations"


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The file names inside a wheel built (pip, no dependencies, no isolation) from a copy of what the build reads:
    pyproject.toml, README.md and the package. A copy, so that the build's `build/` and `*.egg-info` folders land
    outside the working tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                          "--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("contrastive_explanations-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


NAMED = ["__init__.py", "methods/__init__.py", "data/__init__.py", "experiments/__init__.py", "viz.py",
         "experiments/toolkit.py", "explorer.py", "results.py"]


@pytest.mark.parametrize("path", NAMED)
def test_the_wheel_holds_the_named_modules(wheel_files, path):
    assert f"contrastive_explanations/{path}" in wheel_files, sorted(wheel_files)


def test_the_wheel_holds_every_module_of_the_source_tree(wheel_files):
    source = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert source - wheel_files == set(), "modules missing from the wheel: a subpackage without __init__.py?"
    assert not any(f.startswith(("tests/", "tools/", "benchmarks/", "nbs/")) for f in wheel_files)


def test_the_wheel_declares_the_command_line_tool(wheel_files):
    assert any(f.endswith(".dist-info/entry_points.txt") for f in wheel_files)


def test_the_top_level_offers_the_readme_names():
    from contrastive_explanations import METHODS, GradCAM, WeightedTarget, build_model

    assert callable(build_model) and WeightedTarget.name == "weighted"
    assert GradCAM in METHODS.values()
    assert all(key == method.name for key, method in METHODS.items()), {k: m.name for k, m in METHODS.items()}
    assert len(set(METHODS.values())) == len(METHODS)


def test_the_readmes_python_examples_run():
    "Every ```python block of README.md runs as written (offline: weights=None and the packaged model)."
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
