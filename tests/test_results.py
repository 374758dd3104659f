"Results files: atomic writes, provenance, shards, resume, merge refusals, the command line and torchrun."
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, strategies as st

from contrastive_explanations import files as F
from contrastive_explanations import results as R
from contrastive_explanations import run as RUN

ROOT = Path(__file__).resolve().parents[1]


class Squares(R.Experiment):
    "A deterministic toy: one row per item; `fail_at` interrupts a run."
    name = "squares"

    def __init__(self, n: int = 10, power: int = 2, fail_at: int | None = None):
        self.n, self.power, self.fail_at = n, power, fail_at
        self.calls = 0

    @property
    def params(self):
        return {"n": self.n, "power": self.power}

    def __len__(self):
        return self.n

    def rows(self, indices):
        self.calls += len(indices)
        if self.fail_at in indices:
            raise KeyboardInterrupt("interrupted")
        return [{"item": i, "value": i ** self.power} for i in indices]


@given(st.integers(0, 200), st.integers(1, 20))
def test_shards_cover_items_once(n, count):
    ranges = [R.shard_range(i, count, n) for i in range(count)]
    assert [i for r in ranges for i in r] == list(range(n))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("index,count,word", [(0, 0, "count"), (3, 3, "index"), (-1, 2, "index"), (0, 1.5, "count")])
def test_bad_shards(index, count, word):
    with pytest.raises(ValueError, match=word):
        R.shard_range(index, count, 10)


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    F.write_json(tmp_path / "ok.json", {"x": np.float64(1.5), "t": torch.tensor([1, 2])})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"x": 1.5, "t": [1, 2]}
    with pytest.raises(TypeError, match="convert it"):
        F.write_json(tmp_path / "bad.json", {"m": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"]


def test_arrays_round_trip(tmp_path):
    maps = torch.randn(2, 3, 4)
    path = F.write_arrays(tmp_path / "maps.npz", {"seed": 3}, maps=maps, labels=np.array([1, 2]))
    arrays, prov = F.read_arrays(path)
    np.testing.assert_array_equal(arrays["maps"], maps.numpy())
    assert prov == {"seed": 3} and arrays["labels"].tolist() == [1, 2]


def test_provenance_fields_and_key():
    p = R.provenance("x", {"seed": 0}, {"model": "m"})
    assert {"git_commit", "code_version", "packages", "params", "fingerprints", "device", "created"} <= set(p)
    assert p["packages"]["torch"] == torch.__version__.split("+")[0] or p["packages"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert R.provenance("x", {"seed": 0}, {"model": "m"})["key"] == p["key"]
    assert R.provenance("x", {"seed": 0}, {"model": "other"})["key"] != p["key"]


def test_sharded_resumed_equals_single(tmp_path):
    single = R.run(Squares(), tmp_path / "single", progress=False)
    with pytest.raises(KeyboardInterrupt):
        R.run(Squares(fail_at=6), tmp_path / "sharded", count=5, progress=False)
    done = sorted(p.name for p in (tmp_path / "sharded").glob("shard-*.json"))
    assert len(done) == 3  # shards 0-2 finished before item 6 (shard 3) was interrupted
    resumed = Squares()
    table = R.run(resumed, tmp_path / "sharded", count=5, progress=False)
    assert resumed.calls == 4, "finished shards are not recomputed"
    pd.testing.assert_frame_equal(single, table)
    assert table["item"].tolist() == list(range(10))
    loaded, prov = R.load_results(tmp_path / "sharded")
    pd.testing.assert_frame_equal(loaded, table)
    assert prov["shards"] == 5 and prov["params"] == {"n": 10, "power": 2}


def test_partial_run_does_not_merge(tmp_path):
    assert R.run(Squares(), tmp_path, count=3, shards=[0, 2], progress=False) is None
    with pytest.raises(FileNotFoundError, match="1 of 3 shards"):
        R.merge(tmp_path, 3)
    assert R.run(Squares(), tmp_path, count=3, shards=[1], progress=False) is not None


def test_other_code_or_params_refused_then_recomputed(tmp_path):
    R.run(Squares(), tmp_path, count=2, progress=False)
    with pytest.raises(R.ResultsMismatchError, match="params"):
        R.run(Squares(power=3), tmp_path, count=2, progress=False)
    shard = R.shard_path(tmp_path, 1, 2)
    data = json.loads(shard.read_text())
    data["code_version"], data["key"] = "0" * 16, "f" * 16
    shard.write_text(json.dumps(data))
    with pytest.raises(R.ResultsMismatchError, match="code_version"):
        R.merge(tmp_path, 2, Squares().provenance())
    table = R.run(Squares(power=3), tmp_path, count=2, progress=False, on_stale="recompute")
    assert table["value"].tolist() == [i ** 3 for i in range(10)]
    with pytest.raises(ValueError, match="on_stale"):
        R.run(Squares(), tmp_path, on_stale="ignore")


def test_stale_results_are_kept_aside_under_the_name_of_their_code(tmp_path):
    out = tmp_path / "squares"
    R.run(Squares(), out, count=2, progress=False)
    before = R.load_results(out)[0]
    data = json.loads(R.shard_path(out, 0, 2).read_text())
    data["code_version"], data["key"] = "0123456789abcdef", "f" * 16  # as if other code had computed it
    R.shard_path(out, 0, 2).write_text(json.dumps(data))
    table = R.run(Squares(power=3), out, count=2, progress=False, on_stale="recompute")
    assert table["value"].tolist() == [i ** 3 for i in range(10)]
    (aside,) = (tmp_path / ".stale").iterdir()
    assert aside.name.startswith("squares.from-") and aside.name.endswith("-0123456789abcdef")
    pd.testing.assert_frame_equal(R.load_results(aside)[0], before)  # nothing lost
    assert R.results_folders(tmp_path) == [out]  # what the book reads leaves it out
    R.run(Squares(power=4), out, count=2, progress=False, on_stale="recompute")  # a second one gets its own name
    assert len(list((tmp_path / ".stale").iterdir())) == 2
    R.run(Squares(power=4), out, count=2, progress=False, force=True)  # deleting needs asking
    assert len(list((tmp_path / ".stale").iterdir())) == 2 and R.load_results(out)[0]["value"].iloc[2] == 16


def test_refusal_names_the_commands_that_recompute(tmp_path):
    R.run(Squares(), tmp_path, count=2, progress=False)
    with pytest.raises(R.ResultsMismatchError, match=r"--force.*on_stale='recompute' to keep it aside"):
        R.run(Squares(power=3), tmp_path, count=2, progress=False)


def package_copy(tmp_path) -> Path:
    import shutil
    copy = tmp_path / "contrastive_explanations"
    shutil.copytree(R.installed_package(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


PERTURBATION = "contrastive_explanations.experiments.perturbation"


def test_code_version_covers_the_code_an_experiment_runs_only(tmp_path):
    package = package_copy(tmp_path)
    before = R.code_version(PERTURBATION, package)
    explorer = package / "explorer.py"
    explorer.write_text(explorer.read_text() + "\n\ndef new_widget():\n    return 42\n")  # an unrelated module
    other = package / "experiments" / "masking.py"
    other.write_text(other.read_text().replace("def ", "def _renamed_", 1))  # another experiment
    own = package / "experiments" / "perturbation.py"
    text = own.read_text()
    doc = text.split('"""')[1]
    own.write_text(text.replace(doc, doc + " Reworded.", 1).replace("\nimport math\n", "\n# a comment\n\nimport math\n"))
    assert own.read_text().count("Reworded") == 1 and "# a comment" in own.read_text()
    assert R.code_version(PERTURBATION, package) == before  # results stay valid
    assert R.code_version(None, package) != R.code_version(None, R.installed_package())  # the whole package moved
    base = package / "experiments" / "base.py"  # code it imports
    base.write_text(base.read_text() + "\nEXTRA = 1\n")
    assert R.code_version(PERTURBATION, package) != before
    targets = package / "methods" / "targets.py"  # and code that code imports
    after_base = R.code_version(PERTURBATION, package)
    targets.write_text(targets.read_text() + "\nEXTRA = 2\n")
    assert R.code_version(PERTURBATION, package) != after_base


def test_code_files_follow_relative_absolute_and_submodule_imports():
    names = {p.relative_to(R.installed_package()).as_posix() for p in R.code_files(PERTURBATION)}
    assert {"experiments/perturbation.py", "experiments/base.py", "methods/targets.py", "methods/explain.py",
            "results.py", "data/models.py", "data/datasets.py"} <= names  # data.datasets: `from ...data import datasets`
    assert not names & {"explorer.py", "viz.py", "experiments/masking.py", "methods/cam.py"}


def test_experiment_provenance_uses_its_module_code_version():
    assert Squares().provenance()["code_version"] == R.code_version(__name__) != R.code_version()
    assert ROOT / "tests" / "test_results.py" in R.code_files(__name__)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_umask_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = F.write_json(tmp_path / "a.json", {"x": 1})
        shard = R.run(Squares(), tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    for f in (path, tmp_path / "run" / "results.csv", R.shard_path(tmp_path / "run", 0, 1)):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_corrupt_shard_is_named(tmp_path):
    R.shard_path(tmp_path, 0, 1).write_text("{not json")
    with pytest.raises(R.ResultsMismatchError, match="shard-0000-of-0001.json is not a results file"):
        R.run(Squares(), tmp_path, progress=False)


def test_results_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_EXPLANATIONS_RESULTS", str(tmp_path))
    assert R.results_dir("embedded", "x") == tmp_path / "embedded" / "x"
    monkeypatch.delenv("CONTRASTIVE_EXPLANATIONS_RESULTS")
    assert R.results_dir("paper", "x", root=tmp_path) == tmp_path / "results" / "paper" / "x"


def test_experiment_tables_one_per_folder_without_those_kept_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_EXPLANATIONS_RESULTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no results for 'squares' .*build its chapter first"):
        R.experiment_tables("embedded", "squares")
    R.run(Squares(n=3), R.results_dir("embedded", "squares"), progress=False)
    tables = R.experiment_tables("embedded", "squares")
    assert list(tables) == ["."] and tables["."]["value"].tolist() == [0, 1, 4]
    for net, power in (("b", 3), ("a", 2)):  # one folder per network, as perturbation keeps them
        R.run(Squares(n=3, power=power), R.results_dir("embedded", "cubes") / net, progress=False)
    (aside := tmp_path / "embedded" / "cubes" / ".stale" / "a.old").parent.mkdir()
    (tmp_path / "embedded" / "cubes" / "a").rename(aside)
    R.run(Squares(n=2), R.results_dir("embedded", "cubes") / "a", progress=False)
    tables = R.experiment_tables("embedded", "cubes")
    assert list(tables) == ["a", "b"] and aside.is_dir(), "the kept-aside folder is left out, and left alone"
    assert tables["a"]["value"].tolist() == [0, 1] and tables["b"]["value"].tolist() == [0, 1, 8]


def test_registry_names_resolve_to_modules():
    for name, spec in R.EXPERIMENTS.items():
        module = spec.partition(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{name}: {module} is not in the package"


TOY = textwrap.dedent('''
    import os, time
    from contrastive_explanations.results import Experiment
    class Toy(Experiment):
        name = "toy"
        def __init__(self, seed: int = 0, n: int = 9):
            self.seed, self.n = seed, n
        def __len__(self):
            return self.n
        def rows(self, indices):
            if os.environ.get("RANK", "") == os.environ.get("TOY_SLOW_RANK", "none"):  # a rank far slower than the others
                time.sleep(float(os.environ["TOY_SLOW_SECONDS"]))
            return [{"item": i, "value": (i * 7 + self.seed) % 5} for i in indices]
''')


def _cli(tmp_path, *args, torchrun=False, env=None):
    (tmp_path / "toy_experiment.py").write_text(TOY)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", **(env or {})}
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun
            else [sys.executable])
    return subprocess.run([*head, "-m", "contrastive_explanations.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_errors(tmp_path):
    for args, word in ((["nope"], "unknown experiment"), (["toy_experiment:Toy", "--profile", "nope"], "unknown profile"),
                       (["toy_experiment:Toy", "--profile", "paper"], "data_root"),
                       (["toy_experiment:Missing"], "cannot load")):
        r = _cli(tmp_path, *args, "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and word in r.stderr, (args, r.stderr)
        assert not (tmp_path / "out").exists(), "nothing is written on bad input"


def test_cli_and_torchrun_agree(tmp_path):
    one = _cli(tmp_path, "toy_experiment:Toy", "--param", "seed=3", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _cli(tmp_path, "toy_experiment:Toy", "--param", "seed=3", "--shards", "4", "--out", str(tmp_path / "two"),
               torchrun=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, pa = R.load_results(tmp_path / "one")
    b, pb = R.load_results(tmp_path / "two")
    pd.testing.assert_frame_equal(a, b)
    assert a["value"].tolist() == [(i * 7 + 3) % 5 for i in range(9)]
    assert pb["shards"] == 4 and pa["key"] == pb["key"]
    assert len(list((tmp_path / "two").glob("shard-*.json"))) == 4


# --- one configuration: params/<profile>.yaml, read by load_profile for the book, the chapters and the command line

def _project(tmp_path, **files) -> Path:
    (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    (tmp_path / "params").mkdir()
    for name, text in files.items():
        (tmp_path / "params" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return tmp_path


EMBEDDED = """
    device: cpu
    data_root: ''
    seed: 0
    perturbation: {shards: 2, runs: {small_cnn: {model: small_cnn, n_images: 3}}}
    training: {cnn_epochs: 4}
"""


def test_profiles_of_the_project_load_and_fit_their_classes():
    "Every run of every section names only arguments its experiment class takes (checked without building it)."
    for name in sorted(p.stem for p in (ROOT / "params").glob("*.yaml")):
        config = RUN.load_profile(name, {"data_root": "/data"} if name != "embedded" else {}, root=ROOT)
        for section in R.EXPERIMENTS:
            if section in config:
                settings = config.run_settings(section)
                assert settings and config.shards(section) >= 1, (name, section)
                assert all("profile" not in kwargs for kwargs in settings.values()), (name, section)


def test_no_code_branches_on_the_profile_name():
    "The profiles differ only in their settings files: no notebook or module asks which profile it runs."
    import re
    pattern = re.compile(r"profile\s*[!=]=|PROFILE_SETTINGS|\bPROFILES\b")
    sources = [*(ROOT / "nbs").glob("*.ipynb"), *(ROOT / "contrastive_explanations").rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}: {line.strip()[:80]}" for p in sources for line in p.read_text().splitlines()
             if pattern.search(line)]
    assert not found, "\n".join(found)


def test_inherits_overrides_and_nulls(tmp_path):
    root = _project(tmp_path, embedded=EMBEDDED, big="""
        inherits: embedded
        data_root: null
        perturbation: {runs: {vgg16: {model: vgg16, n_images: null}}}
    """)
    big = RUN.load_profile("big", {"data_root": "/data", "perturbation.shards": "8"}, root=root)
    assert big.name == "big" and big["data_root"] == "/data" and big["training"] == {"cnn_epochs": 4}
    assert big.shards("perturbation") == 8
    assert big.run_settings("perturbation") == {  # runs replaced whole, profile-wide keys the class takes added
        "vgg16": {"model": "vgg16", "n_images": None, "data_root": "/data", "device": "cpu", "seed": 0}}
    small = RUN.load_profile("embedded", {"perturbation.runs.small_cnn.n_images": "5"}, root=root)
    assert small.run_settings("perturbation")["small_cnn"]["n_images"] == 5


@pytest.mark.parametrize("files, name, overrides, words", [
    ({}, "nope", {}, ["unknown profile 'nope'", "embedded"]),
    ({"big": "inherits: embedded\ndata_root: null\n"}, "big", {}, ["needs data_root", "--param data_root="]),
    ({"big": "inherits: embedded\nperturbation: {shard: 3}\n"}, "big", {}, ["unknown setting perturbation.'shard'",
                                                                           "shards, runs"]),
    ({"big": "inherits: embedded\nbatch: 3\n"}, "big", {}, ["unknown setting 'batch'", "device, data_root"]),
    ({"big": "inherits: big\n"}, "big", {}, ["inherits from itself"]),
    ({}, "embedded", {"perturbation.shard": "3"}, ["unknown setting 'perturbation.shard'", "shards, runs"]),
    ({}, "embedded", {"seed.x": "3"}, ["seed is not a section", "perturbation"]),
    ({}, "embedded", {"perturbation.runs.small_cnn.size": "3"}, ["unknown setting", "model, n_images"]),
    ({}, "embedded", {"seed": 3}, ["override seed=3 must be YAML text", "'seed': '3'"]),  # a value, not its text
])
def test_bad_profiles_are_named(tmp_path, files, name, overrides, words):
    root = _project(tmp_path, embedded=EMBEDDED, **files)
    with pytest.raises(RUN.ProfileError) as e:
        RUN.load_profile(name, overrides, root=root)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_run_settings_refuse_what_the_class_does_not_take(tmp_path):
    root = _project(tmp_path, embedded=EMBEDDED.replace("n_images: 3", "n_images: 3, colour: red"))
    config = RUN.load_profile("embedded", root=root)
    with pytest.raises(RUN.ProfileError, match="sets colour, which Perturbation does not take"):
        config.run_settings("perturbation")
    with pytest.raises(RUN.ProfileError, match="must be a positive integer"):
        RUN.load_profile("embedded", {"perturbation.shards": "0"}, root=root).shards("perturbation")


def test_command_line_computes_what_the_chapter_reads(tmp_path, monkeypatch):
    "The command line with a profile writes the shards that the chapter's run(...) then reuses: nothing recomputed."
    overrides = {"perturbation.runs.efficientnet_lite0.n_images": "1", "perturbation.shards": "2"}
    env = {**os.environ, "CONTRASTIVE_EXPLANATIONS_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "2"}
    cli = subprocess.run([sys.executable, "-m", "contrastive_explanations.run", "perturbation", "--run",
                          "efficientnet_lite0", *(a for k, v in overrides.items() for a in ("--param", f"{k}={v}"))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    monkeypatch.setenv("CONTRASTIVE_EXPLANATIONS_RESULTS", str(tmp_path))
    config = RUN.load_profile("embedded", overrides, root=ROOT)  # what the chapter does with the same settings
    experiment = config.experiments("perturbation")["efficientnet_lite0"]
    out = config.results_dir(experiment)
    shards = sorted(out.glob("shard-*.json"))
    assert len(shards) == 2, shards
    before = {p: p.stat().st_mtime_ns for p in shards}
    experiment.rows = lambda indices: pytest.fail(f"the chapter recomputed items {indices}")
    table = R.run(experiment, out, count=config.shards("perturbation"), progress=False, on_stale="recompute")
    assert {p: p.stat().st_mtime_ns for p in shards} == before, "a shard was rewritten or deleted"
    written, prov = R.load_results(out)
    pd.testing.assert_frame_equal(table, written)
    assert prov["key"] == experiment.provenance()["key"] and len(table) > 0


def test_cli_bad_settings_exit_2(tmp_path):
    env = {**os.environ, "CONTRASTIVE_EXPLANATIONS_RESULTS": str(tmp_path)}
    for args, word in ((["perturbation", "--param", "perturbation.shard=2"], "unknown setting"),
                       (["perturbation", "--param", "nokey"], "--param takes KEY=VALUE"),
                       (["perturbation", "--run", "nope"], "no run 'nope' in perturbation"),
                       (["perturbation", "--out", str(tmp_path / "x")], "--out takes one run")):
        r = subprocess.run([sys.executable, "-m", "contrastive_explanations.run", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not any(tmp_path.iterdir()), "nothing is written on bad input"


def test_torchrun_survives_a_rank_slower_than_the_timeout(tmp_path):
    "Rank 1 takes 3x the process group's timeout over its shards; rank 0 waits for the files, not at a collective."
    slow = {"TOY_SLOW_RANK": "1", "TOY_SLOW_SECONDS": "3"}  # per rows call: rank 1's two shards take 6 s or more
    two = _cli(tmp_path, "toy_experiment:Toy", "--shards", "4", "--out", str(tmp_path / "two"), "--timeout", "2",
               "--force", torchrun=True, env=slow)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "waiting for 2 of 4 shards" in two.stdout + two.stderr
    one = _cli(tmp_path, "toy_experiment:Toy", "--out", str(tmp_path / "one"))
    pd.testing.assert_frame_equal(R.load_results(tmp_path / "one")[0], R.load_results(tmp_path / "two")[0])


def test_a_chapter_defined_experiment_has_its_exported_module_code_version():
    "In its chapter the class is defined in __main__ by the cell nbdev exports: the same code as the package's class."
    from contrastive_explanations.experiments.perturbation import Perturbation
    in_chapter = type("Perturbation", (R.Experiment,), {"__module__": "__main__"})
    assert R.code_module(in_chapter) == R.code_module(Perturbation) == PERTURBATION
    assert R.code_module(type("Mine", (R.Experiment,), {"__module__": "__main__"})) == "__main__"


def test_full_float32_switches_tf32_off_inside_and_restores_it():
    "The one TF32 switch as a context: off inside (also for uses_tf32), the previous state back after an error."
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for outside in (True, False):
            R.set_tf32(outside)
            with pytest.raises(RuntimeError, match="inside"):
                with R.full_float32():
                    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                    assert not R.uses_tf32("cuda")
                    raise RuntimeError("inside")
            assert torch.backends.cuda.matmul.allow_tf32 is outside and torch.backends.cudnn.allow_tf32 is outside
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # mixed: each restored
        with R.full_float32():
            pass
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
