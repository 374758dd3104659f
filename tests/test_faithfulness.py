"""Faithfulness metrics (deletion, insertion, ROAD) against the field's libraries on the same model, photographs and
maps (torchcam 0.5's DeletionInsertionMetric, pytorch-grad-cam's ROAD metrics and imputer, Quantus's imputation), and
properties that need no library: the true importance of a linear model is the best order, the tie rule decides a
constant map, the shapes, and one clear line for bad input.

The oracle tests run EfficientNet-Lite0 on two packaged photographs resized to 64 pixels (the network takes any size;
a twelfth of the pixels keeps the tests fast), with Grad-CAM maps upsampled to the image (they have ties: the regions
the ReLU zeroes)."""
import functools
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.bench_metrics import FixedMaps  # torchcam's extractor protocol, returning given maps
from contrastive_explanations.metrics.faithfulness import (OUTPUTS, Curves, blurred, class_scores,
                                                           default_rivals, deletion, impute, insertion, relevance_ranks, road,
                                                           step_counts)

SIZE = 64
LOGIT_TOL = 1e-5  # AUC of the logit against torchcam (float32 forwards of the same images in other batches)
PROB_TOL = 1e-6  # AUC of p_t and r_t against torchcam
PIXEL_TOL = 1e-5  # imputed pixels against pytorch-grad-cam's and Quantus's solvers (float32 outputs)
ROAD_TOL = 1e-4  # ROAD logit against pytorch-grad-cam


# ------------------------------------------------------------------------------------------------ the photographs
@pytest.fixture(scope="module")
def lite0():
    "Lite0, two photographs at SIZE pixels, their two most probable classes, Grad-CAM maps (original, weighted)."
    pytest.importorskip("skimage")
    from torchvision.transforms import v2 as T

    from contrastive_explanations.data.datasets import packaged_photos
    from contrastive_explanations.data.models import build_model
    from contrastive_explanations.methods import make_method

    torch.set_num_threads(2)
    model = build_model("efficientnet_lite0")
    resize = T.Compose([model.preprocess, T.Resize(SIZE, antialias=True)])
    x = torch.stack([im for im, _ in packaged_photos(["chelsea", "coffee"], transform=resize)])
    with torch.no_grad():
        logits = model(x)
    pair = logits.topk(2).indices
    maps = make_method("gradcam", model)(x, pair, ["original", "weighted"]).upsampled(SIZE)
    return model, x, logits, pair, maps


def torchcam_aucs(model, x, m, cls: int, rival: int, steps: int, baseline) -> dict[str, tuple[float, float]]:
    "torchcam's (deletion, insertion) AUC of one image and map for each output; r_t through its logits_fn."
    from torchcam.metrics import DeletionInsertionMetric
    fns = {"logit": None, "probability": functools.partial(torch.softmax, dim=-1),
           "relative": lambda y: torch.sigmoid(y - y[:, rival:rival + 1])}
    out = {}
    for name, fn in fns.items():
        metric = DeletionInsertionMetric(FixedMaps(model, m[None]), fn, steps=steps, baseline=baseline, batch_size=16)
        metric.update(x[None], class_idx=[cls])
        s = metric.summary()
        out[name] = (s["deletion_auc"], s["insertion_auc"])
    return out


def test_deletion_and_insertion_agree_with_torchcam(lite0):
    pytest.importorskip("torchcam")
    model, x, logits, pair, maps = lite0
    steps = 4  # divides N, so torchcam's ceil(N / n) steps and ours are the same counts
    assert (SIZE * SIZE) % steps == 0
    maps = maps[:, :, :1]  # the original target; K = 2 classes
    rivals = default_rivals(logits, pair)
    for fill, theirs_fill in ((0.0, None), (blurred, blurred)):  # torchcam uses one baseline for both tests
        ours_d = deletion(model, x[:1], maps[:1], pair[:1], steps=steps, baseline=fill)
        ours_i = insertion(model, x[:1], maps[:1], pair[:1], steps=steps, start=fill)
        for k in range(2 if fill == 0.0 else 1):
            theirs = torchcam_aucs(model, x[0], maps[0, k, 0], int(pair[0, k]), int(rivals[0, k]), steps, theirs_fill)
            for name, (d, i) in theirs.items():
                tol = LOGIT_TOL if name == "logit" else PROB_TOL
                assert abs(float(ours_d.auc(name)[0, k, 0]) - d) < tol, (fill, k, name)
                assert abs(float(ours_i.auc(name)[0, k, 0]) - i) < tol, (fill, k, name)


def test_imputation_agrees_with_grad_cam_and_quantus(lite0):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from quantus.functions.perturb_func import noisy_linear_imputation
    _, x, _, _, maps = lite0
    removed = relevance_ranks(maps[1, 0, 1]) < 0.6 * SIZE * SIZE  # a real map's top 60 %, ties by position
    ours = impute(x[1], removed.view(SIZE, SIZE), noise=0.0)
    gradcam = NoisyLinearImputer(noise=0.0)(x[1], (~removed).float().view(SIZE, SIZE))
    quantus = noisy_linear_imputation(x[1].numpy(), np.flatnonzero(removed.numpy()), noise=0.0)
    assert (ours - gradcam).abs().max() < PIXEL_TOL
    assert np.abs(ours.numpy() - quantus).max() < PIXEL_TOL
    assert not torch.allclose(ours, x[1], atol=1e-3)  # something was imputed


def test_road_agrees_with_grad_cam(lite0):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
    model, x, _, pair, maps = lite0
    N = SIZE * SIZE
    # the real map, its ties broken by position as ours are (earlier first), so a threshold and a rank agree
    m = maps[:1, :1, :1].double() - 1e-9 * torch.arange(N, dtype=torch.float64).view(SIZE, SIZE)
    assert len(torch.unique(m)) == N
    cam = m[:, 0, 0].numpy()
    for metric, order, p in ((ROADMostRelevantFirst, "morf", 70), (ROADLeastRelevantFirst, "lerf", 40)):
        a = cam[0] if order == "morf" else 1 - cam[0]
        count = int((a >= np.percentile(a, p)).sum())  # what the library removes
        ours = road(model, x[:1], m, pair[:1, :1], fractions=[count / N], order=order, noise=0.0)
        for target, output, tol in ((ClassifierOutputTarget, "logit", ROAD_TOL),
                                    (ClassifierOutputSoftmaxTarget, "probability", PROB_TOL * 10)):
            theirs = metric(percentile=p)
            theirs.perturbation.imputer.noise = 0.0
            score = theirs(x[:1], cam, [target(int(pair[0, 0]))], model, return_diff=False)
            assert abs(float(score[0]) - float(ours.score(output)[0, 0, 0, 0])) < tol, (order, output)


# ------------------------------------------------------------------------------------------------ properties
class Linear(nn.Module):
    "A linear classifier on (B, 3, H, W) pixels: logit_c = sum W_c * x."

    def __init__(self, classes: int, size: int, seed: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, 3, size, size, generator=torch.Generator().manual_seed(seed),
                                               dtype=torch.float64))

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight)


def test_true_importance_of_a_linear_model_is_the_best_order():
    torch.manual_seed(0)
    model, x = Linear(4, 6, seed=1), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    classes = torch.tensor([[0], [3]])
    truth = (model.weight[classes[:, 0]] * x).sum(1)  # (B, H, W): each pixel's share of the logit (zero baseline)
    others = torch.randn(2, 30, 6, 6, dtype=torch.float64)  # 30 random maps per image
    maps = torch.cat([truth[:, None], -truth[:, None], others], 1)[:, None]  # (B, 1, T = 32, H, W)
    d = deletion(model, x, maps, classes, steps=9)
    i = insertion(model, x, maps, classes, steps=9, start=0.0)
    # the curve of the true map is known in closed form: the logit minus the top c_i contributions
    top = truth.flatten(1).sort(1, descending=True).values.cumsum(1)
    logit = model(x).gather(1, classes)
    expected = logit - torch.cat([torch.zeros(2, 1, dtype=top.dtype), top[:, step_counts(36, 9)[1:] - 1]], 1)
    assert torch.allclose(d.score("logit")[:, 0, 0], expected.detach())
    assert (d.auc("logit")[:, 0, :1] <= d.auc("logit")[:, 0, 1:] + 1e-12).all()
    assert (i.auc("logit")[:, 0, :1] >= i.auc("logit")[:, 0, 1:] - 1e-12).all()
    assert (d.auc("logit")[:, 0, 0] < d.auc("logit")[:, 0, 1]).all()  # the reversed map is worse


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).double()


def test_a_constant_map_is_ordered_by_the_tie_rule():
    model, x = small_cnn(), torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    position = torch.arange(64, dtype=torch.float64).view(1, 1, 1, 8, 8)
    maps = torch.cat([torch.full_like(position, 0.3), -position, position], 2)  # constant, raster order, reversed
    d = deletion(model, x, maps, torch.tensor([[1]]), steps=8)
    curves = d.score("probability")[0, 0]
    assert torch.equal(curves[0], curves[1])  # ties go by position, the earlier first
    assert not torch.allclose(curves[0], curves[2])  # so the order matters: the constant map is not order-free


def test_shapes_and_shared_end_points():
    model, x = small_cnn(), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps, classes = torch.randn(2, 3, 2, 8, 8, dtype=torch.float64), torch.tensor([[0, 1, 2], [4, 3, 0]])
    d = deletion(model, x, maps, classes, steps=5, chunk=7)
    assert d.scores.shape == (2, 3, 2, 6, 3) and torch.allclose(d.fractions, step_counts(64, 5).double() / 64)
    for output in OUTPUTS:
        assert d.auc(output).shape == d.mean(output).shape == (2, 3, 2)
    clean = class_scores(model(x).detach(), classes, default_rivals(model(x).detach(), classes))  # (B, K, 3)
    assert torch.allclose(d.scores[:, :, :, 0], clean[:, :, None])
    rivals, c = default_rivals(model(x).detach(), classes), step_counts(64, 5)[3]
    for b, k, t in itertools.product(range(2), range(3), range(2)):  # an inner point, against one forward of its image
        kept = (relevance_ranks(maps[b, k, t]) >= c).view(1, 1, 8, 8)
        one = class_scores(model(x[b:b + 1] * kept).detach(), classes[b:b + 1, k:k + 1], rivals[b:b + 1, k:k + 1])
        assert torch.allclose(d.scores[b, k, t, 3], one[0, 0]), (b, k, t)
    r = road(model, x, maps, classes, fractions=[0.0, 0.25, 0.5], order="lerf", chunk=4)
    assert r.scores.shape == (2, 3, 2, 3, 3) and torch.allclose(r.scores[:, :, :, 0], clean[:, :, None])


def test_results_do_not_depend_on_the_chunk_and_the_mode_is_restored():
    model, x = small_cnn(), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps, classes = torch.randn(2, 2, 2, 8, 8, dtype=torch.float64), torch.tensor([[0, 1], [4, 3]])
    model.train()
    a, b = (insertion(model, x, maps, classes, steps=4, chunk=c).scores for c in (1, 64))
    assert torch.allclose(a, b) and model.training
    a, b = (road(model, x, maps, classes, fractions=[0.3, 0.6], chunk=c, seed=5).scores for c in (1, 64))
    assert torch.allclose(a, b, rtol=0, atol=1e-10)  # the same noise whatever the chunk (forwards differ in the last bits)


def test_relative_probability_is_the_pair_softmax():
    logits = torch.randn(5, 7, dtype=torch.float64)
    pair = logits.topk(2).indices
    rivals = default_rivals(logits, pair)
    assert torch.equal(rivals, pair.flip(1))  # for the top two, each is the other's rival
    r = class_scores(logits, pair, rivals)[..., 2]
    explicit = logits.gather(1, pair).exp() / logits.gather(1, pair).exp().sum(1, keepdim=True)
    assert torch.allclose(r, explicit) and torch.allclose(r.sum(1), torch.ones(5, dtype=torch.float64))


def test_imputation_keeps_pixels_solves_the_mean_and_adds_the_noise():
    image = torch.rand(3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    removed = torch.zeros(20, 20, dtype=torch.bool)
    removed[5:15, 3:12] = True
    filled = impute(image, removed, noise=0.0)
    assert torch.equal(filled[:, ~removed], image[:, ~removed])
    # every removed pixel is the weighted mean of its neighbours (all inside the image here): the paper's weights
    weights = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)
    total = nn.functional.conv2d(nn.functional.pad(filled, (1, 1, 1, 1))[:, None], weights[None, None])[:, 0]
    assert torch.allclose(total[:, removed], filled[:, removed])
    noisy = impute(image, removed, noise=0.05, generator=torch.Generator().manual_seed(1))
    assert abs(float((noisy - filled)[:, removed].std()) - 0.05) < 0.01


def test_bad_input_gets_one_clear_line():
    model, x = small_cnn(), torch.rand(1, 3, 8, 8, dtype=torch.float64)
    maps, classes = torch.randn(1, 1, 1, 8, 8, dtype=torch.float64), torch.tensor([[0]])
    bad = {
        "maps": lambda: deletion(model, x, maps[..., :4, :4], classes),
        "maps (B, K, T, H, W)": lambda: deletion(model, x, maps[0], classes),
        "classes": lambda: insertion(model, x, maps, torch.tensor([0])),
        "steps": lambda: deletion(model, x, maps, classes, steps=0),
        "steps must be a positive": lambda: insertion(model, x, maps, classes, steps=-3),
        "NaN": lambda: deletion(model, x, maps * torch.nan, classes),
        "baseline": lambda: deletion(model, x, maps, classes, baseline=torch.zeros(2, 1, 1)),
        "fractions": lambda: road(model, x, maps, classes, fractions=[0.5, 1.0]),
        "order": lambda: road(model, x, maps, classes, order="random"),
        "output": lambda: Curves(torch.zeros(2), torch.zeros(1, 1, 1, 2, 3)).auc("softmax"),
    }
    for word, call in bad.items():
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert word in message and ": " in message and "\n" not in message, message
