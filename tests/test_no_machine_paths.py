"""No tracked file names a folder of the machine it was written on: results, notebooks, docs and code refer to the
repository by relative paths (a clone elsewhere reads the same), and a folder outside it by its name alone."""
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
