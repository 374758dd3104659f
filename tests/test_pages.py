"""The executed pages of the book, as `make book` left them (make test builds the book first, so on a clean clone
these are the copies whose shard loops and trainings ran): no stderr or progress output, the injected parameters
hidden, and every figure numbered and captioned by one mechanism (the cell's `mystnb.figure` caption and name)."""
import re
from pathlib import Path

import nbformat
import pytest

from tools.build_book import toc_chapters

ROOT = Path(__file__).resolve().parents[1]
FIGURE_PARAGRAPH = re.compile(r"^\s*\**Figure\**\s*:", re.MULTILINE)  # a caption typed as a paragraph


def executed_pages() -> list[Path]:
    pages = [ROOT / "executed" / f"{name}.ipynb" for name in toc_chapters(ROOT) if name != "statistics"]
    return [p for p in pages if p.exists()]


PAGES = executed_pages()
needs_book = pytest.mark.skipif(not PAGES, reason="the book has not been built here: `make book` executes the "
                                                  "chapters first (make test does)")


def shown(cell) -> list[dict]:
    """Every picture or widget a code cell displays on its page (a figure cell must show exactly one); glued values
    are shown where the text cites them, not here."""
    tags = cell.metadata.get("tags", [])
    if cell.cell_type != "code" or {"remove-cell", "remove-output"} & set(tags):
        return []
    return [o for o in cell.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")
            and "scrapbook" not in o.get("metadata", {})]


def shown_pictures(cell) -> list[dict]:
    "The images a code cell shows on its page."
    return [o for o in shown(cell) if "image/png" in o.get("data", {})]


@needs_book
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_no_page_shows_stderr_or_the_injected_parameters(page):
    nb = nbformat.read(page, as_version=4)
    stderr = [(i, o.get("text", "")[:80]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"{page.name} shows stderr output (cell, text): {stderr}"
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert all("remove-cell" in c.metadata["tags"] for c in injected), f"{page.name} shows papermill's parameters"


@needs_book
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_every_figure_is_numbered_and_captioned_one_way(page):
    nb = nbformat.read(page, as_version=4)
    typed = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and FIGURE_PARAGRAPH.search(c.source)]
    assert not typed, f"{page.name}: cells {typed} caption a figure in a 'Figure:' paragraph: put the caption in " \
                      "the figure cell's mystnb.figure metadata (caption and name), which numbers it"
    bare = [i for i, c in enumerate(nb.cells) if shown_pictures(c)
            and not {"caption", "name"} <= set(c.metadata.get("mystnb", {}).get("figure", {}))]
    assert not bare, f"{page.name}: cells {bare} show a figure without mystnb.figure caption and name"
    twice = [i for i, c in enumerate(nb.cells) if "figure" in c.metadata.get("mystnb", {}) and len(shown(c)) > 1]
    assert not twice, f"{page.name}: cells {twice} show more than one output under one figure name (Sphinx refuses " \
                      "the duplicate label): close the pyplot figure before the cell's last expression shows it"


def test_the_checks_see_a_typed_caption_and_a_bare_figure():
    "The page checks fail on what they are meant to catch."
    picture = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})
    bare = nbformat.v4.new_code_cell("plot()", outputs=[picture])
    glued = nbformat.v4.new_code_cell("glue('x', fig)", outputs=[
        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="},
                               metadata={"scrapbook": {"name": "x"}})])
    assert shown_pictures(bare) and not shown_pictures(glued)
    assert len(shown(nbformat.v4.new_code_cell("f", outputs=[picture, picture]))) == 2 and len(shown(glued)) == 0
    assert FIGURE_PARAGRAPH.search("Some text.\n\nFigure: the maps.") and FIGURE_PARAGRAPH.search("**Figure:** a")
    assert not FIGURE_PARAGRAPH.search("See the figure: it shows")
