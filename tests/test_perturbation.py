"""Input-space perturbation (nbs/07_perturbation.ipynb): the corrected iteration's bounds and step, the batched
sources, the first-order ordering, the experiment's errors, and sharded + resumed runs, on tiny networks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from contrastive_explanations.methods.targets import WeightedLogTarget, WeightedTarget
from contrastive_explanations.data.datasets import DatasetNotFoundError
from torch.utils.data import TensorDataset

from contrastive_explanations.methods.targets import REVIEW_PT_TOLERANCE, review_pt_error
from contrastive_explanations.experiments.perturbation import (EPSILONS, N_TOTS, NETWORKS,
                                                               REVIEW_SOURCE, RUN_SOURCES, SOURCES, Perturbation,
                                                               check_epsilons, check_n_tots, image_subset, perturb,
                                                               perturbation_bounds, perturbation_step, sign_targets,
                                                               step_size)
from contrastive_explanations.data.sources import Source, load_batch
from contrastive_explanations.experiments.base import resolve_device
from contrastive_explanations.results import load_results, run
from contrastive_explanations.run import main


def tiny_net(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, classes)).double().eval()
    net[1].running_mean.uniform_(-0.2, 0.2)
    return net


def tiny_source(data_root: str = "", seed: int = 0, download: bool = False, device: str = "cpu",
                output_root: str = "", n: int = 11, labels: bool = True) -> Source:
    "A random double-precision net and n random 8x8 images: a stand-in for a network of NETWORKS and its data."
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x[0, 0] = 0.0  # pixels at the ends of the range
    x[1, 1] = 1.0
    y = torch.randint(5, (n,), generator=g)
    return Source("tiny", "tiny", tiny_net(seed).to(device), TensorDataset(x, y), [str(c) for c in range(5)],
                  labelled=labels, item_names=lambda i: f"img {i}")


def tiny_setup(seed: int = 0, n: int = 11):
    "The tiny network and its images: (net, x (n, 3, 8, 8), labels (n,))."
    source = tiny_source(seed=seed, n=n)
    x, y = load_batch(source, range(n))
    return source.model, x, y


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(NETWORKS, "tiny", tiny_source)
    monkeypatch.setitem(NETWORKS, "tiny_unlabelled", lambda **kw: tiny_source(**kw, n=7, labels=False))


# Eq. eq-perturbation-step / eq-perturbation-bounds / Prop. prop-perturbation-box: any gradient, any x0, eps, n_tot
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(1e-4, 1.0), n_tot=st.integers(1, 12),
       edge=st.sampled_from([0.0, 1.0, 0.5]))
def test_iterates_stay_in_the_box_around_the_clean_image(seed, eps, n_tot, edge):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64)
    x0[0, 0, :2] = edge
    lower, upper = perturbation_bounds(x0, eps)
    assert torch.equal(lower, (x0 - eps).clamp(min=0)) and torch.equal(upper, (x0 + eps).clamp(max=1))
    alpha = step_size(eps, n_tot)
    x = x0.clone()
    for n in range(n_tot):
        x = perturbation_step(x, torch.randn(x.shape, generator=g, dtype=torch.float64), alpha, lower, upper)
        assert (x >= lower).all() and (x <= upper).all() and (x >= 0).all() and (x <= 1).all()
        assert ((x - x0).abs() <= (n + 1) * alpha + 1e-15).all()  # + rounding of x0 + alpha (ulp of 1: 2e-16)
    assert (x - x0).abs().max() <= eps + 1e-15


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), eps=st.floats(1e-4, 0.5), n_tot=st.integers(1, 4))
def test_perturb_stays_in_the_box_on_a_network(seed, eps, n_tot):
    net, x0, labels = tiny_setup(seed=seed, n=3)
    xp = perturb(net, x0, labels, SOURCES, eps, n_tot)  # (3, 4, 1, 3, 8, 8)
    lower, upper = perturbation_bounds(x0, eps)
    assert (xp >= lower[:, None, None]).all() and (xp <= upper[:, None, None]).all()


# Eq. eq-perturbation-alpha: alpha = eps / n_tot; unclamped steps of a constant sign add up to exactly eps
@pytest.mark.parametrize("n_tot", N_TOTS)
def test_step_size_splits_the_budget(n_tot):
    assert step_size(3e-3, n_tot) == 3e-3 / n_tot
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(-1, 1, 36, dtype=torch.float64).view(3, 12) + 0.05)  # no zero weights
    x0 = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    xp = perturb(net, x0, 0, "original", 3e-3, n_tot)[0, 0, 0]
    assert torch.allclose(xp - x0[0], 3e-3 * net[1].weight[0].sign().view(3, 2, 2), rtol=0, atol=1e-15)


def test_batched_sources_and_budgets_equal_separate_runs():
    net, x0, t = tiny_setup(n=5)
    net.train()
    batched = perturb(net, x0, t, SOURCES, EPSILONS, 3)
    assert batched.shape == (5, 4, 2, 3, 8, 8)
    for s, source in enumerate(SOURCES):
        for e, eps in enumerate(EPSILONS):
            alone = perturb(net, x0, t, [source], eps, 3)[:, 0, 0]
            assert torch.allclose(batched[:, s, e], alone, rtol=0, atol=1e-15), (source, eps)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())


def hand_linear() -> nn.Module:
    "y = W vec(x) + b with hand-set weights: 3 classes on 3x2x2 images."
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    w = torch.tensor([[1.0, -2, 0.5, 1, 0, 3, -1, 1, 2, -0.5, 1, 1],
                      [0.5, 1, -1, 2, 1, -1, 0.5, 0.5, -2, 1, 0, -1],
                      [-1, 0.5, 2, -1, 1, 1, 1, -1, 0.5, 2, -1, 0]], dtype=torch.float64)
    with torch.no_grad():
        net[1].weight.copy_(w)
        net[1].bias.copy_(torch.tensor([0.2, 0.4, -0.1]))
    return net


# Eq. eq-sign-first-order and Prop. prop-perturbation-order on a hand-built linear model
def test_weighted_sign_step_raises_p_t_most_to_first_order():
    net = hand_linear()
    x0 = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    eps, t = 1e-4, 0
    xp = perturb(net, x0, t, SOURCES, eps, 1)[0, :, 0]  # (4, 3, 2, 2)
    with torch.no_grad():
        p0, y0 = net(x0).softmax(1)[0, t], net(x0)[0, t]
        d_pt = net(xp).softmax(1)[:, t] - p0
        d_yt = net(xp)[:, t] - y0
    xg = x0.clone().requires_grad_(True)
    (grad_pt,) = torch.autograd.grad(net(xg).softmax(1)[0, t], xg)
    weighted, original = SOURCES.index("weighted"), SOURCES.index("original")
    assert d_pt[weighted] > 0
    assert math.isclose(d_pt[weighted], eps * grad_pt.abs().sum(), rel_tol=1e-3)  # alpha ||grad p_t||_1
    assert (d_pt[weighted] >= d_pt - 1e-12).all() and d_pt[weighted] > d_pt[original]
    assert (d_yt[original] >= d_yt - 1e-12).all() and d_yt[original] > d_yt[weighted]
    assert math.isclose(d_yt[original], eps * float(net[1].weight[t].detach().abs().sum()), rel_tol=1e-9)  # exact: y_t is linear


# Eq. eq-sign-log: the weighted source steps along log p_t, whose sign equals p_t's without fp32 underflow
def test_weighted_sign_is_the_sign_of_log_p_t():
    names, targets = sign_targets(SOURCES)
    assert names == SOURCES and targets[SOURCES.index("weighted")].name == "weighted_log"
    net = hand_linear()
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    t = torch.tensor([0, 1, 2, 0])
    (g_p,) = torch.autograd.grad(WeightedTarget()(net(x), t).sum(), x)
    (g_log,) = torch.autograd.grad(WeightedLogTarget()(net(x), t).sum(), x)
    assert torch.equal(g_p.sign(), g_log.sign()) and (g_p != 0).all()
    logits = torch.tensor([[30.0, 0.0, 1.0]], requires_grad=True)  # p_t rounds to 1 in float32
    (g32,) = torch.autograd.grad(WeightedTarget()(logits, 0).sum(), logits)
    (glog32,) = torch.autograd.grad(WeightedLogTarget()(logits, 0).sum(), logits)
    assert torch.equal(g32, torch.zeros_like(g32)) and (glog32[0, 0] > 0)


@pytest.mark.parametrize("eps, error, words", [
    (0.0, ValueError, "(0, 1]"), (-1e-3, ValueError, "(0, 1]"), (2.0, ValueError, "(0, 1]"),
    (float("nan"), ValueError, "(0, 1]"), ("3e-3", TypeError, "real number"), (True, TypeError, "real number"),
    ([], ValueError, "epsilons is empty"), ((1e-3, 1e-3), ValueError, "repeated")])
def test_bad_epsilons(eps, error, words):
    with pytest.raises(error, match="eps") as e:
        check_epsilons(eps)
    assert words in str(e.value) and "pass" in str(e.value) or "once" in str(e.value)


@pytest.mark.parametrize("n_tot, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError),
                                          ("10", TypeError)])
def test_bad_n_tot(n_tot, error):
    with pytest.raises(error, match=r"n_tot.*pass e\.g\. n_tot=10"):
        check_n_tots(n_tot)
    net, x, _ = tiny_setup(n=2)
    with pytest.raises(error, match="n_tot"):
        perturb(net, x, 0, "weighted", 1e-3, n_tot)


@pytest.mark.parametrize("sources, error, words", [
    ("softmax", ValueError, "unknown source 'softmax'"), ([], ValueError, "sources is empty"),
    (["original", "original"], ValueError, "repeated"), ([3], TypeError, "sources must hold")])
def test_bad_sources(sources, error, words):
    with pytest.raises(error, match=words):
        sign_targets(sources)


def test_bad_images_and_classes():
    net, x, _ = tiny_setup(n=2)
    with pytest.raises(ValueError, match=r"pixel values in \[0, 1\].*before normalisation"):
        perturb(net, x * 2 - 1, 0, "original", 1e-3, 1)
    with pytest.raises(ValueError, match="class indices must lie in"):
        perturb(net, x, 7, "original", 1e-3, 1)


def test_experiment_checks_its_settings_before_loading_anything(monkeypatch):
    def fail(**kwargs):
        raise AssertionError("the setup ran before the settings were checked")
    monkeypatch.setitem(NETWORKS, "tiny", fail)
    for kwargs, error, words in [({"model": "resnet99"}, ValueError, "unknown model 'resnet99'"),
                                 ({"n_images": 0}, ValueError, "n_images"),
                                 ({"batch_size": 0}, ValueError, "batch_size"),
                                 ({"epsilons": (0.1, 5)}, ValueError, "eps must lie in"),
                                 ({"n_tots": (1, 0)}, ValueError, "n_tot must be at least 1"),
                                 ({"sources": ("weighted", "softmax")}, ValueError, "unknown source"),
                                 ({"sources": (WeightedTarget(),)}, TypeError, "must be names"),
                                 ({"profile": "paper"}, TypeError, "profile")]:  # settings come from the yaml
        with pytest.raises(error, match=words):
            Perturbation(**{"model": "tiny", **kwargs})


def test_missing_imagenet_root_fails_before_any_file_is_written(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("CONTRASTIVE_EXPLANATIONS_RESULTS", str(results))
    empty = tmp_path / "imagenet"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"ImageNet at .*missing the folder val/"):
        Perturbation("resnet18", data_root=str(empty), download=True)
    with pytest.raises(DatasetNotFoundError, match="ImageNet needs a data root"):
        Perturbation("resnet18", data_root="")
    out = tmp_path / "cli"
    code = main(["perturbation", "--profile", "paper", "--param", f"data_root={empty}", "--run", "vgg16",
                 "--param", "device=cpu", "--out", str(out)])
    assert code == 2
    assert not results.exists() and not out.exists() and list(empty.iterdir()) == []


def test_device_without_gpu():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="no GPU: pass device='cpu'"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_image_subset():
    assert np.array_equal(image_subset(5, None, 0), np.arange(5)) and np.array_equal(image_subset(5, 9, 0), np.arange(5))
    a = image_subset(1000, 20, 3)
    assert len(np.unique(a)) == 20 and np.all(np.diff(a) > 0) and np.array_equal(a, image_subset(1000, 20, 3))
    assert not np.array_equal(a, image_subset(1000, 20, 4))


def test_the_reviews_p_t_steps_along_the_rivals_only_where_p_t_rounds_to_one():
    "softmax(logits)[t] in float32 (REVIEW_SOURCE): where p_t = 1 its step is the sign of -sum_s p_s grad y_s."
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4, bias=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(4, 12, generator=g))
        net[1].weight[0] += 8.0  # class 0 far ahead on any image in [0, 1]
    x = torch.rand(1, 3, 2, 2, generator=g)
    with torch.no_grad():
        p = net(x).softmax(1)
    assert p[0, 0] == 1.0  # saturated in float32
    out = perturb(net, x, 0, ["weighted", REVIEW_SOURCE], 3e-3, n_tot=1)[0, :, 0]  # (2, 3, 2, 2)
    W = net[1].weight.detach()
    rivals_only = -(p[0, 1:, None] * W[1:]).sum(0).sign().view(3, 2, 2)
    log_pt = (W[0] - (p[0, 1:, None] / p[0, 1:].sum() * W[1:]).sum(0)).sign().view(3, 2, 2)  # grad log p_t's sign
    step = lambda d: torch.where(d.abs() > 0, d.sign(), torch.zeros_like(d))
    inside = (x[0] > 3e-3) & (x[0] < 1 - 3e-3)  # pixels the clamp to [0, 1] leaves free
    assert torch.equal(step(out[1] - x[0])[inside], rivals_only[inside])
    assert torch.equal(step(out[0] - x[0])[inside], log_pt[inside])
    assert not torch.equal(rivals_only[inside], log_pt[inside])


@pytest.mark.parametrize("classes", [2, 7])
def test_review_pt_error_against_float64(classes):
    "The review's float32 coefficient p_t (1 - p_t) against float64 softmax: small at small gaps, the band, -1 at p_t = 1."
    g = torch.Generator().manual_seed(classes)
    gaps = torch.tensor([0.5, 3.0, 8.0, 15.5, 17.5, 40.0], dtype=torch.float64)
    rivals = torch.randn(len(gaps), classes - 1, generator=g, dtype=torch.float64)
    y = torch.cat([gaps[:, None] + torch.logsumexp(rivals, 1, keepdim=True), rivals], 1)  # L = the gap exactly
    error = review_pt_error(y.float(), 0)
    p64 = torch.softmax(y.float().double(), 1)[:, 0]  # the same float32 logits, in float64 (1 - p_t: fine at these gaps)
    y32 = y.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.softmax(y32, 1)[:, 0].sum(), y32)
    assert torch.allclose(error[:4], grad[:4, 0].double() / (p64[:4] * (1 - p64[:4])) - 1, rtol=1e-6, atol=1e-7)
    assert (error[:2].abs() < 1e-5).all() and error[3].abs() > REVIEW_PT_TOLERANCE  # rounding; the band at 15.5
    assert (error[4:] == -1).all()  # p_t = 1 in float32: the coefficient is 0
    assert review_pt_error(y, 0)[:5].abs().max() < 1e-6  # float64 logits: the same gaps are rounding
    with pytest.raises(ValueError, match="at least two classes"):
        review_pt_error(torch.zeros(3, 1), 0)


def test_rows_record_every_setting_per_image(tiny):
    exp = Perturbation("tiny", n_images=4, batch_size=3)
    rows = pd.DataFrame(exp.rows([0, 1, 2, 3]))
    assert len(rows) == 4 * len(EPSILONS) * len(N_TOTS) * len(RUN_SOURCES) and RUN_SOURCES[:4] == SOURCES
    assert set(rows.groupby("item").size()) == {len(EPSILONS) * len(N_TOTS) * len(RUN_SOURCES)}
    assert (rows["linf"] <= rows["eps"] * (1 + 1e-12)).all()  # Prop. prop-perturbation-box
    assert set(rows["source"]) == set(RUN_SOURCES) and set(rows["n_tot"]) == set(N_TOTS)
    net, x, labels = tiny_setup()
    with torch.no_grad():
        p = net(x[exp.index[:4]]).softmax(1)
    first = rows.drop_duplicates("item")
    assert first["t"].tolist() == labels[exp.index[:4]].tolist()
    assert first["image"].tolist() == [f"img {i}" for i in exp.index[:4]]  # the source's item names
    assert np.allclose(first["clean_pt"], p[torch.arange(4), labels[exp.index[:4]]].numpy())
    assert np.allclose(first["review_pt_error"], 0, atol=1e-9)  # float64 and no confident image: no band
    assert rows.groupby("item")["review_pt_error"].nunique().eq(1).all()  # one value per image: its clean logits'
    unlabelled = pd.DataFrame(Perturbation("tiny_unlabelled").rows([0, 1, 2]))
    assert (unlabelled["clean_correct"] == 1).all()  # t = the clean prediction


def test_sharded_and_resumed_equals_one_run(tiny, tmp_path):
    one = run(Perturbation("tiny", batch_size=4), tmp_path / "one", progress=False)
    interrupted = Perturbation("tiny", batch_size=2)
    rows = interrupted.rows

    def stop_at_item_seven(indices):
        if 7 in indices:
            raise KeyboardInterrupt("interrupted")
        return rows(indices)

    interrupted.rows = stop_at_item_seven
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, tmp_path / "sharded", count=3, progress=False)
    assert len(list((tmp_path / "sharded").glob("shard-*.json"))) == 2
    resumed = run(Perturbation("tiny", batch_size=2), tmp_path / "sharded", count=3, progress=False)
    pd.testing.assert_frame_equal(one, resumed, check_exact=False, rtol=1e-12)
    table, provenance = load_results(tmp_path / "sharded")
    assert provenance["experiment"] == "perturbation/tiny" and len(table) == 11 * 30
    assert provenance["params"]["epsilons"] == list(EPSILONS) and provenance["params"]["sources"] == list(RUN_SOURCES)
    assert "profile" not in provenance["params"]


def test_the_profiles_settings_are_the_constructors(tiny):
    "Every run of both profiles names a network of NETWORKS and only arguments Perturbation takes."
    from contrastive_explanations.run import load_profile

    for name, overrides in (("embedded", {}), ("paper", {"data_root": "/data"})):
        settings = load_profile(name, overrides).run_settings("perturbation")
        assert settings and all(kwargs["model"] in NETWORKS and kwargs["model"] == label
                                for label, kwargs in settings.items())
    paper = load_profile("paper", {"data_root": "/data"}).run_settings("perturbation")
    assert all(kwargs["download"] is True and kwargs["n_images"] is None for kwargs in paper.values())


# --- the words of the prose: counts and verdicts follow the numbers across the stated thresholds ---

def test_perturbation_sentences_follow_the_numbers():
    from contrastive_explanations.experiments.perturbation import (band_text, differ_verdict, picture_text,
                                                                   saturated_text, settings_text)
    firsts = {"small_cnn": pd.DataFrame({"review_pt_error": [0.0, 0.02, -0.05, 0.5], "clean_pt": [0.3, 0.9, 1.0, 1.0]}),
              "resnet18": pd.DataFrame({"review_pt_error": [0.0, 0.0], "clean_pt": [0.5, 0.5]})}
    assert band_text(firsts, 0.01) == ("3 of the 4 generated birds under the small CNN, "
                                       "0 of the 2 ImageNet validation images under ResNet-18")
    assert band_text(firsts, 0.1).startswith("1 of the 4")  # a larger tolerance: fewer images in the band
    assert band_text(firsts, 0.01) != band_text(firsts, 0.1)
    assert saturated_text(firsts).startswith("50.0% of the 4 generated birds")
    assert settings_text(firsts) == "4 generated birds under the small CNN; 2 ImageNet validation images under ResNet-18"
    assert picture_text("small_cnn").startswith("One bird") and picture_text("resnet18").startswith("One of the ImageNet")
    none, one, two = (pd.Series(v) for v in ([False, False], [True, False], [True, True]))
    inside = pd.Series([True, False])  # the first image is in the band
    assert differ_verdict(none, inside, 1e-4).startswith("by more than 0.0001 in $\\Delta p_t$ on none:")
    assert "on 1 image (0 of them outside the band): the two steps differ" in differ_verdict(one, inside, 1e-4)
    assert "on 2 images (1 of them outside the band)" in differ_verdict(two, inside, 1e-4)
