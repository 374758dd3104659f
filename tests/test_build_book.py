"""The main job's script (tools/build_book.py): profiles, bad input, failing chapters, re-runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402


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
    assert err.strip() == "error: unknown profile 'fast': choose one of embedded, paper (files in params/)"
    assert (book / "_build" / "html" / "index.html").read_text() == "an old book"
    assert not (book / "executed").exists()


def test_unknown_profile_from_the_command_line_exits_non_zero():
    result = subprocess.run([sys.executable, "tools/build_book.py", "--profile", "nope"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown profile 'nope': choose one of embedded, paper" in result.stderr


def test_a_profile_value_left_null_must_be_given(book, capsys):
    status, _, err = run(book, "--profile", "paper", capsys=capsys)
    assert status == 2 and "profile 'paper' needs data_root" in err and "DATA_ROOT=" in err
    status, _, err = run(book, "--profile", "embedded", "-p", "dataroot=/x", capsys=capsys)
    assert status == 2 and "unknown parameter 'dataroot'" in err


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


def test_toc_entry_without_a_notebook_is_reported(book, capsys):
    (book / "_toc.yml").write_text("format: jb-book\nroot: executed/index\nchapters:\n  - file: executed/02_gone\n")
    status, _, err = run(book, capsys=capsys)
    assert status == 1 and "_toc.yml lists 02_gone but nbs/ has no such notebook" in err


def test_the_real_toc_lists_existing_notebooks():
    chapters = build_book.toc_chapters(ROOT)
    assert chapters[0] == "index" and "01_targets" in chapters


def test_without_npm_the_book_falls_back_to_the_cdns_and_says_so_once(tmp_path, monkeypatch, capsys):
    import book_assets

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
    import book_assets
    import yaml

    sphinx = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    produced = {target for copies in book_assets.PACKAGES.values() for _, target in copies}
    produced |= set(book_assets.LOCAL.values())
    for path in [sphinx["mathjax_path"], *sphinx["nb_ipywidgets_js"]]:
        assert path in produced, f"{path} is served by the book but never fetched"
    assert sphinx["html_static_path"] == ["book_assets"]
