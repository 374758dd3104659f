"The package's rooms: methods/ and data/ stand on their own, experiments share only the toolkit."
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
    assert {p.stem for p in modules_in("data")} >= {"models", "birds", "datasets", "training"}
    assert "toolkit" in {p.stem for p in modules_in("experiments")}
    assert all((PACKAGE / f / "__init__.py").exists() for f in ("methods", "data", "experiments"))


@pytest.mark.parametrize("folder", ["methods", "data"])
def test_methods_and_data_import_no_experiment(folder):
    bad = {p.name: sorted(m for m in imported_modules(p) if m.startswith("contrastive_explanations.experiments"))
           for p in modules_in(folder)}
    assert not any(bad.values()), bad


def test_no_experiment_imports_another():
    experiments = {p.stem for p in modules_in("experiments")} - {"toolkit"}
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
