"""The package's rooms and floors: files and metrics, methods and data stand on their own; the results store above them;
the experiments' base, then the experiments; the run (profiles, preflight, command line), the command-line tool and the
explorer on top. An import may only go down a floor (or stay inside its own room), and no experiment imports another."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "contrastive_explanations"


def imported_modules(path: Path) -> set[str]:
    "Every module of the package that `path` imports, top-level or inside a function, as a dotted name."
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from ..methods.cam import X
                base = list(here[:len(here) - node.level])
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # from . import cam
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("contrastive_explanations")}


def modules_in(folder: str) -> list[Path]:
    return sorted(p for p in (PACKAGE / folder).glob("*.py") if p.name != "__init__.py")


def test_the_folders_exist_with_their_modules():
    assert {p.stem for p in modules_in("methods")} >= {"targets", "explain", "gradient", "cam", "fullgrad", "vit"}
    assert {p.stem for p in modules_in("data")} >= {"models", "birds", "datasets", "training", "sources"}
    assert "base" in {p.stem for p in modules_in("experiments")}
    assert all((PACKAGE / f / "__init__.py").exists() for f in ("methods", "data", "experiments"))
    assert all((PACKAGE / f"{m}.py").exists() for m in ("files", "results", "run"))
    assert (PACKAGE / "metrics" / "__init__.py").exists() and {p.stem for p in modules_in("metrics")} >= {"measures"}


FLOORS: dict[str, int] = {  # a room -> its floor; an import goes to a lower floor, or stays in its room
    "files": 0, "metrics": 0, "methods": 1, "data": 1, "results": 2, "viz": 2, "claims": 2,
    "experiments.base": 3, "experiments": 4, "run": 5, "cli": 5, "explorer": 6}


NEVER: set[tuple[str, str]] = {  # (importer's room, imported room) refused whatever the floors say
    ("explorer", "experiments"), ("explorer", "experiments.base"),  # the explorer explains images, it runs no experiment
    *((r, "run") for r in FLOORS if r != "run")}  # the run is the top floor: only tools/ and benchmarks/ import it


def room(module: str) -> str:
    "The room of a dotted module name: 'experiments.base', 'experiments' for the other experiments, else its first part."
    parts = module.split(".")[1:]
    if parts[:2] == ["experiments", "base"]:
        return "experiments.base"
    return parts[0] if parts else "package"


def against_the_floors(importer: str, imported: str) -> str | None:
    "Why `importer` may not import `imported` (dotted module names), or None."
    a, b = room(importer), room(imported)
    if b == "package" or a == b or b not in FLOORS or a not in FLOORS:
        return None  # the package's own __init__ (its version), the same room, or a name that is not a room
    if (a, b) in NEVER:
        return f"{importer} ({a}) may not import {imported} ({b})"
    if FLOORS[b] >= FLOORS[a]:
        return f"{importer} (floor {FLOORS[a]}, {a}) imports {imported} (floor {FLOORS[b]}, {b})"
    return None


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def test_every_module_is_in_a_room():
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("_modidx.py", "__init__.py"):
            assert room(module_name(path)) in FLOORS, path


def test_no_import_runs_up_a_floor():
    bad = [why for path in PACKAGE.rglob("*.py") if path.name != "_modidx.py"
           for m in imported_modules(path) if (why := against_the_floors(module_name(path), m))]
    assert not bad, bad


@pytest.mark.parametrize("importer, imported", [
    ("contrastive_explanations.results", "contrastive_explanations.experiments.masking"),  # the store knows no experiment
    ("contrastive_explanations.results", "contrastive_explanations.run"),  # ... and not the top floor
    ("contrastive_explanations.explorer", "contrastive_explanations.experiments.base"),  # the explorer needs no experiment
    ("contrastive_explanations.explorer", "contrastive_explanations.run"),
    ("contrastive_explanations.experiments.masking", "contrastive_explanations.run"),  # nothing imports the run
    ("contrastive_explanations.cli", "contrastive_explanations.run"),
    ("contrastive_explanations.data.datasets", "contrastive_explanations.results"),  # data stands below the store
    ("contrastive_explanations.data.sources", "contrastive_explanations.methods.explain"),  # two rooms of one floor
    ("contrastive_explanations.methods.cam", "contrastive_explanations.data.models"),
    ("contrastive_explanations.metrics", "contrastive_explanations.files"),
    ("contrastive_explanations.files", "contrastive_explanations.results"),
])
def test_the_rules_refuse_imports_against_them(importer, imported):
    assert against_the_floors(importer, imported)


def test_the_rules_allow_imports_down_and_within_a_room():
    for importer, imported in [("contrastive_explanations.run", "contrastive_explanations.results"),
                               ("contrastive_explanations.experiments.masking", "contrastive_explanations.experiments.base"),
                               ("contrastive_explanations.data.sources", "contrastive_explanations.data.datasets"),
                               ("contrastive_explanations.explorer", "contrastive_explanations.cli")]:
        assert against_the_floors(importer, imported) is None


@pytest.mark.parametrize("folder", ["methods", "data"])
def test_methods_and_data_import_no_experiment(folder):
    bad = {p.name: sorted(m for m in imported_modules(p) if m.startswith("contrastive_explanations.experiments"))
           for p in modules_in(folder)}
    assert not any(bad.values()), bad


def test_no_experiment_imports_another():
    experiments = {p.stem for p in modules_in("experiments")} - {"base"}
    for path in modules_in("experiments"):
        others = {m.split(".")[2] for m in imported_modules(path)
                  if m.startswith("contrastive_explanations.experiments.") and len(m.split(".")) > 2}
        assert not (others & (experiments - {path.stem})), f"{path.name} imports {sorted(others & experiments)}"


def test_methods_import_nothing_above_them():
    for path in modules_in("methods"):
        above = sorted(m for m in imported_modules(path) if not m.startswith("contrastive_explanations.methods"))
        assert not above, f"{path.name} imports {above}"


def test_module_names_equal_chapter_names():
    "Each exported module comes from the chapter of the same name: nbs/NN_name.ipynb -> .../name.py."
    import json
    chapters = {}
    for nb in (PACKAGE.parent / "nbs").glob("*.ipynb"):
        for cell in json.loads(nb.read_text())["cells"]:
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("#| default_exp "):
                    chapters[line.split()[-1]] = nb.stem
    assert chapters, "no chapter exports a module"
    for module, chapter in chapters.items():
        assert chapter.split("_", 1)[1] == module.rsplit(".", 1)[-1], (chapter, module)
        assert (PACKAGE / (module.replace(".", "/") + ".py")).exists(), module
