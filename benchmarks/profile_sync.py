"""Where a GPU call of the library waits for the device: count host-device synchronisations in one GradCAM call,
and time it against a no-grad forward, with the value checks read once at the end of the call (the library's way,
`targets.deferred_checks`) and read at once where they are made (the way before it).

    python -m benchmarks.profile_sync --models vgg16_bn vit_b_16 --batch 64 --out sync-cuda.json   # with a GPU

A diagnostic for the 'weighted GradCAM vs no-grad forward' ratio on a GPU; it changes nothing in the library.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

import contrastive_explanations.methods.explain as explain

from . import common
from .bench_methods import methods_of


@contextlib.contextmanager
def checks_read_at_once():
    "Method calls without their deferred_checks block: every check_later reads its verdict where it is made."
    deferred = explain.deferred_checks
    explain.deferred_checks = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        explain.deferred_checks = deferred


def profile(name: str, batch: int, reps: int) -> dict:
    model = common.build(name, "cuda")
    x = common.images(batch, 224, "cuda")
    with torch.no_grad():
        t = model(x).argmax(1)
    g = methods_of(model)["gradcam"]  # GradCAM, or ViTGradCAM for a ViT

    def at_once():
        with checks_read_at_once():
            g(x, t, "weighted")

    fns = {"forward": lambda: torch.no_grad()(model)(x), "gradcam (library)": lambda: g(x, t, "weighted"),
           "gradcam, checks read at once": at_once}
    fns["gradcam (library)"]()
    syncs = {"library": common.synchronisations(fns["gradcam (library)"]),
             "checks read at once": common.synchronisations(at_once)}
    seconds = common.time_all(fns, reps, "cuda")  # interleaved rounds, as every benchmark
    ms = {k: 1000 * v["median"] for k, v in seconds.items()}
    print(f"{name}, batch {batch}:")
    for k, v in syncs.items():
        print(f"    {len(v)} synchronising calls, {k}: " + "; ".join(v)[:300])
    for k, v in ms.items():
        print(f"    {k:40s} {v:7.2f} ms  ({v / ms['forward']:.2f}x forward)")
    return {"model": name, "batch": batch, "reps": reps, "synchronisations": syncs, "median_ms": ms}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vgg16_bn"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, help="write the counts and timings here as JSON")
    a = p.parse_args()
    results = {"machine": common.machine("cuda"), "models": [profile(m, a.batch, a.reps) for m in a.models]}
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
