"""The command line: its peak memory on many large photographs against one, and the time `--help` takes.

    .venv/bin/python -m benchmarks.bench_cli                          # -> benchmarks/results/cli.json (minutes)
    .venv/bin/python -m benchmarks.bench_cli --quick --out-dir /tmp/b  # small images, one round: structure only

Memory: the peak resident set of the command's own process (its VmHWM, read as it exits), explaining
`--images` photographs of `--megapixels` million pixels (generated JPEGs, in a temporary folder) against explaining
one of them. Each round runs both, in alternating order; the ratio is the median over `--reps` rounds of the
per-round ratio. The goal (issue 23): at most 1.2, which holds only if the images are decoded one at a time.
`--help`: the wall time of a fresh `python -m contrastive_explanations.cli --help`, median of `--help-reps`, beside
a bare interpreter's start and a process that imports torch (what `--help` cost when it imported torch), and
whether torch was imported (`-X importtime`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import RESULTS, ROOT, machine, process_peak, ratio, repo_relative, write_json

MEMORY_GOAL = ("<=", 1.2)
HELP_GOAL_S = 1.0


def photograph(path: Path, megapixels: float, seed: int = 0) -> Path:
    "A smooth random colour photograph of about `megapixels` (3:2), saved as JPEG (quality 90)."
    width = int((megapixels * 1e6 * 1.5) ** 0.5)
    height = int(width / 1.5)
    small = np.random.default_rng(seed).integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), np.uint8)
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# Runs module argv[1] as __main__ with the arguments after it, and writes its own peak resident set (VmHWM) to the
# file $BENCH_PEAK_FILE at exit. Not wait4's ru_maxrss: a child inherits its parent's resident set as a floor there
# (the pages of the forking process count until exec), and this benchmark's own process holds torch.
WRAPPER = """
import atexit, os, runpy, sys
def peak():
    with open('/proc/self/status') as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    with open(os.environ['BENCH_PEAK_FILE'], 'w') as f:
        f.write(str(kb))
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def run_measured(module: str, args: list[str], threads: int, cwd: Path) -> tuple[float, float]:
    "Run `python -m module args` to its end: (its own peak resident set in MB, its wall seconds); raise if it fails."
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        began = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", WRAPPER, module, *args], cwd=cwd, capture_output=True, text=True,
                             env={**child_env(threads), "BENCH_PEAK_FILE": str(peak_file)})
        seconds = time.perf_counter() - began
        if run.returncode:
            raise RuntimeError(f"python -m {module} {' '.join(args[:3])} ... exited with {run.returncode}: "
                               f"{run.stderr[-500:]}")
        return int(peak_file.read_text()) / 1024, seconds


def peak_memory(folder: Path, images: list[Path], reps: int, threads: int) -> dict:
    "Peak memory (MB) of the command on all the images and on the first one, `reps` alternating rounds."
    runs = {"one": [], "many": []}
    seconds = {"one": [], "many": []}
    for r in range(reps):
        for name in (("one", "many") if r % 2 == 0 else ("many", "one")):
            chosen = images[:1] if name == "one" else images
            out = folder / f"out-{name}-{r}"
            mb, s = run_measured("contrastive_explanations.cli", [*map(str, chosen), "--out-dir", str(out)],
                                 threads, folder)
            shutil.rmtree(out)
            runs[name].append(mb)
            seconds[name].append(s)
            print(f"    round {r}: {name:4s} ({len(chosen)} images) {mb:8.1f} MB  {s:6.1f} s", flush=True)
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v), "times": v,
                   "images": 1 if name == "one" else len(images), "seconds": seconds[name]}
            for name, v in runs.items()}


def timed(argv: list[str], reps: int) -> dict:
    "Wall seconds of a fresh process, median over `reps`; with the last run's stderr."
    times, stderr = [], ""
    for _ in range(reps):
        began = time.perf_counter()
        run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=child_env(1))
        times.append(time.perf_counter() - began)
        if run.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited with {run.returncode}: {run.stderr[-500:]}")
        stderr = run.stderr
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": reps, "times": times,
            "stderr": stderr}


def help_time(reps: int) -> dict:
    "--help's wall time, and whether it imported torch (read from -X importtime)."
    h = timed([sys.executable, "-X", "importtime", "-m", "contrastive_explanations.cli", "--help"], reps)
    imported = {line.rsplit("|", 1)[-1].strip() for line in h.pop("stderr").splitlines() if "|" in line}
    return {**h, "torch_imported": "torch" in imported, "modules_imported": len(imported),
            "goal_s": HELP_GOAL_S, "met": h["median"] <= HELP_GOAL_S}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12, help="how many photographs in the large run (default 12)")
    p.add_argument("--megapixels", type=float, default=24.0, help="size of each photograph (default 24)")
    p.add_argument("--reps", type=int, default=3, help="rounds of (one, many), medians over them (default 3)")
    p.add_argument("--help-reps", type=int, default=7, help="fresh --help processes timed (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the command (default 1)")
    p.add_argument("--quick", action="store_true", help="2 images of 0.05 MP, one round: structure only")
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.megapixels, args.reps, args.help_reps = 2, 0.05, 1, 1
    began = time.perf_counter()
    results = {"benchmark": "cli", "settings": {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in
                                                 vars(args).items()}, "machine": machine("cpu")}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        folder = Path(tmp)
        first = photograph(folder / "photo-00.jpg", args.megapixels)
        images = [first] + [Path(shutil.copy(first, folder / f"photo-{i:02d}.jpg")) for i in range(1, args.images)]
        with Image.open(first) as im:
            results["settings"]["photograph"] = {"width": im.width, "height": im.height,
                                                 "jpeg_bytes": first.stat().st_size}
        print(f"==> cli: peak memory, {args.images} photographs of {im.width} x {im.height} against one", flush=True)
        memory = peak_memory(folder, images, args.reps, args.threads)
    results["peak_memory_mb"] = memory
    results["ratios"] = {"peak memory: many images / one": ratio(
        memory, "many", "one", MEMORY_GOAL, what="7. the command line decodes one image at a time",
        note=f"{args.images} photographs of {args.megapixels:g} MP against one; max RSS of the command's process")}
    print("==> cli: --help, python start, import torch", flush=True)
    results["help_seconds"] = help_time(args.help_reps)
    results["python_start_seconds"] = timed([sys.executable, "-c", "pass"], args.help_reps)
    results["import_torch_seconds"] = timed([sys.executable, "-c", "import torch"], args.help_reps)
    for key in ("python_start_seconds", "import_torch_seconds"):
        results[key].pop("stderr")
    results["process"] = {"wall_s": time.perf_counter() - began, **process_peak()}
    results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    r, h = results["ratios"]["peak memory: many images / one"], results["help_seconds"]
    print(f"    peak memory {memory['many']['median']:.0f} MB ({args.images} images) / {memory['one']['median']:.0f} "
          f"MB (one) = {r['value']:.2f} [{r['min']:.2f}, {r['max']:.2f}] {r['goal_text']}  "
          f"{'met' if r['met'] else 'MISSED'}", flush=True)
    print(f"    --help {h['median']:.3f} s (torch imported: {h['torch_imported']}); import torch "
          f"{results['import_torch_seconds']['median']:.2f} s", flush=True)
    path = (args.out_dir or RESULTS) / "cli.json"
    write_json(path, results)
    print(f"==> written {path}", flush=True)
    return results


if __name__ == "__main__":
    main()
