"""Speed and memory of the explanation methods, as ratios against baselines measured in the same run (items 1, 2, 4).

    .venv/bin/python -m benchmarks.bench_methods [--reps 7] [--batch 16] [--models efficientnet_lite0 resnet18]
    .venv/bin/python -m benchmarks.bench_methods --device cuda --models vgg16_bn vit_b_16 --batch 64

CPU, 2 threads, EfficientNet-Lite0 (its real weights) and ResNet-18 (random weights: timing only), batch 16 at 224;
on a GPU the results go to methods-cuda.json. Timing and memory as in common.py.

Variants (all maps signed, one forward pass each):
- forward: a plain no-grad forward pass (the floor).
- METHOD/original, METHOD/weighted: one map per image from the logit y_t or the probability p_t.
  For a ViT, 'gradcam' is ViTGradCAM on the second-to-last block, and the CAM variants other than GradCAM are left out.
- gradcam/12maps: top-3 classes x 4 targets per image, one forward and one batched backward
  (is_grads_batched); -separate: twelve calls; -expanded: the batch repeated 12 times, one backward.
- explicit/gradcam: the explicit weighted contrast of Eq. 1, one backward pass per class (C = 1,000) from the logits
  to the explained layer (for GradCAM at the last layer, only the head), each class's map combined with its weight.
- explicit/gradcam-deeper, gradcam-deeper/weighted: the same at an earlier layer, so that each per-class backward
  crosses more of the network (timed on --explicit-sample classes, scaled to C).
- explicit/gradient: input gradients class by class, timed on --explicit-sample classes and scaled to C.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from contrastive_explanations.methods.cam import GradCAM, LinearApproximation, XGradCAM
from contrastive_explanations.methods.targets import WeightedTarget, get_target, other_class_weights
from contrastive_explanations.methods.explain import explaining, leaf_output
from contrastive_explanations.methods.gradient import Gradient
from contrastive_explanations.methods.vit import ViTGradCAM

from . import common

TWELVE = ["original", "weighted", "mean", "max"]  # x top-3 classes
MEMORY_GOALS = {"gradcam/weighted": ("<=", 1.10), "gradcam/12maps": ("<=", 1.10)}  # issue 3 (e): peak / no-grad forward


def methods_of(model: torch.nn.Module) -> dict:
    "The methods benchmarked on this network: Gradient and the CAMs, or Gradient and ViTGradCAM for a ViT."
    if common.is_vit(model):
        return {"gradient": Gradient(model), "gradcam": ViTGradCAM(model)}
    return {"gradient": Gradient(model), "linear_approximation": LinearApproximation(model),
            "gradcam": GradCAM(model), "xgradcam": XGradCAM(model)}


def variants(model: torch.nn.Module, x: torch.Tensor, explicit_sample: int, deeper: str | None,
             device: str = "cpu") -> dict:
    "name -> zero-argument callable; every callable does the whole job for the batch x."
    with torch.no_grad():
        logits = model(x)
    t, top3 = logits.argmax(1), logits.topk(3).indices
    out = {"forward": lambda: torch.no_grad()(model)(x)}
    methods = methods_of(model)
    for name, method in methods.items():
        for target in ("original", "weighted"):
            out[f"{name}/{target}"] = lambda method=method, target=target: method(x, t, target)
    gradcam = methods["gradcam"]
    out["gradcam/12maps"] = lambda: gradcam(x, top3, TWELVE)
    out["gradcam/12maps-separate"] = lambda: [gradcam(x, top3[:, k], u) for k in range(3) for u in TWELVE]
    out["gradcam/12maps-expanded"] = lambda: expanded(model, gradcam, x, top3, TWELVE)
    out["explicit/gradcam"] = lambda: explicit_contrast(model, gradcam, x, t, None, device)
    if deeper is not None:
        deep = GradCAM(model, deeper)
        out["gradcam-deeper/weighted"] = lambda: deep(x, t, "weighted")
        out["explicit/gradcam-deeper"] = lambda: explicit_contrast(model, deep, x, t, explicit_sample, device)
    out["explicit/gradient"] = lambda: explicit_gradient(model, x, t, explicit_sample, device)
    return out


def variants_for(model_name: str, options: dict) -> dict:
    "The variants of a freshly built network and batch (for the fresh-process memory measurement)."
    model = common.build(model_name, options["device"])
    x = common.images(options["batch"], options["size"], options["device"])
    return variants(model, x, options["explicit_sample"], common.deeper_layer(model_name), options["device"])


def expanded(model, method, x, top3, targets):
    "The 12 maps from the batch repeated 12 times: one forward of 12 B images, one backward of the summed objectives."
    pairs = [(k, get_target(u)) for k in range(top3.shape[1]) for u in targets]
    with explaining(model), leaf_output(method.layer) as captured:
        logits = model(x.repeat(len(pairs), 1, 1, 1))
        B = len(x)
        total = sum(target(logits[i * B:(i + 1) * B], top3[:, k]).sum() for i, (k, target) in enumerate(pairs))
        (g,) = torch.autograd.grad(total, captured[0])
        return method._maps(g[:, None], captured[0].detach())


def explicit_contrast(model, method, x, t, sample: int | None = None, device: str = "cpu"):
    """Eq. 1 the explicit way: the method's map of every class (one backward from y_s to the layer each), combined
    with the weights 1 for t and -alpha_s for s != t. With `sample`, only that many classes run and the seconds
    still owed for the others are returned (a float) instead of the map."""
    with explaining(model), leaf_output(method.layer) as captured:
        logits = model(x)
        A = captured[0]
        alpha = other_class_weights(logits, t)
        C = logits.shape[1] if sample is None else sample
        common.synchronize(device)
        begin = time.perf_counter()
        weighted = 0
        for s in range(C):
            (g,) = torch.autograd.grad(logits[:, s].sum(), A, retain_graph=True)
            w_s = torch.where(t == s, 1.0, -alpha[:, s])
            weighted = weighted + w_s[:, None, None] * method._maps(g[:, None], A.detach())[:, 0]
        common.synchronize(device)
        per_class = (time.perf_counter() - begin) / C
    return weighted if sample is None else per_class * (logits.shape[1] - sample)


def explicit_gradient(model, x, t, sample: int, device: str = "cpu") -> float:
    "Input gradients class by class: `sample` backward passes through the whole network, the time scaled to C."
    with explaining(model):
        xg = x.clone().requires_grad_(True)
        logits = model(xg)
        common.synchronize(device)
        begin = time.perf_counter()
        for s in range(sample):
            torch.autograd.grad(logits[:, s].sum(), xg, retain_graph=True)
        common.synchronize(device)
        per_class = (time.perf_counter() - begin) / sample
    return per_class * (logits.shape[1] - sample)  # seconds still owed for the classes not run


def agreement(model, x) -> dict:
    "How far the explicit Eq. 1 map (times the weighted target's scale p_t (1 - p_t)) is from ours, relative."
    method = methods_of(model)["gradcam"]
    ours = method(x, None, "weighted")
    t = ours.classes[:, 0]
    explicit = explicit_contrast(model, method, x, t) * WeightedTarget().scale(ours.logits, t)[:, None, None]
    diff = (explicit - ours.maps[:, 0, 0]).abs().max() / ours.maps.abs().max()
    return {"gradcam: explicit Eq. 1 vs ours, max |difference| / max |ours|": float(diff)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    parser.add_argument("--explicit-sample", type=int, default=10, help="classes timed for the sampled explicit "
                        "baselines (their time is scaled to C)")
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per peak-memory figure")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    results, path = common.start(args, "methods")
    results["settings"]["explicit_sampled"] = (f"explicit/gradient and explicit/gradcam-deeper: per-class backward "
                                               f"timed on {args.explicit_sample} classes, scaled to C")
    options = {"device": args.device, "batch": args.batch, "size": args.size, "threads": args.threads,
               "explicit_sample": args.explicit_sample}

    def measure(model_name: str) -> dict | None:
        print(f"==> methods, {model_name}: timing", flush=True)
        model = common.build(model_name, args.device)
        x = common.images(args.batch, args.size, args.device)
        deeper = None if common.is_vit(model) else common.deeper_layer(model_name)
        fns = variants(model, x, args.explicit_sample, deeper, args.device)
        seconds = common.time_all(fns, args.reps, args.device)
        R = common.ratio
        ratios = {}
        for m in methods_of(model):
            label = {"gradient": "Gradient", "linear_approximation": "Linear Approximation", "gradcam": "GradCAM",
                     "xgradcam": "XGradCAM"}[m]
            ratios[f"{label}: weighted / original"] = R(seconds, f"{m}/weighted", f"{m}/original", ("<=", 1.05),
                                                       "1. weighted vs original target")
        ratios["GradCAM weighted / no-grad forward"] = R(
            seconds, "gradcam/weighted", "forward", ("<=", 1.10), "1. weighted GradCAM vs plain forward")
        ratios["explicit Eq. 1 / ours: Gradient"] = R(
            seconds, "explicit/gradient", "gradient/weighted", (">=", 500), "2. ours vs explicit Eq. 1",
            f"explicit time sampled on {args.explicit_sample} classes, scaled to 1,000")
        ratios["explicit Eq. 1 / ours: GradCAM, last layer"] = R(
            seconds, "explicit/gradcam", "gradcam/weighted", (">=", 15), "2. ours vs explicit Eq. 1",
            "each per-class backward crosses only the head (pooling + linear)")
        if deeper is not None:
            ratios[f"explicit Eq. 1 / ours: GradCAM at {deeper} (extra row)"] = R(
                seconds, "explicit/gradcam-deeper", "gradcam-deeper/weighted", None, "2. ours vs explicit Eq. 1",
                f"an earlier layer: each per-class backward also crosses the layers after it; sampled on "
                f"{args.explicit_sample} classes, scaled to 1,000")
        ratios["12 maps in one call / 1 map"] = R(seconds, "gradcam/12maps", "gradcam/weighted", ("<=", 1.25),
                                                  "4. several targets per image")
        ratios["12 maps: separate calls / one call"] = R(seconds, "gradcam/12maps-separate", "gradcam/12maps", None,
                                                         "4. several targets per image")
        ratios["12 maps: batch repeated 12x / one call"] = R(seconds, "gradcam/12maps-expanded", "gradcam/12maps",
                                                             None, "4. several targets per image")
        entry = {"seconds": seconds, "ratios": ratios, "checks": agreement(model, x),
                 "layers": {"gradcam": getattr(methods_of(model)["gradcam"], "block", None) or
                            next(n for n, m in model.named_modules() if m is methods_of(model)["gradcam"].layer),
                            "deeper": deeper}}
        if not args.no_memory:
            print(f"==> methods, {model_name}: peak memory", flush=True)
            names = ["forward", "gradcam/weighted", "gradcam/12maps", "gradcam/12maps-expanded", "gradient/weighted"]
            entry["peak_memory_mb"] = memory = common.memory_of("bench_methods", model_name, names, options, fns,
                                                                repeats=args.memory_repeats)
            for n in (n for n in names[1:] if memory[n]["peak_mb"] and memory["forward"]["peak_mb"]):
                goal = MEMORY_GOALS.get(n)
                value = memory[n]["peak_mb"] / memory["forward"]["peak_mb"]
                entry["ratios"][f"peak memory: {n} / forward"] = {
                    "value": value, "min": None, "max": None, "numerator": n, "denominator": "forward",
                    "what": "8. memory", "goal": None if goal is None else list(goal),
                    "goal_text": common.goal_text(goal), "met": None if goal is None else value <= goal[1],
                    "note": f"ratio of the medians of {args.memory_repeats} fresh processes' peak resident sets"}
        return entry

    return common.measure_all(results, path, began, args.models, measure)


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
