"""The closed form of a pooled linear head (nbs/04_cam.ipynb, Eq. eq-pooled-head), which the book's in-browser
explainer computes: equal to the package's GradCAM, Linear Approximation and XGradCAM on EfficientNet-Lite0 and on
a ResNet, for every target; and bad input refused."""
from __future__ import annotations

import pytest
import torch
import torchvision

from contrastive_explanations.data.datasets import packaged_photos
from contrastive_explanations.data.models import build_model
from contrastive_explanations.methods.cam import GradCAM, LinearApproximation, XGradCAM, pooled_head_maps
from contrastive_explanations.methods.explain import leaf_output
from contrastive_explanations.methods.targets import TARGETS

METHODS = (GradCAM, LinearApproximation, XGradCAM)


@pytest.fixture(scope="module")
def lite0():
    return build_model("efficientnet_lite0")


def test_closed_form_equals_the_methods_on_efficientnet_lite0(lite0):
    photos = packaged_photos(transform=lite0.preprocess)
    x = torch.stack([photos[i][0] for i in range(2)])
    with torch.no_grad():
        A = lite0.net.features(lite0.normalize(x))
        top2 = lite0(x).topk(2).indices
    fc = lite0.net.head[-1]
    for Method in METHODS:
        e = Method(lite0)(x, top2, list(TARGETS))
        closed = pooled_head_maps(A, fc.weight, fc.bias, top2, list(TARGETS), Method.name)
        scale = e.maps.abs().amax(dim=(-2, -1), keepdim=True)
        assert ((closed.maps - e.maps).abs() <= 1e-4 * scale + 1e-7).all(), Method.name
        torch.testing.assert_close(closed.logits, e.logits, rtol=1e-5, atol=1e-5)
        assert closed.targets == e.targets and torch.equal(closed.classes, e.classes)


@pytest.mark.parametrize("shift", [0.0, 0.3])  # 0.3: activations of both signs, so XGradCAM's rho_k is not 1
def test_closed_form_equals_the_methods_on_a_resnet(shift):
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None, num_classes=12).double().eval()
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    classes = torch.tensor([[0, 5], [11, 2], [7, 7]])
    with net.layer4.register_forward_hook(lambda m, i, out: out - shift):
        with torch.no_grad(), leaf_output(net.layer4) as captured:
            net(x)
        for Method in METHODS:
            e = Method(net, "layer4")(x, classes, list(TARGETS))
            closed = pooled_head_maps(captured[0], net.fc.weight, net.fc.bias, classes, list(TARGETS), Method.name)
            torch.testing.assert_close(closed.maps, e.maps, msg=Method.name)
    gradcam, xgradcam = (pooled_head_maps(captured[0], net.fc.weight, None, classes, "weighted", m).maps
                         for m in ("gradcam", "xgradcam"))
    assert torch.allclose(gradcam, xgradcam) == (shift == 0)  # non-negative activations: the same map


def test_closed_form_refuses_bad_input():
    A, W = torch.rand(1, 4, 3, 3), torch.rand(5, 4)
    with pytest.raises(ValueError, match="method='fullgrad' has no closed form here: choose among gradcam"):
        pooled_head_maps(A, W, method="fullgrad")
    with pytest.raises(ValueError, match=r"same K: got \(1, 4, 3, 3\) and \(5, 3\)"):
        pooled_head_maps(A, W[:, :3])
    with pytest.raises(ValueError, match="out of range|class"):
        pooled_head_maps(A, W, classes=5)
