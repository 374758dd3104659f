"""The paper profile's code path, end to end on a CPU: `tools.paper_fixture` writes a miniature of ImageNet val,
CUB-200-2011 and Food-101 in their official layouts and random DEFAULT weights under torchvision's file names; the
`fixture` profile (params/fixture.yaml: the paper profile with smaller counts) then fine-tunes the two networks and
runs every experiment chapter on them, reading the data root through a read-only view and writing only to its own
folders. Minutes, not hours; the numbers mean nothing, the code path is the paper's."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pandas as pd
import pytest

from contrastive_explanations.results import load_results, results_folders
from tools import paper_fixture

from conftest import tree_state

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ["10_training", "14_perturbation", "15_masking", "16_contrasts", "17_norm_logit", "18_vit_maps",
            "19_localisation", "21_claims"]  # in the book's order: the training chapter fine-tunes first
EXPERIMENTS = {"perturbation": 9, "feature_masking": 1, "contrasts": 1, "vit_maps": 1, "norm_logit": 2, "localisation": 2}


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
    env = {"TORCH_HOME": str(fixture / "torch_home"), "CONTRASTIVE_EXPLANATIONS_RESULTS": str(results)}
    overrides = {"data_root": str(data), "output_root": str(out)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cli = subprocess.run([sys.executable, "-m", "contrastive_explanations.results", "perturbation", "--profile",
                              "fixture", "--param", f"data_root={data}", "--param", f"output_root={out}", "--run",
                              "resnet18"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        ran = []
        for chapter in CHAPTERS:
            pm.execute_notebook(str(ROOT / "nbs" / f"{chapter}.ipynb"), str(base / f"{chapter}.ipynb"),
                                parameters={"profile": "fixture", "overrides": overrides}, cwd=str(ROOT / "nbs"),
                                kernel_name="python3", progress_bar=False)
            ran.append(chapter)
        yield {"data": data, "out": out, "results": results / "fixture", "before": before, "cli": cli, "ran": ran}
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        subprocess.run(["chmod", "-R", "u+w", str(data)], check=True)
        shutil.rmtree(base, ignore_errors=True)  # about 5 GB of random weights and checkpoints


def test_every_experiment_chapter_runs_the_paper_code_path(paper_run):
    assert paper_run["ran"] == CHAPTERS
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
