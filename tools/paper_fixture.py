"""A miniature of everything the paper profile opens, so that its code runs on a CPU in minutes.

    python -m tools.paper_fixture OUT

writes, into a new folder OUT (built beside it and renamed, so it is complete or absent):
  OUT/data/          ImageNet val in torchvision's layout (with the meta.bin torchvision parses from the devkit),
                     CUB_200_2011/ and food-101/ in their official layouts: a few small generated JPEGs each
  OUT/torch_home/    hub/checkpoints/: the DEFAULT-weight file of every torchvision network the book uses, under
                     torchvision's own file name, holding random weights (so the real offline loading code runs)

and prints the command that builds the book on it with the `fixture` profile (params/fixture.yaml). Bad input is one
line on stderr and exit status 2; nothing is left behind."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

from contrastive_explanations.data.datasets import write_fixture
from contrastive_explanations.data.models import TORCHVISION_IMAGENET
from contrastive_explanations.data.sources import FINETUNE_BASES

DATASETS = {"imagenet": dict(n_classes=3, per_class=1), "cub200": dict(n_classes=3, per_class=4),
            "food101": dict(n_classes=3, per_class=4)}
BUILD_ARGS = {"googlenet": {"aux_logits": True, "init_weights": True}}  # the DEFAULT file holds the aux heads too


def networks() -> list[str]:
    "Every torchvision architecture whose DEFAULT weights the paper profile loads: Figure 1's and the fine-tuned bases."
    return [*TORCHVISION_IMAGENET, *sorted({arch for arch, _ in FINETUNE_BASES.values()})]


def weights_path(torch_home: Path, arch: str) -> Path:
    "Where torchvision looks for the DEFAULT weights of `arch` when TORCH_HOME is `torch_home`."
    return torch_home / "hub" / "checkpoints" / Path(torchvision.models.get_model_weights(arch).DEFAULT.url).name


def write_weights(torch_home: Path, seed: int = 0) -> list[Path]:
    "Random weights of each network, saved where torchvision looks for its DEFAULT file under `torch_home` (only there)."
    paths = []
    for i, arch in enumerate(networks()):
        torch.manual_seed(seed + i)
        net = torchvision.models.get_model(arch, weights=None, **BUILD_ARGS.get(arch, {}))
        path = weights_path(torch_home, arch)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
        paths.append(path)
    return paths


def write_data(data: Path, seed: int = 0) -> Path:
    "The three datasets side by side in one data root, as the paper profile expects them."
    data.mkdir(parents=True)
    for name, size in DATASETS.items():
        part = write_fixture(name, data.parent / f".{name}", seed=seed, **size)
        for entry in part.iterdir():
            entry.rename(data / entry.name)
        part.rmdir()
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.paper_fixture", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a folder that does not exist yet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists: the fixture is written into a new folder (choose another path, or delete it)",
              file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write_data(tmp / "data", args.seed)
        write_weights(tmp / "torch_home", args.seed)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"fixture written to {out}: build the paper code path on it with\n"
          f"  TORCH_HOME={out / 'torch_home'} make book PROFILE=fixture DATA_ROOT={out / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
