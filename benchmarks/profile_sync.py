"""Where a GPU call of the library waits for the device: count host-device synchronisations in one GradCAM call,
and time it against a no-grad forward, with the value checks read once at the end of the call (the library's way,
`contrast.deferred_checks`) and read at once where they are made (the way before it).

    python benchmarks/profile_sync.py --models vgg16_bn vit_b_16 --batch 64 --out sync-cuda.json   # with a GPU

A diagnostic for the 'weighted GradCAM vs no-grad forward' ratio on a GPU; it changes nothing in the library.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import contrastive_explanations.explain as explain  # noqa: E402
from bench_methods import methods_of  # noqa: E402

deferred = explain.deferred_checks


def at_once(*args, **kwargs):
    "No deferred_checks block: every check_later reads its verdict where it is made."
    return contextlib.nullcontext()


def median_ms(fn, reps=20):
    out = []
    for _ in range(reps + 3):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - begin))
    return statistics.median(out[3:])


def synchronisations(fn) -> list[str]:
    "The synchronising calls torch reports while fn runs."
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message).splitlines()[0][:150] for w in caught]


def profile(name: str, batch: int) -> dict:
    model = common.build(name, "cuda")
    x = common.images(batch, 224, "cuda")
    with torch.no_grad():
        t = model(x).argmax(1)
    g = methods_of(model)["gradcam"]  # GradCAM, or ViTGradCAM for a ViT
    call = lambda: g(x, t, "weighted")  # noqa: E731
    forward = lambda: torch.no_grad()(model)(x)  # noqa: E731
    call()
    entry = {"model": name, "batch": batch, "synchronisations": {"library": synchronisations(call)}}
    explain.deferred_checks = at_once
    entry["synchronisations"]["checks read at once"] = synchronisations(call)
    explain.deferred_checks = deferred
    ms = {"forward": median_ms(forward), "gradcam (library)": median_ms(call)}
    explain.deferred_checks = at_once
    ms["gradcam, checks read at once"] = median_ms(call)
    explain.deferred_checks = deferred
    ms["gradcam (library), again"] = median_ms(call)
    entry["median_ms"] = ms
    print(f"{name}, batch {batch}:")
    for k, v in entry["synchronisations"].items():
        print(f"    {len(v)} synchronising calls, {k}: " + "; ".join(v)[:300])
    for k, v in ms.items():
        print(f"    {k:40s} {v:7.2f} ms  ({v / ms['forward']:.2f}x forward)")
    return entry


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vgg16_bn"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, help="write the counts and timings here as JSON")
    a = p.parse_args()
    results = {"machine": common.machine("cuda"), "models": [profile(m, a.batch) for m in a.models]}
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
