"""The Introduction's photo explainer in headless chromium: time from file chosen to maps drawn, bytes the page
downloads, and how far the browser's numbers are from Python's, on the packaged photographs.

    .venv/bin/python -m benchmarks.bench_explainer            # needs the built book (make book) -> explainer.json

Two comparisons, to keep the model's error apart from the resampling's: the page given the exact pixels Python's
preprocessing makes (`photoExplainer.explainPixels`) against `pooled_head_maps` and the package's methods, and the
page given the photo's file (the browser resizes it) against Python on the same file. Time: each photo uploaded
`--reps` times after one warm-up, the median of the per-photo medians. The page driving is shared with
tests/test_browser.py.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, machine, write_json

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
INTRODUCTION = "executed/index.html"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATE = "() => document.querySelector('.photo-explainer')?.dataset.state"


def chromium_path() -> Path:
    "$CHROMIUM, else the first chromium on PATH."
    return Path(os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
                or "/usr/bin/chromium")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    "An HTTP server on 127.0.0.1 (a free port) serving `folder`; yields its base URL."
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def wait_for(page, states: tuple[str, ...], timeout_ms: int = 120_000) -> str:
    "Wait until the explainer is in one of `states`; return the state."
    page.wait_for_function(f"() => {list(states)}.includes(({STATE})())", timeout=timeout_ms)
    return page.evaluate(STATE)


def open_explainer(page, base_url: str) -> None:
    "Open the Introduction and wait for the explainer's model; an AssertionError with the page's message if it fails."
    page.goto(f"{base_url}/{INTRODUCTION}")
    state = wait_for(page, ("ready", "error"))
    assert state == "ready", f"the photo explainer did not load: {page.inner_text('.pe-status')}"


def upload(page, path: Path) -> tuple[float, dict]:
    "Choose `path` in the explainer's file input; the seconds until its maps are drawn, and what it computed."
    chooser = page.locator(".photo-explainer input[type=file]")
    chooser.evaluate("input => { input.value = ''; input.closest('.photo-explainer').dataset.state = 'chosen'; }")
    began = time.perf_counter()  # the same file again must fire a change too, and an old 'done' must not count
    chooser.set_input_files(str(path))
    state = wait_for(page, ("done", "error"))
    seconds = time.perf_counter() - began
    assert state == "done", f"{path.name}: {page.inner_text('.pe-status')}"
    return seconds, page.evaluate("() => window.photoExplainer.last")


def explain_pixels(page, x: torch.Tensor, method: str = "gradcam") -> dict:
    "The explainer's logits and maps for the exact pixels x (3, S, S) in [0, 1], with `method`, top class."
    page.select_option(".photo-explainer select[aria-label=method]", method)
    return page.evaluate("px => window.photoExplainer.explainPixels(new Float32Array(px))", x.flatten().tolist())


def relative_error(got, want) -> float:
    "The largest absolute difference over the largest absolute value of `want`."
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def python_side(model, x: torch.Tensor, t: int, method: str) -> tuple[np.ndarray, dict]:
    "Python's logits (C,) and its maps of class t, per target, for the pixels x, with the package's method."
    from contrastive_explanations.methods import METHODS as REGISTRY

    e = REGISTRY[method](model)(x[None], [t], ["original", "weighted", "mean", "max"])
    return e.logits[0].numpy(), {name: e.maps[0, 0, i].flatten().numpy() for i, name in enumerate(e.targets)}


def measure(args) -> dict:
    from playwright.sync_api import sync_playwright
    from PIL import Image

    from contrastive_explanations.data.datasets import packaged_photos
    from contrastive_explanations.data.models import build_model

    torch.set_num_threads(2)
    model = build_model("efficientnet_lite0")
    photos = packaged_photos().photos
    site = args.site.resolve()
    results = {"benchmark": "explainer", "settings": {"reps": args.reps, "site": str(
                   site.relative_to(ROOT) if site.is_relative_to(ROOT) else site)},
               "machine": machine("cpu"), "photos": {}}
    with serve(args.site) as base_url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path()), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        sizes: dict[str, int] = {}
        page.on("requestfinished", lambda r: sizes.__setitem__(r.url, r.sizes()["responseBodySize"]))
        open_explainer(page, base_url)
        page.wait_for_load_state("networkidle")
        results["page_download_bytes"] = sum(sizes.values())
        results["model_download_bytes"] = sum(v for k, v in sizes.items() if "/_static/explainer/" in k
                                              or "/_static/ort/" in k)
        medians = []
        for photo in photos:
            upload(page, photo.path)  # warm-up
            timed = [upload(page, photo.path) for _ in range(args.reps)]
            seconds, last = [s for s, _ in timed], timed[-1][1]
            medians.append(statistics.median(seconds))
            with Image.open(photo.path) as im:
                x = model.preprocess(im.convert("RGB"))
            with torch.no_grad():
                p_python = model(x[None]).softmax(1)[0]
            p_browser = torch.tensor(last["logits"]).softmax(0)
            top = int(p_python.argmax())
            exact = explain_pixels(page, x)
            want_logits, want_maps = python_side(model, x, exact["class"], "gradcam")
            results["photos"][photo.name] = {
                "seconds_median": statistics.median(seconds), "seconds": seconds,
                "top_class_python": top, "top_class_browser": int(p_browser.argmax()),
                "top_probability_python": float(p_python[top]), "top_probability_browser": float(p_browser[top]),
                "exact_pixels_logits_error": relative_error(exact["logits"], want_logits),
                "exact_pixels_maps_error": max(relative_error(exact["maps"][k], v) for k, v in want_maps.items())}
        browser.close()
    results["seconds_median"] = statistics.median(medians)
    shifts = [abs(r["top_probability_browser"] - r["top_probability_python"]) for r in results["photos"].values()]
    results["top_probability_shift_max"] = max(shifts)
    results["top_probability_shift_median"] = statistics.median(shifts)
    results["top_class_agrees"] = sum(r["top_class_python"] == r["top_class_browser"] for r in results["photos"].values())
    results["book_bytes"] = sum(f.stat().st_size for f in Path(args.site).rglob("*") if f.is_file())
    results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed uploads of each photo after one warm-up")
    parser.add_argument("--site", type=Path, default=HTML, help="the built book (default: _build/html)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.site / INTRODUCTION).exists():
        parser.exit(2, f"error: {args.site / INTRODUCTION} is missing: build the book first (make book)\n")
    results = measure(args)
    path = args.out_dir / "explainer.json"
    write_json(path, results)
    print(f"==> {results['seconds_median']:.2f} s from file to maps (median), page {results['page_download_bytes'] / 1e6:.1f} MB, "
          f"top probability moved by at most {results['top_probability_shift_max']:.3f}; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
