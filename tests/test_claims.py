"""The claims chapter's evidence standard (contrastive_explanations.claims): every setting is a mean of paired
differences with a bootstrap interval; a claim holds in a setting only when the interval says so; NaN pairs are not
measured, exact ties count for neither side, and one map under several method names is one setting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive_explanations.claims import (AGREE, ALIKE, OUTCOMES, equivalence, interval_outcome, judged,
                                            merge_identical, outcome, paired_outcomes, tally, tally_text,
                                            threshold_outcome, verdict)

ROOT = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(0)


def test_a_setting_holds_only_when_its_interval_lies_above_zero():
    # the old rule counted the sign of a difference of means: a tiny, noisy win counted as much as a clear one
    noisy_win = np.r_[rng.normal(0.001, 1.0, 30)]
    assert noisy_win.mean() != 0 and outcome(noisy_win)["outcome"] == "inconclusive"
    clear = outcome(0.2 + rng.normal(0, 0.05, 30))
    assert clear["outcome"] == "held" and clear["low"] > 0 and clear["n"] == 30
    assert outcome(-0.2 + rng.normal(0, 0.05, 30))["outcome"] == "failed"


def test_lower_is_better_when_asked():
    d = -0.3 + rng.normal(0, 0.05, 20)
    assert outcome(d, higher=False)["outcome"] == "held" and outcome(d)["outcome"] == "failed"
    assert interval_outcome(-0.2, -0.1, higher=False) == "held" and interval_outcome(np.nan, np.nan) == "inconclusive"


def test_nan_pairs_are_not_measured_and_exact_ties_are_no_change():
    assert outcome([np.nan, np.nan])["outcome"] == "unmeasured"
    assert outcome([0.0, 0.0, np.nan])["outcome"] == "tied"
    assert judged(tally(["unmeasured"] * 4)) == "not measured"
    assert judged(tally(["tied"] * 3)) == "no change" and "3 no change" in tally_text(tally(["tied"] * 3))


def test_inconclusive_settings_count_against_the_claim_and_ties_do_not():
    t = tally(["held", "held", "held", "inconclusive", "tied", "unmeasured"])
    assert judged(t) == verdict(3 / 4) == "mostly supported"
    assert tally_text(t) == "holds in 3 of 4 settings; 1 inconclusive; 1 no change; 1 not measured"
    with pytest.raises(ValueError, match="unknown outcomes"):
        tally(["won"])


@pytest.mark.parametrize("share, expected", [(1.0, "supported"), (0.75, "mostly supported"), (0.74, "mixed"),
                                             (0.25, "mixed"), (0.24, "not supported"), (0.0, "not supported")])
def test_verdict_thresholds(share, expected):
    assert verdict(share) == expected


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.floats(-3, 3))), max_size=30))
def test_every_setting_is_counted_once(items):
    table = pd.DataFrame({"setting": [s for s, _ in items], "ours": [np.nan if v is None else v for _, v in items],
                          "theirs": 0.0})
    settings_ = paired_outcomes(table, ["setting"], "ours", "theirs")
    t = tally(settings_["outcome"])
    assert sum(t.values()) == table["setting"].nunique() and set(settings_["outcome"]) <= set(OUTCOMES)


def test_paired_outcomes_pairs_within_a_setting():
    # the same items under two settings: a shift shared by both sides cancels
    base = rng.normal(0, 1, 40)
    table = pd.DataFrame({"s": ["x"] * 40 + ["y"] * 40, "ours": np.r_[base + 0.1, base - 0.1], "theirs": np.r_[base, base]})
    out = paired_outcomes(table, ["s"], "ours", "theirs")
    assert out["outcome"].tolist() == ["held", "failed"]
    assert np.allclose(out["difference"], [0.1, -0.1])


def test_methods_with_one_map_are_one_setting_and_near_misses_are_not():
    # on a network ending in global pooling and a linear layer, LA, GradCAM and XGradCAM give one map (float32 rounding)
    values = rng.random(6)
    d = pd.DataFrame({"method": np.repeat(["gradient", "linear_approximation", "gradcam", "xgradcam"], 6),
                      "item": np.tile(range(6), 4),
                      "ori": np.r_[rng.random(6), values, values + 1e-8, values + 1e-3], "wtd": 0.5})
    merged = merge_identical(d, ["method"], "method", "item", ["ori", "wtd"])
    assert merged["method"].unique().tolist() == ["gradient", "linear_approximation = gradcam", "xgradcam"]
    assert len(merged) == 18  # the repeated setting's rows are dropped, the others kept whole


def test_merging_never_crosses_other_settings():
    d = pd.DataFrame({"method": ["a", "b"] * 2, "baseline": ["blur"] * 2 + ["zeros"] * 2, "item": 0,
                      "ori": [0.1, 0.1, 0.2, 0.3]})
    merged = merge_identical(d, ["method", "baseline"], "method", "item", ["ori"])
    assert merged.groupby("baseline")["method"].apply(list).to_dict() == {"blur": ["a = b"], "zeros": ["a", "b"]}


def test_looks_alike_needs_the_whole_interval_at_the_threshold():
    assert threshold_outcome(0.99 + rng.normal(0, 0.003, 50), ALIKE)["verdict"] == "confirmed"
    assert threshold_outcome(0.36 + rng.normal(0, 0.05, 50), ALIKE)["verdict"] == "not confirmed"
    assert threshold_outcome(np.r_[np.full(10, 0.9), np.full(11, 1.0)], ALIKE)["verdict"] == "inconclusive"
    assert threshold_outcome([], ALIKE)["verdict"] == "not measured"


def test_agree_is_an_equivalence_test_that_can_fail_both_ways():
    assert equivalence(rng.normal(0, 0.005, 200))["verdict"] == "confirmed"
    assert equivalence(-0.1 + rng.normal(0, 0.01, 50))["verdict"] == "not confirmed"
    assert equivalence(+0.1 + rng.normal(0, 0.01, 50))["verdict"] == "not confirmed"
    assert equivalence(rng.normal(0, 0.2, 20), AGREE)["verdict"] == "inconclusive"  # too few, too noisy to say


def glued(notebook: Path) -> dict[str, str]:
    "The glue values (text/markdown or text/plain) of an executed notebook."
    nb = json.loads(notebook.read_text())
    out = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                data = {k.rpartition("/")[0].rpartition("record/")[2] + "/" + k.rpartition("/")[2]: v
                        for k, v in o.get("data", {}).items()}  # application/papermill.record/text/markdown -> text/markdown
                out[name] = data.get("text/markdown", data.get("text/plain", ""))
    return out


def test_the_claims_chapter_and_the_localisation_chapter_print_the_same_count():
    chapters = [ROOT / "executed" / f"{name}.ipynb" for name in ("12_localisation", "18_claims")]
    if not all(c.exists() for c in chapters):
        pytest.skip("the book has not been built here: `make book` executes the chapters first (make test does)")
    localisation, claims = (glued(c) for c in chapters)
    assert localisation["claim2_better"] == claims["ground_truth_count"]
    assert claims["ground_truth_count"].split(" of ")[1] == localisation["claim2_better"].split(" of ")[1]
