"""The blur/mask table (the review's Table 1): maps computed once per image against once per table cell (item 7).

    .venv/bin/python -m benchmarks.bench_masking [--reps 5] [--batch 16] [--models small_cnn]

The embedded profile's network (the small CNN of the training chapter, random weights: timing only) on 64-pixel
images, its layer '3', the three activation methods (LA, GC, XC). A table cell is a method x class (t1, t2) x rule
(ours, review) x features (pos, neg) x baseline (blur, zeros, mean), 72 cells, each comparing the original and the
weighted map; the baseline images are made once per image in both variants.
- ours: what `Masking.rows` does: `explain_pairs` (each method called once for both classes and both
  explanations), then `masking_scores` (every masked image of a method in batched forward passes).
- per cell: for every cell, both maps of its class recomputed (two method calls), its masks, and a forward of its
  2 B masked images; the same r values come out (checked).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from contrastive_explanations.experiments.masking import (BASELINES, EXPLANATIONS, FEATURES, MASKING_METHODS,
                                                          VARIANTS, baseline_images, blur_settings, explain_pairs,
                                                          keep_masks, masking_scores, relative_probability)
from contrastive_explanations.methods import METHODS
from contrastive_explanations.data.training import small_cnn

from . import common

LAYERS = {"small_cnn": "3.0"}  # the embedded chapter's layer (its last convolution); other networks use their default layer


def build(name: str, device: str) -> torch.nn.Module:
    if name == "small_cnn":
        torch.manual_seed(0)
        return small_cnn(12).to(device).eval()
    return common.build(name, device)


def setup(model_name: str, options: dict):
    model = build(model_name, options["device"])
    x = common.images(options["batch"], options["size"], options["device"])
    with torch.no_grad():
        pair = model(x).topk(2).indices
    methods = {name: METHODS[name](model, LAYERS.get(model_name)) for name in MASKING_METHODS}
    k, sigma = blur_settings(options["size"])
    zero = torch.tensor([0.485, 0.456, 0.406], device=x.device)  # some colour for the review's 'zeros'
    fills = torch.stack([baseline_images(x, None, (k, sigma)), baseline_images(x, zero, (k, sigma))], 1)
    return model, methods, x, pair, fills


def ours(model, methods, x, pair, fills) -> dict:
    maps, _ = explain_pairs(methods, x, pair)
    return {name: masking_scores(model, x, pair, m, fills)[0] for name, m in maps.items()}


def per_cell(model, methods, x, pair, fills) -> dict:
    "Every cell recomputes the maps of its class, then masks and evaluates its own images: r (B, 2, V, F, 2, nb)."
    B, size = len(x), tuple(x.shape[-2:])
    out = {}
    for name, method in methods.items():
        r = torch.empty(B, 2, len(VARIANTS), len(FEATURES), 2, len(BASELINES))
        for k, v, f, j in itertools.product(range(2), range(len(VARIANTS)), range(len(FEATURES)),
                                            range(len(BASELINES))):
            ori, wtd = (method(x, pair[:, k], e).upsampled(size)[:, 0, 0] for e in EXPLANATIONS)
            keep = torch.stack(keep_masks(ori, wtd, FEATURES[f], VARIANTS[v]), 1)  # (B, 2, H, W)
            images = torch.where(keep[:, :, None], x[:, None], fills[:, v, j][:, None])
            with torch.inference_mode():
                logits = model(images.flatten(0, 1)).view(B, 2, -1)
            r[:, k, v, f, :, j] = relative_probability(logits, pair[:, None].expand(B, 2, 2))[..., k].cpu()
        out[name] = r
    return out


def variants_for(model_name: str, options: dict) -> dict:
    args = setup(model_name, options)
    return {"ours": lambda: ours(*args), "per-cell": lambda: per_cell(*args)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, reps=5)
    parser.set_defaults(size=64, models=["small_cnn"])
    args = parser.parse_args(argv)
    began = time.perf_counter()
    results, path = common.start(args, "masking")
    results["settings"]["cells"] = 2 * len(MASKING_METHODS) * len(VARIANTS) * len(FEATURES) * len(BASELINES)
    options = {"device": args.device, "batch": args.batch, "size": args.size, "threads": args.threads}

    def measure(model_name: str) -> dict | None:
        print(f"==> masking, {model_name}: checking, then timing", flush=True)
        state = setup(model_name, options)
        a, b = ours(*state), per_cell(*state)
        fns = {"ours": lambda: ours(*state), "per-cell": lambda: per_cell(*state)}
        seconds = common.time_all(fns, args.reps, args.device)
        ratios = {"Table 1: maps per cell / maps per image": common.ratio(
            seconds, "per-cell", "ours", None, "7. blur/mask table", f"{results['settings']['cells']} cells, 3 methods")}
        checks = {"max |difference| of r, per cell vs ours": max(float((a[n].cpu() - b[n]).abs().max()) for n in a)}
        entry = common.throughput_entry(seconds, args.batch, ratios, checks)
        return common.with_memory(entry, args, "bench_masking", model_name, list(fns), options, fns)

    return common.measure_all(results, path, began, args.models, measure)


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
