"""The zoo of tests/test_zoo.py: one small random model of every image-classifier family a researcher may bring.

Each entry builds, without any download, a model of the class the library's builder returns (torchvision's builder
itself where it is cheap, else the same class with a smaller configuration), with `CLASSES` outputs, and says how the
oracle reads its layers: `layout` 'BCHW' (conv maps), 'BHWC' (channels last, as Swin's) or 'BLC' (tokens, of which
the first `prefix` are class/distillation tokens and the rest a square grid). `layer` is the layer this table
suggests when the package has no default for the family (pytorch-grad-cam's documented choices where it has one);
`blocks` the dotted name of a ViT's encoder blocks (ViTGradCAM, AttentionRollout); `attention` how the oracle
recomputes a block's attention ('torchvision', 'timm', 'hf')."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

CLASSES = 5  # outputs of every model: one backward per class for the explicit contrast


@dataclass(frozen=True)
class Zoo:
    "One architecture of the sweep."
    name: str  # source:family, e.g. 'torchvision:resnet18'
    build: Callable[[], nn.Module]  # a fresh model with random weights, in float32
    size: int = 32  # the input's height and width
    layout: str = "BCHW"  # how the oracle reads `layer` (and the default layer): 'BCHW', 'BHWC' or 'BLC'
    layer: str | None = None  # the layer suggested for the family, tried when the default is refused
    prefix: int = 0  # 'BLC': tokens before the patch grid
    blocks: str | None = None  # a ViT's encoder blocks: ViTGradCAM and AttentionRollout apply
    attention: str | None = None  # how the oracle recomputes a block's attention: 'torchvision', 'timm', 'hf'
    fullgrad: bool = True  # a network of Conv2d / BatchNorm2d whose FullGrad is defined

    @property
    def source(self) -> str:
        return self.name.split(":")[0]


def light(make: Callable[[], nn.Module], replace: Callable[[nn.Module], None] | None = None) -> nn.Module:
    "Build `make()` on the meta device (no time spent initialising huge layers), let `replace` shrink it, then initialise."
    with torch.device("meta"):
        model = make()
    if replace is not None:
        replace(model)
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def small_head(model: nn.Module) -> None:
    "Swap VGG's or AlexNet's (-> 4096 -> 4096) classifier for one of VGG's structure with 32 hidden units."
    features = next(m for m in model.classifier if isinstance(m, nn.Linear)).in_features
    model.classifier = nn.Sequential(nn.Linear(features, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(32, CLASSES))


def tv_vgg(batch_norm: bool) -> nn.Module:
    from torchvision.models.vgg import VGG, make_layers
    return light(lambda: VGG(make_layers([8, "M", 512, "M"], batch_norm), num_classes=CLASSES), small_head)


def tv_resnet(block: str, **kw) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    return ResNet({"basic": BasicBlock, "bottleneck": Bottleneck}[block], [1, 1, 1, 1], num_classes=CLASSES, **kw)


def tv_efficientnet_v2() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig
    setting = [FusedMBConvConfig(1, 3, 1, 8, 8, 1), FusedMBConvConfig(4, 3, 2, 8, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 1)]
    return EfficientNet(setting, dropout=0.2, last_channel=32, num_classes=CLASSES,
                        norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3))


def tv_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig
    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(6, 3, 2, 8, 16, 1), MBConvConfig(6, 5, 2, 16, 24, 1)]
    return EfficientNet(setting, dropout=0.2, last_channel=32, num_classes=CLASSES)


def tv_regnet(se: bool) -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet
    params = BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8,
                                          se_ratio=0.25 if se else None)
    return RegNet(params, num_classes=CLASSES)


def tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=CLASSES)


def tv_vit() -> nn.Module:
    "torchvision zeroes the head, which makes every logit and map zero: the head is drawn at random here."
    from torchvision.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=CLASSES)
    nn.init.normal_(vit.heads.head.weight)
    nn.init.normal_(vit.heads.head.bias)
    nn.init.normal_(vit.class_token)
    return vit


def tv_swin(v2: bool) -> nn.Module:
    from torchvision.models import swin_transformer as s
    extra = dict(block=s.SwinTransformerBlockV2, downsample_layer=s.PatchMergingV2) if v2 else {}
    return s.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                             num_classes=CLASSES, **extra)


def tv_maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
                  head_dim=4, stochastic_depth_prob=0.0, num_classes=CLASSES)


def tv(name: str, **kw) -> Callable[[], nn.Module]:
    "torchvision's own builder, random weights."
    def build():
        import torchvision.models as tvm
        return getattr(tvm, name)(weights=None, num_classes=CLASSES, **kw)
    return build


def timm_model(name: str, **kw) -> Callable[[], nn.Module]:
    "timm's own builder, random weights (pretrained=False: nothing is downloaded)."
    def build():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)
    return build


TIMM_VIT = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2)


def hf(config: str, model: str, **kw) -> Callable[[], nn.Module]:
    "A Hugging Face classifier from a small random configuration of its Config class."
    def build():
        import transformers
        return getattr(transformers, model)(getattr(transformers, config)(num_labels=CLASSES, **kw))
    return build


HF_VIT = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, image_size=32,
              patch_size=8)

ZOO: list[Zoo] = [
    # torchvision
    Zoo("torchvision:alexnet", lambda: light(lambda: __import__("torchvision").models.AlexNet(CLASSES), small_head),
        size=64, layer="features.10"),
    Zoo("torchvision:vgg", lambda: tv_vgg(False), layer="features.4"),
    Zoo("torchvision:vgg_bn", lambda: tv_vgg(True), layer="features.6"),
    Zoo("torchvision:resnet18", tv("resnet18"), size=64, layer="layer4"),
    Zoo("torchvision:resnet_bottleneck", lambda: tv_resnet("bottleneck"), layer="layer4"),
    Zoo("torchvision:resnext", lambda: tv_resnet("bottleneck", groups=32, width_per_group=4), layer="layer4"),
    Zoo("torchvision:wide_resnet", lambda: tv_resnet("bottleneck", width_per_group=128), layer="layer4"),
    Zoo("torchvision:densenet", lambda: __import__("torchvision").models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=CLASSES), layer="features"),
    Zoo("torchvision:googlenet", tv("googlenet", aux_logits=False, init_weights=False), layer="inception5b"),
    Zoo("torchvision:inception_v3", tv("inception_v3", aux_logits=False, init_weights=False), size=75,
        layer="Mixed_7c"),
    Zoo("torchvision:mobilenet_v2", tv("mobilenet_v2", width_mult=0.25), layer="features.18"),
    Zoo("torchvision:mobilenet_v3_small", tv("mobilenet_v3_small", width_mult=0.5), size=64, layer="features.12"),
    Zoo("torchvision:mobilenet_v3_large", tv("mobilenet_v3_large", width_mult=0.25), size=64, layer="features.16"),
    Zoo("torchvision:mnasnet", tv("mnasnet0_5"), layer="layers.16"),
    Zoo("torchvision:shufflenet_v2", tv("shufflenet_v2_x0_5"), size=64, layer="conv5"),
    Zoo("torchvision:squeezenet1_0", tv("squeezenet1_0"), size=64, layer="features.12"),
    Zoo("torchvision:squeezenet1_1", tv("squeezenet1_1"), size=64, layer="features.12"),
    Zoo("torchvision:efficientnet", tv_efficientnet, layer="features.4"),
    Zoo("torchvision:efficientnet_v2", tv_efficientnet_v2, layer="features.4"),
    Zoo("torchvision:regnet_x", lambda: tv_regnet(False), layer="trunk_output"),
    Zoo("torchvision:regnet_y", lambda: tv_regnet(True), layer="trunk_output"),
    Zoo("torchvision:convnext", tv_convnext, layer="features.3"),
    Zoo("torchvision:vit", tv_vit, layout="BLC", prefix=1, layer="encoder.layers.encoder_layer_2.ln_1", blocks="encoder.layers",
        attention="torchvision", fullgrad=False),
    Zoo("torchvision:swin", lambda: tv_swin(False), layout="BHWC", layer="features.3.0.norm1", fullgrad=False),
    Zoo("torchvision:swin_v2", lambda: tv_swin(True), layout="BHWC", layer="features.3.0.norm1", fullgrad=False),
    Zoo("torchvision:maxvit", tv_maxvit, layer="blocks.1", fullgrad=False),
    # timm
    Zoo("timm:resnet", timm_model("resnet10t"), layer="layer4"),
    Zoo("timm:convnext", timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), layer="stages.3"),
    Zoo("timm:efficientnet", timm_model("tinynet_e"), layer="conv_head"),
    Zoo("timm:mobilenetv3", timm_model("mobilenetv3_small_050"), layer="conv_head"),
    Zoo("timm:regnet", timm_model("regnetx_002"), layer="s4"),
    Zoo("timm:vit", timm_model("vit_tiny_patch16_224", **TIMM_VIT), layout="BLC", prefix=1, layer="blocks.2.norm1",
        blocks="blocks", attention="timm", fullgrad=False),
    Zoo("timm:deit", timm_model("deit_tiny_patch16_224", **TIMM_VIT), layout="BLC", prefix=1, layer="blocks.2.norm1",
        blocks="blocks", attention="timm", fullgrad=False),
    Zoo("timm:deit_distilled", timm_model("deit_tiny_distilled_patch16_224", **TIMM_VIT), layout="BLC", prefix=2,
        layer="blocks.2.norm1", blocks="blocks", attention="timm", fullgrad=False),
    Zoo("timm:swin", timm_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=16,
                                depths=(1, 1), num_heads=(1, 2)), layout="BHWC", layer="layers.1.blocks.0.norm1",
        fullgrad=False),
    Zoo("timm:eva", timm_model("eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=16, depth=3,
                               num_heads=2), layout="BLC", prefix=1, layer="blocks.2.norm1", fullgrad=False),
    # Hugging Face transformers
    Zoo("hf:vit", hf("ViTConfig", "ViTForImageClassification", **HF_VIT), layout="BLC", prefix=1,
        layer="vit.layers.2.layernorm_before", blocks="vit.layers", attention="hf", fullgrad=False),
    Zoo("hf:deit", hf("DeiTConfig", "DeiTForImageClassification", **HF_VIT), layout="BLC", prefix=2,
        layer="deit.layers.2.layernorm_before", blocks="deit.layers", attention="hf", fullgrad=False),
    Zoo("hf:deit_distilled", hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", **HF_VIT), layout="BLC",
        prefix=2, layer="deit.layers.2.layernorm_before", blocks="deit.layers", attention="hf", fullgrad=False),
    Zoo("hf:convnext", hf("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[8, 16], depths=[1, 1],
                          num_stages=2), layer="convnext.encoder.stages.1"),
    Zoo("hf:resnet", hf("ResNetConfig", "ResNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                        depths=[1, 1], layer_type="basic"), layer="resnet.encoder.stages.1"),
    Zoo("hf:swin", hf("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=4, embed_dim=16,
                      depths=[1, 1], num_heads=[1, 2], window_size=2), layout="BLC",
        layer="swin.encoder.layers.1.blocks.0.layernorm_before", fullgrad=False),
]
