"""Speed and memory of the explanation methods, as ratios against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_methods.py [--reps 11] [--batch 16] [--out benchmarks/results/methods.json]

CPU, 2 threads, EfficientNet-Lite0 (its real weights) and ResNet-18 (random weights: timing only), batch 16 at 224.
Each repetition runs every variant once, in an order that rotates between repetitions (interleaved), after one
warm-up round; figures are medians over repetitions, with the spread (min, max) beside them. Peak memory is the
peak resident set of the process during a second run of a variant (after a warm-up run), in all and above the
resident set before it (Linux: VmHWM reset through /proc/self/clear_refs), in a fresh subprocess per variant.

Variants (all maps signed, one forward pass each):
- forward: a plain no-grad forward pass (the floor).
- METHOD/original, METHOD/weighted: one map per image from the logit y_t or the probability p_t.
- gradcam/12maps: top-3 classes x 4 targets per image, one forward and one batched backward
  (is_grads_batched); -separate: twelve calls; -expanded: the batch repeated 12 times, one backward.
- explicit/gradcam, explicit/gradient: the explicit weighted contrast, one backward pass per class (C = 1,000).
  For Gradient (a backward pass through the whole network per class) the per-class backward is timed on
  `--explicit-sample` classes and multiplied by 1,000; this extrapolation is stated in the results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

from contrastive_explanations.cam import GradCAM, LinearApproximation, XGradCAM
from contrastive_explanations.contrast import OriginalTarget, WeightedTarget, other_class_weights
from contrastive_explanations.explain import explaining, leaf_output
from contrastive_explanations.gradient import Gradient
from contrastive_explanations.models import efficientnet_lite0

METHODS = {"gradient": Gradient, "linear_approximation": LinearApproximation, "gradcam": GradCAM,
           "xgradcam": XGradCAM}


def build(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        return efficientnet_lite0()
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def variants(model: torch.nn.Module, x: torch.Tensor, explicit_sample: int) -> dict:
    "name -> zero-argument callable; every callable does the whole job for the batch x."
    with torch.no_grad():
        logits = model(x)
    t, top3 = logits.argmax(1), logits.topk(3).indices
    out = {"forward": lambda: torch.no_grad()(model)(x)}
    for name, Method in METHODS.items():
        method = Method(model)
        for target in ("original", "weighted"):
            out[f"{name}/{target}"] = lambda method=method, target=target: method(x, t, target)
    gradcam = GradCAM(model)
    twelve = ["original", "weighted", "mean", "max"]
    out["gradcam/12maps"] = lambda: gradcam(x, top3, twelve)
    out["gradcam/12maps-separate"] = lambda: [gradcam(x, top3[:, k], t) for k in range(3) for t in twelve]
    out["gradcam/12maps-expanded"] = lambda: expanded_gradcam(model, gradcam, x, top3, twelve)
    out["explicit/gradcam"] = lambda: explicit_gradcam(model, gradcam.layer, x, t)
    out["explicit/gradient"] = lambda: explicit_gradient(model, x, t, explicit_sample)
    return out


def expanded_gradcam(model, gradcam, x, top3, targets):
    "The 12 maps from the batch repeated 12 times: one forward of 12 B images, one backward of the summed objectives."
    from contrastive_explanations.contrast import get_target

    pairs = [(k, get_target(t)) for k in range(top3.shape[1]) for t in targets]
    with explaining(model), leaf_output(gradcam.layer) as captured:
        logits = model(x.repeat(len(pairs), 1, 1, 1))
        B = len(x)
        total = sum(target(logits[i * B:(i + 1) * B], top3[:, k]).sum() for i, (k, target) in enumerate(pairs))
        (g,) = torch.autograd.grad(total, captured[0])
        return torch.einsum("bk,bkhw->bhw", g.mean((-2, -1)), captured[0].detach())


def explicit_gradcam(model, layer, x, t):
    "The weighted contrast the explicit way: GradCAM of all 1,000 classes, one head-only backward each, combined."
    with explaining(model), leaf_output(layer) as captured:
        logits = model(x)
        A = captured[0]
        alpha = other_class_weights(logits, t)
        weighted = torch.zeros(A.shape[0], *A.shape[2:])
        for s in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[:, s].sum(), A, retain_graph=True)
            w_s = torch.where(t == s, 1.0, -alpha[:, s])
            weighted += w_s[:, None, None] * torch.einsum("bk,bkhw->bhw", g.mean((-2, -1)), A.detach())
    return weighted


def explicit_gradient(model, x, t, sample: int):
    "Input gradients class by class: `sample` backward passes through the whole network, the time scaled to C."
    with explaining(model):
        xg = x.clone().requires_grad_(True)
        logits = model(xg)
        start = time.perf_counter()
        for s in range(sample):
            torch.autograd.grad(logits[:, s].sum(), xg, retain_graph=True)
        per_class = (time.perf_counter() - start) / sample
    return per_class * (logits.shape[1] - sample)  # seconds still owed for the classes not run


def time_all(fns: dict, reps: int) -> dict:
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps + 1):  # round 0 is the warm-up
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            start = time.perf_counter()
            owed = fns[n]()
            seconds = time.perf_counter() - start + (owed if isinstance(owed, float) else 0.0)
            if r:
                times[n].append(seconds)
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)} for n, v in times.items()}


def peak_memory(model_name: str, variant: str, batch: int, explicit_sample: int) -> dict:
    "Peak resident memory (MB) of a run of `variant`, in all and above the resident set before it, in a fresh process."
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"import bench_methods as b; print(b._peak_child({model_name!r}, {variant!r}, {batch}, {explicit_sample}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, growth = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"peak_mb": peak, "growth_mb": growth}


def _peak_child(model_name: str, variant: str, batch: int, explicit_sample: int) -> str:
    "Total peak and growth (MB) of the resident set over a second run of `variant` (the first one warms up)."
    torch.set_num_threads(2)
    model = build(model_name)
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fns = variants(model, x, explicit_sample)
    fns[variant]()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    fns[variant]()
    peak = _status_kb("VmHWM")
    return f"{peak / 1024} {(peak - before) / 1024}"


def _status_kb(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--explicit-sample", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "methods.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {"settings": {**vars(args), "out": str(args.out), "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                            "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                            "explicit_gradient": f"per-class backward timed on {args.explicit_sample} classes, x1000"},
               "models": {}}
    for model_name in args.models:
        print(f"==> {model_name}: timing", flush=True)
        model = build(model_name)
        x = torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        timing = time_all(variants(model, x, args.explicit_sample), args.reps)
        med = {n: v["median"] for n, v in timing.items()}
        ratios = {f"{m}: weighted / original": med[f"{m}/weighted"] / med[f"{m}/original"] for m in METHODS}
        ratios["gradcam weighted / no-grad forward"] = med["gradcam/weighted"] / med["forward"]
        ratios["explicit gradient / ours"] = med["explicit/gradient"] / med["gradient/weighted"]
        ratios["explicit gradcam / ours"] = med["explicit/gradcam"] / med["gradcam/weighted"]
        ratios["12 maps / 1 map (gradcam)"] = med["gradcam/12maps"] / med["gradcam/weighted"]
        ratios["12 maps: separate calls / 1 map"] = med["gradcam/12maps-separate"] / med["gradcam/weighted"]
        ratios["12 maps: batch repeated 12x / 1 map"] = med["gradcam/12maps-expanded"] / med["gradcam/weighted"]
        print(f"==> {model_name}: peak memory", flush=True)
        memory = {n: peak_memory(model_name, n, args.batch, args.explicit_sample)
                  for n in ("forward", "gradcam/weighted", "gradcam/12maps", "gradcam/12maps-expanded",
                            "gradient/weighted")}
        for n in ("gradcam/weighted", "gradcam/12maps", "gradient/weighted"):
            ratios[f"{n} peak memory / forward's"] = memory[n]["peak_mb"] / memory["forward"]["peak_mb"]
        results["models"][model_name] = {"seconds": timing, "ratios": ratios, "peak_memory_mb": memory}
        for k, v in ratios.items():
            print(f"    {k:45s} {v:8.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"==> written {args.out}")


if __name__ == "__main__":
    main()
