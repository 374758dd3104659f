"""help() on every public class and function shows its parameters and what it returns: the docments comments of
the chapters are source comments, which help() does not show, so each public name also has a docstring with a
`Parameters:` section (one `name: ...` line per parameter) and, for a function or a call, a `Returns:` line."""
from __future__ import annotations

import inspect
import pydoc
import re

import pytest

import contrastive_explanations
import contrastive_explanations.methods
import contrastive_explanations.viz

MODULES = (contrastive_explanations, contrastive_explanations.methods, contrastive_explanations.viz)

# Docstrings written in chapters other than 01_targets, 04_cam, 05_fullgrad, 22_models and 32_viz, still to come:
# (name, what) pairs; strike a pair out when its docstring lands (a strict xfail fails once it passes).
NOT_YET: set[tuple[str, str]] = set()


def public() -> dict[str, object]:
    "Every public class and function the package's `__all__` lists, by name."
    found = {}
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found[name] = obj
    return found


def cases() -> list:
    params = []
    for name, obj in public().items():
        whats = ["signature"] + (["__call__"] if inspect.isclass(obj) and "__call__" in dir(obj)
                                 and callable(getattr(obj, "__call__")) and obj.__call__ is not type.__call__
                                 and getattr(obj.__call__, "__module__", "").startswith("contrastive") else [])
        for what in whats:
            marks = [pytest.mark.xfail(strict=True, reason="its docstring is written elsewhere")] \
                if (name, what) in NOT_YET else []
            params.append(pytest.param(name, what, marks=marks, id=f"{name}-{what}"))
    return params


def parameters(fn) -> list[str]:
    "The parameters help() should explain: all but self/cls and **kwargs."
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.name not in ("self", "cls") and p.kind is not inspect.Parameter.VAR_KEYWORD]


def documented(doc: str) -> set[str]:
    """The names a `Parameters:` section documents: one `name: ...` line each (`*args:` for a variadic), or one
    paragraph `Parameters: name, what it is; name, ...`."""
    if "Parameters:" not in doc:
        return set()
    section = doc.split("Parameters:", 1)[1].split("Returns:", 1)[0]
    return set(re.findall(r"(?:^\s*|;\s+)\**(\w+)[:,;]", section, re.M))


def shown_by_help(obj, doc: str) -> bool:
    "Every line of `doc` appears in what help(obj) prints."
    text = re.sub(r"^[ |]*", "", pydoc.render_doc(obj, renderer=pydoc.plaintext), flags=re.M)
    return all(line.strip() in text for line in doc.splitlines())


@pytest.mark.parametrize("name, what", cases())
def test_help_shows_the_parameters_and_what_comes_back(name, what):
    obj = public()[name]
    if what == "signature":
        fn = obj
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj) and obj.__init__ is not object.__init__:
            doc += "\n" + (inspect.getdoc(obj.__init__) or "")  # help(cls) shows both
    else:
        fn = obj.__call__
        doc = inspect.getdoc(fn) or ""
    missing = [p for p in parameters(fn) if p not in documented(doc)]
    assert not missing, f"help({name}) does not explain {missing}: add 'Parameters:' lines 'name: what it is'"
    if inspect.isfunction(obj) or what == "__call__":
        assert re.search(r"(^|[.;]\s+)Returns\b", doc, re.M), f"help({name}) does not say what it returns: add 'Returns:'"
    assert shown_by_help(obj, inspect.getdoc(obj) or ""), f"help({name}) does not show its docstring"


def test_the_check_fails_on_a_docments_only_function():
    "nbdev's docments comments are invisible to help(): such a function fails the check above."
    def f(a: int,  # the first
          b: int = 0,  # the second
          ) -> int:  # the sum
        "Add."
        return a + b

    assert documented(inspect.getdoc(f) or "") == set() and "the first" not in pydoc.render_doc(f)
    assert documented("Add.\n\nParameters:\n    a: the first\n    *rest: more\nReturns:\n    int") == {"a", "rest"}
    assert documented("Add. Parameters: a, the first (a, b: c); b, the second. Returns the sum") >= {"a", "b"}


def test_every_public_callable_is_checked():
    names = {n for module in MODULES for n in module.__all__}
    checked = set(public())
    assert {"GradCAM", "build_model", "overlay", "get_target", "WeightedTarget"} <= checked
    assert names - checked <= {"METHODS", "TARGETS", "MODELS", "__version__", "STATIC_CLASS"}, names - checked
