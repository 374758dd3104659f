"""Gradient, Linear Approximation, GradCAM and XGradCAM (nbs/02_explain, 03_gradient, 04_cam): identities,
oracles (captum, pytorch-grad-cam), hygiene, dtypes and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from contrastive_explanations.methods.cam import GradCAM, LinearApproximation, XGradCAM
from contrastive_explanations.methods.targets import TARGETS, deferred_checks, explicit_contrast
from contrastive_explanations.methods.explain import Explanation, classes_to, default_layer
from contrastive_explanations.methods.gradient import Gradient

from conftest import tiny_cnn  # conv, batch norm, ReLU, conv ('3'), ReLU, pool 2, linear: float64, random statistics

METHODS = [Gradient, LinearApproximation, GradCAM, XGradCAM]


def make(Method, net, layer="3"):
    return Method(net) if Method is Gradient else Method(net, layer)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(METHODS), st.integers(2, 9), st.integers(1, 4), st.integers(0, 10**6),
       st.sampled_from(list(TARGETS)))
def test_every_target_is_a_scaled_explicit_contrast_of_per_class_maps(Method, C, B, seed, name):
    "Eqs. eq-gradient-weighted and eq-cam-weighted (and the linear targets) for random networks, classes, targets."
    net = tiny_cnn(C, seed)
    x = torch.rand(B, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    t = torch.randint(C, (B,), generator=torch.Generator().manual_seed(seed + 1))
    method, target = make(Method, net), TARGETS[name]
    per_class = method(x, torch.arange(C).expand(B, C), "original").maps[:, :, 0]
    e = method(x, t, name)
    expected = target.scale(e.logits, t)[:, None, None] * explicit_contrast(per_class, target.weights(e.logits, t))
    torch.testing.assert_close(e.maps[:, 0, 0], expected)


@pytest.mark.parametrize("Method", METHODS)
def test_one_batched_call_equals_separate_calls(Method):
    "K classes x T targets in one call give what K*T separate calls give."
    net, x = tiny_cnn(6, 0), torch.rand(3, 3, 6, 6, dtype=torch.float64)
    classes = torch.tensor([[0, 1, 2], [5, 4, 3], [2, 2, 0]])
    targets = ["original", "mean", "max", "weighted"]
    method = make(Method, net)
    e = method(x, classes, targets)
    assert e.maps.shape == (3, 3, 4, 6, 6) and e.targets == tuple(targets)
    for k in range(3):
        for j, name in enumerate(targets):
            torch.testing.assert_close(e.maps[:, k, j], method(x, classes[:, k], name).maps[:, 0, 0])


# ---- oracles: captum and pytorch-grad-cam, where the definitions agree --------------------------------------

class Softmax(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


def test_gradient_agrees_with_captum_saliency_signed():
    from captum.attr import Saliency

    net, x, t = tiny_cnn(5, 1), torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([3, 0])
    ours = Gradient(net, keep_grads=True)(x, t, "weighted")
    theirs = Saliency(Softmax(net)).attribute(x.clone().requires_grad_(True), target=t, abs=False)
    torch.testing.assert_close(ours.grads[:, 0, 0], theirs)
    torch.testing.assert_close(ours.maps[:, 0, 0], theirs.sum(1))


def test_gradcam_agrees_with_captum_layergradcam_without_relu():
    from captum.attr import LayerGradCam

    net, x, t = tiny_cnn(5, 2), torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([1, 4])
    for objective, forward in (("weighted", Softmax(net)), ("original", net)):
        ours = GradCAM(net, "3")(x, t, objective).maps[:, 0, 0]
        theirs = LayerGradCam(forward, net[3]).attribute(x, target=t, relu_attributions=False)
        torch.testing.assert_close(ours, theirs[:, 0])


def test_linear_approximation_agrees_with_captum_gradient_x_activation():
    from captum.attr import LayerGradientXActivation

    net, x, t = tiny_cnn(5, 3), torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([2, 2])
    ours = LinearApproximation(net, "3")(x, t, "weighted").maps[:, 0, 0]
    theirs = LayerGradientXActivation(Softmax(net), net[3]).attribute(x, target=t)
    torch.testing.assert_close(ours, theirs.sum(1))


def test_xgradcam_weights_agree_with_pytorch_grad_cam_on_non_negative_activations():
    "grad-cam normalises by sum A, the review by ||A||_1: equal after a ReLU, which is where we compare."
    from pytorch_grad_cam import XGradCAM as TheirXGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net, x, t = tiny_cnn(5, 4), torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 3])
    relu = net[4]  # the ReLU after the second convolution: non-negative activations
    e = XGradCAM(net, relu)(x, t, "weighted")
    acts = {}
    handle = relu.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    with torch.enable_grad():
        p = net(x).softmax(1)
    handle.remove()
    (G,) = torch.autograd.grad(p[torch.arange(2), t].sum(), acts["a"])
    cam = TheirXGradCAM(model=net, target_layers=[relu])
    weights = cam.get_cam_weights(x, relu, [ClassifierOutputSoftmaxTarget(int(c)) for c in t],
                                  acts["a"].detach().numpy(), G.numpy())
    theirs = np.einsum("bk,bkhw->bhw", weights, acts["a"].detach().numpy())
    np.testing.assert_allclose(e.maps[:, 0, 0].numpy(), theirs, rtol=1e-5, atol=1e-12)


# ---- the model is left as it was ------------------------------------------------------------------------------

def test_a_thousand_calls_some_raising_leave_no_trace():
    net = tiny_cnn(5, 5)
    net.train()
    net[3].weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    methods = [make(M, net) for M in METHODS]
    raised = 0
    for i in range(1000):
        bad = i % 7 == 0
        try:
            methods[i % 4](x, torch.tensor([9, 0]) if bad else torch.tensor([1, 2]), TARGETS["weighted"])
        except ValueError:
            raised += 1
    assert raised == len(range(0, 1000, 7))
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert all(m.training for m in net.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())


@pytest.mark.parametrize("Method", METHODS)
def test_works_inside_no_grad_and_in_bfloat16(Method):
    net = tiny_cnn(4, 6, dtype=torch.float32)
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        e32 = make(Method, net)(x, torch.tensor([0, 3]), "weighted_log")
    assert torch.isfinite(e32.maps).all() and e32.maps.abs().sum() > 0
    e16 = make(Method, net.to(torch.bfloat16))(x.to(torch.bfloat16), torch.tensor([0, 3]), "weighted_log")
    assert e16.maps.dtype == torch.bfloat16 and torch.isfinite(e16.maps).all()
    cos = torch.nn.functional.cosine_similarity(e16.maps.float().flatten(1), e32.maps.flatten(1))
    assert (cos > 0.9).all(), cos


def test_a_logit_gap_of_100_gives_finite_correct_weighted_log_maps():
    "The last layer is set so that y_0 - y_1 is about 100; the map must still be (1 - p_t) times the contrast."
    net = tiny_cnn(3, 7)
    with torch.no_grad():
        net[7].weight.mul_(1e-2)  # a little input dependence, so the gradients are not zero
        net[7].bias.copy_(torch.tensor([100.0, 0.0, -1.0], dtype=torch.float64))
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64)
    for Method in METHODS:
        method = make(Method, net)
        per_class = method(x, torch.arange(3)[None], "original").maps[:, :, 0]
        e = method(x, 0, "weighted_log")
        assert 99 < e.logits[0, 0] - e.logits[0, 1] < 101
        rest = (e.logits[0, 1:] - e.logits[0, 0]).exp()
        expected = rest.sum() / (1 + rest.sum()) * explicit_contrast(per_class, TARGETS["weighted_log"].weights(e.logits, 0))
        assert torch.isfinite(e.maps).all() and e.maps.abs().max() > 0
        torch.testing.assert_close(e.maps[:, 0, 0], expected, rtol=1e-6, atol=0)


# ---- results and defaults ---------------------------------------------------------------------------------------

def test_explanation_map_and_upsampling():
    net, x = tiny_cnn(4, 8), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    e = GradCAM(net, "3")(x, None, ["original", "weighted"])
    assert isinstance(e, Explanation) and e.classes.tolist() == e.logits.argmax(1, keepdim=True).tolist()
    torch.testing.assert_close(e.map("weighted"), e.maps[:, 0, 1])
    up = e.upsampled((12, 12))
    assert up.shape == (2, 1, 2, 12, 12)
    torch.testing.assert_close(up.mean(dim=(-2, -1)), e.maps.mean(dim=(-2, -1)))  # 2x bilinear keeps the mean
    with pytest.raises(ValueError, match="name one"):
        e.map()
    with pytest.raises(ValueError, match="no target 'max'"):
        e.map("max")


def test_default_layers():
    import torchvision

    assert default_layer(torchvision.models.resnet18()) == "layer4"
    vgg = torchvision.models.vgg16_bn()
    assert default_layer(vgg) == "features.40" and isinstance(vgg.features[40], nn.Conv2d)
    assert isinstance(vgg.features[41], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="no default layer for a Sequential: pass layer="):
        GradCAM(tiny_cnn(3, 0))


# ---- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Method", METHODS)
@pytest.mark.parametrize("x, error, message", [
    (torch.rand(3, 6, 6, dtype=torch.float64), ValueError, r"batch of images \(B, C, H, W\).*x\[None\]"),
    (torch.rand(1, 2, 6, 6, dtype=torch.float64), ValueError, "has 2 channels but the model's first convolution takes 3"),
    (torch.randint(0, 255, (1, 3, 6, 6)), TypeError, r"floating point.*x.float\(\) / 255"),
    (torch.full((1, 3, 6, 6), float("nan"), dtype=torch.float64), ValueError, "NaN or inf"),
    (np.zeros((1, 3, 6, 6)), TypeError, "must be a torch.Tensor"),
])
def test_bad_images(Method, x, error, message):
    with pytest.raises(error, match=message):
        make(Method, tiny_cnn(4, 0))(x, 0)


@pytest.mark.parametrize("Method", METHODS)
def test_bad_classes_and_targets(Method):
    method, x = make(Method, tiny_cnn(4, 0)), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        method(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        method(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown target 'softmax'"):
        method(x, 0, "softmax")
    with pytest.raises(ValueError, match="targets is empty"):
        method(x, 0, [])


def test_bad_layers():
    net = tiny_cnn(4, 0)
    with pytest.raises(ValueError, match="model has no layer 'layer4'"):
        GradCAM(net, "layer4")
    with pytest.raises(ValueError, match="not a submodule of the model"):
        GradCAM(net, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"outputs shape \(1, 4\): \(B, C\) features have no spatial layout"):
        GradCAM(net, "7")(torch.rand(1, 3, 6, 6, dtype=torch.float64), 0)
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 2, 1), shared, nn.Conv2d(2, 2, 1), shared, nn.Flatten(), nn.LazyLinear(3))
    twice(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="runs more than once per forward pass"):
        GradCAM(twice, shared)(torch.rand(1, 3, 4, 4), 0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Gradient(lambda x: x)


def test_linear_approximation_at_the_input_agrees_with_captum_input_x_gradient():
    "LA at a layer that passes the input through unchanged is input x gradient, summed over the channels."
    from captum.attr import InputXGradient

    torch.manual_seed(9)
    net = nn.Sequential(nn.Identity(), *tiny_cnn(4, 9)).eval()
    x, t = torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([1, 3])
    ours = LinearApproximation(net, "0")(x, t, "weighted").maps[:, 0, 0]
    theirs = InputXGradient(Softmax(net)).attribute(x.clone().requires_grad_(True), target=t)
    torch.testing.assert_close(ours, theirs.sum(1))


def test_a_target_that_is_neither_a_target_nor_a_name_is_refused():
    with pytest.raises(TypeError, match="a target is a Target or one of the names.*subclass Target"):
        Gradient(tiny_cnn(3, 0))(torch.rand(1, 3, 6, 6, dtype=torch.float64), 0, lambda logits, t: logits[:, 0])


@pytest.mark.parametrize("Method", METHODS)
def test_checks_read_at_the_end_of_the_call_give_the_same_maps_and_errors(Method):
    "The GPU path (value checks queued, read once at the end), run on the CPU with include_cpu=True."
    net = tiny_cnn(4, 0)
    method, x = make(Method, net), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    now = method(x, torch.tensor([[1, 3], [0, 2]]), list(TARGETS)).maps
    with deferred_checks(include_cpu=True):
        later = method(x, torch.tensor([[1, 3], [0, 2]]), list(TARGETS)).maps
    torch.testing.assert_close(later, now, rtol=0, atol=0)
    for classes, x_bad, message in [(torch.tensor([0, 4]), x, r"must lie in \[0, 4\), got values from 0 to 4"),
                                    ([[-1, 0], [1, 2]], x, r"must lie in \[0, 4\), got values from -1 to 1"),
                                    (None, x.masked_fill(x > 0.5, float("inf")), "NaN or inf")]:
        with pytest.raises(ValueError, match=message):
            with deferred_checks(include_cpu=True):
                method(x_bad, classes, list(TARGETS))
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())


def test_classes_to_copies_only_what_is_not_on_the_device():
    t = torch.tensor([1, 2])
    assert classes_to(t, torch.device("cpu")) is t
    assert classes_to(None, torch.device("cpu")) is None
    listed = classes_to([[1, 2], [3, 4]], torch.device("cpu"))
    assert listed.tolist() == [[1, 2], [3, 4]] and listed.dtype == torch.int64
    moved = classes_to(t, torch.device("meta"))  # another device: copied (CUDA goes through pinned memory)
    assert moved.device.type == "meta" and moved.shape == (2,)


# --- what users of pytorch-grad-cam type ------------------------------------------------------------------------

def test_pytorch_grad_cam_habits_are_accepted_or_answered_with_the_call_meant():
    import torchvision

    from contrastive_explanations import GradCAM as FaceGradCAM

    net = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = FaceGradCAM(net, net.layer4)(x, [1, 2]).maps
    for method in (FaceGradCAM(net, [net.layer4]), FaceGradCAM(net, target_layers=[net.layer4]),
                   FaceGradCAM(net, ["layer4"])):
        assert method.layer is net.layer4
        torch.testing.assert_close(method(x, [1, 2]).maps, want)
    with pytest.raises(TypeError, match=r"targets=\[281\] looks like class indices: did you mean classes=\[281\]"):
        FaceGradCAM(net)(x, targets=[281])
    with pytest.raises(TypeError, match=r"did you mean classes=281"):
        FaceGradCAM(net)(x, targets=281)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'target': did you mean classes="):
        FaceGradCAM(net)(x, target=3)
    with pytest.raises(ValueError, match="one layer per method, got 2"):
        FaceGradCAM(net, [net.layer3, net.layer4])
    with pytest.raises(TypeError, match="not both"):
        FaceGradCAM(net, net.layer4, target_layers=[net.layer4])


def test_a_map_from_p_t_that_underflows_to_zero_is_not_silent():
    import warnings

    from contrastive_explanations.methods.explain import UnderflowWarning

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary image: no warning
        GradCAM(net, "2")(x, 0, ["weighted"])
    with torch.no_grad():
        net[-1].bias.copy_(torch.tensor([40.0, 0.0, 0.0]))  # p_0 = 1 in float32
    with pytest.warns(UnderflowWarning, match=r"2 of the 6 maps are zero everywhere: p_t rounds to 1.*targets='weighted_log'"):
        e = GradCAM(net, "2")(x, 0, ["original", "weighted", "weighted_log"])
    assert (e.map("weighted") == 0).all() and (e.map("weighted_log") != 0).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradCAM(net, "2")(x, 0, ["weighted_log", "original"])  # not asked for p_t: nothing to warn about


def test_a_model_returning_a_dict_or_a_model_output_is_read_through_logits_or_output():
    from dataclasses import dataclass

    import torchvision

    @dataclass
    class ModelOutput:  # the shape of a Hugging Face model's output
        logits: torch.Tensor

    class Hub(nn.Module):
        def __init__(self, net, kind):
            super().__init__()
            self.net, self.kind = net, kind

        def forward(self, x):
            y = self.net(x)
            return {"logits": y, "pooled": None} if self.kind == "dict" else ModelOutput(y) if self.kind == "output" \
                else {"scores": y}

    net = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = GradCAM(net, "layer4")(x, [1, 3], ["original", "weighted"]).maps
    for hub in (Hub(net, "dict"), Hub(net, "output")):  # a 'logits' entry or attribute is read without output=
        torch.testing.assert_close(GradCAM(hub, "net.layer4")(x, [1, 3], ["original", "weighted"]).maps, want)
    scores = Hub(net, "scores")
    got = GradCAM(scores, "net.layer4", output=lambda out: out["scores"])(x, [1, 3], ["original", "weighted"]).maps
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match=r"returned a dict with keys \['scores'\], not logits.*pass output="):
        GradCAM(scores, "net.layer4")(x, 1)
