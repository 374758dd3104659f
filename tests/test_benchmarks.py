"""Structural tests of the benchmarks: each writes its results with the expected keys on a tiny random network.

No timing assertions: the numbers depend on the machine and its load. The benchmarks' own correctness checks
(explicit Eq. 1 against ours, the peers' maps against ours, the loops against the batched runs) are asserted here
on the tiny network, where they must hold to float precision."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--models", "tiny_cnn", "--size", "32", "--batch", "2", "--reps", "1", "--no-memory", "--threads", "1"]
RATIO_KEYS = {"value", "min", "max", "numerator", "denominator", "what", "goal", "goal_text", "met", "note"}


def check_file(path: Path, models: list[str]) -> dict:
    "The common structure of every benchmark's results file."
    data = json.loads(path.read_text())
    assert {"benchmark", "settings", "machine", "models", "process"} <= set(data)
    assert {"cpu", "threads", "torch", "load_average", "load_average_after", "malloc", "date"} <= set(data["machine"])
    assert data["process"]["max_rss_mb"] > 0 and data["process"]["wall_s"] > 0
    assert list(data["models"]) == models
    for entry in data["models"].values():
        for name, s in entry["seconds"].items():
            assert s["runs"] == len(s["times"]) >= 1 and s["min"] <= s["median"] <= s["max"], name
        for name, r in entry["ratios"].items():
            assert set(r) == RATIO_KEYS, name
            assert r["met"] is None if r["goal"] is None else isinstance(r["met"], bool), name
    return data


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    "Every benchmark in-process on the tiny network (one repetition), into a temporary folder."
    from benchmarks import (bench_capture, bench_masking, bench_methods, bench_metrics, bench_peers, bench_perturbation,
                            bench_targets)
    out = tmp_path_factory.mktemp("bench")
    for main, extra in ((bench_methods.main, ["--explicit-sample", "2"]), (bench_capture.main, []), (bench_peers.main, []),
                        (bench_targets.main, ["--sample", "2"]), (bench_perturbation.main, ["--n-tot", "2"]),
                        (bench_masking.main, []), (bench_metrics.main, ["--steps", "2"])):
        main(TINY + extra + ["--out-dir", str(out)])
    return out


def test_methods_file(quick):
    data = check_file(quick / "methods.json", ["tiny_cnn"])
    entry = data["models"]["tiny_cnn"]
    assert {"forward", "gradcam/weighted", "gradcam/12maps", "explicit/gradcam", "explicit/gradcam-deeper",
            "explicit/gradient"} <= set(entry["seconds"])
    goals = {k: tuple(r["goal"]) for k, r in entry["ratios"].items() if r["goal"]}
    assert goals["GradCAM: weighted / original"] == ("<=", 1.05)
    assert goals["GradCAM weighted / no-grad forward"] == ("<=", 1.10)
    assert goals["explicit Eq. 1 / ours: Gradient"] == (">=", 500)
    assert goals["explicit Eq. 1 / ours: GradCAM, last layer"] == (">=", 15)
    (check,) = entry["checks"].values()
    assert check < 1e-4  # Eq. 1 done explicitly, 200 backward passes, equals the one-pass weighted map


def test_capture_file(quick):
    data = check_file(quick / "capture.json", ["tiny_cnn"])
    entry = data["models"]["tiny_cnn"]
    assert set(entry["seconds"]) == {"forward", "gradcam/weighted", "gradcam/weighted-leaf"}
    assert entry["checks"] == {"same_maps": True}
    assert {tuple(r["goal"]) for r in entry["ratios"].values() if r["goal"]} == {("<=", 1.10)}


def test_the_old_capture_fails_on_an_in_place_layer_and_the_library_does_not():
    "What the capture benchmark's baseline could not do: the leaf itself changed in place by the next ReLU."
    import torch
    from torch import nn

    from benchmarks.bench_capture import old_capture
    from contrastive_explanations.methods.cam import GradCAM

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(1, 3, 8, 8)
    assert GradCAM(net, "0")(x, 0).maps.shape == (1, 1, 1, 6, 6)
    with old_capture(), pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        GradCAM(net, "0")(x, 0)


def test_peers_agree(quick):
    data = check_file(quick / "peers.json", ["tiny_cnn"])
    entry = data["models"]["tiny_cnn"]
    assert {"ours/weighted", "pytorch-grad-cam/softmax", "captum/softmax", "ours/12maps", "captum/12maps"} <= \
        set(entry["seconds"])
    assert len(entry["checks"]) == 4 and max(entry["checks"].values()) < 1e-4
    assert {r["goal_text"] for r in entry["ratios"].values()} == {"≥ 2.5", "≥ 0.95", "≥ 8", ""}
    assert set(data["settings"]["versions"]) == {"grad-cam", "captum"}


def test_targets_file(quick):
    data = check_file(quick / "targets.json", ["tiny_cnn"])
    entry = data["models"]["tiny_cnn"]
    assert set(entry["seconds"]) == {"batched", "loop", "loop-shared-forward", "loop-per-image"}
    assert entry["ratios"]["Figure 6: per-target loop / batched"]["goal"] == [">=", 10]
    assert entry["checks"]["batched vs loop norms, max relative difference"] < 1e-5
    assert "first 2 calls" in data["settings"]["extrapolated"]


def test_perturbation_file(quick):
    entry = check_file(quick / "perturbation.json", ["tiny_cnn"])["models"]["tiny_cnn"]
    assert set(entry["images_per_second"]) == {"ours", "review"}
    assert entry["checks"]["share of perturbed pixel values equal in both (to 1e-6)"] > 0.99


def test_masking_file(quick):
    data = check_file(quick / "masking.json", ["tiny_cnn"])
    assert data["settings"]["cells"] == 72
    assert data["models"]["tiny_cnn"]["checks"]["max |difference| of r, per cell vs ours"] < 1e-5


def test_metrics_file(quick):
    "Every metric against the maps' cost and against its library, on the same maps."
    entry = check_file(quick / "metrics.json", ["tiny_cnn"])["models"]["tiny_cnn"]
    assert {"maps", "deletion+insertion", "deletion+insertion torchcam", "ROAD", "ROAD pytorch-grad-cam",
            "random logit", "random logit Quantus", "MPRT", "MPRT Quantus", "pointing", "pointing Quantus"} == set(
        entry["seconds"])
    against = [r for r in entry["ratios"].values() if r["denominator"] != "maps"]
    assert len(against) == 5 and all(r["denominator"].startswith(r["numerator"] + " ") for r in against)
    assert set(entry["seconds_per_image"]) == set(entry["seconds"])


def test_ratio_per_round_and_goals():
    seconds = {"a": {"times": [2.0, 4.0, 9.0]}, "b": {"times": [1.0, 1.0, 3.0]}}
    r = common.ratio(seconds, "a", "b", (">=", 2.5))
    assert (r["value"], r["min"], r["max"], r["met"], r["goal_text"]) == (3.0, 2.0, 4.0, True, "≥ 2.5")
    assert common.ratio(seconds, "a", "b", ("<=", 2.5))["met"] is False
    assert common.ratio(seconds, "a", "b")["met"] is None


def test_time_all_interleaves_and_counts_owed_seconds():
    calls = []
    fns = {"x": lambda: calls.append("x"), "y": lambda: calls.append("y") or 5.0}
    seconds = common.time_all(fns, reps=3)
    assert calls == ["x", "y", "y", "x", "x", "y", "y", "x"]  # warm-up, then the order rotates
    assert seconds["x"]["runs"] == 3 and seconds["y"]["min"] >= 5.0


def test_results_path_separates_gpu_results(tmp_path):
    assert common.results_path("methods", "cpu", tmp_path) == tmp_path / "methods.json"
    assert common.results_path("methods", "cuda", tmp_path) == tmp_path / "methods-cuda.json"


def test_peak_memory_in_a_fresh_process():
    m = common.peak_memory("bench_masking", "tiny_cnn", "ours", {"device": "cpu", "batch": 2, "size": 32, "threads": 1})
    assert m["peak_mb"] > 50 and m["growth_mb"] >= 0


def test_peak_memory_of_a_failing_process_is_recorded_not_raised():
    m = common.peak_memory("bench_masking", "tiny_cnn", "no-such-variant", {"device": "cpu", "batch": 2, "size": 32,
                                                                               "threads": 1})
    assert m["peak_mb"] is None and "exit status 1" in m["error"] and "no-such-variant" in m["error"]


def test_run_all_quick_writes_the_summary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--only", "masking",
                          "--threads", "1", "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["quick"] and run["malloc"] == common.MALLOC
    assert run["benchmarks"]["masking"]["returncode"] == 0 and run["benchmarks"]["masking"]["max_rss_mb"] > 0
    check_file(tmp_path / "masking.json", ["tiny_cnn"])


def test_run_all_rejects_an_unknown_benchmark(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--only", "speed",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "invalid choice: 'speed'" in out.stderr


def test_each_model_records_a_failure_and_goes_on():
    results = {"models": {}}

    def measure(name):
        if name == "bad":
            raise MemoryError("out of memory")
        return None if name == "skipped" else {"seconds": {}}

    common.each_model(results, ["bad", "skipped", "good"], measure)
    assert results["failed"] == ["bad"] and results["models"]["bad"] == {"error": "MemoryError: out of memory"}
    assert list(results["models"]) == ["bad", "good"]


def test_bench_explainer_without_a_built_book_says_so_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_explainer", "--site", str(tmp_path), "--out-dir",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "is missing: build the book first (make book)" in out.stderr
    assert not (tmp_path / "out").exists()


def test_results_record_no_folder_of_the_machine_that_ran_them(tmp_path):
    "Tracked results name folders relative to the repository, and a folder outside it by its name alone."
    assert common.repo_relative(ROOT / "benchmarks" / "results") == "benchmarks/results"
    assert common.repo_relative(tmp_path) == f"<outside the repository>/{tmp_path.name}"
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        text = path.read_text()
        for absolute in (str(ROOT), f"{Path.home()}/", f"{tempfile.gettempdir()}/"):
            assert absolute not in text, f"{path.name} records {absolute}"
