"""Properties of FullGrad (nbs/05_fullgrad.ipynb): the raw sum is linear, the normalised one contrasts inside psi,
hand-computed values, completeness, in-place safety, the model left as it was, and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from contrastive_explanations.methods.targets import TARGETS, explicit_contrast
from contrastive_explanations.methods.fullgrad import FullGrad, bias_layers, implicit_bias, max_abs_normalise, upsample


def randomise(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    "Random running statistics and affine parameters that keep a tiny ReLU network alive on inputs in [0, 1]."
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.05, 0.2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def components_by_hand(net: nn.Sequential, x: Tensor, s: int) -> list[Tensor]:
    "FullGrad's components of the logit y_s before psi, walking the layers: input term, then one per bias layer."
    x = x.clone().requires_grad_(True)
    h, outputs, biases = x, [], []
    for layer in net:
        h = layer(h)
        if isinstance(layer, nn.Conv2d) and layer.bias is not None:
            outputs.append(h)
            biases.append(layer.bias)
        if isinstance(layer, nn.BatchNorm2d):
            outputs.append(h)
            biases.append(layer.bias - layer.weight * layer.running_mean / torch.sqrt(layer.running_var + layer.eps))
    grads = torch.autograd.grad(h[:, s].sum(), [x, *outputs])
    return [(grads[0] * x).sum(1).detach()] + [(g * b[:, None, None]).sum(1).detach() for g, b in zip(grads[1:], biases)]


def combine(components: list[Tensor], size: tuple[int, int], normalise: bool) -> Tensor:
    "Eq. eq-fullgrad from (B, h, w) components: divide by the peak |value| (0 stays 0) or not, upsample, add."
    def psi(m):
        return torch.nan_to_num(m / m.abs().amax(dim=(-2, -1), keepdim=True)) if normalise else m
    return sum(F.interpolate(psi(m)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in components)


@st.composite
def problems(draw):
    "A random float64 conv net with batch norm in eval mode, optional conv biases and stride, inputs, classes, targets."
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    c1, c2, C = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(2, 5))
    layers = [nn.Conv2d(3, c1, 3, padding=1, bias=draw(st.booleans())), randomise(nn.BatchNorm2d(c1)), nn.ReLU(),
              nn.Conv2d(c1, c2, 3, stride=draw(st.sampled_from([1, 2])), padding=1, bias=draw(st.booleans()))]
    if draw(st.booleans()):
        layers.append(randomise(nn.BatchNorm2d(c2)))
    net = nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c2, C)).double().eval()
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(3, 8)), draw(st.integers(3, 8))
    x = torch.rand(B, 3, H, W, dtype=torch.float64)
    K = draw(st.integers(1, 2))
    classes = torch.tensor(draw(st.lists(st.lists(st.integers(0, C - 1), min_size=K, max_size=K), min_size=B, max_size=B)))
    targets = draw(st.lists(st.sampled_from(list(TARGETS)), min_size=1, max_size=3, unique=True))
    return net, x, classes, targets, C


def every_class(x: Tensor, C: int) -> Tensor:
    return torch.arange(C).expand(len(x), C)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_raw_fullgrad_of_a_target_is_its_scaled_explicit_contrast(problem):
    "Eq. eq-fullgrad-linear: one backward pass from a target equals scale * sum_s w_s S_s, for any target."
    net, x, classes, targets, C = problem
    raw = FullGrad(net, normalise=False)
    e = raw(x, classes, targets)
    per_class = raw(x, every_class(x, C), "original").maps[:, :, 0]
    assert e.maps.shape == (len(x), classes.shape[1], len(targets), *x.shape[-2:])
    for k in range(classes.shape[1]):
        for j, name in enumerate(targets):
            target, t = TARGETS[name], classes[:, k]
            expected = target.scale(e.logits, t)[:, None, None] * explicit_contrast(per_class, target.weights(e.logits, t))
            torch.testing.assert_close(e.maps[:, k, j], expected)


@settings(max_examples=20, deadline=None)
@given(problems())
def test_maps_match_a_reference_walk_of_the_layers(problem):
    "Eqs. eq-fullgrad and eq-psi against an independent implementation; normalised targets contrast inside psi."
    net, x, classes, targets, C = problem
    m = [components_by_hand(net, x, s) for s in range(C)]
    size = tuple(x.shape[-2:])
    for normalise in (False, True):
        e = FullGrad(net, normalise)(x, classes, targets)
        for k in range(classes.shape[1]):
            for j, name in enumerate(targets):
                w = TARGETS[name].weights(e.logits, classes[:, k])
                scale = TARGETS[name].scale(e.logits, classes[:, k])[:, None, None]
                inside = [scale * sum(w[:, s, None, None] * m[s][i] for s in range(C)) for i in range(len(m[0]))]
                torch.testing.assert_close(e.maps[:, k, j], combine(inside, size, normalise))


def generic_problem():
    "A fixed, generic example: two stride-2 batch-normed layers, five classes, three samples."
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), randomise(nn.BatchNorm2d(4)), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), randomise(nn.BatchNorm2d(6)), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)).double().eval()
    return net, torch.rand(3, 3, 7, 7, dtype=torch.float64), torch.tensor([1, 4, 0]), 5


@pytest.mark.parametrize("name", ["mean", "max", "weighted", "weighted_log"])
def test_normalised_fullgrad_is_not_the_contrast_of_normalised_maps(name):
    "Remark rem-fullgrad-normalised: with psi the identity of eq-fullgrad-linear fails, while without it it holds."
    net, x, t, C = generic_problem()
    target = TARGETS[name]
    for normalise, holds in ((True, False), (False, True)):
        method = FullGrad(net, normalise)
        e = method(x, t, name)
        per_class = method(x, every_class(x, C), "original").maps[:, :, 0]
        explicit = target.scale(e.logits, t)[:, None, None] * explicit_contrast(per_class, target.weights(e.logits, t))
        assert torch.allclose(e.map(), explicit) == holds
        if not holds:
            assert (e.map() - explicit).abs().max() > 0.1 * explicit.abs().max()


def test_normalised_maps_ignore_the_scale_and_raw_maps_keep_it():
    "psi(c m) = psi(m) for c > 0: p_t and log p_t give the same normalised map; raw, they differ by the factor p_t."
    net, x, t, C = generic_problem()
    normalised = FullGrad(net)(x, t, ["weighted", "weighted_log"])
    torch.testing.assert_close(normalised.map("weighted"), normalised.map("weighted_log"))
    raw = FullGrad(net, normalise=False)(x, t, ["weighted", "weighted_log"])
    p_t = raw.logits.softmax(1)[torch.arange(3), t][:, None, None]
    torch.testing.assert_close(raw.map("weighted"), p_t * raw.map("weighted_log"))
    assert not torch.allclose(raw.map("weighted"), raw.map("weighted_log"))


def hand_network() -> nn.Sequential:
    "z1 = 2x + 1; BN with gamma 3, beta 1/4, mu 1/2, var 4, eps 0 (z2 = 3/2 z1 - 1/2); mean pool; y = (4, -8) z + (1/2, 0)."
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1, eps=0.0), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(1, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[0].bias.fill_(1.0)
        net[1].weight.fill_(3.0)
        net[1].bias.fill_(0.25)
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(4.0)
        net[4].weight.copy_(torch.tensor([[4.0], [-8.0]]))
        net[4].bias.copy_(torch.tensor([0.5, 0.0]))
    return net


def test_hand_computed_network():
    "Components for y_0: 3x (input), 3/2 (conv bias), -1/2 (BN implicit bias); y_1's gradients are -2 times y_0's."
    net = hand_network()
    x = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]], dtype=torch.float64)
    assert implicit_bias(net[1]).item() == -0.5 and implicit_bias(net[0]).item() == 1.0
    raw = FullGrad(net, normalise=False)(x, [[0, 1]], ["original", "max"]).maps[0]
    assert raw[0, 0].tolist() == [[1.0, 4.0], [7.0, -2.0]]  # 3x + 3/2 - 1/2
    assert raw[1, 0].tolist() == [[-2.0, -8.0], [-14.0, 4.0]]  # -2 (3x + 1)
    assert raw[0, 1].tolist() == [[3.0, 12.0], [21.0, -6.0]]  # y_0 - y_1: 9x + 9/2 - 3/2
    normalised = FullGrad(net)(x, [[0, 1]], ["original", "max"]).maps[0]
    assert normalised[0, 0].tolist() == [[0.0, 0.5], [1.0, -0.5]]  # 3x / 6 + 1 - 1
    assert normalised[1, 0].tolist() == [[0.0, -0.5], [-1.0, 0.5]]  # -6x / 12 - 1 + 1
    assert normalised[0, 1].tolist() == [[0.0, 0.5], [1.0, -0.5]]  # 9x / 18 + 1 - 1, not the difference 2 * x / 2


@pytest.mark.parametrize("seed", range(5))
def test_completeness_on_a_relu_network_at_full_resolution(seed):
    "Eq. eq-completeness: the raw map of y_t summed over pixels, plus the linear layer's bias, is the logit."
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), randomise(nn.BatchNorm2d(4)), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(3, 6)).double().eval()
    x = torch.rand(4, 3, 5, 6, dtype=torch.float64)
    t = torch.randint(6, (4,))
    e = FullGrad(net, normalise=False)(x, t, "original")
    rows = torch.arange(4)
    torch.testing.assert_close(e.map().sum(dim=(-2, -1)) + net[-1].bias.detach()[t], e.logits[rows, t])


def test_normalisation_and_upsampling_by_hand():
    "Eq. eq-psi: divide by the peak |value|, all-zero stays zero; bilinear at pixel centres (align_corners=False)."
    m = torch.tensor([[[[0.0, 2.0], [-4.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert max_abs_normalise(m).tolist() == [[[[0.0, 0.5], [-1.0, 0.25]], [[0.0, 0.0], [0.0, 0.0]]]]
    assert upsample(torch.tensor([[[[0.0, 1.0]]]]), (1, 4)).tolist() == [[[[0.0, 0.25, 0.75, 1.0]]]]


def test_an_all_zero_component_stays_zero():
    "A zero input makes the input term zero: the normalised map stays finite and equals the bias terms alone."
    net, x, t, C = generic_problem()
    zero = torch.zeros_like(x)
    e = FullGrad(net)(zero, t, "weighted")
    assert torch.isfinite(e.maps).all()
    w = TARGETS["weighted"].weights(e.logits, t)
    m = [components_by_hand(net, zero, s) for s in range(C)]
    biases_only = [sum(w[:, s, None, None] * m[s][i] for s in range(C)) for i in range(1, len(m[0]))]
    torch.testing.assert_close(e.map(), combine(biases_only, (7, 7), normalise=True))


class Block(nn.Module):
    "conv -> BN -> + x -> ReLU -> pooled linear head, the addition and the ReLU in place (as in a ResNet) or not."

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace, self.conv, self.bn = inplace, nn.Conv2d(3, 3, 3, padding=1), randomise(nn.BatchNorm2d(3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x):
        out = self.bn(self.conv(x))
        out = out.add_(x).relu_() if self.inplace else (out + x).relu()
        return self.head(out)


@pytest.mark.parametrize("normalise", [False, True])
def test_in_place_operations_after_a_hooked_layer_do_not_change_the_maps(normalise):
    "The hook's copy keeps the captured output intact under an in-place shortcut addition and ReLU."
    torch.manual_seed(2)
    inplace, plain = Block(True).double().eval(), Block(False).double().eval()
    plain.load_state_dict(inplace.state_dict())
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64) - 0.5
    a = FullGrad(inplace, normalise)(x, [3, 0, 2], ["original", "weighted"])
    b = FullGrad(plain, normalise)(x, [3, 0, 2], ["original", "weighted"])
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.maps, b.maps)


def test_the_model_is_left_as_it_was():
    "Training mode, requires_grad flags, no .grad and no hooks, after calls that succeed and calls that raise."
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), randomise(nn.BatchNorm2d(2)), nn.ReLU(inplace=True),
                        nn.Dropout(0.5), nn.Flatten(), nn.Linear(2 * 6 * 6, 4)).double().train()
    net[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    fullgrad = FullGrad(net)
    first = fullgrad(x, [3, 0, 2], ["original", "weighted"]).maps
    with pytest.raises(ValueError, match="channels"):
        fullgrad(x[:, :2], 0)  # refused before the forward pass
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fullgrad(x[..., :5, :5], 0)  # raises inside the forward pass, with the hooks on
    with pytest.raises(ValueError, match="must lie in"):
        fullgrad(x, [1, 2, 9])  # raises after the forward pass
    with torch.no_grad():
        again = fullgrad(x, [3, 0, 2], ["original", "weighted"]).maps
    torch.testing.assert_close(again, first)  # evaluation mode at every call, also under no_grad
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())
    assert not x.requires_grad and x.grad is None
    assert net[1].num_batches_tracked.item() == 0  # batch norm never ran in training mode


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
    nn.Sequential(nn.Flatten(), nn.Linear(12, 2)),
])
def test_a_model_without_biases_is_refused(model):
    with pytest.raises(ValueError, match=r"no Conv2d with a bias and no BatchNorm2d.*give it Conv2d\(\.\.\., bias=True\)"):
        FullGrad(model)


def test_batch_norm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    with pytest.raises(ValueError, match="no running statistics.*track_running_stats=True"):
        FullGrad(model)


def test_bias_layers_are_convolutions_with_biases_and_batch_norms():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, bias=False),
                        nn.Linear(4, 4))
    assert bias_layers(net) == [net[1], net[2]]
    assert implicit_bias(net[0]) is None and implicit_bias(net[4]) is None
    torch.testing.assert_close(implicit_bias(net[1]), torch.zeros(4))  # fresh statistics: mean 0, var 1, beta 0
