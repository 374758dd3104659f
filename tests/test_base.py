"""Tests of the experiments' base (nbs/30_base.ipynb): the one rule that calls an image ambiguous or confident
(Eq. eq-ambiguity), the seeded screening order, and the selector that the contrasts, the ViT maps and the masking
experiment share. The oracles sort probabilities with numpy and walk the order by hand."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from contrastive_explanations.experiments.base import (GROUP_SIGNS, Choice, ambiguity, ambiguous_items,
                                                       dataset_batches, scan_order, select_items)

SETTINGS = settings(max_examples=40, deadline=None)


def kth_largest(p: np.ndarray, k: int) -> np.ndarray:
    "numpy's oracle: each row's k-th largest value."
    return np.sort(p, axis=1)[:, -k]


def batches_of(x: torch.Tensor, order: list[int], step: int):
    "(indices, rows) in `order`, `step` at a time."
    return ((order[s:s + step], x[order[s:s + step]]) for s in range(0, len(order), step))


def uniform_and_random_logits(n: int, classes: int, seed: int) -> torch.Tensor:
    "Random logits, every third row all zeros: a uniform softmax, each probability exactly 1 / classes."
    logits = torch.randn(n, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    logits[::3] = 0
    return logits


# --- Eq. eq-ambiguity ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 5), threshold=st.sampled_from([0.0, 0.1, 0.2, 0.25]))
def test_ambiguity_is_the_sign_of_pk_minus_threshold(seed, rank, threshold):
    p = uniform_and_random_logits(12, 5, seed).softmax(1)  # 0.2 exactly on the uniform rows
    kth = kth_largest(p.numpy(), rank)
    expected = np.where(kth > threshold, 1, np.where(kth < threshold, -1, 0))
    assert ambiguity(p, rank, threshold).tolist() == expected.tolist()


def test_ambiguity_at_the_threshold_is_neither_group():
    "A rule with >= (or <=) puts the image with p2 exactly at the threshold into a group: it must be in none."
    p = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert ambiguity(p, 2, 0.25).tolist() == [0]
    assert ambiguity(p, 2, 0.2499).tolist() == [1] and ambiguity(p, 2, 0.2501).tolist() == [-1]
    assert ambiguity(torch.tensor([[0.6, 0.3]]), 2, 0.1).tolist() == [1]  # only the top two: their order is free
    assert ambiguity(torch.tensor([[0.3, 0.6]]), 2, 0.1).tolist() == [1]


def test_ambiguity_refuses_a_rank_beyond_the_classes():
    with pytest.raises(ValueError, match="only 3 classes: choose rank <= 3"):
        ambiguity(torch.rand(2, 3), 4, 0.1)


# --- the screening order -------------------------------------------------------------------------------------------

def test_scan_order_is_the_seeds_permutation():
    assert scan_order(6, None) == list(range(6))
    orders = {seed: scan_order(40, seed) for seed in range(5)}
    assert all(sorted(o) == list(range(40)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == 5  # each seed its own order
    assert scan_order(40, 3) == orders[3]  # and the same order again


# --- the selector ---------------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 4), threshold=st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.3]),
       n=st.one_of(st.none(), st.integers(1, 8)), step=st.integers(1, 13),
       groups=st.sampled_from([("ambiguous",), ("confident",), ("ambiguous", "confident")]))
def test_select_items_are_the_first_n_of_each_group_in_the_order(seed, rank, threshold, n, step, groups):
    logits = uniform_and_random_logits(30, 4, seed)
    order = scan_order(30, seed)
    got = select_items(nn.Identity(), batches_of(logits, order, step), rank, threshold, n, groups)
    p = logits.softmax(1).numpy()
    kth = kth_largest(p, rank)
    for g in groups:  # by hand: walk the order, keep what lies strictly on the group's side of the threshold
        side = (kth > threshold) if g == "ambiguous" else (kth < threshold)
        firsts = [i for i in order if side[i]]
        assert [c.index for c in got[g]] == sorted(firsts if n is None else firsts[:n])
        for c in got[g]:
            assert len(set(c.classes)) == rank  # distinct classes whose probabilities are the k largest (ties: any)
            assert np.allclose(p[c.index][list(c.classes)], np.sort(p[c.index])[::-1][:rank], rtol=0, atol=1e-15)
            assert np.allclose(c.probabilities, np.sort(p[c.index])[::-1][:rank], rtol=0, atol=1e-15)
    assert set(got) == set(groups)


def test_select_items_follow_the_seed():
    "A selector that ignored the seed (or scanned in index order) would choose the same images for every seed."
    logits = uniform_and_random_logits(60, 4, 1)
    p2 = kth_largest(logits.softmax(1).numpy(), 2)
    chosen = {}
    for seed in (0, 1):
        order = scan_order(60, seed)
        got = select_items(nn.Identity(), batches_of(logits, order, 7), 2, 0.2, 4)["ambiguous"]
        chosen[seed] = [c.index for c in got]
        assert chosen[seed] == sorted([i for i in order if p2[i] > 0.2][:4])
    assert chosen[0] != chosen[1]


def test_select_items_exclude_the_threshold_itself():
    "Every third row is uniform over 4 classes: p2 = 0.25 exactly, in neither group at threshold 0.25."
    logits = uniform_and_random_logits(30, 4, 2)
    got = select_items(nn.Identity(), batches_of(logits, list(range(30)), 8), 2, 0.25, None, tuple(GROUP_SIGNS))
    picked = {c.index for g in got.values() for c in g}
    assert picked.isdisjoint(range(0, 30, 3)) and picked == set(range(30)) - set(range(0, 30, 3))


def test_select_items_stop_once_every_group_is_full():
    logits = uniform_and_random_logits(40, 4, 3)
    read = []

    def batches():
        for idx, x in batches_of(logits, list(range(40)), 5):
            read.append(idx)
            yield idx, x

    got = select_items(nn.Identity(), batches(), 2, 0.2, 2, ("ambiguous", "confident"))
    assert all(len(g) == 2 for g in got.values())
    flat = [i for idx in read for i in idx]
    p2 = kth_largest(logits.softmax(1).numpy(), 2)
    counts = lambda upto: (sum(p2[i] > 0.2 for i in flat[:upto]), sum(p2[i] < 0.2 for i in flat[:upto]))
    assert min(counts(len(flat))) >= 2 and min(counts(len(flat) - 5)) < 2  # the last batch read was the one needed


def test_select_items_softmax_dtype():
    "dtype=float64: the probabilities of float32 logits softmaxed in float64 (masking); None: in the logits' dtype."
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(0)) * 3
    one = lambda **kw: select_items(nn.Identity(), batches_of(logits, list(range(10)), 4), 2, 0.0, None, **kw)
    as32, as64 = one()["ambiguous"], one(dtype=torch.float64)["ambiguous"]
    for c32, c64 in zip(as32, as64):
        assert c64.probabilities == tuple(logits[c64.index].double().softmax(0).sort(descending=True).values[:2].tolist())
        assert c32.probabilities == tuple(logits[c32.index].softmax(0).sort(descending=True).values[:2].tolist())
    assert [c.probabilities for c in as32] != [c.probabilities for c in as64]


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank=0 must be a positive int"), ({"threshold": 1.0}, r"threshold=1.0 must lie in \[0, 1\)"),
    ({"n": 0}, "n=0 must be None"), ({"groups": ("odd",)}, "groups must be a list of names in"),
    ({"groups": "ambiguous"}, "groups must be a list"), ({"rank": 6}, "only 5 classes")])
def test_select_items_refuse_bad_input(kwargs, match):
    args = {"rank": 2, "threshold": 0.1, "n": None, "groups": ("ambiguous",)} | kwargs
    with pytest.raises(ValueError, match=match):
        select_items(nn.Identity(), batches_of(torch.zeros(3, 5), [0, 1, 2], 2), **args)


# --- ambiguous_items: the contrasts' use ---------------------------------------------------------------------------

def test_dataset_batches_read_in_order_and_lazily():
    x = torch.arange(10.0).view(10, 1)
    got = dataset_batches(TensorDataset(x, torch.zeros(10)), [7, 2, 9, 0, 4], batch_size=2)
    first = next(got)
    assert first[0] == [7, 2] and first[1].flatten().tolist() == [7.0, 2.0]
    assert [idx for idx, _ in got] == [[9, 0], [4]]


@pytest.mark.parametrize("n, seed", [(None, 0), (3, 0), (3, 5)])
def test_ambiguous_items_is_the_ambiguous_group_of_the_selector(n, seed):
    logits = uniform_and_random_logits(30, 6, 4)
    ds = TensorDataset(logits, torch.zeros(30, dtype=torch.long))
    p3 = kth_largest(logits.softmax(1).numpy(), 3)
    order = list(range(30)) if n is None else scan_order(30, seed)
    firsts = [i for i in order if p3[i] > 0.15]
    assert ambiguous_items(nn.Identity(), ds, 3, 0.15, n, seed, batch_size=4) == sorted(firsts[:n])
    with pytest.raises(ValueError, match="rank=0"):
        ambiguous_items(nn.Identity(), ds, 0)


def test_choice_sorts_by_index():
    assert sorted([Choice(3, (1, 0), (0.6, 0.4)), Choice(1, (0, 2), (0.5, 0.3))])[0].index == 1
