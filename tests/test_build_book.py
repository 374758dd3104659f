"""The main job's script (tools/build_book.py): profiles, bad input, failing chapters, re-runs, tidy pages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from tools import book_assets, build_book

ROOT = Path(__file__).resolve().parents[1]


def notebook(path: Path, *sources: str, parameters: str | None = None) -> None:
    cells = []
    if parameters is not None:
        cells.append(new_code_cell(parameters, metadata={"tags": ["parameters", "remove-cell"]}))
    cells += [new_code_cell(s) for s in sources]
    nb = new_notebook(cells=cells)
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
    assert chapters["perturbation"] == "nbs/14_perturbation.ipynb" and chapters["vit_maps"] == "nbs/18_vit_maps.ipynb"
    assert all(c.startswith("nbs/") and (ROOT / c).is_file() for c in chapters.values()), chapters


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


# ---- the build key: every file a chapter may read

def key_tree(root: Path) -> Path:
    "A project with one file of each kind that `KEY_FILES` names, and a notebook."
    for rel, text in {"contrastive_explanations/__init__.py": "", "contrastive_explanations/methods/cam.py": "A = 1\n",
                      "reference/review_table1.csv": "method,ori\nGradCAM,0.5\n",
                      "benchmarks/results/methods.json": "{}\n", "constraints.txt": "torch==2.5.1\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "nbs").mkdir(exist_ok=True)
    notebook(root / "nbs" / "01_x.ipynb", "x = 1")
    return root


@pytest.mark.parametrize("changed", ["reference/review_table1.csv", "contrastive_explanations/methods/cam.py",
                                     "benchmarks/results/methods.json", "constraints.txt"])
def test_a_change_in_any_file_a_chapter_reads_changes_its_key(tmp_path, changed):
    root = key_tree(tmp_path)
    key = lambda: build_book.build_key(root, root / "nbs" / "01_x.ipynb", {"profile": "embedded"})
    before = key()
    assert key() == before, "the key is deterministic"
    path = root / changed
    path.write_text(path.read_text().replace("0.5", "0.6").replace("1", "2").replace("{}", '{"a": 1}'))
    assert key() != before, f"editing {changed} left the key unchanged"


def test_a_new_module_in_a_subpackage_changes_the_key(tmp_path):
    root = key_tree(tmp_path)
    key = lambda: build_book.build_key(root, root / "nbs" / "01_x.ipynb", {})
    before = key()
    (root / "contrastive_explanations" / "experiments").mkdir()
    (root / "contrastive_explanations" / "experiments" / "toolkit.py").write_text("")
    assert key() != before


def test_the_real_key_covers_package_reference_benchmarks_and_pins():
    files = {f.relative_to(ROOT).as_posix() for f in build_book.key_files(ROOT)}
    for expected in ("contrastive_explanations/methods/targets.py", "contrastive_explanations/experiments/toolkit.py",
                     "contrastive_explanations/data/models.py", "contrastive_explanations/viz.py",
                     "reference/review_table1.csv", "benchmarks/results/methods.json", "constraints.txt"):
        assert expected in files, expected
    assert not any("__pycache__" in f for f in files)


def test_editing_a_reference_table_re_executes_the_chapters(book, capsys):
    (book / "reference").mkdir()
    (book / "reference" / "review_figure1.csv").write_text("eps,d_pt\n0.003,0.1\n")
    assert run(book, capsys=capsys)[0] == 0
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and out.count("unchanged, kept") == 2
    (book / "reference" / "review_figure1.csv").write_text("eps,d_pt\n0.003,0.2\n")
    status, out, _ = run(book, capsys=capsys)
    assert status == 0 and "unchanged" not in out


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
