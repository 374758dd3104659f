"""The executed copies as pages of the book (used by tools/build_book.py).

- `tidy_executed`: no nbdev `#|` directive lines, no progress bars (tqdm's widgets), no stderr output (progress bars
  drawn as text, warnings: the build's console lists what was removed), and papermill's injected parameters cell
  removed from the page (it shows the builder's own folders).
- `add_footer`: a last line on every page that says which profile built it, at which commit and when, where its
  source notebook is (a download link) and the command that reruns it.
- `statistics_page`: the execution-statistics page, `executed/statistics.md`, written by each full build from what
  it did: per chapter the profile, executed or reused, running time and commit.
"""
from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from datetime import date
from pathlib import Path

import nbformat
from nbformat.v4 import new_markdown_cell

DIRECTIVE = re.compile(r"^[ \t]*#\|.*(?:\n|$)", re.MULTILINE)  # an nbdev directive line: #| export, #| hide, ...
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PROGRESS_MODELS = {"FloatProgressModel", "IntProgressModel"}
INJECTED = "injected-parameters"  # papermill's tag on the cell it adds
FOOTER = "book_footer"  # metadata key of the footer cell that `add_footer` writes
STATISTICS = "statistics"  # the generated page executed/statistics.md (its toc entry: executed/statistics)


def duration(seconds: float) -> str:
    "12 s, 4 min 05 s, 2 h 03 min."
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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


def first_line(text: str, width: int = 120) -> str:
    "The first non-blank line of an output (a progress bar's carriage-return redraws count as lines), shortened."
    line = next((s.strip() for s in re.split(r"[\r\n]+", text) if s.strip()), "")
    return line if len(line) <= width else line[:width - 1] + "…"


def is_stderr(output: dict) -> bool:
    return output.get("output_type") == "stream" and output.get("name") == "stderr"


def tidy_executed(path: Path, # an executed copy, rewritten in place
                  say: Callable[[str], None] | None = print, # where the list of removed stderr outputs goes
                 ) -> bool:
    """Tidy an executed copy for reading, in place: drop nbdev's `#|` directive lines from the code cells (a cell
    left empty, without outputs, is removed from the page), every progress bar (tqdm's widgets, which show nothing
    in a static page) from the outputs and the saved widget state, and every stderr output (said to `say`: their
    count and the first line, so that a warning is not lost silently); papermill's injected parameters cell is
    tagged `remove-cell`. Returns whether it changed anything; a tidy copy is left as it is, so its time stamp
    keeps meaning "last executed"."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {})
    bars = progress_bar_models(widgets.get("state", {}))
    stderr: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = cell.metadata.get("tags", [])
        if INJECTED in tags and tags != [INJECTED, "remove-cell"]:
            cell.metadata["tags"], changed = [INJECTED, "remove-cell"], True
        source = DIRECTIVE.sub("", cell.source)
        if source != cell.source:
            cell.source, changed = source.lstrip("\n"), True
            if not cell.source.strip() and not cell.outputs and "remove-cell" not in tags:
                cell.metadata["tags"] = [*tags, "remove-cell"]
        stderr += [o.get("text", "") for o in cell.outputs if is_stderr(o)]
        outputs = [o for o in cell.outputs if not is_stderr(o)
                   and o.get("data", {}).get(WIDGET_VIEW, {}).get("model_id") not in bars]
        if len(outputs) != len(cell.outputs):
            cell.outputs, changed = outputs, True
    if bars:
        for model_id in bars:
            del widgets["state"][model_id]
        if not widgets["state"]:
            del nb.metadata["widgets"]
        changed = True
    if stderr and say:
        say(f"      removed {len(stderr)} stderr output{'s' * (len(stderr) > 1)} from the page, the first: "
            f"{first_line(''.join(stderr[0]) if isinstance(stderr[0], list) else stderr[0])}")
    if changed:
        tmp = path.with_suffix(".partial.ipynb")  # excluded from the book, like execute's
        nbformat.write(nb, tmp)
        tmp.replace(path)
    return changed


def git_commit(root: Path) -> str:
    "The checked-out commit of `root`, with '+dirty' when tracked files have changes; 'unknown' outside git."
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + "+dirty" * bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def short_commit(commit: str) -> str:
    "'abc1234' from a full commit; ' with uncommitted changes' for one marked '+dirty'; 'unknown' as it is."
    if commit == "unknown":
        return commit
    sha, dirty = commit.removesuffix("+dirty"), commit.endswith("+dirty")
    return f"`{sha[:7]}`" + " with uncommitted changes" * dirty


def rerun_command(chapter: str, profile: str | None, default_profile: str) -> str:
    "The command that executes one chapter again (`--profile` for a profile other than the default)."
    flag = f" --profile {profile}" if profile and profile != default_profile else ""
    return f"python -m tools.build_book --only {chapter}{flag} --force"


def footer_text(chapter: str, # the notebook's name, nbs/NAME.ipynb
                profile: str | None, # the profile it was executed with; None: a chapter that takes no profile
                commit: str, # `results.git_commit`'s answer
                day: date, seconds: float, default_profile: str) -> str:
    """The page's last line: profile, commit, date and time it was built, its source notebook (a download link from
    the book's root, the same from every profile's folder of copies) and the command that reruns it."""

    built = f"Built with the `{profile}` profile" if profile else "Built"
    at = f" at commit {short_commit(commit)}" if commit != "unknown" else " (commit unknown)"
    none = "" if profile else "; it takes no profile, so every profile's book shows this page"
    make = f"make book PROFILE={profile}" if profile and profile != default_profile else "make book"
    return (f"{built}{at} on {day.isoformat()} in {duration(seconds)}{none}. "
            f"Source: {{download}}`nbs/{chapter}.ipynb </nbs/{chapter}.ipynb>` · rerun this page: "
            f"`{rerun_command(chapter, profile, default_profile)}` (the whole book: `{make}`).")


def add_footer(nb, text: str) -> None:
    "Put `text` in the notebook's footer cell, the last one (replacing an earlier footer), in a `book-footer` box."
    nb.cells = [c for c in nb.cells if not c.metadata.get(FOOTER)]
    nb.cells.append(new_markdown_cell(f":::{{container}} book-footer\n{text}\n:::", metadata={FOOTER: True}))


def statistics_page(records: dict[str, dict], # chapter -> profile, executed (bool), seconds, commit, date
                    profile: str, commit: str, day: date) -> str:
    "The execution-statistics page (MyST markdown): one row per chapter, in reading order."

    ran = sum(r["executed"] for r in records.values())
    total = sum(r["seconds"] for r in records.values())
    rows = [f"| {{doc}}`{chapter}` | {r['profile'] or 'none (the same in every profile)'} | "
            f"{'executed' if r['executed'] else 'reused'} | {duration(r['seconds'])} | {short_commit(r['commit'])} | "
            f"{r['date'] or 'unknown'} |" for chapter, r in records.items()]
    at = f" at commit {short_commit(commit)}" if commit != "unknown" else ""
    return "\n".join([
        "# Execution statistics", "",
        f"This build of the book used the `{profile}` profile{at} on {day.isoformat()}: of its {len(records)} "
        f"chapters it executed {ran} and reused {len(records) - ran} copies whose notebook, imported modules, files "
        f"and profile settings were unchanged. Their times add up to {duration(total)}. "
        "The time is each chapter's last execution, the commit and date those it was executed at; chapters executed "
        "side by side (`--jobs`) shared the machine, so each took longer than it would alone.", "",
        "| Chapter | Profile | This build | Time | Commit | Executed on |",
        "| --- | --- | --- | --- | --- | --- |", *rows, ""])
