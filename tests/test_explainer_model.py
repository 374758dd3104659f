"""The photo explainer's model export (tools/explainer_model.py): the files the page reads, laid out as it reads them;
made once; and an export that fails leaves the previous one and no partial folder behind."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tools import explainer_model
from tools.explainer_model import FILES, MARKER, export_model, lite0_parts, model_ready


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_model(tmp_path_factory.mktemp("book") / "book_assets" / "explainer")


def test_the_export_holds_what_the_page_reads(exported):
    _, fc, model = lite0_parts()
    assert model_ready(exported) and sorted(p.name for p in exported.iterdir()) == sorted([*FILES, MARKER])
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["classes"] == list(model.categories) and len(meta["classes"]) == 1000
    assert (meta["channels"], meta["grid"], meta["resize"], meta["crop"]) == (1280, [7, 7], 256, 224)
    head = np.fromfile(exported / "head.bin", dtype="<f4")
    C, K = fc.weight.shape
    assert head.size == C * K + C
    np.testing.assert_array_equal(head[:C * K].reshape(C, K), fc.weight.detach().numpy())  # row-major, then bias
    np.testing.assert_array_equal(head[C * K:], fc.bias.detach().numpy())
    graph = onnx.load(str(exported / "features.onnx")).graph
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(v.name, dims(v)) for v in graph.input] == [("pixels", [1, 3, 224, 224])]
    assert [v.name for v in graph.output] == ["features"]  # its shape the exporter leaves open; the browser test runs it


def test_the_export_is_made_once_and_leaves_nothing_beside_it(exported):
    stamp = (exported / "features.onnx").stat().st_mtime_ns
    assert export_model(exported) == exported and (exported / "features.onnx").stat().st_mtime_ns == stamp
    assert [p.name for p in exported.parent.parent.iterdir()] == ["book_assets"]  # no temporary folder left


def test_a_failed_export_keeps_the_previous_one(exported, monkeypatch):
    (exported / MARKER).write_text("made by another torch\n")  # stale: the next call exports again
    before = {f: (exported / f).read_bytes() for f in FILES}

    def fail(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_model(exported)
    assert {f: (exported / f).read_bytes() for f in FILES} == before
    assert [p.name for p in exported.parent.parent.iterdir()] == ["book_assets"]
    monkeypatch.undo()
    assert model_ready(export_model(exported))
