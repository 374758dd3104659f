"""The static class switcher (nbs/90_explorer.ipynb): structure, link, bad input. Its browser behaviour is
tested on the built book in test_browser.py."""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from contrastive_explanations.explorer import figure_png, static_switcher  # noqa: E402


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
