"""Run every benchmark, each in a fresh process, and write their results files and a summary of the run.

    .venv/bin/python -m benchmarks.run_all                       # CPU: everything, about 30-40 minutes on 2 cores
    .venv/bin/python -m benchmarks.run_all --quick --out-dir /tmp/b   # a tiny random network: structure only
    .venv/bin/python -m benchmarks.run_all --device cuda --models vgg16_bn vit_b_16 --batch 64   # -> *-cuda.json
    .venv/bin/python -m benchmarks.run_all --book --only        # also: the book's chapters, peak memory and time

Each benchmark writes benchmarks/results/NAME.json (NAME-cuda.json on a GPU); this runner writes run.json (run-cuda.json)
with each benchmark's wall time, exit status and peak resident memory, the load average before and after, and the
allocator settings (glibc malloc thresholds high enough that freed memory is kept for reuse rather than returned
to the system and faulted in again, so page faults do not dominate the timings), which it sets for
the benchmarks unless they are already set. Before each benchmark it waits (up to --wait-minutes) until the 1-minute
load average is at most --max-load, since other work on the machine makes CPU timings meaningless; each results file
records the load average when its benchmark started and ended.

--book executes every chapter of the book (`python -m tools.build_book --no-html --force`, minutes) and writes
book.json: its wall time, the seconds per chapter it printed, and the peak resident memory of the build and its
papermill kernels (the largest single process, as /usr/bin/time -v reports it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BENCHMARKS = ["methods", "capture", "peers", "targets", "perturbation", "masking", "metrics", "cli"]
QUICK = ["--models", "tiny_cnn", "--size", "32", "--batch", "2", "--reps", "1", "--no-memory"]
QUICK_EXTRA = {"methods": ["--explicit-sample", "2"], "targets": ["--sample", "2"], "perturbation": ["--n-tot", "2"],
               "metrics": ["--steps", "2"]}


def bench_args(name: str, args) -> list[str]:
    "The command-line options passed on to one benchmark."
    if name == "cli":  # the command line's own options: photographs and rounds, no model or device
        return ["--quick"] if args.quick else []
    if args.quick:
        return QUICK + QUICK_EXTRA.get(name, []) + ["--device", args.device, "--threads", str(args.threads)]
    out = ["--device", args.device, "--threads", str(args.threads)]
    if args.reps is not None:
        out += ["--reps", str(args.reps)]
    if args.models and name != "masking":
        out += ["--models", *args.models]
    if args.batch is not None and name in ("methods", "capture", "peers", "targets"):
        out += ["--batch", str(args.batch)]
    if args.perturbation_batch is not None and name == "perturbation":
        out += ["--batch", str(args.perturbation_batch)]
    if args.chunk is not None and name == "targets":
        out += ["--chunk", str(args.chunk)]
    if args.no_memory:
        out.append("--no-memory")
    return out


def wait_for_quiet(max_load: float, minutes: float) -> list[float]:
    "Wait until the 1-minute load average is at most max_load (checking every 2 minutes, up to `minutes`)."
    deadline = time.time() + 60 * minutes
    while os.getloadavg()[0] > max_load and time.time() < deadline:
        print(f"==> load average {os.getloadavg()[0]:.2f} > {max_load}: waiting 2 minutes", flush=True)
        time.sleep(120)
    return [round(v, 2) for v in os.getloadavg()]


def run(cmd: list[str], env: dict) -> tuple[int, float, float, str]:
    "Run cmd, streaming its output; (exit status, wall seconds, peak resident MB of it and its waited-for children, output)."
    begin = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        print("    " + line.rstrip(), flush=True)
        lines.append(line)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - begin, usage.ru_maxrss / 1024, "".join(lines)


def book(env: dict, out_dir: Path) -> dict:
    "Execute every chapter with papermill (no HTML); wall time, seconds per chapter, peak resident memory."
    code, wall, peak, output = run([sys.executable, "-m", "tools.build_book", "--no-html", "--force"], env)
    chapters = {m.group(1): float(m.group(2))
                for m in re.finditer(r"nbs/(\S+)\.ipynb \.\.\. ([0-9.]+) s", output)}
    result = {"command": "python -m tools.build_book --no-html --force", "returncode": code, "wall_s": wall,
              "max_rss_mb": peak, "chapters_s": chapters, "machine": common.machine()}
    common.write_json(out_dir / "book.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random network, one repetition, no memory runs")
    parser.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS, help="run only these (none: only --book)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="batch of methods, peers and targets (default 16)")
    parser.add_argument("--perturbation-batch", type=int, default=None, help="images per repetition (default 4)")
    parser.add_argument("--chunk", type=int, default=None, help="classes per batched call of the targets benchmark "
                        "(default 29; smaller on a GPU at batch 64, whose batched backward holds chunk x batch images)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default: each benchmark's own, >= 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--book", action="store_true", help="also execute the book's chapters and measure them")
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--wait-minutes", type=float, default=30.0)
    args = parser.parse_args(argv)
    global common
    from . import common  # torch, only once the arguments are known to be good

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k, v in common.MALLOC.items():
        env.setdefault(k, v)
    load_before = [round(v, 2) for v in os.getloadavg()] if args.quick else wait_for_quiet(args.max_load,
                                                                                          args.wait_minutes)
    names = BENCHMARKS if args.only is None else args.only
    given = sys.argv if argv is None else [sys.argv[0], *argv]
    shown = [common.repo_relative(Path(a)) if i and given[i - 1] == "--out-dir" else a for i, a in enumerate(given)]
    summary = {"command": " ".join([Path(sys.executable).name, *shown]) if argv is None else shown[1:],
               "quick": args.quick, "device": args.device, "load_average_before": load_before,
               "malloc": {k: env[k] for k in common.MALLOC}, "machine": common.machine(args.device),
               "benchmarks": {}}
    summary["machine"]["malloc"] = summary["malloc"]  # what the benchmarks ran with (set for them, not for this process)
    failed = []
    for i, name in enumerate(names):
        if i and not args.quick:  # other work may have started meanwhile
            wait_for_quiet(args.max_load, args.wait_minutes)
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", *bench_args(name, args),
               "--out-dir", str(args.out_dir)]
        print(f"==> {name}: {' '.join(cmd[1:])}", flush=True)
        code, wall, _, _ = run(cmd, env)
        path = common.results_path(name, args.device, args.out_dir)
        own = json.loads(path.read_text())["process"]["max_rss_mb"] if code == 0 and path.exists() else None
        summary["benchmarks"][name] = {"returncode": code, "wall_s": wall, "file": path.name, "max_rss_mb": own}
        if code:
            failed.append(name)
    if args.book:
        print("==> the book's chapters (python -m tools.build_book --no-html --force)", flush=True)
        summary["book"] = {k: v for k, v in book(env, args.out_dir).items() if k != "chapters_s"}
    else:
        summary["book"] = None
    summary["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    path = common.results_path("run", args.device, args.out_dir)
    if args.only is not None and path.exists():  # a partial rerun: keep the other benchmarks' entries
        previous = json.loads(path.read_text())
        previous["benchmarks"].update(summary["benchmarks"])
        if summary.get("book"):
            previous["book"] = summary["book"]
        previous.setdefault("later_runs", []).append({k: summary[k] for k in ("command", "load_average_before",
                                                                              "load_average_after", "benchmarks")})
        summary = previous
    common.write_json(path, summary)
    if failed:
        print(f"==> failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
