"""Export the model of the Introduction's photo explainer (tools/static/photo-explainer.js) into `book_assets/`.

EfficientNet-Lite0, the package's default model, splits into a feature extractor (pixels in [0, 1], normalised
inside, to activations (1280, 7, 7)) and a head (global average pooling, then one linear layer). The extractor goes
to ONNX (torch's exporter) for ONNX Runtime Web; the head's weight and bias (float32, little-endian, row-major
weight then bias) and the class names go beside it: the page computes the maps from them in closed form
(nbs/04_cam.ipynb, Eq. eq-pooled-head). Nothing here is committed: the book's build makes it, once per torch
version (a `.complete` marker), into a temporary folder beside `book_assets/` (not served) that replaces the old
export only when finished.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
FILES = ("features.onnx", "head.bin", "meta.json")
MARKER = ".complete"


def _marker_text() -> str:
    return f"efficientnet_lite0, torch {torch.__version__}, opset {OPSET}\n"


def model_ready(dest: Path) -> bool:
    "True when `dest` holds a complete export made by this torch version."
    marker = Path(dest) / MARKER
    return marker.exists() and marker.read_text() == _marker_text() and all((dest / f).exists() for f in FILES)


def lite0_parts():
    "EfficientNet-Lite0 as (features: pixels -> (B, 1280, 7, 7), the head's linear layer, the model)."
    from contrastive_explanations.data.models import build_model

    model = build_model("efficientnet_lite0")
    return nn.Sequential(model.normalize, model.net.features).eval(), model.net.head[-1], model


def export_model(dest: Path) -> Path:
    "Write features.onnx, head.bin and meta.json into `dest` unless a complete export is there already."
    dest = Path(dest)
    if model_ready(dest):
        return dest
    features, fc, model = lite0_parts()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent.parent, prefix=".explainer-") as tmp:
        _write(Path(tmp) / "explainer", features, fc, model)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(Path(tmp) / "explainer"), dest)
    return dest


def _write(staging: Path, features: nn.Module, fc: nn.Linear, model) -> None:
    "The three files and the marker, into the new folder `staging`."
    crop = model.preprocess.transforms[2].size[0]  # ToImage, Resize, CenterCrop, ToDtype
    resize = model.preprocess.transforms[1].size[0]
    staging.mkdir()
    x = torch.zeros(1, 3, crop, crop)
    with torch.no_grad():
        grid = list(features(x).shape[-2:])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(features, (x,), str(staging / "features.onnx"), dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["features"])
    weight, bias = fc.weight.detach().numpy(), fc.bias.detach().numpy()
    np.concatenate([weight.ravel(), bias]).astype("<f4").tofile(staging / "head.bin")
    meta = {"model": "EfficientNet-Lite0", "classes": list(model.categories), "channels": int(weight.shape[1]),
            "grid": grid, "resize": int(resize), "crop": int(crop)}
    (staging / "meta.json").write_text(json.dumps(meta))
    (staging / MARKER).write_text(_marker_text())
