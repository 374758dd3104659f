"""The command line (nbs/20_cli.ipynb): it never writes over an input or a file it did not make, refuses bad input in
one line (exit 2) before writing anything, decodes one image at a time, and answers --help without torch.

The refusals run in-process through `main([...])`; a few subprocesses check what only a fresh process shows (the
imports of --help, a real offline download, the default output folder)."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from contrastive_explanations import cli
from contrastive_explanations.cli import SUFFIX, WRITER, main, output_paths, output_stems, written_here

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "One torch thread: on a busy machine with two cores, two threads spin against each other and take seconds."
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_env(**extra: str) -> dict[str, str]:
    "The environment of a fresh process of the command: one thread (as above), and `extra`."
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def picture(path: Path, size=(64, 64), seed: int = 0, **save) -> Path:
    "A small random RGB image at `path` (its format from the extension)."
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save)
    return path


def snapshot(root: Path) -> dict[str, str]:
    "Every path under root: a file's sha256, a folder, or a link's target."
    out = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        out[key] = (f"link -> {os.readlink(p)}" if p.is_symlink() else "folder" if p.is_dir()
                    else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def own_png(path: Path) -> Path:
    "A PNG carrying the command's mark, as if it had written it."
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"{WRITER} 0.1.0")
    return picture(path, (8, 8), pnginfo=info)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    "A folder of inputs, good and bad; the working directory, so that the default --out-dir is in it too."
    picture(tmp_path / "good.png")
    picture(tmp_path / "good.jpg", seed=1)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("trunc.jpg", "trunc.png"):
        whole = picture(tmp_path / f"whole-{name}", (200, 150), seed=2).read_bytes()
        (tmp_path / f"whole-{name}").unlink()
        (tmp_path / name).write_bytes(whole[: len(whole) // 2])
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def offline(ws: Path, monkeypatch) -> None:
    "An empty torchvision cache and a network that refuses every connection (a proxy on a closed local port)."
    home = ws.parent / f"{ws.name}-torch-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # a new opener: it reads the proxy settings above


def foreign(name: str, content: str = "mine"):
    "Setup: a file of the user's at an output path."
    return lambda ws, mp: (ws / name).write_text(content)


def link(name: str, target: str):
    return lambda ws, mp: (ws / name).symlink_to(ws / target)


def hardlink(name: str, target: str):
    return lambda ws, mp: os.link(ws / target, ws / name)


def own_figure_and_foreign_report(ws, mp):
    own_png(ws / f"good{SUFFIX}.png")
    (ws / f"good{SUFFIX}.json").write_text('{"written_by": "someone else"}')


def no_weights(ws, mp):
    home = ws.parent / f"{ws.name}-empty-torch-home"
    home.mkdir(exist_ok=True)
    mp.setenv("TORCH_HOME", str(home))


NO_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
HAS_GPU = pytest.mark.skipif(os.environ.get("CUDA_VISIBLE_DEVICES") != "" and
                             __import__("torch").cuda.is_available(), reason="a GPU is here")

# (id, arguments, a word the one line must contain, setup(workspace, monkeypatch) or None)
BAD = [
    # argparse: one line, not the usage block
    ("no image", [], "IMAGE", None),
    ("unknown model", ["good.png", "--model", "resnet1"], "--model", None),
    ("unknown method", ["good.png", "--method", "gradcamm"], "--method", None),
    ("unknown target", ["good.png", "--targets", "weighted", "banana"], "--targets", None),
    ("top-k zero", ["good.png", "--top-k", "0"], "--top-k", None),
    ("top-k not a number", ["good.png", "--top-k", "two"], "--top-k", None),
    ("class not a number", ["good.png", "--classes", "cat"], "--classes", None),
    ("unknown option", ["good.png", "--overwrite"], "--overwrite", None),
    # the options' own checks, before any image is opened
    ("classes and top-k", ["good.png", "--classes", "1", "--top-k", "3"], "--classes and --top-k", None),
    ("negative class", ["good.png", "--classes", "-1"], "--classes", None),
    ("class twice", ["good.png", "--classes", "3", "3"], "--classes", None),
    ("target twice", ["good.png", "--targets", "weighted", "weighted"], "--targets", None),
    ("versus empty", ["good.png", "--versus", " "], "--versus is empty", None),
    ("versus negative", ["good.png", "--versus", "-3"], "--versus -3", None),
    ("versus one of the classes", ["good.png", "--classes", "3", "--versus", "3"], "--versus 3 is also in --classes",
     None),
    ("meta device", ["good.png", "--device", "meta"], "--device meta", None),
    ("no such device", ["good.png", "--device", "banana"], "--device banana", None),
    ("bad device index", ["good.png", "--device", "cuda:x"], "--device cuda:x", None),
    ("checkpoint for a model without one", ["good.png", "--checkpoint", "notes.txt"], "--checkpoint", None),
    ("fine-tuned model without checkpoint", ["good.png", "--model", "vgg16_bn_cub"], "--checkpoint", None),
    ("missing checkpoint", ["good.png", "--model", "vgg16_bn_cub", "--checkpoint", "gone.pt"], "gone.pt", None),
    ("download for a packaged model", ["good.png", "--download"], "--download", None),
    ("unknown metric", ["good.png", "--evaluate", "deletion", "delition"], "--evaluate", None),
    ("metric that needs masks", ["good.png", "--evaluate", "pointing"], "--evaluate", None),
    ("evaluate without a metric", ["good.png", "--evaluate"], "--evaluate", None),
    # the images
    ("missing image", ["good.png", "nope.jpg"], "nope.jpg", None),
    ("text file", ["good.png", "notes.txt"], "notes.txt", None),
    ("empty file", ["good.png", "empty.png"], "empty.png", None),
    ("folder as image", ["good.png", "folder"], "folder", None),
    ("truncated JPEG", ["good.png", "trunc.jpg"], "trunc.jpg", None),
    ("truncated PNG", ["good.jpg", "trunc.png"], "trunc.png", None),
    # --out-dir
    ("out-dir is a file", ["good.png", "--out-dir", "afile"], "--out-dir", None),
    ("out-dir under a file", ["good.png", "--out-dir", "afile/sub"], "--out-dir", None),
    ("out-dir a device", ["good.png", "--out-dir", "/dev/null"], "--out-dir", None),
    pytest.param("out-dir cannot be made", ["good.png", "--out-dir", "/proc/nope"], "--out-dir", None,
                 marks=NO_PROC, id="out-dir cannot be made"),
    pytest.param("out-dir takes no files", ["good.png", "--out-dir", "/proc"], "--out-dir", None, marks=NO_PROC,
                 id="out-dir takes no files"),
    # output paths: never an input, never a file the command did not write
    ("output is an input", ["good.png", f"good{SUFFIX}.png"], f"good{SUFFIX}.png",
     lambda ws, mp: picture(ws / f"good{SUFFIX}.png", seed=3)),
    ("output links to the input", ["good.png"], f"good{SUFFIX}.png", link(f"good{SUFFIX}.png", "good.png")),
    ("output is a hard link of the input", ["good.png"], f"good{SUFFIX}.png", hardlink(f"good{SUFFIX}.png", "good.png")),
    ("output links elsewhere", ["good.png"], f"good{SUFFIX}.png", link(f"good{SUFFIX}.png", "notes.txt")),
    ("foreign figure", ["good.png"], f"good{SUFFIX}.png",
     lambda ws, mp: picture(ws / f"good{SUFFIX}.png", seed=4)),
    ("foreign report", ["good.png"], f"good{SUFFIX}.json", own_figure_and_foreign_report),
    ("foreign report with --evaluate", ["good.png", "--evaluate", "deletion"], f"good{SUFFIX}.json",
     own_figure_and_foreign_report),
    ("foreign maps", ["good.png", "--save-maps"], f"good{SUFFIX}.npz", foreign(f"good{SUFFIX}.npz")),
    ("folder at an output path", ["good.png"], f"good{SUFFIX}.json",
     lambda ws, mp: (ws / f"good{SUFFIX}.json").mkdir()),
    ("second image's output taken", ["good.png", "good.jpg"], f"good-2{SUFFIX}.png",
     foreign(f"good-2{SUFFIX}.png")),
    # what only the model can tell: still before any output
    pytest.param("no GPU", ["good.png", "--device", "cuda"], "--device cuda", None, marks=HAS_GPU, id="no GPU"),
    ("weights not here", ["good.png", "--model", "resnet18"], "--download", no_weights),
    ("offline download", ["good.png", "--model", "resnet18", "--download"], "--download",
     lambda ws, mp: offline(ws, mp)),
    ("not a checkpoint", ["good.png", "--model", "vgg16_bn_cub", "--checkpoint", "notes.txt"], "--checkpoint", None),
    ("top-k beyond the classes", ["good.png", "--top-k", "5000"], "--top-k 5000", None),
    ("class beyond the classes", ["good.png", "--classes", "1000"], "--classes 1000", None),
    ("versus beyond the classes", ["good.png", "--versus", "1000"], "--versus 1000", None),
    ("versus no such class", ["good.png", "--versus", "tigr cat"], "did you mean 'tiger cat'", None),
    ("versus a name of two classes", ["good.png", "--versus", "cardigan"], "264, 474", None),
    ("versus by name one of the classes", ["good.png", "--classes", "282", "--versus", "Tiger Cat"],
     "is class 282, also in --classes", None),
    ("ViT method on a CNN", ["good.png", "--method", "vit_gradcam"], "--method vit_gradcam", None),
    ("no such layer", ["good.png", "--layer", "no.such.layer"], "--layer no.such.layer", None),
    ("layer on a method without one", ["good.png", "--method", "gradient", "--layer", "net.features"], "--layer",
     None),
    ("layer that is no map", ["good.png", "--layer", "net.head.1"], "--layer net.head.1", None),
]


def test_the_table_is_large_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("name, argv, word, setup", BAD, ids=[c.id if hasattr(c, "marks") else c[0] for c in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(workspace, monkeypatch, capsys, name, argv, word, setup):
    if setup is not None:
        setup(workspace, monkeypatch)
    before = snapshot(workspace)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith(f"{WRITER}: error: "), err
    assert word in err and "Traceback" not in err + out, err
    assert all(line.startswith("Downloading: ") for line in out.splitlines()), out  # torch.hub says what it tried
    assert snapshot(workspace) == before, "a file was written, changed or removed"


def test_a_photo_in_the_current_folder_stays_and_its_outputs_go_beside_it(tmp_path, monkeypatch, capsys):
    "The data-loss case: `cd photos && contrastive-explain coffee.png` used to replace the photo with the figure."
    photo = picture(tmp_path / "coffee.png")
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    run = subprocess.run([sys.executable, "-m", "contrastive_explanations.cli", "coffee.png"], cwd=tmp_path,
                         env=fresh_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert hashlib.sha256(photo.read_bytes()).hexdigest() == digest
    figure, report = tmp_path / f"coffee{SUFFIX}.png", tmp_path / f"coffee{SUFFIX}.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["coffee.png", figure.name, report.name])
    assert f"-> {figure.name}" in run.stdout and written_here(figure) and written_here(report)
    with Image.open(figure) as im:
        assert im.size != (64, 64) and im.info["Software"].startswith(WRITER)  # the figure, not the photo
    assert json.loads(report.read_text())["image"] == "coffee.png"
    monkeypatch.chdir(tmp_path)  # again: its own files are replaced ...
    first = figure.stat().st_mtime_ns
    assert main(["coffee.png", "--top-k", "1"]) == 0 and figure.stat().st_mtime_ns != first
    assert len(json.loads(report.read_text())["explained"]) == 1
    report.write_text('{"mine": true}')  # ... and a file of the user's is not
    capsys.readouterr()
    assert main(["coffee.png"]) == 2 and report.name in capsys.readouterr().err
    assert report.read_text() == '{"mine": true}' and hashlib.sha256(photo.read_bytes()).hexdigest() == digest


def test_help_and_version_import_no_torch_and_answer_at_once():
    """The entry point of pyproject.toml, in a fresh process: --help and --version without torch (or numpy), well
    under a second; then the package's public names load on first use."""
    code = """
import contextlib, importlib, io, sys, time, tomllib
began = time.perf_counter()
module, _, name = tomllib.load(open('pyproject.toml', 'rb'))['project']['scripts']['contrastive-explain'].partition(':')
main = getattr(importlib.import_module(module), name)
for argv in (['--help'], ['--version']):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    print(status, repr(out.getvalue()[:40]), flush=True)
print('torch' in sys.modules, 'numpy' in sys.modules, time.perf_counter() - began)
import contrastive_explanations as ce
from contrastive_explanations import GradCAM, build_model, METHODS
assert 'torch' in sys.modules and GradCAM is METHODS['gradcam'] and callable(build_model)
assert all(hasattr(ce, name) for name in ce.__all__) and ce.methods.GradCAM is GradCAM
from contrastive_explanations import *
try:
    ce.no_such_name
except AttributeError as e:
    print(e)
"""
    began = time.perf_counter()
    run = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=fresh_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    help_line = run.stdout.readline()
    wall = time.perf_counter() - began  # up to --help's answer: the interpreter's start, the imports, the help
    stdout, stderr = run.stdout.read(), run.stderr.read()  # not communicate(): readline buffered part of stdout
    assert run.wait(timeout=120) == 0, stderr
    version_line, imports, missing = stdout.splitlines()
    assert help_line.startswith("0 'usage: contrastive-explain") and version_line.startswith(f"0 '{WRITER} 0.")
    torch_loaded, numpy_loaded, seconds = imports.split()
    assert torch_loaded == "False" and numpy_loaded == "False", "--help imported torch or numpy"
    assert float(seconds) < 0.5 and wall < 1.0, (seconds, wall)
    assert missing == "module 'contrastive_explanations' has no attribute 'no_such_name'"


def test_help_says_where_outputs_go_and_what_is_replaced(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"NAME{SUFFIX}.png" in text and "replaced only if this command wrote it" in text
    assert all(name in text for name in ("efficientnet_lite0", "resnet18", "vgg16_bn_cub", "--save-maps"))


def test_the_names_are_the_registries():
    from contrastive_explanations.data.models import FINETUNED_NETWORKS, MODELS, TORCHVISION_IMAGENET
    from contrastive_explanations.explorer import COMPARED_TARGETS
    from contrastive_explanations.methods import METHODS, TARGETS
    assert list(cli.MODEL_NAMES) == list(MODELS) and list(cli.TORCHVISION_MODELS) == list(TORCHVISION_IMAGENET)
    assert list(cli.FINETUNED_MODELS) == list(FINETUNED_NETWORKS)  # the names that need --checkpoint: the table's
    assert list(cli.METHOD_NAMES) == list(METHODS) and list(cli.TARGET_NAMES) == list(TARGETS)
    assert list(cli.DEFAULT_TARGETS) == list(COMPARED_TARGETS)
    from contrastive_explanations.metrics.evaluate import METRICS
    assert list(cli.EVALUATION_METRICS) == [name for name, m in METRICS.items() if m.needs != "masks"]


def test_images_are_decoded_one_at_a_time(workspace, monkeypatch, capsys):
    "When an image is decoded, no earlier decoded image is still alive."
    alive, read = [], cli.read_image

    def tracked(source):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        image = read(source)
        refs.append(weakref.ref(image))
        return image

    refs: list = []
    monkeypatch.setattr(cli, "read_image", tracked)
    paths = [str(picture(workspace / f"p{i}.png", seed=i)) for i in range(3)]
    assert main([*paths, "--out-dir", "out", "--targets", "weighted"]) == 0
    assert alive == [0, 0, 0]
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_same_names_do_not_collide_and_maps_can_be_saved(tmp_path, capsys):
    import stat

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = picture(tmp_path / "a" / "x.png"), picture(tmp_path / "b" / "x.png", seed=1)
    third = picture(tmp_path / "x-2.png", seed=2)
    out = tmp_path / "out" / "deeper"
    assert main([str(first), str(second), str(third), "--save-maps", "--layer", "net.features", "--out-dir",
                 str(out), "--targets", "original", "weighted"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{stem}{SUFFIX}.{kind}" for stem in ("x", "x-2", "x-2-2")
                                                           for kind in ("png", "json", "npz"))
    assert json.loads((out / f"x-2{SUFFIX}.json").read_text())["image"] == str(second)
    assert json.loads((out / f"x-2-2{SUFFIX}.json").read_text())["image"] == str(third)
    with np.load(out / f"x{SUFFIX}.npz") as saved:
        assert saved["maps"].shape[:2] == (2, 2) and list(saved["targets"]) == ["original", "weighted"]
        assert saved["classes"].tolist() == json.loads((out / f"x{SUFFIX}.json").read_text())["explained"]
        assert (np.diff(saved["probabilities"]) <= 0).all()  # the top-2, in order
    assert all(written_here(p) for p in out.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / f"x{SUFFIX}.json").stat().st_mode) == 0o666 & ~umask  # the user's umask, not 0600
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left"


def test_the_classes_asked_for_are_explained(tmp_path):
    photo = picture(tmp_path / "p.jpg")
    assert main([str(photo), "--classes", "7", "281", "--targets", "original", "weighted", "--out-dir",
                 str(tmp_path)]) == 0
    report = json.loads((tmp_path / f"p{SUFFIX}.json").read_text())
    assert report["explained"] == [7, 281] and report["targets"] == ["original", "weighted"]
    assert report["written_by"] == f"{WRITER} {__import__('contrastive_explanations').__version__}"


def test_versus_adds_the_contrast_with_the_rival(tmp_path):
    "--versus: the map of y_t - y_s, which for GradCAM (linear in the gradient) is the map of t minus that of s."
    photo = picture(tmp_path / "p.png")
    out = tmp_path / "out"
    runs = {}
    for name, argv in (("versus", ["--classes", "281", "--targets", "original", "--versus", "tiger cat"]),
                       ("rival", ["--classes", "282", "--targets", "original"])):
        assert main([str(photo), "--save-maps", "--out-dir", str(out / name), *argv]) == 0
        report = json.loads((out / name / f"p{SUFFIX}.json").read_text())
        with np.load(out / name / f"p{SUFFIX}.npz") as saved:
            runs[name] = report, saved["maps"], list(saved["targets"])
    report, maps, targets = runs["versus"]
    assert report["targets"] == targets == ["original", "versus:282"] and report["explained"] == [281]
    rival = runs["rival"][1][0, 0]
    assert np.abs(rival).max() > 0 and not np.allclose(maps[0, 1], maps[0, 0])
    np.testing.assert_allclose(maps[0, 1], maps[0, 0] - rival, atol=1e-5 * np.abs(maps).max())
    top = report["top"][0]["class"]  # with --top-k, the rival is left out of the explained classes
    assert main([str(photo), "--top-k", "1", "--targets", "original", "--versus", str(top), "--out-dir",
                 str(out / "top")]) == 0
    explained = json.loads((out / "top" / f"p{SUFFIX}.json").read_text())["explained"]
    assert explained == [report["top"][1]["class"]] and top not in explained


def test_evaluate_adds_the_metrics_table_to_the_report(tmp_path, capsys):
    "--evaluate: one row per class, target and metric in the report, the numbers of the metric functions themselves."
    import torch

    from contrastive_explanations.data.datasets import read_rgb
    from contrastive_explanations.data.models import build_model
    from contrastive_explanations.methods import make_method
    from contrastive_explanations.metrics.faithfulness import deletion
    photo = picture(tmp_path / "p.png")
    assert main([str(photo), "--top-k", "1", "--targets", "original", "weighted", "--evaluate", "deletion", "mprt",
                 "deletion", "--out-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / f"p{SUFFIX}.json").read_text())
    rows = report["evaluation"]
    assert [(r["metric"], r["target"]) for r in rows] == [(m, t) for m in ("deletion", "mprt")
                                                          for t in ("original", "weighted")]
    assert {r["class"] for r in rows} == set(report["explained"]) and {r["method"] for r in rows} == {"gradcam"}
    assert all(np.isfinite(r["value"]) for r in rows)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].strip().startswith("deletion original ") and "mprt" in out[1]
    model = build_model("efficientnet_lite0")  # the oracle: the metric function on the image, called directly
    x = model.preprocess(read_rgb(photo))[None]
    classes = torch.tensor([report["explained"]])
    maps = make_method("gradcam", model)(x, classes, ["original", "weighted"]).upsampled(x.shape[-2:])
    auc = deletion(model, x, maps, classes).auc("probability").reshape(-1).tolist()
    np.testing.assert_allclose([r["value"] for r in rows[:2]], auc, rtol=1e-6)


def test_a_failed_evaluation_writes_nothing_of_its_image(tmp_path, monkeypatch, capsys):
    "The metrics run before the image's files are written: when they fail, none of its files is there."
    def failing(*args, **kwargs):
        raise ValueError("the metric failed")

    monkeypatch.setattr(cli, "evaluate_image", failing)
    photo = picture(tmp_path / "p.png")
    assert main([str(photo), "--evaluate", "mprt", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the metric failed" in err, err
    assert not (tmp_path / "out").exists()


def test_bad_metrics_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import contrastive_explanations.data.models as models
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    photo = picture(tmp_path / "p.png")
    assert main([str(photo), "--evaluate", "deletion", "pointing"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "'pointing'" in err and "random_logit" in err, err


def test_a_cat_is_a_cat(tmp_path):
    "The figure and the top classes of a real photograph (skimage's Chelsea): the model's top class is a cat."
    import skimage.data
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.jpg")
    assert main([str(tmp_path / "chelsea.jpg"), "--top-k", "2", "--out-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / f"chelsea{SUFFIX}.json").read_text())
    assert report["explained"] == [t["class"] for t in report["top"][:2]] and "cat" in report["top"][0]["name"]
    assert sum(t["probability"] for t in report["top"]) <= 1.0 + 1e-6


def test_output_stems_never_collide():
    paths = [Path("a/cat.jpg"), Path("b/cat.png"), Path("cat-2.jpg"), Path("CAT.gif"), Path("dog")]
    stems = output_stems(paths)
    assert stems == ["cat", "cat-2", "cat-2-2", "CAT-3", "dog"]
    assert len({s.casefold() for s in stems}) == len(stems)
    plan = output_paths(paths[:1], Path("out"), save_maps=True)
    assert plan == [{k: Path("out") / f"cat{SUFFIX}.{k}" for k in ("png", "json", "npz")}]


def test_written_here_knows_its_own_files_only(tmp_path):
    from contrastive_explanations.files import write_arrays, write_json
    mine = {"written_by": f"{WRITER} 0.1.0"}
    write_json(tmp_path / "a.json", mine)
    write_json(tmp_path / "b.json", {"written_by": "someone"})
    write_arrays(tmp_path / "a.npz", mine, x=np.zeros(2))
    write_arrays(tmp_path / "b.npz", {}, x=np.zeros(2))
    own_png(tmp_path / "a.png")
    picture(tmp_path / "b.png")
    (tmp_path / "c.json").write_text("[1, 2]")
    (tmp_path / "c.png").write_text("not a png")
    (tmp_path / "d.png").symlink_to(tmp_path / "a.png")
    assert [p.name for p in sorted(tmp_path.iterdir()) if written_here(p)] == ["a.json", "a.npz", "a.png"]
    assert not written_here(tmp_path / "missing.png") and not written_here(tmp_path)


def test_a_failure_after_the_first_image_keeps_what_was_written_and_says_so(tmp_path, monkeypatch, capsys):
    "An image that passes the header check but fails to decode: one line, the earlier outputs whole, no temp file."
    good, bad = picture(tmp_path / "good.png"), picture(tmp_path / "bad.png", seed=1)
    read = cli.read_image

    def failing(source):
        if Path(source).name == "bad.png":
            raise cli.UsageError(f"{source} is not an image PIL can read (broken data stream)")
        return read(source)

    monkeypatch.setattr(cli, "read_image", failing)
    out = tmp_path / "out"
    assert main([str(good), str(bad), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "bad.png" in err and "the 1 images before it" in err, err
    assert sorted(p.name for p in out.iterdir()) == [f"good{SUFFIX}.json", f"good{SUFFIX}.png"]


def test_a_failed_model_load_leaves_no_output_folder(tmp_path, monkeypatch, capsys):
    "--out-dir is created (and checked) before the model loads, and removed again when the load fails."
    no_weights(tmp_path, monkeypatch)
    made = []
    import contrastive_explanations.data.models as models
    real = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: made.append((tmp_path / "a").exists()) or real(*a, **k))
    photo = picture(tmp_path / "p.png")
    assert main([str(photo), "--out-dir", str(tmp_path / "a" / "b"), "--layer", "no.such.layer"]) == 2
    assert made == [True] and "--layer no.such.layer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_the_benchmark_measures_a_child_s_own_peak(tmp_path):
    "bench_cli's peak memory is the child's own: a child that touches 300 MB more peaks about 300 MB higher."
    from benchmarks import bench_cli
    (tmp_path / "touch.py").write_text("import sys\nimport numpy as np\n"
                                       "print(np.ones(int(sys.argv[1]) * 2**20, np.uint8).sum())\n")
    small, _ = bench_cli.run_measured("touch", ["1"], 1, tmp_path)
    large, seconds = bench_cli.run_measured("touch", ["300"], 1, tmp_path)
    assert 10 < small < 200 and 290 < large - small < 320 and seconds > 0, (small, large)
    (tmp_path / "fail.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match="exited with 3"):
        bench_cli.run_measured("fail", [], 1, tmp_path)
    photo = bench_cli.photograph(tmp_path / "p.jpg", 0.06)
    with Image.open(photo) as im:
        assert im.format == "JPEG" and abs(im.width * im.height - 0.06e6) < 0.01e6 and im.width > im.height
