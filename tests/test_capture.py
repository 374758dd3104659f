"""Activation capture and layouts on the networks researchers bring: layers followed by in-place operations,
channels-last and token outputs, layers that return tuples or ModelOutputs, compiled models and backward passes that
vmap cannot batch, maps that are zero everywhere, the input's channels, and the Explanation as a result to use.

Every oracle here is written from autograd alone: a plain forward hook stores the layer's output and registers a
tensor hook for its gradient (which receives the gradient of the value the layer returned, even when the network
changes it in place afterwards), the tensor is laid out by hand, and each objective gets a backward pass of its own."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import Tensor, nn

from contrastive_explanations import Explanation, GradCAM, Gradient, LinearApproximation, ViTGradCAM, XGradCAM
from contrastive_explanations.methods.explain import (BatchedBackwardWarning, Layout, UnderflowWarning, ZeroMapWarning,
                                                      default_layer, find_layer)


def autograd_maps(model: nn.Module, layer: nn.Module, x: Tensor, classes: list[int], lay_out, target: str = "original"):
    "GradCAM, LA and XGradCAM maps (B, h, w) of one class per sample, from autograd alone (one backward pass)."
    seen = {}

    def hook(module, inputs, output):
        out = output if isinstance(output, Tensor) else output[0]
        seen["A"] = out.detach().clone()
        out.register_hook(lambda g: seen.__setitem__("G", g))

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x.clone().requires_grad_(True))
        logits = logits if isinstance(logits, Tensor) else logits.logits
        rows = torch.arange(len(x))
        objective = logits[rows, classes] if target == "original" else logits.softmax(1)[rows, classes]
        objective.sum().backward()
    finally:
        handle.remove()
    A, G = lay_out(seen["A"]), lay_out(seen["G"])
    share = A / A.abs().sum((-2, -1), keepdim=True)
    return {"gradcam": (G.mean((-2, -1))[..., None, None] * A).sum(1), "linear_approximation": (G * A).sum(1),
            "xgradcam": ((G * share).sum((-2, -1))[..., None, None] * A).sum(1)}


def channels_first(t):
    return t


def channels_last(t):
    return t.permute(0, 3, 1, 2)


def check_against_autograd(model, layer_name, x, classes, lay_out, **kwargs):
    model = model.double().eval()
    x = x.double()
    layer = find_layer(model, layer_name)
    for target in ("original", "weighted"):
        want = autograd_maps(model, layer, x, classes, lay_out, target)
        for Method in (GradCAM, LinearApproximation, XGradCAM):
            got = Method(model, layer_name, **kwargs)(x, classes, target).maps[:, 0, 0]
            torch.testing.assert_close(got, want[Method.name], rtol=1e-7, atol=1e-12)


# --- layers followed by in-place operations (crashed at 543a2a9: a leaf that requires grad changed in place) ---

@pytest.mark.parametrize("build, layer, size", [
    (lambda: torchvision.models.vgg16(weights=None, num_classes=4), None, 32),  # features.28, then ReLU(inplace=True)
    (lambda: torchvision.models.alexnet(weights=None, num_classes=4), None, 64),  # features.10, then ReLU(inplace=True)
    (lambda: torchvision.models.densenet121(weights=None, num_classes=4), None, 32),  # features, then F.relu(inplace)
    (lambda: torchvision.models.resnet18(weights=None, num_classes=4), "layer4.1.bn2", 32),  # then out += identity
], ids=["vgg16", "alexnet", "densenet121", "resnet18-bn2"])
def test_layers_followed_by_in_place_operations_give_autograds_maps(build, layer, size):
    torch.manual_seed(0)
    model = build()
    name = layer or default_layer(model)
    check_against_autograd(model, name, torch.rand(2, 3, size, size), [1, 3], channels_first)


# --- channels-last outputs (read as (B, C, h, w) without a word at 543a2a9) ---

@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return torchvision.models.swin_t(weights=None, num_classes=4).double().eval()


def test_swin_stage_is_read_channels_last_and_a_wrong_layout_would_differ(swin):
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert default_layer(swin) == "features"
    e = GradCAM(swin)(x, [0, 2], "original")
    assert e.maps.shape == (2, 1, 1, 2, 2)  # the 2 x 2 grid, not 2 x 768
    check_against_autograd(swin, "features", x, [0, 2], channels_last)
    # the mutation: read as channels first (what 543a2a9 did), the map is another thing altogether
    wrong = GradCAM(swin, "features", layout=Layout("BCHW"))(x, [0, 2], "original").maps
    assert wrong.shape != e.maps.shape


def test_a_4d_output_whose_channel_axis_is_ambiguous_is_refused_not_guessed():
    class Shift(nn.Module):  # a module of its own: it says nothing of the layout
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(8, 1, 1))

        def forward(self, x):
            return x + self.b

    class Ambiguous(nn.Module):  # (B, 8, 8, 8) on 8 x 8 images: channels first and last both fit
        def __init__(self):
            super().__init__()
            self.mix = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GELU(), Shift())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.mix(x).mean((2, 3)))

    model = Ambiguous()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"could be \(B, C, h, w\) or \(B, h, w, C\).*pass layout='BCHW' or "
                                         r"layout='BHWC'"):
        GradCAM(model, "mix")(x, 0)
    stated = GradCAM(model, "mix", layout="BCHW")(x, 0, "original").maps
    by_function = GradCAM(model, "mix", layout=lambda t: t)(x, 0, "original").maps
    torch.testing.assert_close(stated, by_function)
    convolution = GradCAM(model, "mix.0")(x, 0, "original").maps  # a convolution's output is channels first
    model.mix[2] = nn.Identity()  # convolutions and elementwise functions alone: channels first too
    assert GradCAM(model, "mix")(x, 0, "original").maps.shape == convolution.shape == (1, 1, 1, 8, 8)


def test_a_layout_function_is_applied_to_the_output_and_its_gradient(swin):
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    auto = GradCAM(swin, "features")(x, 1, ["original", "weighted"]).maps
    stated = GradCAM(swin, "features", layout=lambda t: t.permute(0, 3, 1, 2))(x, 1, ["original", "weighted"]).maps
    torch.testing.assert_close(auto, stated)
    with pytest.raises(ValueError, match=r"not \(B, C, h, w\).*return \(N, C, h, w\) from the layout function"):
        GradCAM(swin, "features", layout=lambda t: t.flatten(1))(x, 1)
    with pytest.raises(ValueError, match="layout 'NCHW' is not one of"):
        GradCAM(swin, "features", layout="NCHW")


# --- token layers: GradCAM through the layout ('choose a convolutional layer' at 543a2a9) ---

def small_vit(**kwargs):
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=5, **kwargs)


def test_gradcam_on_a_vit_block_is_the_vit_gradcam_of_that_block():
    torch.manual_seed(2)
    vit = small_vit().double().eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert default_layer(vit) == "encoder.layers.encoder_layer_1"  # the second-to-last block
    ours = GradCAM(vit)(x, [1, 4], ["original", "weighted"]).maps
    torch.testing.assert_close(ours, ViTGradCAM(vit, block=1)(x, [1, 4], ["original", "weighted"]).maps)
    tokens = lambda t: t[:, 1:].transpose(1, 2).reshape(len(t), -1, 4, 4)  # class token dropped, by hand
    want = autograd_maps(vit, vit.encoder.layers[1], x, [1, 4], tokens)["gradcam"]
    torch.testing.assert_close(ours[:, 0, 0], want)


def test_layers_returning_a_tuple_or_a_model_output_are_read_through_their_first_tensor():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                         num_labels=4)
    hf = transformers.ConvNextForImageClassification(config).double().eval()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    assert default_layer(hf) == "convnext.encoder"  # returns a BaseModelOutput
    check_against_autograd(hf, "convnext.encoder", x, [0, 3], channels_first)

    class Pair(nn.Module):  # a block that returns (features, attention), as many do
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, y.mean(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Pair(), nn.Linear(4, 3)

        def forward(self, x):
            features, _ = self.block(x)
            return self.head(features.relu_().mean((2, 3)))

    check_against_autograd(Net(), "block", torch.rand(2, 3, 8, 8), [0, 2], channels_first)


# --- compiled models and backward passes that cannot batch ---

class NoVmap(torch.autograd.Function):
    "Identity whose backward reads a value, which vmap cannot batch (like kernels without a batching rule)."

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        assert torch.isfinite(g).all().item()
        return g.clone()


def test_a_backward_that_cannot_batch_falls_back_to_one_pass_per_objective_with_one_warning():
    torch.manual_seed(4)
    net = torchvision.models.resnet18(weights=None, num_classes=6).double().eval()
    wrapped = nn.Sequential(net, nn.Identity())
    wrapped[1].forward = lambda y: NoVmap.apply(y)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    classes, targets = [[0, 1], [2, 5]], ["original", "weighted", "max"]
    method = GradCAM(wrapped, "0.layer4")
    with pytest.warns(BatchedBackwardWarning, match=r"computing its 6 objectives with one backward pass each") as rec:
        got = method(x, classes, targets).maps
    assert len([w for w in rec if w.category is BatchedBackwardWarning]) == 1 and not method.batched
    torch.testing.assert_close(got, GradCAM(net)(x, classes, targets).maps)
    torch.testing.assert_close(method(x, classes, targets).maps, got)  # the next call goes straight to the loop


def test_a_compiled_model_is_explained_by_its_layers_original_names():
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    compiled = torch.compile(net, backend="aot_eager")
    assert default_layer(compiled) == "layer4" and find_layer(compiled, "layer4") is net.layer4
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchedBackwardWarning)  # whether it batches depends on the backend
        got = GradCAM(compiled, "layer4")(x, [[0, 1], [2, 5]], ["original", "weighted"]).maps
    torch.testing.assert_close(got, GradCAM(net, "layer4")(x, [[0, 1], [2, 5]], ["original", "weighted"]).maps,
                               rtol=1e-4, atol=1e-6)


# --- no silent zeros ---

def test_a_zero_head_says_so():
    vit = small_vit().eval()  # torchvision's zero-initialised head: the logits do not depend on the image
    with pytest.warns(ZeroMapWarning, match=r"2 of the 2 maps are zero everywhere.*'heads.head' has all-zero weights"):
        GradCAM(vit)(torch.rand(2, 3, 32, 32), 1, "weighted")


def test_half_precision_underflow_says_to_compute_in_float32():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[-1].bias.copy_(torch.tensor([0.0, 15.0, 0.0]))  # class 0 has p = 3e-7
    net = net.half()
    x = torch.rand(2, 3, 6, 6).half()
    p0 = net(x).float().softmax(1)[:, 0]
    assert (p0 > 0).all() and (p0 < 1e-6).all()
    with pytest.warns(UnderflowWarning, match=r"p_t = 3.\de-07 is below float16's smallest normal.*weighted_log.*float32"):
        e = GradCAM(net, "2")(x, 0, "weighted")
    assert (e.maps == 0).all()
    assert GradCAM(net.float(), "2")(x.float(), 0, "weighted").maps.abs().amax() > 0  # not zero in float32


def test_a_saturated_p_t_gets_advice_that_works_for_its_gap():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 3, 6, 6)
    for gap, advice, works in ((40.0, "weighted_log", "weighted_log"), (4000.0, "targets='max'", "max")):
        with torch.no_grad():
            net[-1].bias.copy_(torch.tensor([gap, 0.0, 0.0]))
        with pytest.warns(UnderflowWarning, match=advice):
            GradCAM(net, "2")(x, 0, "weighted")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the advice is right: its map is not zero
            assert GradCAM(net, "2")(x, 0, works).maps.abs().amax() > 0


def test_a_class_whose_p_t_underflows_to_zero_gets_weighted_log():
    torch.manual_seed(2)  # ResNet-50 with random weights on unnormalised noise: logits far apart, p_281 = 0 in float32
    net = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    p = net(x).softmax(1)[0, 281]
    with pytest.warns(UnderflowWarning, match=r"p_t = 3.1e-41 is below float32's smallest normal.*targets='weighted_log'"):
        e = GradCAM(net, net.layer4)(x, [281], ["weighted", "weighted_log"])
    assert 0 < p < 1e-38 and (e.map("weighted") == 0).all() and e.map("weighted_log").abs().amax() > 0


def test_a_layer_the_logits_do_not_depend_on_says_so():
    torch.manual_seed(8)
    vit = small_vit().eval()
    nn.init.normal_(vit.heads.head.weight)
    with pytest.warns(ZeroMapWarning, match="gradient is zero.*choose an earlier layer"):
        GradCAM(vit, "encoder.layers.encoder_layer_2")(torch.rand(1, 3, 32, 32), 0)


# --- the input's channels ---

def test_the_channel_check_reads_the_convolution_that_sees_the_image():
    class HeadFirst(nn.Module):  # declares its head convolution before its stem
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(8, 3, 1)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.head(self.stem(x)).mean((2, 3))

    model = HeadFirst()
    e = GradCAM(model, "stem")(torch.rand(1, 3, 8, 8), 0, "original")
    assert e.maps.shape == (1, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="x has 8 channels but the model's first convolution takes 3"):
        GradCAM(model, "stem")(torch.rand(1, 8, 8, 8), 0)


# --- the result ---

def test_the_explanation_is_short_to_print_and_moves_like_a_tensor():
    torch.manual_seed(9)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(16, 3, 32, 32)
    e = Gradient(net)(x, torch.randint(0, 10, (16, 3)), ["original", "weighted", "mean", "max"])
    text = repr(e)
    assert len(text) < 200 and "gradient" in text and "16 images x 3 classes x 4 targets" in text and "float32" in text
    assert e.grads is None  # the raw gradients only when asked
    kept = Gradient(net, keep_grads=True)(x[:2], 1, "weighted")
    assert kept.grads.shape == (2, 1, 1, 3, 32, 32)
    assert "grads (2, 1, 1, 3, 32, 32)" in repr(kept)
    double = e.to(torch.float64)
    assert double.maps.dtype == double.logits.dtype == torch.float64 and double.classes.dtype == torch.int64
    assert isinstance(e.cpu(), Explanation) and e.numpy().shape == (16, 3, 4, 32, 32)
    assert e.upsampled(64).shape == e.upsampled((64, 64)).shape == (16, 3, 4, 64, 64)
    with pytest.raises(ValueError, match=r"size must be a positive int or a pair \(H, W\)"):
        e.upsampled((64,))
