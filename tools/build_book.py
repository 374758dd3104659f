"""The main job: execute every chapter of the book with papermill on a parameter profile, then build the book.

    python -m tools.build_book [--profile embedded|paper] [--param data_root=/data] [--jobs 2] [--force] [--only NAME]

1. Reads `params/<profile>.yaml`; each notebook receives only the parameters its `parameters` cell declares.
2. Executes `nbs/NAME.ipynb` for every `executed/NAME` entry of `_toc.yml` into `executed/NAME.ipynb` (git-ignored;
   for a profile other than `embedded`, into `executed/PROFILE/NAME.ipynb`, see `BookPaths`). A copy is kept when
   nothing it depends on changed (`chapter_inputs`, recorded in the copy's metadata):
   - its notebook and the parameters it receives;
   - the package modules it runs: those its code cells import (`import contrastive_explanations.x`, `from ... import`,
     a lazily loaded name such as `from contrastive_explanations import GradCAM`, a module named in a shell line or a
     console script), followed through the package's own imports, each module's packages (`__init__.py`) included.
     A module named in a string ('contrastive_explanations.experiments.x:Class', as `results.EXPERIMENTS` does) is
     taken as imported: code may import it by name. Imports under `if TYPE_CHECKING:` never run and do not count;
   - the files it reads: `constraints.txt` (every chapter), `reference/NAME.csv` for a `reference_table("NAME")` in
     its code or in a module it runs (every table when the name is not spelled out), `benchmarks/results/*.json` for
     code that names the folder `benchmarks`;
   - the profile's parts it reads: the profile-wide settings experiments receive (`PROFILE_WIDE`), and the sections
     and settings its code names on `load_profile(...)`'s answer (`config.run_settings("localisation")`,
     `config["seed"]`, `.section`, `.shards`, `.experiments`, `.get`). A chapter that uses the profile any other way
     (passes it to a function, loops over it) depends on the whole profile. `overrides` counts only through them.
   Otherwise it runs, and the console says why ("notebook changed", "contrastive_explanations/viz.py changed
   (imported via contrastive_explanations.explorer)", "reference/review_table1.csv changed", "profile section
   localisation changed", "no earlier copy", "--force"). A chapter that takes no profile is the same in every
   profile, so another profile's up-to-date copy of it is copied instead of executed.
   Chapters whose notebook metadata says `book: {runs_first: true}` (the training chapter, which makes the models
   the experiments open) run first; chapters whose notebook metadata says `book: {reads_results: true}` (they quote
   results other chapters compute) run last, and again whenever another ran ("reads results and 07_perturbation
   ran"). `--jobs N` executes up to N chapters at once within the second and third of these phases, each in its own
   kernel, and prints each chapter's lines together when it ends. `--only NAME` executes that chapter alone and
   builds no book.
   Each executed copy is tidied for reading (`book_pages.tidy_executed`): no nbdev `#|` directive lines, no progress
   bars, no stderr outputs (the console lists them), no injected parameters cell; its last line says which profile
   built it, at which commit and when, links its source notebook and gives the command that reruns it.
3. Writes the execution-statistics page `executed/statistics.md` (each chapter's profile, executed or reused, time,
   commit), builds the Jupyter Book with warnings as errors into a staging folder, and only on success moves it to
   `_build/html` (`_build/PROFILE/html` for another profile, so that building one never replaces the other's book),
   so a failed run never leaves a book that looks good. Timings go to `_build/timings-<profile>.json`.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import nbformat
import papermill as pm
import yaml

from contrastive_explanations.results import CONSOLE_PROGRESS

from .book_assets import ensure_assets
from .book_pages import STATISTICS, add_footer, duration, footer_text, git_commit, statistics_page, tidy_executed

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = "executed"  # toc entries `executed/NAME` are papermill copies of `nbs/NAME.ipynb`
DEFAULT_PROFILE = "embedded"  # its book is _build/html; every other profile's is _build/PROFILE/html
ASSET_KEYS = ("html_static_path", "mathjax_path", "nb_ipywidgets_js")  # dropped for the CDN fallback


# Held while a thread parses Python: on Python 3.11, ast.parse in two threads at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (CPython issue 106905), and --jobs executes chapters from threads.
ONE_THREAD = threading.RLock()


class BuildError(Exception):
    "A failure the user can act on; its message says what went wrong and what to do. Exit status 1."
    status = 1


class UsageError(BuildError):
    "Bad input on the command line or in the profile; nothing was built. Exit status 2."
    status = 2


def load_profile(root: Path, name: str, overrides: dict[str, str]):
    "The profile's settings, through the package's one loader; a bad name or key is a UsageError (exit status 2)."
    from contrastive_explanations.run import ProfileError
    from contrastive_explanations.run import load_profile as load

    try:
        return load(name, overrides, root)
    except ProfileError as e:
        raise UsageError(str(e)) from None


def check_needs(profile) -> None:
    "Stop with one message (a UsageError) if any dataset folder, weight file or checkpoint the profile opens is missing."
    from contrastive_explanations.run import preflight, preflight_report

    report = preflight_report(preflight(profile), profile.name)
    if report:
        raise UsageError(report)


def experiment_chapter(root: Path, cls: type) -> str:
    "The notebook that exports an experiment's class (its `#| default_exp` names the class's module), or ''."
    module = cls.__module__.removeprefix("contrastive_explanations.")
    for nb in sorted((root / "nbs").glob("*.ipynb")):
        if re.search(rf"#\|\s*default_exp\s+{re.escape(module)}\b", nb.read_text()):
            return f"nbs/{nb.name}"
    return ""


def estimate(root: Path, profile, experiments: list[str] | None = None) -> str:
    """Time every run of the profile on its first items (`run.calibrate`) and project each chapter's running
    time on this machine: one report, a line per run and per chapter."""
    from contrastive_explanations.results import find_experiment
    from contrastive_explanations.run import calibrate

    print(f"==> calibrating: every run of profile {profile.name!r} on its first batch", flush=True)
    chapters: dict[str, float] = {}
    lines = []
    for e in calibrate(profile, experiments):
        chapter = experiment_chapter(root, find_experiment(e.experiment)) or e.experiment
        chapters[chapter] = chapters.get(chapter, 0.0) + e.seconds
        lines.append(f"  {chapter} {e.run}: set-up {duration(e.setup_seconds)}, {e.items:,} items at "
                     f"{e.seconds_per_item:.3g} s each (timed on {e.measured}): about {duration(e.seconds)}")
    lines += [f"  {chapter}: about {duration(seconds)}" for chapter, seconds in chapters.items()]
    return (f"estimated running time of profile {profile.name!r} on this machine, each run's experiment only "
            "(the first batch's warm-up counts, so the figures err on the long side; figures, tables and the training "
            "chapter's fine-tuning are not included):\n" + "\n".join(lines) +
            f"\n  in all: about {duration(sum(chapters.values()))}")


def toc_chapters(root: Path) -> list[str]:
    """Names of the notebooks the book lists, in reading order (`executed/NAME` entries of `_toc.yml`, but for the
    statistics page `executed/statistics`, which the build writes)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    names: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    names.append(node[key])
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    chapters = [n.split("/", 1)[1] for n in names if n.startswith(EXECUTED + "/")]
    chapters = [c for c in chapters if c != STATISTICS]  # a page the build writes, not a notebook
    missing = [c for c in chapters if not (root / "nbs" / f"{c}.ipynb").exists()]
    if missing:
        raise BuildError(f"_toc.yml lists {', '.join(missing)} but nbs/ has no such notebook: add it or fix _toc.yml")
    return chapters


@dataclass(frozen=True)
class BookPaths:
    """Where one profile's book is made: its executed copies, its staging folder, the book, and (for a profile
    other than the default) the table of contents that points Jupyter Book at its executed copies.

    The default profile keeps the layout `_toc.yml` names (`executed/NAME`, `_build/html`). Any other profile's
    copies are `executed/PROFILE/NAME.ipynb` and its book `_build/PROFILE/html`, built from `_build/PROFILE/_toc.yml`
    (`_toc.yml` with `executed/` replaced by `executed/PROFILE/`). The book's other pages never see them:
    `_config.yml` builds only the pages its table of contents lists."""
    executed: Path
    staging: Path
    html: Path
    toc: Path | None

    @classmethod
    def of(cls, root: Path, profile: str) -> "BookPaths":
        if profile == DEFAULT_PROFILE:
            return cls(root / EXECUTED, root / "_build" / "staging", root / "_build" / "html", None)
        build = root / "_build" / profile
        return cls(root / EXECUTED / profile, build / "staging", build / "html", build / "_toc.yml")

    def write_toc(self, root: Path) -> None:
        "This profile's table of contents: `_toc.yml` with its executed copies' folder (nothing for the default)."
        if self.toc is None:
            return
        folder = self.executed.relative_to(root).as_posix()
        text = re.sub(rf"(?m)^(\s*(?:-\s*)?(?:root|file):\s*){EXECUTED}/", rf"\g<1>{folder}/",
                      (root / "_toc.yml").read_text())
        self.toc.parent.mkdir(parents=True, exist_ok=True)
        self.toc.write_text(f"# Written by tools/build_book.py from _toc.yml for this profile's executed copies.\n{text}")


def shared_copy(root: Path, chapter: str, key: str, own: Path) -> Path | None:
    """Another profile's executed copy of `chapter` made with the same build key (a chapter that takes no profile
    has the same key in every profile), or None."""
    for candidate in [root / EXECUTED / f"{chapter}.ipynb", *sorted((root / EXECUTED).glob(f"*/{chapter}.ipynb"))]:
        if candidate != own and candidate.is_file():
            try:
                if nbformat.read(candidate, as_version=4).metadata.get("book", {}).get("build_key") == key:
                    return candidate
            except (OSError, ValueError):
                continue
    return None


def runs_first(root: Path, chapter: str) -> bool:
    """Whether a chapter makes what other chapters open (notebook metadata `book: runs_first: true`): the training
    chapter, whose small models and fine-tuned checkpoints the experiment chapters load. It runs before all others,
    wherever the reading order puts it."""
    meta = json.loads((root / "nbs" / f"{chapter}.ipynb").read_text()).get("metadata", {})
    return bool(meta.get("book", {}).get("runs_first"))


def reads_results(root: Path, chapter: str) -> bool:
    """Whether a chapter quotes other chapters' results (notebook metadata `book: reads_results: true`).

    Such chapters (the first page's provenance, the claims table) run after all the others, and again whenever
    any other chapter ran."""
    meta = json.loads((root / "nbs" / f"{chapter}.ipynb").read_text()).get("metadata", {})
    return bool(meta.get("book", {}).get("reads_results"))


# ---- what a chapter reads: the inputs of its executed copy

PACKAGE = "contrastive_explanations"  # the book's package, whose imports are followed
ALWAYS_READ = ("constraints.txt",)  # the pins: every chapter runs on them
BENCHMARKS = "benchmarks/results/*.json"  # read by a chapter whose code names the benchmarks folder
REFERENCE = "reference/{}.csv"  # a chapter's `reference_table("NAME")`; every table for a name not spelled out
PROFILE_METHODS = {"section", "run_settings", "shards", "experiments"}  # their first argument names a profile section
# Settings every chapter that loads the profile depends on: those experiments receive (the package's COMMON_KEYS)
# and tf32, which load_profile applies to the process.
PROFILE_WIDE = ("device", "data_root", "output_root", "seed", "download", "tf32")
PROFILE_NAME_ONLY = {"name", "results_dir"}  # Profile attributes that read nothing but the profile's name
MAGIC = re.compile(r"^[ \t]*[%!].*$", re.MULTILINE)  # IPython magics and shell lines, blanked before parsing
MODULE_NAME = re.compile(rf"\b{PACKAGE}(?:\.\w+)+")  # a dotted module name in a notebook, e.g. in `!python -m ...`


def raw_cells(nb: Path) -> list[str]:
    "The sources of the notebook's code cells, as written."
    cells = json.loads(nb.read_text()).get("cells", [])
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells if c.get("cell_type") == "code"]


def raw_code(nb: Path) -> str:
    "The notebook's code, its cells joined."
    return "\n".join(raw_cells(nb))


def code_cells(nb: Path) -> list[str]:
    "The notebook's code cells, as Python can parse them (magics and shell lines blanked)."
    return [MAGIC.sub("", source) for source in raw_cells(nb)]


def parse(source: str) -> ast.Module | None:
    "The syntax tree of a cell or module, or None where Python cannot read it (its uses are then guessed widely)."
    try:
        with ONE_THREAD:
            return ast.parse(source)
    except SyntaxError:
        return None


def module_file(root: Path, dotted: str) -> Path | None:
    "The file of the package's module `dotted` under `root` (a.b: a/b.py or a/b/__init__.py), or None."
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts)
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _type_checking(node: ast.AST) -> bool:
    "An `if TYPE_CHECKING:` block (its imports never run)."
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@dataclass
class ModuleRefs:
    "What one module or notebook imports of the package, and where its lazily loaded names live."
    imports: set[str]  # dotted names of modules (and attributes: resolved against files later)
    from_imports: list[tuple[str, str]]  # (module, name) of `from module import name`
    lazy: dict[str, str]  # name -> module, from its `if TYPE_CHECKING:` imports (loaded on first use, PEP 562)


def module_refs(tree: ast.Module, here: list[str]) -> ModuleRefs:
    """The package's modules that code imports: `import`, `from ... import` (relative ones resolved from the package
    `here`), package aliases' attributes (`ce.viz`), and module names in strings ('contrastive_explanations.x:Class',
    as in a registry that imports by name). Imports under `if TYPE_CHECKING:` never run: they only say where a
    lazily loaded name comes from."""
    refs = ModuleRefs(set(), [], {})
    aliases = {PACKAGE: PACKAGE}

    def absolute(node: ast.ImportFrom) -> str:
        base = here[:len(here) - node.level + 1] if node.level else []
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(node: ast.AST, lazy: bool) -> None:
        if _type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import) and not lazy:
            for a in node.names:
                refs.imports.add(a.name)
                if a.asname and a.name.split(".")[0] == PACKAGE:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node)
            for a in node.names:
                if lazy:
                    refs.lazy[a.asname or a.name] = module
                else:
                    refs.from_imports.append((module, a.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value.partition(":")[0]
            if re.fullmatch(rf"{PACKAGE}(\.\w+)+", name):
                refs.imports.add(name)
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain, inner = [inner.attr, *chain], inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases:
                refs.imports.add(".".join([aliases[inner.id], *chain]))
                return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(tree, False)
    return refs


@functools.lru_cache(maxsize=512)
def source_refs(source: str, here: tuple[str, ...]) -> ModuleRefs:
    "`module_refs` of a module's source (kept: every chapter's build follows the same modules)."
    tree = parse(source)  # a module Python cannot read fails its chapters anyway
    return module_refs(tree, list(here)) if tree else ModuleRefs(set(), [], {})


def with_parents(dotted: str) -> list[str]:
    "a.b.c -> a, a.b, a.b.c: importing a module runs its packages' __init__ first."
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def console_scripts(root: Path) -> dict[str, str]:
    "The project's commands (pyproject.toml's [project.scripts]) -> the module each runs."
    try:
        scripts = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {}).get("scripts", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {name: spec.partition(":")[0] for name, spec in scripts.items()}


class ImportFollower:
    "The package's modules that a notebook runs, each with the chain of imports that reaches it."

    def __init__(self, root: Path):
        self.root = root
        self._refs: dict[Path, ModuleRefs] = {}

    def refs_of(self, path: Path) -> ModuleRefs:
        "What the module at `path` imports (read once)."
        if path not in self._refs:
            rel = path.relative_to(self.root)
            self._refs[path] = source_refs(path.read_text(encoding="utf-8"), rel.with_suffix("").parts[:-1])
        return self._refs[path]

    def resolve(self, refs: ModuleRefs) -> list[str]:
        "The modules (dotted, with files) that `refs` names, with their packages, in a stable order."
        names = []
        for name in sorted(refs.imports):  # an attribute chain a.b.f: the modules among its prefixes
            names += [n for n in with_parents(name) if module_file(self.root, n)]
        for module, name in refs.from_imports:
            names += [n for n in with_parents(module) if module_file(self.root, n)]
            if module_file(self.root, f"{module}.{name}"):
                names += [f"{module}.{name}"]
            elif (file := module_file(self.root, module)) and name in (lazy := self.refs_of(file).lazy):
                names += [n for n in with_parents(lazy[name]) if module_file(self.root, n)]
        return list(dict.fromkeys(names))

    def follow(self, nb: Path) -> dict[Path, list[str]]:
        "Each module file the notebook runs -> the chain of modules from the notebook's import to it (shortest)."
        refs = ModuleRefs(set(), [], {})
        for source in code_cells(nb):
            if tree := parse(source):
                cell = module_refs(tree, [])
                refs.imports |= cell.imports
                refs.from_imports += cell.from_imports
        text = raw_code(nb)  # with its shell lines (!python -m contrastive_explanations.cli) and unreadable cells
        refs.imports |= set(MODULE_NAME.findall(text))
        refs.imports |= {module for command, module in console_scripts(self.root).items()
                         if re.search(rf"(?<![\w-]){re.escape(command)}(?![\w-])", text)}
        found: dict[Path, list[str]] = {}
        todo = [(name, [name]) for name in self.resolve(refs)]
        while todo:  # breadth first: each file keeps its shortest chain
            step = []
            for name, chain in todo:
                file = module_file(self.root, name)
                if file in found:
                    continue
                found[file] = chain
                step += [(n, [*chain, n]) for n in self.resolve(self.refs_of(file)) if module_file(self.root, n)
                         not in found]
            todo = step
        return found


def files_read(root: Path, sources: list[str]) -> set[Path]:
    """The project files besides modules that code reads: the pins (always), `reference_table("NAME")`'s
    reference/NAME.csv (every table when the name is not spelled out), and the benchmarks' results for code that
    names the folder `benchmarks`."""
    patterns = set(ALWAYS_READ).union(*(source_reads(s) for s in sources))
    return {f for pattern in patterns for f in root.glob(pattern) if f.is_file()}


@functools.lru_cache(maxsize=512)
def source_reads(source: str) -> frozenset[str]:
    "The patterns, under the project, of the files one cell or module reads (see `files_read`)."
    tree = parse(source)
    if tree is None:  # code Python cannot read: whatever it may name
        return frozenset([REFERENCE.format("*")] * ("reference_table" in source)
                         + [BENCHMARKS] * ("benchmarks" in source))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "reference_table":
            arg = node.args[0] if node.args else None
            literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            found.add(REFERENCE.format(arg.value.removesuffix(".csv") if literal else "*"))
        elif isinstance(node, ast.Constant) and str(node.value).split("/")[0] == "benchmarks":
            found.add(BENCHMARKS)
    return frozenset(found)


def profile_reads(sources: list[str]) -> set[str] | None:
    """The profile's sections and keys that the code reads from `load_profile(...)`'s answer: a literal name given
    to `section`, `run_settings`, `shards` or `experiments`, or to `[...]` and `.get(...)`. None when it uses the
    profile in any other way (passes it on, loops over it), which means it may read all of it. A name bound to a
    profile that a function takes as a parameter or assigns is another variable there (its own `config`)."""
    reads: set[str] = set()
    for source in sources:
        tree = parse(source)
        if tree is None:
            return None
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        bound = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and _loads_profile(node.value)
                 for t in node.targets if isinstance(t, ast.Name)}
        uses = [n for n in ast.walk(tree)
                if _loads_profile(n) and not isinstance(parents.get(n), (ast.Assign, ast.Expr))]
        uses += [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in bound and isinstance(n.ctx, ast.Load)
                 and not _shadowed(n, parents)]
        for use in uses:
            key = _read_key(use, parents)
            if key is None:
                return None
            reads |= key
    return reads


def _loads_profile(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "load_profile"


def _shadowed(name: ast.Name, parents: dict) -> bool:
    "Whether `name` sits in a function that takes or assigns a variable of that name (not the profile, then)."
    node = parents.get(name)
    while node is not None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a}
            stored = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            if name.id in params | stored:
                return True
        node = parents.get(node)
    return False


def _read_key(use: ast.AST, parents: dict) -> set[str] | None:
    "The sections or keys one use of the profile reads ({} for its name only), or None for any other use."
    parent = parents.get(use)
    literal = lambda n: n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else None
    if isinstance(parent, ast.Subscript) and parent.value is use and literal(parent.slice):
        return {literal(parent.slice)}
    if isinstance(parent, ast.Attribute) and parent.value is use:
        if parent.attr in PROFILE_NAME_ONLY:
            return set()
        call = parents.get(parent)
        if (parent.attr in PROFILE_METHODS | {"get"} and isinstance(call, ast.Call) and call.func is parent
                and call.args and literal(call.args[0])):
            return {literal(call.args[0])}
    return None


def profile_digests(profile, reads: set[str] | None) -> dict[str, dict[str, str]]:
    """A digest per profile key the chapter depends on: the profile-wide settings every experiment receives and
    `load_profile` applies (`PROFILE_WIDE`), and the sections and settings it reads (all of them for None)."""
    value = lambda k: hashlib.sha256(json.dumps(profile[k], sort_keys=True, default=str).encode()).hexdigest()[:16]
    wanted = lambda k: reads is None or k in reads
    return {"sections": {k: value(k) for k in sorted(profile) if isinstance(profile[k], dict) and wanted(k)},
            "settings": {k: value(k) for k in sorted(profile) if not isinstance(profile[k], dict)
                         and (k in PROFILE_WIDE or wanted(k))}}


def digest(path: Path) -> str:
    "A short sha256 of the file's bytes."
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def chapter_inputs(root: Path, # the project
                   nb: Path, # the chapter's notebook
                   params: dict, # the parameters it receives (`overrides` among them counts through the profile)
                   profile=None, # the profile, for a chapter that takes one (None: it takes none)
                  ) -> dict:
    """Everything an executed copy depends on, as digests: the notebook, its parameters, the package modules it runs
    (followed through the package's imports; `via` says how each is reached), the files it reads (`files_read`), and
    the profile's sections it reads (`profile_reads`; every section when that cannot be told)."""
    modules = ImportFollower(root).follow(nb)
    sources = code_cells(nb) + [m.read_text(encoding="utf-8") for m in modules]
    files = sorted(set(modules) | files_read(root, sources))
    rel = lambda f: f.relative_to(root).as_posix()
    given = {k: v for k, v in params.items() if not (k == "overrides" and profile is not None)}
    return {"notebook": digest(nb), "parameters": given,
            "files": {rel(f): digest(f) for f in files},
            "via": {rel(f): " → ".join(chain) for f, chain in modules.items()},
            "profile": profile_digests(profile, profile_reads(code_cells(nb)))
            if profile is not None and "load_profile" in raw_code(nb) else {}}


def build_key(inputs: dict) -> str:
    "The hash of a chapter's inputs (`chapter_inputs`), without the import chains."
    return hashlib.sha256(json.dumps({k: v for k, v in inputs.items() if k != "via"}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def why_rerun(before: dict | None, now: dict) -> list[str]:
    "What changed between an executed copy's recorded inputs and the current ones, one phrase per change."
    if not before:
        return ["its copy records no inputs (made by an older builder)"]
    reasons = []
    if before.get("notebook") != now["notebook"]:
        reasons.append("notebook changed")
    if before.get("parameters") != now["parameters"]:
        reasons.append("parameters changed")
    old, new = before.get("files", {}), now["files"]
    for f in new:
        chain = now["via"].get(f, "").split(" → ")
        via = f" (imported via {' → '.join(chain[:-1])})" if len(chain) > 1 else (
            " (imported directly)" if f in now["via"] else "")
        if f not in old:
            reasons.append(f"{f} newly read{via}")
        elif old[f] != new[f]:
            reasons.append(f"{f} changed{via}")
    reasons += [f"{f} no longer read" for f in old if f not in new]
    for kind in ("setting", "section"):
        old, new = before.get("profile", {}).get(kind + "s", {}), now["profile"].get(kind + "s", {})
        reasons += [f"profile {kind} {key} changed" for key in sorted(set(old) | set(new))
                    if old.get(key) != new.get(key)]
    return reasons or ["its inputs changed"]


def previous_inputs(out: Path) -> dict | None:
    "The `book` metadata of an executed copy (its key, inputs, time), or None when there is none to read."
    try:
        return nbformat.read(out, as_version=4).metadata.get("book", {})
    except (OSError, ValueError):
        return None


def execute(root: Path, chapter: str, profile, overrides: dict[str, str],
            force: str = "", # why it runs whatever its inputs ("--force", "reads results and ... ran"); "": if changed
            executed: Path | None = None, # the folder of the executed copies (default executed/)
            say: Callable[[str], None] = print, # where the reason it runs goes
           ) -> tuple[float, str]:
    """Run one chapter with papermill into the folder `executed`, unless its copy there was made from the same inputs
    (`chapter_inputs`); return its running time and what was done: "ran", "kept" (its copy is up to date) or the path
    of another profile's copy it took. Says why it runs. Raises BuildError naming the failing cell."""
    executed = executed or root / EXECUTED
    src, out = root / "nbs" / f"{chapter}.ipynb", executed / f"{chapter}.ipynb"
    declared = pm.inspect_notebook(str(src))
    offered = {"profile": profile.name, "overrides": overrides}  # each chapter loads its settings with load_profile
    params = {k: v for k, v in offered.items() if k in declared}
    takes_profile = "profile" in declared
    with ONE_THREAD:  # it parses code (ast)
        inputs = chapter_inputs(root, src, params, profile if takes_profile else None)
    key = build_key(inputs)
    previous = previous_inputs(out) if out.exists() else None
    if not force and previous is not None and previous.get("build_key") == key:
        return previous.get("seconds", 0.0), "kept"
    if not force and (shared := shared_copy(root, chapter, key, out)):
        tmp = out.with_suffix(".partial.ipynb")
        shutil.copyfile(shared, tmp)
        tmp.replace(out)
        return nbformat.read(out, as_version=4).metadata["book"].get("seconds", 0.0), str(shared.relative_to(root))
    reasons = (["no earlier copy"] if previous is None else [force] if force
               else why_rerun(previous.get("inputs"), inputs))
    say(f"      runs: {'; '.join(reasons[:4])}{f' (and {len(reasons) - 4} more)' if len(reasons) > 4 else ''}")
    partial, failed = out.with_suffix(".partial.ipynb"), out.with_suffix(".failed.ipynb")
    out.unlink(missing_ok=True)
    failed.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        # The kernel starts in nbs/ (nbclient's resources path); papermill's own `cwd` would change this process's
        # working directory, which two chapters in two threads would leave wrong.
        pm.execute_notebook(str(src), str(partial), parameters=params, kernel_name="python3",
                            resources={"metadata": {"path": str(root / "nbs")}},
                            progress_bar=False, log_output=False, report_mode=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no TCP-encryption notice
    except Exception as e:  # a cell raised (PapermillExecutionError), the kernel died, or it could not start
        kept = ""
        if partial.exists():
            partial.rename(failed)
            kept = f"\n  the executed copy with the traceback is {failed.relative_to(root)}"
        if isinstance(e, pm.PapermillExecutionError):
            first_line = e.source.strip().splitlines()[0] if e.source.strip() else ""
            raise BuildError(f"{src.relative_to(root)} failed at cell {e.cell_index} (`{first_line}`): "
                             f"{e.ename}: {e.evalue}{kept}") from None
        raise BuildError(f"{src.relative_to(root)} failed: {type(e).__name__}: {e}{kept}") from e
    seconds = round(time.perf_counter() - start, 2)
    nb = nbformat.read(partial, as_version=4)
    commit, day = git_commit(root), date.today()
    used = profile.name if takes_profile else None
    add_footer(nb, footer_text(chapter, used, commit, day, seconds, DEFAULT_PROFILE))
    nb.metadata["book"] = {"build_key": key, "inputs": inputs, "parameters": params, "seconds": seconds,
                           "profile": used, "commit": commit, "date": day.isoformat()}
    nbformat.write(nb, partial)
    partial.rename(out)
    return seconds, "ran"


def previous_timings(root: Path, profile: str) -> dict[str, float]:
    "Each chapter's running time in the last build of this profile on this checkout (empty before the first)."
    try:
        data = json.loads((root / "_build" / f"timings-{profile}.json").read_text())
        return {k: float(v["seconds"]) for k, v in data.items() if isinstance(v, dict) and "seconds" in v}
    except (OSError, ValueError, TypeError):
        return {}


def time_left(earlier: dict[str, float], chapters: list[str]) -> str:
    "', about 12 min left' from the last build's times of these chapters, when all are known; '' otherwise."
    if not chapters or any(c not in earlier for c in chapters):
        return ""
    return f" (at most about {duration(sum(earlier[c] for c in chapters))} left, from the last build)"


def cdn_config(config: dict, root: Path) -> dict:
    "A copy of the book's config without the local assets, so that Sphinx and myst-nb use their CDN defaults."
    config = copy.deepcopy(config)
    sphinx = config.get("sphinx", {})
    for key in ASSET_KEYS:
        sphinx.get("config", {}).pop(key, None)
    for name, folder in sphinx.get("local_extensions", {}).items():  # relative to the config file's folder
        sphinx["local_extensions"][name] = str((root / folder).resolve())
    return config


def jupyter_book(root: Path, staging: Path, offline: bool, toc: Path | None = None) -> None:
    "Build the book into `staging` with warnings as errors; CDN assets when `offline` is False; `toc` for _toc.yml."
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--path-output", str(staging),
           "--all", "-W", "-n", "--keep-going", "--quiet", *(["--toc", str(toc)] if toc else [])]
    if not offline:
        cdn = staging / "_config.cdn.yml"
        cdn.parent.mkdir(parents=True, exist_ok=True)
        config = cdn_config(yaml.safe_load((root / "_config.yml").read_text()), root)
        cdn.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd += ["--config", str(cdn)]
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:  # its closing box names the staging folder, not where the book ends up
            if "Finished generating HTML" in line or "Your book's HTML pages are here" in line:
                break
            if re.sub(r"\x1b\[[0-9;]*m|=", "", line).strip():  # skip its blank and ==== lines
                print("    " + line.rstrip(), flush=True)
        process.stdout.read()
    if process.returncode != 0:
        raise BuildError(f"jupyter-book failed (exit {process.returncode}); see the warnings above. "
                         f"Partial output: {(staging / '_build' / 'html').relative_to(root)}")


def chosen(chapters: list[str], only: list[str]) -> list[str]:
    "The chapters `--only` names (every one when none), in reading order; a UsageError for a name the book lacks."
    names = [n.strip().removeprefix("nbs/").removesuffix(".ipynb") for o in only for n in o.split(",") if n.strip()]
    unknown = [n for n in names if n not in chapters]
    if unknown:
        raise UsageError(f"unknown chapter {unknown[0]!r} for --only: choose among the notebooks _toc.yml lists, "
                         f"e.g. {', '.join(chapters[:3])}")
    return [c for c in chapters if c in names] if names else chapters


def ran_text(chapters: list[str]) -> str:
    "'07_perturbation ran', '07_perturbation, 08_masking and 3 more ran'."
    shown = ", ".join(chapters[:2]) + (f" and {len(chapters) - 2} more" if len(chapters) > 2 else "")
    return f"{shown} ran"


def chapter_jobs(value: str, # --jobs: a count, or 'auto'
                 device: str, # the profile's device ('cpu', 'cuda', 'cuda:1')
                ) -> int:
    "How many chapters execute at once: the count given, or for 'auto' 2 on a CPU with 2 cores or more, else 1."
    if value == "auto":
        return min(2, os.cpu_count() or 1) if device == "cpu" else 1
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--jobs must be 1 or more (chapters executed at once) or 'auto', got {value}: e.g. --jobs 2")
    return int(value)


@contextlib.contextmanager
def passive_waits():
    """Kernels started inside get OMP_WAIT_POLICY=PASSIVE (unless it is set): OpenMP threads that wait sleep instead of
    spinning. Two kernels computing side by side with spinning threads slow each other several-fold; the policy
    changes how threads wait, not how work is split, so every number comes out the same."""
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


def execute_chapters(root: Path, chapters: list[str], profile, overrides: dict[str, str], force: bool,
                     executed: Path, earlier: dict[str, float], rerun_readers: bool = True,
                     jobs: int = 1, # chapters executed at once (between the chapters that run first and the readers)
                    ) -> dict[str, dict]:
    """Execute the chapters in three phases: those that make what others open (one at a time), then the rest, then
    those that read results (again whenever another ran, when `rerun_readers`); within the last two phases `jobs`
    chapters at a time, each in its own kernel. Tidy each copy and say for each why it runs or that it is reused;
    chapter -> its record for the statistics page. With jobs > 1 a chapter's lines are printed together when it ends."""
    readers = [c for c in chapters if reads_results(root, c)]
    makers = [c for c in chapters if c not in readers and runs_first(root, c)]
    middle = [c for c in chapters if c not in readers and c not in makers]
    order = makers + middle + readers
    ran: list[str] = []
    records = {}
    lock = threading.Lock()

    def header(chapter: str) -> str:
        return f"  [{order.index(chapter) + 1}/{len(chapters)}] nbs/{chapter}.ipynb"

    def one(chapter: str, say: Callable[[str], None]) -> None:
        earlier_ran = sorted(ran, key=order.index)
        why = "--force" if force else (f"reads results and {ran_text(earlier_ran)}" if chapter in readers
                                       and earlier_ran and rerun_readers else "")
        seconds, done = execute(root, chapter, profile, overrides, why, executed, say=say)
        with ONE_THREAD:
            tidy_executed(executed / f"{chapter}.ipynb", say=say)
        book = nbformat.read(executed / f"{chapter}.ipynb", as_version=4).metadata.get("book", {})
        with lock:
            if done == "ran":
                ran.append(chapter)
            records[chapter] = {"seconds": seconds, "executed": done == "ran", "profile": book.get("profile"),
                                "commit": book.get("commit", "unknown"), "date": book.get("date", "")}
        say(f"      {seconds:.1f} s" if done == "ran" else f"      unchanged, kept (it ran in {seconds:.1f} s)"
            if done == "kept" else f"      the same in every profile: copied from {done} (it ran in {seconds:.1f} s)")

    def together(chapter: str) -> None:
        "One chapter beside others: its lines gathered and printed in one block when it ends (or fails)."
        lines = [header(chapter) + ":"]
        try:
            one(chapter, lines.append)
        finally:
            with lock:
                print("\n".join(lines), flush=True)

    for phase, shared in ((makers, False), (middle, True), (readers, True)):
        if jobs > 1 and shared and len(phase) > 1:
            print(f"  ({len(phase)} chapters, {jobs} at a time{time_left(earlier, order[order.index(phase[0]):])})",
                  flush=True)
            with passive_waits(), concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                futures = [pool.submit(together, chapter) for chapter in phase]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()  # the first failure stops the chapters not yet started
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            continue
        for chapter in phase:
            print(f"{header(chapter)}{time_left(earlier, order[order.index(chapter):])} ...", flush=True)
            one(chapter, lambda line: print(line, flush=True))
    return {c: records[c] for c in chapters}


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("PROFILE") or DEFAULT_PROFILE,
                        help=f"parameter profile: a file params/NAME.yaml (default: {DEFAULT_PROFILE})")
    parser.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter of the profile, e.g. -p data_root=/data")
    parser.add_argument("--force", action="store_true", help="re-execute every chapter, even those unchanged")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="execute only the chapter nbs/NAME.ipynb (repeatable, or NAME,NAME), when its inputs "
                             "changed or with --force; the book is not rebuilt (`make book` does, reusing the copy)")
    parser.add_argument("--no-html", action="store_true", help="execute the chapters only, do not build the book")
    parser.add_argument("--jobs", "-j", default="1", metavar="N",
                        help="execute up to N chapters at once, each in its own kernel (default 1); on a CPU a chapter "
                             "keeps about one core busy, so 2 suits 2 cores. Each kernel loads its own models: on a "
                             "GPU, or with little memory, keep 1. 'auto': 2 when the profile's device is the CPU "
                             "(and there are 2 cores), else 1")
    parser.add_argument("--estimate", action="store_true",
                        help="after the preflight, time each experiment's first batch, print each chapter's projected "
                             "running time on this machine, and stop (no results are computed)")
    args = parser.parse_args(argv)
    paths = BookPaths.of(root, args.profile)
    html, staging = paths.html, paths.staging
    try:
        overrides = dict(p.split("=", 1) if "=" in p else (p, "") for p in args.param)
        profile = load_profile(root, args.profile, overrides)
        jobs = chapter_jobs(args.jobs, str(profile.get("device") or "cpu"))
        chapters = toc_chapters(root)
        selected = chosen(chapters, args.only)
        check_needs(profile)  # every missing dataset, weight file and checkpoint, before an hour is spent
        if args.estimate:
            print(estimate(root, profile), flush=True)
            return 0
        if html.exists() and not args.only:  # from now on the old book no longer matches the sources
            shutil.rmtree(html)
        paths.executed.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        earlier = previous_timings(root, args.profile)
        os.environ[CONSOLE_PROGRESS] = "1"  # the chapters' kernels draw their progress bars here, not in the pages
        print(f"==> executing {len(selected)} chapters with papermill, profile {args.profile!r}", flush=True)
        records = execute_chapters(root, selected, profile, overrides, args.force, paths.executed, earlier,
                                   rerun_readers=not args.only, jobs=jobs)
        executed = time.perf_counter() - began
        if args.only:
            print(f"==> {len(selected)} of {len(chapters)} chapters executed in {duration(executed)}; the book was not "
                  f"rebuilt: `make book{'' if args.profile == DEFAULT_PROFILE else ' PROFILE=' + args.profile}` "
                  "builds it, reusing these copies", flush=True)
            return 0
        (paths.executed / f"{STATISTICS}.md").write_text(
            statistics_page(records, args.profile, git_commit(root), date.today()))
        timings = {c: {"seconds": r["seconds"], "reused": not r["executed"]} for c, r in records.items()}
        if args.no_html:
            print(f"==> chapters executed in {duration(executed)}", flush=True)
            return 0
        offline = ensure_assets(root / "book_assets")
        print("==> building the book with Jupyter Book (warnings are errors)", flush=True)
        start = time.perf_counter()
        shutil.rmtree(staging / "_build" / "html", ignore_errors=True)  # no pages left over from an older toc
        paths.write_toc(root)
        jupyter_book(root, staging, offline, paths.toc)
        timings["jupyter-book"] = {"seconds": round(time.perf_counter() - start, 2), "reused": False}
        html.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / "_build" / "html"), html)
        (root / "_build" / f"timings-{args.profile}.json").write_text(json.dumps(timings, indent=1) + "\n")
        (html / f".built-{args.profile}").write_text(json.dumps(dict(profile)))
        print(f"==> book built in {duration(time.perf_counter() - began)} (chapters "
              f"{duration(executed)}, Jupyter Book {duration(time.perf_counter() - start)}): {html / 'index.html'}\n"
              f"    open it with: .venv/bin/python -m http.server -d {html.relative_to(root)} 8000"
              f"  and browse http://127.0.0.1:8000", flush=True)
        return 0
    except BuildError as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
