"""Tests of the feature-masking experiment (nbs/08_masking.ipynb): the relative probability, which pixels each rule
keeps (ours and the review's, off-by-one included), the baselines, one explanation call per method, the CUB
source's errors, bad arguments, and a sharded, resumed run equal to a single one."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2 as T
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from contrastive_explanations.data.datasets import DatasetNotFoundError, write_fixture
from contrastive_explanations.methods import METHODS
from contrastive_explanations.methods.fullgrad import FullGrad
from contrastive_explanations.experiments.masking import (BASELINES, EXPLANATIONS, FEATURES, MASKING_METHODS,
                                                          REVIEW_EXPLANATIONS, REVIEW_MOVED, review_pt_summary,
                                                          review_pt_wording,
                                                          MASKING_SOURCES, VARIANTS, Masking, masking_source, baseline_images, blur_settings, explain_pairs,
                                              figure_maps, keep_masks, kept_range, masking_scores, normalised_zero,
                                              pixel_ranks, relative_probability, sign_counts)
from contrastive_explanations.results import run

from conftest import tiny_cnn


def tiny_net(seed: int = 0, classes: int = 5) -> nn.Module:
    "A small random CNN in float64, with batch norm statistics and a sharpened head (some images confident)."
    net = tiny_cnn(classes, seed, widths=(6, 8), pool=1, bn_var=None)
    with torch.no_grad():  # larger weights: probabilities that differ from image to image
        net[0].weight.mul_(5)
        net[3].weight.mul_(5)
        net[-1].weight.mul_(4)
    return net


def tiny_images(n: int = 24, size: int = 12, seed: int = 0) -> torch.Tensor:
    "uint8 images: a random colour each, with noise."
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 255
    return (base + 25 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255).round().to(torch.uint8)


def tiny_experiment(**kwargs) -> Masking:
    args = dict(model=tiny_net(), images=tiny_images(), layer="3", n_images=3, batch_size=4, threshold=0.1)
    return Masking(**(args | kwargs))


# --- Eq. eq-relative -------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-40, 40), min_size=3, max_size=8), st.data())
def test_relative_probability_formula(values, data):
    logits = torch.tensor([values], dtype=torch.float64)
    i, j = data.draw(st.lists(st.integers(0, len(values) - 1), min_size=2, max_size=2, unique=True))
    r = relative_probability(logits, torch.tensor([[i, j]]))
    y = logits[0]
    assert torch.allclose(r[0, 0], y[i].exp() / (y[i].exp() + y[j].exp()))
    assert torch.allclose(r[0, 1], torch.sigmoid(y[j] - y[i]))
    assert torch.allclose(r.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_relative_probability_batched_and_no_overflow():
    logits = torch.tensor([[500.0, 499.0, 0.0], [0.0, 1.0, 2.0]])  # exp(500) overflows float32
    r = relative_probability(logits, torch.tensor([[0, 1], [2, 0]]))
    assert torch.isfinite(r).all()
    assert torch.allclose(r[0], torch.sigmoid(torch.tensor([1.0, -1.0])))
    assert torch.allclose(r[1], torch.sigmoid(torch.tensor([2.0, -2.0])))


@pytest.mark.parametrize("pair, match", [(torch.tensor([[0.0, 1.0]]), "pair"), (torch.tensor([[0, 1, 2]]), "pair"),
                                         (torch.tensor([0, 1]), "pair")])
def test_relative_probability_bad_pair(pair, match):
    with pytest.raises(ValueError, match=match):
        relative_probability(torch.zeros(1, 4), pair)
    with pytest.raises(TypeError, match="logits"):
        relative_probability(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1]]))


# --- Eqs. eq-ranks, eq-keep-ours, eq-keep-review -------------------------------------------------------------

ORI = torch.tensor([[[3.0, -1.0, 2.0], [0.5, -2.0, 0.0]]])  # P = 3, M = 2
WTD = torch.tensor([[[-1.0, 4.0, -3.0], [1.0, -0.5, 0.0]]])  # P = 2, M = 3


def masks(features, variant):
    return [k[0].int().tolist() for k in keep_masks(ORI, WTD, features, variant)]


def test_ranks_hand_made():
    assert pixel_ranks(ORI).tolist() == [[5, 1, 4, 3, 0, 2]]
    assert pixel_ranks(WTD).tolist() == [[1, 5, 0, 4, 2, 3]]
    assert pixel_ranks(torch.zeros(1, 2, 2)).tolist() == [[0, 1, 2, 3]]  # ties by position


def test_our_rule_hand_made():
    # n+ = min(3, 2) = 2: the two largest values of each map, all positive
    assert masks("pos", "ours") == [[[1, 0, 1], [0, 0, 0]], [[0, 1, 0], [1, 0, 0]]]
    # n- = min(2, 3) = 2: the two smallest values of each map, all negative
    assert masks("neg", "ours") == [[[0, 1, 0], [0, 1, 0]], [[1, 0, 1], [0, 0, 0]]]


def test_review_rule_hand_made():
    # m+ = min(3, 2) = 2: the review replaces the 2 lowest-ranked pixels and keeps N - m+ = 4, zeros and negatives too
    assert masks("pos", "review") == [[[1, 0, 1], [1, 0, 1]], [[0, 1, 0], [1, 1, 1]]]
    # m- = max(2, 3) = 3: it replaces the ranks above N - m- = 3, i.e. m- - 1 = 2 pixels, and keeps N - m- + 1 = 4
    assert masks("neg", "review") == [[[0, 1, 0], [1, 1, 1]], [[1, 0, 1], [0, 1, 1]]]
    assert [int(k.sum()) for k in keep_masks(ORI, WTD, "neg", "review")] == [6 - 3 + 1] * 2
    # no negative pixel at all: m- = 0 and nothing is replaced
    pos = torch.ones(1, 2, 3)
    assert all(bool(k.all()) for k in keep_masks(pos, pos, "neg", "review"))


def review_equal_blur_masks(s1, s2, mode):
    "The review's index arithmetic for (H, W) maps: 1 = kept, 0 = replaced (a transcription used as an oracle)."
    N = s1.numel()
    count = (lambda s: (s > 0).float().sum()) if mode == "positive" else (lambda s: (s < 0).float().sum())
    n_mask = min(count(s1), count(s2)) if mode == "positive" else max(count(s1), count(s2))
    out = []
    for s in (s1, s2):
        rank = s.view(-1, N).argsort().argsort()
        mask = torch.ones_like(rank)
        mask[(rank < n_mask) if mode == "positive" else (rank > N - n_mask)] = 0
        out.append(mask.view(s.shape).bool())
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6))
def test_rules_properties(seed, B, H, W):
    g = torch.Generator().manual_seed(seed)
    tied = [torch.randint(-2, 3, (B, H, W), generator=g).double() for _ in range(2)]  # many ties
    smooth = [torch.randn(B, H, W, generator=g, dtype=torch.float64) for _ in range(2)]  # none
    N = H * W
    for (o, w), features in itertools.product((tied, smooth), FEATURES):
        sign = 1 if features == "pos" else -1
        count_o, count_w = sign_counts(o, features), sign_counts(w, features)
        # ours: equal n for both maps, n = the smaller count, every kept pixel of the kept sign
        keeps = keep_masks(o, w, features, "ours")
        n = torch.minimum(count_o, count_w)
        for m, keep in zip((o, w), keeps):
            assert torch.equal(keep.flatten(1).sum(1), n)
            assert ((m * sign)[keep] > 0).all()
        # the review's: equal counts for both maps, N - m+ and min(N, N - m- + 1) (Eq. eq-review-counts)
        keeps = keep_masks(o, w, features, "review")
        expected = N - torch.minimum(count_o, count_w) if features == "pos" else \
            (N - torch.maximum(count_o, count_w) + 1).clamp(max=N)
        for keep in keeps:
            assert torch.equal(keep.flatten(1).sum(1), expected)
        lo, hi = kept_range(o, w, features, "review")
        assert torch.equal(hi - lo, expected)
    o, w = smooth  # and the very same pixels as the review's own index arithmetic
    for features, mode in (("pos", "positive"), ("neg", "negative")):
        ours = keep_masks(o, w, features, "review")
        for b in range(B):
            theirs = review_equal_blur_masks(o[b], w[b], mode)
            assert torch.equal(ours[0][b], theirs[0]) and torch.equal(ours[1][b], theirs[1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(features="both"), ValueError, "features"), (dict(variant="paper"), ValueError, "variant"),
    (dict(wtd=torch.zeros(1, 2, 4)), ValueError, "same shape"), (dict(ori=torch.zeros(2, 3)), ValueError, r"\(B, H, W\)"),
    (dict(ori=np.zeros((1, 2, 3))), TypeError, "ori")])
def test_keep_masks_bad_arguments(kwargs, error, match):
    args = dict(ori=ORI, wtd=WTD, features="pos", variant="ours") | kwargs
    with pytest.raises(error, match=match):
        keep_masks(**args)


# --- baselines: Eqs. eq-blur-scale, eq-zeros-review -------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.integers(2, 40))
def test_blur_of_a_constant_image_is_constant(r, g, b, size):
    x = torch.tensor([r, g, b], dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, size, size).contiguous()
    fills = baseline_images(x)
    assert torch.allclose(fills[:, 0], x)  # blur
    assert (fills[:, 1] == 0).all()  # zeros: black
    assert torch.allclose(fills[:, 2], x)  # mean


def test_baselines():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    colour = torch.tensor([0.2, 0.4, 0.6])
    fills = baseline_images(x, colour)
    assert fills.shape == (3, len(BASELINES), 3, 16, 16)
    assert torch.allclose(fills[:, 1], colour.view(1, 3, 1, 1).expand_as(x))
    assert torch.allclose(fills[:, 2], x.mean((2, 3), keepdim=True).expand_as(x))
    assert not torch.allclose(fills[:, 0], x) and torch.allclose(fills[:, 0].mean((2, 3)), x.mean((2, 3)), atol=0.05)


def test_blur_settings():
    assert blur_settings(224) == (101, 15.0)
    k, sigma = blur_settings(64)
    assert k == 29 and sigma == pytest.approx(15 * 64 / 224)
    assert blur_settings(112) == (51, 7.5)
    assert blur_settings(8, (8, 101, 15.0)) == (15, 15.0)  # capped at 2 size - 1: reflection needs padding < size
    for size in (2, 5, 16, 64, 224, 500):
        k, _ = blur_settings(size)
        assert k % 2 == 1 and (k - 1) // 2 < size
    for bad in (1, 0, 64.0, True, "64"):
        with pytest.raises(ValueError, match="size"):
            blur_settings(bad)


def test_normalised_zero():
    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
            self.net = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.net(self.normalize(x))

    model = Normalised()
    z = normalised_zero(model)
    assert torch.allclose(model.normalize(z.view(1, 3, 1, 1).expand(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2), atol=1e-6)
    images = tiny_images(5, 4)
    expected = images.double().mean((0, 2, 3)) / 255
    assert torch.allclose(normalised_zero(tiny_net(), images).double(), expected, atol=1e-6)
    assert torch.allclose(normalised_zero(tiny_net(), images.double() / 255).double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="images"):
        normalised_zero(tiny_net())


# --- Eq. eq-perturbed, batched ----------------------------------------------------------------------------------

def test_masking_scores_equal_one_perturbation_at_a_time():
    net, x = tiny_net(), torch.rand(2, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pair = net(x).topk(2).indices
    maps, _ = explain_pairs({"linear_approximation": METHODS["linear_approximation"](net, "3")}, x, pair)
    fills = torch.stack([baseline_images(x), baseline_images(x, normalised_zero(net, x))], 1)
    r, kept = masking_scores(net, x, pair, maps["linear_approximation"], fills, forward_batch=7)
    assert r.shape == (2, 2, len(VARIANTS), len(FEATURES), 2, len(BASELINES)) and kept.shape == (2, 2, 2, 2)
    for k, v, f, e, j in itertools.product(range(2), range(2), range(2), range(2), range(3)):
        keep = keep_masks(maps["linear_approximation"][:, k, 0], maps["linear_approximation"][:, k, 1], FEATURES[f], VARIANTS[v])[e]
        image = torch.where(keep[:, None], x, fills[:, v, j])
        with torch.no_grad():
            expected = relative_probability(net(image), pair)[:, k]
        assert torch.allclose(r[:, k, v, f, e, j], expected)
        assert torch.equal(kept[:, k, v, f], keep.flatten(1).sum(1))
    with pytest.raises(ValueError, match="fills"):
        masking_scores(net, x, pair, maps["linear_approximation"], fills[:, :1])


def test_maps_are_computed_once_per_method():
    experiment = tiny_experiment()
    calls = {}

    class Counting:
        def __init__(self, name, method):
            self.name, self.method = name, method

        def __call__(self, x, classes, targets):
            calls.setdefault(self.name, []).append((tuple(classes.shape), list(targets)))
            return self.method(x, classes, targets)

    experiment.methods = {name: Counting(name, m) for name, m in experiment.methods.items()}
    items = list(range(len(experiment)))
    rows = experiment.rows(items)
    B = len(items)
    # once: our two maps and the review's weighted one, for both classes
    assert calls == {name: [((B, 2), [*EXPLANATIONS, REVIEW_EXPLANATIONS[1]])] for name in MASKING_METHODS}
    assert len(rows) == B * len(MASKING_METHODS) * 2 * len(VARIANTS) * len(BASELINES) * len(FEATURES)
    table = pd.DataFrame(rows)
    assert set(table["variant"]) == set(VARIANTS) and set(table["features"]) == set(FEATURES)
    assert list(table["method"].unique()) == list(MASKING_METHODS)  # labels: Method.name
    assert table[["clean", "ori", "wtd"]].apply(lambda c: c.between(0, 1)).all().all()
    assert table["kept"].between(0, 1).all()


def review_coefficient_error(logits: torch.Tensor, t: int) -> np.ndarray:
    "Oracle: softmax's derivative p_t (1 - p_t) formed in the logits' dtype, against its exact value from float64 logs."
    p = torch.softmax(logits, 1)  # the review's p_t, in its dtype
    pt = p[:, t]
    review = (pt * (1 - pt)).double()  # softmax's backward: p_t * (1 - p_t), both in the logits' dtype
    y = logits.double()
    log_pt = y[:, t] - torch.logsumexp(y, 1)
    log_rest = torch.logsumexp(torch.cat([y[:, :t], y[:, t + 1:]], 1), 1) - torch.logsumexp(y, 1)
    return (review / torch.exp(log_pt + log_rest) - 1).numpy()


def test_the_reviews_maps_are_scored_in_the_band_and_wherever_they_keep_other_pixels():
    "ori_review / wtd_review: the review's softmax(logits)[t] maps' scores in the band or where its masks differ; ours elsewhere."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()  # float32, as the review's
    with torch.no_grad():
        net[-1].weight.mul_(3000)
    scale = torch.linspace(0.02, 1, 40).view(40, 1, 1, 1)  # the brighter images saturate, the darker do not
    images = (torch.rand(40, 3, 10, 10) * 255 * scale).round().to(torch.uint8)
    exp = Masking(model=net, images=images, layer="3", n_images=None, batch_size=40, methods=["gradcam"])
    table = pd.DataFrame(exp.rows(range(len(exp))))
    first = table.drop_duplicates("item").set_index("item")
    x = exp.load([exp.items[i][0] for i in first.index])
    pair = torch.tensor([exp.items[i][1:3] for i in first.index])
    with torch.no_grad():
        logits = net(x)
    oracle = np.stack([review_coefficient_error(logits[b:b + 1], int(pair[b, k]))[0] for b in range(len(x))
                       for k in range(2)]).reshape(-1, 2)
    band = np.abs(oracle).max(1) > 1e-3
    assert np.array_equal(first["review_band"].to_numpy().astype(bool), band)
    assert band.any() and (~band).any()  # both kinds of image
    assert (first.loc[first["p1_is_1"] == 1, "review_band"] == 1).all()  # p_t1 = 1: the coefficient is 0, -100%
    assert (first["p1_is_1"] == 0).loc[first["review_band"] == 1].any()  # and the band is wider than p_t1 = 1
    redo = table.groupby("item")["review_masks_differ"].transform("max").astype(bool) | table["review_band"].astype(bool)
    rest = table[~redo]
    assert (rest["ori_review"] == rest["ori"]).all() and (rest["wtd_review"] == rest["wtd"]).all()
    maps, _ = explain_pairs(exp.methods, x, pair, REVIEW_EXPLANATIONS)  # the review's maps, computed on their own
    fills = torch.stack([baseline_images(x, None, exp.blur), baseline_images(x, exp.zero, exp.blur)], 1)
    r, _ = masking_scores(net, x, pair, maps["gradcam"], fills)
    position = {item: b for b, item in enumerate(first.index)}
    for _, row in table[redo].iterrows():
        b, k = position[row["item"]], int(row["target"][1]) - 1
        v, f, j = VARIANTS.index(row["variant"]), FEATURES.index(row["features"]), BASELINES.index(row["baseline"])
        assert row["ori_review"] == pytest.approx(float(r[b, k, v, f, 0, j]), rel=1e-5, abs=1e-6)
        assert row["wtd_review"] == pytest.approx(float(r[b, k, v, f, 1, j]), rel=1e-5, abs=1e-6)
    assert (table[redo]["wtd_review"] != table[redo]["wtd"]).any()  # the rivals-only maps keep other pixels


def gap_network(gap: float, image: torch.Tensor) -> nn.Module:
    "A float32 CNN whose logits on `image` are (gap, 0, -30): a logit gap `gap` between t1 = 0 and t2 = 1."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[-1].bias += torch.tensor([gap, 0.0, -30.0]) - net(image[None].float() / 255)[0]
    return net


@pytest.mark.parametrize("gap", [15.5, 3.0])
def test_the_wording_calls_the_reviews_maps_ours_only_outside_the_band(gap):
    "A logit gap of 15.5: p_t1 < 1 in float32, yet the review's coefficient is far off: its maps are not called ours."
    image = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    net = gap_network(gap, image)
    exp = Masking(model=net, images=image[None], layer="2", n_images=1, methods=["gradcam"])
    with torch.no_grad():
        logits = net(exp.load([0]))
    assert float(logits[0, 0] - logits[0, 1]) == pytest.approx(gap, abs=1e-4) and float(logits.softmax(1)[0, 0]) < 1
    in_band = abs(review_coefficient_error(logits, 0)[0]) > 1e-3  # the oracle's verdict
    assert in_band == (gap > 10)  # 15.5 in the band, 3 not
    summary = review_pt_summary(pd.DataFrame(exp.rows([0])))
    assert summary.loc["confident", "in band"] == int(in_band) and summary.loc["confident", "p_t1 = 1"] == 0
    text = review_pt_wording(summary)
    if in_band:
        assert "agree" not in text and "1 of the 1 confident images is in the band" in text
        assert "not ours up to rounding" in text
    else:
        assert "agree with ours" in text and "not ours" not in text


def test_the_wording_follows_the_numbers():
    "Agree only with no image in the band and no mean moved; otherwise the counts and the largest change."
    row = {"images": 40, "in band": 0, "p_t1 = 1": 0, "masks differ": 0, "means moved": 0, "of": 96, "largest change": 0.0}
    frame = lambda **kw: pd.DataFrame([row | kw], index=pd.Index(["confident"], name="group"))
    assert "agree with ours" in review_pt_wording(frame())
    moved = review_pt_wording(frame(**{"means moved": 3, "largest change": 0.0123, "masks differ": 2}))
    assert "agree" not in moved and "3 of the 96 means move" in moved and "0.012" in moved and "for 2 of them" in moved
    banded = review_pt_wording(frame(**{"in band": 5, "p_t1 = 1": 2}))
    assert "agree" not in banded and "5 of the 40 confident images are in the band" in banded and "2 with" in banded
    with pytest.raises(ValueError, match="review_band"):
        review_pt_summary(pd.DataFrame({"group": ["confident"], "item": [0]}))
    assert review_pt_summary(pd.DataFrame([], columns=["group", "item", "p1_is_1", "review_band", "review_masks_differ",
                                                       "variant", "method", "target", "baseline", "features", "ori",
                                                       "wtd", "ori_review", "wtd_review"])).empty
    assert REVIEW_MOVED > 0


# --- the experiment: selection, errors, shards ------------------------------------------------------------------

def test_selection():
    experiment = tiny_experiment()
    groups = [item[-1] for item in experiment.items]
    assert set(groups) == {"ambiguous", "confident"} and all(groups.count(g) == 3 for g in set(groups))
    assert groups == sorted(groups)  # ambiguous first
    for item in experiment.items:
        index, t1, t2, p1, p2, group = item
        assert p1 >= p2 and t1 != t2 and (p2 > 0.1) == (group == "ambiguous")
    assert [i[0] for i in experiment.items] == [i[0] for i in tiny_experiment().items]  # the seed decides
    with torch.no_grad():  # by hand: float64 probabilities, the first three of each group in the seed's order
        p = experiment.net(experiment.load(list(range(24)))).double().softmax(1).topk(2)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()
    for g, side in (("ambiguous", p.values[:, 1] > 0.1), ("confident", p.values[:, 1] < 0.1)):
        mine = [item for item in experiment.items if item[-1] == g]
        assert [i[0] for i in mine] == sorted([i for i in order if side[i]][:3])
        assert all(i[3:5] == tuple(p.values[i[0]].tolist()) for i in mine)  # the float64 probabilities, exactly
    picked = experiment.sample("ambiguous", 2)
    assert len(picked) == 2 and all(experiment.items[i][-1] == "ambiguous" for i in picked)
    assert picked == experiment.sample("ambiguous", 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="bogus"), "source must be one of 'birds', 'cub'"), (dict(methods=["GC"]), "methods.METHODS"),
    (dict(methods="gradcam"), "methods"), (dict(n_images=0), "n_images"), (dict(n_images=2.5), "n_images"),
    (dict(threshold=0.7), "threshold"), (dict(threshold="0.1"), "threshold"), (dict(batch_size=0), "batch_size"),
    (dict(forward_batch=-1), "forward_batch"), (dict(images=None), "together"),
    (dict(images=torch.zeros(4, 12, 12)), "images")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_experiment(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu():
    with pytest.raises(ValueError, match="device"):
        tiny_experiment(device="cuda")


def test_cub_without_data(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(DatasetNotFoundError, match="data_root"):
        run(Masking(source="cub", data_root=""), out)
    with pytest.raises(DatasetNotFoundError, match="CUB"):
        run(Masking(source="cub", data_root=str(tmp_path / "empty")), out)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetNotFoundError, match="CUB_200_2011"):
        run(Masking(source="cub", data_root=str(tmp_path / "bare")), out)
    assert not out.exists()  # nothing written


def test_cub_without_checkpoint(tmp_path):
    root = write_fixture("cub200", tmp_path / "data")
    out = tmp_path / "results"
    with pytest.raises(FileNotFoundError, match="checkpoints/vgg16_bn_cub.pt"):
        run(Masking(source="cub", data_root=str(root)), out)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        run(Masking(source="cub", data_root=str(root), checkpoint=str(tmp_path / "missing.pt")), out)
    assert not out.exists()


def test_the_profiles_settings_are_the_constructors():
    "Both profiles' runs take only Masking's arguments, with a known source; no profile argument."
    import inspect

    from contrastive_explanations.run import load_profile

    assert "profile" not in inspect.signature(Masking).parameters
    sources = {}
    for name, overrides in (("embedded", {}), ("paper", {"data_root": "/data"})):
        config = load_profile(name, overrides)
        (settings,) = config.run_settings("masking").values()
        assert settings["source"] in MASKING_SOURCES and isinstance(config.section("masking")["photos"], bool)
        sources[name] = settings["source"], settings["n_images"]
    assert sources == {"embedded": ("birds", 40), "paper": ("cub", None)}
    with pytest.raises(ValueError, match="source must be one of"):
        masking_source("photos")


def test_sharded_and_resumed_equals_one_run(tmp_path):
    one = run(tiny_experiment(), tmp_path / "one", progress=False)
    assert len(one) == len(tiny_experiment()) * 72
    experiment = tiny_experiment()
    assert run(experiment, tmp_path / "sharded", count=3, shards=[1], progress=False) is None  # interrupted
    first = (tmp_path / "sharded" / "shard-0001-of-0003.json").stat().st_mtime_ns
    sharded = run(tiny_experiment(), tmp_path / "sharded", count=3, progress=False)  # resumed
    assert (tmp_path / "sharded" / "shard-0001-of-0003.json").stat().st_mtime_ns == first  # not recomputed
    pd.testing.assert_frame_equal(one, sharded, check_exact=False, rtol=1e-9)


def test_figure_maps():
    net, x = tiny_net(), torch.rand(2, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pair = net(x).topk(2).indices
    maps = figure_maps(net, x, pair, "3")
    assert set(maps) == {*MASKING_METHODS, "fullgrad", "logits"}
    assert all(maps[name].shape == (2, 2, 2, 10, 10) for name in (*MASKING_METHODS, "fullgrad"))
    batched = FullGrad(net)(x, pair, list(EXPLANATIONS)).maps  # the stacked FullGrad equals one batched call
    assert torch.allclose(maps["fullgrad"], batched)
    assert torch.allclose(maps["gradcam"], METHODS["gradcam"](net, "3")(x, pair, list(EXPLANATIONS)).upsampled((10, 10)))


def test_selection_and_rows_run_without_tf32():
    "With TF32 switched on outside, every forward pass of the selection and of the rows sees it off (full_float32)."
    from contrastive_explanations.results import set_tf32

    net, seen = tiny_net(), []
    net.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.matmul.allow_tf32
                                                         or torch.backends.cudnn.allow_tf32))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(True)
    try:
        experiment = tiny_experiment(model=net)
        n_selection = len(seen)
        experiment.rows([0])
        assert n_selection > 0 and len(seen) > n_selection and not any(seen)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_selection_leaves_the_threshold_itself_out():
    "Black images give zero logits to a bias-free head: p2 = 0.25 exactly, in neither group at threshold 0.25."
    from contrastive_explanations.experiments.masking import _select_items

    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4, bias=False))
    torch.manual_seed(0)
    x = torch.rand(12, 3, 4, 4) * 3
    x[::2] = 0  # the even images: uniform probabilities
    items = _select_items(net.eval(), lambda i: x[i], 12, 0.25, None, 0, 5)
    assert {i[0] for i in items}.isdisjoint(range(0, 12, 2)) and len(items) == 6


# --- the prose: words chosen by the numbers -------------------------------------------------------------------------

def test_direction_counts_and_verdict():
    from contrastive_explanations.experiments.masking import REVIEW_LABEL, direction_counts, direction_verdict

    means = pd.DataFrame({"target": ["t1"] * 4 + ["t2"] * 4, "features": ["pos", "pos", "neg", "neg"] * 2,
                          "method": ["a", "b"] * 4, "ori": [0.5, 0.5, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2],
                          "wtd": [0.6, 0.4, 0.4, 0.4, 0.3, 0.3, 0.1, 0.3]}).set_index(["method", "target", "features"])
    counts = direction_counts(means)  # pos: wtd above ori; neg: wtd below ori
    assert counts.to_dict() == {("t1", "neg"): "2 of 2", ("t1", "pos"): "1 of 2", ("t2", "neg"): "1 of 2",
                                ("t2", "pos"): "2 of 2"}
    comparison = pd.DataFrame([counts, pd.Series({("t1", "pos"): "2 of 2", ("t1", "neg"): "0 of 2", ("t2", "pos"): "2 of 2",
                                                  ("t2", "neg"): "2 of 2"})], index=["ours", REVIEW_LABEL])
    text = direction_verdict(comparison, "ours")
    assert text.startswith("t1: keep-positive 1 of 2, keep-negative 2 of 2; t2: keep-positive 2 of 2")
    # a half is no majority: t1 pos (1 of 2) and t2 neg (1 of 2) differ from the review's 2 of 2; t1 neg (2 of 2 vs 0 of 2) too
    other = text.split("the other way from the review's in ")[1].split(", ")
    assert sorted(other) == ["t1 keep-negative", "t1 keep-positive", "t2 keep-negative"]
    comparison.loc["ours"] = comparison.loc[REVIEW_LABEL]
    assert text != direction_verdict(comparison, "ours") and direction_verdict(comparison, "ours").endswith(
        "the majority points the way the review's does")


def test_deltas_intervals_and_their_words():
    from contrastive_explanations.experiments.masking import (delta_text, excludes_zero, interval_reading,
                                                              paired_deltas)

    rows = pd.DataFrame({"group": "ambiguous", "variant": "ours", "target": "t1", "features": "pos",
                         "item": [0, 0, 1, 1, 2, 2], "ori": [0.5] * 6, "wtd": [0.6, 0.8, 0.5, 0.7, 0.55, 0.65]})
    got = paired_deltas(rows, "ambiguous").loc[("ours", "t1", "pos")]
    per_image = np.array([0.2, 0.1, 0.1])  # each image's mean of wtd - ori
    assert got["images"] == 3 and np.isclose(got["mean Δ"], per_image.mean())
    assert np.isclose(got["± 95%"], 1.96 * per_image.std(ddof=1) / np.sqrt(3))
    assert got["share of images Δ favours wtd"] == 1.0
    assert delta_text(got) == f"{per_image.mean():+.3f} ± {1.96 * per_image.std(ddof=1) / np.sqrt(3):.3f}"
    assert excludes_zero(got) and not excludes_zero(pd.Series({"mean Δ": 0.01, "± 95%": 0.02}))
    assert interval_reading({"pos": True, "neg": False}) == "only keep-positive's interval leaves out zero"
    assert interval_reading({"pos": True, "neg": True}) == "both intervals leave out zero"
    assert interval_reading({}) == "neither interval leaves out zero"


def test_table_facts_and_setting_texts():
    from contrastive_explanations.experiments.masking import differences_texts, setting_texts, table_facts

    rows = pd.DataFrame({"item": [0, 0, 1, 2, 3], "group": ["ambiguous", "ambiguous", "ambiguous", "confident", "confident"],
                         "p1_is_1": [0, 0, 1, 1, 0]})
    facts = table_facts(rows, (29, 4.2857), torch.tensor([0.1, 0.25, 0.5]))
    assert facts == {"n_ambiguous": "2", "n_confident": "2", "p1_is_1": "2 of 4", "blur_kernel": "29",
                     "blur_sigma": "4.29", "zero_colour": "(0.100, 0.250, 0.500)"}
    assert "explains 2 ambiguous and 7 confident images" in setting_texts("birds", 2, 7)["setting_note"]
    assert "(2 and 7 images per table against" in differences_texts("birds", 2, 7)["differs_model"]
    with pytest.raises(KeyError):
        setting_texts("photos", 1, 1)
