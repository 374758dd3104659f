"""The field's targets (nbs/01_targets.ipynb, "The field's targets"): versus, Finer-CAM's two forms and ReST.

Each is checked twice: against the explicit contrast of Eq. 1, sum_c w_c phi_c, with the per-class GradCAM maps phi_c
computed here by autograd (one backward pass per class) and the weights derived here from the logits; and against the
libraries that publish it (pytorch-grad-cam, torchcam), after their own post-processing (ReLU, normalisation, resize)
applied to our signed map."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_cnn

from contrastive_explanations.methods import GradCAM
from contrastive_explanations.methods.targets import (PEER_TARGETS, TARGETS, FinerMeanTarget, FinerWeightedTarget,
                                                      ReSTTarget, VersusTarget, deferred_checks, explicit_contrast,
                                                      get_target)

C = 7
T = torch.tensor([0, 3, 6, 4])


def problem(seed: int = 0):
    "A random float64 CNN with C classes, a batch of four 8 x 8 images, and its last convolution (layer '3')."
    net = tiny_cnn(C, seed)
    x = torch.rand(len(T), 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return net, x, net[3]


def per_class_gradcam(net, layer, x):
    "phi[b, c] = GradCAM map of the logit y_c: sum_k mean(d y_c / d A_k) A_k, one backward pass per class."
    acts = {}
    handle = layer.register_forward_hook(lambda m, i, o: acts.setdefault("A", o))
    y = net(x)
    handle.remove()
    A = acts["A"]
    phi = []
    for c in range(C):
        (G,) = torch.autograd.grad(y[:, c].sum(), A, retain_graph=True)
        phi.append(torch.einsum("bk,bkhw->bhw", G.mean((-2, -1)), A.detach()))
    return y.detach(), torch.stack(phi, 1)


def nearest(y: torch.Tensor, b: int, t: int, k: int = 3) -> list[int]:
    "The k classes with logits nearest to y_t, by sorting here."
    return sorted((s for s in range(C) if s != t), key=lambda s: abs(float(y[b, s] - y[b, t])))[:k]


def weights_by_hand(name: str, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    "The derived weights w (B, C), term by term from the logits: the chapter's equations, not the library's code."
    w = torch.zeros(len(t), C, dtype=y.dtype)
    for b, tb in enumerate(t.tolist()):
        p = y[b].softmax(0)
        if name == "versus:2":
            w[b, tb], w[b, 2] = 1, -1
        elif name == "rest":  # (2 - p_t) e_t - sum_{s != t} p_s e_s
            w[b] = -p
            w[b, tb] = 2 - p[tb]
        elif name == "finer_weighted":  # e_t - alpha sum_S q_k (1 + y_k - ybar) e_k, alpha = 1
            S = nearest(y, b, tb)
            q = torch.exp(y[b, S]) / torch.exp(y[b, S]).sum()
            ybar = (q * y[b, S]).sum()
            w[b, tb] = 1
            w[b, S] = -q * (1 + y[b, S] - ybar)
        elif name == "finer_mean":  # e_t - gamma / |S| sum_S e_s, gamma = 0.6
            w[b, tb] = 1
            w[b, nearest(y, b, tb)] = -0.6 / 3
    return w


NAMES = ["versus:2", "rest", "finer_weighted", "finer_mean"]


@pytest.mark.parametrize("name", NAMES)
def test_one_backward_is_the_explicit_contrast_with_the_derived_weights(name):
    "Eq. 1: our GradCAM of the target (one backward pass) = sum_c w_c phi_c, phi_c by C backward passes, w by hand."
    net, x, layer = problem()
    y, phi = per_class_gradcam(net, layer, x)
    w = weights_by_hand(name, y, T)
    target = get_target(name)
    ours = GradCAM(net, layer)(x, T, target).maps[:, 0, 0]
    torch.testing.assert_close(ours, explicit_contrast(phi, w))
    torch.testing.assert_close(target.weights(y, T), w)  # the library's weights are the derived ones
    assert torch.equal(target.scale(y, T), torch.ones(len(T), dtype=y.dtype))
    assert not torch.allclose(ours, phi[torch.arange(len(T)), T])  # not the original map


def test_finer_weighted_differentiates_its_softmax_weights():
    "Holding q fixed (the 'weighted difference' the objective's form suggests) gives another map: the extra term matters."
    net, x, layer = problem()
    y, phi = per_class_gradcam(net, layer, x)
    ours = GradCAM(net, layer)(x, T, "finer_weighted").maps[:, 0, 0]
    naive = torch.zeros(len(T), C, dtype=y.dtype)
    for b, tb in enumerate(T.tolist()):
        S = nearest(y, b, tb)
        naive[b, tb] = 1
        naive[b, S] = -torch.exp(y[b, S]) / torch.exp(y[b, S]).sum()
    assert not torch.allclose(ours, explicit_contrast(phi, naive), rtol=1e-3, atol=1e-6)


def test_explicit_comparison_classes_and_strengths():
    "Given comparison classes (one list, or one row per sample) and a non-default alpha / gamma, by hand."
    net, x, layer = problem(1)
    y, phi = per_class_gradcam(net, layer, x)
    S = torch.tensor([[1, 2], [0, 5], [1, 3], [5, 6]])
    finer = FinerWeightedTarget(alpha=0.5, comparison=S)
    mean = FinerMeanTarget(gamma=0.9, comparison=S)
    w_f, w_m = torch.zeros(len(T), C, dtype=y.dtype), torch.zeros(len(T), C, dtype=y.dtype)
    for b, tb in enumerate(T.tolist()):
        s = S[b].tolist()
        q = y[b, s].softmax(0)
        w_f[b, tb] = w_m[b, tb] = 1
        w_f[b, s] = -0.5 * q * (1 + y[b, s] - (q * y[b, s]).sum())
        w_m[b, s] = -0.9 / 2
    e = GradCAM(net, layer)(x, T, [finer, mean])
    torch.testing.assert_close(e.maps[:, 0, 0], explicit_contrast(phi, w_f))
    torch.testing.assert_close(e.maps[:, 0, 1], explicit_contrast(phi, w_m))
    shared = FinerMeanTarget(comparison=[1, 2])  # one list for every sample
    torch.testing.assert_close(shared.weights(y, 0)[:, [1, 2]], torch.full((len(T), 2), -0.3, dtype=y.dtype))


# ---- against the libraries that publish them, after their post-processing -----------------------------------------

def grad_cam_post(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing of a GradCAM map, as its BaseCAM runs it: per layer, ReLU and scale_cam_image
    (min-max, resize); then across the (here one) layers, ReLU, mean and scale_cam_image again."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    per_layer = scale_cam_image(np.maximum(maps.detach().numpy(), 0), size)
    return scale_cam_image(np.maximum(per_layer, 0))


def test_rest_equals_pytorch_grad_cams_classifier_output_rest():
    from pytorch_grad_cam import GradCAM as TheirGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST

    net, x, layer = problem()
    ours = GradCAM(net, layer)(x, T, ReSTTarget()).maps[:, 0, 0]
    with TheirGradCAM(model=net, target_layers=[layer]) as cam:
        theirs = cam(x, targets=[ClassifierOutputReST(int(t)) for t in T])
    mine = grad_cam_post(ours, (8, 8))
    assert (mine.max((1, 2)) > 0).all() and (ours < 0).any()  # a map with both signs: the ReLU cuts something
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_finer_weighted_equals_pytorch_grad_cams_target_and_its_finer_cam_defaults():
    from pytorch_grad_cam import FinerCAM as TheirFinerCAM
    from pytorch_grad_cam import GradCAM as TheirGradCAM
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget as TheirTarget

    net, x, layer = problem()
    S = torch.tensor([[1, 2, 5], [0, 1, 2], [1, 3, 5], [0, 6, 2]])
    for alpha in (1.0, 0.6):
        ours = GradCAM(net, layer)(x, T, FinerWeightedTarget(alpha=alpha, comparison=S)).maps[:, 0, 0]
        with TheirGradCAM(model=net, target_layers=[layer]) as cam:
            theirs = cam(x, targets=[TheirTarget(int(t), s.tolist(), alpha) for t, s in zip(T, S)])
        np.testing.assert_allclose(grad_cam_post(ours, (8, 8)), theirs, atol=1e-5)
    t = 3  # FinerCAM with its defaults (alpha 1, the three nearest classes), one class for the whole batch
    ours = GradCAM(net, layer)(x, torch.full((len(T),), t), "finer_weighted").maps[:, 0, 0]
    with TheirFinerCAM(net, [layer]) as cam:
        theirs = cam(x, target_idx=t)
    np.testing.assert_allclose(grad_cam_post(ours, (8, 8)), theirs, atol=1e-5)


def test_finer_mean_equals_torchcams_finer_cam():
    from torchcam.methods import FinerCAM as TheirFinerCAM
    from torchcam.methods.core import _CAM

    net, x, layer = problem()
    ours = GradCAM(net, layer)(x, T, "finer_mean").maps[:, 0, 0]
    with TheirFinerCAM(net, "3", input_shape=(3, 8, 8)) as cam:  # its defaults: gamma 0.6, three references
        theirs = cam(class_idx=T.tolist(), scores=net(x))[0]
    mine = _CAM._normalize(ours.relu().detach().clone())  # torchcam's ReLU and its min-max normalisation
    assert (ours < 0).any() and (mine.amax((1, 2)) > 0).all()
    torch.testing.assert_close(mine, theirs)
    S = [[1, 2], [0, 5], [1, 2], [5, 6]]  # and with the comparison classes given, and another gamma
    ours = GradCAM(net, layer)(x, T, FinerMeanTarget(gamma=1.0, comparison=torch.tensor(S))).maps[:, 0, 0]
    with TheirFinerCAM(net, "3", input_shape=(3, 8, 8), gamma=1.0) as cam:
        theirs = cam(class_idx=T.tolist(), scores=net(x), comparison_idx=S)[0]
    torch.testing.assert_close(_CAM._normalize(ours.relu().detach().clone()), theirs)


# ---- names, parameters and refusals --------------------------------------------------------------------------------

def test_names_round_trip_and_registries_stay_apart():
    assert set(PEER_TARGETS) == {"rest", "finer_weighted", "finer_mean"} and not set(PEER_TARGETS) & set(TARGETS)
    assert all(get_target(name) is target for name, target in PEER_TARGETS.items())
    v = get_target("versus:207")
    assert isinstance(v, VersusTarget) and v.rival == 207 and v.name == "versus:207" and repr(v) == "VersusTarget(207)"
    y = torch.randn(2, 300)
    torch.testing.assert_close(v(y, torch.tensor([3, 9])), y[:, [3, 9]].diagonal() - y[:, 207])


def test_versus_takes_one_rival_per_sample():
    y = torch.randn(3, 5, dtype=torch.float64)
    v = VersusTarget(torch.tensor([1, 0, 4]))
    torch.testing.assert_close(v(y, torch.tensor([0, 2, 3])), torch.stack([y[0, 0] - y[0, 1], y[1, 2] - y[1, 0],
                                                                          y[2, 3] - y[2, 4]]))


@pytest.mark.parametrize("make, t, error, message", [
    (lambda: VersusTarget(2), 2, ValueError, r"rival class is the explained class itself \(sample 0, class 2\)"),
    (lambda: VersusTarget(torch.tensor([1, 3])), torch.tensor([0, 3]), ValueError, r"itself \(sample 1, class 3\)"),
    (lambda: VersusTarget(9), 0, ValueError, r"rival classes must lie in \[0, 5\)"),
    (lambda: VersusTarget(torch.tensor([1, 2, 3])), 0, ValueError, r"one rival per sample, shape \(2,\)"),
    (lambda: get_target("versus:cat"), 0, ValueError, r"names no rival class: write versus:CLASS"),
    (lambda: get_target("versus"), 0, ValueError, r"names no rival class"),
    (lambda: VersusTarget(1.5), 0, TypeError, r"the rival is a class index"),
    (lambda: FinerWeightedTarget(comparison=[0, 1]), 0, ValueError, r"comparison class is the explained class"),
    (lambda: FinerMeanTarget(comparison=[1, 1]), 0, ValueError, r"repeat within a sample"),
    (lambda: FinerMeanTarget(comparison=[[1], [2], [3]]), 0, ValueError, r"one row per sample, shape \(2, k\)"),
    (lambda: FinerMeanTarget(comparison=[1.0]), 0, TypeError, r"comparison classes must be integers"),
    (lambda: FinerWeightedTarget(k=0), 0, ValueError, r"k must be a whole number of classes, at least 1"),
])
def test_bad_rivals_and_comparison_classes_are_refused_in_one_clear_line(make, t, error, message):
    y = torch.randn(2, 5)
    with pytest.raises(error, match=message):
        target = make()
        target.weights(y, t)
    if error is ValueError and "rival" in message and "explained" in message:
        with pytest.raises(error, match=message), deferred_checks(include_cpu=True):  # read later, same message
            make()(y, t)


def test_a_rival_equal_to_the_explained_class_is_refused_by_a_method():
    net, x, layer = problem()
    with pytest.raises(ValueError, match="rival class is the explained class itself"):
        GradCAM(net, layer)(x, torch.tensor([2, 0, 1, 3]), "versus:2")


def test_nearest_classes_are_capped_and_exclude_t():
    y = torch.tensor([[0.0, 5.0, 1.0]])
    for target in (FinerWeightedTarget(k=10), FinerMeanTarget(k=10)):
        w = target.weights(y, 0)
        assert (w[0, 1:] != 0).all() and w[0, 0] == 1  # both other classes, never t
    torch.testing.assert_close(FinerMeanTarget(k=10).weights(y, 0), torch.tensor([[1.0, -0.3, -0.3]]))
