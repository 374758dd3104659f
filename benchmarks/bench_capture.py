"""What capturing a layer's output through a copy costs: weighted GradCAM against a no-grad forward, with the
library's capture (the network goes on with a copy of the captured leaf, so in-place operations after the layer are
safe) and with the capture it replaced (the leaf itself handed to the network), in one run.

    .venv/bin/python -m benchmarks.bench_capture [--reps 15] [--batch 16] [--models efficientnet_lite0 resnet18]

CPU, 2 threads, batch 16 at 224, the book's CNNs at their default layers (whose next operation is not in place, so
the old capture still runs on them). Variants, interleaved round by round, medians of the rounds:
- forward: a plain no-grad forward pass (the floor);
- gradcam/weighted: `GradCAM(model)(x, top1, 'weighted')`, the library as it is;
- gradcam/weighted-leaf: the same call with the old capture patched in (the hook returns the leaf itself).
Ratios per round: each GradCAM over the forward (goal <= 1.10), and the copy over the leaf (the capture's cost).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

import contrastive_explanations.methods.explain as explain
from contrastive_explanations.methods.cam import GradCAM

from . import common

GOAL = ("<=", 1.10)  # weighted GradCAM / no-grad forward


@contextlib.contextmanager
def leaf_capture(layer):
    "The capture before the copy: the network goes on with the leaf itself (in-place operations after it fail)."
    captured = []

    def hook(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    with layer.register_forward_hook(hook):
        yield captured


@contextlib.contextmanager
def old_capture():
    "Patch the library's capture to the old one for the duration."
    saved = explain.leaf_output
    explain.leaf_output = leaf_capture
    try:
        yield
    finally:
        explain.leaf_output = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.common_arguments(parser, reps=15)
    args = parser.parse_args(argv)
    args.no_memory = True
    results, path = common.start(args, "capture")
    began = time.perf_counter()

    def measure(name: str) -> dict:
        model = common.build(name, args.device)
        x = common.images(args.batch, args.size, args.device)
        method = GradCAM(model)
        with torch.no_grad():
            top1 = model(x).argmax(1)

        def forward():
            with torch.no_grad():
                model(x)

        def copy():
            return method(x, top1, "weighted").maps

        def leaf():
            with old_capture():
                return method(x, top1, "weighted").maps

        torch.testing.assert_close(copy(), leaf())  # the same maps either way
        fns = {"forward": forward, "gradcam/weighted": copy, "gradcam/weighted-leaf": leaf}
        print(f"==> capture, {name}: timing {list(fns)}", flush=True)
        seconds = common.time_all(fns, args.reps, args.device)
        ratios = {
            "gradcam/weighted / forward": common.ratio(seconds, "gradcam/weighted", "forward", GOAL,
                                                       "weighted GradCAM, the library's capture, over a forward"),
            "gradcam/weighted-leaf / forward": common.ratio(seconds, "gradcam/weighted-leaf", "forward", GOAL,
                                                            "weighted GradCAM, the old capture, over a forward"),
            "gradcam/weighted / gradcam/weighted-leaf": common.ratio(
                seconds, "gradcam/weighted", "gradcam/weighted-leaf", None, "the copy's cost: new over old capture"),
        }
        return common.throughput_entry(seconds, args.batch, ratios, {"same_maps": True})

    common.measure_all(results, path, began, args.models, measure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
