"""The generated fine-grained dataset (nbs/23_birds.ipynb): determinism, ground truth, one discriminating part per
group, ambiguity rates, splits, the Dataset view and bad input."""
from __future__ import annotations

import hashlib

import pytest
import torch

from contrastive_explanations.data.birds import (CHUNK, CLASSES, GROUPS, PART_NAMES, Birds, BirdSpec, BirdsDataset,
                                            birds_splits, generate_birds, split_seed)

N = 1500


@pytest.fixture(scope="module")
def birds() -> Birds:
    return generate_birds(N, seed=11)


def unambiguous(b: Birds) -> torch.Tensor:
    return (b.occluded_fraction == 0) & (b.faint == 0) & ~b.control


def test_same_seed_same_bytes_other_seed_other_birds():
    a, b, c = generate_birds(48, seed=3), generate_birds(48, seed=3), generate_birds(48, seed=4)
    for name in ("images", "labels", "masks", "occluders", "occluded_fraction", "faint"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert (a.images != c.images).flatten(1).any(1).all()  # every image differs, not just some
    assert not torch.equal(a.labels, c.labels)


def test_first_images_do_not_depend_on_n():
    "Each random quantity has its own stream and the pixel noise is drawn per chunk, so prefixes agree."
    small, large = generate_birds(40, seed=5), generate_birds(CHUNK + 60, seed=5)
    assert small.fingerprint() == large.subset(slice(0, 40)).fingerprint()


def test_fingerprint_sees_every_array(birds):
    b = birds.subset(slice(0, 20))
    reference = b.fingerprint()
    assert len(reference) == 64 and int(reference, 16) >= 0
    for name in ("images", "labels", "masks", "occluders", "occluded_fraction", "faint"):
        changed = b.subset(slice(None))
        t = getattr(changed, name).clone()
        t.view(-1)[0] = t.view(-1)[0] + 1 if t.dtype != torch.bool else ~t.view(-1)[0]
        setattr(changed, name, t)
        assert changed.fingerprint() != reference, name


def test_shapes_and_dtypes(birds):
    S, P, C = 64, len(PART_NAMES), len(CLASSES)
    assert len(birds) == N
    assert birds.images.shape == (N, 3, S, S) and birds.images.dtype == torch.uint8
    assert birds.labels.shape == (N,) and birds.labels.dtype == torch.int64
    assert birds.masks.shape == (N, P, S, S) and birds.masks.dtype == torch.bool
    assert birds.occluders.shape == (N, S, S) and birds.occluders.dtype == torch.bool
    assert birds.occluded_fraction.shape == birds.faint.shape == (N,)
    assert birds.occluded_fraction.dtype == birds.faint.dtype == torch.float32
    assert len(birds.class_names) == C == 12 and len(set(birds.class_names)) == C
    assert birds.part_names == ("body", "head", "beak", "wing", "tail")
    assert birds.class_group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [birds.part_names[j] for j in birds.discriminating_part] == ["head"] * 3 + ["wing"] * 3 + ["tail"] * 3 + [
        "wing"] * 3
    assert set(birds.labels.tolist()) == set(range(C))
    assert birds.images.float().std() > 20  # not blank


def test_other_sizes():
    b = generate_birds(8, seed=1, spec=BirdSpec(size=40))
    assert b.images.shape == (8, 3, 40, 40) and b.masks.shape == (8, len(PART_NAMES), 40, 40)
    assert (b.masks.flatten(2).sum(2) > 0).all()


def test_masks_are_non_empty_disjoint_and_inside_the_image(birds):
    area = birds.masks.flatten(2).sum(2)
    assert (area > 0).all(), area.min(0)
    assert (birds.masks.sum(1) <= 1).all()  # visible parts do not overlap
    bird = birds.masks.any(1)
    border = bird[:, 0] | bird[:, -1]
    assert not border.any() and not (bird[:, :, 0] | bird[:, :, -1]).any()
    # larger parts are larger: body > wing > head > beak, on average
    mean = area.float().mean(0)
    body, head, beak, wing, tail = mean.tolist()
    assert body > wing > head > beak and tail > beak


def test_masks_match_the_pixels(birds):
    "The head of an unambiguous red-headed finch is red, its body is not; the masks are where the colours are."
    red = unambiguous(birds) & (birds.labels == 0)
    x = birds.images[red].float() / 255
    for part, reddish in (("head", True), ("body", False)):
        m = birds.masks[red, PART_NAMES.index(part)]
        rgb = (x * m[:, None]).sum((2, 3)) / m.sum((1, 2))[:, None]
        is_red = (rgb[:, 0] > rgb[:, 1] + 0.3) & (rgb[:, 0] > rgb[:, 2] + 0.3)
        assert is_red.float().mean() > 0.9 if reddish else is_red.float().mean() < 0.1


def part_colours(b: Birds) -> torch.Tensor:
    "(N, P, 3) mean colour of each part, by a plain loop (an oracle independent of the notebook's matrix version)."
    out = torch.zeros(len(b), len(PART_NAMES), 3)
    x = b.images.float() / 255
    for j in range(len(PART_NAMES)):
        m = b.masks[:, j, None].float()
        out[:, j] = (x * m).sum((2, 3)) / m.sum((2, 3))
    return out


def test_only_the_discriminating_part_differs_within_a_group(birds):
    """Per group and part, a chi-square statistic (sum over channels of Welch's z squared) of the difference
    between two species' mean part colours, on the unambiguous images: it is about chi2(3) when the part is drawn
    from one distribution (P(> 25) = 1.5e-5, 48 such comparisons), and huge for the discriminating part."""
    clean = unambiguous(birds)
    colours = part_colours(birds)
    for g, group in enumerate(GROUPS):
        species = [c for c, cls in enumerate(CLASSES) if cls.group == g]
        for j, part in enumerate(PART_NAMES):
            samples = [colours[clean & (birds.labels == c), j] for c in species]
            chi2 = [((a.mean(0) - b.mean(0)) ** 2 / (a.var(0) / len(a) + b.var(0) / len(b))).sum()
                    for k, a in enumerate(samples) for b in samples[k + 1:]]
            if part == group.part:
                assert min(chi2) > 60, (group.name, part, chi2)
            else:
                assert max(chi2) < 25, (group.name, part, chi2)


def test_other_groups_differ_from_each_other(birds):
    "Groups are easy: their bodies' mean colours are far apart."
    clean = unambiguous(birds)
    body = part_colours(birds)[:, 0]
    group = birds.class_group[birds.labels]
    centres = torch.stack([body[clean & (group == g)].mean(0) for g in range(len(GROUPS))])
    assert torch.pdist(centres).min() > 0.1


def test_ambiguity_rates_follow_the_spec(birds):
    spec = BirdSpec()
    occluded, faint, control = birds.occluded_fraction > 0, birds.faint > 0, birds.control
    sd = lambda p: (p * (1 - p) / N) ** 0.5  # noqa: E731
    expected_control = (1 - spec.occlusion_rate - spec.faint_rate) * spec.control_rate
    assert abs(occluded.float().mean() - spec.occlusion_rate) < 4 * sd(spec.occlusion_rate)
    assert abs(faint.float().mean() - spec.faint_rate) < 4 * sd(spec.faint_rate)
    assert abs(control.float().mean() - expected_control) < 4 * sd(expected_control)
    assert not (occluded & faint).any() and not (control & (occluded | faint)).any()
    lo, hi = spec.occlusion_range
    cover = birds.occluded_fraction[occluded]
    assert cover.min() >= lo and cover.max() <= hi + 0.1 and cover.max() > hi - 0.1 and cover.min() < lo + 0.1
    weight = birds.faint[faint]
    assert weight.min() >= spec.faint_range[0] and weight.max() <= spec.faint_range[1]
    assert not birds.occluders[~occluded & ~control].any()  # neither occluded nor control: no blob at all


def test_other_rates():
    b = generate_birds(600, seed=2, spec=BirdSpec(occlusion_rate=0.6, faint_rate=0.0, control_rate=0.0))
    assert abs((b.occluded_fraction > 0).float().mean() - 0.6) < 0.08
    assert (b.faint == 0).all() and not b.control.any()
    none = generate_birds(200, seed=2, spec=BirdSpec(occlusion_rate=0, faint_rate=0, control_rate=0))
    assert not none.occluders.any() and (none.occluded_fraction == 0).all() and (none.faint == 0).all()


def test_occluders_cover_the_recorded_share_and_controls_none(birds):
    part = birds.discriminating_masks()
    covered = (birds.occluders & part).flatten(1).sum(1).float() / part.flatten(1).sum(1).float()
    torch.testing.assert_close(covered, birds.occluded_fraction, rtol=0, atol=1e-6)
    assert not (birds.occluders[birds.control] & near(part[birds.control])).any()
    # controls come from the same size distribution as real occluders
    size = birds.occluders.flatten(1).sum(1).float()
    real, ctrl = size[birds.occluded_fraction > 0].median(), size[birds.control].median()
    assert 0.6 < ctrl / real < 1.4


def test_large_controls_stay_clear_of_the_part():
    "Blobs as large as the part itself rarely find room elsewhere: they are moved and shrunk, never on the part."
    b = generate_birds(400, seed=4, spec=BirdSpec(occlusion_rate=0, faint_rate=0, control_rate=1,
                                                   occlusion_range=(0.95, 1.0)))
    assert not (b.occluders & near(b.discriminating_masks())).any()
    assert b.control.float().mean() > 0.9 and (b.occluded_fraction == 0).all()


def near(mask: torch.Tensor) -> torch.Tensor:
    "The pixels less than 2 pixels from `mask` (N, H, W): a 3 x 3 dilation."
    return torch.nn.functional.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0


def test_lookalikes_stay_clear_of_the_part():
    "The same seed with and without look-alikes differs exactly in their pixels: none touches the part."
    spec = dict(occlusion_rate=0.0, faint_rate=0.0, control_rate=0.0)
    none = generate_birds(300, seed=6, spec=BirdSpec(distractors=(0, 0), **spec))
    many = generate_birds(300, seed=6, spec=BirdSpec(distractors=(8, 8), **spec))
    assert torch.equal(none.masks, many.masks)
    changed = (none.images != many.images).any(1)
    assert changed.flatten(1).sum(1).float().mean() > 50  # they are there
    assert not (changed & near(many.discriminating_masks())).any()


def test_occluded_and_faint_parts_look_less_like_their_class(birds):
    "Distance of the discriminating part's visible colour from its class's clean mean grows with ambiguity."
    colours, part = part_colours(birds), birds.discriminating_part[birds.labels]
    own = colours[torch.arange(N), part]
    clean = unambiguous(birds)
    colour_groups = [c for c, cls in enumerate(CLASSES) if cls.group < 3]  # colour traits
    d_clean, d_faint = [], []
    for c in colour_groups:
        centre = own[clean & (birds.labels == c)].mean(0)
        d_clean.append((own[clean & (birds.labels == c)] - centre).norm(dim=1).mean())
        d_faint.append((own[(birds.faint > 0.7) & (birds.labels == c)] - centre).norm(dim=1).mean())
    assert torch.stack(d_faint).mean() > 3 * torch.stack(d_clean).mean()
    # occluded: the pixels under the blob show the blob, a flat colour far from the class's colour
    for c in colour_groups:
        centre = own[clean & (birds.labels == c)].mean(0)
        i = torch.nonzero((birds.occluded_fraction > 0) & (birds.labels == c))[:, 0]
        under = (birds.occluders[i] & birds.discriminating_masks()[i])[:, None]
        x = birds.images[i].float() / 255
        rgb = (x * under).sum((2, 3)) / under.sum((2, 3))
        sd = (((x - rgb[..., None, None]) ** 2 * under).sum((2, 3)) / under.sum((2, 3))).sqrt()
        assert (rgb - centre).norm(dim=1).median() > 0.25, CLASSES[c].name
        assert sd.mean() < 0.06


def test_splits_are_disjoint_and_deterministic():
    s1 = birds_splits(seed=9, n_train=200, n_val=50, n_test=100)
    s2 = birds_splits(seed=9, n_train=200, n_val=50, n_test=100)
    assert [len(s1[k]) for k in ("train", "val", "test")] == [200, 50, 100]
    assert all(s1[k].fingerprint() == s2[k].fingerprint() for k in s1)
    assert len({split_seed(9, k) for k in s1} | {9}) == 4
    hashes = {k: {hashlib.sha256(img.numpy().tobytes()).digest() for img in s.images} for k, s in s1.items()}
    assert len(hashes["train"]) == 200
    assert not (hashes["train"] & hashes["val"]) and not (hashes["train"] & hashes["test"])
    assert not (hashes["val"] & hashes["test"])
    assert birds_splits(seed=10, n_train=20, n_val=0, n_test=0)["train"].fingerprint() != s1["train"].subset(
        slice(0, 20)).fingerprint()


def test_splits_are_generated_once_and_a_caller_cannot_corrupt_them(monkeypatch):
    import contrastive_explanations.data.birds as module
    drawn = []
    real = module.generate_birds
    monkeypatch.setattr(module, "generate_birds", lambda n, seed, spec: drawn.append(n) or real(n, seed, spec))
    first = birds_splits(seed=123457, n_train=30, n_val=5, n_test=7)
    assert drawn == [30, 5, 7]
    first["train"].images = torch.zeros(1)  # a caller rebinding what it was given
    del first["test"]
    again = birds_splits(seed=123457, n_train=30, n_val=5, n_test=7)
    assert drawn == [30, 5, 7], "the second call must come from the cache"
    assert sorted(again) == ["test", "train", "val"] and again["train"].images.shape == (30, 3, 64, 64)
    fresh = real(30, split_seed(123457, "train"), BirdSpec())  # the cached splits are what a fresh draw gives
    assert again["train"].fingerprint() == fresh.fingerprint()
    birds_splits(seed=123457, n_train=30, n_val=5, n_test=8)  # other arguments: drawn again
    assert drawn[3:] == [30, 5, 8]
    with pytest.raises(ValueError, match="spec must be a BirdSpec"):
        birds_splits(spec={"size": 64})


def test_dataset_view(birds):
    ds = BirdsDataset(birds)
    assert len(ds) == N
    x, y = ds[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal((x * 255).round().to(torch.uint8), birds.images[3]) and y == birds.labels[3]
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert xb.shape == (16, 3, 64, 64) and yb.dtype == torch.int64 and xb.max() > 0.5
    x, y, m = BirdsDataset(birds, masks=True)[5]
    assert torch.equal(m, birds.masks[5])


@pytest.mark.parametrize("make, argument", [
    (lambda: BirdSpec(size=16), "size"),
    (lambda: BirdSpec(size=64.0), "size"),
    (lambda: BirdSpec(occlusion_rate=1.5), "occlusion_rate"),
    (lambda: BirdSpec(faint_rate=-0.1), "faint_rate"),
    (lambda: BirdSpec(control_rate=True), "control_rate"),
    (lambda: BirdSpec(occlusion_rate=0.7, faint_rate=0.5), "occlusion_rate \\+ faint_rate"),
    (lambda: BirdSpec(occlusion_range=(0.9, 0.3)), "occlusion_range"),
    (lambda: BirdSpec(occlusion_range=(0.0, 0.5)), "occlusion_range"),
    (lambda: BirdSpec(faint_range=(0.5, 1.0)), "faint_range"),
    (lambda: BirdSpec(distractors=(3, 1)), "distractors"),
    (lambda: BirdSpec(distractors=(1.5, 2)), "distractors"),
    (lambda: BirdSpec(noise=-1), "noise"),
    (lambda: generate_birds(-1), "n"),
    (lambda: generate_birds(2.5), "n"),
    (lambda: generate_birds(10, seed=-1), "seed"),
    (lambda: generate_birds(10, seed=1.5), "seed"),
    (lambda: generate_birds(10, spec={"size": 64}), "spec"),
    (lambda: birds_splits(n_train=-5), "n_train"),
    (lambda: birds_splits(n_val="10"), "n_val"),
    (lambda: birds_splits(seed=-3), "seed"),
    (lambda: split_seed(0, "validation"), "split"),
    (lambda: BirdsDataset(torch.zeros(3)), "birds"),
])
def test_bad_input_names_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"^{argument} must") as info:
        make()
    message = str(info.value)
    assert "got" in message and any(fix in message for fix in ("pass e.g.", "choose", "lower")), message


def test_generation_leaves_the_thread_setting_alone():
    threads = torch.get_num_threads()
    generate_birds(4, seed=0)
    assert torch.get_num_threads() == threads
