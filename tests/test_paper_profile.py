"""The paper profile's code path, end to end on a CPU: `tools.paper_fixture` writes a miniature of ImageNet val,
CUB-200-2011 and Food-101 in their official layouts and random DEFAULT weights under torchvision's file names; the
`fixture` profile (params/fixture.yaml: the paper profile with smaller counts) then builds the whole book as
`make book PROFILE=fixture` does, warnings as errors, into its own folder (`_build/fixture/html`): it fine-tunes the
two networks and runs every experiment chapter on them, reading the data root through a read-only view and writing
only to its own folders. Minutes, not hours; the numbers mean nothing, the code path is the paper's."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from contrastive_explanations.results import CONSOLE_PROGRESS, load_results, results_folders
from tools import build_book, paper_fixture

from conftest import tree_state

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "fixture"
# The first test builds the fixture book (the chapters that read the profile, a quarter of an hour on 2 cores) in its
# module fixture: the suite's 900 s guard against a hang is too short for that one setup, so this module has its own;
# and it is collected first, so that one of `make test`'s pytest workers starts on it at once.
pytestmark = [pytest.mark.timeout(3600), pytest.mark.long_setup]
BOOK = build_book.BookPaths.of(ROOT, PROFILE)
EXPERIMENTS = {"perturbation": 9, "masking": 1, "contrasts": 1, "vit_maps": 1, "norm_logit": 2, "localisation": 2,
               "field_tests": 5}


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    "The fixture written, its data root made read-only, and what the fixture profile computes from it."
    base = tmp_path_factory.mktemp("paper")
    fixture = base / "fixture"
    assert paper_fixture.main([str(fixture)]) == 0
    for arch in paper_fixture.networks():  # under the fixture's TORCH_HOME, never in this machine's torch cache
        assert paper_fixture.weights_path(fixture / "torch_home", arch).is_file(), arch
    data, out, results = fixture / "data", base / "out", base / "results"
    subprocess.run(["chmod", "-R", "a-w", str(data)], check=True)
    before = tree_state(data)
    embedded_book = tree_state(ROOT / "_build" / "html") if (ROOT / "_build" / "html").exists() else None
    env = {"TORCH_HOME": str(fixture / "torch_home"), "CONTRASTIVE_EXPLANATIONS_RESULTS": str(results)}
    old = {k: os.environ.get(k) for k in [*env, CONSOLE_PROGRESS]}
    os.environ.update(env)
    try:  # the README's commands: one run from the command line, then the book, which reuses it
        cli = subprocess.run([sys.executable, "-m", "contrastive_explanations.run", "perturbation", "--profile",
                              PROFILE, "--param", f"data_root={data}", "--param", f"output_root={out}", "--run",
                              "resnet18"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        status = build_book.main(["--profile", PROFILE, "--jobs", "2", "-p", f"data_root={data}", "-p",
                                  f"output_root={out}"], ROOT)
        profile = build_book.load_profile(ROOT, PROFILE, {"data_root": str(data), "output_root": str(out)})
        estimate = build_book.estimate(ROOT, profile, ["contrasts"])  # one run's calibration: VGG16-bn on CUB-200
        yield {"estimate": estimate, "data": data, "out": out, "results": results / PROFILE, "before": before, "cli": cli,
               "status": status, "embedded_book": embedded_book}
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        subprocess.run(["chmod", "-R", "u+w", str(data)], check=True)
        shutil.rmtree(base, ignore_errors=True)  # about 5 GB of random weights and checkpoints


def test_the_whole_book_builds_with_warnings_as_errors_into_its_own_folder(paper_run):
    assert paper_run["status"] == 0
    assert (BOOK.html / "index.html").is_file() and json.loads((BOOK.html / f".built-{PROFILE}").read_text())
    pages = {p.relative_to(BOOK.html).as_posix() for p in BOOK.html.rglob("*.html")}
    assert {f"executed/{PROFILE}/{chapter}.html" for chapter in build_book.toc_chapters(ROOT)} <= pages
    for chapter in build_book.toc_chapters(ROOT):  # each chapter's copy was executed with the fixture profile
        meta = nbformat.read(BOOK.executed / f"{chapter}.ipynb", as_version=4).metadata["book"]
        assert meta["parameters"].get("profile", PROFILE) == PROFILE, chapter
    if paper_run["embedded_book"] is not None:  # the embedded book, when there was one, is left as it was
        assert tree_state(ROOT / "_build" / "html") == paper_run["embedded_book"]


def _book_source(tmp_path: Path) -> Path:
    "A book root beside the checkout's: its configuration, extensions and notebooks, and a copy of the fixture's chapters."
    src = tmp_path / "book"
    src.mkdir()
    for name in ["_config.yml", "references.bib", "tools", "book_assets", "nbs"]:  # nbs: the pages offer their source
        if (ROOT / name).exists():
            (src / name).symlink_to(ROOT / name)
    shutil.copytree(BOOK.executed, src / build_book.EXECUTED / PROFILE)
    paths = build_book.BookPaths.of(src, PROFILE)
    shutil.copyfile(ROOT / "_toc.yml", src / "_toc.yml")
    paths.write_toc(src)
    return src


GLUE = re.compile(r"\{glue(?::\w+)?\}`([^`]+)`")


@pytest.mark.parametrize("broken", [False, True], ids=["intact", "one-glue-key-renamed"])
def test_a_glue_key_the_profile_does_not_compute_fails_the_build(paper_run, tmp_path, capfd, broken):
    assert paper_run["status"] == 0
    src = _book_source(tmp_path)
    chapter = src / build_book.EXECUTED / PROFILE / "07_perturbation.ipynb"
    nb = nbformat.read(chapter, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "markdown" and GLUE.search(c.source))
    key = GLUE.search(cell.source).group(1)
    if broken:
        cell.source = cell.source.replace(f"`{key}`", f"`{key}_not_computed`", 1)
        nbformat.write(nb, chapter)
    paths = build_book.BookPaths.of(src, PROFILE)
    offline = (ROOT / "book_assets").exists()
    if broken:
        with pytest.raises(build_book.BuildError, match="jupyter-book failed"):
            build_book.jupyter_book(src, paths.staging, offline, paths.toc)
        captured = capfd.readouterr()  # Sphinx writes its warnings to stderr
        assert f"{key}_not_computed" in captured.out + captured.err
    else:
        build_book.jupyter_book(src, paths.staging, offline, paths.toc)
        assert (paths.staging / "_build" / "html" / build_book.EXECUTED / PROFILE / "07_perturbation.html").is_file()


def test_the_estimate_times_a_run_on_its_first_batch_and_projects_its_chapter(paper_run):
    lines = paper_run["estimate"].splitlines()
    assert lines[0].startswith("estimated running time of profile 'fixture' on this machine"), lines
    run = next(line for line in lines if line.startswith("  nbs/09_contrasts.ipynb main: set-up "))
    assert re.search(r"items at [0-9.e+-]+ s each \(timed on [0-9]+\): about [0-9]", run), run
    assert lines[-2].startswith("  nbs/09_contrasts.ipynb: about ") and lines[-1].startswith("  in all: about ")


def test_every_experiment_chapter_runs_the_paper_code_path(paper_run):
    for experiment, runs in EXPERIMENTS.items():
        folders = results_folders(paper_run["results"] / experiment)
        assert len(folders) == runs, (experiment, folders)
        for folder in folders:
            table, prov = load_results(folder)
            assert len(table) > 0 and "CPU" in prov["device"], folder
    sources = set(pd.read_csv(paper_run["results"] / "contrasts" / "results.csv")["source"])
    assert sources == {"cub"}  # the paper's source, not the embedded ones


def test_the_readme_command_line_computed_what_the_chapter_reused(paper_run):
    assert paper_run["cli"].returncode == 0, paper_run["cli"].stderr[-2000:]
    _, prov = load_results(paper_run["results"] / "perturbation" / "resnet18")
    assert prov["params"]["model"] == "resnet18" and not (paper_run["results"] / "perturbation" / ".stale").exists()


def test_fine_tuned_checkpoints_go_to_the_output_root_and_nothing_under_the_data_root(paper_run):
    checkpoints = sorted(p.name for p in (paper_run["out"] / "checkpoints").iterdir())
    assert checkpoints == ["vgg16_bn_cub.last.pt", "vgg16_bn_cub.pt", "vit_b_16_food101.last.pt", "vit_b_16_food101.pt"]
    assert tree_state(paper_run["data"]) == paper_run["before"]
