"""The model registry (nbs/22_models.ipynb): preprocessing from the weights, offline loading, checkpoints, errors.
Nothing here downloads: torchvision's cache is pointed at a temporary folder."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from contrastive_explanations.methods.explain import default_layer, find_layer
from contrastive_explanations.data.models import (MODELS, TORCHVISION_IMAGENET, build_model, load_checkpoint,
                                             torchvision_classifier, weights_file)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    "An empty torch hub folder for the test's duration (through TORCH_HOME: torch.hub.set_dir would outlive the test)."
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path / "hub"


@pytest.mark.parametrize("name", list(TORCHVISION_IMAGENET))
def test_preprocess_and_normalisation_are_the_weights_own(name):
    "Our preprocess followed by the model's normalize equals torchvision's weights.transforms() on the same image."
    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision_classifier(name, num_classes=3)  # architecture only: no weights needed for the transforms
    image = torch.randint(0, 256, (3, 300, 410), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    as_float = image.float() / 255  # the same resize arithmetic on both sides: equal to float precision
    torch.testing.assert_close(model.normalize(model.preprocess(as_float)), weights.transforms()(as_float),
                               atol=1e-5, rtol=0)
    ours, theirs = model.normalize(model.preprocess(image)), weights.transforms()(image)
    level = 1 / 255 / min(weights.transforms().std)  # torchvision's uint8 resize kernels round differently
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= level + 1e-6


def test_the_two_networks_the_review_preprocessed_wrongly():
    b1 = torchvision_classifier("efficientnet_b1", num_classes=3)
    assert b1.preprocess(torch.zeros(3, 500, 600, dtype=torch.uint8)).shape == (3, 240, 240)
    resize = [t for t in torchvision_classifier("mobilenet_v3_large", num_classes=3).preprocess.transforms
              if isinstance(t, torchvision.transforms.v2.Resize)]
    assert resize[0].size == [232]


@pytest.mark.parametrize("name", list(TORCHVISION_IMAGENET))
def test_default_layers_exist_and_are_spatial(name):
    model = torchvision_classifier(name, num_classes=5)
    layer = find_layer(model, default_layer(model))
    out = {}
    handle = layer.register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 5)
    handle.remove()
    assert out["a"].ndim == 4 and out["a"].shape[-1] >= 7


def test_missing_weights_name_the_file_and_the_fix(hub):
    with pytest.raises(FileNotFoundError) as error:
        build_model("resnet18")
    message = str(error.value)
    assert str(hub / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "download.pytorch.org" in message and "download=True" in message
    assert not (hub / "checkpoints").exists() or not any((hub / "checkpoints").iterdir())


def test_weights_in_the_cache_load_offline(hub):
    "The real loading path, offline: a file at torchvision's cache location is what the model gets."
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    path = weights_file(torchvision.models.ResNet18_Weights.DEFAULT)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18")
    assert len(model.categories) == 1000 and model.categories[281] == "tabby"
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), reference.state_dict().values()))
    assert model.default_layer == "net.layer4" and not model.training


def test_checkpoints_round_trip_and_mismatches_name_the_layer(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 5, 5))
    good = tmp_path / "good.pt"
    torch.save({"state_dict": net.state_dict(), "categories": ["a", "b"]}, good)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 2))
    assert load_checkpoint(fresh, good) == ["a", "b"]
    assert torch.equal(fresh[0].weight, net[0].weight)
    plain = tmp_path / "plain.pt"
    torch.save(net.state_dict(), plain)
    assert load_checkpoint(fresh, plain) is None
    wrong = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 3))
    with pytest.raises(ValueError, match=r"layer '2.weight' has shape \(2, 36\) in the file and \(3, 36\) in the model"):
        load_checkpoint(wrong, good)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(nn.Sequential(nn.Conv2d(3, 4, 3)), good)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(fresh, tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_checkpoint(fresh, tmp_path / "list.pt")


def test_finetuned_vgg_from_a_checkpoint_with_the_wrong_head(tmp_path):
    "A 10-class checkpoint for the 200-class CUB model: refused, naming the classifier layer."
    small = torchvision.models.vgg16_bn(num_classes=10)
    path = tmp_path / "vgg10.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(ValueError, match=r"layer 'classifier.6.weight' has shape \(10, 4096\)"):
        build_model("vgg16_bn_cub", checkpoint=path)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50': choose one of efficientnet_lite0, resnet18"):
        build_model("resnet50")
    assert {"efficientnet_lite0", "vgg16_bn_cub", "vit_b_16_food101", *TORCHVISION_IMAGENET} == set(MODELS)


def test_cub_vgg_uses_the_original_square_resize():
    from PIL import Image
    x = build_model("vgg16_bn_cub").preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32  # squashed, not cropped: the whole image is kept
    assert x[0].min() == 1.0 and x[1:].max() == 0.0


def test_a_checkpoint_brings_its_number_of_classes(tmp_path):
    "A network fine-tuned on another class list (a subset of CUB, a fixture) is built with its own head."
    from contrastive_explanations.data.models import checkpoint_classes, finetuned_classifier
    small = finetuned_classifier("vit_b_16", 3, None)
    path = tmp_path / "three.pt"
    torch.save({"state_dict": small.net.state_dict(), "categories": ["a", "b", "c"]}, path)
    assert checkpoint_classes(path) == 3 and checkpoint_classes(tmp_path / "none.pt") is None
    model = build_model("vit_b_16_food101", checkpoint=path)
    assert model.categories == ["a", "b", "c"] and model.net.heads.head.out_features == 3
    torch.save(small.net.state_dict(), tmp_path / "bare.pt")  # no categories stored: the registry's 101 classes
    assert checkpoint_classes(tmp_path / "bare.pt") is None
    with pytest.raises(ValueError, match="does not fit"):
        build_model("vit_b_16_food101", checkpoint=tmp_path / "bare.pt")


def test_the_finetuned_models_are_built_from_their_table():
    "Each row of FINETUNED_NETWORKS is a registered model with the row's architecture, classes, layer and resize."
    from PIL import Image
    from contrastive_explanations.data.models import FINETUNED_NETWORKS, FinetunedNetwork
    assert [n for n in MODELS if n in FINETUNED_NETWORKS] == list(FINETUNED_NETWORKS) and len(FINETUNED_NETWORKS) == 2
    assert len({n.source for n in FINETUNED_NETWORKS.values()}) == len(FINETUNED_NETWORKS)
    for name, row in FINETUNED_NETWORKS.items():
        assert isinstance(row, FinetunedNetwork) and row.name == name
        model = build_model(name)
        reference = torchvision.models.get_model(row.architecture, num_classes=row.num_classes)
        assert [(k, v.shape) for k, v in model.net.state_dict().items()] == \
            [(k, v.shape) for k, v in reference.state_dict().items()]
        assert len(model.categories) == row.num_classes
        assert model.default_layer == (None if row.default_layer is None else f"net.{row.default_layer}")
        x = model.preprocess(Image.new("RGB", (300, 200)))
        assert x.shape[-2:] == (224, 224)
        if row.square_resize:  # squashed, not cropped: a left-half red image stays red on its left half
            image = Image.new("RGB", (300, 200))
            image.paste((255, 0, 0), (0, 0, 150, 200))
            x = model.preprocess(image)
            assert x.shape[-1] == row.square_resize and x[0, :, : row.square_resize // 2 - 2].min() == 1.0
