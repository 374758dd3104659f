"""Training and caching of the small models (nbs/25_training.ipynb), on tiny data so that it runs in seconds."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from contrastive_explanations.data.training import (TrainConfig, cache_dir, cached_training, fingerprint, predict,
                                               small_cnn, small_vit, train)


def toy_data(n: int, seed: int = 0):
    "Two classes that differ in the mean brightness of the left half: learnable in a few steps."
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    images = torch.randint(0, 100, (n, 3, 64, 64), dtype=torch.uint8, generator=g)
    images[labels == 1, :, :, :32] += 120
    return images, labels


def test_architectures():
    cnn, vit = small_cnn(12), small_vit(12)
    assert sum(p.numel() for p in cnn.parameters()) == 165220
    assert isinstance(vit, VisionTransformer) and vit.patch_size == 8 and len(vit.encoder.layers) == 4
    x = torch.rand(2, 3, 64, 64)
    assert cnn(x).shape == vit(x).shape == (2, 12)
    assert cnn[3](cnn[:3](x)).shape == (2, 128, 8, 8)  # the GradCAM layer: 128 x 8 x 8


def test_training_learns_keeps_the_best_epoch_and_is_deterministic():
    data, val = toy_data(256), toy_data(64, seed=1)
    config = TrainConfig(epochs=3, batch_size=32, seed=0, flip=False)
    torch.manual_seed(0)
    a = small_cnn(2)
    history = train(a, data, val, config, log=None)
    assert history["best_val_accuracy"] == max(history["val_accuracy"]) > 0.9
    accuracy = (predict(a, val[0]).argmax(1) == val[1]).float().mean().item()
    assert accuracy == history["best_val_accuracy"]  # the kept weights are the best epoch's
    torch.manual_seed(0)
    b = small_cnn(2)
    assert train(b, data, val, config, log=None)["train_loss"] == history["train_loss"]


def test_cache_trains_once_and_a_changed_key_trains_again(tmp_path):
    data, val = toy_data(64), toy_data(32, seed=1)
    calls = []

    def fit(net):
        calls.append(1)
        return train(net, data, val, TrainConfig(epochs=1, batch_size=32), log=None)

    key = fingerprint(small_cnn, {"epochs": 1})
    first, h1 = cached_training("cnn", lambda: small_cnn(2), fit, key, cache=tmp_path)
    second, h2 = cached_training("cnn", lambda: small_cnn(2), fit, key, cache=tmp_path)
    assert len(calls) == 1 and h1 == h2
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
    assert [f.name for f in tmp_path.iterdir()] == [f"cnn-{key}.pt"]  # no temporary file left behind
    other = fingerprint(small_cnn, {"epochs": 2})
    assert other != key
    cached_training("cnn", lambda: small_cnn(2), fit, other, cache=tmp_path)
    assert len(calls) == 2


def test_fingerprint_sees_code_and_values():
    assert fingerprint(small_cnn, {"a": 1}) == fingerprint(small_cnn, {"a": 1})
    assert fingerprint(small_cnn, {"a": 1}) != fingerprint(small_vit, {"a": 1})
    assert fingerprint(small_cnn, {"a": 1}) != fingerprint(small_cnn, {"a": 2})


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CONTRASTIVE_EXPLANATIONS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("CONTRASTIVE_EXPLANATIONS_CACHE")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    (tmp_path / "nbs").mkdir()
    monkeypatch.chdir(tmp_path / "nbs")
    assert cache_dir() == tmp_path / ".cache" / "models"


# ---- fine-tuning at the paper's scale (run here on fixtures, a stand-in network and the CPU)
from contrastive_explanations.data.training import (CUB_FINETUNE, FinetuneConfig, cub_eval_transform, cub_train_transform,
                                               finetune, food101_train_transform, stratified_split, with_new_head)
from hypothesis import given, settings, strategies as st


@given(st.lists(st.integers(0, 5), min_size=1, max_size=80), st.floats(0, 0.9), st.integers(0, 3))
@settings(max_examples=50, deadline=None)
def test_stratified_split_partitions_each_class(labels, fraction, seed):
    tr, va = stratified_split(labels, fraction, seed)
    assert sorted(tr + va) == list(range(len(labels))) and not set(tr) & set(va)
    for c in set(labels):
        n = labels.count(c)
        held = sum(labels[i] == c for i in va)
        assert held < n or n == 0  # every class keeps a training image
        if fraction > 0 and n > 1:
            assert held >= 1
    assert stratified_split(labels, fraction, seed) == (tr, va)


def test_stratified_split_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        stratified_split([0, 1], 1.0)


def test_original_cub_hyperparameters_and_transforms():
    assert (CUB_FINETUNE.lr, CUB_FINETUNE.momentum, CUB_FINETUNE.weight_decay, CUB_FINETUNE.batch_size,
            CUB_FINETUNE.epochs, CUB_FINETUNE.optimizer) == (1e-3, 0.9, 5e-4, 128, 200, "sgd")
    from PIL import Image
    im = Image.new("RGB", (300, 260), (200, 30, 30))
    for tf in (cub_train_transform(), cub_eval_transform(), food101_train_transform()):
        x = tf(im)
        assert x.shape == (3, 224, 224) and 0 <= x.min() and x.max() <= 1


def test_with_new_head_replaces_the_last_linear():
    import torchvision
    net = with_new_head(torchvision.models.vgg11(weights=None, num_classes=1000), 7)
    assert net.classifier[6].out_features == 7 and net.classifier[0].out_features == 4096
    vit = with_new_head(torchvision.models.VisionTransformer(32, 16, 1, 2, 16, 32, num_classes=1000), 5)
    assert vit.heads.head.out_features == 5


class _Stop(Exception):
    pass


def _fixture_run(tmp_path, config, log=None):
    from contrastive_explanations.data.datasets import cub200, write_fixture
    root = tmp_path / "data"
    if not root.exists():
        write_fixture("cub200", root, n_classes=3, per_class=6, size=(40, 40))
    full = cub200(root, "train", cub_eval_transform(24))
    tr, va = stratified_split(full.targets, 0.25)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    h = finetune(net, torch.utils.data.Subset(full, tr), torch.utils.data.Subset(full, va), config,
                 tmp_path / "ckpt" / "net.pt", device="cpu", log=log)
    return net, h


def test_finetune_resumes_to_the_same_weights_and_keeps_the_best(tmp_path):
    config = FinetuneConfig(epochs=3, batch_size=4, lr=0.05, weight_decay=1e-4, num_workers=0)
    straight, h = _fixture_run(tmp_path / "a", config)
    def stop_after_first(line):
        if line.startswith("epoch 1/"):
            raise _Stop
    with pytest.raises(_Stop):
        _fixture_run(tmp_path / "b", config, log=stop_after_first)
    resumed, h2 = _fixture_run(tmp_path / "b", config, log=None)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert h["val_accuracy"] == h2["val_accuracy"] and h2["epoch"] == [1, 2, 3]
    saved = torch.load(tmp_path / "a" / "ckpt" / "net.pt", weights_only=True)
    assert json.loads(saved["history"])["val_accuracy"][-1] == max(h["val_accuracy"][:len(json.loads(saved["history"])["epoch"])])
    assert h["best_val_accuracy"] == max(h["val_accuracy"])
    assert not list((tmp_path / "a" / "ckpt").glob("*.tmp"))


def test_finetune_refuses_to_resume_with_another_config(tmp_path):
    config = FinetuneConfig(epochs=1, batch_size=4, lr=0.05, weight_decay=0.0, num_workers=0)
    _fixture_run(tmp_path, config)
    with pytest.raises(ValueError, match="another configuration"):
        _fixture_run(tmp_path, FinetuneConfig(epochs=2, batch_size=4, lr=0.05, weight_decay=0.0, num_workers=0))
    with pytest.raises(ValueError, match="optimizer"):
        _fixture_run(tmp_path / "c", FinetuneConfig(epochs=1, batch_size=4, lr=0.05, weight_decay=0.0, optimizer="lion"))


def test_finetune_never_overwrites_a_checkpoint_it_did_not_write(tmp_path):
    config = FinetuneConfig(epochs=1, batch_size=4, lr=0.05, weight_decay=0.0, num_workers=0)
    brought = tmp_path / "ckpt" / "net.pt"
    brought.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "categories": ["a user's"]}, brought)
    kept = brought.read_bytes()
    with pytest.raises(FileExistsError, match=r"net.pt exists.*overwrite=True \(the profile's training.retrain: true\)"):
        _fixture_run(tmp_path, config)
    assert brought.read_bytes() == kept and sorted(p.name for p in brought.parent.iterdir()) == ["net.pt"]
    _, h = _fixture_run_overwriting(tmp_path, config)
    assert h["epoch"] == [1] and brought.read_bytes() != kept and (brought.parent / "net.last.pt").exists()


def _fixture_run_overwriting(tmp_path, config):
    from contrastive_explanations.data.datasets import cub200
    full = cub200(tmp_path / "data", "train", cub_eval_transform(24))
    tr, va = stratified_split(full.targets, 0.25)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return net, finetune(net, torch.utils.data.Subset(full, tr), torch.utils.data.Subset(full, va), config,
                         tmp_path / "ckpt" / "net.pt", device="cpu", log=None, overwrite=True)


def test_profiles_set_the_training_chapter():
    "The chapter's epochs are the cache's defaults in the embedded profile; `finetune` names fine-tuned networks."
    from contrastive_explanations.data.models import MODELS, TORCHVISION_IMAGENET
    from contrastive_explanations.data.training import EMBEDDED_EPOCHS
    from contrastive_explanations.run import load_profile
    embedded = load_profile("embedded").section("training")
    assert {"small_cnn": embedded["cnn_epochs"], "small_vit": embedded["vit_epochs"]} == EMBEDDED_EPOCHS
    assert embedded["finetune"] == []
    paper = load_profile("paper", {"data_root": "/data"}).section("training")
    assert paper["finetune"] == ["vgg16_bn_cub", "vit_b_16_food101"] and all(n in MODELS and n not in TORCHVISION_IMAGENET for n in paper["finetune"])


def test_a_small_model_s_initialisation_depends_on_its_seed_alone():
    "The chapter that first trains a model may have drawn random numbers before: its initial weights must not depend on that."
    from contrastive_explanations.data.training import initialised
    for name in ("small_cnn", "small_vit"):
        torch.manual_seed(123)
        a = initialised(name, 12, seed=0)
        torch.randn(1000)
        state = torch.random.get_rng_state()
        b = initialised(name, 12, seed=0)
        assert torch.equal(state, torch.random.get_rng_state()), "the caller's random state changed"
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict()), name


def test_cub_validation_transform_is_the_fine_tuned_vgg_s_test_transform():
    "Fine-tuning picks its best epoch on the pixels that the explained VGG16-bn (vgg16_bn_cub) is later tested on."
    from types import SimpleNamespace
    import numpy as np
    from PIL import Image
    from contrastive_explanations.data.models import _squared  # what the fine-tuned VGG is built with
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    tested = _squared(SimpleNamespace(), 24).preprocess(photo)
    assert torch.equal(cub_eval_transform(24)(photo), tested)
