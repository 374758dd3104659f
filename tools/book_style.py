"""Sphinx extension for the book: its own style sheet, `tools/static/book.css`, on every page (wide code, outputs
and display equations scroll inside the column; the pages' footer line is set small), and the photo
explainer's script, `tools/static/photo-explainer.js`, which acts only on a page with a `.photo-explainer` box.

The sheet is served from this folder's `static/` (added to `html_static_path` here, so it is there also when the
build falls back to the CDN assets and `_config.yml`'s `html_static_path` is dropped).
"""
from pathlib import Path

STATIC = Path(__file__).resolve().with_name("static")
CSS = "book.css"
JS = "photo-explainer.js"


def _serve_static(app, config):
    config.html_static_path = [*config.html_static_path, str(STATIC)]


def setup(app):
    app.connect("config-inited", _serve_static)
    app.add_css_file(CSS)
    app.add_js_file(JS)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
