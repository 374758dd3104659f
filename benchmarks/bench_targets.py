"""Figure 6's workload: the input-gradient norm ||grad_x y_t|| of 145 target classes per image (item 5).

    .venv/bin/python -m benchmarks.bench_targets [--reps 5] [--batch 16] [--chunk 29] [--sample 4]

The 145 classes of each image are its 145 most probable ones. Variants, each computing every norm of the batch:
- batched: `Gradient(model)(x, classes[:, chunk], 'original')` for chunks of --chunk classes (one forward and one
  batched backward per chunk, is_grads_batched), the norms from `Explanation.grads`.
- loop: one `Gradient` call per target class (all images of the batch in each call): 145 forwards and backwards.
- loop-shared-forward: one forward, then one backward per class with retain_graph (no library call; shows how much
  of the gain comes from sharing the forward pass).
- loop-per-image: the review's structure, one call per image and class (batch 1): B x 145 calls.
Unless --full is given, each variant runs only its first chunk, or its first --sample calls or classes, and the time
of the rest is extrapolated from them (calls are independent and alike: the same network, batch and shapes); the
results say so. --full runs the whole workload.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from contrastive_explanations.methods.explain import explaining
from contrastive_explanations.methods.gradient import Gradient

from . import common

N_CLASSES = 145  # the target classes of Figure 6


def norms(e) -> torch.Tensor:
    "(B, K) the norm of each class's input gradient, over colour channels and pixels."
    return e.grads[:, :, 0].flatten(2).norm(dim=-1)


def sampled(calls: list, sample: int | None, device: str):
    "Run the first `sample` zero-argument calls (all with None); return the seconds owed for the others, or None."
    n = len(calls) if sample is None else min(sample, len(calls))
    common.synchronize(device)
    begin = time.perf_counter()
    out = [c() for c in calls[:n]]
    common.synchronize(device)
    if n == len(calls):
        return out
    return (time.perf_counter() - begin) / n * (len(calls) - n)


def shared_forward(model, x, classes, sample, device):
    "One forward, then one input-gradient backward per class (retain_graph); sampled like the others."
    with explaining(model):
        xg = x.clone().requires_grad_(True)
        logits = model(xg)
        calls = [lambda k=k: torch.autograd.grad(logits.gather(1, classes[:, k:k + 1]).sum(), xg,
                                                 retain_graph=True)[0].flatten(1).norm(dim=1)
                 for k in range(classes.shape[1])]
        return sampled(calls, sample, device)


def variants(model, x, classes, chunk: int, sample: int | None, device: str = "cpu") -> dict:
    g = Gradient(model, keep_grads=True)
    K = classes.shape[1]
    chunks = [lambda a=a: norms(g(x, classes[:, a:a + chunk], "original")) for a in range(0, K, chunk)]
    loop = [lambda k=k: norms(g(x, classes[:, k], "original")) for k in range(K)]
    per_image = [lambda b=b, k=k: norms(g(x[b:b + 1], classes[b:b + 1, k], "original"))
                 for b in range(len(x)) for k in range(K)]
    return {"batched": lambda: sampled(chunks, None if sample is None else 1, device),
            "loop": lambda: sampled(loop, sample, device),
            "loop-shared-forward": lambda: shared_forward(model, x, classes, sample, device),
            "loop-per-image": lambda: sampled(per_image, sample, device)}


def top_classes(model, x, k: int) -> torch.Tensor:
    with torch.no_grad():
        return model(x).topk(k, dim=1).indices


def variants_for(model_name: str, options: dict) -> dict:
    model = common.build(model_name, options["device"])
    x = common.images(options["batch"], options["size"], options["device"])
    return variants(model, x, top_classes(model, x, N_CLASSES), options["chunk"], options["sample"],
                    options["device"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, reps=5)
    parser.add_argument("--chunk", type=int, default=29, help="classes per batched call (145 = 5 x 29)")
    parser.add_argument("--sample", type=int, default=4, help="calls timed per repetition of the loops")
    parser.add_argument("--full", action="store_true", help="run the whole workload, nothing extrapolated")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    results, path = common.start(args, "targets")
    sample = None if args.full else args.sample
    results["settings"]["extrapolated"] = (
        "nothing: the whole workload ran" if args.full else
        f"batched: the first of {math.ceil(N_CLASSES / args.chunk)} chunks timed, times the chunk count; loops: the "
        f"first {args.sample} calls (classes) timed, times the count")
    options = {"device": args.device, "batch": args.batch, "size": args.size, "threads": args.threads,
               "chunk": args.chunk, "sample": sample}

    def measure(model_name: str) -> dict | None:
        print(f"==> targets, {model_name}: checking the norms, then timing", flush=True)
        model = common.build(model_name, args.device)
        x = common.images(args.batch, args.size, args.device)
        classes = top_classes(model, x, N_CLASSES)
        g = Gradient(model, keep_grads=True)
        check = classes[:, :3]
        batched, looped = norms(g(x, check, "original")), torch.stack([norms(g(x, check[:, k], "original"))[:, 0]
                                                                      for k in range(3)], 1)
        fns = variants(model, x, classes, args.chunk, sample, args.device)
        seconds = common.time_all(fns, args.reps, args.device)
        note = "" if args.full else "partly extrapolated: see settings.extrapolated"
        R = common.ratio
        ratios = {
            "Figure 6: per-target loop / batched": R(seconds, "loop", "batched", (">=", 10),
                                                      "5. 145 targets per image", note),
            "Figure 6: loop sharing one forward / batched": R(seconds, "loop-shared-forward", "batched", None,
                                                              "5. 145 targets per image", note),
            "Figure 6: per image and target (batch 1) / batched": R(seconds, "loop-per-image", "batched", None,
                                                                    "5. 145 targets per image", note),
        }
        checks = {"batched vs loop norms, max relative difference":
                  float(((batched - looped).abs() / looped.abs().clamp_min(1e-30)).max())}
        entry = common.throughput_entry(seconds, args.batch, ratios, checks)
        return common.with_memory(entry, args, "bench_targets", model_name, ["batched", "loop"], options, fns)

    return common.measure_all(results, path, began, args.models, measure)


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
