"""The field's metrics (chapters 13-15): their cost against the maps they score, and against the independent
libraries doing the same work.

    .venv/bin/python -m benchmarks.bench_metrics [--reps 5] [--batch 2] [--steps 8] [--models efficientnet_lite0]

Work, per model: a batch of images, their two most probable classes (K = 2), GradCAM for the original and the
weighted target (T = 2), so K x T = 4 maps per image, upsampled to the image. Variants:
- maps: computing those maps (ours, one call): the unit the metrics are measured in.
- deletion+insertion: ours, both curves with their three outputs (y_t, p_t, r_t) for every map in two calls;
  torchcam 0.5's DeletionInsertionMetric, one run per image and map, logit only (so it does a third of our work).
- ROAD MoRF (shares 0.2, 0.5, 0.8 removed, noisy linear imputation): ours, every map and share in one call;
  pytorch-grad-cam's ROADMostRelevantFirst, one call per image, map and share, logit only.
- Random Logit (SSIM against a random other class, the original target's maps): ours; Quantus 0.6's RandomLogit.
- MPRT (cascading, every parameterised layer, Spearman of absolute maps): ours; Quantus 0.6's MPRT, given |map|
  (Quantus refuses a batch of maps all below zero, which a randomised network's GradCAM can be).
- pointing game (maps given, a central box as the mask): ours; Quantus 0.6's PointingGame.
Timing: interleaved rounds after a warm-up (benchmarks/common.py); ratios are medians of per-round ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np
import torch

from contrastive_explanations.methods import make_method
from contrastive_explanations.metrics import faithfulness as F
from contrastive_explanations.metrics import pointing as P
from contrastive_explanations.metrics import randomisation as R

from . import common

FRACTIONS = (0.2, 0.5, 0.8)
TARGETS = ["original", "weighted"]


class FixedMaps:
    "A torchcam CAM extractor that returns given maps (what torchcam's metric calls)."

    def __init__(self, model: torch.nn.Module, maps: torch.Tensor):
        self.model, self.maps = model, maps

    def __call__(self, class_idx, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def work(model_name: str, options: dict) -> dict:
    "The model, images, their top-2 classes, the maps (B, 2, 2, H, W) and what the variants share."
    model = common.build(model_name, options["device"])
    x = common.images(options["batch"], options["size"], options["device"])
    with torch.no_grad():
        logits = model(x)
    gradcam = make_method("gradcam", model)
    pair = logits.topk(2, dim=1).indices
    maps = gradcam(x, pair, TARGETS).upsampled(options["size"]).float()
    mask = torch.zeros(maps.shape[-2:], dtype=torch.bool)
    side = options["size"]
    mask[side // 4:3 * side // 4, side // 4:3 * side // 4] = True
    return {"model": model, "x": x, "logits": logits, "pair": pair, "maps": maps, "gradcam": gradcam,
            "masks": mask.expand(len(x), -1, -1), "classes": logits.shape[1], "steps": options["steps"]}


def explain_original(gradcam):
    "(model, x, classes (B, K)) -> maps (B, K, 1, H, W): the original target's GradCAM, upsampled, on `model`."
    def explain(model, x, classes):
        method = make_method("gradcam", model) if model is not gradcam.model else gradcam
        return method(x, classes, ["original"]).upsampled(tuple(x.shape[-2:]))
    return explain


def quantus_explain(gradcam, absolute: bool = False):
    "The same maps as Quantus asks for them: (model, inputs, targets) -> numpy (B, H, W); |map| if `absolute`."
    ours = explain_original(gradcam)

    def explain(model, inputs, targets, **kwargs):
        x, t = torch.as_tensor(inputs), torch.as_tensor(targets).long()[:, None]
        maps = ours(model, x, t)[:, 0, 0].detach()
        return (maps.abs() if absolute else maps).numpy()
    return explain


def torchcam_deletion_insertion(w: dict) -> None:
    from torchcam.metrics import DeletionInsertionMetric
    x, pair, maps = w["x"], w["pair"], w["maps"]
    B, K, T = maps.shape[:3]
    for b, k, t in ((b, k, t) for b in range(B) for k in range(K) for t in range(T)):
        metric = DeletionInsertionMetric(FixedMaps(w["model"], maps[b:b + 1, k, t]), None, steps=w["steps"])
        metric.update(x[b:b + 1], class_idx=[int(pair[b, k])])


def gradcam_road(w: dict) -> None:
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    x, pair, maps = w["x"], w["pair"], w["maps"]
    B, K, T = maps.shape[:3]
    for b, k, t in ((b, k, t) for b in range(B) for k in range(K) for t in range(T)):
        for f in FRACTIONS:
            ROADMostRelevantFirst(percentile=round(100 * (1 - f)))(
                x[b:b + 1], maps[b:b + 1, k, t].numpy(), [ClassifierOutputTarget(int(pair[b, k]))], w["model"],
                return_diff=False)


def variants(w: dict) -> dict:
    "Every variant, a zero-argument call doing its whole work once."
    import quantus
    model, x, pair, maps = w["model"], w["x"], w["pair"], w["maps"]
    top, explain = pair[:, :1], explain_original(w["gradcam"])
    xn, yn = x.numpy(), pair[:, 0].numpy()
    q = {"disable_warnings": True}
    return {
        "maps": lambda: w["gradcam"](x, pair, TARGETS).upsampled(tuple(x.shape[-2:])),
        "deletion+insertion": lambda: (F.deletion(model, x, maps, pair, steps=w["steps"]),
                                       F.insertion(model, x, maps, pair, steps=w["steps"])),
        "deletion+insertion torchcam": lambda: torchcam_deletion_insertion(w),
        "ROAD": lambda: F.road(model, x, maps, pair, fractions=FRACTIONS, order="morf"),
        "ROAD pytorch-grad-cam": lambda: gradcam_road(w),
        "random logit": lambda: R.random_logit(model, x, top, explain, w["classes"]),
        "random logit Quantus": lambda: quantus.RandomLogit(num_classes=w["classes"], **q)(
            model=model, x_batch=xn, y_batch=yn, explain_func=quantus_explain(w["gradcam"])),
        "MPRT": lambda: R.mprt(model, x, top, explain, with_ssim=False),
        "MPRT Quantus": lambda: quantus.MPRT(**q)(model=model, x_batch=xn, y_batch=yn,  # |map|: see the docstring
                                                 explain_func=quantus_explain(w["gradcam"], absolute=True)),
        "pointing": lambda: P.pointing_game(maps[:, 0, 0], w["masks"], 0),
        "pointing Quantus": lambda: quantus.PointingGame(**q)(
            model=model, x_batch=xn, y_batch=yn, a_batch=maps[:, 0, 0].numpy()[:, None],
            s_batch=w["masks"].numpy()[:, None].astype(np.float32)),
    }


PER_MAPS = {"deletion+insertion": "deletion and insertion (3 outputs) / the maps", "ROAD": "ROAD MoRF / the maps",
            "random logit": "Random Logit / the maps", "MPRT": "MPRT (every layer) / the maps"}
AGAINST = {"deletion+insertion": ("deletion+insertion torchcam", "ours (3 outputs) / torchcam (logit only)"),
           "ROAD": ("ROAD pytorch-grad-cam", "ROAD: ours (3 outputs) / pytorch-grad-cam (logit only)"),
           "random logit": ("random logit Quantus", "Random Logit: ours / Quantus"),
           "MPRT": ("MPRT Quantus", "MPRT: ours / Quantus"),
           "pointing": ("pointing Quantus", "pointing game: ours / Quantus")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, reps=5)
    parser.add_argument("--steps", type=int, default=8, help="deletion and insertion curve steps")
    parser.set_defaults(batch=2)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    results, path = common.start(args, "metrics")
    if args.models == common.CPU_MODELS:
        args.models = results["settings"]["models"] = ["efficientnet_lite0"]  # the real network; MPRT needs weights
    options = {"device": args.device, "batch": args.batch, "size": args.size, "steps": args.steps}

    def measure(model_name: str) -> dict:
        print(f"==> metrics, {model_name}: timing", flush=True)
        w = work(model_name, options)
        seconds = common.time_all(variants(w), args.reps, args.device)
        ratios = {what: common.ratio(seconds, name, "maps", None, "the metric's cost in map computations")
                  for name, what in PER_MAPS.items()}
        ratios |= {what: common.ratio(seconds, name, theirs, None, "ours against the library, the same maps")
                   for name, (theirs, what) in AGAINST.items()}
        per_image = {name: s["median"] / args.batch for name, s in seconds.items()}
        entry = common.throughput_entry(seconds, args.batch, ratios, {"maps per image": 4})
        return entry | {"seconds_per_image": per_image}

    return common.measure_all(results, path, began, args.models, measure)


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
