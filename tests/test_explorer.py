"""The static class switcher (nbs/22_explorer.ipynb): structure, link, bad input. Its browser behaviour is
tested on the built book in test_browser.py."""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from contrastive_explanations.viz import figure_png, static_switcher  # noqa: E402


def png(color: str) -> bytes:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.set_facecolor(color)
    return figure_png(fig, dpi=20)


def test_figure_png_renders_and_closes_the_figure():
    before = len(plt.get_fignums())
    data = png("red")
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(plt.get_fignums()) == before


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
    with pytest.raises(TypeError, match="page 'x' is a str: pass PNG bytes"):
        static_switcher({"x": "picture.png"})


# ---- the static grid, the live explorer and the command line
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from contrastive_explanations.explorer import (LiveExplorer, class_choices, explain_all, main,  # noqa: E402
                                               parse_classes, static_explorer)
from contrastive_explanations.viz import (STATIC_CLASS, colour_range, comparison_figure, grid_bytes,  # noqa: E402
                                          static_grid, static_switcher)
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


def test_cli_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--method" in out and "original (logit) and contrastive" in out


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    good = _png_file(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("hello")
    for args, word in (([str(good), str(tmp_path / "nope.jpg")], "no image at"),
                       ([str(good), str(tmp_path / "notes.txt")], "not an image"),
                       ([str(good), "--targets", "weighted", "banana"], "unknown target"),
                       ([str(good), "--model", "resnet1"], "unknown model"),
                       ([str(good), "--classes", "1000"], "outside [0, 1000)")):
        assert main([*args, "--out-dir", str(tmp_path / "out")]) == 2, args
        assert word in capsys.readouterr().err, args
        assert not (tmp_path / "out").exists()


def test_cli_writes_a_figure_and_the_top_classes(tmp_path, capsys):
    import skimage.data
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.jpg")
    assert main([str(tmp_path / "chelsea.jpg"), "--top-k", "2", "--out-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "chelsea.json").read_text())
    assert (tmp_path / "out" / "chelsea.png").read_bytes().startswith(b"\x89PNG")
    assert report["explained"] == [t["class"] for t in report["top"][:2]] and "cat" in report["top"][0]["name"]
    assert abs(sum(t["probability"] for t in report["top"])) <= 1.0 + 1e-6


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


def test_cli_refuses_what_would_have_been_a_traceback_or_a_lie(tmp_path, capsys):
    good = _png_file(tmp_path / "good.png")
    (tmp_path / "a_file").write_text("not a folder")
    for args, word in (([str(good), "--top-k", "5000"], "more than the 1000 classes"),
                       ([str(good), "--method", "vit_gradcam"], "does not fit --model efficientnet_lite0"),
                       ([str(good), "--method", "attention_rollout"], "does not fit --model efficientnet_lite0"),
                       ([str(good), "--model", "vgg16_bn_cub"], "pass its --checkpoint"),
                       ([str(good), "--layer", "no.such.layer"], "no layer 'no.such.layer'"),
                       ([str(good), "--method", "gradient", "--layer", "net.features"], "takes no --layer"),
                       ([str(good), "--device", "banana"], "is not a device"),
                       ([str(good), "--out-dir", str(tmp_path / "a_file")], "is a file, not a folder")):
        out = args[-1] if "--out-dir" in args else str(tmp_path / "out")
        argv = args if "--out-dir" in args else [*args, "--out-dir", out]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        assert main([str(good), "--device", "cuda", "--out-dir", str(tmp_path / "out")]) == 2
        assert "no GPU here" in capsys.readouterr().err


def test_cli_same_names_do_not_collide_and_maps_can_be_saved(tmp_path, capsys):
    import stat

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = _png_file(tmp_path / "a" / "x.png"), _png_file(tmp_path / "b" / "x.png")
    out = tmp_path / "out"
    assert main([str(first), str(second), "--save-maps", "--layer", "net.features", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x-2.json", "x-2.npz", "x-2.png", "x.json", "x.npz", "x.png"]
    assert json.loads((out / "x-2.json").read_text())["image"] == str(second)
    with np.load(out / "x.npz") as saved:
        assert saved["maps"].shape[:2] == (2, 4) and list(saved["targets"]) == ["original", "weighted", "mean", "max"]
        assert saved["classes"].tolist() == json.loads((out / "x.json").read_text())["explained"]
        assert (np.diff(saved["probabilities"]) <= 0).all()  # the top-2, in order
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "x.json").stat().st_mode) == 0o666 & ~umask  # the user's umask, not 0600


def test_cli_version_and_help_name_the_models(capsys):
    from contrastive_explanations import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("efficientnet_lite0", "resnet18", "vgg16_bn_cub", "--save-maps", "--device"))


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
