"""Mean, max and weighted contrasts side by side (nbs/09_contrasts.ipynb): every contrast from one backward pass
against explicit per-class loops, the centred-logit and weighted-max propositions, the measures, the bootstrap,
the choice of ambiguous images, bad input, the CUB source without data, the settings of both profiles, and
sharded + resumed runs."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from contrastive_explanations.methods import METHODS
from contrastive_explanations.methods.cam import GradCAM, LinearApproximation, XGradCAM
from contrastive_explanations.experiments.contrasts import (CONTRAST_METHODS, PAIRS, Contrasts, MeanVariantTarget,
                                                            check_methods, check_sources)
from contrastive_explanations.metrics.measures import (bootstrap_interval, cosine, interval_text, mask_share, positive_share,
                                              summarise)
from contrastive_explanations.data.sources import Source
from contrastive_explanations.experiments.base import ambiguous_items
from contrastive_explanations.data.datasets import DatasetNotFoundError, write_fixture
from contrastive_explanations.methods.explain import find_layer, leaf_output
from contrastive_explanations.results import load_results, run
from contrastive_explanations.run import load_profile

SETTINGS = settings(max_examples=8, deadline=None)


def tiny_net(seed: int, C: int, gap_head: bool = False) -> nn.Sequential:
    "A random double-precision CNN on 6 x 6 images; layer '3' is explained. The default head is spatially varying."
    torch.manual_seed(seed)
    body = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU()]
    head = ([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, C)] if gap_head else
            [nn.Conv2d(5, 3, 1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, C)])
    net = nn.Sequential(*body, *head).double().eval()
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.7)
            nn.init.normal_(m.bias, std=0.5)
    return net


def images(seed: int, B: int) -> torch.Tensor:
    return torch.rand(B, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_class_maps(net: nn.Module, x: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    "(B, C, h, w) maps of every class's logit by explicit loops, one backward pass per class; and the logits."
    with torch.enable_grad(), leaf_output(find_layer(net, "3")) as captured:
        y = net(x)
        A = captured[0]
        maps = []
        for s in range(y.shape[1]):
            G = torch.autograd.grad(y[:, s].sum(), A, retain_graph=True)[0]
            if method == "gradcam":
                w = G.mean((-2, -1), keepdim=True)
                maps.append((w * A).sum(1))
            elif method == "linear_approximation":
                maps.append((G * A).sum(1))
            else:  # xgradcam
                norm = A.abs().sum((-2, -1), keepdim=True)
                share = torch.where(norm > 0, A / norm.clamp_min(1e-300), 0.0)  # a dead channel has no weight
                w = (G * share).sum((-2, -1), keepdim=True)
                maps.append((w * A).sum(1))
    return torch.stack(maps, 1).detach(), y.detach()


METHOD = {name: METHODS[name] for name in ("gradcam", "linear_approximation", "xgradcam")}  # the activation methods


# ---------------------------------------------------------------------------------------------------------------
# Eq. eq-contrasts-mean, eq-contrasts-max, eq-contrasts-weighted, eq-contrasts-mean-c: one backward == explicit loops

@SETTINGS
@given(seed=st.integers(0, 10_000), C=st.integers(3, 9), B=st.integers(1, 3),
       method=st.sampled_from(sorted(METHOD)), factor=st.floats(0.01, 3.0))
def test_every_contrast_from_one_backward_equals_the_explicit_formula(seed, C, B, method, factor):
    net, x = tiny_net(seed, C), images(seed + 1, B)
    phi, y = per_class_maps(net, x, method)
    t = torch.randint(C, (B,), generator=torch.Generator().manual_seed(seed))
    rows = torch.arange(B)
    targets = ["original", "mean", "max", "weighted", MeanVariantTarget("printed"), MeanVariantTarget("review"),
               MeanVariantTarget(factor)]
    e = METHOD[method](net, layer="3")(x, t, targets)
    got = {name: e.maps[:, 0, i] for i, name in enumerate(e.targets)}
    phi_t, others = phi[rows, t], phi.sum(1) - phi[rows, t]
    # explicit formulas, written out class by class
    rival = torch.tensor([max((s for s in range(C) if s != int(t[b])), key=lambda s: float(y[b, s])) for b in range(B)])
    ey = torch.exp(y - y.max(1, keepdim=True).values)
    p = ey / ey.sum(1, keepdim=True)
    alpha = ey.clone()
    alpha[rows, t] = 0
    alpha = alpha / alpha.sum(1, keepdim=True)
    pt = p[rows, t][:, None, None]
    expected = {"original": phi_t, "mean": phi_t - others / (C - 1), "max": phi_t - phi[rows, rival],
                "weighted": pt * (1 - pt) * (phi_t - torch.einsum("bs,bshw->bhw", alpha, phi)),
                "mean_printed": phi_t - others, "mean_review": phi_t - others / C,
                f"mean_{factor}": phi_t - factor * others}
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-11, msg=name)


@SETTINGS
@given(seed=st.integers(0, 10_000), C=st.integers(3, 9))
def test_mean_contrast_explains_the_centred_logit(seed, C):
    "Prop. prop-mean-centred: mean = C/(C-1) (phi_t - mean phi); with centred class vectors, mean = C/(C-1) phi_t."
    net, x = tiny_net(seed, C), images(seed, 3)
    phi, _ = per_class_maps(net, x, "gradcam")
    t = torch.tensor([0, C - 1, 1])
    e = GradCAM(net, layer="3")(x, t, ["original", "mean"])
    torch.testing.assert_close(e.map("mean"), C / (C - 1) * (phi[torch.arange(3), t] - phi.mean(1)))
    centred = tiny_net(seed, C)
    with torch.no_grad():
        centred[-1].weight -= centred[-1].weight.mean(0)
    e = GradCAM(centred, layer="3")(x, t, ["original", "mean", MeanVariantTarget("printed")])
    torch.testing.assert_close(e.map("mean"), C / (C - 1) * e.map("original"))
    torch.testing.assert_close(e.map("mean_printed"), 2 * e.map("original"))
    assert torch.allclose(cosine(e.map("mean"), e.map("original")), torch.ones(3, dtype=torch.float64))
    with torch.no_grad():  # the logits moved by the same amount: the probabilities did not change
        torch.testing.assert_close(centred(x).softmax(1), net(x).softmax(1))


@SETTINGS
@given(seed=st.integers(0, 10_000), C=st.integers(3, 9), B=st.integers(1, 4))
def test_weighted_minus_max_is_bounded_by_the_other_rivals_weight(seed, C, B):
    "Eq. eq-contrasts-weighted-max."
    net, x = tiny_net(seed, C), images(seed, B)
    phi, y = per_class_maps(net, x, "gradcam")
    t = torch.randint(C, (B,), generator=torch.Generator().manual_seed(seed + 7))
    e = GradCAM(net, layer="3")(x, t, ["weighted", "max"])
    p = y.softmax(1)
    rows = torch.arange(B)
    pt = p[rows, t]
    masked = y.clone()
    masked[rows, t] = -math.inf
    alpha_star = masked.softmax(1).amax(1)
    weighted = e.map("weighted") / (pt * (1 - pt))[:, None, None]
    gap = (weighted - e.map("max")).flatten(1).norm(dim=1)
    norms = phi.flatten(2).norm(dim=2)
    norms[rows, t] = 0
    assert (gap <= 2 * (1 - alpha_star) * norms.amax(1) + 1e-10).all()


def test_the_three_activation_methods_are_cam_on_a_pooled_linear_head():
    "Eq. eq-contrasts-cam: GradCAM, Linear Approximation and XGradCAM (A >= 0) coincide with the CAM."
    C = 5
    net, x = tiny_net(3, C, gap_head=True), images(4, 2)
    cam = torch.einsum("sk,bkhw->bshw", net[-1].weight, net[:4](x)) / 36
    every = torch.arange(C).expand(2, C)
    for method in METHOD.values():
        torch.testing.assert_close(method(net, layer="3")(x, every, "original").maps[:, :, 0], cam)
    plain = tiny_net(3, C)  # a spatially varying head: the three differ
    maps = [m(plain, layer="3")(x, every, "original").maps for m in METHOD.values()]
    assert not torch.allclose(maps[0], maps[1]) and not torch.allclose(maps[0], maps[2])


def test_mean_variant_target_refuses_unknown_factors():
    for bad in ("mean", "bogus", 0, -1.0, math.inf, True, None):
        with pytest.raises(ValueError, match="factor"):
            MeanVariantTarget(bad)
    assert MeanVariantTarget("review").name == "mean_review" and repr(MeanVariantTarget(0.5)) == "MeanVariantTarget(0.5)"


# ---------------------------------------------------------------------------------------------------------------
# Eq. eq-contrasts-cosine, eq-contrasts-positive-share, eq-contrasts-mask-share

def test_measures_on_hand_made_maps():
    a = torch.tensor([[3.0, 0.0], [-1.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert math.isclose(float(cosine(a, b)), 3 / (math.sqrt(14) * math.sqrt(2)), rel_tol=1e-12)
    assert math.isclose(float(positive_share(a)), 5 / 6, rel_tol=1e-12)
    mask = torch.tensor([[False, True], [True, True]])
    assert math.isclose(float(mask_share(a, mask)), 2 / 5, rel_tol=1e-12)
    zero = torch.zeros(2, 2)
    assert cosine(a, zero).isnan() and positive_share(zero).isnan() and mask_share(-a.abs(), mask).isnan()
    batch = torch.stack([a, b, -a])  # (3, 2, 2): one value per map
    assert positive_share(batch).shape == (3,) and mask_share(batch, mask).shape == (3,)
    assert math.isclose(float(mask_share(torch.ones(4, 4), torch.eye(4, dtype=torch.bool))), 0.25)


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_measures_ignore_a_positive_scale(seed, scale):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 4, generator=g) < 0.5
    torch.testing.assert_close(cosine(scale * a, b), cosine(a, b))
    torch.testing.assert_close(cosine(a, b), cosine(b, a))
    torch.testing.assert_close(cosine(a, scale * a), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(positive_share(scale * a), positive_share(a))
    torch.testing.assert_close(positive_share(a) + positive_share(-a), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(mask_share(scale * a, mask), mask_share(a, mask))
    share = mask_share(a, mask)
    assert ((share >= 0) & (share <= 1)).all() and (cosine(a, b).abs() <= 1 + 1e-12).all()


def test_measures_refuse_bad_input():
    a = torch.rand(2, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        cosine(a, torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cosine(a.tolist(), a)
    with pytest.raises(ValueError, match="floating maps"):
        positive_share(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(\.\.\., h, w\)"):
        positive_share(torch.rand(5))
    with pytest.raises(TypeError, match="bool"):
        mask_share(a, torch.ones(3, 3))
    with pytest.raises(ValueError, match="upsample"):
        mask_share(a, torch.ones(6, 6, dtype=torch.bool))


def test_bootstrap_interval_and_summaries():
    rng = np.random.default_rng(0)
    v = rng.normal(2.0, 1.0, 200)
    m, lo, hi, n = bootstrap_interval(v, seed=1)
    assert n == 200 and lo < m < hi and lo < 2.0 < hi and m == np.median(v)
    assert bootstrap_interval(v, seed=1) == (m, lo, hi, n)  # seeded
    assert bootstrap_interval(v, "mean")[0] == pytest.approx(v.mean())
    assert bootstrap_interval([np.nan, 0.3, 0.3, np.nan]) == (0.3, 0.3, 0.3, 2)
    one = bootstrap_interval([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and one[3] == 1 and math.isnan(bootstrap_interval([])[0])
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_interval(v, "mode")
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(v, confidence=95)
    table = pd.DataFrame({"g": ["a", "b"] * 30, "x": np.arange(60.0)})
    s = summarise(table, ["x"], ["g"])
    assert list(s.g) == ["a", "b"] and list(s.n) == [30, 30] and s["median"].tolist() == [29.0, 30.0]
    with pytest.raises(ValueError, match="no column 'y'"):
        summarise(table, ["y"])
    assert interval_text(0.5, 0.4, 0.6) == "0.50 [0.40, 0.60]" and interval_text(math.nan, 0, 0) == "n/a"


# ---------------------------------------------------------------------------------------------------------------
# Choosing ambiguous images

@SETTINGS
@given(seed=st.integers(0, 10_000), threshold=st.floats(0.0, 0.3), n=st.one_of(st.none(), st.integers(1, 30)),
       rank=st.integers(1, 4))
def test_ambiguous_items_match_brute_force(seed, threshold, n, rank):
    net = tiny_net(seed % 50, 6)
    x = images(seed, 30)
    ds = TensorDataset(x, torch.zeros(30, dtype=torch.long))
    with torch.no_grad():
        kth = net(x).softmax(1).topk(rank, dim=1).values[:, -1]
    qualifying = (kth > threshold).nonzero()[:, 0].tolist()
    got = ambiguous_items(net, ds, rank, threshold, n, seed, batch_size=7)
    assert got == sorted(got) and set(got) <= set(qualifying)
    assert len(got) == (len(qualifying) if n is None else min(n, len(qualifying)))
    assert got == ambiguous_items(net, ds, rank, threshold, n, seed, batch_size=7)


def test_ambiguous_items_refuse_bad_input():
    net, ds = tiny_net(0, 4), TensorDataset(images(0, 5), torch.zeros(5, dtype=torch.long))
    for kwargs, match in (({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"threshold": 1.0}, "threshold"),
                          ({"n": 0}, "n=0"), ({"rank": 5}, "only 4 classes")):
        with pytest.raises(ValueError, match=match):
            ambiguous_items(net, ds, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The experiment: bad input, the CUB source without data, the profiles' settings, rows, shards

class TinyContrasts(Contrasts):
    "The experiment on a tiny random CNN and 10 random images: every image qualifies (threshold 0)."
    fail_at: int | None = None

    def build_sources(self):
        net = tiny_net(self.seed, 6)
        ds = TensorDataset(images(self.seed, 10), torch.arange(10) % 6)
        return [Source("tiny", "tiny_net", net, ds, [f"class {c}" for c in range(6)], layer="3",
                       sample=self.n_images or None)]

    def rows(self, indices):
        if self.fail_at is not None and self.fail_at in indices:
            raise KeyboardInterrupt(f"interrupted at item {self.fail_at}")
        return super().rows(indices)


def tiny_experiment(**kwargs) -> TinyContrasts:
    return TinyContrasts(n_images=0, threshold=0.0, batch_size=3, methods=("gradcam", "xgradcam"), **kwargs)


def test_contrasts_refuse_bad_parameters_before_loading_anything():
    for kwargs, match in (({"sources": ["photos", "imagenet"]}, "unknown source 'imagenet'.*photos, birds, cub"),
                          ({"sources": []}, "sources is empty"), ({"sources": ["birds", "birds"]}, "twice"),
                          ({"methods": ("gradcam", "saliency")}, "unknown method 'saliency'"),
                          ({"methods": ("fullgrad",)}, "unknown method 'fullgrad'"),
                          ({"methods": ()}, "empty"), ({"n_images": -1}, "n_images must be an int >= 1"),
                          ({"n_images": 2.5}, "n_images"), ({"rank": 1}, "rank must be an int >= 2")):
        with pytest.raises(ValueError, match=match) as error:
            Contrasts(**kwargs)
        assert "\n" not in str(error.value) and "e.g." in str(error.value)  # one line, with a fix
    with pytest.raises(TypeError, match="profile"):  # the profile is not an argument: its settings are
        Contrasts(profile="paper")


def test_methods_are_the_registry_s():
    assert set(CONTRAST_METHODS) <= set(METHODS) and check_methods("xgradcam") == ("xgradcam",)
    assert check_sources(("cub",)) == ("cub",)


def test_cub_source_without_data_or_checkpoint_says_what_is_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="CUB-200-2011"):
        Contrasts(sources=["cub"], data_root="")
    with pytest.raises(DatasetNotFoundError, match="CUB_200_2011"):
        Contrasts(sources=["cub"], data_root=str(tmp_path))
    root = write_fixture("cub200", tmp_path / "data", n_classes=2, per_class=2)
    with pytest.raises(FileNotFoundError, match=r"checkpoints/vgg16_bn_cub\.pt"):
        Contrasts(sources=["cub"], data_root=str(root))
    with pytest.raises(FileNotFoundError, match="elsewhere.pt"):
        Contrasts(sources=["cub"], data_root=str(root), checkpoint=str(tmp_path / "elsewhere.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_the_profiles_settings_name_the_sources_and_methods():
    "What differed by profile is in params/<profile>.yaml, as arguments of Contrasts."
    embedded = load_profile("embedded").run_settings("contrasts")["main"]
    paper = load_profile("paper", {"data_root": "/data"}).run_settings("contrasts")["main"]
    assert embedded["sources"] == ["photos", "birds"] and embedded["methods"] == ["gradcam"]
    assert paper["sources"] == ["cub"] and paper["n_images"] is None
    assert paper["methods"] == ["gradcam", "xgradcam", "linear_approximation"]
    assert "profile" not in embedded and "profile" not in paper


def test_rows_agree_with_the_maps_they_describe():
    exp = tiny_experiment()
    assert len(exp) == 10 and exp.params["methods"] == ["gradcam", "xgradcam"] and exp.params["sources"] == ["tiny"]
    assert exp.params["n_images"] is None and tiny_experiment().params == TinyContrasts(
        n_images=None, threshold=0.0, batch_size=3, methods=("gradcam", "xgradcam")).params  # 0 and None: all
    rows = pd.DataFrame(exp.rows(list(range(len(exp)))))
    assert len(rows) == 10 * 3 * 2 and set(rows["rank"]) == {1, 2, 3}
    assert (rows.groupby(["item", "method"]).p.apply(lambda p: p.is_monotonic_decreasing)).all()
    a = exp.figure_arrays("tiny", 4, "xgradcam", targets=("original", "mean", "max", "weighted"))
    assert a["maps"].shape == (4, 3, 4, 6, 6) and a["images"].dtype == np.uint8
    maps = torch.from_numpy(a["maps"])
    first = rows[(rows.item == 0) & (rows.method == "xgradcam")].sort_values("rank")
    for col in ("mean_vs_original_cosine", "weighted_vs_max_cosine"):
        i, j = (["original", "mean", "max", "weighted"].index(t) for t in PAIRS[col])
        np.testing.assert_allclose(first[col], cosine(maps[0, :, i], maps[0, :, j]).numpy(), rtol=1e-5)
    np.testing.assert_allclose(first.positive_share_max, positive_share(maps[0, :, 2]).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown target 'median'"):
        exp.figure_arrays("tiny", 2, targets=("original", "median"))
    with pytest.raises(ValueError, match="no source 'birds'"):
        exp.figure_arrays("birds")
    with pytest.raises(ValueError, match="method 'linear_approximation' was not run"):
        exp.figure_arrays("tiny", 2, "linear_approximation")


def test_sharded_and_resumed_run_equals_a_single_run(tmp_path):
    one = run(tiny_experiment(), tmp_path / "one", progress=False)
    failing = tiny_experiment()
    failing.fail_at = 7
    with pytest.raises(KeyboardInterrupt):
        run(failing, tmp_path / "sharded", count=3, progress=False)
    done = sorted(p.name for p in (tmp_path / "sharded").glob("shard-*.json"))
    assert done == ["shard-0000-of-0003.json", "shard-0001-of-0003.json"]  # item 7's shard (6..9) was not written
    assert run(tiny_experiment(), tmp_path / "partial", count=3, shards=[2], progress=False) is None  # not merged yet
    resumed = run(tiny_experiment(), tmp_path / "sharded", count=3, progress=False, on_stale="recompute")
    pd.testing.assert_frame_equal(one, resumed, check_exact=False, rtol=1e-6)
    table, prov = load_results(tmp_path / "sharded")
    assert prov["experiment"] == "contrasts" and prov["shards"] == 3 and len(table) == 60


# --- the words of the prose: each verdict follows its numbers across the stated thresholds ---

def test_contrast_words_follow_the_thresholds():
    from contrastive_explanations.experiments.contrasts import CLOSE, FAR, SHARES, nearness, share_word
    assert (nearness(CLOSE), nearness(CLOSE - 1e-9), nearness(FAR), nearness(FAR - 1e-9)) == (
        "close to", "neither close to nor far from", "neither close to nor far from", "far from")
    bars = [bar for bar, _ in SHARES[:-1]]
    assert [share_word(b) for b in bars] == [w for _, w in SHARES[:-1]]
    assert [share_word(b - 1e-9) for b in bars] == [w for _, w in SHARES[1:]]  # just below a bar: the next word


def test_contrast_sentences_follow_the_medians():
    from contrastive_explanations.experiments.contrasts import (CLOSE, FAR, RELATED, lede_text, observed, rival_reading,
                                                                wording_text)
    both_close = observed({"photos": CLOSE, "birds": 0.99}, "A", "B")
    assert both_close == "A is close to B (median cosine 0.90 on the packaged photographs and 0.99 on the generated birds)"
    split = observed({"photos": CLOSE, "birds": FAR - 0.01}, "A", "B")
    assert "close to B on the packaged photographs (0.90)" in split and "far from B on the generated birds (0.59)" in split
    assert "the weighted contrast is far from the max contrast" in lede_text({"birds": 0.95}, {"birds": 0.1})
    assert "the weighted contrast is close to the max contrast" in lede_text({"birds": 0.95}, {"birds": 0.95})
    assert rival_reading({"birds": RELATED}).startswith("the weighted map comes closer")
    assert rival_reading({"birds": -RELATED}).startswith("the weighted map moves away")
    mixed = rival_reading({"photos": RELATED - 0.01, "birds": RELATED})
    assert mixed.startswith("on the packaged photographs the similarity shows no") and "on the generated birds the weighted map comes closer" in mixed
    assert f"at least {CLOSE} is close, one below {FAR} far" in wording_text()
