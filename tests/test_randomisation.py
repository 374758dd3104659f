"""The randomisation checks (metrics.randomisation): the cascade re-initialises exactly the layers it names, step 0 is
exactly 1, a skipped re-initialisation is caught, runs are reproducible, and MPRT, EfficientMPRT and RandomLogit agree
with Quantus 0.6 on the same tiny network, images and maps (Quantus' seeding and its SSIM on flattened maps aligned)."""
import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from contrastive_explanations.methods import make_method
from contrastive_explanations.metrics import randomisation as R

TARGETS = ["original", "weighted"]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    with torch.no_grad():  # every parameter and statistic away from its reset value, as after training
        for t in [*net.parameters(), net[1].running_mean]:
            t.add_(0.2 * torch.randn_like(t))
        net[1].running_var.add_(0.2 * torch.rand_like(net[1].running_var) + 0.05)
    return net


def gradient(model, x, classes):
    return make_method("gradient", model)(x, classes, targets=TARGETS).maps


@pytest.fixture(scope="module")
def data():
    net = tiny_net()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        top = net(x).topk(2).indices
    return net, x, top


def test_cascade_differs_in_exactly_the_named_layers(data):
    net, _, _ = data
    before = copy.deepcopy(net.state_dict())
    names = R.parameterised_layers(net)
    assert names == ["0", "1", "3", "7"]
    for step, (name, randomised) in enumerate(R.randomised_models(net, seed=0), 1):
        assert name == names[-step]
        assert R.differing_layers(net, randomised) == names[-step:]  # compared entry by entry
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    bottom = [R.differing_layers(net, m) for _, m in R.randomised_models(net, order="bottom_up", seed=0)]
    assert bottom == [names[:i] for i in range(1, 5)]


def test_a_skipped_reinitialisation_is_caught(data, monkeypatch):
    net, _, _ = data
    for layer in (nn.Conv2d, nn.BatchNorm2d, nn.Linear):  # the mutation: every re-initialisation is a no-op
        monkeypatch.setattr(layer, "reset_parameters", lambda self: None)
    with pytest.raises(AssertionError):  # the check above, run against it, fails
        test_cascade_differs_in_exactly_the_named_layers(data)
    skipped = [R.differing_layers(net, m) for _, m in R.randomised_models(net, reinit=lambda m, s: None)]
    assert skipped == [[]] * 4


def test_step_zero_is_exactly_one_and_runs_are_reproducible(data):
    net, x, top = data
    table = R.mprt(net, x, top, gradient, targets=TARGETS, seed=3)
    assert len(table) == 5 * 4 * 2 * 2  # steps x samples x classes x targets
    zero = table[table.step == 0]
    assert (zero[["spearman", "spearman_abs", "ssim_abs"]].to_numpy() == 1).all()
    last = table[table.step == 4]
    assert (last.spearman_abs < 0.999).all()  # the fully randomised network's maps moved
    again = R.mprt(net, x, top, gradient, targets=TARGETS, seed=3)
    assert again.equals(table)
    other = R.mprt(net, x, top, gradient, targets=TARGETS, seed=4)
    assert not np.allclose(other.spearman[other.step > 0], table.spearman[table.step > 0])


def test_layers_of_one_shape_get_different_weights():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    *_, (_, randomised) = R.randomised_models(net, seed=0)
    assert not torch.equal(randomised[0].weight, randomised[2].weight)  # each layer its own seed


def test_spearman_against_scipy():
    a, b = torch.randn(5, 7, 6), torch.randn(5, 7, 6)
    a[0], b[0], b[1] = a[0].round(), b[0].round(), a[1].round()  # ties in both maps, in one
    expected = [spearmanr(u.flatten(), v.flatten())[0] for u, v in zip(a, b)]
    assert np.allclose(R.spearman(a, b).numpy(), expected, atol=1e-12)


def test_ssim_against_skimage():
    from skimage.metrics import structural_similarity

    a, b = torch.randn(3, 12, 10), torch.randn(3, 12, 10)
    for u, v, s in zip(a.double().numpy(), b.double().numpy(), R.ssim(a, b)):
        rng = max(u.max(), v.max()) - min(u.min(), v.min())
        assert abs(structural_similarity(u, v, data_range=rng) - float(s)) < 1e-10


def quantus_explain(model, inputs, targets, **kwargs):
    return gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets)[:, None])[:, 0, 0].numpy()


def quantus_seeding(module, seed):
    "Quantus' re-initialisation: the global generator seeded with its seed + 1 before every layer."
    torch.manual_seed(42 + 1)
    module.reset_parameters()


def test_mprt_and_efficient_mprt_agree_with_quantus(data):
    quantus = pytest.importorskip("quantus")
    net, x, top = data
    y = top[:, 0]
    ours = R.mprt(net, x, y[:, None], gradient, targets=TARGETS, reinit=quantus_seeding)
    ours = ours[ours.target == "original"]
    for absolute, column in ((True, "spearman_abs"), (False, "spearman")):
        theirs = quantus.MPRT(abs=absolute, layer_order="top_down", seed=42, disable_warnings=True)(
            model=net, x_batch=x.numpy(), y_batch=y.numpy(), explain_func=quantus_explain)
        assert list(theirs) == ["original", "7", "3", "1", "0"]
        for layer, scores in theirs.items():
            mine = ours[ours.layer == ("none" if layer == "original" else layer)][column].to_numpy()
            assert np.abs(np.asarray(scores) - mine).max() < 1e-9, (layer, column)
    theirs = quantus.EfficientMPRT(seed=42, disable_warnings=True)(
        model=net, x_batch=x.numpy(), y_batch=y.numpy(), explain_func=quantus_explain)
    mine = R.efficient_mprt(net, x, y[:, None], gradient, targets=TARGETS, reinit=quantus_seeding)
    assert np.abs(np.asarray(theirs) - mine[mine.target == "original"].rise.to_numpy()).max() < 1e-9


def test_random_logit_agrees_with_quantus(data):
    quantus = pytest.importorskip("quantus")
    net, x, top = data
    y = top[:, 0]
    asked = []

    def recording(model, inputs, targets, **kwargs):
        asked.append(np.asarray(targets))
        return quantus_explain(model, inputs, targets)

    theirs = quantus.RandomLogit(num_classes=5, seed=42, disable_warnings=True)(
        model=net, x_batch=x.numpy(), y_batch=y.numpy(), explain_func=recording, batch_size=1)  # per-map scaling
    others = torch.as_tensor(np.concatenate(asked[1::2]))  # its own map, then the random class's, per image
    assert (others != y).all()
    table = R.random_logit(net, x, y, gradient, num_classes=5, others=others, targets=TARGETS)
    maps = gradient(net, x, torch.stack([y, others], 1))[:, :, 0]
    flat = [R.max_normalised(maps[:, k]).flatten(-2) for k in (0, 1)]
    assert np.abs(np.asarray(theirs) - R.ssim(*flat, dims=1).numpy()).max() < 1e-5  # float32 maps in Quantus
    ours = table[table.target == "original"].ssim.to_numpy()  # the 2-D SSIM differs from Quantus' 1-D one
    assert np.abs(ours - R.ssim(R.max_normalised(maps[:, 0]), R.max_normalised(maps[:, 1])).numpy()).max() == 0


def test_random_other_classes_are_seeded_and_other():
    c = torch.arange(10) % 4
    a, b = R.random_other_classes(c, 4, seed=5), R.random_other_classes(c, 4, seed=5)
    assert torch.equal(a, b) and (a != c).all() and not torch.equal(a, R.random_other_classes(c, 4, seed=6))


def test_bad_input_names_the_fix(data):
    net, x, top = data
    with pytest.raises(ValueError, match="choose from 0, 1, 3, 7"):
        R.check_layers(net, ["2"])
    with pytest.raises(ValueError, match="top_down"):
        next(R.randomised_models(net, order="sideways"))
    with pytest.raises(ValueError, match="smaller odd window"):
        R.ssim(torch.randn(4, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="num_classes"):
        R.random_other_classes(torch.tensor([7]), 5)
