"""Fetch the book's JavaScript assets (MathJax 3, require.js, the ipywidgets HTML manager, ONNX Runtime Web) from the
npm registry, and export the photo explainer's model beside them (tools/explainer_model.py).

The built pages then load them from `_static/` and make no request outside the book. The assets land in the
git-ignored `book_assets/`, which `_config.yml` names as `html_static_path`; a complete folder carries a
`.complete` marker, so an interrupted fetch is redone and a finished one is never repeated.
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .explainer_model import export_model, model_ready

#: npm packages, pinned; what we copy from each tarball's `package/` folder, and where it goes in `book_assets/`.
PACKAGES = {
    "requirejs@2.3.8": [("require.js", "require.js")],
    "@jupyter-widgets/html-manager@1.0.15": [("dist/embed-amd.js", "html-manager/embed-amd.js"),
                                             ("dist/*.woff2", "html-manager/"), ("dist/*.woff", "html-manager/"),
                                             ("dist/*.ttf", "html-manager/"), ("dist/*.eot", "html-manager/"),
                                             ("dist/*.svg", "html-manager/")],
    # the WebAssembly build only, as an ES module (a UMD script would register with require.js instead)
    "onnxruntime-web@1.31.1": [("dist/ort.wasm.min.mjs", "ort/ort.wasm.min.mjs"),
                               ("dist/ort-wasm-simd-threaded.mjs", "ort/ort-wasm-simd-threaded.mjs"),
                               ("dist/ort-wasm-simd-threaded.wasm", "ort/ort-wasm-simd-threaded.wasm")],
    "mathjax@3.2.2": [("es5/tex-chtml.js", "mathjax/tex-chtml.js"),
                      ("es5/input/tex/extensions/*.js", "mathjax/input/tex/extensions/"),
                      ("es5/output/chtml/fonts/woff-v2/*.woff", "mathjax/output/chtml/fonts/woff-v2/")],
}
MARKER = ".complete"
#: Files of ours served beside them, copied on every call so that edits reach the book.
LOCAL = {Path(__file__).with_name("widgets_shim.js"): "widgets-shim.js"}


def assets_ready(dest: Path) -> bool:
    "True when `dest` holds a complete set of the assets pinned above (a changed pin means a new fetch)."
    marker = dest / MARKER
    return marker.exists() and marker.read_text() == _marker_text()


def _marker_text() -> str:
    return "\n".join(PACKAGES) + "\n"


def _copy(package: Path, pattern: str, staging: Path, target: str) -> None:
    "Copy the files matching `pattern` in an unpacked npm package to `target` under `staging` (a folder if it ends in /)."
    files = sorted(package.glob(pattern))
    if not files or (len(files) > 1 and not target.endswith("/")):
        raise FileNotFoundError(f"expected {'files' if target.endswith('/') else 'one file'} matching {pattern!r} "
                                f"in {package}, found {len(files)}: update PACKAGES in {__file__}")
    for f in files:
        out = staging / target / f.name if target.endswith("/") else staging / target
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)


def extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack `tar` into `dest`: Python's "data" filter where it has one (3.11.4 and later); before that (Debian 12's
    3.11.2) the same refusals by hand: no path outside `dest`, no links, no devices."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = Path(dest).resolve()
    for member in tar.getmembers():
        inside = (root / member.name).resolve().is_relative_to(root)
        if not inside or not (member.isfile() or member.isdir()):
            raise ValueError(f"refusing to unpack {member.name!r} from {tar.name}: it is a link or a device, or lies "
                             f"outside {root}; the npm package is not what {__file__} expects")
    tar.extractall(root, members=tar.getmembers())


def fetch_assets(dest: Path) -> None:
    "Download the pinned npm tarballs with `npm pack` and lay out the files the book serves in `dest`."
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["npm", "pack", "--silent", *PACKAGES], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        staging = tmp / "book_assets"
        for tgz in tmp.glob("*.tgz"):
            with tarfile.open(tgz) as tar:
                extract(tar, tmp / tgz.stem)
        for spec, copies in PACKAGES.items():
            name = spec.rsplit("@", 1)[0].lstrip("@").replace("/", "-")
            (src,) = [p / "package" for p in tmp.iterdir() if p.is_dir() and p.name.startswith(name + "-")]
            for pattern, target in copies:
                _copy(src, pattern, staging, target)
        (staging / MARKER).write_text(_marker_text())
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(staging), dest)


def ensure_assets(dest: Path) -> bool:
    "Make sure `dest` holds the assets; False (after one message) when npm is missing and the CDNs must serve."
    if assets_ready(dest):
        for src, name in LOCAL.items():
            shutil.copyfile(src, dest / name)
        if not model_ready(dest / "explainer"):
            print(f"==> exporting the photo explainer's model (EfficientNet-Lite0 features to ONNX) into "
                  f"{dest}/explainer/", flush=True)
            export_model(dest / "explainer")
        return True
    if shutil.which("npm") is None:
        print("npm not found: the book will load MathJax and the widget scripts from public CDNs "
              "(install Node.js/npm and rerun for a book that works offline).", flush=True)
        return False
    print(f"==> fetching book assets with npm into {dest}/ ({', '.join(PACKAGES)})", flush=True)
    fetch_assets(dest)
    return ensure_assets(dest)
