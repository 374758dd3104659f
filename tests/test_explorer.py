"""The static class switcher (nbs/19_explorer.ipynb): structure, link, bad input. Its browser behaviour is
tested on the built book in test_browser.py."""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from contrastive_explanations.viz import figure_jpeg, figure_png, picture_format, static_switcher  # noqa: E402


def png(color: str) -> bytes:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.set_facecolor(color)
    return figure_png(fig, dpi=20)


def test_figure_png_renders_and_closes_the_figure():
    before = len(plt.get_fignums())
    data = png("red")
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(plt.get_fignums()) == before


def test_jpeg_pictures_are_told_from_png_and_shown_as_jpeg():
    fig, ax = plt.subplots(figsize=(1, 1))
    jpeg = figure_jpeg(fig, dpi=20)
    assert jpeg.startswith(b"\xff\xd8\xff") and not plt.fignum_exists(fig.number)
    assert picture_format(jpeg) == "jpeg" and picture_format(png("red")) == "png"
    with pytest.raises(ValueError, match="neither PNG nor JPEG"):
        picture_format(b"GIF89a....")
    menu, stack = static_switcher({"photo": jpeg, "chart": png("blue")}).children
    assert [child.format for child in stack.children] == ["jpeg", "png"]
    grid = static_grid({"A": ["a"]}, lambda A: jpeg)
    assert grid.children[1].children[0].format == "jpeg"


def test_switcher_stacks_one_page_per_label_in_order():
    pages = {"first": png("red"), "second": png("blue"), "third": widgets.HTML("<b>any widget</b>")}
    box = static_switcher(pages, description="Class")
    menu, stack = box.children
    assert isinstance(menu, widgets.Dropdown) and isinstance(stack, widgets.Stack)
    assert list(menu.options) == list(pages) and menu.description == "Class"
    assert [bytes(c.value) for c in stack.children[:2]] == [pages["first"], pages["second"]]
    assert stack.children[2] is pages["third"]
    assert menu.index == stack.selected_index == 0


def test_switcher_links_menu_and_stack_in_the_browser():
    "The saved widget state (what the static page loads) links the menu's index to the stack, browser side."
    box = static_switcher({"a": png("red"), "b": png("blue")})
    menu, stack = box.children
    state = widgets.Widget.get_manager_state(drop_defaults=False)["state"]
    links = [m["state"] for m in state.values() if m["model_name"] == "LinkModel"]
    wanted = {"source": [f"IPY_MODEL_{menu.model_id}", "index"],
              "target": [f"IPY_MODEL_{stack.model_id}", "selected_index"]}
    assert sum(all(link.get(k) == v for k, v in wanted.items()) for link in links) == 1, links


def test_switcher_refuses_bad_pages():
    with pytest.raises(ValueError, match="at least one page"):
        static_switcher({})
    with pytest.raises(TypeError, match="page 'x' is a str: pass PNG or JPEG bytes"):
        static_switcher({"x": "picture.png"})


# ---- the static grid and the live explorer (the command line: test_cli.py)
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from contrastive_explanations.explorer import (LiveExplorer, class_choices, explain_all,  # noqa: E402
                                               parse_classes, static_explorer)
from contrastive_explanations.viz import (STATIC_CLASS, colour_range, comparison_figure, grid_bytes,  # noqa: E402
                                          static_grid)
from contrastive_explanations.data.models import ImageClassifier, pixel_preprocess  # noqa: E402

from conftest import tiny_cnn  # noqa: E402


def tiny_classifier(classes: int = 5) -> ImageClassifier:
    net = tiny_cnn(classes, 0, widths=(6, 8), batch_norm=False, pool=1, dtype=torch.float32)
    return ImageClassifier("tiny", net, [0.5] * 3, [0.25] * 3, [f"c{i}" for i in range(classes)],
                           pixel_preprocess(24, 24), default_layer="net.2").eval()


def links(box) -> list:
    from ipywidgets.widgets.widget_link import Link
    from ipywidgets.widgets.widget import _instances
    return [w for w in list(_instances.values()) if isinstance(w, Link)
            and any(w.source[0] is d for d in box.children[0].children)]


def test_static_grid_one_picture_per_combination_each_menu_linked():
    calls = []
    def render(A, B):
        calls.append((A, B))
        return png(["red", "blue", "green"][len(calls) % 3])
    grid = static_grid({"A": ["a1", "a2"], "B": ["b1", "b2", "b3"]}, render)
    assert sorted(calls) == [(a, b) for a in ("a1", "a2") for b in ("b1", "b2", "b3")]
    menus, stack = grid.children
    assert [m.description for m in menus.children] == ["A", "B"] and len(stack.children) == 2
    assert all(len(s.children) == 3 for s in stack.children)
    assert len(links(grid)) == 1 + 2  # the first menu to the outer stack, the second to each inner stack
    assert grid_bytes(grid) == sum(len(i.value) for s in stack.children for i in s.children)
    assert STATIC_CLASS in grid._dom_classes and STATIC_CLASS in static_switcher({"x": png("red")})._dom_classes
    with pytest.raises(ValueError, match="at least one option"):
        static_grid({"A": []}, render)


def test_class_choices():
    assert class_choices(3) == {"1st class": (0,), "2nd class": (1,), "3rd class": (2,), "1st and 2nd": (0, 1)}
    assert class_choices(1) == {"1st class": (0,)}


def test_static_explorer_on_a_tiny_model():
    model = tiny_classifier()
    x = torch.rand(2, 3, 24, 24)
    e = explain_all(model, x, ["gradcam", "gradient"], k=2)
    assert e["gradcam"].maps.shape == (2, 2, 4, 24, 24) and e["gradient"].targets == ("original", "weighted", "mean", "max")
    box = static_explorer(x, e, ["one", "two"], model.categories, dpi=30)
    menus, stack = box.children
    assert [list(m.options) for m in menus.children] == [["one", "two"], ["gradcam", "gradient"],
                                                        list(class_choices(2))]
    pictures = [bytes(i.value) for s in stack.children for m in s.children for i in m.children]
    assert len(pictures) == 2 * 2 * 3 and len(set(pictures)) == len(pictures), "every choice draws another picture"
    assert {picture_format(p) for p in pictures} == {"jpeg"}  # photographs with maps: light pages
    with pytest.raises(ValueError, match="image_labels"):
        static_explorer(x, e, ["one"])
    with pytest.raises(ValueError, match="unknown method"):
        explain_all(model, x, ["gradcamm"])


def test_comparison_figure_rows_and_titles():
    model = tiny_classifier()
    x = torch.rand(1, 3, 24, 24)
    e = explain_all(model, x, ["gradcam"], k=3)["gradcam"]
    fig = comparison_figure(x[0], e, (0, 2), model.categories)
    titles = [ax.get_title() for ax in fig.axes]
    p = e.logits[0].softmax(-1)
    c0 = int(e.classes[0, 0])
    assert len(fig.axes) == 2 * 5 and titles[0] == f"c{c0}\np = {p[c0]:.2f}" and titles[1:5] == list(e.targets)
    plt.close(fig)


def test_parse_classes():
    assert parse_classes("top", 10) is None and parse_classes(" ", 10) is None
    assert parse_classes("3, 7 1", 10) == [3, 7, 1]
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        parse_classes("3, 10", 10)
    with pytest.raises(ValueError, match="separated by commas"):
        parse_classes("cat", 10)


def _png_file(path, size=(30, 20)):
    Image.new("RGB", size, (200, 40, 40)).save(path)
    return path


def test_live_explorer_driven_from_python(tmp_path):
    live = LiveExplorer({"tiny": tiny_classifier}, k=2)
    open_figures = plt.get_fignums()
    assert live.explain() is None and "no image" in live.status.value
    live.path.value = str(tmp_path / "missing.png")
    assert live.explain() is None and "no image at" in live.status.value
    (tmp_path / "notes.txt").write_text("not an image")
    live.path.value = str(tmp_path / "notes.txt")
    assert live.explain() is None and "not an image" in live.status.value
    live.path.value = str(_png_file(tmp_path / "red.png"))
    live.classes.value = "1, 4"
    live.targets.value = ("original", "weighted")
    fig = live.explain()
    assert fig is not None and len(fig.axes) == 2 * 3 and "top classes" in live.status.value
    assert plt.get_fignums() == open_figures  # shown in the output area only: Jupyter shows open figures again
    first = bytes(figure_png(fig))
    live.method.value = "gradient"
    assert bytes(figure_png(live.explain())) != first
    live.save_path.value = str(tmp_path / "out" / "fig.png")
    assert live.save_figure() == tmp_path / "out" / "fig.png"
    assert (tmp_path / "out" / "fig.png").read_bytes().startswith(b"\x89PNG")
    buffer = __import__("io").BytesIO()
    Image.new("RGB", (16, 16), (0, 90, 200)).save(buffer, format="PNG")
    live.upload.value = ({"name": "up.png", "type": "image/png", "size": len(buffer.getvalue()),
                          "content": memoryview(buffer.getvalue()),
                          "last_modified": __import__("datetime").datetime(2026, 1, 1)},)
    live.classes.value = "top"
    assert live.explain() is not None and len(live.result) == 5
    live.classes.value = "9"
    assert live.explain() is None and "outside" in live.status.value


def test_colour_range_ignores_a_few_outlier_pixels():
    m = torch.zeros(64, 64)
    m[:8] = -0.25  # 512 pixels of faint negative evidence
    m[40, 40] = 9.0  # one outlier
    assert colour_range(m) == pytest.approx(0.25) and colour_range(m, 100) == 9.0
    assert colour_range(m.numpy()) == colour_range(m)
    assert colour_range(torch.zeros(5)) == 1.0 and colour_range(torch.zeros(0)) == 1.0
    spike = torch.zeros(1000)
    spike[0] = 2.0  # fewer non-zero values than the percentile leaves: falls back to the maximum
    assert colour_range(spike) == 2.0
    with pytest.raises(ValueError, match="percentile must be in"):
        colour_range(m, 0)


def test_live_explorer_buttons_report_every_error_and_offer_only_fitting_methods(tmp_path):
    live = LiveExplorer({"tiny": tiny_classifier}, k=2)
    assert "gradcam" in live.method.options and not {"vit_gradcam", "attention_rollout"} & set(live.method.options)
    live.upload.value = ({"name": "x.png", "type": "image/png", "size": 12, "content": memoryview(b"not an image"),
                          "last_modified": __import__("datetime").datetime(2026, 1, 1)},)
    live._guarded(live.explain)
    assert "not an image PIL can read" in live.status.value and "object at" not in live.status.value
    assert not live.run.disabled  # the busy state ends, also after an error
    live.upload.value = ()
    live.path.value = str(_png_file(tmp_path / "red.png"))
    assert live.explain() is not None and not live.run.disabled
    (tmp_path / "taken").write_text("a file where the folder should be")
    live.save_path.value = str(tmp_path / "taken" / "figure.png")
    live.save.click()  # the button's callback: the error lands in the status line, it does not escape
    assert "Error" in live.status.value and not (tmp_path / "taken" / "figure.png").exists()


def test_overlay_draws_one_map_with_a_colour_bar_or_into_a_panel():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from contrastive_explanations.viz import overlay

    image, m = torch.rand(3, 16, 16), torch.linspace(-3, 1, 16).view(4, 4)
    fig = overlay(image, m)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    bar = fig.axes[1]
    assert "for the class" in bar.get_ylabel() and "against" in bar.get_ylabel()
    low, high = bar.get_ylim()
    assert low == pytest.approx(-high) and high == pytest.approx(3.0)  # centred on zero, the largest |value|
    panel_fig, ax = plt.subplots()
    assert overlay(ax, image, m) is None and len(panel_fig.axes) == 1
    with pytest.raises(TypeError, match=r"\(image, map\) for a new figure, or \(ax, image, map\)"):
        overlay(image)
    plt.close("all")


def test_the_explorers_say_which_rollout_is_the_contrastive_one(tmp_path):
    "attention_rollout (ReLU kept) is not called contrastive; the signed rollout is offered, and its maps are that rollout."
    from contrastive_explanations.explorer import METHOD_NOTES, method_title
    from contrastive_explanations.methods.vit import AttentionRollout
    from conftest import tiny_vit

    vit = tiny_vit(0, 16, 5, dtype=torch.float32)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    e = explain_all(vit, x, ["attention_rollout_signed"], k=2)["attention_rollout_signed"]
    top = vit(x).topk(2, dim=1).indices
    torch.testing.assert_close(e.maps, AttentionRollout(vit, variant="signed")(x, top, list(e.targets)).maps)
    assert "not the contrastive rollout" in METHOD_NOTES["attention_rollout"]
    assert "contrastive rollout" in METHOD_NOTES["attention_rollout_signed"] and "not" not in METHOD_NOTES["attention_rollout_signed"]
    assert method_title("gradcam") == "gradcam" and METHOD_NOTES["attention_rollout"] in method_title("attention_rollout")

    classifier = lambda: ImageClassifier("tinyvit", tiny_vit(0, 16, 5, dtype=torch.float32), [0.5] * 3, [0.25] * 3,
                                         [f"c{i}" for i in range(5)], pixel_preprocess(16, 16))
    live = LiveExplorer({"tinyvit": classifier}, k=2)
    assert {"attention_rollout", "attention_rollout_signed"} <= set(live.method.options)
    live.path.value = str(_png_file(tmp_path / "red.png"))
    live.method.value = "attention_rollout"
    fig = live.explain()
    assert fig is not None and "not the contrastive rollout" in fig._suptitle.get_text()
