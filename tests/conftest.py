"""What several test files share: tiny random networks, quick to build on a CPU.

Plain functions (import them: `from conftest import tiny_cnn`), so that module-level helpers and hypothesis tests can
call them too. Each seeds torch's generator itself, so a network depends only on its arguments."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def tiny_cnn(classes: int = 5, seed: int = 0, *, widths: tuple[int, int] = (4, 5), batch_norm: bool = True,
             pool: int = 2, dtype: torch.dtype = torch.float64, bn_mean: tuple[float, float] | None = (-0.3, 0.3),
             bn_var: tuple[float, float] | None = (0.5, 2.0)) -> nn.Sequential:
    """A small random CNN in evaluation mode: conv 3x3, [batch norm], ReLU, conv 3x3, ReLU, average pool to
    `pool` x `pool`, linear head. Its last convolution is layer '3' with batch norm, '2' without. The batch norm's
    running mean and variance are drawn uniformly from `bn_mean` and `bn_var` (None: left at 0 and 1)."""
    torch.manual_seed(seed)
    a, b = widths
    net = nn.Sequential(nn.Conv2d(3, a, 3, padding=1), *([nn.BatchNorm2d(a)] if batch_norm else []), nn.ReLU(),
                        nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
                        nn.Linear(b * pool * pool, classes)).to(dtype).eval()
    if batch_norm and bn_mean is not None:
        net[1].running_mean.uniform_(*bn_mean)
    if batch_norm and bn_var is not None:
        net[1].running_var.uniform_(*bn_var)
    return net


def tiny_vit(seed: int = 0, image_size: int = 16, classes: int = 4, num_layers: int = 2, num_heads: int = 2,
             dtype: torch.dtype = torch.float64, *, head_bias: bool = True, class_token: bool = True
             ) -> VisionTransformer:
    """A random torchvision ViT with 8-pixel patches (hidden size 16), in evaluation mode. torchvision zeroes the
    head, so that every logit and every map would be 0, and starts the positions small: they are drawn at random,
    and so are the head's bias and the class token unless `head_bias` / `class_token` is False."""
    torch.manual_seed(seed)
    vit = VisionTransformer(image_size=image_size, patch_size=8, num_layers=num_layers, num_heads=num_heads,
                            hidden_dim=16, mlp_dim=32, num_classes=classes)
    nn.init.normal_(vit.heads.head.weight)
    if head_bias:
        nn.init.normal_(vit.heads.head.bias)
    nn.init.normal_(vit.encoder.pos_embedding, std=0.5)
    if class_token:
        nn.init.normal_(vit.class_token)
    return vit.to(dtype).eval()


def pytest_collection_modifyitems(items):
    "Modules marked `long_setup` first (stable otherwise): under `make test`'s two workers one of them starts on it."
    items.sort(key=lambda item: item.get_closest_marker("long_setup") is None)


def tree_state(root) -> dict:
    "Every path under root with its size, mode and modification time: what a writer would change."
    from pathlib import Path
    root = Path(root)
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}
