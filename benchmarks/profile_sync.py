"""Where a GPU call of the library waits for the device: count host-device synchronisations in one GradCAM call,
and time it with the class-index range check (`contrast.as_classes`) made sync-free, against a no-grad forward.

    python benchmarks/profile_sync.py --model vgg16_bn --batch 64      # on a machine with a GPU

A diagnostic for the 'weighted GradCAM vs no-grad forward' ratio on a GPU; it changes nothing in the library.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import contrastive_explanations.contrast as contrast  # noqa: E402
import contrastive_explanations.explain as explain  # noqa: E402
from contrastive_explanations.cam import GradCAM  # noqa: E402

checked = contrast.as_classes


def unchecked(t, logits):
    "as_classes without the value-range check, the only part that needs the values on the host."
    t = torch.as_tensor(t, device=logits.device)
    return (t.expand(logits.shape[0]) if t.ndim == 0 else t).long()


def median_ms(fn, reps=20):
    out = []
    for _ in range(reps + 3):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - begin))
    return statistics.median(out[3:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vgg16_bn")
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    model = common.build(a.model, "cuda")
    x = common.images(a.batch, 224, "cuda")
    with torch.no_grad():
        t = model(x).argmax(1)
    g = GradCAM(model)
    g(x, t, "weighted")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g(x, t, "weighted")
    torch.cuda.set_sync_debug_mode(0)
    print(f"{a.model}: {len(caught)} synchronising calls in one GradCAM call")
    for w in caught[:8]:
        print("   ", str(w.message).splitlines()[0][:150])
    forward = lambda: torch.no_grad()(model)(x)  # noqa: E731
    call = lambda: g(x, t, "weighted")  # noqa: E731
    timing = {"forward": median_ms(forward), "gradcam (library)": median_ms(call)}
    contrast.as_classes = explain.as_classes = unchecked
    timing["gradcam, range check without sync"] = median_ms(call)
    contrast.as_classes = explain.as_classes = checked
    timing["gradcam (library), again"] = median_ms(call)
    for k, v in timing.items():
        print(f"    {k:40s} {v:7.2f} ms  ({v / timing['forward']:.2f}x forward)")


if __name__ == "__main__":
    main()
