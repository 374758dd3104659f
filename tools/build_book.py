"""The main job: execute every chapter of the book with papermill on a parameter profile, then build the book.

    python -m tools.build_book [--profile embedded|paper] [--param data_root=/data] [--force]

1. Reads `params/<profile>.yaml`; each notebook receives only the parameters its `parameters` cell declares.
2. Executes `nbs/NAME.ipynb` for every `executed/NAME` entry of `_toc.yml` into `executed/NAME.ipynb` (git-ignored;
   for a profile other than `embedded`, into `executed/PROFILE/NAME.ipynb`, see `BookPaths`). A copy whose
   notebook, parameters and the files it may read (`KEY_FILES`: package, reference numbers, benchmark results, pins)
   are unchanged since its last run is kept (`--force` redoes it); a chapter that takes no profile is the same in
   every profile, so another profile's up-to-date copy of it is copied instead of executed.
   Chapters whose notebook metadata says `book: {reads_results: true}` run last, and again whenever another ran.
   Each executed copy is tidied for reading (`tidy_executed`): no nbdev `#|` directive lines, no progress bars.
3. Builds the Jupyter Book with warnings as errors into a staging folder, and only on success moves it to
   `_build/html` (`_build/PROFILE/html` for another profile, so that building one never replaces the other's book),
   so a failed run never leaves a book that looks good. Timings go to `_build/timings-<profile>.json`.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill as pm
import yaml

from contrastive_explanations.results import CONSOLE_PROGRESS

from .book_assets import ensure_assets

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = "executed"  # toc entries `executed/NAME` are papermill copies of `nbs/NAME.ipynb`
DEFAULT_PROFILE = "embedded"  # its book is _build/html; every other profile's is _build/PROFILE/html
ASSET_KEYS = ("html_static_path", "mathjax_path", "nb_ipywidgets_js")  # dropped for the CDN fallback


class BuildError(Exception):
    "A failure the user can act on; its message says what went wrong and what to do. Exit status 1."
    status = 1


class UsageError(BuildError):
    "Bad input on the command line or in the profile; nothing was built. Exit status 2."
    status = 2


def load_profile(root: Path, name: str, overrides: dict[str, str]):
    "The profile's settings, through the package's one loader; a bad name or key is a UsageError (exit status 2)."
    from contrastive_explanations.results import ProfileError
    from contrastive_explanations.results import load_profile as load

    try:
        return load(name, overrides, root)
    except ProfileError as e:
        raise UsageError(str(e)) from None


def check_needs(profile) -> None:
    "Stop with one message (a UsageError) if any dataset folder, weight file or checkpoint the profile opens is missing."
    from contrastive_explanations.experiments.toolkit import preflight, preflight_report

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
    """Time every run of the profile on its first items (`toolkit.calibrate`) and project each chapter's running
    time on this machine: one report, a line per run and per chapter."""
    from contrastive_explanations.experiments.toolkit import calibrate
    from contrastive_explanations.results import find_experiment

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
    "Names of the notebooks the book lists, in reading order (`executed/NAME` entries of `_toc.yml`)."
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


def reads_results(root: Path, chapter: str) -> bool:
    """Whether a chapter quotes other chapters' results (notebook metadata `book: reads_results: true`).

    Such chapters (the first page's provenance, the claims table) run after all the others, and again whenever
    any other chapter ran."""
    meta = json.loads((root / "nbs" / f"{chapter}.ipynb").read_text()).get("metadata", {})
    return bool(meta.get("book", {}).get("reads_results"))


#: The files besides its notebook that a chapter may read, as glob patterns under the project root: the package (every
#: module of every subpackage), the review's published numbers, the benchmarks' results, the pins. A change to any of
#: them re-executes every chapter: a chapter reads them through the package, so which ones it reads is not visible.
KEY_FILES = ("contrastive_explanations/**/*.py", "reference/*.csv", "benchmarks/results/*.json", "constraints.txt")


def key_files(root: Path) -> list[Path]:
    "The files matching `KEY_FILES` under `root`, sorted, each once."
    return sorted({f for pattern in KEY_FILES for f in root.glob(pattern) if f.is_file()})


def build_key(root: Path, nb: Path, params: dict) -> str:
    "A hash of everything an executed copy depends on: notebook, parameters, and the files of `KEY_FILES`."
    h = hashlib.sha256(nb.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    for f in key_files(root):  # the path too, so that renaming or adding a file changes the key
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


DIRECTIVE = re.compile(r"^[ \t]*#\|.*(?:\n|$)", re.MULTILINE)  # an nbdev directive line: #| export, #| hide, ...
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PROGRESS_MODELS = {"FloatProgressModel", "IntProgressModel"}


def progress_bar_models(state: dict) -> set[str]:
    """The widget models of progress bars (tqdm's, in a kernel: an HBox of HTML labels around a progress bar), with
    the layouts and styles only they use. Menus, stacks and images (the static explorers) are never among them."""
    def refs(model: dict) -> set[str]:
        found = set()
        for value in model.get("state", {}).values():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v.startswith("IPY_MODEL_") and v[10:] in state:
                    found.add(v[10:])
        return found

    bars = set()
    for model_id, model in state.items():
        children = [c[10:] for c in model.get("state", {}).get("children", [])
                    if isinstance(c, str) and c[10:] in state]
        names = [state[c]["model_name"] for c in children]
        if (model.get("model_name") == "HBoxModel" and PROGRESS_MODELS & set(names)
                and all(n in PROGRESS_MODELS | {"HTMLModel"} for n in names)):
            bars |= {model_id, *children}
    bars |= {r for b in bars for r in refs(state[b])}  # their layouts and styles
    kept = {r for model_id, model in state.items() if model_id not in bars for r in refs(model)}
    return bars - kept


def tidy_executed(path: Path) -> bool:
    """Tidy an executed copy for reading, in place: drop nbdev's `#|` directive lines from the code cells (a cell
    left empty, without outputs, is removed from the page) and every progress bar (tqdm's widgets, which show
    nothing in a static page) from the outputs and the saved widget state. Returns whether it changed anything;
    a tidy copy is left as it is, so its time stamp keeps meaning "last executed"."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {})
    bars = progress_bar_models(widgets.get("state", {}))
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = DIRECTIVE.sub("", cell.source)
        if source != cell.source:
            cell.source, changed = source.lstrip("\n"), True
            if not cell.source.strip() and not cell.outputs and "remove-cell" not in cell.metadata.get("tags", []):
                cell.metadata["tags"] = [*cell.metadata.get("tags", []), "remove-cell"]
        outputs = [o for o in cell.outputs if o.get("data", {}).get(WIDGET_VIEW, {}).get("model_id") not in bars]
        if len(outputs) != len(cell.outputs):
            cell.outputs, changed = outputs, True
    if bars:
        for model_id in bars:
            del widgets["state"][model_id]
        if not widgets["state"]:
            del nb.metadata["widgets"]
        changed = True
    if changed:
        tmp = path.with_suffix(".partial.ipynb")  # excluded from the book, like execute's
        nbformat.write(nb, tmp)
        tmp.replace(path)
    return changed


def execute(root: Path, chapter: str, profile, overrides: dict[str, str], force: bool,
            executed: Path | None = None) -> tuple[float, str]:
    """Run one chapter with papermill into the folder `executed` (default `executed/`); return its running time and
    what was done: "ran", "kept" (its copy is up to date) or the path of another profile's copy it took. Raises
    BuildError naming the failing cell."""
    executed = executed or root / EXECUTED
    src, out = root / "nbs" / f"{chapter}.ipynb", executed / f"{chapter}.ipynb"
    declared = pm.inspect_notebook(str(src))
    offered = {"profile": profile.name, "overrides": overrides}  # each chapter loads its settings with load_profile
    params = {k: v for k, v in offered.items() if k in declared}
    key = build_key(root, src, {**params, "settings": dict(profile) if "profile" in declared else {}})
    if not force and out.exists():
        previous = nbformat.read(out, as_version=4).metadata.get("book", {})
        if previous.get("build_key") == key:
            return previous.get("seconds", 0.0), "kept"
    if not force and (shared := shared_copy(root, chapter, key, out)):
        tmp = out.with_suffix(".partial.ipynb")
        shutil.copyfile(shared, tmp)
        tmp.replace(out)
        return nbformat.read(out, as_version=4).metadata["book"].get("seconds", 0.0), str(shared.relative_to(root))
    partial, failed = out.with_suffix(".partial.ipynb"), out.with_suffix(".failed.ipynb")
    out.unlink(missing_ok=True)
    failed.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(src), str(partial), parameters=params, cwd=str(root / "nbs"), kernel_name="python3",
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
    nb = nbformat.read(partial, as_version=4)
    visible = _parameter_cell_tags(nb)
    for cell in nb.cells:  # papermill's injected cell gets the source parameters cell's display tags
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.metadata["tags"] = ["injected-parameters", *visible]
    seconds = round(time.perf_counter() - start, 2)
    nb.metadata["book"] = {"build_key": key, "parameters": params, "seconds": seconds}
    nbformat.write(nb, partial)
    partial.rename(out)
    return seconds, "ran"


def _parameter_cell_tags(nb) -> list[str]:
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags:
            return [t for t in tags if t != "parameters"]
    return []


def duration(seconds: float) -> str:
    "12 s, 4 min 05 s, 2 h 03 min."
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("PROFILE") or DEFAULT_PROFILE,
                        help=f"parameter profile: a file params/NAME.yaml (default: {DEFAULT_PROFILE})")
    parser.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter of the profile, e.g. -p data_root=/data")
    parser.add_argument("--force", action="store_true", help="re-execute every chapter, even those unchanged")
    parser.add_argument("--no-html", action="store_true", help="execute the chapters only, do not build the book")
    parser.add_argument("--estimate", action="store_true",
                        help="after the preflight, time each experiment's first batch, print each chapter's projected "
                             "running time on this machine, and stop (no results are computed)")
    args = parser.parse_args(argv)
    paths = BookPaths.of(root, args.profile)
    html, staging = paths.html, paths.staging
    try:
        overrides = dict(p.split("=", 1) if "=" in p else (p, "") for p in args.param)
        profile = load_profile(root, args.profile, overrides)
        chapters = toc_chapters(root)
        check_needs(profile)  # every missing dataset, weight file and checkpoint, before an hour is spent
        if args.estimate:
            print(estimate(root, profile), flush=True)
            return 0
        if html.exists():  # from now on the old book no longer matches the sources
            shutil.rmtree(html)
        paths.executed.mkdir(parents=True, exist_ok=True)
        timings, began = {}, time.perf_counter()
        earlier = previous_timings(root, args.profile)
        os.environ[CONSOLE_PROGRESS] = "1"  # the chapters' kernels draw their progress bars here, not in the pages
        print(f"==> executing {len(chapters)} chapters with papermill, profile {args.profile!r}", flush=True)
        readers = [c for c in chapters if reads_results(root, c)]
        any_ran = False
        order = [c for c in chapters if c not in readers] + readers
        for i, chapter in enumerate(order, 1):
            print(f"  [{i}/{len(chapters)}] nbs/{chapter}.ipynb{time_left(earlier, order[i - 1:])} ...", flush=True)
            seconds, done = execute(root, chapter, profile, overrides, args.force or (chapter in readers and any_ran),
                                   paths.executed)
            tidy_executed(paths.executed / f"{chapter}.ipynb")
            ran = done == "ran"
            any_ran |= ran
            timings[chapter] = {"seconds": seconds, "reused": not ran}
            print(f"      {seconds:.1f} s" if ran else f"      unchanged, kept (it ran in {seconds:.1f} s)" if done == "kept"
                  else f"      the same in every profile: copied from {done} (it ran in {seconds:.1f} s)", flush=True)
        executed = time.perf_counter() - began
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
