"""No tracked file points outside the repository: results, notebooks, docs and code refer to the repository by
relative paths (a clone elsewhere reads the same) and a folder outside it by its name alone, and the stored benchmark
results record the commands the README runs."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def machine_paths() -> list[str]:
    "Absolute folders of this machine that must not appear in a tracked file: the checkout and the home folder."
    return sorted({str(ROOT), f"{Path.home()}/"} - {"/", "//"})


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: nothing is tracked here")
    files = []
    for name in filter(None, out.stdout.split("\0")):
        path = ROOT / name
        if path.is_file() and path.stat().st_size < 2_000_000:
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # images, weights: not text
            files.append(path)
    return files


def offending(text: str, paths: list[str]) -> list[str]:
    "The machine paths that `text` names."
    return [p for p in paths if p in text]


def test_the_check_finds_a_machine_path():
    paths = machine_paths()
    assert offending(f"results written to {ROOT}/results/embedded", paths)
    assert not offending("results written to results/embedded (relative to the repository)", paths)


def test_no_tracked_file_names_a_folder_of_this_machine():
    paths = machine_paths()
    bad = {str(p.relative_to(ROOT)): hits for p in tracked_text_files() if (hits := offending(p.read_text(), paths))}
    assert not bad, f"tracked files name folders of this machine (use paths relative to the repository): {bad}"


def recorded_commands(value) -> list[str]:
    "Every `command` a benchmark result records, at any depth (a run's later runs record theirs too)."
    if isinstance(value, dict):
        return [c for k, v in value.items() for c in ([v] if k == "command" and isinstance(v, str) else
                                                      recorded_commands(v))]
    return [c for v in value for c in recorded_commands(v)] if isinstance(value, list) else []


def test_benchmark_results_record_the_commands_the_readme_runs():
    "A stored benchmark says how to run it again the way the README does: as a module from the repository root."
    import json
    readme = (ROOT / "README.md").read_text()
    assert "python -m benchmarks.run_all" in readme and "python -m tools.build_book" in readme
    assert recorded_commands({"a": [{"command": "python x.py"}], "command": "python -m y"}) == ["python x.py", "python -m y"]
    bad = {p.name: c for p in sorted((ROOT / "benchmarks" / "results").glob("*.json"))
           for c in recorded_commands(json.loads(p.read_text()))
           if not c.startswith(("python -m benchmarks.run_all", "python -m tools.build_book"))}
    assert not bad, f"benchmark results record commands the README does not use (run them as modules): {bad}"
