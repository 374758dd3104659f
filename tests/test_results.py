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

from contrastive_explanations import results as R

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
    R.write_json(tmp_path / "ok.json", {"x": np.float64(1.5), "t": torch.tensor([1, 2])})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"x": 1.5, "t": [1, 2]}
    with pytest.raises(TypeError, match="convert it"):
        R.write_json(tmp_path / "bad.json", {"m": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"]


def test_arrays_round_trip(tmp_path):
    maps = torch.randn(2, 3, 4)
    path = R.write_arrays(tmp_path / "maps.npz", {"seed": 3}, maps=maps, labels=np.array([1, 2]))
    arrays, prov = R.read_arrays(path)
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


def test_corrupt_shard_is_named(tmp_path):
    R.shard_path(tmp_path, 0, 1).write_text("{not json")
    with pytest.raises(R.ResultsMismatchError, match="shard-0000-of-0001.json is not a results file"):
        R.run(Squares(), tmp_path, progress=False)


def test_results_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_EXPLANATIONS_RESULTS", str(tmp_path))
    assert R.results_dir("embedded", "x") == tmp_path / "embedded" / "x"
    monkeypatch.delenv("CONTRASTIVE_EXPLANATIONS_RESULTS")
    assert R.results_dir("paper", "x", root=tmp_path) == tmp_path / "results" / "paper" / "x"


def test_registry_names_resolve_to_modules():
    for name, spec in R.EXPERIMENTS.items():
        module = spec.partition(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{name}: {module} is not in the package"


TOY = textwrap.dedent('''
    from contrastive_explanations.results import Experiment
    class Toy(Experiment):
        name = "toy"
        def __init__(self, seed: int = 0, n: int = 9):
            self.seed, self.n = seed, n
        def __len__(self):
            return self.n
        def rows(self, indices):
            return [{"item": i, "value": (i * 7 + self.seed) % 5} for i in indices]
''')


def _cli(tmp_path, *args, torchrun=False):
    (tmp_path / "toy_experiment.py").write_text(TOY)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun
            else [sys.executable])
    return subprocess.run([*head, "-m", "contrastive_explanations.results", *args], cwd=ROOT, env=env,
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
