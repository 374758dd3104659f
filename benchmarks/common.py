"""What every benchmark shares: the models, interleaved timing, ratios with their goals, peak memory, the machine.

Timing: each repetition runs every variant once, in an order that rotates between repetitions (interleaved), after
one warm-up round; a ratio is the median over repetitions of the per-repetition ratio (numerator and denominator
from the same round), with its spread (min, max) beside it. On a GPU every variant ends with a synchronisation.
Peak memory: CPU, the peak resident set of a fresh process during a second run of a variant (the first warms up),
VmHWM reset through /proc/self/clear_refs; GPU, torch.cuda.max_memory_allocated over one run after a warm-up.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
# glibc malloc: serve large blocks from the heap and keep freed memory, so that repeated runs do not page-fault
# their buffers in again and again (which would dominate the timings on a small CPU)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
CPU_MODELS = ["efficientnet_lite0", "resnet18"]
GPU_MODELS = ["vgg16_bn", "vit_b_16"]
TINY = "tiny_cnn"  # --quick: a random 3-conv network with 200 classes (C >= 145 for the Figure 6 workload)


# ---------------------------------------------------------------------------------------------------- models
class TinyCNN(nn.Sequential):
    "A tiny random CNN for the quick structural runs; `default_layer` names its last convolution block."
    default_layer = "2"

    def __init__(self, classes: int = 200):
        super().__init__(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def build(name: str, device: str = "cpu") -> nn.Module:
    "A network by name, in eval mode on `device`: Lite0 with its real weights, the others random (timing only)."
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from contrastive_explanations.data.models import efficientnet_lite0
        model = efficientnet_lite0()
    elif name == TINY:
        model = TinyCNN()
    else:
        model = torchvision.models.get_model(name, weights=None)
        head = getattr(getattr(model, "heads", None), "head", None)
        if head is not None:  # torchvision zero-initialises a ViT's head: every logit 0, every map 0
            nn.init.normal_(head.weight, std=0.02)
    return model.to(device).eval()


def is_vit(model: nn.Module) -> bool:
    return any(isinstance(m, torchvision.models.VisionTransformer) for m in model.modules())


def deeper_layer(name: str) -> str | None:
    "A layer earlier than the default one, for the explicit baseline whose backward crosses more of the network."
    return {"efficientnet_lite0": "net.features.net._blocks.10", "resnet18": "layer3", "vgg16_bn": "features.30",
            TINY: "1"}.get(name)


def images(batch: int, size: int, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    "A fixed batch of random images in [0, 1]."
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synchronisations(fn: Callable) -> list[str]:
    "The host-device synchronisations torch reports (torch.cuda.set_sync_debug_mode) while fn runs on a GPU."
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message).splitlines()[0][:150] for w in caught if "synchroniz" in str(w.message).lower()]


def time_all(fns: dict[str, Callable], reps: int, device: str = "cpu",
             warmup: dict[str, Callable] | None = None) -> dict:
    """Seconds of every variant over `reps` interleaved rounds after one warm-up round (`warmup` or `fns`).

    A variant may return a float: seconds it still owes (work it sampled instead of running, see its notes)."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps + 1):  # round 0 is the warm-up
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            fn = (warmup or fns).get(n, fns[n]) if r == 0 else fns[n]
            synchronize(device)
            start = time.perf_counter()
            owed = fn()
            synchronize(device)
            seconds = time.perf_counter() - start + (owed if isinstance(owed, float) else 0.0)
            if r:
                times[n].append(seconds)
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v), "times": v}
            for n, v in times.items()}


def goal_text(goal: tuple[str, float] | None) -> str:
    return "" if goal is None else f"{'≤' if goal[0] == '<=' else '≥'} {goal[1]:g}"


def ratio(seconds: dict, num: str, den: str, goal: tuple[str, float] | None = None, what: str = "",
          note: str = "", scale: float = 1.0) -> dict:
    "num / den (times `scale`) per round, median and spread, with its goal ('<=' or '>=', value) and whether it is met."
    per_round = [scale * a / b for a, b in zip(seconds[num]["times"], seconds[den]["times"])]
    value = statistics.median(per_round)
    met = None if goal is None else (value <= goal[1] if goal[0] == "<=" else value >= goal[1])
    return {"value": value, "min": min(per_round), "max": max(per_round), "numerator": num, "denominator": den,
            "what": what, "goal": None if goal is None else list(goal), "goal_text": goal_text(goal), "met": met,
            "note": note}


# ---------------------------------------------------------------------------------------------------- memory
def status_kb(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def peak_child(module: str, model_name: str, variant: str, options: dict) -> str:
    "In a fresh process: total peak and growth (MB) of the resident set over a second run of `variant`."
    import importlib
    torch.set_num_threads(int(options.get("threads", 2)))
    bench = importlib.import_module(f"{__package__}.{module}")  # e.g. benchmarks.bench_masking
    fns = bench.variants_for(model_name, options)
    fns[variant]()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    before = status_kb("VmRSS")  # read after the reset, so that the peak cannot fall below it
    fns[variant]()
    peak = status_kb("VmHWM")
    return f"{peak / 1024} {(peak - before) / 1024}"


def peak_memory(module: str, model_name: str, variant: str, options: dict) -> dict:
    """Peak resident memory (MB) of a run of `variant`, in all and above the resident set before it, in a fresh process.
    A process that fails (e.g. killed for memory) gives None and the reason under 'error'."""
    code = (f"from benchmarks import common; "
            f"print(common.peak_child({module!r}, {model_name!r}, {variant!r}, {options!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE.parent, capture_output=True, text=True)
    if out.returncode:  # recorded, not raised: the variant's timing still stands
        why = (f"killed by signal {-out.returncode} (9: most likely the kernel's out-of-memory killer)"
               if out.returncode < 0 else f"exit status {out.returncode}: {out.stderr.strip()[-500:]}")
        print(f"    peak memory of {model_name} {variant} not measured: {why}", flush=True)
        return {"peak_mb": None, "growth_mb": None, "error": why}
    peak, growth = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"peak_mb": peak, "growth_mb": growth, "how": "VmHWM of a fresh process, second run"}


def gpu_peak_memory(fn: Callable) -> dict:
    "Peak GPU memory (MB) allocated by torch during one run of fn (after a warm-up run), and above what was before."
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20, "how": "torch.cuda.max_memory_allocated"}


def median_peak_memory(module: str, model_name: str, variant: str, options: dict, repeats: int) -> dict:
    "The median over `repeats` fresh processes of peak_memory (each process's figures are kept under 'runs')."
    runs = [peak_memory(module, model_name, variant, options) for _ in range(repeats)]
    if repeats == 1 or any(r["peak_mb"] is None for r in runs):
        return runs[0] if repeats == 1 else {**next(r for r in runs if r["peak_mb"] is None), "runs": runs}
    return {"peak_mb": statistics.median(r["peak_mb"] for r in runs),
            "growth_mb": statistics.median(r["growth_mb"] for r in runs),
            "how": f"VmHWM of a fresh process, second run; median of {repeats} processes", "runs": runs}


def memory_of(module: str, model_name: str, names: list[str], options: dict, fns: dict | None = None,
              repeats: int = 1) -> dict:
    "Peak memory of each named variant: fresh processes on the CPU (median of `repeats`), the allocator's peak on a GPU."
    if torch.device(options["device"]).type == "cuda":
        return {n: gpu_peak_memory(fns[n]) for n in names}
    return {n: median_peak_memory(module, model_name, n, options, repeats) for n in names}


# ---------------------------------------------------------------------------------------------------- results
def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    "Where and how the numbers were measured."
    info = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "platform": platform.platform(), "load_average": [round(v, 2) for v in os.getloadavg()],
            "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device}
    if torch.device(device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def process_peak() -> dict:
    "This process's peak resident set (MB) so far, and the largest of its waited-for children's."
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_max_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def write_json(path: Path, data: dict) -> None:
    "Write atomically: a temporary file renamed over the target."
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def repo_relative(path: Path) -> str:
    "A path as the results record it: relative to the repository, or only its name when it lies outside (no machine's folders)."
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else f"<outside the repository>/{path.name}"


def results_path(name: str, device: str, out_dir: Path | None = None) -> Path:
    "benchmarks/results/NAME.json on the CPU, NAME-cuda.json on a GPU (a separate file)."
    suffix = "" if torch.device(device).type == "cpu" else f"-{torch.device(device).type}"
    return (out_dir or RESULTS) / f"{name}{suffix}.json"


def common_arguments(parser, reps: int = 7) -> None:
    "The options every benchmark takes."
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions after one warm-up round (>= 5)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", nargs="+", default=None, help="default: efficientnet_lite0 resnet18 (CPU), "
                        "vgg16_bn vit_b_16 (cuda)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")


def start(args, name: str) -> tuple[dict, Path]:
    "Set the threads, fill in the default models, and begin the results: settings and machine."
    torch.set_num_threads(args.threads)
    if args.models is None:
        args.models = GPU_MODELS if torch.device(args.device).type == "cuda" else CPU_MODELS
    settings = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"benchmark": name, "settings": settings, "machine": machine(args.device), "models": {}}, \
        results_path(name, args.device, args.out_dir)


def each_model(results: dict, models: list[str], measure: Callable[[str], dict | None]) -> None:
    "results['models'][m] = measure(m) for each model; a failure is recorded (and printed), and the others still run."
    for name in models:
        try:
            entry = measure(name)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on one network: keep the others' results
            traceback.print_exc()
            entry = {"error": f"{type(e).__name__}: {e}"[:2000]}
            results.setdefault("failed", []).append(name)
        if entry is not None:
            results["models"][name] = entry
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def throughput_entry(seconds: dict, batch: int, ratios: dict, checks: dict) -> dict:
    "A model's results: each variant's seconds and images per second, the ratios, and the correctness checks."
    return {"seconds": seconds, "images_per_second": {n: batch / v["median"] for n, v in seconds.items()},
            "ratios": ratios, "checks": checks}


def with_memory(entry: dict, args, module: str, model_name: str, names: list[str], options: dict,
                fns: dict) -> dict:
    "entry with the peak memory of the named variants under 'peak_memory_mb', unless --no-memory."
    if not args.no_memory:
        print(f"==> {module.removeprefix('bench_')}, {model_name}: peak memory", flush=True)
        entry["peak_memory_mb"] = memory_of(module, model_name, names, options, fns)
    return entry


def measure_all(results: dict, path: Path, began: float, models: list[str], measure: Callable[[str], dict | None]
                ) -> dict:
    "Measure every model (each_model), then finish: the results, also returned."
    each_model(results, models, measure)
    finish(results, path, began)
    return results


def finish(results: dict, path: Path, began: float) -> None:
    "Add the process's wall time and peak memory, print the ratios, write the file."
    results["process"] = {"wall_s": time.perf_counter() - began, **process_peak()}
    results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    for model, r in results["models"].items():
        for k, v in r.get("ratios", {}).items():
            flag = "" if v["met"] is None else ("  met" if v["met"] else "  MISSED")
            spread = "" if v["min"] is None else f"[{v['min']:.2f}, {v['max']:.2f}]"
            print(f"    {model:18s} {k:60s} {v['value']:9.2f}  {spread:16s} {v['goal_text']}{flag}", flush=True)
    write_json(path, results)
    print(f"==> written {path}", flush=True)
