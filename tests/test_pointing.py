"""The pointing games (metrics.pointing): against a brute-force reading of TorchRay's acceptance region, against Quantus
0.6's PointingGame on the same maps and masks, the chance level against simulation, and the contrastive game on the
generated birds' part masks."""
import numpy as np
import pytest
import torch

from contrastive_explanations.metrics import pointing as P


@pytest.fixture(scope="module")
def boxes():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(60, 32, 32, generator=g)  # continuous: no tied maxima
    masks = torch.zeros(60, 32, 32, dtype=torch.bool)
    for i in range(60):
        r, c = torch.randint(0, 27, (2,), generator=g).tolist()
        masks[i, r:r + 5, c:c + 4] = True
    return maps, masks


def torchray_hit(m: torch.Tensor, mask: torch.Tensor, tol: int) -> float:
    "A hit when some mask pixel is closer than `tol` to the map's argmax (or the argmax is on the mask)."
    py, px = divmod(int(m.argmax()), m.shape[-1])
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(bool(mask[py, px]) or bool((((ys - py) ** 2 + (xs - px) ** 2) < tol ** 2).any()))


@pytest.mark.parametrize("tol", [0, 1, 2, 3, 7, 15])
def test_agrees_with_the_acceptance_region(boxes, tol):
    maps, masks = boxes
    expected = [torchray_hit(m, k, tol) for m, k in zip(maps, masks)]
    assert P.pointing_game(maps, masks, tol).tolist() == expected


@pytest.mark.parametrize("tol", [2, 3, 5, 15])
def test_the_disk_is_open(tol):
    point = torch.zeros(41, 41, dtype=torch.bool)
    point[20, 20] = True
    d2 = torch.arange(-20, 21)[:, None] ** 2 + torch.arange(-20, 21)[None, :] ** 2
    assert torch.equal(P.dilate(point, tol), d2 < tol ** 2)  # a pixel at distance exactly tol is out


def test_agrees_with_quantus(boxes):
    quantus = pytest.importorskip("quantus")
    maps, masks = boxes
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=None, x_batch=np.zeros((60, 3, 32, 32), np.float32), y_batch=np.zeros(60, int),
        a_batch=maps.numpy()[:, None], s_batch=masks.numpy()[:, None].astype(np.float32))
    assert np.array_equal(np.asarray(theirs, float), P.pointing_game(maps, masks, 0).numpy())  # no ties: identical


def test_chance_level_matches_simulation(boxes):
    _, masks = boxes
    g = torch.Generator().manual_seed(1)
    for tol in (0, 4):
        uniform = torch.rand(400, 60, 32, 32, generator=g)  # a uniform random peak per map
        simulated = P.pointing_game(uniform, masks, tol).mean(0)
        assert abs(simulated.mean() - P.pointing_chance(masks, tol).mean()) < 0.01  # 24,000 draws: sd about 0.003


def test_undefined_cases_and_bad_input():
    maps = torch.zeros(2, 8, 8)
    maps[1, 3, 3] = 1
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 3, 3] = True
    out = P.pointing_game(maps, mask, 0)
    assert out.isnan().all()  # a constant map; an empty mask
    with pytest.raises(ValueError, match="upsample the maps"):
        P.pointing_game(torch.zeros(8, 8), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="masks > 0"):
        P.pointing_game(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="non-negative int"):
        P.dilate(torch.zeros(8, 8, dtype=torch.bool), -1)


def test_contrastive_game_on_the_birds_parts():
    from contrastive_explanations.data.birds import generate_birds
    from contrastive_explanations.experiments.localisation import contrast_parts

    birds = generate_birds(12, 3)
    t = birds.labels
    s = torch.where(t % 3 == 2, t - 1, t + 1)  # a classmate of the same group (groups of three classes)
    parts = contrast_parts(t, s)
    assert (parts >= 0).all()
    on_part = birds.masks[torch.arange(12), parts]  # (N, H, W)
    maps = torch.zeros(12, 2, 1, *on_part.shape[-2:])
    for i in range(12):  # class 0's map peaks on the part, class 1's on a pixel off the bird
        ys, xs = torch.nonzero(on_part[i], as_tuple=True)
        maps[i, 0, 0, ys[0], xs[0]] = 1
        oy, ox = torch.nonzero(~birds.masks[i].any(0), as_tuple=True)
        maps[i, 1, 0, oy[0], ox[0]] = 1
    hits = P.contrastive_pointing_game(maps, birds.masks, torch.stack([parts, parts], 1))
    assert hits[:, 0].eq(1).all() and hits[:, 1].eq(0).all()
    none = P.contrastive_pointing_game(maps, birds.masks, torch.stack([parts, torch.full_like(parts, -1)], 1))
    assert none[:, 1].isnan().all()
