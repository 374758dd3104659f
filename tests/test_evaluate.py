"""Scoring explanations (nbs/21_evaluate.ipynb): `evaluate` gives the metric functions' own numbers, each in the row of
its image, class and target; every option reaches the function that takes it; bad input is one line, refused before
the model runs."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from contrastive_explanations.methods import make_method
from contrastive_explanations.metrics import faithfulness, pointing, randomisation
from contrastive_explanations.metrics.evaluate import COLUMNS, METRICS, OPTIONS, evaluate

TARGETS = ["original", "weighted"]


class Counted(nn.Module):
    "A small CNN that counts its forward passes."

    def __init__(self, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.fixture(scope="module")
def setup():
    model = Counted().eval()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    method = make_method("gradcam", model, "net.2")
    e = method(x, torch.tensor([[0, 3], [4, 1]]), TARGETS)
    return model, x, method, e


def at_image(net, x, classes):
    "An explain function built from scratch on whatever network it is given (shares nothing with `rebound`)."
    return make_method("gradcam", net, "net.2")(x, classes, TARGETS).upsampled(tuple(x.shape[-2:]))


def values(table: pd.DataFrame, metric: str) -> np.ndarray:
    return table[table.metric == metric].value.to_numpy()


def test_the_names_and_options_are_the_functions():
    "Every option routed to a family is a parameter of the function it calls; the curves come in the three outputs."
    functions = {"deletion": faithfulness.deletion, "insertion": faithfulness.insertion,
                 "road_morf": faithfulness.road, "road_lerf": faithfulness.road,
                 "random_logit": randomisation.random_logit, "mprt": randomisation.randomised_models,
                 "efficient_mprt": randomisation.efficient_mprt, "pointing": pointing.pointing_game}
    assert set(OPTIONS) == {m.family for m in METRICS.values()} == set(functions)
    for family, options in OPTIONS.items():
        assert set(options) <= set(inspect.signature(functions[family]).parameters), family
    for family in ("deletion", "insertion", "road_morf", "road_lerf"):
        assert {METRICS[f"{family}{s}"].output for s in ("", "_logit", "_relative")} == set(faithfulness.OUTPUTS)


def test_curves_equal_the_direct_calls_in_their_rows(setup):
    model, x, method, e = setup
    names = ["deletion", "deletion_logit", "insertion_relative", "road_lerf", "road_morf_logit"]
    table = evaluate(e, model, x, names, steps=3, fractions=(0.5,), seed=2)
    B, K, T = e.maps.shape[:3]
    assert list(table.columns) == list(COLUMNS) and len(table) == len(names) * B * K * T
    up = e.upsampled(x.shape[-2:])
    direct = {"deletion": faithfulness.deletion(model, x, up, e.classes, steps=3).auc("probability"),
              "deletion_logit": faithfulness.deletion(model, x, up, e.classes, steps=3).auc("logit"),
              "insertion_relative": faithfulness.insertion(model, x, up, e.classes, steps=3).auc("relative"),
              "road_lerf": faithfulness.road(model, x, up, e.classes, (0.5,), "lerf", seed=2).mean("probability"),
              "road_morf_logit": faithfulness.road(model, x, up, e.classes, (0.5,), "morf", seed=2).mean("logit")}
    for name, expected in direct.items():
        np.testing.assert_allclose(values(table, name), expected.reshape(-1).numpy(), rtol=1e-9, err_msg=name)
    rows = table[table.metric == "deletion"]
    assert rows["class"].tolist() == e.classes.repeat_interleave(T, 1).reshape(-1).tolist()
    assert rows.target.tolist() == TARGETS * (B * K) and rows["rank"].tolist() == [0, 0, 1, 1] * B
    assert set(table.method) == {"gradcam"}


def test_a_metric_family_runs_once(setup, monkeypatch):
    model, x, method, e = setup
    calls = []
    real = faithfulness.deletion
    monkeypatch.setattr(faithfulness, "deletion", lambda *a, **k: calls.append(1) or real(*a, **k))
    evaluate(e, model, x, ["deletion", "deletion_logit", "deletion_relative"], steps=2)
    assert len(calls) == 1


def test_pointing_puts_each_hit_in_its_row():
    "Maps whose maximum is placed by hand: the hits follow from where it is, not from the code under test."
    B, K, T, H, W = 2, 2, 2, 8, 8
    maps = torch.zeros(B, K, T, H, W)
    peaks = {}
    for b in range(B):
        for k in range(K):
            for t in range(T):
                inside = (b + 2 * k + t) % 2 == 0
                maps[b, k, t, 1 if inside else 6, 1 if inside else 6] = 1.0
                peaks[b, k, t] = float(inside)
    masks = torch.zeros(B, H, W, dtype=torch.bool)
    masks[:, :3, :3] = True
    e = SimpleNamespace(maps=maps, classes=torch.tensor([[4, 2], [0, 3]]), targets=("original", "weighted"))
    table = evaluate(e, nn.Identity(), torch.rand(B, 3, H, W), "pointing", masks=masks, tolerance=0)
    got = {(r.sample, r.rank, TARGETS.index(r.target)): r.value for r in table.itertuples()}
    assert got == peaks and table["class"].tolist() == [4, 4, 2, 2, 0, 0, 3, 3]
    per_class = torch.stack([masks, ~masks], 1)  # (B, K, H, W): class 1's mask is the rest of the image
    flipped = evaluate(e, nn.Identity(), torch.rand(B, 3, H, W), "pointing", masks=per_class, tolerance=0)
    expected = [1.0 - v if k == 1 else v for (b, k, t), v in sorted(peaks.items())]
    assert flipped.value.tolist() == expected


def test_randomisation_with_a_method_equals_a_fresh_method_on_each_network(setup):
    "The method object, rebound to the randomised copy, gives what a method built on that copy gives."
    model, x, method, e = setup
    layers = ["net.2", "net.6"]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    table = evaluate(e, model, x, ["random_logit", "mprt", "efficient_mprt"], explain=method, layers=layers, seed=3)
    by_function = evaluate(e, model, x, ["random_logit", "mprt", "efficient_mprt"], explain=at_image, layers=layers,
                           seed=3)
    pd.testing.assert_frame_equal(table, by_function)
    cascade = randomisation.mprt(model, x, e.classes, at_image, layers=layers, seed=3, targets=TARGETS)
    np.testing.assert_allclose(values(table, "mprt"), cascade[cascade.step == len(layers)].spearman_abs, rtol=1e-9)
    first = randomisation.random_logit(model, x, e.classes[:, 0], at_image, 5, seed=3, targets=TARGETS)
    np.testing.assert_allclose(values(table, "random_logit").reshape(2, 2, 2)[:, 0].reshape(-1), first.ssim,
                               rtol=1e-9)
    rise = randomisation.efficient_mprt(model, x, e.classes, at_image, layers=layers, seed=3, targets=TARGETS).rise
    np.testing.assert_allclose(values(table, "efficient_mprt"), rise, rtol=1e-9)
    assert not np.allclose(values(table, "mprt"), 1.0)  # the randomised network's maps differ
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the model is left as it was


BAD = [  # (kwargs of evaluate, words the one line must contain)
    ({"metrics": "delition"}, ["'delition'", "did you mean 'deletion'"]),
    ({"metrics": []}, ["no metric"]),
    ({"metrics": "mprt"}, ["mprt", "explain="]),
    ({"metrics": ["deletion", "pointing"]}, ["pointing", "masks="]),
    ({"metrics": "pointing", "masks": torch.ones(2, 12, 12)}, ["masks must be bool"]),
    ({"metrics": "pointing", "masks": torch.ones(3, 12, 12, dtype=torch.bool)}, ["B = 2"]),
    ({"metrics": "deletion", "stepz": 4}, ["'stepz'", "steps"]),
    ({"metrics": "deletion", "tolerance": 4}, ["'tolerance'", "none of deletion"]),
    ({"metrics": "random_logit", "explain": 3}, ["explain must be"]),
    ({"metrics": "mprt", "explain": lambda net, x, c: torch.rand(len(x), c.shape[1], 3, 12, 12)},
     ["explain returned", "T = 2"]),
]


@pytest.mark.parametrize("kwargs, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_one_line_before_the_model_runs(setup, kwargs, words):
    model, x, method, e = setup
    before = model.calls
    with pytest.raises((ValueError, TypeError)) as info:
        evaluate(e, model, x, **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    if "explain" not in kwargs or not callable(kwargs["explain"]):
        assert model.calls == before, "the model ran before the input was refused"


def test_the_explanation_must_fit(setup):
    model, x, method, e = setup
    for bad_x, word in ((x[:1], "2 images but x has 1"), (x[0], "x must be the images")):
        with pytest.raises(ValueError, match=word):
            evaluate(e, model, bad_x)
    with pytest.raises(TypeError, match="explanation must have maps"):
        evaluate(e.maps, model, x)
    other = make_method("gradcam", Counted(), "net.2")
    with pytest.raises(ValueError, match="made for another model"):
        evaluate(e, model, x, "mprt", explain=other)
