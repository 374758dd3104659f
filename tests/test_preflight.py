"""The preflight (nbs/31_run.ipynb): before a profile computes anything, every dataset folder, weight file and
checkpoint it opens is looked for, and what is missing is named in one message; the book build and the command line
stop on it with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

from contrastive_explanations.data.datasets import write_fixture
from contrastive_explanations.data.models import TORCHVISION_IMAGENET, weights_file
from contrastive_explanations.data import sources
from contrastive_explanations.run import preflight, preflight_report
from contrastive_explanations.run import load_profile

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_ARCHS = ("vgg16_bn", "vit_b_16")


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    "An empty TORCH_HOME, so that no weight file of this machine's cache is found."
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(sources, "download_server_reachable", lambda *a, **k: False)
    sources._dataset_problem.cache_clear()
    return home


def weight_path(arch: str, home: Path) -> Path:
    return home / "hub" / "checkpoints" / Path(torchvision.models.get_model_weights(arch).DEFAULT.url).name


def test_an_empty_data_root_lists_every_dataset_and_weight_file(tmp_path, torch_home):
    profile = load_profile("paper", {"data_root": str(tmp_path / "empty"), "output_root": str(tmp_path / "out")})
    (tmp_path / "empty").mkdir()
    report = preflight_report(preflight(profile), "paper")
    for dataset in ("ImageNet", "CUB-200-2011", "Food-101"):
        assert f"{dataset} (the " in report
    for arch in (*TORCHVISION_IMAGENET, *FINETUNE_ARCHS):
        assert str(weight_path(arch, torch_home)) in report, arch
    assert "fine-tuned checkpoint" not in report  # the training chapter of the same build writes them
    assert report.count("\n  - ") == 3 + len(TORCHVISION_IMAGENET) + len(FINETUNE_ARCHS)


def test_with_everything_in_place_nothing_is_missing(tmp_path, torch_home):
    data = tmp_path / "data"
    write_fixture("imagenet", data, n_classes=2, per_class=1)
    for name in ("cub200", "food101"):
        fixture = write_fixture(name, tmp_path / name, n_classes=2, per_class=2)
        for entry in fixture.iterdir():
            entry.rename(data / entry.name)
    for arch in (*TORCHVISION_IMAGENET, *FINETUNE_ARCHS):
        weight_path(arch, torch_home).parent.mkdir(parents=True, exist_ok=True)
        weight_path(arch, torch_home).touch()
    assert weights_file(torchvision.models.ResNet18_Weights.DEFAULT) == weight_path("resnet18", torch_home)
    settings = {"data_root": str(data), "output_root": str(tmp_path / "out")}
    assert preflight_report(preflight(load_profile("paper", settings)), "paper") == ""
    untrained = preflight_report(preflight(load_profile("paper", {**settings, "training.finetune": "[]"})), "paper")
    assert "vgg16_bn_cub fine-tuned checkpoint" in untrained and "vit_b_16_food101 fine-tuned checkpoint" in untrained
    assert str(tmp_path / "out" / "checkpoints" / "vgg16_bn_cub.pt") in untrained
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    for name in ("vgg16_bn_cub", "vit_b_16_food101"):
        (tmp_path / "out" / "checkpoints" / f"{name}.pt").touch()  # brought by the user: nothing to fine-tune
    brought = preflight(load_profile("paper", {**settings, "training.finetune": "[]"}))
    assert preflight_report(brought, "paper") == ""


def test_downloadable_weights_count_as_found_only_when_the_server_answers(tmp_path, torch_home, monkeypatch):
    assert not sources.weights_need("resnet18", download=True).found
    assert "cannot be reached" in sources.weights_need("resnet18", download=True).fix
    assert "download=true" in sources.weights_need("resnet18", download=False).fix
    monkeypatch.setattr(sources, "download_server_reachable", lambda *a, **k: True)
    assert sources.weights_need("resnet18", download=True).found and not sources.weights_need("resnet18", False).found


def test_the_embedded_profile_opens_nothing_it_lacks():
    assert preflight_report(preflight(load_profile("embedded")), "embedded") == ""


def test_make_book_with_an_empty_data_root_stops_at_once_with_one_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")}
    r = subprocess.run([sys.executable, "-m", "tools.build_book", "--profile", "paper", "--param",
                        f"data_root={empty}", "--param", f"output_root={tmp_path / 'out'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("error:") == 1 and "cannot start" in r.stderr and str(empty) in r.stderr
    assert "executing" not in r.stdout  # no chapter started
    assert not (tmp_path / "out").exists() and list(empty.iterdir()) == []


def test_the_command_line_names_what_its_run_lacks(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "CONTRASTIVE_EXPLANATIONS_RESULTS": str(tmp_path / "r")}
    r = subprocess.run([sys.executable, "-m", "contrastive_explanations.run", "masking", "--profile",
                        "paper", "--param", f"data_root={tmp_path}", "--param", f"output_root={tmp_path / 'out'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "CUB-200-2011" in r.stderr and "vgg16_bn_cub fine-tuned checkpoint" in r.stderr
    assert r.stderr.count("error:") == 1 and not (tmp_path / "r").exists()
