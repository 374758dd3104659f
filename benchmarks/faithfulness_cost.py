"""The cost of the faithfulness metrics against the field's libraries on the same work (not part of run_all).

    .venv/bin/python -m benchmarks.faithfulness_cost [--reps 3] [--images 2] [--size 224] [--steps 8] [--threads 2]

EfficientNet-Lite0 on packaged photographs, their two most probable classes (K = 2), Grad-CAM maps for the original
and the weighted target (T = 2): K x T = 4 maps per image. Each repetition runs every variant once, in an order that
rotates between repetitions; the medians over repetitions are printed, in seconds per image: wall-clock time, and
the process's CPU time (all threads), which moves less when other work shares the cores.
- deletion+insertion: ours, both curves with their three outputs (y_t, p_t, r_t) for all maps in two calls;
  torchcam 0.5's DeletionInsertionMetric (both curves, one output per run), one run per image and map for the logit
  alone, and the same for the three outputs (three runs).
- ROAD (MoRF, noise 0.01, shares of removed pixels 0.2, 0.5, 0.8): ours, all maps and shares in one call; pytorch-grad-cam's
  ROADMostRelevantFirst, one call per image, map and percentile (return_diff=False, so one forward each), logit only.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time

import torch

from contrastive_explanations.data.datasets import packaged_photos
from contrastive_explanations.data.models import build_model
from contrastive_explanations.methods import make_method
from contrastive_explanations.metrics.faithfulness import default_rivals, deletion, insertion, road

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]
FRACTIONS = (0.2, 0.5, 0.8)


class FixedMaps:
    "A torchcam CAM extractor that returns given maps."

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def setup(images: int, size: int):
    from torchvision.transforms import v2 as T
    model = build_model("efficientnet_lite0")
    resize = T.Compose([model.preprocess, T.Resize(size, antialias=True)])
    x = torch.stack([im for im, _ in packaged_photos(PHOTOS[:images], transform=resize)])
    with torch.no_grad():
        logits = model(x)
    pair = logits.topk(2).indices
    maps = make_method("gradcam", model)(x, pair, ["original", "weighted"]).upsampled(size)
    return model, x, logits, pair, maps


def ours_del_ins(model, x, logits, pair, maps, steps):
    deletion(model, x, maps, pair, steps=steps)
    insertion(model, x, maps, pair, steps=steps, start=0.0)


def torchcam_del_ins(model, x, logits, pair, maps, steps, outputs=("logit",)):
    from torchcam.metrics import DeletionInsertionMetric
    rivals = default_rivals(logits, pair)
    B, K, T = maps.shape[:3]
    for b in range(B):
        for k in range(K):
            fns = {"logit": None, "probability": functools.partial(torch.softmax, dim=-1),
                   "relative": lambda y, u=int(rivals[b, k]): torch.sigmoid(y - y[:, u:u + 1])}
            for t in range(T):
                for name in outputs:
                    metric = DeletionInsertionMetric(FixedMaps(model, maps[b:b + 1, k, t]), fns[name], steps=steps)
                    metric.update(x[b:b + 1], class_idx=[int(pair[b, k])])


def ours_road(model, x, logits, pair, maps, steps):
    road(model, x, maps, pair, fractions=FRACTIONS, order="morf")


def gradcam_road(model, x, logits, pair, maps, steps):
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    B, K, T = maps.shape[:3]
    for b, k, t in ((b, k, t) for b in range(B) for k in range(K) for t in range(T)):
        for f in FRACTIONS:
            metric = ROADMostRelevantFirst(percentile=round(100 * (1 - f)))
            metric(x[b:b + 1], maps[b:b + 1, k, t].numpy(), [ClassifierOutputTarget(int(pair[b, k]))], model,
                   return_diff=False)


VARIANTS = {
    "deletion+insertion, ours (3 outputs)": ours_del_ins,
    "deletion+insertion, torchcam (logit)": torchcam_del_ins,
    "deletion+insertion, torchcam (3 outputs)": functools.partial(torchcam_del_ins, outputs=("logit", "probability", "relative")),
    "ROAD MoRF, ours (3 outputs)": ours_road,
    "ROAD MoRF, pytorch-grad-cam (logit)": gradcam_road,
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = setup(args.images, args.size)
    names, times, cpu = list(VARIANTS), {name: [] for name in VARIANTS}, {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
            start, start_cpu = time.perf_counter(), time.process_time()
            VARIANTS[name](*work, args.steps)
            times[name].append((time.perf_counter() - start) / args.images)
            cpu[name].append((time.process_time() - start_cpu) / args.images)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"EfficientNet-Lite0, {args.images} images at {args.size} px, K = 2 classes x T = 2 targets, "
          f"{args.steps} steps, ROAD shares {FRACTIONS}, {args.threads} threads, load average {load:.1f}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name:42s} median {m:6.2f} s wall, {statistics.median(cpu[name]):6.2f} s CPU per image "
              f"(wall runs: {', '.join(f'{v:.2f}' for v in times[name])})")
    return medians


if __name__ == "__main__":
    main()
