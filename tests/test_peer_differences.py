"""What the README's table "coming from pytorch-grad-cam / captum" says differs: the default target is `weighted`
(p_t, not the logit), XGradCAM weighs with the review's A / ||A||_1 (pytorch-grad-cam's with A / sum A, which differs
on signed activations), and the model is in eval mode for the call and restored afterwards."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_cnn
from torch import nn

from contrastive_explanations import GradCAM, Method, XGradCAM

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def activation_and_gradient(net: nn.Module, layer: nn.Module, x: torch.Tensor, t: torch.Tensor, objective):
    "The layer's output A and the gradient of `objective(logits)[i, t_i]` summed, by autograd alone."
    acts = {}
    handle = layer.register_forward_hook(lambda m, i, o: acts.setdefault("A", o))
    with torch.enable_grad():
        out = objective(net(x))
    handle.remove()
    (G,) = torch.autograd.grad(out[torch.arange(len(t)), t].sum(), acts["A"])
    return acts["A"].detach(), G


def test_the_default_target_is_weighted_p_t_not_the_logit():
    assert inspect.signature(Method.__call__).parameters["targets"].default == "weighted"
    net, x, t = tiny_cnn(5, 1), torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 3])
    e = GradCAM(net, "3")(x, t)
    assert e.targets == ("weighted",)
    A, G = activation_and_gradient(net, net[3], x, t, lambda y: y.softmax(1))  # from p_t
    np.testing.assert_allclose(e.maps[:, 0, 0], torch.einsum("bk,bkhw->bhw", G.mean((-2, -1)), A), rtol=1e-9)
    A, G = activation_and_gradient(net, net[3], x, t, lambda y: y)  # from the logit: another map
    assert not torch.allclose(e.maps[:, 0, 0], torch.einsum("bk,bkhw->bhw", G.mean((-2, -1)), A))
    assert re.search(r"default target is `\"weighted\"` \(\$p_t\$", README)


def test_xgradcam_weighs_with_a_over_its_l1_norm_on_signed_activations():
    "The review's Eq. 3 by hand, on a convolution's output before its ReLU (signed); pytorch-grad-cam's differs."
    from pytorch_grad_cam import XGradCAM as TheirXGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net, x, t = tiny_cnn(5, 2), torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([1, 4])
    conv = net[3]
    A, G = activation_and_gradient(net, conv, x, t, lambda y: y.softmax(1))
    assert (A < 0).any() and (A > 0).any()  # signed activations
    share = A / A.abs().sum((-2, -1), keepdim=True)
    hand = torch.einsum("bk,bkhw->bhw", (G * share).sum((-2, -1)), A)
    ours = XGradCAM(net, conv)(x, t, "weighted").maps[:, 0, 0]
    np.testing.assert_allclose(ours, hand, rtol=1e-9, atol=1e-15)
    cam = TheirXGradCAM(model=net, target_layers=[conv])
    weights = cam.get_cam_weights(x, conv, [ClassifierOutputSoftmaxTarget(int(c)) for c in t], A.numpy(), G.numpy())
    theirs = np.einsum("bk,bkhw->bhw", weights, A.numpy())
    assert not np.allclose(theirs, hand.numpy(), rtol=1e-3), "A / sum A and A / |A|_1 agree here: no signed A?"
    assert "A / \\lVert A \\rVert_1" in README and "A / \\sum A" in README


class ModeRecorder(nn.Module):
    "Records whether it was in training mode each time it ran."

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def test_the_model_is_in_eval_mode_for_the_call_and_restored():
    net = tiny_cnn(5, 3)
    recorder = ModeRecorder()
    model = nn.Sequential(recorder, *net, nn.Dropout(0.5)).train()
    model[2].eval()  # a mixed set of modes comes back as it was: the batch norm stays in eval mode
    before = [m.training for m in model.modules()]
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    e1, e2 = (GradCAM(model, "4")(x, 1, ["original", "weighted"]) for _ in range(2))
    assert recorder.seen == [False, False]  # eval mode while the method ran the model
    torch.testing.assert_close(e1.maps, e2.maps)  # no dropout: the same maps each call
    assert [m.training for m in model.modules()] == before
    assert "eval mode for the call" in README
