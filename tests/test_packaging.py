"""The package as users get it: a wheel built from the repository holds every subpackage and module and `py.typed`;
the core (the methods, the models, the command line) imports only the core dependencies and everything else only
the core's and the extras'; an installed CPU build of torch is kept; installed with its core dependencies alone into
a fresh virtual environment, its command line explains an image and the README's core examples run; every README
example says which extra it needs; and the top level offers the names the README shows."""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import re
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
from packaging.version import Version
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
         "experiments/base.py", "explorer.py", "results.py", "run.py", "files.py", "metrics/measures.py", "data/sources.py"]


@pytest.mark.parametrize("path", NAMED)
def test_the_wheel_holds_the_named_modules(wheel_files, path):
    assert f"contrastive_explanations/{path}" in wheel_files, sorted(wheel_files)


def test_the_wheel_holds_every_module_of_the_source_tree(wheel_files):
    source = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert source - wheel_files == set(), "modules missing from the wheel: a subpackage without __init__.py?"
    assert not any(f.startswith(("tests/", "tools/", "benchmarks/", "nbs/")) for f in wheel_files)


def test_the_wheel_ships_py_typed(wheel_files):
    "PEP 561: type checkers read the package's own hints only where the marker file is installed with it."
    assert "contrastive_explanations/py.typed" in wheel_files, sorted(f for f in wheel_files if "/" not in f[25:])


def test_the_wheel_declares_the_command_line_tool(wheel_files):
    assert any(f.endswith(".dist-info/entry_points.txt") for f in wheel_files)


def test_the_top_level_offers_the_readme_names():
    from contrastive_explanations import METHODS, GradCAM, WeightedTarget, build_model

    assert callable(build_model) and WeightedTarget.name == "weighted"
    assert GradCAM in METHODS.values()
    assert all(key == method.name for key, method in METHODS.items()), {k: m.name for k, m in METHODS.items()}
    assert len(set(METHODS.values())) == len(METHODS)


def extra_requirements(extra: str | None) -> list[Requirement]:
    "The requirements an install of the package brings: the core's, plus `extra`'s (and the extras it names)."
    found, todo, seen = [Requirement(r) for r in PROJECT["dependencies"]], [extra] if extra else [], set()
    while todo:
        name = todo.pop()
        if name not in PROJECT["optional-dependencies"]:
            raise AssertionError(f"extra {name!r} is not in pyproject.toml: choose among {sorted(PROJECT['optional-dependencies'])}")
        seen.add(name)
        for r in map(Requirement, PROJECT["optional-dependencies"][name]):
            if canonicalize_name(r.name) == canonicalize_name(PROJECT["name"]):
                todo += sorted(r.extras - seen)
            else:
                found.append(r)
    return found


def declared(extra: str | None) -> set[str]:
    return {canonicalize_name(r.name) for r in extra_requirements(extra)}


@functools.cache
def owners() -> dict[str, list[str]]:
    "Top-level import name -> the installed distributions that provide it (a scan of every installed package)."
    return importlib.metadata.packages_distributions()


def undeclared(imported: set[str], allowed: set[str]) -> dict[str, list[str]]:
    "The imported top-level names that no distribution in `allowed` provides: name -> the distributions that do."
    owners_ = owners()
    names = imported - set(sys.stdlib_module_names) - {PACKAGE.name, "__future__"}
    return {n: owners_.get(n, [n]) for n in sorted(names)
            if not any(canonicalize_name(d) in allowed for d in owners_.get(n, [n]))}


NEEDS = re.compile(r'^# needs the "(\w+)" extra: pip install "\.\[\1\]"')


def readme_blocks() -> list[tuple[str | None, str]]:
    "README.md's ```python blocks, each with the extra its first line says it needs (None: the core install)."
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [(m[1] if (m := NEEDS.match(b)) else None, b) for b in blocks]


def block_imports(block: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def test_every_readme_example_says_which_install_it_needs():
    "A block runs after the install it names: the core, or `pip install \".[extra]\"`; its imports come with it."
    blocks = readme_blocks()
    assert len(blocks) >= 3 and any(extra is None for extra, _ in blocks)
    for extra, block in blocks:
        missing = undeclared(block_imports(block), declared(extra))
        assert not missing, (f"a README block imports {missing}, which {extra or 'the core'} install does not bring: "
                             f"begin it with '# needs the \"EXTRA\" extra: pip install \".[EXTRA]\"'\n{block}")


def test_the_readme_block_check_sees_a_missing_extra():
    "The check above can fail: timm is no core dependency, and a block that imports it must name the 'test' extra."
    assert undeclared({"timm", "torch"}, declared(None)) == {"timm": ["timm"]}
    assert undeclared({"timm", "torch"}, declared("test")) == {}


def test_the_readmes_python_examples_run():
    "Every ```python block of README.md runs as written (offline: weights=None and the packaged model)."
    for _, block in readme_blocks():
        exec(compile(block, "README.md", "exec"), {})


def imports_of(path: Path, module: str | None = None) -> tuple[set[str], set[str], set[str]]:
    """A module's imports: (top-level names of other packages imported when the module is, those imported inside
    functions or for type checkers only, the package's own modules it imports when it is imported)."""
    module = module or path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    eager, lazy, own = set(), set(), set()

    def visit(node: ast.AST, inside: bool) -> None:
        names = set()
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = {base} | {f"{base}.{alias.name}" for alias in node.names}
        for name in names:
            if name.partition(".")[0] == PACKAGE.name:
                if not inside:  # the package's modules this one runs when imported
                    own.add(name)
            elif not (isinstance(node, ast.ImportFrom) and name != (node.module or "")):
                (lazy if inside else eager).add(name.partition(".")[0])
        checking = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)  # for type checkers only
        for child in ast.iter_child_nodes(node):
            visit(child, inside or checking or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return eager, lazy, own


def module_file(name: str) -> Path | None:
    path = ROOT / name.replace(".", "/")
    return path / "__init__.py" if (path / "__init__.py").exists() else path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def core_roots() -> set[str]:
    "The modules the core is: the public names' homes, the methods, the models, viz and the command line's module."
    import contrastive_explanations
    import contrastive_explanations.methods
    roots = {PACKAGE.name, f"{PACKAGE.name}.methods", f"{PACKAGE.name}.data.models", f"{PACKAGE.name}.viz"}
    roots |= {f"{PACKAGE.name}.methods.{p.stem}" for p in (PACKAGE / "methods").glob("*.py")}
    for module in (contrastive_explanations, contrastive_explanations.methods):
        roots |= {getattr(getattr(module, n), "__module__", None) or module.__name__ for n in module.__all__}
    roots |= {spec.partition(":")[0] for spec in PROJECT["scripts"].values()}
    return {r for r in roots if r.startswith(PACKAGE.name)}


def core_modules() -> dict[str, Path]:
    """Every module of the package the core reaches: its roots and, transitively, the package's modules they import;
    each module's path, and in VIA which module imported it."""
    found, todo = {}, [(r, "the core") for r in sorted(core_roots())]
    while todo:
        name, parent = todo.pop()
        path = module_file(name)
        if path is None or name in found:
            continue  # `from package.module import function`: the name is no module
        found[name], VIA[name] = path, parent
        parts = name.split(".")
        todo += [(".".join(parts[:i]), name) for i in range(2, len(parts))]  # importing a.b.c runs a.b's __init__
        todo += [(m, name) for m in sorted(imports_of(path)[2])]
    return found


VIA: dict[str, str] = {}


def test_the_core_imports_only_the_core_dependencies():
    """What the methods, the models and the command line reach imports only pyproject.toml's dependencies when it is
    imported (an extra's package only inside a function that needs it); `pip install .` alone runs them."""
    core = core_modules()
    assert {f"{PACKAGE.name}.methods.cam", f"{PACKAGE.name}.data.models", f"{PACKAGE.name}.viz"} <= set(core)
    extras = set().union(*(declared(e) for e in PROJECT["optional-dependencies"]))
    problems = {}
    for name, path in sorted(core.items()):
        eager, lazy, _ = imports_of(path)
        if bad := undeclared(eager, declared(None)) | undeclared(lazy, extras):
            problems[f"{name} (imported by {VIA[name]})"] = bad
    assert not problems, ("the core reaches modules that import packages outside pyproject.toml's dependencies "
                          f"(import them inside the function that needs them, from an extra, or move the code "
                          f"out of the core's reach): {problems}")


def test_the_import_scan_sees_eager_lazy_and_own_imports(tmp_path):
    "The scan the test above relies on: it tells imports at import time from those inside a function."
    source = tmp_path / "module.py"
    source.write_text("import numpy as np\nfrom torch import nn\nfrom ..results import write_json\n"
                      "try:\n    import yaml\nexcept ImportError:\n    pass\n"
                      "class A:\n    def f(self):\n        import pandas\n        from . import models\n"
                      "if TYPE_CHECKING:\n    import ipywidgets\n")
    eager, lazy, own = imports_of(source, f"{PACKAGE.name}.data.module")
    assert (eager, lazy) == ({"numpy", "torch", "yaml"}, {"pandas", "ipywidgets"})
    assert own == {f"{PACKAGE.name}.results", f"{PACKAGE.name}.results.write_json"}  # not the function's own import
    assert not undeclared({"pandas"}, declared("experiments")) and undeclared({"pandas"}, declared(None))


def test_every_package_the_code_imports_is_declared():
    "Any module of the package imports only the core dependencies and the extras'."
    allowed = set().union(declared(None), *(declared(e) for e in PROJECT["optional-dependencies"]))
    imported, scanned = set(), 0
    for path in PACKAGE.rglob("*.py"):
        eager, lazy, _ = imports_of(path)
        imported |= eager | lazy
        scanned += 1
    assert {"torch", "torchvision", "efficientnet_lite_pytorch", "yaml"} <= imported, scanned  # the scan sees imports
    missing = undeclared(imported, allowed)
    assert not missing, f"imported but declared neither as a dependency nor in an extra of pyproject.toml: {missing}"


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


TORCH = ("torch", "torchvision")


def test_the_core_pins_neither_torch_nor_torchvision():
    """The core's bounds on torch and torchvision are lower bounds that a CPU build (a `+cpu` local version) of the
    tested versions meets: an exact pin or an upper bound would make pip replace the build a user installed first."""
    core = {canonicalize_name(r.name): r for r in extra_requirements(None)}
    pinned = pins()
    for name in TORCH:
        spec = core[name].specifier
        assert all(s.operator in (">=", "!=") for s in spec), f"{name}{spec}: declare a lower bound only (>=)"
        assert Version(f"{pinned[name]}+cpu") in spec, f"{name}{spec} refuses the CPU build {pinned[name]}+cpu"


def fake_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    "An empty wheel that only declares `name` `version` and its requirements, for pip's resolver."
    dist = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def pip_in(venv: Path, *args: str) -> subprocess.CompletedProcess:
    "This pip, run for the interpreter of `venv`, offline, with no configuration of this machine."
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--no-input",
                          "--disable-pip-version-check", *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fake_index(tmp_path_factory) -> Path:
    """Wheels that stand for an index: the package, declaring pyproject.toml's core requirements; torch and
    torchvision at the tested versions (the default, CUDA builds), torchvision needing a torch at least as new as
    the tested one, as torchvision's releases do; every other core requirement at its tested version."""
    index = tmp_path_factory.mktemp("index")
    pinned = pins()
    fake_wheel(index, PROJECT["name"], PROJECT["version"], PROJECT["dependencies"])
    torch_, vision = pinned["torch"], pinned["torchvision"]
    fake_wheel(index, "torch", torch_)
    fake_wheel(index, "torchvision", vision, [f"torch>={torch_}"])
    for r in extra_requirements(None):
        if canonicalize_name(r.name) not in TORCH:
            fake_wheel(index, r.name, pinned.get(canonicalize_name(r.name), "1000"))
    return index


def replaced_after_installing(fake_index: Path, venv_root: Path, cpu: dict[str, str], *extra: str) -> set[str]:
    """Which of torch and torchvision `pip install <the package>` would install (replacing the CPU builds `cpu`,
    name -> version, installed first in a fresh venv)."""
    venv = venv_root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    local = venv_root / "cpu"
    local.mkdir()
    fake_wheel(local, "torch", cpu["torch"])
    if "torchvision" in cpu:
        fake_wheel(local, "torchvision", cpu["torchvision"], [f"torch=={cpu['torch']}"])
    pip_in(venv, "install", "--quiet", "--no-index", "--no-deps", *local.iterdir())
    report = venv_root / "report.json"
    pip_in(venv, "install", "--quiet", "--dry-run", "--report", str(report), "--no-index", "--find-links",
           str(fake_index), *extra, PROJECT["name"])
    chosen = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert PROJECT["name"] in chosen, chosen
    return {name for name in TORCH if name in chosen}


def test_installing_the_package_keeps_a_cpu_build_of_torch(fake_index, tmp_path):
    """The README's CPU-only install: torch and torchvision from PyTorch's CPU index first (`+cpu` builds), then the
    package. pip keeps both: nothing of the core asks for another build. Also with constraints.txt, where the CPU
    builds are of the tested versions (constraints name no local version)."""
    pinned = pins()
    tested = {name: f"{pinned[name]}+cpu" for name in TORCH}
    older = {"torch": "2.3.0+cpu", "torchvision": "0.18.0+cpu"}  # the oldest pair the core's bounds admit
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    assert replaced_after_installing(fake_index, tmp_path / "a", tested) == set()
    assert replaced_after_installing(fake_index, tmp_path / "b", older) == set()
    assert replaced_after_installing(fake_index, tmp_path / "c", tested, "-c", str(ROOT / "constraints.txt")) == set()


def test_a_cpu_torch_alone_is_replaced_which_is_why_the_readme_installs_torchvision_with_it(fake_index, tmp_path):
    """The cause of the replaced CPU build: with torch alone from the CPU index, pip takes the newest torchvision
    from the index, which needs a newer torch than the CPU build, and installs the default (CUDA) torch with it."""
    pinned = pins()
    older = f"{Version(pinned['torch']).major}.{Version(pinned['torch']).minor - 1}.0+cpu"
    assert replaced_after_installing(fake_index, tmp_path, {"torch": older}) == {"torch", "torchvision"}


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and its core dependencies and nothing else (no extra), installed by
    pip at the tested versions (constraints.txt; pip takes them from its wheel cache after `make setup`). Its bin/."""
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo.explained.json", "photo.explained.npz",
                                                                    "photo.explained.png"]
    with np.load(tmp_path / "out" / "photo.explained.npz") as saved:
        assert {"maps", "classes", "targets", "probabilities"} <= set(saved.files)
        assert np.isfinite(saved["maps"]).all() and np.abs(saved["maps"]).max() > 0
    absent = in_venv(installed, "python", "-c", "import importlib.util as u; print([m for m in "
                     "('pandas', 'yaml', 'tqdm', 'scipy', 'ipywidgets', 'IPython') if u.find_spec(m)])", cwd=tmp_path)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr  # the extras' packages: none came along


def test_the_readmes_core_examples_run_after_the_core_install(installed, tmp_path):
    "The README's blocks that name no extra run in the fresh venv of the core install, one process for them all."
    core = [block for extra, block in readme_blocks() if extra is None]
    assert core
    script = tmp_path / "readme.py"
    script.write_text(f"for block in {core!r}:\n    exec(compile(block, 'README.md', 'exec'), {{}})\n")
    run = in_venv(installed, "python", str(script), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
