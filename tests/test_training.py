"""Training and caching of the small models (nbs/09_training.ipynb), on tiny data so that it runs in seconds."""
from __future__ import annotations

import torch
from torchvision.models.vision_transformer import VisionTransformer

from contrastive_explanations.training import (TrainConfig, cache_dir, cached_training, fingerprint, predict,
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
