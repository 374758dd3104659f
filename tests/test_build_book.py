"""The main job's script (tools/build_book.py): profiles, bad input, failing chapters, re-runs, tidy pages."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from tools import book_assets, book_pages, build_book

ROOT = Path(__file__).resolve().parents[1]


def notebook(path: Path, *sources: str, parameters: str | None = None, tags: tuple[str, ...] = ("remove-cell",),
             metadata: dict | None = None) -> None:
    cells = []
    if parameters is not None:
        cells.append(new_code_cell(parameters, metadata={"tags": ["parameters", *tags]}))
    cells += [new_code_cell(s) for s in sources]
    nb = new_notebook(cells=cells, metadata=metadata or {})
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def book(tmp_path: Path) -> Path:
    "A small book tree: two profiles, an index with parameters and one chapter, and an old built book."
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "embedded.yaml").write_text("profile: embedded\ndata_root: ''\nseed: 0\n")
    (tmp_path / "params" / "paper.yaml").write_text("profile: paper\ndata_root: null\nseed: 0\n")
    (tmp_path / "nbs").mkdir()
    notebook(tmp_path / "nbs" / "index.ipynb", "assert profile == 'embedded'", parameters="profile = 'x'")
    notebook(tmp_path / "nbs" / "01_ok.ipynb", "x = 1 + 1", "assert x == 2")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: executed/index\nchapters:\n  - file: executed/01_ok\n")
    (tmp_path / "_build" / "html").mkdir(parents=True)
    (tmp_path / "_build" / "html" / "index.html").write_text("an old book")
    return tmp_path


def run(root: Path, *args: str, capsys) -> tuple[int, str, str]:
    status = build_book.main([*args, "--no-html"], root=root)
    out, err = capsys.readouterr()
    return status, out, err


def test_unknown_profile_is_a_one_line_error_and_builds_nothing(book, capsys):
    status, out, err = run(book, "--profile", "fast", capsys=capsys)
    assert status == 2
    assert err.strip() == "error: unknown profile 'fast': choose one of embedded, paper"
    assert (book / "_build" / "html" / "index.html").read_text() == "an old book"
    assert not (book / "executed").exists()


def test_unknown_profile_from_the_command_line_exits_non_zero():
    result = subprocess.run([sys.executable, "-m", "tools.build_book", "--profile", "nope"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown profile 'nope': choose one of embedded, fixture, paper" in result.stderr


def test_a_profile_value_left_null_must_be_given(book, capsys):
    status, _, err = run(book, "--profile", "paper", capsys=capsys)
    assert status == 2 and "profile 'paper' needs data_root" in err and "DATA_ROOT=" in err
    status, _, err = run(book, "--profile", "embedded", "-p", "dataroot=/x", capsys=capsys)
    assert status == 2 and "unknown setting 'dataroot': known are profile, data_root, seed" in err


def test_a_failing_chapter_stops_the_job_and_names_notebook_and_cell(book, capsys):
    notebook(book / "nbs" / "01_ok.ipynb", "x = 1", "raise RuntimeError('boom in chapter one')", "y = 2")
    status, _, err = run(book, capsys=capsys)
    assert status == 1
    assert "nbs/01_ok.ipynb failed at cell 1 (`raise RuntimeError('boom in chapter one')`)" in err
    assert "RuntimeError: boom in chapter one" in err
    assert (book / "executed" / "01_ok.failed.ipynb").exists()
    assert not (book / "executed" / "01_ok.ipynb").exists()
    assert not (book / "executed" / "01_ok.partial.ipynb").exists()
    assert not (book / "_build" / "html").exists(), "the old book must not survive a failed run"


def test_parameters_reach_only_the_notebooks_that_declare_them(book, capsys):
    status, out, _ = run(book, capsys=capsys)
    assert status == 0, out
    index = nbformat.read(book / "executed" / "index.ipynb", as_version=4)
    injected = [c for c in index.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "profile = \"embedded\"" in injected[0].source
    assert injected[0].metadata["tags"] == ["injected-parameters", "remove-cell"]
    assert "seed" not in injected[0].source
    chapter = nbformat.read(book / "executed" / "01_ok.ipynb", as_version=4)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in chapter.cells)
    assert chapter.metadata["book"]["parameters"] == {}


def test_a_second_run_keeps_unchanged_chapters_and_redoes_changed_ones(book, capsys):
    assert run(book, capsys=capsys)[0] == 0
    first = (book / "executed" / "01_ok.ipynb").stat().st_mtime_ns
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 2
    assert (book / "executed" / "01_ok.ipynb").stat().st_mtime_ns == first
    notebook(book / "nbs" / "01_ok.ipynb", "x = 3")
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 1
    status, out, _ = run(book, "--force", capsys=capsys)
    assert status == 0 and "unchanged" not in out


def test_another_profile_has_its_own_copies_and_shares_the_chapters_that_take_no_profile(book, capsys):
    notebook(book / "nbs" / "index.ipynb", "assert profile in ('embedded', 'paper')", parameters="profile = 'x'")
    assert run(book, capsys=capsys)[0] == 0
    shared = (book / "executed" / "01_ok.ipynb").read_bytes()
    status, out, _ = run(book, "--profile", "paper", "-p", "data_root=/x", capsys=capsys)
    assert status == 0, out
    paper = book / "executed" / "paper"
    index = nbformat.read(paper / "index.ipynb", as_version=4)
    assert index.metadata["book"]["parameters"] == {"profile": "paper"}  # executed again, with its profile
    assert "copied from executed/01_ok.ipynb" in out and (paper / "01_ok.ipynb").read_bytes() == shared
    embedded = nbformat.read(book / "executed" / "index.ipynb", as_version=4)
    assert embedded.metadata["book"]["parameters"] == {"profile": "embedded"}  # the default's copies left alone


def test_another_profile_gets_a_table_of_contents_for_its_copies(book):
    paths = build_book.BookPaths.of(book, "paper")
    assert (paths.executed, paths.html) == (book / "executed" / "paper", book / "_build" / "paper" / "html")
    paths.write_toc(book)
    assert yaml.safe_load(paths.toc.read_text()) == {
        "format": "jb-book", "root": "executed/paper/index", "chapters": [{"file": "executed/paper/01_ok"}]}
    default = build_book.BookPaths.of(book, "embedded")
    assert (default.executed, default.html, default.toc) == (book / "executed", book / "_build" / "html", None)


def test_every_registered_experiment_names_the_chapter_that_exports_it():
    from contrastive_explanations.results import EXPERIMENTS, find_experiment

    chapters = {name: build_book.experiment_chapter(ROOT, find_experiment(name)) for name in EXPERIMENTS}
    assert chapters["perturbation"] == "nbs/07_perturbation.ipynb" and chapters["vit_maps"] == "nbs/11_vit_maps.ipynb"
    assert all(c.startswith("nbs/") and (ROOT / c).is_file() for c in chapters.values()), chapters


def test_a_chapter_that_makes_what_others_open_runs_first(book, capsys):
    "The training chapter comes late in the reading order but makes the checkpoints the experiments open."
    notebook(book / "nbs" / "01_ok.ipynb", "from pathlib import Path", "assert Path('made.txt').read_text() == 'ok'")
    notebook(book / "nbs" / "02_maker.ipynb", "from pathlib import Path", "Path('made.txt').write_text('ok')",
             metadata={"book": {"runs_first": True}})
    (book / "_toc.yml").write_text("format: jb-book\nroot: executed/index\nchapters:\n  - file: executed/01_ok\n"
                                   "  - file: executed/02_maker\n")
    status, out, err = run(book, capsys=capsys)
    assert status == 0, err
    assert out.index("nbs/02_maker.ipynb") < out.index("nbs/01_ok.ipynb")


def test_toc_entry_without_a_notebook_is_reported(book, capsys):
    (book / "_toc.yml").write_text("format: jb-book\nroot: executed/index\nchapters:\n  - file: executed/02_gone\n")
    status, _, err = run(book, capsys=capsys)
    assert status == 1 and "_toc.yml lists 02_gone but nbs/ has no such notebook" in err


def test_the_real_toc_lists_existing_notebooks():
    chapters = build_book.toc_chapters(ROOT)
    assert chapters[0] == "index" and "01_targets" in chapters


def test_without_npm_the_book_falls_back_to_the_cdns_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(book_assets.shutil, "which", lambda name: None)
    assert book_assets.ensure_assets(tmp_path / "book_assets") is False
    assert capsys.readouterr().out.count("npm not found") == 1
    assert not (tmp_path / "book_assets").exists()
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    cdn = build_book.cdn_config(config, ROOT)
    assert not set(build_book.ASSET_KEYS) & set(cdn["sphinx"]["config"])
    assert set(build_book.ASSET_KEYS) <= set(config["sphinx"]["config"]), "the original config is left alone"
    assert cdn["sphinx"]["extra_extensions"] == config["sphinx"]["extra_extensions"]
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in cdn["sphinx"]["local_extensions"].values())


def test_assets_named_in_the_config_are_the_ones_fetched():
    "Every local path that _config.yml serves is produced by tools/book_assets.py."
    import yaml

    sphinx = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    produced = {target for copies in book_assets.PACKAGES.values() for _, target in copies}
    produced |= set(book_assets.LOCAL.values())
    for path in [sphinx["mathjax_path"], *sphinx["nb_ipywidgets_js"]]:
        assert path in produced, f"{path} is served by the book but never fetched"
    assert sphinx["html_static_path"] == ["book_assets"]


# ---- what a chapter reads: it re-runs when one of those changes, and says which

def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new))


PACKAGE = {  # a small package of the book's name: a imports b; c is imported by nobody
    "contrastive_explanations/__init__.py": "",
    "contrastive_explanations/a.py": '"""A."""\nfrom .b import VALUE\n',
    "contrastive_explanations/b.py": '"""The value."""\nVALUE = 1\n',
    "contrastive_explanations/c.py": '"""Unused."""\nOTHER = 2\n',
}
OWN_PACKAGE = "import sys\nsys.path.insert(0, '..')  # the book's own package, not the installed one\n"


def test_a_module_edit_re_runs_only_the_chapters_that_import_it_and_names_the_module(book, capsys):
    write(book, PACKAGE)
    notebook(book / "nbs" / "01_ok.ipynb",
             OWN_PACKAGE + "from contrastive_explanations.a import VALUE\nassert VALUE == 1")
    assert run(book, capsys=capsys)[0] == 0
    edit(book / "contrastive_explanations" / "c.py", "Unused.", "Not imported by any chapter.")
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 2, out
    edit(book / "contrastive_explanations" / "b.py", "The value.", "The value, documented.")  # a docstring only
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 1, out
    assert "runs: contrastive_explanations/b.py changed (imported via contrastive_explanations.a)" in out, out
    nb = nbformat.read(book / "executed" / "01_ok.ipynb", as_version=4)
    assert nb.metadata["book"]["inputs"]["via"]["contrastive_explanations/b.py"] == (
        "contrastive_explanations.a → contrastive_explanations.b")


def test_imports_are_followed_as_python_runs_them(tmp_path):
    write(tmp_path, {
        "contrastive_explanations/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                "    from .methods import GradCAM\n    from .viz import show\n",
        "contrastive_explanations/methods/__init__.py": "from .cam import GradCAM\n",
        "contrastive_explanations/methods/cam.py": "from ..data import models\nGradCAM = 1\n",
        "contrastive_explanations/data/__init__.py": "", "contrastive_explanations/data/models.py": "",
        "contrastive_explanations/viz.py": "", "contrastive_explanations/cli.py": "",
        "contrastive_explanations/results.py": "REGISTRY = {'p': 'contrastive_explanations.experiments.p:P'}\n",
        "contrastive_explanations/experiments/__init__.py": "", "contrastive_explanations/experiments/p.py": "",
        "pyproject.toml": "[project.scripts]\nce-explain = 'contrastive_explanations.cli:main'\n"})
    (tmp_path / "nbs").mkdir()
    rel = lambda found: {f.relative_to(tmp_path / "contrastive_explanations").as_posix() for f in found}
    follow = lambda *cells: rel(build_book.ImportFollower(tmp_path).follow(nb(*cells)))

    def nb(*cells):
        notebook(tmp_path / "nbs" / "x.ipynb", *cells)
        return tmp_path / "nbs" / "x.ipynb"

    lazy = follow("from contrastive_explanations import GradCAM")  # loaded on first use, from its TYPE_CHECKING home
    assert lazy == {"__init__.py", "methods/__init__.py", "methods/cam.py", "data/__init__.py", "data/models.py"}
    assert follow("import contrastive_explanations") == {"__init__.py"}  # TYPE_CHECKING imports never run
    assert follow("import contrastive_explanations as ce\nce.viz.show()") == {"__init__.py", "viz.py"}
    assert follow("!python -m contrastive_explanations.cli x.png") == {"__init__.py", "cli.py"}
    assert follow("import subprocess\nsubprocess.run(['ce-explain', 'x.png'])") == {"__init__.py", "cli.py"}
    assert follow("from contrastive_explanations.results import REGISTRY") == {
        "__init__.py", "results.py", "experiments/__init__.py", "experiments/p.py"}  # imported by name
    assert follow("x = 1") == set()


def test_the_real_chapters_follow_their_imports():
    inputs = lambda chapter: build_book.chapter_inputs(ROOT, ROOT / "nbs" / f"{chapter}.ipynb", {})
    targets = set(inputs("02_explain")["files"])
    assert "contrastive_explanations/methods/targets.py" in targets and "constraints.txt" in targets
    assert not {"contrastive_explanations/explorer.py", "contrastive_explanations/results.py"} & targets, targets
    assert "contrastive_explanations/explorer.py" in inputs("index")["files"]
    assert "reference/review_figure1.csv" in inputs("07_perturbation")["files"]
    assert "benchmarks/results/methods.json" in inputs("17_performance")["files"]


READS_SECTION = """\
from contrastive_explanations.run import load_profile
config = load_profile(profile, overrides)
def check(config):  # a parameter of its own name: not the profile
    return config.n >= 1
assert config.section("{}")["n"] >= 1"""


def test_a_changed_profile_section_re_runs_only_the_chapters_that_read_it(book, capsys):
    (book / "settings.ini").write_text("[DEFAULT]\n")  # the notebooks' load_profile finds the project by it
    (book / "params" / "embedded.yaml").write_text("profile: embedded\ndata_root: ''\nseed: 0\n"
                                                   "alpha: {n: 1}\nbeta: {n: 2}\n")
    for name, section in [("index", "alpha"), ("01_ok", "beta")]:
        notebook(book / "nbs" / f"{name}.ipynb", READS_SECTION.format(section),
                 parameters="profile = 'x'\noverrides = {}")
    assert run(book, capsys=capsys)[0] == 0
    status, out, _ = run(book, "-p", "beta.n=5", capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 1 and "profile section beta changed" in out, out
    assert "[1/2] nbs/index.ipynb ...\n      unchanged, kept" in out
    edit(book / "params" / "embedded.yaml", "alpha: {n: 1}", "alpha: {n: 3}")
    status, out, _ = run(book, "-p", "beta.n=5", capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 1 and "profile section alpha changed" in out, out
    edit(book / "params" / "embedded.yaml", "seed: 0", "seed: 1")  # a profile-wide setting: both
    status, out, _ = run(book, "-p", "beta.n=5", capsys=capsys)
    assert status == 0 and out.count("profile setting seed changed") == 2, out


def test_what_a_chapter_reads_of_the_profile():
    reads = build_book.profile_reads
    assert reads([READS_SECTION.format("alpha")]) == {"alpha"}
    assert reads(["c = load_profile(profile, overrides)\nc.run_settings('x'); c.shards('y'); c['seed']; c.get('d')"
                  "\nc.results_dir(e)"]) == {"x", "y", "seed", "d"}
    assert reads(["seed = load_profile(profile, overrides)['seed']", "load_profile(profile, overrides)"]) == {"seed"}
    assert reads(["c = load_profile(profile, overrides)\npreflight(c)"]) is None  # passed on: it may read anything
    assert reads(["c = load_profile(profile, overrides)\nfor k in c: print(k)"]) is None


def test_editing_a_reference_table_re_executes_the_chapters_that_read_it(book, capsys):
    (book / "settings.ini").write_text("[DEFAULT]\n")
    (book / "reference").mkdir()
    (book / "reference" / "review_figure1.csv").write_text("eps,d_pt\n0.003,0.1\n")
    (book / "reference" / "review_table1.csv").write_text("method,ori\nGradCAM,0.5\n")
    notebook(book / "nbs" / "01_ok.ipynb", "from contrastive_explanations.results import reference_table\n"
             "assert len(reference_table('review_figure1')) == 1")
    assert run(book, capsys=capsys)[0] == 0
    (book / "reference" / "review_table1.csv").write_text("method,ori\nGradCAM,0.6\n")  # read by no chapter
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 2, out
    (book / "reference" / "review_figure1.csv").write_text("eps,d_pt\n0.003,0.2\n")
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 1 and "runs: reference/review_figure1.csv changed" in out
    (book / "constraints.txt").write_text("torch==2.5.1\n")  # the pins: every chapter
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("constraints.txt newly read") == 2, out


def test_a_chapter_that_reads_results_says_which_chapter_made_it_run_again(book, capsys):
    notebook(book / "nbs" / "index.ipynb", "x = 1", metadata={"book": {"reads_results": True}})
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and "[2/2] nbs/index.ipynb" in out and out.count("runs: no earlier copy") == 2, out
    notebook(book / "nbs" / "01_ok.ipynb", "x = 3")
    status, out, _ = run(book, capsys=capsys)
    assert "runs: notebook changed" in out and "runs: reads results and 01_ok ran" in out, out
    status, out, _ = run(book, "--force", capsys=capsys)
    assert out.count("runs: --force") == 2, out


def test_only_executes_the_named_chapter(book, capsys):
    status, out, _ = run(book, "--only", "01_ok", capsys=capsys)
    assert status == 0 and "1 of 2 chapters executed" in out, out
    assert (book / "executed" / "01_ok.ipynb").exists() and not (book / "executed" / "index.ipynb").exists()
    assert (book / "_build" / "html" / "index.html").exists(), "--only leaves the built book alone"
    status, _, err = run(book, "--only", "02_nope", capsys=capsys)
    assert status == 2 and "unknown chapter '02_nope' for --only" in err, err


# ---- the executed copies, tidied for reading

PROGRESS_AND_MENU = """\
import ipywidgets as w
from tqdm.auto import tqdm  # as contrastive_explanations.results does

bar = tqdm(range(3), desc="shard 1/1", leave=False)
for _ in bar:
    pass
import tqdm.notebook
assert isinstance(bar, tqdm.notebook.tqdm_notebook), type(bar)  # under a kernel: a widget, as in the chapters
menu = w.Dropdown(options=["a", "b"])
stack = w.Stack([w.Image(value=b"a", format="png"), w.Image(value=b"b", format="png")])
w.jslink((menu, "index"), (stack, "selected_index"))
explorer = w.VBox([menu, stack])
explorer.add_class("ce-static-explorer")
explorer"""


def test_executed_copies_have_no_directive_lines_and_no_progress_bars(book, capsys):
    notebook(book / "nbs" / "01_ok.ipynb", "#| export\nx = 1 + 1", "#| hide", PROGRESS_AND_MENU,
             "  #| echo: false\nassert x == 2\nprint('#| inside a string stays')")
    status, out, err = run(book, capsys=capsys)
    assert status == 0, out + err
    nb = nbformat.read(book / "executed" / "01_ok.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(line.lstrip().startswith("#|") for c in code for line in c.source.splitlines())
    assert code[0].source == "x = 1 + 1"
    assert code[1].source == "" and "remove-cell" in code[1].metadata.tags  # nothing left to show
    assert "print('#| inside a string stays')" in code[3].source
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    names = {m["model_name"] for m in state.values()}
    assert {"DropdownModel", "StackModel", "ImageModel", "VBoxModel", "LinkModel"} <= names, names
    assert not names & {"FloatProgressModel", "IntProgressModel", "HBoxModel"}, names
    views = [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for c in code for o in c.outputs
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1 and state[views[0]]["model_name"] == "VBoxModel", "only the explorer is shown"
    assert "ce-static-explorer" in state[views[0]]["state"]["_dom_classes"]
    refs = {v[10:] for m in state.values() for v in _values(m["state"]) if v.startswith("IPY_MODEL_")}
    assert refs <= set(state), "a kept widget refers to a removed one"
    mtime = (book / "executed" / "01_ok.ipynb").stat().st_mtime_ns
    assert build_book.tidy_executed(book / "executed" / "01_ok.ipynb") is False  # already tidy: left alone
    assert (book / "executed" / "01_ok.ipynb").stat().st_mtime_ns == mtime


def _values(state: dict) -> list[str]:
    return [x for v in state.values() for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]


STDERR = """\
import sys, warnings
print("a result")
print("\\r      perturbation/efficientnet_lite0 shard 1/1:   0%|          | 0/5", file=sys.stderr)
warnings.warn("careful: a warning")"""


def test_executed_copies_have_no_stderr_and_the_console_lists_what_was_removed(book, capsys):
    notebook(book / "nbs" / "01_ok.ipynb", STDERR, "print('more', file=sys.stderr)")
    status, out, err = run(book, capsys=capsys)
    assert status == 0, out + err
    nb = nbformat.read(book / "executed" / "01_ok.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("name") == "stderr"], outputs
    assert [o["text"] for o in outputs] == ["a result\n"], "stdout stays"
    line = "removed 2 stderr outputs from the page, the first: perturbation/efficientnet_lite0 shard 1/1:   0%|"
    assert out.count("removed 2 stderr outputs") == 1 and line in out, out  # the kernel joins a cell's streams


def test_every_page_says_how_it_was_built_and_hides_the_injected_parameters(book, capsys):
    notebook(book / "nbs" / "index.ipynb", "assert overrides == {'data_root': '/my/own/data'}",
             parameters="profile = 'x'\noverrides = {}", tags=("hide-input",))
    status, out, _ = run(book, "-p", "data_root=/my/own/data", capsys=capsys)
    assert status == 0, out
    index = nbformat.read(book / "executed" / "index.ipynb", as_version=4)
    injected = [c for c in index.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "/my/own/data" in injected[0].source
    assert injected[0].metadata["tags"] == ["injected-parameters", "remove-cell"], "the builder's folders not shown"
    footer = index.cells[-1]
    assert footer.cell_type == "markdown" and "Built with the `embedded` profile" in footer.source
    assert f"on {date.today().isoformat()}" in footer.source
    assert "{download}`nbs/index.ipynb </nbs/index.ipynb>`" in footer.source  # from the book's root
    assert "`python -m tools.build_book --only index --force`" in footer.source
    chapter = nbformat.read(book / "executed" / "01_ok.ipynb", as_version=4)
    assert "it takes no profile" in chapter.cells[-1].source and "profile" not in chapter.metadata["book"]["parameters"]
    assert sum("Built" in c.source for c in chapter.cells) == 1
    paper = book_pages.footer_text("14_x", "paper", "0123456789abcdef+dirty", date(2026, 12, 7), 75, "embedded")
    assert paper.startswith("Built with the `paper` profile at commit `0123456` with uncommitted changes on "
                            "2026-12-07 in 1 min 15 s.")
    assert "</nbs/14_x.ipynb>" in paper and "--only 14_x --profile paper --force" in paper
    assert "`make book PROFILE=paper`" in paper


def test_a_build_writes_the_execution_statistics_page(book, capsys):
    (book / "_toc.yml").write_text("format: jb-book\nroot: executed/index\nchapters:\n  - file: executed/01_ok\n"
                                   "  - file: executed/statistics\n")  # a generated page: no notebook needed
    assert run(book, capsys=capsys)[0] == 0
    page = (book / "executed" / "statistics.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| {doc}")]
    assert [r.split("|")[1].strip() for r in rows] == ["{doc}`index`", "{doc}`01_ok`"]
    assert all("| executed |" in r for r in rows) and "| none (the same in every profile) |" in rows[1]
    assert "| embedded |" in rows[0] and page.startswith("# Execution statistics\n")
    assert "executed 2 and reused 0" in page
    notebook(book / "nbs" / "01_ok.ipynb", "x = 3")
    assert run(book, capsys=capsys)[0] == 0
    page = (book / "executed" / "statistics.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| {doc}")]
    assert "executed 1 and reused 1" in page and "| reused |" in rows[0] and "| executed |" in rows[1], page


SHARDED_CHAPTER = '''
from contrastive_explanations.results import Experiment, run
class Count(Experiment):
    name = "count"
    batch_size = 1
    def __len__(self):
        return 3
    def rows(self, indices):
        return [{"item": i} for i in indices]
table = run(Count(), "results-here", count=1)
assert len(table) == 3
'''


def test_progress_goes_to_the_console_of_the_build_not_into_the_page(book, capfd):
    notebook(book / "nbs" / "01_ok.ipynb", SHARDED_CHAPTER)
    status = build_book.main(["--no-html"], root=book)
    out, err = capfd.readouterr()
    assert status == 0, out + err
    assert "count shard 1/1" in err and "3/3" in err, err  # the kernel's bar, with its count (and time left)
    assert "chapters executed in" in out and "[2/2] nbs/01_ok.ipynb" in out
    nb = nbformat.read(book / "executed" / "01_ok.ipynb", as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not any("count shard" in str(o) for o in outputs), outputs  # neither text nor widget in the page
    assert "widgets" not in nb.metadata


def test_a_second_build_estimates_the_time_left_from_the_first(book, capsys):
    run(book, capsys=capsys)
    (book / "_build" / "timings-embedded.json").write_text('{"index": {"seconds": 30}, "01_ok": {"seconds": 90}}')
    status, out, _ = run(book, "--force", capsys=capsys)
    assert status == 0 and "[1/2] nbs/index.ipynb (at most about 2 min 00 s left" in out, out
    assert build_book.duration(7384) == "2 h 03 min" and build_book.duration(5) == "5 s"


def test_the_style_sheet_lets_wide_equations_and_code_lines_scroll_in_their_column():
    import re

    css = re.sub(r"/\*.*?\*/", "", (ROOT / "tools" / "static" / "book.css").read_text(), flags=re.S)
    rules: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", css):
        for selector in selectors.split(","):
            rules[" ".join(selector.split())] = rules.get(" ".join(selector.split()), "") + body
    for selector in ("div.math", "div.cell div.cell_input pre", "div.cell div.cell_output"):
        assert "overflow-x: auto" in rules.get(selector, ""), f"{selector} does not scroll sideways"
    assert "max-width: 100%" in rules["div.math"] and "div.book-footer" in rules


@pytest.mark.parametrize("has_filter", [True, False], ids=["data-filter", "python-3.11.2"])
def test_assets_unpack_with_or_without_tarfiles_data_filter(tmp_path, monkeypatch, has_filter):
    "Debian 12's Python 3.11.2 has no tarfile filter: the assets step must unpack there too, and refuse the same."
    import io
    import tarfile

    if not has_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

    def tarball(name: str, members: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    good = tarball("good.tgz", {"package/dist/ort.min.js": b"// js"})
    with tarfile.open(good) as tar:
        book_assets.extract(tar, tmp_path / "good")
    assert (tmp_path / "good" / "package" / "dist" / "ort.min.js").read_bytes() == b"// js"
    evil = tarball("evil.tgz", {"package/../../outside.txt": b"no"})
    with tarfile.open(evil) as tar, pytest.raises(Exception, match="outside"):
        book_assets.extract(tar, tmp_path / "evil" / "here")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "evil" / "outside.txt").exists()


# ---- several chapters at once (--jobs)

WAIT_FOR = """\
import os
import time
from pathlib import Path
Path({mine!r}).write_text(os.environ.get('OMP_WAIT_POLICY', 'unset'))
for _ in range(600):  # one minute at most: the other chapter must be running beside this one
    if Path({other!r}).exists():
        break
    time.sleep(0.1)
assert Path({other!r}).exists(), 'the other chapter did not run at the same time'
"""


def test_jobs_run_chapters_side_by_side_each_printed_in_one_block(book, capsys, monkeypatch):
    """Each chapter waits for the other's file: only side by side do both finish; readers still run after both.
    Their kernels' OpenMP threads sleep while they wait (side by side, spinning ones slow each other several-fold)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    here = Path.cwd()
    notebook(book / "nbs" / "01_ok.ipynb", WAIT_FOR.format(mine="a.txt", other="b.txt"))
    notebook(book / "nbs" / "02_ok.ipynb", WAIT_FOR.format(mine="b.txt", other="a.txt"))
    notebook(book / "nbs" / "index.ipynb", "from pathlib import Path",
             "assert Path('a.txt').exists() and Path('b.txt').exists()",
             metadata={"book": {"reads_results": True}})
    (book / "_toc.yml").write_text("format: jb-book\nroot: executed/index\nchapters:\n  - file: executed/01_ok\n"
                                   "  - file: executed/02_ok\n")
    status, out, err = run(book, "--jobs", "2", capsys=capsys)
    assert status == 0, err
    assert "(2 chapters, 2 at a time)" in out, out
    for n, chapter in ((1, "01_ok"), (2, "02_ok")):  # the header, why it ran and its time, together
        block = out[out.index(f"[{n}/3] nbs/{chapter}.ipynb:"):].splitlines()[:3]
        assert block[1] == "      runs: no earlier copy" and block[2].endswith(" s"), block
    assert out.index("[3/3] nbs/index.ipynb") > max(out.index("[1/3]"), out.index("[2/3]"))
    assert all((book / "executed" / f"{c}.ipynb").is_file() for c in ("index", "01_ok", "02_ok"))
    assert [(book / "nbs" / f).read_text() for f in ("a.txt", "b.txt")] == ["PASSIVE", "PASSIVE"]
    assert "OMP_WAIT_POLICY" not in os.environ  # the build's own environment is as it was
    assert Path.cwd() == here  # and its working directory (the chapters' kernels ran in nbs/: a.txt is there)


def test_jobs_a_failing_chapter_stops_the_build_and_names_its_cell(book, capsys):
    here = Path.cwd()
    notebook(book / "nbs" / "02_bad.ipynb", "x = 1", "raise ValueError('broken on purpose')")
    (book / "_toc.yml").write_text("format: jb-book\nroot: executed/index\nchapters:\n  - file: executed/01_ok\n"
                                   "  - file: executed/02_bad\n")
    status, out, err = run(book, "--jobs", "2", capsys=capsys)
    assert status == 1 and "nbs/02_bad.ipynb failed at cell 1" in err and "broken on purpose" in err, err
    assert not (book / "executed" / "02_bad.ipynb").exists() and (book / "executed" / "02_bad.failed.ipynb").exists()
    assert "[3/3] nbs/02_bad.ipynb:" in out, out  # its lines, printed when it failed
    assert Path.cwd() == here  # the build's working directory is left as it was


def test_jobs_below_one_is_a_one_line_error(book, capsys):
    status, out, err = run(book, "--jobs", "0", capsys=capsys)
    assert status == 2
    assert err.strip() == ("error: --jobs must be 1 or more (chapters executed at once) or 'auto', got 0: "
                           "e.g. --jobs 2")
    assert not (book / "executed").exists()


def test_jobs_auto_is_two_on_a_cpu_and_one_on_a_gpu(monkeypatch):
    "Whatever the profile's name: the device decides (make book DEVICE=cuda on the embedded profile runs one at a time)."
    monkeypatch.setattr(build_book.os, "cpu_count", lambda: 2)
    assert build_book.chapter_jobs("auto", "cpu") == 2
    assert build_book.chapter_jobs("auto", "cuda") == build_book.chapter_jobs("auto", "cuda:1") == 1
    monkeypatch.setattr(build_book.os, "cpu_count", lambda: 1)
    assert build_book.chapter_jobs("auto", "cpu") == 1 and build_book.chapter_jobs("3", "cuda") == 3
    with pytest.raises(build_book.UsageError, match="got x"):
        build_book.chapter_jobs("x", "cpu")


def test_every_chapter_that_quotes_the_profiles_results_runs_after_the_experiments():
    "A chapter reading results it does not compute (all of a profile's tables) is marked reads_results: it runs last."
    reading = re.compile(r"experiment_tables\(profile,|results_folders\(results_dir\(profile,")
    for chapter in build_book.toc_chapters(ROOT):
        src = "\n".join(build_book.code_cells(ROOT / "nbs" / f"{chapter}.ipynb"))
        if reading.search(src):
            assert build_book.reads_results(ROOT, chapter), chapter
