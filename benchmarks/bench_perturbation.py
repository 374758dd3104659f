"""Input-space perturbation (the review's Figure 1) throughput, images per second, ours against the review's structure
(item 6).

    .venv/bin/python -m benchmarks.bench_perturbation [--reps 5] [--batch 4] [--n-tot 10]

The work per image, in both variants: its clean outputs, then n_tot signed-gradient steps for each of the four sign
sources (original, mean, max, weighted) and both budgets eps in {1e-3, 3e-3}, then the perturbed outputs: what
`Perturbation.rows` of contrastive_explanations/perturbation.py does for one n_tot.
- ours: one clean forward for the batch, `perturb(model, x, t, SOURCES, EPSILONS, n_tot)` (every source and budget
  of every image in the same forward and backward passes, n_tot times), one forward of the perturbed images.
- review: each (source, eps) a separate run, one image at a time (batch 1), the clean image re-evaluated in every
  run: for each run and image, a clean forward, n_tot forward-backward steps, a forward of the perturbed image.
  It uses the library's own step, bounds and sign objectives, so both give the same images (checked).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from contrastive_explanations.methods.explain import explaining
from contrastive_explanations.experiments.perturbation import (EPSILONS, SOURCES, perturb, perturbation_bounds,
                                                   perturbation_step, sign_targets)

from . import common


def ours(model, x, t, n_tot):
    "Clean outputs, every source and budget perturbed together, perturbed outputs."
    with torch.no_grad():
        clean = model(x)
    xp = perturb(model, x, t, SOURCES, EPSILONS, n_tot)
    with torch.no_grad():
        after = model(xp.flatten(0, 2))
    return clean, xp, after


def review(model, x, t, n_tot):
    "Each (source, eps) a separate run over the images one by one, the clean image re-evaluated in each run."
    _, targets = sign_targets(SOURCES)
    out = torch.empty(len(x), len(targets), len(EPSILONS), *x.shape[1:], dtype=x.dtype, device=x.device)
    for s, target in enumerate(targets):
        for e, eps in enumerate(EPSILONS):
            for b in range(len(x)):
                x0, tb = x[b:b + 1], t[b:b + 1]
                with torch.no_grad():
                    model(x0)  # the original, evaluated again in every run
                lower, upper = perturbation_bounds(x0, eps)
                xi = x0.clone()
                with explaining(model):
                    for _ in range(n_tot):
                        xi.requires_grad_(True)
                        (grad,) = torch.autograd.grad(target(model(xi), tb).sum(), xi)
                        xi = perturbation_step(xi.detach(), grad, eps / n_tot, lower, upper)
                with torch.no_grad():
                    model(xi)
                out[b, s, e] = xi[0]
    return out


def setup(model_name: str, options: dict):
    model = common.build(model_name, options["device"])
    x = common.images(options["batch"], options["size"], options["device"])
    with torch.no_grad():
        t = model(x).argmax(1)
    return model, x, t


def variants_for(model_name: str, options: dict) -> dict:
    model, x, t = setup(model_name, options)
    n = options["n_tot"]
    return {"ours": lambda: ours(model, x, t, n), "review": lambda: review(model, x, t, n)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, reps=5)
    parser.set_defaults(batch=4)
    parser.add_argument("--n-tot", type=int, default=10)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    results, path = common.start(args, "perturbation")
    results["settings"].update(sources=list(SOURCES), epsilons=list(EPSILONS))
    options = {"device": args.device, "batch": args.batch, "size": args.size, "threads": args.threads,
               "n_tot": args.n_tot}

    def measure(model_name: str) -> dict | None:
        print(f"==> perturbation, {model_name}: checking, then timing", flush=True)
        model, x, t = setup(model_name, options)
        a, b = ours(model, x, t, args.n_tot)[1], review(model, x, t, args.n_tot)
        fns = {"ours": lambda: ours(model, x, t, args.n_tot), "review": lambda: review(model, x, t, args.n_tot)}
        seconds = common.time_all(fns, args.reps, args.device)
        ratios = {"Figure 1: review's structure / ours (time per image)": common.ratio(
            seconds, "review", "ours", None, "6. input-space perturbation",
            f"n_tot = {args.n_tot}, 4 sign sources x 2 budgets per image")}
        checks = {"share of perturbed pixel values equal in both (to 1e-6)": float(((a - b).abs() <= 1e-6).float().mean()),
                  "max |difference| of the perturbed images": float((a - b).abs().max())}
        entry = common.throughput_entry(seconds, args.batch, ratios, checks)
        return common.with_memory(entry, args, "bench_perturbation", model_name, list(fns), options, fns)

    return common.measure_all(results, path, began, args.models, measure)


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
