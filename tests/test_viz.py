"""viz (nbs/32_viz): the one colour rule (signed_limit) that every drawing uses, the images overlay takes, a colour bar
that a plain savefig keeps, and a viz module that imports without the widgets extra."""
from __future__ import annotations

import io
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from contrastive_explanations.methods.explain import Explanation
from contrastive_explanations.viz import comparison_figure, overlay, signed_limit, static_switcher

RNG = np.random.default_rng(0)
HWC = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # not square: a transposed image would show
MAP = torch.linspace(-1, 2, 12).view(3, 4)


def drawn(fig) -> np.ndarray:
    "The picture under the map, as the figure holds it: (H, W, 3)."
    return np.asarray(fig.axes[0].images[0].get_array())


@pytest.mark.parametrize("image", [
    torch.from_numpy(HWC).permute(2, 0, 1),  # (3, H, W) uint8 tensor
    torch.from_numpy(HWC).permute(2, 0, 1).float() / 255,  # (3, H, W) float tensor
    HWC,  # (H, W, 3) uint8 array
    HWC / 255.0,  # (H, W, 3) float array
    HWC.transpose(2, 0, 1),  # (3, H, W) array
    Image.fromarray(HWC),  # PIL
    Image.fromarray(HWC).convert("RGBA"),  # PIL with alpha
], ids=["chw-uint8-tensor", "chw-float-tensor", "hwc-uint8-array", "hwc-float-array", "chw-array", "pil", "pil-rgba"])
def test_overlay_draws_every_kind_of_image_the_same(image):
    fig = overlay(image, MAP)
    np.testing.assert_allclose(drawn(fig), HWC / 255.0, atol=1e-6)
    plt.close(fig)


def test_overlay_draws_grey_images_and_a_map_of_another_size():
    grey = HWC[..., 0]
    fig = overlay(Image.fromarray(grey), MAP)
    np.testing.assert_allclose(drawn(fig), np.repeat(grey[..., None] / 255.0, 3, -1), atol=1e-6)
    assert np.asarray(fig.axes[0].images[1].get_array()).shape == grey.shape  # the map, resized to the image
    plt.close(fig)


@pytest.mark.parametrize("image", [np.zeros((4, 12, 20, 3)), np.zeros((12, 20, 4)), torch.zeros(2, 12, 20)])
def test_overlay_refuses_an_image_it_cannot_draw_in_one_line(image):
    with pytest.raises(ValueError, match=r"an image of shape \(.*\) cannot be drawn: pass a \(3, H, W\)") as e:
        overlay(image, MAP)
    assert "\n" not in str(e.value)


def test_overlay_refuses_a_batch_of_maps():
    with pytest.raises(ValueError, match=r"the map must be \(h, w\), got shape \(1, 3, 4\): pick one"):
        overlay(HWC, MAP[None])


@pytest.mark.parametrize("title", ["", "a long title for a small figure"])
def test_a_plain_savefig_keeps_the_colour_bar_and_its_label(tmp_path, title):
    "No bbox_inches: the colour bar, its ticks and its label lie within the figure as saved."
    fig = overlay(torch.from_numpy(HWC).permute(2, 0, 1), MAP, title=title)  # (3, H, W), which overlay always took
    fig.savefig(tmp_path / "overlay.png")
    renderer = fig.canvas.get_renderer()
    bar = fig.axes[1]
    label = bar.yaxis.label
    assert label.get_text().startswith("← against the class")
    figure = fig.bbox
    for what, box in (("colour bar", bar.get_tightbbox(renderer)), ("its label", label.get_window_extent(renderer)),
                      ("the picture", fig.axes[0].get_tightbbox(renderer))):
        assert (figure.x0 - 0.5 <= box.x0 and box.x1 <= figure.x1 + 0.5 and figure.y0 - 0.5 <= box.y0
                and box.y1 <= figure.y1 + 0.5), f"{what} {box} sticks out of the figure {figure}"
    with Image.open(tmp_path / "overlay.png") as png:
        assert png.size == (round(figure.width), round(figure.height))
    plt.close(fig)


def test_viz_imports_without_ipywidgets_and_says_which_extra_a_menu_needs():
    "The figures are core (the command line draws them); the menus need the 'widgets' extra, and say so."
    code = ("import sys; sys.modules['ipywidgets'] = None\n"  # as if it were not installed
            "import contrastive_explanations.viz as v\n"
            "try:\n    v.static_switcher({'a': b'x'})\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'the static menus need ipywidgets: pip install "contrastive_explanations[widgets]"'


def test_the_menus_still_work_with_ipywidgets():
    png = io.BytesIO()
    Image.fromarray(HWC).save(png, format="png")
    box = static_switcher({"one": png.getvalue(), "two": png.getvalue()})
    menu, stack = box.children
    assert list(menu.options) == ["one", "two"] and len(stack.children) == 2


# ---------------------------------------------------------------------------------------------------------------
# One colour rule: signed_limit, and every drawing in viz uses it

def test_signed_limit_is_the_99_5th_percentile_of_the_absolute_values():
    "1..1000 with alternating signs: numpy's linear percentile is 1 + 0.995 * 999, written out here by hand."
    values = torch.arange(1, 1001, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(500)
    m = values[torch.randperm(1000, generator=torch.Generator().manual_seed(0))].view(25, 40)
    assert signed_limit(m) == pytest.approx(1 + 0.995 * 999)
    assert signed_limit(m, 100) == 1000.0 and signed_limit(m.numpy()) == signed_limit(m)


def test_signed_limit_of_several_maps_is_one_shared_scale():
    faint, loud = torch.full((10, 10), 0.2), torch.full((10, 10), -3.0)
    shared = signed_limit(torch.stack([faint, loud]))
    assert signed_limit(faint) == pytest.approx(0.2) and signed_limit(loud) == 3.0 and shared == 3.0


@pytest.mark.parametrize("m", [torch.zeros(4, 4), torch.zeros(0), np.zeros((2, 3))])
def test_signed_limit_of_a_map_without_evidence_is_one(m):
    assert signed_limit(m) == 1.0


def test_signed_limit_refuses_a_percentile_outside_its_range_in_one_line():
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\], got 0: e.g. 99.5") as e:
        signed_limit(MAP, 0)
    assert "\n" not in str(e.value)


def test_overlay_and_comparison_figure_draw_with_the_same_rule():
    "One outlying patch: both figures saturate at signed_limit of the map as drawn, below the outlier."
    m = torch.full((8, 8), 0.1)
    m[0, 0] = 50.0
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    drawn_map = torch.nn.functional.interpolate(m[None, None], size=(32, 32), mode="bilinear", align_corners=False)
    rule = signed_limit(drawn_map)
    fig = overlay(image, m)
    low, high = fig.axes[1].get_ylim()
    assert high == pytest.approx(rule) and low == pytest.approx(-rule) and rule < 50
    e = Explanation(maps=m[None, None, None], logits=torch.tensor([[1.0, 0.0]]), classes=torch.tensor([[0]]),
                    targets=("original",))
    panel = comparison_figure(image, e).axes[1].images[1]
    assert panel.norm.halfrange == pytest.approx(rule)
    plt.close("all")
