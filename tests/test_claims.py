"""The claims chapter's verdict rules (contrastive_explanations.claims): NaN pairs are not measured, ties count for
neither side, a claim whose settings all tie is "no change", and one map under several method names is one setting."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contrastive_explanations.claims import judged, merge_identical, tally, tally_text, verdict


def test_a_nan_pair_is_not_measured_and_counts_for_neither_side():
    # the old rule kept pairs with share_weighted != share_original, which is true of NaN, and scored them losses
    ours, theirs = pd.Series([0.3, np.nan, np.nan]), pd.Series([0.2, 0.1, np.nan])
    t = tally(ours, theirs)
    assert t == {"held": 1, "tied": 0, "failed": 0, "unmeasured": 2}
    assert judged(t) == "supported" and "2 not measured" in tally_text(t)


def test_a_source_without_part_masks_is_not_measured_rather_than_not_supported():
    nothing = pd.Series([np.nan] * 4)
    t = tally(nothing, nothing)
    assert judged(t) == "not measured" and t["unmeasured"] == 4


def test_settings_that_all_tie_are_no_change_not_support():
    # the old accuracy row counted weighted >= original: every tie supported the claim
    same = pd.Series([0.0, 0.0, 0.0])
    t = tally(same, same.copy())
    assert t["tied"] == 3 and judged(t) == "no change" and "3 no change" in tally_text(t)


def test_ties_are_left_out_of_the_share():
    ours, theirs = pd.Series([1.0, 1.0, 0.0, 0.5]), pd.Series([0.0, 1.0, 1.0, 0.5])
    t = tally(ours, theirs)
    assert (t["held"], t["tied"], t["failed"]) == (1, 2, 1) and judged(t) == verdict(0.5) == "mixed"


def test_lower_is_better_when_asked():
    assert tally(pd.Series([0.1]), pd.Series([0.2]), higher=False)["held"] == 1
    assert tally(pd.Series([0.1]), pd.Series([0.2]))["failed"] == 1


@pytest.mark.parametrize("share, expected", [(1.0, "supported"), (0.75, "mostly supported"), (0.74, "mixed"),
                                             (0.25, "mixed"), (0.24, "not supported"), (0.0, "not supported")])
def test_verdict_thresholds(share, expected):
    assert verdict(share) == expected


@given(st.lists(st.tuples(st.one_of(st.none(), st.integers(-3, 3)), st.one_of(st.none(), st.integers(-3, 3))),
                max_size=30))
def test_every_setting_is_counted_once(pairs):
    ours = pd.Series([np.nan if a is None else float(a) for a, _ in pairs], dtype=float)
    theirs = pd.Series([np.nan if b is None else float(b) for _, b in pairs], dtype=float)
    t = tally(ours, theirs)
    assert sum(t.values()) == len(pairs)
    assert t["unmeasured"] == sum(a is None or b is None for a, b in pairs)


def test_methods_with_one_map_are_one_setting():
    # on a network ending in global pooling and a linear layer, LA, GradCAM and XGradCAM give one map
    d = pd.DataFrame({"method": ["gradient", "linear_approximation", "gradcam", "xgradcam", "fullgrad"],
                      "difference": [0.019, 0.002, 0.002, 0.002, 0.004], "low": [0.01, -0.001, -0.001, -0.001, 0.0],
                      "high": [0.02, 0.005, 0.005, 0.005, 0.006]})
    merged = merge_identical(d, "method", ["difference", "low", "high"])
    assert [m for m, _ in merged] == [["gradient"], ["linear_approximation", "gradcam", "xgradcam"], ["fullgrad"]]
