"""The field's tests of class-contrastive maps (nbs/16_field_tests.ipynb): the rows' columns and counts on a tiny CNN
and a tiny ViT over generated birds, the measures against the metric modules called directly, the verdicts against
hand-made numbers on both sides of zero, and bad settings refused in one line before anything is loaded."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from contrastive_explanations.data.birds import BirdsDataset, generate_birds
from contrastive_explanations.data.sources import Source
from contrastive_explanations.experiments.field_tests import (
    CNN_METHODS, COMPARED, FAITHFULNESS_COLUMNS, FIELD_TARGETS, MEASURE_COLUMNS, QUESTIONS, VIT_METHODS, FieldTests,
    contrast_part, field_outcomes, mprt_outcome, published_beside, question_verdict, random_rivals, scaled_tolerance,
    verdict_sentence)
from contrastive_explanations.metrics.faithfulness import deletion
from contrastive_explanations.metrics.pointing import pointing_game
from contrastive_explanations.run import load_profile

BIRDS = generate_birds(5, 3)


def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12)).eval()


def tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=16,
                            num_classes=12).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision's head starts at zero: no map would depend on the image
    return vit


class TinyFieldTests(FieldTests):
    "The experiment on a tiny random network and five generated birds: every image qualifies (threshold 0)."
    vit = False

    def build_sources(self):
        model = tiny_vit() if self.vit else tiny_cnn()
        return [Source("birds", "tiny", model, BirdsDataset(BIRDS), BIRDS.class_names, layer=None if self.vit else "3",
                       sample=self.n_images)]


class TinyViTFieldTests(TinyFieldTests):
    vit = True


def small(cls=TinyFieldTests, **kwargs):
    settings = dict(threshold=0.0, n_images=None, steps=2, road_fractions=[0.5], mprt_items=1,
                    faithful_targets=["original", "weighted"], batch_size=2)
    return cls(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def cnn_rows() -> pd.DataFrame:
    exp = small()
    return pd.DataFrame(exp.rows(range(len(exp))))


def test_rows_have_the_promised_columns_and_counts(cnn_rows):
    items = cnn_rows[cnn_rows.kind == "item"]
    assert len(items) == 5 * len(CNN_METHODS) * 2 * len(FIELD_TARGETS)
    assert set(MEASURE_COLUMNS) <= set(items.columns) and {"item", "method", "k", "target", "class", "p"} <= set(items.columns)
    assert set(items.target) == set(FIELD_TARGETS) and set(items.k) == {1, 2}
    scored = items.target.isin(["original", "weighted"])
    assert items.loc[scored, list(FAITHFULNESS_COLUMNS)].notna().all().all()
    assert items.loc[~scored, list(FAITHFULNESS_COLUMNS)].isna().all().all()
    assert items.random_logit_ssim.notna().all() and items.pointing.isin([0.0, 1.0]).all()
    assert (items.random_class != items["class"]).all() and (items.random_class != items.other).all()
    mprt = cnn_rows[cnn_rows.kind == "mprt"]
    assert set(mprt.method) == set(CNN_METHODS) and mprt.item.nunique() == 1
    assert set(mprt.step) == {0, 1, 2, 3} and np.allclose(mprt[mprt.step == 0].spearman, 1.0)  # three layers


def test_measures_agree_with_the_metric_modules(cnn_rows):
    exp = small()
    k, items = 0, exp.sources[0].items[:2]
    e = exp.explain(k, items)
    maps = e["maps"]["gradient"][:, :2, [FIELD_TARGETS.index("original")]]
    expected = deletion(exp.sources[0].model, e["x"], maps, e["classes"], 2).auc("probability")[:, :, 0]
    got = cnn_rows[(cnn_rows.kind == "item") & (cnn_rows.method == "gradient") & (cnn_rows.target == "original")
                   & cnn_rows.item.isin(items)].sort_values(["item", "k"])
    np.testing.assert_allclose(got.deletion_probability, expected.reshape(-1).numpy(), rtol=1e-5)
    objects = torch.stack([torch.as_tensor(BIRDS.masks[i].any(0)) for i in items])
    hits = pointing_game(e["maps"]["gradient"][:, :2, [0]].cpu(), objects[:, None, None], scaled_tolerance(64))
    np.testing.assert_allclose(got.pointing, hits.reshape(-1).numpy())


def test_a_vit_gets_the_vit_methods_and_no_mprt():
    exp = small(TinyViTFieldTests, n_images=2)
    rows = pd.DataFrame(exp.rows(range(len(exp))))
    assert set(rows.method) == set(VIT_METHODS) and set(rows.kind) == {"item"}
    assert len(rows) == 2 * len(VIT_METHODS) * 2 * len(FIELD_TARGETS)


def test_rows_do_not_depend_on_the_batch(cnn_rows):
    exp = small(batch_size=5, mprt_items=0)
    again = pd.DataFrame(exp.rows(range(len(exp))))
    cols = ["deletion_logit", "road_morf", "random_logit_spearman", "contrastive_pointing"]
    mine = cnn_rows[cnn_rows.kind == "item"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[cols], again[cols], rtol=1e-5)


def hand_made(ours: float, theirs: float, n: int = 8) -> pd.DataFrame:
    "Items whose measures are `ours` for the weighted target and `theirs` for the original, plus a small spread."
    return pd.DataFrame([{"kind": "item", "source": "s", "method": "m", "k": 1, "item": i, "target": t,
                          **{c: (ours if t == "weighted" else theirs) + 0.01 * (i % 3)
                             for cols in QUESTIONS.values() for c, _ in cols}}
                         for i in range(n) for t in ("original", "weighted")])


def test_verdicts_flip_with_the_numbers():
    up, down = field_outcomes(hand_made(0.6, 0.3), "weighted"), field_outcomes(hand_made(0.3, 0.6), "weighted")
    for column, higher in (c for cols in QUESTIONS.values() for c in cols):
        a, b = up.set_index("metric").outcome[column], down.set_index("metric").outcome[column]
        assert (a, b) == (("held", "failed") if higher else ("failed", "held")), column
    tied = field_outcomes(hand_made(0.3, 0.3), "weighted")
    assert set(tied.outcome) == {"tied"} and question_verdict(tied.outcome)[0] == "no change"
    assert question_verdict(["held"] * 3)[0] == "supported" and question_verdict(["failed"] * 3)[0] == "not supported"
    assert "**Supported**" in verdict_sentence("faithful", "weighted", *question_verdict(["held"]))
    assert mprt_outcome([0.1, 0.12, 0.08])["outcome"] == "passes" and mprt_outcome([0.9, 0.92, 0.88])["outcome"] == "fails"
    assert set(COMPARED) <= set(FIELD_TARGETS)


def test_published_numbers_stand_beside_ours_only_in_their_setting():
    rows = pd.DataFrame([{"kind": "item", "source": "imagenet", "model": "vgg16", "k": 1, "method": "gradcam",
                          "target": "original", "deletion_probability": 0.2, "insertion_probability": 0.5}])
    assert len(published_beside(rows)) == 2
    assert published_beside(rows.assign(model="alexnet")).empty and published_beside(rows.assign(source="birds")).empty


def test_helpers():
    assert scaled_tolerance(224) == 15 and scaled_tolerance(112) == 8
    assert contrast_part(0, 1) >= 0 and contrast_part(0, 0) == -1
    drawn = random_rivals(torch.tensor([[0, 1]] * 20), 3, list(range(20)))
    assert (drawn == 2).all()  # the only class other than t1 and t2
    with pytest.raises(ValueError, match="at least 3 classes"):
        random_rivals(torch.tensor([[0, 1]]), 2, [0])


@pytest.mark.parametrize("kwargs, match", [
    ({"sources": ["voc"]}, "unknown source 'voc'"), ({"sources": []}, "sources is empty"),
    ({"steps": 0}, "steps must be an int >= 1"), ({"road_fractions": [1.5]}, "road_fractions"),
    ({"faithful_targets": ["weighted"]}, "leaves out the original"), ({"faithful_targets": ["original", "weighted", "sum"]}, "unknown target 'sum'"),
    ({"mprt_items": -1}, "mprt_items"), ({"n_images": 2.5}, "n_images"), ({"threshold": 1.0}, "threshold"),
    ({"sources": ["imagenet"], "imagenet_model": "vit_x"}, "imagenet_model"),
    ({"methods": ["vit_gradcam"]}, "does not explain a CNN")])
def test_bad_settings_are_refused_in_one_line(kwargs, match):
    cls = TinyFieldTests if "methods" in kwargs else FieldTests  # the methods are checked against the model's kind
    with pytest.raises(ValueError, match=match) as error:
        cls(**kwargs)
    assert "\n" not in str(error.value) and ("e.g." in str(error.value) or "choose" in str(error.value))


def test_the_profiles_name_their_runs():
    embedded = load_profile("embedded").run_settings("field_tests")
    paper = load_profile("paper", {"data_root": "/data"}).run_settings("field_tests")
    assert set(embedded) == {"photos", "birds", "birds_vit"} and embedded["birds"]["sources"] == ["birds"]
    assert {"imagenet", "cub", "food101"} <= set(paper) and paper["imagenet"]["imagenet_model"] == "vgg16"
    assert len(FieldTests.needs(**paper["cub"])) == 2 and FieldTests.needs(**embedded["photos"]) == []
