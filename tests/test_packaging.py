"""The package as users get it: a wheel built from the repository holds every subpackage and module and declares
every package the code imports; installed with its dependencies into a fresh virtual environment, its command line
explains an image; and the top level offers the names the README shows."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "contrastive_explanations"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (pip, no dependencies, no isolation) from a copy of what the build reads: pyproject.toml,
    README.md and the package. A copy, so that the build's `build/` and `*.egg-info` folders land outside the
    working tree."""
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
    (built,) = (tmp / "dist").glob("contrastive_explanations-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_files(wheel) -> set[str]:
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


def imported_distributions() -> dict[str, list[str]]:
    "Every package outside the standard library that the package's code imports, anywhere: name -> distributions."
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.partition(".")[0])
    names -= set(sys.stdlib_module_names) | {PACKAGE.name}
    owners = importlib.metadata.packages_distributions()
    return {name: owners.get(name, [name]) for name in sorted(names)}


def test_every_package_the_code_imports_is_a_runtime_dependency():
    declared = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    imported = imported_distributions()
    assert {"torch", "torchvision", "efficientnet_lite_pytorch", "yaml"} <= set(imported)  # the scan sees imports
    missing = {name: dists for name, dists in imported.items()
               if not any(canonicalize_name(d) in declared for d in dists)}
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def pins() -> dict[str, str]:
    "The versions the tests run on: requirements.txt and constraints.txt, name -> version."
    found = {}
    for name in ("constraints.txt", "requirements.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                dist, _, version = line.partition("#")[0].strip().partition("==")
                found[canonicalize_name(dist)] = version
    return found


def test_the_pinned_environment_satisfies_every_declared_bound():
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    requirements += [Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra
                     if not r.startswith(PROJECT["name"])]
    pinned = pins()
    unpinned = [str(r) for r in requirements if canonicalize_name(r.name) not in pinned]
    assert not unpinned, f"declared in pyproject.toml but not pinned in requirements.txt: {unpinned}"
    outside = [f"{r} (pinned {pinned[canonicalize_name(r.name)]})" for r in requirements
               if pinned[canonicalize_name(r.name)] not in r.specifier]
    assert not outside, f"the tested versions lie outside pyproject.toml's bounds: {outside}"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and its declared dependencies and nothing else, installed by pip
    at the tested versions (constraints.txt; pip takes them from its wheel cache after `make setup`). Its bin/."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    free = shutil.disk_usage(venv.parent).free / 2**30
    assert free > 12, f"the fresh venv needs about 6 GB (torch and its CUDA libraries), and {free:.1f} GB are free"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"), str(wheel)],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return venv / "bin"


def in_venv(bin: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    "Run a command of the fresh venv away from the repository, so that nothing of the checkout is on its path."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(bin / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_wheel_is_complete_and_explains_an_image(installed, tmp_path):
    check = in_venv(installed, "python", "-m", "pip", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    where = in_venv(installed, "python", "-c", "import contrastive_explanations as c; print(c.__file__)", cwd=tmp_path)
    assert str(installed.parent) in where.stdout, where.stdout + where.stderr  # the wheel's copy, not the checkout
    help_ = in_venv(installed, "contrastive-explain", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "efficientnet_lite0" in help_.stdout and "vgg16_bn_cub" in help_.stdout, help_.stderr
    version = in_venv(installed, "contrastive-explain", "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"contrastive-explain {PROJECT['version']}", version.stdout + version.stderr
    pixels = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    run = in_venv(installed, "contrastive-explain", "photo.png", "--out-dir", "out", "--save-maps", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo.json", "photo.npz", "photo.png"]
    with np.load(tmp_path / "out" / "photo.npz") as saved:
        assert {"maps", "classes", "targets", "probabilities"} <= set(saved.files)
        assert np.isfinite(saved["maps"]).all() and np.abs(saved["maps"]).max() > 0
