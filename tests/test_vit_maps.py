"""Contrastive maps of a Vision Transformer (nbs/11_vit_maps.ipynb): the block mapping, the chance level of the
part score, bad input, the Food-101 source without data, the profiles' settings, rows against direct computation,
sharded + resumed runs."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from contrastive_explanations.metrics.measures import cosine, mask_share
from contrastive_explanations.data.sources import Source
from contrastive_explanations.data.datasets import DatasetNotFoundError, write_fixture
from contrastive_explanations.results import run
from contrastive_explanations.run import load_profile
from contrastive_explanations.methods.vit import AttentionRollout, ViTGradCAM
from contrastive_explanations.experiments.vit_maps import (MAP_KINDS, METHOD_KINDS, RELU_KINDS, ViTMaps, map_block,
                                                           stand_in_blocks)

from conftest import tiny_vit

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------------------------------------
# Eq. eq-vitmaps-block

@SETTINGS
@given(n=st.integers(2, 40), data=st.data())
def test_map_block_is_the_identity_between_equal_depths(n, data):
    b = data.draw(st.integers(0, n - 2))
    assert map_block(b, n, n) == b


@SETTINGS
@given(n_from=st.integers(2, 40), n_to=st.integers(2, 40))
def test_map_block_is_monotone_and_stays_below_the_last_block(n_from, n_to):
    mapped = [map_block(b, n_from, n_to) for b in range(n_from - 1)]
    assert all(0 <= m <= n_to - 2 for m in mapped)
    assert mapped == sorted(mapped)
    for b, m in enumerate(mapped):  # the nearest relative depth, unless capped at the last usable block
        depth = (b + 1) / n_from * n_to
        assert m in (0, n_to - 2) or abs((m + 1) - depth) <= 0.5 + 1e-9


def test_the_reviews_blocks_on_small_and_large_vits():
    assert (map_block(8, 12, 4), map_block(10, 12, 4)) == (2, 2)
    assert stand_in_blocks((8, 10), 12, 4) == (1, 2)
    assert stand_in_blocks((10, 8), 12, 4) == (2, 1)  # the order given is kept
    assert stand_in_blocks((8, 10), 12, 12) == (8, 10) and stand_in_blocks((8, 10), 12, 3) == (0, 1)
    assert stand_in_blocks((8, 10), 12, 24) == (17, 21)
    assert stand_in_blocks((0, 1, 2), 12, 4) == (0, 1, 2)  # all three map to 0: spread over the usable blocks


@SETTINGS
@given(n_to=st.integers(2, 30), data=st.data())
def test_stand_in_blocks_are_distinct_and_keep_the_order(n_to, data):
    k = data.draw(st.integers(1, min(n_to - 1, 11)))
    blocks = data.draw(st.lists(st.integers(0, 10), min_size=k, max_size=k, unique=True))
    out = stand_in_blocks(blocks, 12, n_to)
    assert len(set(out)) == len(out) and all(0 <= b <= n_to - 2 for b in out)
    order = sorted(range(k), key=lambda i: blocks[i])
    assert [out[i] for i in order] == sorted(out)


def test_block_mapping_refuses_bad_input():
    for args, match in (((11, 12, 4), "block=11 is out of range"), ((12, 12, 4), r"\[0, 10\]"),
                        ((-1, 12, 4), "block must be an int >= 0, got -1"),
                        ((8.0, 12, 4), "block must be an int >= 0, got 8.0"),
                        ((True, 12, 4), "block must be an int >= 0, got True"),
                        ((0, 12, 1), "n_to must be an int >= 2, got 1"),
                        ((0, 1, 4), "n_from must be an int >= 2, got 1")):
        with pytest.raises(ValueError, match=match) as error:
            map_block(*args)
        assert "\n" not in str(error.value) and "pass" in str(error.value)  # one line, with a fix
    with pytest.raises(ValueError, match="distinct"):
        stand_in_blocks((8, 8), 12, 4)
    with pytest.raises(ValueError, match="do not fit a 3-block ViT"):
        stand_in_blocks((4, 8, 10), 12, 3)


# ---------------------------------------------------------------------------------------------------------------
# Eq. eq-vitmaps-chance

@SETTINGS
@given(seed=st.integers(0, 10_000), H=st.integers(2, 7), W=st.integers(2, 7), p=st.floats(0.05, 0.95))
def test_a_map_shifted_over_the_image_scores_the_parts_area_on_average(seed, H, W, p):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(H, W, generator=g, dtype=torch.float64).abs() + 0.01  # some positive mass everywhere
    a[0, 0] = -1.0  # and a negative value, which the score ignores
    M = torch.rand(H, W, generator=g) < p
    shifted = torch.stack([a.flatten().roll(k).view(H, W) for k in range(H * W)])
    assert math.isclose(float(mask_share(shifted, M).mean()), M.sum().item() / (H * W), rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The experiment

class TinyViTMaps(ViTMaps):
    "The experiment on a tiny random ViT, 9 random images and random part masks (2 parts)."
    fail_at: int | None = None

    def build_sources(self):
        g = torch.Generator().manual_seed(self.seed)
        x = torch.rand(9, 3, 16, 16, generator=g, dtype=torch.float64)
        self.masks = torch.rand(9, 2, 16, 16, generator=g) < 0.3
        return [Source("tiny", "tiny_vit", tiny_vit(self.seed, num_layers=3, head_bias=False, class_token=False),
                       TensorDataset(x, torch.arange(9) % 4),
                       [f"class {c}" for c in range(4)], sample=self.n_images or None,
                       part_mask=lambda i, c: self.masks[i, c % 2])]

    def rows(self, indices):
        if self.fail_at is not None and self.fail_at in indices:
            raise KeyboardInterrupt(f"interrupted at item {self.fail_at}")
        return super().rows(indices)


def tiny_experiment() -> TinyViTMaps:
    return TinyViTMaps(n_images=0, threshold=0.0, batch_size=2, discard_ratio=0.5)


def test_vit_maps_refuse_bad_parameters_before_loading_anything():
    for kwargs, match in (({"source": "quick"}, "unknown source 'quick'.*birds, food101"),
                          ({"blocks": (8, 11)}, "block=11"),
                          ({"blocks": (8, 12)}, "block=12"), ({"blocks": (8,)}, "two blocks"),
                          ({"head_fusion": "median"}, "head_fusion"), ({"discard_ratio": 1.0}, "discard_ratio"),
                          ({"rank": 1}, "rank"), ({"n_images": -3}, "n_images")):
        with pytest.raises(ValueError, match=match):
            ViTMaps(**kwargs)
    with pytest.raises(TypeError, match="profile"):  # the profile is not an argument: its settings are
        ViTMaps(profile="paper")


def test_food101_source_without_data_or_checkpoint_says_what_is_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="Food-101"):
        ViTMaps(source="food101", data_root="")
    with pytest.raises(DatasetNotFoundError, match="food-101"):
        ViTMaps(source="food101", data_root=str(tmp_path))
    root = write_fixture("food101", tmp_path / "data", n_classes=2, per_class=2)
    with pytest.raises(FileNotFoundError, match=r"checkpoints/vit_b_16_food101\.pt"):
        ViTMaps(source="food101", data_root=str(root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_the_profiles_settings_name_the_source():
    "What differed by profile is in params/<profile>.yaml, as arguments of ViTMaps."
    embedded = load_profile("embedded").run_settings("vit_maps")["main"]
    paper = load_profile("paper", {"data_root": "/data"}).run_settings("vit_maps")["main"]
    assert (embedded["source"], embedded["n_images"]) == ("birds", 96)
    assert (paper["source"], paper["n_images"]) == ("food101", None) and "profile" not in paper


def test_rows_agree_with_a_direct_computation():
    exp = tiny_experiment()
    assert exp.model_blocks == [(0, 1)] and len(exp) == 9  # the review's 8 and 10 of 12 on 3 blocks
    rows = pd.DataFrame(exp.rows(list(range(len(exp)))))
    assert len(rows) == 9 * 2 * len(MAP_KINDS) and set(rows["map"]) == set(MAP_KINDS)
    assert dict(zip(rows["map"], rows["method"])) == {"gradcam_a": "vit_gradcam", "gradcam_b": "vit_gradcam",
                                                      **{k: "attention_rollout" for k in METHOD_KINDS[2:]},
                                                      **{k: "vit_gradcam" for k in RELU_KINDS}}  # Method.name
    assert exp.params["source"] == "tiny" and exp.params["n_images"] is None
    vit, x = exp.sources[0].model, exp.sources[0].dataset.tensors[0]
    classes = vit(x).topk(2).indices
    masks = torch.stack([torch.stack([exp.masks[i, int(c) % 2] for c in classes[i]]) for i in range(9)])
    methods = {"gradcam_a": ViTGradCAM(vit, block=0), "gradcam_b": ViTGradCAM(vit, block=1),
               "rollout_standard": AttentionRollout(vit, discard_ratio=0.5, gradient="scores"),
               "rollout_signed": AttentionRollout(vit, variant="signed", discard_ratio=0.5, gradient="scores"),
               "rollout_standard_dA": AttentionRollout(vit, discard_ratio=0.5),
               "rollout_signed_dA": AttentionRollout(vit, variant="signed", discard_ratio=0.5),
               "rollout_standard_d90": AttentionRollout(vit, discard_ratio=0.9, gradient="scores"),
               "rollout_standard_defects": AttentionRollout(vit, discard_ratio=0.5, gradient="scores", defects=True),
               "rollout_signed_defects": AttentionRollout(vit, variant="signed", discard_ratio=0.5, gradient="scores",
                                                          defects=True)}
    assert set(methods) == set(METHOD_KINDS) and set(MAP_KINDS) == set(METHOD_KINDS) | set(RELU_KINDS)
    maps = {}
    for kind in MAP_KINDS:
        if kind in methods:
            maps[kind] = methods[kind](x, classes, ["original", "weighted"]).maps
        else:  # GradCAM with a ReLU: the positive part on the patch grid, by hand
            maps[kind] = torch.where(maps[RELU_KINDS[kind]] > 0, maps[RELU_KINDS[kind]], 0.0)
        e_maps = maps[kind]
        up = F.interpolate(e_maps.flatten(1, 2), size=(16, 16), mode="bilinear", align_corners=False).view(9, 2, 2, 16, 16)
        share = mask_share(up, masks[:, :, None])
        got = rows[rows["map"] == kind].sort_values(["item", "rank"])
        pd.testing.assert_series_equal(got.share_weighted.reset_index(drop=True),
                                       pd.Series(share[:, :, 1].flatten().numpy(), name="share_weighted"),
                                       check_exact=False, rtol=1e-9)
        t12 = cosine(e_maps[:, 0, 0], e_maps[:, 1, 0])
        assert got.cosine_t1_t2_original.tolist()[::2] == pytest.approx(t12.tolist(), nan_ok=True)
        assert (got.chance.to_numpy() == masks.double().mean((-2, -1)).flatten().numpy()).all()
    for kind, of in (("rollout_signed_dA", "rollout_signed"), ("rollout_standard_d90", "rollout_standard"),
                     ("rollout_signed_defects", "rollout_signed"), ("rollout_standard_defects", "rollout_standard")):
        got = rows[rows["map"] == kind].sort_values(["item", "rank"])  # each variant against the review's map
        assert (got.reference == of).all()
        want = cosine(maps[kind][:, :, 1], maps[of][:, :, 1]).flatten().tolist()
        assert got.cosine_reference_weighted.tolist() == pytest.approx(want, nan_ok=True)
    assert rows[rows["map"] == "rollout_signed"].cosine_reference_weighted.isna().all()  # the review's: no reference
    kept = rows[rows["map"] == "rollout_signed_defects"].cosine_reference_weighted
    assert (kept < 0.99).any()  # vit-explain's defects move maps: the kinds do not merely copy the fixed ones
    assert rows[rows["map"].isin(list(RELU_KINDS))].positive_original.dropna().eq(1).all()  # a ReLU leaves no negative
    a = exp.figure_arrays(3)
    assert a["maps"].shape == (3, 2, len(MAP_KINDS), 2, 2, 2) and a["masks"].shape == (3, 2, 16, 16) and list(a["blocks"]) == [0, 1]


def test_sharded_and_resumed_run_equals_a_single_run(tmp_path):
    one = run(tiny_experiment(), tmp_path / "one", progress=False)
    failing = tiny_experiment()
    failing.fail_at = 8
    with pytest.raises(KeyboardInterrupt):
        run(failing, tmp_path / "sharded", count=3, progress=False)
    assert len(list((tmp_path / "sharded").glob("shard-*.json"))) == 2
    resumed = run(tiny_experiment(), tmp_path / "sharded", count=3, progress=False, on_stale="recompute")
    pd.testing.assert_frame_equal(one, resumed, check_exact=False, rtol=1e-6)


def test_the_contrastive_rollout_is_the_reviews_without_relu_from_p_t():
    # the review's Figure 5: "all ReLU operations were removed and the gradients were calculated from the softmax
    # output"; an earlier version of the book took the standard rollout of p_t for it
    import inspect

    from contrastive_explanations.experiments.vit_maps import (BOOK_ROLLOUTS, CONTRASTIVE_ROLLOUT, STANDARD_ROLLOUT,
                                                               vit_methods)

    methods = vit_methods(tiny_vit(0, 32, 5, num_layers=3), (0, 1))
    kind, target = CONTRASTIVE_ROLLOUT
    assert methods[kind].variant == "signed" and target == "weighted"
    kind, target = STANDARD_ROLLOUT
    assert methods[kind].variant == "standard" and target == "original"
    # the review's notebook takes vit-explain's hook gradient, with respect to the scores; the book's pair beside it
    # differentiates the attention weights
    assert methods[CONTRASTIVE_ROLLOUT[0]].gradient == methods[STANDARD_ROLLOUT[0]].gradient == "scores"
    (bk, bt), (sk, st) = BOOK_ROLLOUTS
    assert (methods[bk].variant, bt, methods[sk].variant, st) == ("signed", "weighted", "standard", "original")
    assert methods[bk].gradient == methods[sk].gradient == "weights"
    # the review's notebook discards nothing (vit-explain's own default is 0.9)
    assert methods["rollout_signed"].discard_ratio == methods["rollout_standard"].discard_ratio == 0.0
    assert inspect.signature(ViTMaps).parameters["discard_ratio"].default == 0.0


def test_the_defects_kept_are_the_reviews_settings_with_vit_explains_two_defects():
    "The *_defects kinds differ from the review's kinds (as inferred) only in keeping vit-explain's two defects."
    from contrastive_explanations.experiments.vit_maps import DEFECT_ROLLOUTS, REFERENCE_KIND, vit_methods

    methods = vit_methods(tiny_vit(0, 32, 5, num_layers=3), (0, 1))
    for (kind, target), (of, of_target) in zip(DEFECT_ROLLOUTS, (("rollout_signed", "weighted"),
                                                                 ("rollout_standard", "original"))):
        assert REFERENCE_KIND[kind] == of and target == of_target
        kept, fixed = methods[kind], methods[of]
        assert (kept.defects, fixed.defects) == (True, False)
        assert (kept.variant, kept.gradient, kept.discard_ratio) == (fixed.variant, fixed.gradient, fixed.discard_ratio)
    assert not any(m.defects for k, m in methods.items() if k.startswith("rollout") and k not in dict(DEFECT_ROLLOUTS))


# --- the words of the prose: each verdict follows its numbers across the stated thresholds ---

def test_vit_words_follow_the_intervals_and_medians():
    from contrastive_explanations.experiments.vit_maps import (change_word, difference_word, likeness, part_word,
                                                               sign_word, versus_chance)
    assert [versus_chance(lo, hi) for lo, hi in ((0.001, 0.2), (-0.2, -0.001), (-0.001, 0.2))] == [
        "above chance", "below chance", "not told apart from chance"]  # the interval crosses 0: no verdict
    assert [difference_word(lo, hi) for lo, hi in ((0.001, 0.2), (-0.2, -0.001), (0.0, 0.2))] == [
        "higher", "lower", "not told apart"]
    assert (sign_word(0.39), sign_word(0.4), sign_word(0.6), sign_word(0.61)) == (
        "mostly negative", "about as positive as negative", "about as positive as negative", "mostly positive")
    assert (part_word(0.51), part_word(0.49)) == ("mostly on the part", "mostly off the part")
    cosines = (0.8, 0.79, 0.3, 0.29, -0.29, -0.3, -0.79, -0.8)
    assert [likeness(c) for c in cosines] == ["nearly the same", "similar", "similar", "nearly unrelated",
                                              "nearly unrelated", "opposed", "opposed", "nearly opposite"]
    assert (change_word(0.5, 0.39), change_word(0.5, 0.45), change_word(0.5, 0.61)) == (
        "part", "stay about as alike", "grow more alike")


def test_vit_sentences_follow_their_inputs():
    from contrastive_explanations.experiments.vit_maps import (blocks_text, pair_text, source_texts, variants_text)
    assert blocks_text((8, 10)).startswith("The review's") and blocks_text((7, 10)).startswith("Blocks 7")
    with_masks, without = source_texts("small_vit", "birds", 12, True), source_texts("small_vit", "birds", 12, False)
    assert set(with_masks) == set(without) == {"vit_source_text", "scores_intro", "figure_image_column"}
    assert "over the 12 images" in with_masks["scores_intro"] and "no part masks" in without["scores_intro"]
    assert "outlined" in with_masks["figure_image_column"] and "no part masks" in without["figure_image_column"]
    assert "(higher; larger on 75% of 8 images)" in pair_text((0.1, 0.05, 0.2, 8, 0.75))
    assert "(lower;" in pair_text((-0.1, -0.2, -0.05, 8, 0.25))
    assert "(not told apart;" in pair_text((0.0, -0.1, 0.2, 8, 0.5))  # the interval holds 0
    moved = {(k, t, r): (r, 5, 0.5) for k, t in (("rollout_signed_dA", "weighted"), ("rollout_standard_dA", "original"),
                                                 ("rollout_standard_d90", "original")) for r in (1, 2)}
    up, down = {r: (0.1, 0.05, 0.2, 5, 1.0) for r in (1, 2)}, {r: (-0.1, -0.2, -0.05, 5, 0.0) for r in (1, 2)}
    text = variants_text(moved, up, down, True)
    assert text.count("3 of 10 maps move") == 3 and "(higher;" in text and "(lower;" in text
    assert "not measured" in variants_text(moved, up, down, False) and "(higher" not in variants_text(moved, up, down, False)
