"""Ours against pytorch-grad-cam and captum on GradCAM from the softmax, after checking that the maps agree (item 3).

    .venv/bin/python -m benchmarks.bench_peers [--reps 7] [--batch 16] [--models efficientnet_lite0 resnet18]

Each library is used as its documentation shows, on the same network (parameters trainable, as built) and layer:
- ours: `GradCAM(model)(x, t, 'weighted')` (signed maps at the layer's resolution; it freezes the parameters itself).
- pytorch-grad-cam: `pytorch_grad_cam.GradCAM(model, [layer])` with `ClassifierOutputSoftmaxTarget(t_b)` per image,
  built and released in each call (its hooks would otherwise also run in every other variant's forward pass).
  It back-propagates with `loss.backward()`, and returns ReLU'd, min-max scaled maps resized to the image.
- captum: `LayerGradCam(lambda x: model(x).softmax(1), layer).attribute(x, target=t, relu_attributions=False)`,
  detached (with trainable parameters, captum's attributions carry a grad_fn that keeps the whole forward graph
  alive: twelve of them kept in a list hold twelve graphs, 93 GB for VGG16-bn at batch 64 on a GPU).
- 12 maps (top-3 classes x original, weighted, mean, max): ours in one call; captum one call per class and contrast,
  on four forward functions whose column t is y_t, p_t, y_t - mean_{s != t} y_s and y_t - max_{s != t} y_s.

Agreement, before timing: pytorch-grad-cam's map before its ReLU and min-max scaling (its own captured activations
and gradients, combined as its `get_cam_image` does) against our signed map, and its final output against our map put
through its own post-processing (`np.maximum(., 0)` then `scale_cam_image` twice, as `forward` does); captum's
signed attributions against ours, for the one-target map and for all 12 maps.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from contrastive_explanations.methods.cam import GradCAM
from contrastive_explanations.methods.explain import default_layer, find_layer

from . import common
from .bench_methods import TWELVE


def contrast_forwards(model: torch.nn.Module) -> dict:
    "Forward functions whose column t is each target of TWELVE, for captum (one call per target)."
    def mean(x):
        y = model(x)
        return y - (y.sum(1, keepdim=True) - y) / (y.shape[1] - 1)

    def rival_max(x):
        y = model(x)
        top = y.topk(2, dim=1)
        best = torch.nn.functional.one_hot(top.indices[:, 0], y.shape[1]).bool()
        return y - torch.where(best, top.values[:, 1:2], top.values[:, 0:1])

    return {"original": model, "weighted": lambda x: model(x).softmax(1), "mean": mean, "max": rival_max}


def gradcam_peer(model, layer, x, t):
    "pytorch-grad-cam's GradCAM of the softmax p_t, built and released in the call; also its captured tensors."
    from pytorch_grad_cam import GradCAM as PeerGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    with PeerGradCAM(model=model, target_layers=[layer]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(int(c)) for c in t])
        captured = (cam.activations_and_grads.activations[0], cam.activations_and_grads.gradients[0])
    return out, captured


def captum_gradcam(forward, layer, x, t):
    "captum's signed GradCAM, detached: with trainable parameters its attributions keep the forward graph alive."
    from captum.attr import LayerGradCam
    return LayerGradCam(forward, layer).attribute(x, target=t, relu_attributions=False).detach()


def variants(model: torch.nn.Module, x: torch.Tensor) -> dict:
    "name -> zero-argument callable for the whole batch."
    layer = find_layer(model, default_layer(model))
    ours = GradCAM(model, layer)
    with torch.no_grad():
        logits = model(x)
    t, top3 = logits.argmax(1), logits.topk(3).indices
    fwd = contrast_forwards(model)
    return {
        "forward": lambda: torch.no_grad()(model)(x),
        "ours/weighted": lambda: ours(x, t, "weighted"),
        "pytorch-grad-cam/softmax": lambda: gradcam_peer(model, layer, x, t),
        "captum/softmax": lambda: captum_gradcam(fwd["weighted"], layer, x, t),
        "ours/12maps": lambda: ours(x, top3, TWELVE),
        "captum/12maps": lambda: [captum_gradcam(fwd[u], layer, x, top3[:, k]) for k in range(3) for u in TWELVE],
    }


def variants_for(model_name: str, options: dict) -> dict:
    model = common.build(model_name, options["device"])
    return variants(model, common.images(options["batch"], options["size"], options["device"]))


def agreement(model: torch.nn.Module, x: torch.Tensor) -> dict:
    "Relative differences between the peers' maps and ours where the definitions agree (see the module's notes)."
    from pytorch_grad_cam.utils.image import scale_cam_image
    layer = find_layer(model, default_layer(model))
    e = GradCAM(model, layer)(x, None, "weighted")
    t, ours = e.classes[:, 0], e.maps[:, 0, 0].detach().cpu()
    scale = ours.abs().max()
    final, (acts, grads) = gradcam_peer(model, layer, x, t)
    signed = (grads.mean((2, 3))[:, :, None, None] * acts).sum(1)  # its get_cam_image, before np.maximum
    mine = scale_cam_image(scale_cam_image(np.maximum(ours.numpy(), 0), tuple(x.shape[-1:-3:-1])))
    fwd = contrast_forwards(model)
    cap = captum_gradcam(fwd["weighted"], layer, x, t)[:, 0].detach().cpu()
    with torch.no_grad():
        top3 = model(x).topk(3).indices
    twelve = GradCAM(model, layer)(x, top3, TWELVE).maps.detach().cpu()
    cap12 = torch.stack([torch.stack([captum_gradcam(fwd[u], layer, x, top3[:, k])[:, 0].detach().cpu()
                                      for u in TWELVE], 1) for k in range(3)], 1)
    rel = lambda a, b, s: float((a - b).abs().max() / s)  # noqa: E731
    return {
        "pytorch-grad-cam: signed map before its ReLU and scaling vs ours, max |difference| / max |ours|":
            rel(signed, ours, scale),
        "pytorch-grad-cam: its output vs ours put through its post-processing, max |difference| (maps in [0, 1])":
            float(np.abs(final - mine).max()),
        "captum: one target (p_t), max |difference| / max |ours|": rel(cap, ours, scale),
        "captum: 12 maps (3 classes x 4 targets), max |difference| / max |ours|":
            rel(cap12, twelve, twelve.abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    results, path = common.start(args, "peers")
    import captum
    import pytorch_grad_cam  # noqa: F401
    from importlib.metadata import PackageNotFoundError, version
    try:
        peer_version = version("grad-cam")
    except PackageNotFoundError:  # installed without its metadata
        peer_version = "unknown"
    results["settings"]["versions"] = {"grad-cam": peer_version, "captum": captum.__version__}
    options = {"device": args.device, "batch": args.batch, "size": args.size, "threads": args.threads}

    def measure(model_name: str) -> dict | None:
        model = common.build(model_name, args.device)
        if common.is_vit(model):
            print(f"==> peers, {model_name}: skipped (token maps need a reshape_transform; not compared)", flush=True)
            return None
        x = common.images(args.batch, args.size, args.device)
        print(f"==> peers, {model_name}: agreement, then timing", flush=True)
        checks = agreement(model, x)
        fns = variants(model, x)
        seconds = common.time_all(fns, args.reps, args.device)
        R = common.ratio
        ratios = {
            "pytorch-grad-cam / ours, one target": R(seconds, "pytorch-grad-cam/softmax", "ours/weighted",
                                                     (">=", 2.5), "3. ours vs peers"),
            "captum / ours, one target": R(seconds, "captum/softmax", "ours/weighted", (">=", 0.95),
                                           "3. ours vs peers", "parity, read as within 5%: ratio >= 0.95"),
            "captum / ours, 12 maps": R(seconds, "captum/12maps", "ours/12maps", (">=", 8), "3. ours vs peers",
                                        "captum needs one call per class and target: 12 calls"),
            "ours one target / no-grad forward": R(seconds, "ours/weighted", "forward", None, "3. ours vs peers"),
        }
        entry = {"seconds": seconds, "ratios": ratios, "checks": checks,
                 "layer": next(n for n, m in model.named_modules() if m is find_layer(model, default_layer(model)))}
        return common.with_memory(entry, args, "bench_peers", model_name, list(fns), options, fns)

    return common.measure_all(results, path, began, args.models, measure)


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
