"""The built book in a real browser: headless Debian chromium, driven by playwright, serving _build/html locally.

Builds the embedded book first when it is missing or older than its sources. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_explainer import (CHROMIUM_FLAGS, chromium_path, explain_pixels, open_explainer, relative_error,
                                        serve, upload)

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
STAMP = HTML / ".built-embedded"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = chromium_path()  # $CHROMIUM, else the first chromium on PATH
SOURCES = ["nbs/*.ipynb", "contrastive_explanations/**/*.py", "reference/*.csv", "benchmarks/results/*.json",
           "_toc.yml", "_config.yml", "params/embedded.yaml", "tools/*.py", "tools/static/*"]

pytestmark = pytest.mark.browser


def _book_is_fresh() -> bool:
    if not STAMP.exists():
        return False
    newest = max(f.stat().st_mtime for pattern in SOURCES for f in ROOT.glob(pattern))
    return STAMP.stat().st_mtime >= newest


@pytest.fixture(scope="session")
def site() -> Path:
    "The embedded book's HTML folder, built (by the main job's own script) when missing or stale."
    if not _book_is_fresh():
        subprocess.run([sys.executable, "-m", "tools.build_book", "--profile", "embedded"], cwd=ROOT, check=True)
    return HTML


@pytest.fixture(scope="session")
def base_url(site: Path):
    "An HTTP server on 127.0.0.1 (a free port) serving the built book."
    with serve(site) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; `make test` does), "
                    "or set CHROMIUM=/path/to/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class PageLog:
    "Everything a page did that a test may object to: console errors, page errors, outside and failed requests."

    def __init__(self, page, base_url: str):
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.failed.append(r.url))
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)

        def route(r):
            if r.request.url.startswith(base_url) or r.request.url.startswith("data:"):
                r.continue_()
            else:
                self.outside.append(r.request.url)
                r.abort()

        page.route("**/*", route)

    def assert_clean(self):
        assert not self.outside, f"requests left 127.0.0.1: {self.outside}"
        assert not self.failed, f"failed requests: {self.failed}"
        assert not self.errors, f"errors in the console: {self.errors}"


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.log = PageLog(page, base_url)
    yield page
    context.close()


VISIBLE_IMAGE_SOURCES = """() => [...document.querySelectorAll('.jupyter-widgets img')]
    .filter(img => img.offsetParent !== null).map(img => img.src)"""


def _open(page, base_url: str, path: str):
    page.goto(f"{base_url}/{path}", wait_until="networkidle")
    page.wait_for_function("() => document.querySelectorAll('mjx-container').length > 0", timeout=30_000)


from contrastive_explanations.viz import STATIC_CLASS  # noqa: E402
from tools.build_book import toc_chapters  # noqa: E402

PAGES = ["index.html", *(f"executed/{chapter}.html" for chapter in toc_chapters(ROOT)), "executed/statistics.html"]


@pytest.mark.parametrize("path", PAGES)
def test_page_loads_offline_without_errors(page, base_url, path):
    "Every page of the book: no request outside 127.0.0.1, no failed request, no console error."
    page.goto(f"{base_url}/{path}", wait_until="networkidle")
    assert page.title()
    page.log.assert_clean()


EXPLORER_CALLS = ("static_switcher(", "static_explorer(", "static_grid(")
EXPLORER_CHAPTERS = [c for c in toc_chapters(ROOT)
                     if any(call in (ROOT / "nbs" / f"{c}.ipynb").read_text() for call in EXPLORER_CALLS)]
MAX_PAGE_MB = 15


def test_every_explorer_chapter_is_tested():
    assert {"index", "01_targets", "19_explorer"} <= set(EXPLORER_CHAPTERS), EXPLORER_CHAPTERS


@pytest.mark.parametrize("chapter", EXPLORER_CHAPTERS)
def test_static_explorer_controls_change_the_picture(page, base_url, site, chapter):
    "Each menu of each static explorer, changed, changes the picture shown; screenshots before and after."
    size_mb = (site / "executed" / f"{chapter}.html").stat().st_size / 1e6
    assert size_mb < MAX_PAGE_MB, f"{chapter}.html weighs {size_mb:.1f} MB"
    _open(page, base_url, f"executed/{chapter}.html")
    page.locator(".widget-dropdown select").first.wait_for(timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    menus = page.locator(".widget-dropdown select")
    checked = 0
    for m in range(menus.count()):
        menu = menus.nth(m)
        options = menu.locator("option").all_inner_texts()
        if len(options) < 2 or not menu.is_visible():
            continue
        widget = menu.locator(f"xpath=ancestor::div[contains(@class, '{STATIC_CLASS}')][1]")
        if widget.count() == 0:
            continue  # a live control (the live explorer's menus): it needs a kernel, so the static page ignores it
        menu.scroll_into_view_if_needed()
        before = page.evaluate(VISIBLE_IMAGE_SOURCES)
        widget.screenshot(path=str(ARTIFACTS / f"{chapter}-menu{m}-before.png"))
        for label in options[1:3]:
            menu.select_option(label=label)
            page.wait_for_timeout(300)
            after = page.evaluate(VISIBLE_IMAGE_SOURCES)
            assert after and after != before, f"{chapter}: menu {m} -> {label!r} did not change the picture"
            before = after
        widget.screenshot(path=str(ARTIFACTS / f"{chapter}-menu{m}-after.png"))
        menu.select_option(index=0)
        page.wait_for_timeout(200)
        checked += 1
    assert checked >= 1, f"{chapter}: no menu with two or more options was found"
    page.log.assert_clean()


def test_mathjax_renders_the_equations(page, base_url):
    _open(page, base_url, "executed/01_targets.html")
    rendered = page.evaluate("() => document.querySelectorAll('mjx-container').length")
    raw = page.evaluate("() => document.querySelectorAll('div.math:not(:has(mjx-container))').length")
    assert rendered >= 10 and raw == 0, f"{rendered} formulas rendered, {raw} display equations left raw"
    labels = page.locator("span.eqno").all_inner_texts()
    assert len(labels) >= 7, f"numbered equations: {labels}"
    page.log.assert_clean()


DIRECTIVE_LINES = """() => [...document.querySelectorAll('div.cell_input pre, div.highlight pre')]
    .flatMap(pre => pre.textContent.split('\\n')).filter(line => line.trimStart().startsWith('#|'))"""
SAVED_WIDGETS = """() => [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-state+json"]')]
    .flatMap(s => Object.values(JSON.parse(s.textContent).state || {}).map(m => m.model_name))"""
PROGRESS_MODELS = {"FloatProgressModel", "IntProgressModel"}


@pytest.mark.parametrize("path", PAGES)
def test_no_page_shows_nbdev_directives_or_progress_bars(page, base_url, path):
    "No `#| export` (or any nbdev directive line) in a code cell, and no tqdm progress bar, saved or drawn."
    page.goto(f"{base_url}/{path}", wait_until="networkidle")
    assert page.evaluate(DIRECTIVE_LINES) == [], f"{path} shows nbdev directive lines"
    saved = page.evaluate(SAVED_WIDGETS)
    assert not PROGRESS_MODELS & set(saved), f"{path} stores progress-bar widgets: {sorted(set(saved))}"
    assert page.locator(".widget-progress").count() == 0, f"{path} draws a progress bar"


FIRST_CODE_AND_EXPLORER = f"""() => {{
    const visible = el => el.checkVisibility ? el.checkVisibility()  // false inside a closed <details> (hide-input)
                                             : el.offsetParent !== null && el.getClientRects().length > 0;
    const code = [...document.querySelectorAll('div.cell_input')].find(visible);
    const explorer = document.querySelector('.{STATIC_CLASS}');
    return {{code: code ? code.getBoundingClientRect().top + window.scrollY : null,
             explorer: explorer ? explorer.getBoundingClientRect().top + window.scrollY : null}};
}}"""


def test_the_introduction_opens_with_a_working_explorer(page, base_url):
    "The first page shows a class-comparison explorer on its first screen, above any visible code."
    _open(page, base_url, "index.html")  # the root redirects to executed/index.html
    page.locator(f".{STATIC_CLASS}").first.wait_for(timeout=30_000)
    where = page.evaluate(FIRST_CODE_AND_EXPLORER)
    assert where["explorer"] is not None, "the Introduction has no static explorer"
    assert where["code"] is None or where["explorer"] < where["code"], f"code comes before the explorer: {where}"
    assert where["explorer"] < page.viewport_size["height"], f"the explorer starts below the first screen: {where}"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "introduction-first-screen.png"))
    page.log.assert_clean()


VISIBLE_PICTURE = f"""() => {{
    const shown = [...document.querySelectorAll('.{STATIC_CLASS} img')].find(el => el.offsetParent !== null
                                                                         && el.getClientRects().length > 0);
    return shown ? {{shown: shown.getBoundingClientRect().width, natural: shown.naturalWidth}} : null;
}}"""


def test_the_introductions_comparison_maps_are_large_enough_to_compare(page, base_url):
    "At a 1280 px window each panel of the Introduction's comparison figure is drawn at least 200 px wide."
    import inspect

    from contrastive_explanations.explorer import static_explorer
    from contrastive_explanations.viz import comparison_figure

    _open(page, base_url, "index.html")
    page.locator(f".{STATIC_CLASS}").first.wait_for(timeout=30_000)
    picture = page.evaluate(VISIBLE_PICTURE)
    assert picture and picture["natural"] > 0, "the Introduction's explorer shows no picture"
    defaults = {k: v.default for f in (static_explorer, comparison_figure)
                for k, v in inspect.signature(f).parameters.items() if v.default is not inspect.Parameter.empty}
    panel = defaults["size"] * defaults["dpi"] * picture["shown"] / picture["natural"]  # a panel's drawn width
    assert panel >= 200, f"each comparison panel is drawn {panel:.0f} px wide (picture {picture}): too small to compare"


# ---------------------------------------------------------------------------------------------------------------
# The Introduction's photo explainer: the reader's own image, explained in the page (tools/static/photo-explainer.js)

EXPLAINED_PHOTOS = ("chelsea", "coffee")
RECORD_STATES = """() => { const box = document.querySelector('.photo-explainer'); window.peStates = [];
    new MutationObserver(() => window.peStates.push(box.dataset.state))
        .observe(box, {attributes: true, attributeFilter: ['data-state']}); }"""


@pytest.fixture(scope="module")
def lite0():
    from contrastive_explanations.data.models import build_model

    return build_model("efficientnet_lite0")


def _photo(name: str):
    from contrastive_explanations.data.datasets import packaged_photos

    return packaged_photos([name]).photos[0]


def test_the_introduction_explains_an_uploaded_photo(page, base_url, lite0, tmp_path):
    "Two packaged photos through the file input: a busy state, then maps; the top class is Python's; no request out."
    import torch
    from PIL import Image

    open_explainer(page, base_url)
    page.evaluate(RECORD_STATES)
    ARTIFACTS.mkdir(exist_ok=True)
    for name in EXPLAINED_PHOTOS:
        photo = _photo(name)
        _, last = upload(page, photo.path)
        with Image.open(photo.path) as im, torch.no_grad():
            p = lite0(lite0.preprocess(im.convert("RGB"))[None]).softmax(1)[0]
        p_page = torch.tensor(last["logits"]).softmax(0)
        assert last["class"] == int(p.argmax()), f"{name}: the page's top class is not Python's"
        assert abs(float(p_page[last["class"]] - p[last["class"]])) < 0.05, f"{name}: {p_page.max()} vs {p.max()}"
        assert set(last["maps"]) == {"original", "weighted", "mean", "max"}
        assert all(max(map(abs, m)) > 0 for m in last["maps"].values())
        page.locator(".photo-explainer").screenshot(path=str(ARTIFACTS / f"photo-explainer-{name}.png"))
    assert "busy" in page.evaluate("() => window.peStates"), "no busy state was shown while computing"
    (tmp_path / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    page.locator(".photo-explainer input[type=file]").set_input_files(str(tmp_path / "not-an-image.png"))
    page.wait_for_function("() => document.querySelector('.photo-explainer').dataset.state === 'error'")
    assert "cannot decode not-an-image.png" in page.inner_text(".pe-status")
    page.log.assert_clean()


@pytest.mark.parametrize("method", ["gradcam", "linear_approximation", "xgradcam"])
def test_the_explainer_computes_what_python_computes_on_the_same_pixels(page, base_url, lite0, method):
    "Given Python's own preprocessed pixels, the page's logits and maps are the package's within 1e-4 relative."
    from PIL import Image

    from contrastive_explanations.methods import METHODS

    open_explainer(page, base_url)
    for name in EXPLAINED_PHOTOS:
        with Image.open(_photo(name).path) as im:
            x = lite0.preprocess(im.convert("RGB"))
        got = explain_pixels(page, x, method)
        e = METHODS[method](lite0)(x[None], [got["class"]], ["original", "weighted", "mean", "max"])
        assert got["method"] == method and got["class"] == int(e.logits.argmax())
        assert relative_error(got["logits"], e.logits[0].numpy()) < 1e-4, name
        for i, target in enumerate(e.targets):
            assert relative_error(got["maps"][target], e.maps[0, 0, i].flatten().numpy()) < 1e-4, (name, target)
    page.log.assert_clean()
