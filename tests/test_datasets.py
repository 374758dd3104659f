"""Dataset loaders (nbs/24_datasets.ipynb) on tiny fixtures written here, by hand, in the official layouts."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchvision.datasets.imagenet as tv_imagenet
from contrastive_explanations.data.datasets import (PHOTOS, DatasetNotFoundError, ImageDataset, ImageReadError,
                                               SkippedImagesWarning, cub200, food101, imagenet, load_dataset,
                                               packaged_photos, read_rgb, to_rgb, write_fixture)
from contrastive_explanations.data.models import imagenet_categories


# ---------------------------------------------------------------- helpers

def colour_of(label: int) -> tuple[int, int, int]:
    return ((40 * label + 20) % 256, (90 * label + 60) % 256, (150 * label + 10) % 256)


def write_png(path: Path, label: int, size=(12, 8)) -> Path:
    "A lossless image whose colour encodes its label, so a test can tell which file it got."
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour_of(label)).save(path, "PNG")
    return path


def write_jpeg(path: Path, label: int, size=(12, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour_of(label)).save(path, "JPEG", quality=95)
    return path


def label_of(image: Image.Image) -> int:
    "The label whose colour the image has (JPEG tolerance)."
    c = np.asarray(image)[0, 0].astype(int)
    return min(range(20), key=lambda k: np.abs(c - colour_of(k)).sum())


def roundtrip(im: Image.Image, fmt="PNG", **kw) -> np.ndarray:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    buf.seek(0)
    out = read_rgb(buf)
    assert out.mode == "RGB"
    a = np.asarray(out)
    assert a.dtype == np.uint8 and a.shape[2] == 3
    return a


CUB_BIRDS = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# image id -> (class id from 1, is_train): 4 train, 3 test; ids deliberately not grouped by class
CUB_IMAGES = {1: (1, 0), 2: (1, 1), 3: (2, 1), 4: (3, 0), 5: (2, 0), 6: (3, 1), 7: (1, 1)}


def make_cub(root: Path) -> Path:
    "CUB_200_2011 exactly as the official archive lays it out, 7 images."
    base = root / "CUB_200_2011"
    images, split, labels = [], [], []
    for i, (c, train) in CUB_IMAGES.items():
        folder = CUB_BIRDS[c - 1]
        rel = f"{folder}/{folder[4:].title()}_{i:04d}_{7000 + i}.jpg"
        write_jpeg(base / "images" / rel, i)  # colour encodes the image id
        images.append(f"{i} {rel}")
        split.append(f"{i} {train}")
        labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("".join(f"{k} {b}\n" for k, b in enumerate(CUB_BIRDS, 1)))
    (root / "attributes.txt").write_text("1 has_bill_shape::curved_(up_or_down)\n")  # as in the archive
    return root


FOODS = ["apple_pie", "baklava", "beef_tartare"]


def make_food(root: Path) -> Path:
    "food-101/ as the official archive lays it out: 2 train and 1 test image per class."
    base = root / "food-101"
    meta = {"train": {}, "test": {}}
    n = 0
    for c, food in enumerate(FOODS):
        for split in ("train", "train", "test"):
            n += 1
            write_jpeg(base / "images" / food / f"{100 + n}.jpg", n)
            meta[split].setdefault(food, []).append(f"{food}/{100 + n}")
    (base / "meta").mkdir()
    for split, d in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(d))
        (base / "meta" / f"{split}.txt").write_text("".join(r + "\n" for v in d.values() for r in v))
    (base / "meta" / "classes.txt").write_text("".join(f + "\n" for f in FOODS))
    (base / "meta" / "labels.txt").write_text("Apple pie\nBaklava\nBeef tartare\n")
    return root


def make_val_folders(root: Path, folders: list[str], per_class: int = 2) -> Path:
    n = 0
    for k, folder in enumerate(folders):
        for _ in range(per_class):
            n += 1
            write_jpeg(root / "val" / folder / f"ILSVRC2012_val_{n:08d}.JPEG", k)
    return root


META_WNIDS = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus"),
              "n01484850": ("great white shark", "white shark"), "n01491361": ("tiger shark",),
              "n01494475": ("hammerhead", "hammerhead shark")}


def make_devkit(root: Path) -> str:
    "A small ILSVRC2012_devkit_t12.tar.gz with the files torchvision's parser reads; returns its MD5."
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    rows = [(k, w, ", ".join(names), "a gloss", 0, 0, 1300) for k, (w, names) in enumerate(META_WNIDS.items(), 1)]
    rows.append((len(rows) + 1, "n00015388", "animal, animate being", "an inner node", 3, 5, 0))  # not a class
    synsets = np.array(rows, dtype=[(f, "O") for f in fields])
    mem = io.BytesIO()
    scipy.io.savemat(mem, {"synsets": synsets})
    truth = "".join(f"{k}\n" for k in (1, 3, 3, 5)).encode()
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        for name, data in (("data/meta.mat", mem.getvalue()), ("data/ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5((root / "ILSVRC2012_devkit_t12.tar.gz").read_bytes()).hexdigest()


def no_warnings():
    return warnings.catch_warnings(action="error")


# ---------------------------------------------------------------- read_rgb: modes

def test_grey_and_bilevel_are_replicated():
    assert (roundtrip(Image.new("L", (3, 2), 77)) == 77).all()
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert roundtrip(one)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_rgb_is_unchanged():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (roundtrip(Image.fromarray(a)) == a).all()


@pytest.mark.parametrize("alpha, expected", [(0, (255, 255, 255)), (255, (0, 100, 200)), (128, (127, 177, 227))])
def test_rgba_is_composited_on_white(alpha, expected):
    out = roundtrip(Image.new("RGBA", (2, 2), (0, 100, 200, alpha)))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_la_is_composited_on_white():
    la = Image.new("LA", (2, 1), (40, 255))
    la.putpixel((1, 0), (40, 0))
    assert roundtrip(la)[0].tolist() == [[40, 40, 40], [255, 255, 255]]


def palette_image() -> Image.Image:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0] + [0] * 759)
    im.putdata([0, 1, 2])
    return im


def test_palette_is_expanded():
    assert roundtrip(palette_image())[0].tolist() == [[255, 0, 0], [0, 0, 255], [0, 128, 0]]


def test_palette_transparency_index_is_white():
    out = roundtrip(palette_image(), transparency=1)
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 128, 0]]


def test_palette_with_alpha_channel_is_composited():
    im = Image.new("PA", (2, 1))
    im.putpalette([255, 0, 0] * 256)
    im.putpixel((0, 0), (0, 255))
    im.putpixel((1, 0), (0, 0))
    assert to_rgb(im).getpixel((0, 0)) == (255, 0, 0) and to_rgb(im).getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("cmyk, rgb", [((0, 0, 0, 0), (255, 255, 255)), ((0, 255, 255, 0), (255, 0, 0)),
                                       ((255, 0, 255, 0), (0, 255, 0)), ((0, 0, 0, 255), (0, 0, 0))])
def test_cmyk_is_converted(cmyk, rgb):
    assert (roundtrip(Image.new("CMYK", (2, 2), cmyk), "TIFF") == rgb).all()


VALUES16 = np.array([[0, 1, 128, 257, 1000, 32896, 65278, 65535]], np.uint16)
EXPECTED8 = [0, 0, 0, 1, 4, 128, 254, 255]  # round(v / 257): scaled, never clipped at 255


def test_16bit_png_is_scaled_not_clipped():
    im = Image.fromarray(VALUES16)
    assert im.mode == "I;16"
    out = roundtrip(im)
    assert out[0, :, 0].tolist() == EXPECTED8 and (out[..., 0] == out[..., 2]).all()


def test_16bit_big_endian_tiff_is_scaled():
    im = Image.frombytes("I;16B", (8, 1), VALUES16.astype(">u2").tobytes())
    assert roundtrip(im, "TIFF")[0, :, 0].tolist() == EXPECTED8


def test_32bit_integer_image_in_16bit_range_is_scaled():
    im = Image.fromarray(VALUES16.astype(np.int32))
    assert im.mode == "I"
    assert roundtrip(im, "TIFF")[0, :, 0].tolist() == EXPECTED8


def test_images_without_a_defined_range_are_errors():
    with pytest.raises(ImageReadError, match="outside 16 bits"):
        roundtrip(Image.fromarray(np.array([[0, 70000]], np.int32)), "TIFF")
    with pytest.raises(ImageReadError, match="mode F"):
        roundtrip(Image.fromarray(np.array([[0.5, 1.0]], np.float32)), "TIFF")


def sideways() -> tuple[Image.Image, np.ndarray]:
    a = np.zeros((2, 4, 3), np.uint8)
    a[:, :2] = (255, 0, 0)
    a[:, 2:] = (0, 0, 255)
    a[0, 0] = (0, 255, 0)  # marks a corner, so flips are visible too
    return Image.fromarray(a), a


@pytest.mark.parametrize("orientation, turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                               (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                               (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(orientation, turn):
    im, a = sideways()
    exif = Image.Exif()
    exif[0x0112] = orientation
    assert (roundtrip(im, "PNG", exif=exif) == turn(a)).all()


def test_exif_orientation_of_a_jpeg(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "camera.jpg", quality=95, exif=exif)
    out = np.asarray(read_rgb(tmp_path / "camera.jpg")).astype(int)
    assert out.shape == (40, 20, 3)
    assert np.abs(out[5, 10] - (255, 0, 0)).max() < 10 and np.abs(out[35, 10] - (0, 0, 255)).max() < 10


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "empty", "header only"])
def test_unreadable_files_raise_naming_the_file(tmp_path, damage):
    good = write_jpeg(tmp_path / "good.jpg", 1, size=(64, 64)).read_bytes()
    data = {"random bytes": bytes(range(256)) * 4, "truncated": good[: len(good) // 2], "empty": b"",
            "header only": good[:20]}[damage]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data)
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_rgb(bad)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_rgb(tmp_path / "nothing.png")


# ---------------------------------------------------------------- CUB-200-2011

@pytest.mark.parametrize("split, ids", [("train", [2, 3, 6, 7]), ("test", [1, 4, 5])])
def test_cub_splits_labels_and_names(tmp_path, split, ids):
    ds = cub200(make_cub(tmp_path), split)
    assert len(ds) == len(ids) and ds.split == split
    assert ds.targets == [CUB_IMAGES[i][0] - 1 for i in ids]  # 1-based in image_class_labels.txt
    assert [label_of(ds[k][0]) for k in range(len(ds))] == ids  # the right files, in image-id order
    assert ds.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert ds.class_folders == CUB_BIRDS
    image, label = ds[0]
    assert image.mode == "RGB" and label == CUB_IMAGES[ids[0]][0] - 1


def test_cub_root_may_be_the_cub_folder_itself(tmp_path):
    make_cub(tmp_path)
    itself, parent = cub200(tmp_path / "CUB_200_2011", "train"), cub200(tmp_path, "train")
    assert itself.targets == parent.targets
    assert itself.fingerprint() == parent.fingerprint()  # the same data, whichever root names it


def test_cub_transform_is_applied(tmp_path):
    seen = []

    def transform(image):
        seen.append((type(image), image.mode, image.size))
        return torch.full((1,), 7.0)

    ds = cub200(make_cub(tmp_path), "test", transform=transform)
    x, y = ds[1]
    assert torch.equal(x, torch.full((1,), 7.0)) and y == CUB_IMAGES[4][0] - 1
    assert seen == [(Image.Image, "RGB", (12, 8))]


def test_loaders_feed_a_dataloader_with_a_model_style_preprocess(tmp_path):
    import torchvision.transforms.v2 as T

    preprocess = T.Compose([T.ToImage(), T.Resize(16, antialias=True), T.CenterCrop(16),
                            T.ToDtype(torch.float32, scale=True)])
    x, y = next(iter(torch.utils.data.DataLoader(cub200(make_cub(tmp_path), "train", transform=preprocess), batch_size=4)))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("missing", ["images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt",
                                     "images"])
def test_cub_half_present_root_names_what_is_missing(tmp_path, missing):
    make_cub(tmp_path)
    target = tmp_path / "CUB_200_2011" / missing
    if target.is_dir():
        import shutil
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        cub200(tmp_path, "test")
    msg = str(e.value)
    assert f"missing {missing}" in msg and "└── CUB_200_2011/" in msg and "train_test_split.txt" in msg


def test_cub_root_without_cub_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="missing the folder CUB_200_2011/"):
        cub200(tmp_path)


@pytest.mark.parametrize("loader", [cub200, food101, imagenet])
def test_missing_root_is_a_clear_error(tmp_path, loader):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as e:
        loader(tmp_path / "nowhere")
    assert "<root>/" in str(e.value)  # the expected tree
    with pytest.raises(DatasetNotFoundError, match="needs a data root"):
        loader(None)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="is a file"):
        loader(tmp_path / "a_file")


@pytest.mark.parametrize("loader, split", [(cub200, "val"), (cub200, "Train"), (food101, "validation"),
                                           (imagenet, "test")])
def test_wrong_split_names_the_choices(tmp_path, loader, split):
    with pytest.raises(ValueError, match=f"no split '{split}': choose one of"):
        loader(tmp_path, split)


def test_cub_malformed_and_inconsistent_files(tmp_path):
    make_cub(tmp_path)
    base = tmp_path / "CUB_200_2011"
    good = (base / "train_test_split.txt").read_text()
    (base / "train_test_split.txt").write_text(good + "oops\n")
    with pytest.raises(ValueError, match=r"train_test_split.txt, line 8"):
        cub200(tmp_path)
    (base / "train_test_split.txt").write_text(good.replace("7 1\n", ""))
    with pytest.raises(ValueError, match=r"different image ids, e.g. \[7\]"):
        cub200(tmp_path)
    (base / "train_test_split.txt").write_text(good.replace("7 1", "7 2"))
    with pytest.raises(ValueError, match=r"image ids \[7\]"):
        cub200(tmp_path)


def test_cub_missing_image_fails_or_is_skipped_with_a_count(tmp_path):
    make_cub(tmp_path)
    next((tmp_path / "CUB_200_2011" / "images").glob("001.*/*_0001_*.jpg")).unlink()  # image id 1, test split
    with pytest.raises(DatasetNotFoundError, match="1 of 3 listed images are missing"):
        cub200(tmp_path, "test")
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 3 images"):
        ds = cub200(tmp_path, "test", errors="skip")
    assert len(ds) == 2 and [label_of(ds[k][0]) for k in range(2)] == [4, 5]
    with no_warnings():
        assert len(cub200(tmp_path, "train")) == 4  # the other split is whole


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 3], lambda b: b"\x00" * len(b)])
def test_cub_corrupt_image_fails_on_read_or_is_skipped(tmp_path, damage):
    make_cub(tmp_path)
    bad = next((tmp_path / "CUB_200_2011" / "images").glob("002.*/*_0005_*.jpg"))  # image id 5, test split
    write_jpeg(bad, 5, size=(64, 64))
    bad.write_bytes(damage(bad.read_bytes()))
    ds = cub200(tmp_path, "test")  # 'raise': found when read, with the file's name
    assert len(ds) == 3 and label_of(ds[0][0]) == 1
    with pytest.raises(ImageReadError, match=rf"CUB-200-2011 \(test\).*item 2.*{bad.name}"):
        ds[2]
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 3"):
        ds = cub200(tmp_path, "test", errors="skip")
    assert [label_of(ds[k][0]) for k in range(len(ds))] == [1, 4] and ds.skipped[0][0] == bad


def test_errors_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match="errors must be 'raise' or 'skip'"):
        cub200(make_cub(tmp_path), errors="ignore")


# ---------------------------------------------------------------- Food-101

@pytest.mark.parametrize("split, n", [("train", 6), ("test", 3)])
def test_food101_splits_labels_and_names(tmp_path, split, n, monkeypatch):
    import torchvision.datasets.food101 as tv_food

    def no_download(*args, **kwargs):
        raise AssertionError("Food-101 tried to download")

    monkeypatch.setattr(tv_food, "download_and_extract_archive", no_download)
    ds = food101(make_food(tmp_path), split)
    assert len(ds) == n and ds.classes == ["apple pie", "baklava", "beef tartare"] and ds.class_folders == FOODS
    per = n // 3
    assert ds.targets == [c for c in range(3) for _ in range(per)]
    expected_ids = [3 * c + j + 1 for c in range(3) for j in (range(2) if split == "train" else [2])]
    assert [label_of(ds[k][0]) for k in range(n)] == [i % 20 for i in expected_ids]


def test_food101_root_may_be_the_food_folder_itself(tmp_path):
    make_food(tmp_path)
    itself, parent = food101(tmp_path / "food-101"), food101(tmp_path)
    assert itself.targets == parent.targets == [0, 1, 2]
    assert itself.fingerprint() == parent.fingerprint()


def test_food101_half_present_root(tmp_path):
    make_food(tmp_path)
    (tmp_path / "food-101" / "meta" / "test.json").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing meta/test.json in food-101/") as e:
        food101(tmp_path, "test")
    assert "└── food-101/" in str(e.value)
    assert len(food101(tmp_path, "train")) == 6
    with pytest.raises(DatasetNotFoundError, match="missing the folder food-101/"):
        food101(tmp_path / "food-101" / "images")


def test_food101_broken_json_is_named(tmp_path):
    make_food(tmp_path)
    (tmp_path / "food-101" / "meta" / "test.json").write_text('{"apple_pie": [')
    with pytest.raises(ValueError, match="test.json is not valid JSON"):
        food101(tmp_path)


# ---------------------------------------------------------------- ImageNet

def test_imagenet_class_folders_by_index(tmp_path):
    make_val_folders(tmp_path, ["0", "2", "10", "007", "999"], per_class=1)
    with no_warnings():
        ds = imagenet(tmp_path)
    assert ds.layout == "folders" and ds.classes == imagenet_categories()
    # labels are the folder names as integers, not positions among sorted names ("0", "007", "10", "2", "999")
    folders = [p.parent.name for p, _ in ds.samples]
    assert ds.targets == [int(f) for f in folders] and sorted(ds.targets) == [0, 2, 7, 10, 999]


def test_imagenet_class_folders_by_wnid_subset_warns(tmp_path):
    make_val_folders(tmp_path, ["n01494475", "n01440764", "n01443537"])
    with pytest.warns(UserWarning, match="3 WordNet-id folders, not 1,000"):
        ds = imagenet(tmp_path)
    assert ds.classes == ["n01440764", "n01443537", "n01494475"] and ds.targets == [0, 0, 1, 1, 2, 2]
    assert [label_of(ds[k][0]) for k in range(6)] == [1, 1, 2, 2, 0, 0]  # folder k of the list got colour k


def test_imagenet_all_1000_wnid_folders_use_the_standard_names(tmp_path):
    wnids = [f"n{10000000 + 37 * k:08d}" for k in range(1000)]
    for w in wnids:
        (tmp_path / "val" / w).mkdir(parents=True)
    write_jpeg(tmp_path / "val" / sorted(wnids)[417] / "ILSVRC2012_val_00000001.JPEG", 0)
    with no_warnings():
        ds = imagenet(tmp_path, "val")
    assert ds.classes == imagenet_categories() and ds.targets == [417] and ds.wnids == sorted(wnids)


def test_imagenet_torchvision_layout_keeps_standard_indices_on_a_subset(tmp_path):
    make_val_folders(tmp_path, ["n01443537", "n01491361"])  # the 2nd and 4th of the 5 classes in meta.bin
    torch.save((META_WNIDS, ["n01443537"] * 2 + ["n01491361"] * 2), tmp_path / "meta.bin")  # what torchvision writes
    with no_warnings():
        ds = imagenet(tmp_path)
    assert ds.layout == "torchvision" and ds.targets == [1, 1, 3, 3]
    assert ds.classes == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    assert ds.wnids == sorted(META_WNIDS) and [label_of(ds[k][0]) for k in range(4)] == [0, 0, 1, 1]


def test_imagenet_devkit_is_parsed_into_meta_bin_atomically(tmp_path, monkeypatch):
    md5 = make_devkit(tmp_path)
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit", ("ILSVRC2012_devkit_t12.tar.gz", md5))
    make_val_folders(tmp_path, ["n01440764", "n01484850", "n01494475"], per_class=1)
    root, index = tmp_path / "imagenet", tmp_path / "index"
    root.mkdir()
    for entry in list(tmp_path.iterdir()):
        if entry != root:
            entry.rename(root / entry.name)
    ds = imagenet(root, layout="torchvision", index_dir=index)
    assert ds.targets == [0, 2, 4] and ds.classes[2] == "great white shark" and len(ds.classes) == 5
    assert sorted(p.name for p in root.iterdir()) == ["ILSVRC2012_devkit_t12.tar.gz", "val"]  # nothing under the root
    (meta,) = index.iterdir()
    assert meta.name.startswith("meta-") and meta.suffix == ".bin"
    wnid_to_classes, val_wnids = torch.load(meta, weights_only=True)
    assert wnid_to_classes == META_WNIDS and val_wnids == ["n01440764", "n01484850", "n01484850", "n01494475"]
    assert imagenet(root, index_dir=index).targets == ds.targets  # read again, not parsed again
    assert list(index.iterdir()) == [meta]


def test_imagenet_devkit_with_wrong_checksum_writes_nothing(tmp_path):
    make_devkit(tmp_path)
    make_val_folders(tmp_path, ["n01440764"], per_class=1)
    with pytest.raises(DatasetNotFoundError, match="is not the official devkit"):
        imagenet(tmp_path, index_dir=tmp_path / "index")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ILSVRC2012_devkit_t12.tar.gz", "val"]


def test_imagenet_torchvision_layout_without_devkit(tmp_path):
    make_val_folders(tmp_path, ["n01440764"], per_class=1)
    with pytest.raises(DatasetNotFoundError, match="missing ILSVRC2012_devkit_t12.tar.gz") as e:
        imagenet(tmp_path, layout="torchvision")
    assert "├── ILSVRC2012_devkit_t12.tar.gz" in str(e.value)


def test_imagenet_unreadable_meta_bin(tmp_path):
    make_val_folders(tmp_path, ["n01440764"], per_class=1)
    (tmp_path / "meta.bin").write_bytes(b"half a pickle")
    with pytest.raises(DatasetNotFoundError, match="meta.bin cannot be read"):
        imagenet(tmp_path)


def test_imagenet_folders_not_in_the_devkit(tmp_path):
    make_val_folders(tmp_path, ["n01440764", "n09999999"], per_class=1)
    torch.save((META_WNIDS, []), tmp_path / "meta.bin")
    with pytest.raises(DatasetNotFoundError, match="not classes of the devkit: n09999999"):
        imagenet(tmp_path)


@pytest.mark.parametrize("folders, message", [(["n01440764", "7"], "must all be WordNet ids"), (["cat", "dog"], "found cat, dog"),
                                              (["1", "001"], "distinct integers 0..999, found 001"),
                                              (["5", "1000"], "found 1000")])
def test_imagenet_bad_class_folder_names(tmp_path, folders, message):
    make_val_folders(tmp_path, folders, per_class=1)
    with pytest.raises(DatasetNotFoundError, match=message):
        imagenet(tmp_path)


def test_imagenet_missing_or_flat_val(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="missing the folder val/"):
        imagenet(tmp_path)
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="never extracts archives"):
        imagenet(tmp_path)
    write_jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 0)
    with pytest.raises(DatasetNotFoundError, match="holds 1 images but no class folders"):
        imagenet(tmp_path)
    (tmp_path / "val" / "n01440764").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images in the class folders"):
        imagenet(tmp_path)


def test_imagenet_root_pointing_at_val_itself(tmp_path):
    make_val_folders(tmp_path, ["n01440764"], per_class=1)
    with pytest.raises(DatasetNotFoundError, match="pass its parent folder as root"):
        imagenet(tmp_path / "val")


def test_imagenet_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match="layout must be"):
        imagenet(tmp_path, layout="kaggle")


# ---------------------------------------------------------------- load_dataset, fingerprints, fixtures

def test_load_dataset_names_and_default_splits(tmp_path):
    make_cub(tmp_path / "cub")
    make_food(tmp_path / "food")
    make_val_folders(tmp_path / "in", ["3", "4"], per_class=1)
    assert load_dataset("CUB-200-2011", tmp_path / "cub").split == "test"
    assert load_dataset("cub", tmp_path / "cub", "train").split == "train"
    assert load_dataset("Food_101", tmp_path / "food").split == "test"
    ds = load_dataset("imagenet", tmp_path / "in", errors="skip")
    assert ds.split == "val" and ds.errors == "skip" and ds.targets == [3, 4]
    assert len(load_dataset("packaged", names=["coffee"])) == 1


def test_load_dataset_bad_names_and_options(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cub2011' \(did you mean 'cub200'\?\): choose from"):
        load_dataset("cub2011", tmp_path)
    with pytest.raises(ValueError, match="pass no root"):
        load_dataset("packaged", tmp_path)
    with pytest.raises(ValueError, match="pass no root, split or layout"):
        load_dataset("packaged", layout="folders")


def test_fingerprint_depends_on_the_index_only(tmp_path):
    make_cub(tmp_path)
    a, b = cub200(tmp_path, "test"), cub200(tmp_path, "test")
    assert a.fingerprint() == b.fingerprint() != cub200(tmp_path, "train").fingerprint()
    (tmp_path / "CUB_200_2011" / "image_class_labels.txt").write_text(
        (tmp_path / "CUB_200_2011" / "image_class_labels.txt").read_text().replace("4 3", "4 2"))
    assert cub200(tmp_path, "test").fingerprint() != a.fingerprint()


def test_image_dataset_checks_labels(tmp_path):
    with pytest.raises(ValueError, match=r"labels \[3\] are outside 0..2"):
        ImageDataset("toy", [(write_png(tmp_path / "a.png", 0), 3)], ["a", "b", "c"])


@pytest.mark.parametrize("name, loader, n", [("cub200", cub200, 4), ("food101", food101, 4), ("imagenet", imagenet, 8)])
def test_write_fixture_builds_loadable_copies(tmp_path, name, loader, n):
    root = write_fixture(name, tmp_path / name, n_classes=4, per_class=2)
    ds = loader(root)
    assert len(ds) == n and ds[len(ds) - 1][0].mode == "RGB" and sorted(set(ds.targets)) == list(range(4))


def test_write_fixture_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        write_fixture("imagenet", tmp_path / "x", layout="kaggle")
    assert list(tmp_path.iterdir()) == []
    write_fixture("food101", tmp_path / "y")
    with pytest.raises(FileExistsError):
        write_fixture("food101", tmp_path / "y")
    assert [p.name for p in tmp_path.iterdir()] == ["y"]


# ---------------------------------------------------------------- packaged photographs

def shipped_text(s: str) -> str:
    "Docstring text without reST link markup, whitespace collapsed."
    s = re.sub(r"`([^`<]*?)\s*<[^>]*>`_*", r"\1", s).replace("`", "")
    return " ".join(s.split())


def test_packaged_photos_are_rgb_uint8_with_attribution():
    photos = packaged_photos()
    assert len(photos) == len(PHOTOS) >= 14 and photos.classes == [p.name for p in PHOTOS]
    for image, i in photos:
        a = np.asarray(image)
        assert image.mode == "RGB" and a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) > 100
        p = photos.photos[i]
        assert p.notice.strip() and p.licence.strip() and p.title.strip()
        assert p.title in photos.caption(i) and p.notice in photos.caption(i) and p.package in photos.caption(i)
    assert {p.package for p in PHOTOS} == {"scikit-image", "scikit-learn", "matplotlib"}


def test_packaged_photos_match_the_packages_own_loaders():
    import matplotlib.pyplot as plt
    import skimage.data
    from matplotlib.cbook import get_sample_data
    from sklearn.datasets import load_sample_image

    ps = {p.name: p for p in PHOTOS}
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        assert (np.asarray(ps[name].load()) == getattr(skimage.data, name)()).all(), name
    assert (np.asarray(ps["camera"].load()) == skimage.data.camera()[..., None]).all()  # grey -> RGB
    for name in ("china", "flower"):
        assert (np.asarray(ps[name].load()) == load_sample_image(f"{name}.jpg")).all(), name
    assert (np.asarray(ps["grace_hopper"].load()) == plt.imread(get_sample_data("grace_hopper.jpg"))).all()


def test_licence_notices_are_quoted_from_what_the_packages_ship():
    import skimage.data

    ps = {p.name: p for p in PHOTOS}
    loaders = {"clock": "clock", "motorcycle_left": "stereo_motorcycle", "motorcycle_right": "stereo_motorcycle"}
    for p in PHOTOS:
        if p.package != "scikit-image":
            continue
        doc = shipped_text(getattr(skimage.data, loaders.get(p.name, p.name)).__doc__)
        if p.notice == "Licence: see scikit-image documentation.":
            assert not re.search(r"licen|copyright|CC0|public domain", doc, re.I), p.name  # nothing shipped
        else:
            assert " ".join(p.notice.split()) in doc, p.name
    readme = (ps["china"].path.parent / "README.txt").read_text()
    for name in ("china", "flower"):
        block = " ".join(readme.split(f"Image: {name}.jpg")[1].split("Image:")[0].split())
        assert " ".join(ps[name].notice.split()) == block, name
        assert ps[name].licence.startswith("CC BY 2.0")
    assert "licen" not in (ps["grace_hopper"].path.parent / "README.txt").read_text().lower()
    assert ps["grace_hopper"].notice == "Licence: see matplotlib documentation."


def test_packaged_photos_transform_and_unknown_names():
    ds = packaged_photos(["camera", "china"], transform=lambda im: np.asarray(im).shape)
    assert ds[0] == ((512, 512, 3), 0) and ds[1] == ((427, 640, 3), 1) and ds.classes == ["camera", "china"]
    with pytest.raises(ValueError, match=r"no packaged photo 'chelsae' \(did you mean 'chelsea'\?\)"):
        packaged_photos(["chelsae"])


def test_a_read_only_data_root_is_read_and_never_written(tmp_path):
    from conftest import tree_state
    data = tmp_path / "data"
    for name, folder, classes in (("imagenet", "imagenet", 1), ("cub200", "cub", 3), ("food101", "food", 3)):
        write_fixture(name, data / folder, n_classes=classes, per_class=2)  # ImageNet: tench, a class of the test devkit
    md5 = make_devkit(tmp_path / "devkit_root")
    (tmp_path / "devkit_root" / "ILSVRC2012_devkit_t12.tar.gz").rename(data / "imagenet" / "ILSVRC2012_devkit_t12.tar.gz")
    (data / "imagenet" / "meta.bin").unlink()  # so that the devkit must be parsed
    subprocess.run(["chmod", "-R", "a-w", str(data)], check=True)
    try:
        before = tree_state(data)
        with pytest.MonkeyPatch.context() as m:
            m.setitem(tv_imagenet.ARCHIVE_META, "devkit", ("ILSVRC2012_devkit_t12.tar.gz", md5))
            sets = [imagenet(data / "imagenet", index_dir=tmp_path / "out"), cub200(data / "cub", "train"),
                    cub200(data / "cub", "test"), food101(data / "food", "train"), food101(data / "food")]
        for ds in sets:
            assert len(ds) > 0 and all(ds[i][0].size for i in range(len(ds)))  # every image decodes
            ds.fingerprint()
        assert tree_state(data) == before  # nothing created, changed or touched under the data root
        assert [p.suffix for p in (tmp_path / "out").iterdir()] == [".bin"]  # the parsed index went to the output folder
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(data)], check=True)
