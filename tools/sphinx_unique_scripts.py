"""Sphinx extension for the book: drop repeated inline scripts from every page.

Sphinx 7.4 keeps an inline script that an extension adds at `builder-inited` both in its registry and in the
builder, so each page carries it twice (once with filename None, once with ""). For sphinx-thebe's `const THEBE_JS_URL = ...` the second copy throws
"Identifier 'THEBE_JS_URL' has already been declared" in the browser console.
"""


def _unique_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for script in context.get("script_files", []):
        key = (getattr(script, "filename", script) or "", repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"][:] = kept  # in place: later handlers append to the same list


def setup(app):
    # last, after the handlers that add scripts (none of them returns a value, which would end the event early)
    app.connect("html-page-context", _unique_scripts, priority=999)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
