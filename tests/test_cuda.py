"""The methods on a GPU: the same maps as on the CPU, in float32 and bfloat16, and the model left as it was.

Skipped where no CUDA device is present (the CI machine has none); run `pytest -m gpu` on a GPU machine."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from contrastive_explanations.methods.cam import GradCAM, LinearApproximation, XGradCAM
from contrastive_explanations.methods.fullgrad import FullGrad
from contrastive_explanations.methods.gradient import Gradient
from contrastive_explanations.methods.vit import AttentionRollout, ViTGradCAM

from benchmarks.common import synchronisations
from conftest import tiny_cnn, tiny_vit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
TARGETS = ["original", "mean", "max", "weighted", "weighted_log"]


def cnn() -> nn.Module:
    return tiny_cnn(10, 0, widths=(8, 16), pool=1, dtype=torch.float32, bn_mean=None, bn_var=None)


def vit() -> nn.Module:
    return tiny_vit(0, 32, 10, dtype=torch.float32, class_token=False)


@pytest.fixture
def exact_float32():
    "Plain float32 on the GPU: no TF32 convolutions or matrix products (cuDNN allows TF32 by default)."
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


CASES = [(cnn, Gradient, {}), (cnn, LinearApproximation, {"layer": "3"}), (cnn, GradCAM, {"layer": "3"}),
         (cnn, XGradCAM, {"layer": "3"}), (cnn, FullGrad, {}), (vit, ViTGradCAM, {}), (vit, AttentionRollout, {})]


@pytest.mark.parametrize("make,Method,kwargs", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_cuda_matches_cpu_float32(make, Method, kwargs, exact_float32):
    model = make()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    cpu = Method(model, **kwargs)(x, t, TARGETS).maps
    assert cpu.abs().max() > 0  # something to compare
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
    assert ref.abs().max() > 0
    half = Method(model.bfloat16(), **kwargs)(x.bfloat16(), None, ["original", "weighted"]).maps.float()
    assert torch.isfinite(half).all()
    cos = nn.functional.cosine_similarity(half.flatten(2), ref.flatten(2), dim=-1)
    assert cos.min() > 0.9, cos


@pytest.mark.parametrize("make,Method,kwargs", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_a_call_waits_for_the_gpu_once_at_its_end(make, Method, kwargs):
    "The class-range and finiteness checks are read together, after the backward pass is queued (nbs/01_targets)."
    model = make().cuda()
    method, x = Method(model, **kwargs), torch.rand(4, 3, 32, 32, device="cuda")
    method(x, None, TARGETS)  # warm-up: first calls initialise cuBLAS and friends
    assert synchronisations(lambda: torch.ones(1, device="cuda").item())  # the detector sees a plain read-back
    for classes in (None, torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], device="cuda"), [1, 2, 3, 4], 5):
        syncs = synchronisations(lambda: method(x, classes, TARGETS))
        assert len(syncs) <= 1, syncs


@pytest.mark.parametrize("make,Method,kwargs", CASES[:3] + CASES[-1:], ids=lambda v: getattr(v, "__name__", ""))
def test_bad_values_on_the_gpu_raise_clear_errors_and_leave_the_device_usable(make, Method, kwargs):
    model = make().cuda()
    method, x = Method(model, **kwargs), torch.rand(2, 3, 32, 32, device="cuda")
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\), got values from 3 to 10"):
        method(x, torch.tensor([3, 10], device="cuda"))
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\), got values from -1 to 0"):  # the first failing column
        method(x, torch.tensor([[-1, 2], [0, 1]], device="cuda"))
    with pytest.raises(ValueError, match="NaN or inf"):
        method(x.masked_fill(x > 0.9, float("nan")), None)
    e = method(x, torch.tensor([3, 9], device="cuda"))  # no device-side assert poisoned the context
    assert torch.isfinite(e.maps).all() and e.classes[:, 0].tolist() == [3, 9]
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_a_sharded_run_on_the_gpu_equals_a_one_shard_run_in_the_profiles_float32(tmp_path, monkeypatch):
    "Batches of other sizes and other companions, the same numbers: the profile's `tf32: false` makes it so."
    from torch.utils.data import TensorDataset

    from contrastive_explanations.experiments.perturbation import NETWORKS, Perturbation
    from contrastive_explanations.data.sources import Source
    from contrastive_explanations.results import load_results, run, set_tf32
    from contrastive_explanations.run import load_profile

    def source(device: str = "cpu", n: int = 12, **_) -> Source:
        g = torch.Generator().manual_seed(1)
        x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g)
        return Source("gpu_cnn", "gpu_cnn", cnn().to(device), TensorDataset(x, y), [str(c) for c in range(10)])

    monkeypatch.setitem(NETWORKS, "gpu_cnn", source)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        set_tf32(True)
        load_profile("embedded")  # applies the profile's switch, as every chapter and command does
        assert not (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        one = run(Perturbation("gpu_cnn", device="cuda", batch_size=12), tmp_path / "one", progress=False)
        sharded = run(Perturbation("gpu_cnn", device="cuda", batch_size=2), tmp_path / "sharded", count=3,
                      progress=False)
        pd.testing.assert_frame_equal(one, sharded, check_exact=True)
        assert load_results(tmp_path / "sharded")[1]["tf32"] is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
