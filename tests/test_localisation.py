"""Where the evidence is (nbs/12_localisation.ipynb): the contrast part, the two measures, bootstrap intervals, the experiment."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive_explanations.data.birds import CLASSES, PART_NAMES, BirdsDataset, generate_birds
from contrastive_explanations.data.sources import Source
from contrastive_explanations.experiments.localisation import (CNN_METHODS, EXPLAINED_TARGETS, VARIANTS, VIT_METHODS,
                                                               Localisation, contrast_parts, contrastive_gains,
                                                               measure_summary, methods_for, paired_differences)
from contrastive_explanations.metrics.measures import area_share, peak_on_part
from contrastive_explanations.metrics.measures import bootstrap_interval, mask_share
from contrastive_explanations.methods import METHODS, TARGETS
from contrastive_explanations.results import run
from contrastive_explanations.data.training import small_cnn


# --- the part that tells two classes apart ---------------------------------------------------------------------------

def test_contrast_parts_within_and_across_groups():
    t1 = torch.tensor([0, 1, 3, 4, 6, 8, 9, 10, 0, 3, 9])
    t2 = torch.tensor([2, 0, 5, 3, 7, 6, 11, 9, 3, 9, 1])
    expected = ["head", "head", "wing", "wing", "tail", "tail", "wing", "wing", None, None, None]
    assert [PART_NAMES[p] if p >= 0 else None for p in contrast_parts(t1, t2).tolist()] == expected
    # symmetric, and every same-group pair has its group's part
    for a in range(len(CLASSES)):
        for b in range(len(CLASSES)):
            if a != b:
                p = int(contrast_parts([a], [b])[0])
                assert p == int(contrast_parts([b], [a])[0])
                assert (p >= 0) == (CLASSES[a].group == CLASSES[b].group)


@pytest.mark.parametrize("t1, t2, error, match", [
    ([0], [0], ValueError, "must differ"),
    ([0, 1], [2], ValueError, "same shape"),
    ([12], [0], ValueError, r"classes in \[0, 12\)"),
    ([-1], [0], ValueError, r"classes in \[0, 12\)"),
    (torch.tensor([0.0]), [1], TypeError, "integer class indices"),
])
def test_contrast_parts_bad_input(t1, t2, error, match):
    with pytest.raises(error, match=match):
        contrast_parts(t1, t2)


# --- the measures on hand-made maps --------------------------------------------------------------------------------

def test_measures_on_a_hand_made_map():
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0] = True
    phi = torch.tensor([[1.0, 0.0, 2.0], [-4.0, 3.0, 0.0], [0.0, 0.0, -1.0]])
    assert torch.isclose(mask_share(phi, mask), torch.tensor(0.5, dtype=torch.float64))  # 3 of 6 on the top row
    assert peak_on_part(phi, mask) == 0  # the 3.0 is in the middle row
    phi[0, 2] = 3.0
    assert peak_on_part(phi, mask) == 1  # tie between (0, 2) and (1, 1): the first in row-major order wins
    assert torch.isclose(area_share(mask), torch.tensor(1 / 3))


def test_measures_broadcast_and_undefined_cases():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, :, :1] = True
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, 0] = 1.0  # constant positive: share = area, peak undefined
    maps[:, 1] = -1.0  # no positive mass: share undefined
    maps[0, 2, 3, 3] = 5.0  # a single peak off the part of image 0
    maps[1, 2, 0, 0] = 5.0  # a single peak on the part of image 1
    share = mask_share(maps, masks[:, None])
    peak = peak_on_part(maps, masks[:, None])
    torch.testing.assert_close(share[:, 0], area_share(masks).double())
    assert share[:, 1].isnan().all() and peak[:, 0].isnan().all()
    assert share[:, 2].tolist() == [0.0, 1.0] and peak[:, 2].tolist() == [0.0, 1.0]


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2**31), st.integers(2, 12), st.floats(0.05, 0.95))
def test_mass_share_properties(seed, size, density):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(5, size, size, generator=g)
    masks = torch.rand(5, size, size, generator=g) < density
    share = mask_share(maps, masks)
    valid = ~share.isnan()
    assert ((share[valid] >= 0) & (share[valid] <= 1 + 1e-6)).all()
    # complementary masks split the positive mass
    torch.testing.assert_close(share[valid] + mask_share(maps, ~masks)[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    # scaling by a positive factor changes nothing; adding negative values changes nothing
    torch.testing.assert_close(mask_share(3 * maps, masks), share, equal_nan=True)
    more_negative = torch.where(maps < 0, 2 * maps, maps)
    torch.testing.assert_close(mask_share(more_negative, masks), share, equal_nan=True)
    # a peak on the mask has the mask's value at the argmax
    peak = peak_on_part(maps, masks)
    at = masks.flatten(1).gather(1, maps.flatten(1).argmax(1, keepdim=True))[:, 0].float()
    torch.testing.assert_close(peak, at)
    assert share.dtype == torch.float64  # the metrics' measure sums in double precision


@pytest.mark.parametrize("maps, masks, error, match", [
    (torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.bool), ValueError, "floating maps"),
    (torch.zeros(4, 4), torch.zeros(4, 4), TypeError, "bool tensor"),
    (torch.zeros(8, 8), torch.zeros(64, 64, dtype=torch.bool), ValueError, "upsample the maps"),
    (torch.zeros(4), torch.zeros(4, dtype=torch.bool), ValueError, r"\(\.\.\., [hH], [wW]\)"),
])
def test_measures_bad_input(maps, masks, error, match):
    for measure in (mask_share, peak_on_part):
        with pytest.raises(error, match=match):
            measure(maps, masks)


# --- bootstrap: the metrics' interval with the mean ----------------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**31), st.sampled_from(["beta", "bernoulli", "normal"]))
def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n(seed, kind):
    rng = np.random.default_rng(seed)
    draw = {"beta": lambda n: rng.beta(2, 8, n), "bernoulli": lambda n: (rng.random(n) < 0.3).astype(float),
            "normal": lambda n: rng.normal(0.1, 1, n)}[kind]
    small, large = draw(30), draw(30 * 16)
    if np.ptp(small) == 0 or np.ptp(large) == 0:
        return
    widths = []
    for values in (small, large):
        mean, low, high, n = bootstrap_interval(values, "mean", seed=seed % 1000)
        assert mean == pytest.approx(values.mean()) and low <= mean <= high and n == len(values)
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # about four times narrower for sixteen times the data


def test_bootstrap_is_seeded_and_handles_constant_and_undefined_values():
    values = np.random.default_rng(3).random(50)
    assert bootstrap_interval(values, "mean", seed=1) == bootstrap_interval(values, "mean", seed=1)
    assert bootstrap_interval([0.5, 0.5, 0.5], "mean") == (0.5, 0.5, 0.5, 3)
    wide, narrow = bootstrap_interval(values, "mean", 0.99), bootstrap_interval(values, "mean", 0.5)
    assert wide[1] < narrow[1] < narrow[2] < wide[2]
    mean, low, high, n = bootstrap_interval([0.2, np.nan], "mean")  # one defined value: no interval
    assert mean == 0.2 and np.isnan(low) and np.isnan(high) and n == 1
    with pytest.raises(ValueError, match="pass 'median' or 'mean'"):
        bootstrap_interval(values, "mode")


def test_the_summary_is_the_metrics_bootstrap_of_each_column(tiny):
    exp = tiny_localisation(tiny, max_images=6)
    table = pd.DataFrame(exp.rows(range(6)))
    summary = measure_summary(table, seed=3)
    d = table[(table["method"] == "fullgrad") & (table["k"] == 2)]
    row = summary.query("method == 'fullgrad' and k == 2 and target == 'mean' and measure == 'peak'").iloc[0]
    assert (row["mean"], row["low"], row["high"], row["n"]) == bootstrap_interval(d["peak_mean"].to_numpy(), "mean", seed=3)
    assert list(summary.columns) == ["method", "k", "target", "measure", "mean", "low", "high", "n", "chance"]


# --- the experiment -------------------------------------------------------------------------------------------------

def favour_warblers(head: torch.nn.Linear) -> None:
    "Make an untrained head rank the three warblers first (their order varying by image), so t1 and t2 share a group."
    with torch.no_grad():
        head.weight.mul_(10)
        head.bias.zero_()
        head.bias[3:6] = 20.0


@pytest.fixture(scope="module")
def tiny():
    "A few generated birds and an untrained small CNN: fast, and nothing is downloaded or trained."
    torch.manual_seed(0)
    net = small_cnn(12).eval()
    favour_warblers(net[-1])
    return generate_birds(24, seed=5), net


class TinyLocalisation(Localisation):
    "Localisation on the birds and network of `birds_and_net`: a source of their own in place of the settings'."
    birds_and_net = None

    def build_sources(self) -> list[Source]:
        test, net = self.birds_and_net
        part = test.discriminating_part
        return [Source("birds", type(net).__name__, net, BirdsDataset(test), test.class_names,
                       part_mask=lambda i, c: test.masks[i, part[c]])]


def tiny_localisation(tiny, **kwargs) -> Localisation:
    cls = type("Tiny", (TinyLocalisation,), {"birds_and_net": tiny})
    return cls(**{"threshold": 0.0, "batch_size": 4, **kwargs})


def test_rows_measure_every_method_class_and_target(tiny):
    exp = tiny_localisation(tiny, max_images=5)
    assert len(exp) == 5 and exp.n_ambiguous == 24
    assert exp.n_cross_group + int((contrast_parts(exp.t1, exp.t2) >= 0).sum()) == 24
    rows = pd.DataFrame(exp.rows([0, 1]))
    assert len(rows) == 2 * 5 * 2  # images x methods x classes
    assert set(rows["method"]) == {"gradient", "linear_approximation", "gradcam", "xgradcam", "fullgrad"}
    i = exp.sources[0].items[0]
    first = rows[rows["image"] == i]
    assert (first["part"] == PART_NAMES[int(contrast_parts(exp.t1[i:i + 1], exp.t2[i:i + 1])[0])]).all()
    assert np.isclose(first["area"].iloc[0], exp.test.masks[i, PART_NAMES.index(first["part"].iloc[0])].float().mean())
    # the GradCAM mass share equals the measure on the method's own upsampled maps
    from contrastive_explanations.methods.cam import GradCAM
    x = exp.test.images[i:i + 1].float() / 255
    e = GradCAM(exp.model, "3")(x, torch.tensor([[int(exp.t1[i]), int(exp.t2[i])]]), list(EXPLAINED_TARGETS))
    mask = exp.test.masks[i, PART_NAMES.index(first["part"].iloc[0])]
    share = mask_share(e.upsampled((64, 64))[0], mask)
    got = first[first["method"] == "gradcam"].sort_values("k")[[f"mass_{t}" for t in EXPLAINED_TARGETS]].to_numpy()
    np.testing.assert_allclose(got, share.numpy(), rtol=1e-4, atol=1e-6, equal_nan=True)


def test_summaries_of_rows(tiny):
    exp = tiny_localisation(tiny, max_images=6)
    table = pd.DataFrame(exp.rows(range(6)))
    summary = measure_summary(table)
    assert len(summary) == 5 * 2 * 4 * 2
    defined = summary["n"] >= 2
    assert summary.loc[~defined, "low"].isna().all() and summary.loc[defined, "low"].notna().all()
    s = summary[defined]
    assert ((s["low"] <= s["mean"] + 1e-12) & (s["mean"] <= s["high"] + 1e-12)).all()
    diffs = paired_differences(table, n_resamples=200)
    w = diffs[(diffs["method"] == "gradcam") & (diffs["k"] == 1) & (diffs["measure"] == "mass")
              & (diffs["target"] == "weighted") & (diffs["baseline"] == "original")]
    d = table[(table["method"] == "gradcam") & (table["k"] == 1)]
    assert np.isclose(w["difference"].iloc[0], (d["mass_weighted"] - d["mass_original"]).mean())


def test_sharded_and_resumed_run_equals_a_single_run(tiny, tmp_path):
    single = run(tiny_localisation(tiny, max_images=7), tmp_path / "single", progress=False)
    assert run(tiny_localisation(tiny, max_images=7), tmp_path / "sharded", count=3, shards=[1], progress=False) is None
    resumed = run(tiny_localisation(tiny, max_images=7), tmp_path / "sharded", count=3, progress=False)
    pd.testing.assert_frame_equal(single, resumed)
    assert single["image"].nunique() == 7


def test_vit_gets_the_vit_methods(tiny):
    from contrastive_explanations.data.training import small_vit
    torch.manual_seed(0)
    vit = small_vit(12).eval()
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision initialises a ViT's head with zeros
    favour_warblers(vit.heads.head)
    exp = tiny_localisation((tiny[0], vit), max_images=2)
    rows = pd.DataFrame(exp.rows([0, 1]))
    assert set(rows["method"]) == set(VIT_METHODS) and len(rows) == 2 * 4 * 2
    # the signed rollout's rows are the signed AttentionRollout's maps, measured on the part: an oracle built here
    from contrastive_explanations.methods.vit import AttentionRollout
    i = exp.sources[0].items[0]
    x = exp.test.images[i:i + 1].float() / 255
    classes = torch.tensor([[int(exp.t1[i]), int(exp.t2[i])]])
    mask = exp.test.masks[i, int(contrast_parts(exp.t1[i:i + 1], exp.t2[i:i + 1])[0])]
    for method, variant in (("attention_rollout", "standard"), ("attention_rollout_signed", "signed")):
        e = AttentionRollout(vit, variant=variant)(x, classes, ["original", "weighted"])
        share = mask_share(e.upsampled((64, 64))[0], mask)  # (2 classes, 2 targets)
        got = rows[(rows["image"] == i) & (rows["method"] == method)].sort_values("k")[["mass_original", "mass_weighted"]]
        np.testing.assert_allclose(got.to_numpy(), share.numpy(), rtol=1e-4, atol=1e-6, equal_nan=True)
    gains = contrastive_gains(rows)
    assert gains.set_index("method").loc["attention_rollout_signed", "compared_with"] == "attention_rollout"
    assert "attention_rollout" not in set(gains["method"])


def vit_rows(standard_gain: float, signed_gain: float, n: int = 40, seed: int = 0) -> pd.DataFrame:
    "Localisation-like rows of a ViT: the standard rollout from p_t gains `standard_gain`, the signed one `signed_gain`."
    rng = np.random.default_rng(seed)
    original = rng.uniform(0.1, 0.3, n)  # the standard rollout from y_t
    noise = lambda: rng.normal(0, 0.01, n)
    rows = []
    for method, weighted, orig in (("gradient", original + noise(), original),
                                   ("vit_gradcam", original + noise(), original),
                                   ("attention_rollout", original + standard_gain + noise(), original),
                                   ("attention_rollout_signed", original + signed_gain + noise(), original + 0.3)):
        rows += [{"image": i, "k": 1, "method": method, "mass_weighted": w, "mass_original": o, "peak_weighted": 0.0,
                  "peak_original": 0.0} for i, (w, o) in enumerate(zip(weighted, orig))]
    return pd.DataFrame(rows)


def test_the_claim_counts_the_contrastive_rollout_not_the_standard_one_from_p_t():
    # the standard rollout from p_t gains a lot, the contrastive (signed from p_t) nothing against standard from y_t
    gains = contrastive_gains(vit_rows(standard_gain=0.2, signed_gain=0.0)).set_index("method")
    assert list(gains.index) == ["gradient", "vit_gradcam", "attention_rollout_signed"]
    rollout = gains.loc["attention_rollout_signed"]
    assert rollout["compared_with"] == "attention_rollout" and rollout["low"] < 0 < rollout["high"]  # not significant
    # ... and the other way round: the contrastive rollout's gain is found whatever the standard one does
    gains = contrastive_gains(vit_rows(standard_gain=-0.2, signed_gain=0.1)).set_index("method")
    assert gains.loc["attention_rollout_signed", "low"] > 0.05
    # the signed rollout is compared with the standard rollout from y_t, not with its own map from y_t
    assert np.isclose(gains.loc["attention_rollout_signed", "difference"], 0.1, atol=0.01)


def test_the_claim_needs_the_map_it_is_compared_with():
    rows = vit_rows(0.0, 0.0)
    with pytest.raises(ValueError, match="no attention_rollout rows"):
        contrastive_gains(rows[rows["method"] != "attention_rollout"])
    with pytest.raises(ValueError, match="measure must be one of"):
        contrastive_gains(rows, measure="area")


def test_one_map_under_several_names_is_one_setting_of_the_claim(tiny):
    exp = tiny_localisation(tiny, max_images=6)
    gains = contrastive_gains(pd.DataFrame(exp.rows(range(6))))
    assert gains["methods"].tolist() == ["gradient", "linear_approximation = gradcam = xgradcam", "fullgrad"]


@pytest.mark.parametrize("kwargs, match", [
    ({"n_test": 0}, "n_test must be an int >= 1"),
    ({"seed": 1.5}, "seed must be an int >= 0"),
    ({"model": "resnet18"}, "model must be 'small_cnn' or 'small_vit'"),
    ({"threshold": 1.0}, r"threshold must be a probability in \[0, 1\)"),
    ({"max_images": -1}, "max_images must be an int >= 0"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"layer": "9"}, "model has no layer '9'"),
])
def test_experiment_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_localisation(tiny, **kwargs)


def test_the_profile_is_not_an_argument(tiny):
    with pytest.raises(TypeError, match="profile"):
        tiny_localisation(tiny, profile="paper")


def test_max_images_none_keeps_every_image_and_the_name_carries_the_folder(tiny):
    every = tiny_localisation(tiny, max_images=None)
    assert len(every) == len(tiny_localisation(tiny, max_images=0)) and every.max_images == 0
    assert len(tiny_localisation(tiny, max_images=3)) == 3
    assert every.name == "localisation/Sequential" and every.provenance()["experiment"] == "localisation/Sequential"


def test_methods_come_from_the_registry(tiny):
    from contrastive_explanations.data.training import small_vit
    assert set(EXPLAINED_TARGETS) <= set(TARGETS) and set(CNN_METHODS + VIT_METHODS) <= set(METHODS) | set(VARIANTS)
    on_cnn = methods_for(tiny[1])
    assert list(on_cnn) == list(CNN_METHODS) and all(type(m) is METHODS[name] for name, m in on_cnn.items())
    assert list(methods_for(small_vit(12).eval())) == list(VIT_METHODS)


def test_profiles_name_the_runs():
    from contrastive_explanations.run import load_profile
    embedded = load_profile("embedded").run_settings("localisation")
    assert list(embedded) == ["small_cnn", "small_vit"]
    assert [(r["model"], r["n_test"], r["max_images"]) for r in embedded.values()] == [
        ("small_cnn", 4000, 300), ("small_vit", 4000, 200)]
    paper = load_profile("paper", {"data_root": "/data"}).run_settings("localisation")
    assert [(r["n_test"], r["max_images"]) for r in paper.values()] == [(20000, None), (20000, None)]
    assert all("profile" not in r and "data_root" not in r for r in paper.values())


def test_a_source_without_birds_or_parts_is_refused(tiny):
    from torch.utils.data import TensorDataset
    test, net = tiny

    class NoParts(Localisation):
        def build_sources(self):
            return [Source("birds", "net", net, BirdsDataset(test), test.class_names)]

    class NoBirds(Localisation):
        def build_sources(self):
            return [Source("tensors", "net", net, TensorDataset(test.images), test.class_names)]

    for cls, match in ((NoParts, "has no part_mask"), (NoBirds, "has a TensorDataset")):
        with pytest.raises(ValueError, match=match):
            cls(threshold=0.0)


def test_the_settings_build_the_small_models_source(monkeypatch, tiny):
    import contrastive_explanations.experiments.localisation as localisation
    test, net = tiny
    asked = []

    def fake_birds_source(model, seed, sample, device, n_test):
        asked.append((model, seed, sample, n_test))
        part = test.discriminating_part
        return Source("birds", model, net, BirdsDataset(test), test.class_names,
                      part_mask=lambda i, c: test.masks[i, part[c]])

    monkeypatch.setattr(localisation, "birds_source", fake_birds_source)
    exp = Localisation("small_vit", seed=2, n_test=24, threshold=0.0, max_images=2)
    assert asked == [("small_vit", 2, None, 24)] and exp.name == "localisation/small_vit" and exp.params["n_test"] == 24
    # the part of each row is the source's part mask of t1, which is the part that tells t1 from t2
    rows = pd.DataFrame(exp.rows([0, 1]))
    for i in exp.sources[0].items:
        part = PART_NAMES.index(rows.loc[rows["image"] == i, "part"].iloc[0])
        assert torch.equal(exp.sources[0].part_mask(i, int(exp.t1[i])), test.masks[i, part])
