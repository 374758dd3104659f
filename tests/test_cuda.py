"""The methods on a GPU: the same maps as on the CPU, in float32 and bfloat16, and the model left as it was.

Skipped where no CUDA device is present (the CI machine has none); run `pytest -m gpu` on a GPU machine."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from contrastive_explanations.cam import GradCAM, LinearApproximation, XGradCAM
from contrastive_explanations.fullgrad import FullGrad
from contrastive_explanations.gradient import Gradient
from contrastive_explanations.vit import AttentionRollout, ViTGradCAM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
TARGETS = ["original", "mean", "max", "weighted", "weighted_log"]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10).eval()


CASES = [(cnn, Gradient, {}), (cnn, LinearApproximation, {"layer": "3"}), (cnn, GradCAM, {"layer": "3"}),
         (cnn, XGradCAM, {"layer": "3"}), (cnn, FullGrad, {}), (vit, ViTGradCAM, {}), (vit, AttentionRollout, {})]


@pytest.mark.parametrize("make,Method,kwargs", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_cuda_matches_cpu_float32(make, Method, kwargs):
    model = make()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    cpu = Method(model, **kwargs)(x, t, TARGETS).maps
    model.cuda()
    gpu = Method(model, **kwargs)(x.cuda(), t.cuda(), TARGETS)
    assert gpu.maps.is_cuda and gpu.maps.shape == cpu.shape
    torch.testing.assert_close(gpu.maps.cpu(), cpu, rtol=1e-3, atol=1e-5 * cpu.abs().max().item())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("make,Method,kwargs", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_cuda_bfloat16_is_close_to_float32(make, Method, kwargs):
    model = make().cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref = Method(model, **kwargs)(x, None, ["original", "weighted"]).maps.float()
    half = Method(model.bfloat16(), **kwargs)(x.bfloat16(), None, ["original", "weighted"]).maps.float()
    assert torch.isfinite(half).all()
    cos = nn.functional.cosine_similarity(half.flatten(2), ref.flatten(2), dim=-1)
    assert cos.min() > 0.9, cos
