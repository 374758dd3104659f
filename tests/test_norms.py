"""Gradient norm against logit (nbs/10_norm_logit.ipynb): target ranks, batched norms, the fit, the experiment."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from contrastive_explanations.data.datasets import DatasetNotFoundError
from contrastive_explanations.data.sources import Source
from contrastive_explanations.experiments.norm_logit import (NormLogit, gradient_norms, input_normalisation, norm_logit_source,
                                                             polyfit_r2, ranked_classes, setting_words, target_ranks)
from contrastive_explanations.results import run
from contrastive_explanations.run import main


def tiny_net(bias: bool = True, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, classes, bias=bias)).double().eval()


def loop_gradients(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    "(B, K, 3, H, W): one forward and one backward pass per image and class, the explicit oracle."
    out = torch.zeros(*classes.shape, *x.shape[1:], dtype=x.dtype)
    for b in range(len(x)):
        for k, c in enumerate(classes[b].tolist()):
            xb = x[b:b + 1].clone().requires_grad_(True)
            (out[b, k],) = torch.autograd.grad(model(xb)[0, c], xb)
    return out


# --- target ranks -------------------------------------------------------------------------------------------------

def test_target_ranks_imagenet_is_the_reviews_choice():
    ranks = target_ranks(1000)
    assert len(ranks) == 145 and ranks.dtype.kind == "i"
    assert ranks.tolist() == list(range(50)) + list(range(50, 950, 20)) + list(range(950, 1000))


@given(st.integers(2, 5000))
def test_target_ranks_sorted_unique_in_range(C):
    ranks = target_ranks(C)
    assert len(ranks) == min(C, 145)
    assert (np.diff(ranks) > 0).all() and ranks[0] == 0 and ranks[-1] == C - 1
    if C <= 145:
        assert ranks.tolist() == list(range(C))
    else:
        assert ranks[:50].tolist() == list(range(50)) and ranks[-50:].tolist() == list(range(C - 50, C))


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, "1000", True, None])
def test_target_ranks_refuses_bad_counts(bad):
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        target_ranks(bad)


def test_ranked_classes_orders_logits_and_checks_ranks():
    logits = torch.tensor([[0.1, 2.0, -1.0, 2.0], [3.0, 0.0, 1.0, 2.0]])
    assert ranked_classes(logits, [0, 1, 2, 3]).tolist() == [[1, 3, 0, 2], [0, 3, 2, 1]]  # ties: lower class first
    with pytest.raises(ValueError, match=r"ranks must be a 1-D sequence in \[0, 4\)"):
        ranked_classes(logits, [0, 4])
    with pytest.raises(ValueError, match="logits must be a"):
        ranked_classes(torch.zeros(4), [0])


# --- batched norms ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 5, 8])
def test_batched_norms_equal_the_per_class_loop(chunk):
    net = tiny_net()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    classes = torch.tensor([[4, 0, 2, 1, 3], [0, 1, 2, 3, 4], [2, 2, 0, 4, 1]])
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.5, 1.0, 2.0])
    norms, dots, logits = gradient_norms(net, x, classes, chunk=chunk, normalisation=(mean, std))
    g = loop_gradients(net, x, classes)
    std, mean = std.double().view(1, 1, 3, 1, 1), mean.double().view(1, 1, 3, 1, 1)
    torch.testing.assert_close(norms, (g * std).flatten(2).norm(dim=2))  # grad_z y = sigma * grad_x y
    torch.testing.assert_close(dots, (g * (x[:, None] - mean)).flatten(2).sum(2))  # grad_z y . z = grad_x y . (x - mu)
    pixels = gradient_norms(net, x, classes, chunk=chunk)
    torch.testing.assert_close(pixels[0], g.flatten(2).norm(dim=2))
    torch.testing.assert_close(pixels[1], (g * x[:, None]).flatten(2).sum(2))
    torch.testing.assert_close(logits, net(x))
    assert all(p.requires_grad and p.grad is None for p in net.parameters()), "the model is left as it was"


def test_norm_is_of_the_full_gradient_not_the_channel_sum():
    net = tiny_net()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    norms, _, _ = gradient_norms(net, x, torch.tensor([[0]]))
    g = loop_gradients(net, x, torch.tensor([[0]]))[0, 0]
    assert torch.isclose(norms[0, 0], g.norm()) and not torch.isclose(norms[0, 0], g.sum(0).norm())


def test_logit_is_gradient_times_input_without_biases():
    "Eq. eq-logit-gradient with beta = 0, and Eq. eq-norm-bound, on a bias-free ReLU network."
    net = tiny_net(bias=False)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    classes = torch.arange(5).expand(4, 5)
    norms, dots, logits = gradient_norms(net, x, classes, chunk=3)
    torch.testing.assert_close(dots, logits, rtol=0, atol=1e-12)
    assert (norms * x.flatten(1).norm(dim=1)[:, None] >= logits.abs() * (1 - 1e-12)).all()
    torch.testing.assert_close(net(3 * x), 3 * net(x))


def test_logit_minus_gradient_term_is_locally_constant_with_biases():
    net = tiny_net(bias=True)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    classes = torch.arange(5).expand(2, 5)
    _, dots, logits = gradient_norms(net, x, classes)
    step = 1e-8 * torch.randn_like(x)
    _, dots2, logits2 = gradient_norms(net, x + step, classes)
    torch.testing.assert_close(logits - dots, logits2 - dots2, rtol=0, atol=1e-10)
    assert (logits - dots).abs().max() > 1e-3


def test_gradient_norms_bad_input():
    net = tiny_net()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got 0"):
        gradient_norms(net, x, torch.tensor([[0]]), chunk=0)
    with pytest.raises(ValueError, match=r"classes must be a \(batch, K\) tensor"):
        gradient_norms(net, x, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 5\)"):
        gradient_norms(net, x, torch.tensor([[7]]))


def test_input_normalisation_spaces():
    from contrastive_explanations.data.models import ImageClassifier
    model = ImageClassifier("m", tiny_net().float(), [0.5] * 3, [0.25, 0.5, 2.0], ["a"] * 5, lambda im: im)
    mean, std = input_normalisation(model)
    assert mean.tolist() == [0.5] * 3 and std.tolist() == [0.25, 0.5, 2.0]
    assert input_normalisation(model, "pixels") is None and input_normalisation(tiny_net()) is None
    with pytest.raises(ValueError, match="space must be one of"):
        input_normalisation(model, "normalized-ish")


def test_normalised_space_matches_differentiating_the_normalised_network():
    "The norm and gradient term in 'normalised' space are those of the network applied to z directly."
    from contrastive_explanations.data.models import ImageClassifier
    net = tiny_net()
    mean, std = [0.4, 0.5, 0.6], [0.5, 1.0, 2.0]
    model = ImageClassifier("m", net, mean, std, ["a"] * 5, lambda im: im)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    classes = torch.tensor([[0, 3], [4, 1]])
    norms, dots, _ = gradient_norms(model, x, classes, normalisation=input_normalisation(model))
    z = (x - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(1, 3, 1, 1)
    g = loop_gradients(net, z, classes)
    torch.testing.assert_close(norms, g.flatten(2).norm(dim=2))
    torch.testing.assert_close(dots, (g * z[:, None]).flatten(2).sum(2))


# --- the fit --------------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=50)
@given(st.floats(-1, 1), st.floats(-5, 5), st.floats(-5, 5), st.integers(0, 2**31))
def test_polyfit_recovers_a_quadratic_exactly(a, b, c, seed):
    x = np.random.default_rng(seed).uniform(-10, 10, 40)
    y = a * x**2 + b * x + c
    if np.ptp(y) < 1e-6:
        return
    coefficients, r2 = polyfit_r2(x, y)
    np.testing.assert_allclose(coefficients, [a, b, c], atol=1e-7)
    assert abs(r2 - 1) < 1e-9


def test_polyfit_r2_matches_its_definition_and_bounds():
    rng = np.random.default_rng(1)
    x = rng.normal(size=100)
    y = x**2 + rng.normal(size=100)
    coefficients, r2 = polyfit_r2(x, y)
    residual = y - np.polyval(coefficients, x)
    assert np.isclose(r2, 1 - (residual**2).sum() / ((y - y.mean())**2).sum()) and 0 < r2 < 1
    assert polyfit_r2(x, y, 3)[1] >= r2  # a bigger model never fits worse
    assert abs(polyfit_r2(x, y, 0)[1]) < 1e-12


@pytest.mark.parametrize("args, match", [
    (([1, 2, 3], [1, 2]), "same length"),
    (([1, 2], [1, 2]), "needs at least 3 points"),
    (([1, 2, np.nan], [1, 2, 3]), "finite"),
    (([1, 2, 3], [5, 5, 5]), "y is constant"),
    (([[1, 2, 3]], [[1, 2, 3]]), "1-D"),
])
def test_polyfit_r2_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        polyfit_r2(*args)
    with pytest.raises(ValueError, match="degree must be an int"):
        polyfit_r2([1, 2, 3], [1, 2, 4], degree=-1)


# --- the experiment -------------------------------------------------------------------------------------------------

class TinyNormLogit(NormLogit):
    "NormLogit on a tiny network and 7 random labelled images: a source of its own in place of the settings'."

    def build_sources(self) -> list[Source]:
        images = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return [Source("tensor", "Sequential", tiny_net(), TensorDataset(images, torch.arange(7) % 5),
                       [f"class {c}" for c in range(5)], item_names=lambda i: f"image {i}")]


def tiny_experiment(**kwargs) -> NormLogit:
    return TinyNormLogit(**{"n_images": 5, "chunk": 2, **kwargs})


def test_rows_hold_every_target_of_every_image():
    exp = tiny_experiment(batch_size=2)
    rows = pd.DataFrame(exp.rows([0, 1]))
    assert len(rows) == 2 * 5 and set(rows["rank"]) == set(range(5))
    assert rows.groupby("image")["logit"].apply(lambda s: s.is_monotonic_decreasing).all()
    i = exp.sources[0].items[0]
    x = exp.sources[0].dataset[i][0][None]
    g = loop_gradients(exp.model, x, torch.arange(5)[None])[0]
    first = rows[rows["image"] == i].set_index("class")
    np.testing.assert_allclose(first.loc[range(5), "norm"], g.flatten(1).norm(dim=1), rtol=1e-10)
    assert (first["label"] == i % 5).all() and (first["name"] == f"image {i}").all()  # the source's labels and names


def test_sharded_and_resumed_run_equals_a_single_run(tmp_path):
    single = run(tiny_experiment(), tmp_path / "single", progress=False)
    exp = tiny_experiment()
    assert run(exp, tmp_path / "sharded", count=3, shards=[2, 0], progress=False) is None  # interrupted
    resumed = run(tiny_experiment(), tmp_path / "sharded", count=3, progress=False)
    pd.testing.assert_frame_equal(single, resumed)
    assert len(single) == 5 * 5 and single["image"].nunique() == 5


def test_missing_imagenet_root_fails_before_anything_is_written(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    review = {"model": "vgg16", "dataset": "imagenet"}  # the paper profile's main run
    with pytest.raises(DatasetNotFoundError, match="ImageNet"):
        NormLogit(**review, data_root=str(tmp_path / "no-such-folder"))
    with pytest.raises(DatasetNotFoundError, match="missing the folder val/"):
        NormLogit(**review, data_root=str(empty))
    with pytest.raises(DatasetNotFoundError, match="needs a data root"):
        NormLogit(**review)
    # the command line: a clear error, exit code 2, and no results folder
    monkeypatch.setenv("CONTRASTIVE_EXPLANATIONS_RESULTS", str(tmp_path / "results"))
    assert main(["norm_logit", "--profile", "paper", "--param", f"data_root={empty}"]) == 2
    assert "ImageNet" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and list(empty.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"dataset": "cifar"}, "dataset must be one of"),
    ({"dataset": "birds"}, "model 'efficientnet_lite0' does not go with dataset 'birds'"),
    ({"model": "small_cnn"}, "model 'small_cnn' does not go with dataset 'packaged'"),
    ({"n_images": 0}, "n_images must be an int >= 1"),
    ({"n_images": 8}, "has only 7 images"),
    ({"space": "logits"}, "space must be one of"),
    ({"chunk": 1.5}, "chunk must be an int"),
    ({"model": 3}, "model must be a model name, got a int"),
])
def test_experiment_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_experiment(**kwargs)


def test_the_profile_is_not_an_argument():
    "What differed by profile is an explicit argument, set in params/<profile>.yaml."
    with pytest.raises(TypeError, match="profile"):
        tiny_experiment(profile="paper")


def test_name_carries_the_results_folder():
    assert tiny_experiment().name == "norm_logit/Sequential_tensor"
    assert tiny_experiment().provenance()["experiment"] == "norm_logit/Sequential_tensor"


def test_profiles_name_the_runs_and_their_folders():
    from contrastive_explanations.run import load_profile
    embedded = load_profile("embedded")
    settings = embedded.run_settings("norm_logit")
    assert list(settings) == ["main", "birds"] and "profile" not in settings["main"]
    assert settings["main"] == {"device": "cpu", "data_root": "", "output_root": "", "seed": 0, "download": False,
                                "model": "efficientnet_lite0", "dataset": "packaged", "n_images": 4, "chunk": 4}
    assert settings["birds"]["n_images"] == 300 and settings["birds"]["batch_size"] == 50
    main_run = NormLogit(**settings["main"])
    assert str(embedded.results_dir(main_run)).endswith("embedded/norm_logit/efficientnet_lite0_packaged")
    paper = load_profile("paper", {"data_root": "/data"}).run_settings("norm_logit")
    assert {k: paper["main"][k] for k in ("model", "dataset", "n_images", "chunk", "download")} == {
        "model": "vgg16", "dataset": "imagenet", "n_images": 1000, "chunk": 32, "download": True}
    assert paper["birds"]["n_images"] == 1000 and paper["birds"]["chunk"] == 32


def test_the_source_is_named_after_the_dataset_and_only_photos_name_their_rows(monkeypatch):
    import contrastive_explanations.experiments.norm_logit as norm_logit
    photos = norm_logit_source("efficientnet_lite0", "packaged")
    assert (photos.name, photos.model_name, photos.labelled) == ("packaged", "efficientnet_lite0", False)
    assert photos.name_of(0) == photos.dataset.classes[0]
    built = []
    fake = lambda model, seed, sample, device: built.append((model, seed, sample)) or Source(
        "birds", model, tiny_net(), TensorDataset(torch.rand(3, 3, 8, 8), torch.zeros(3)), ["a"] * 5,
        item_names=lambda i: f"bird {i}")
    monkeypatch.setattr(norm_logit, "birds_source", fake)
    birds = norm_logit_source("small_vit", "birds", seed=3)
    assert built == [("small_vit", 3, None)] and birds.name == "birds" and birds.item_names is None  # rows: name ''


@pytest.mark.parametrize("term_corr, term_share, positive, verdict, trend", [
    (0.9, 0.8, 0.9, "applies", "grows with the logit"),
    (0.4, 0.8, 0.9, "does not apply", "grows with the logit"),  # the term does not follow the logit
    (0.9, 0.2, 0.5, "does not apply", "shows no consistent trend"),  # the term is small; half the images rise
])
def test_the_words_are_picked_by_the_numbers(term_corr, term_share, positive, verdict, trend):
    numbers = {"images": 4, "points": 40, "targets": 10, "a": 0.1, "b": 0.2, "c": 0.3, "r2": 0.9, "r2_within": 0.5,
               "spearman": 0.5, "spearman_positive": positive, "top_ratio": 2.0, "term_corr": term_corr,
               "term_share": term_share, "floor_ratio": 12.0, "bound_rho": 0.4, "lowest_logit": -3.0}
    words = setting_words(numbers, "a setting")
    assert words["verdict"].startswith(verdict + ":") and words["trend"] == trend
    assert words["floor_words"] == "far above it" and words["tight"].startswith("loose")  # R² within 0.5 < 0.8
    assert words["fit_reading"].startswith("fitting each image on its own does worse")
