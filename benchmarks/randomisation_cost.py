"""Cost of the randomisation and pointing metrics against Quantus 0.6 on the same work: a small seeded CNN, the input
gradient's maps, 16 images of 32 x 32. Prints the median wall time (seconds) over several runs, per call and per image.

    python benchmarks/randomisation_cost.py [--runs 5] [--images 16]
"""
import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from contrastive_explanations.methods import make_method
from contrastive_explanations.metrics import pointing as P
from contrastive_explanations.metrics import randomisation as R


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def explain(model, x, classes):
    return make_method("gradient", model)(x, classes, targets=["original"]).maps


def quantus_explain(model, inputs, targets, **kwargs):
    return explain(model, torch.as_tensor(inputs), torch.as_tensor(targets)[:, None])[:, 0, 0].numpy()


def median_time(f, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(runs: int = 5, images: int = 16) -> None:
    import quantus

    torch.set_num_threads(1)
    net = network()
    x = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)
    xn, yn = x.numpy(), y.numpy()
    maps = explain(net, x, y[:, None])[:, 0, 0]
    masks = torch.zeros_like(maps, dtype=torch.bool)
    masks[:, 8:20, 10:22] = True
    q = dict(disable_warnings=True)
    work = {
        "MPRT (spearman, abs)": (
            lambda: R.mprt(net, x, y[:, None], explain, with_ssim=False),
            lambda: quantus.MPRT(**q)(model=net, x_batch=xn, y_batch=yn, explain_func=quantus_explain)),
        "EfficientMPRT": (
            lambda: R.efficient_mprt(net, x, y[:, None], explain),
            lambda: quantus.EfficientMPRT(**q)(model=net, x_batch=xn, y_batch=yn, explain_func=quantus_explain)),
        "RandomLogit (SSIM)": (
            lambda: R.random_logit(net, x, y, explain, num_classes=10),
            lambda: quantus.RandomLogit(num_classes=10, **q)(model=net, x_batch=xn, y_batch=yn,
                                                             explain_func=quantus_explain)),
        "PointingGame (maps given)": (
            lambda: P.pointing_game(maps, masks, 0),
            lambda: quantus.PointingGame(**q)(model=net, x_batch=xn, y_batch=yn, a_batch=maps.numpy()[:, None],
                                              s_batch=masks.numpy()[:, None].astype(np.float32))),
    }
    print(f"{images} images, 32 x 32, input gradient, median of {runs} runs, 1 thread")
    print(f"{'metric':28s} {'ours s':>9s} {'quantus s':>10s} {'ours ms/img':>12s} {'quantus ms/img':>15s}")
    for name, (ours, theirs) in work.items():
        a, b = median_time(ours, runs), median_time(theirs, runs)
        print(f"{name:28s} {a:9.4f} {b:10.4f} {1e3 * a / images:12.2f} {1e3 * b / images:15.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=16)
    main(**vars(parser.parse_args()))
