"""Hugging Face's ViT and DeiT image classifiers under the ViT methods (nbs/06_vit.ipynb), their ImageClassifierOutput
read through `.logits`: token GradCAM against a hand GradCAM and explicit Eq. 1, attention rollout against the
attentions the model itself returns, the model left as it was; and the refusals, with their reasons, where rollout is
undefined (windowed attention, pooled or distilled heads)."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from transformers import (DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, SwinConfig,
                          SwinForImageClassification, Swinv2Config, Swinv2ForImageClassification, ViTConfig,
                          ViTForImageClassification)

from contrastive_explanations.methods.vit import AttentionRollout, ViTGradCAM

from conftest import tiny_vit

C, B, L = 5, 3, 3  # classes, images, encoder blocks
KINDS = {"vit": (ViTConfig, ViTForImageClassification, 1), "deit": (DeiTConfig, DeiTForImageClassification, 2),
         "deit_teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher, 2)}  # config, class, prefix tokens


def hf_vit(kind: str, seed: int = 0) -> nn.Module:
    "A small random classifier in double precision: 32 x 32 images, a 4 x 4 grid of 8-pixel patches, 3 blocks of 2 heads."
    Config, Model, _ = KINDS[kind]
    torch.manual_seed(seed)  # weights drawn wider than the default 0.02, so that the logits and attentions differ
    config = Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=L, num_attention_heads=2,
                    intermediate_size=64, num_labels=C, initializer_range=0.4)
    return Model(config).double().eval()


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layers(model: nn.Module) -> nn.ModuleList:
    return model.deit.layers if hasattr(model, "deit") else model.vit.layers


def hand_gradcam(kind: str, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the GradCAM maps (B, C, 4, 4) of every class's logit: the block's output stored by a forward
    hook, its gradient by a tensor hook, one backward pass per class, on a fresh copy of the model."""
    model, prefix = hf_vit(kind), KINDS[kind][2]
    x = x.clone().requires_grad_(True)  # the parameters are frozen below, so the graph starts at the images
    model.requires_grad_(False)
    stored, grads = [], []

    def hook(module, inputs, output):
        stored.append(output)
        output.register_hook(grads.append)

    with layers(model)[block].register_forward_hook(hook):
        y = model(x).logits
    for s in range(C):
        y[:, s].sum().backward(retain_graph=True)
    A, G = stored[0].detach()[:, prefix:], torch.stack(grads, 1)[:, :, prefix:]  # (B, 16, D), (B, C, 16, D)
    maps = torch.einsum("bcd,bnd->bcn", G.mean(2), A)  # each channel by its grid-mean gradient, summed
    return y.detach(), maps.reshape(B, C, 4, 4)


def eq1(per_class: torch.Tensor, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    "Eq. 1: p_t (1 - p_t) [M_t - sum_{s != t} alpha_s M_s], alpha the softmax of the other logits, sample by sample."
    out = []
    for b in range(B):
        p = logits[b].softmax(0)[t[b]]
        others = [s for s in range(C) if s != t[b]]
        alpha = logits[b, others].softmax(0)
        contrast = per_class[b, t[b]] - sum(a * per_class[b, s] for a, s in zip(alpha, others))
        out.append(p * (1 - p) * contrast)
    return torch.stack(out)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("block", [0, 1])
def test_hf_gradcam_is_hand_gradcam_and_its_weighted_target_is_eq1(kind, block):
    x, t = images(), torch.tensor([0, 3, 4])
    logits, phi = hand_gradcam(kind, x, block)
    assert phi.abs().amax() > 1e-3
    method = ViTGradCAM(hf_vit(kind), block=block)
    assert method.prefix == KINDS[kind][2] and method.grid == (4, 4)
    every = method(x, torch.arange(C).expand(B, C), "original")
    torch.testing.assert_close(every.logits, logits)
    torch.testing.assert_close(every.maps[:, :, 0], phi)
    e = method(x, t, ["original", "weighted"])
    torch.testing.assert_close(e.map("original"), phi[torch.arange(B), t])
    torch.testing.assert_close(e.map("weighted"), eq1(phi, logits, t))


def test_gradcam_reads_a_block_that_returns_a_tuple_through_its_first_element():
    "transformers 4's layers returned (tokens, ...): a torchvision ViT whose first block does so gets the same maps."
    class Tupled(nn.Module):
        def __init__(self, block, unpack):
            super().__init__()
            self.block, self.unpack = block, unpack

        def forward(self, x):
            return self.block(x[0]) if self.unpack else (self.block(x), None)

    vit = tiny_vit(0, image_size=32, classes=C)
    x, t = images(), torch.tensor([0, 1, 2])
    want = ViTGradCAM(vit, block=0)(x, t, ["original", "weighted"]).maps
    first, second = vit.encoder.layers
    vit.encoder.layers = nn.Sequential(Tupled(first, False), Tupled(second, True))
    torch.testing.assert_close(ViTGradCAM(vit, block=0)(x, t, ["original", "weighted"]).maps, want)


def own_attentions(kind: str, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    "The logits and the attentions (B, heads, N, N) the model itself returns, eager, in the graph of the logits."
    model = hf_vit(kind)
    model.set_attn_implementation("eager")
    out = model(x, output_attentions=True)
    assert len(out.attentions) == L
    return out.logits, out.attentions


def hand_rollout(attentions, grads, variant: str, prefix: int) -> torch.Tensor:
    "(4, 4) for one sample: mean over heads of A * G, ReLU unless signed, + I, rows by their sums, blocks multiplied."
    N = attentions[0].shape[-1]
    R = torch.eye(N, dtype=torch.float64)
    for A, G in zip(attentions, grads):  # (heads, N, N), first block first
        fused = (A * G).mean(0)
        if variant == "standard":
            fused = fused.clamp(min=0)
        a = torch.eye(N, dtype=torch.float64) + fused
        R = (a / a.sum(1, keepdim=True)) @ R
    return R[0, prefix:].reshape(4, 4)


def scores_gradient(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    "dO/dS for A = softmax(S) and G = dO/dA, by autograd: log A is S up to a constant per row."
    S = A.detach().log().requires_grad_(True)
    return torch.autograd.grad(S.softmax(-1), S, G)[0]


@pytest.mark.parametrize("kind", ["vit", "deit"])
@pytest.mark.parametrize("variant, gradient", [("standard", "weights"), ("signed", "scores")])
def test_hf_rollout_is_the_rollout_of_the_attentions_the_model_returns(kind, variant, gradient):
    x, t = images(1), torch.tensor([1, 4, 0])
    y, attentions = own_attentions(kind, x)
    objectives = {"original": y[torch.arange(B), t], "weighted": y.softmax(1)[torch.arange(B), t]}
    method = AttentionRollout(hf_vit(kind), variant=variant, gradient=gradient)
    e = method(x, t, list(objectives))
    torch.testing.assert_close(e.logits, y.detach())
    for i, objective in enumerate(objectives.values()):
        for b in range(B):
            grads = torch.autograd.grad(objective[b], attentions, retain_graph=True)
            grads = [scores_gradient(A[b], G[b]) if gradient == "scores" else G[b] for A, G in zip(attentions, grads)]
            want = hand_rollout([A[b].detach() for A in attentions], grads, variant, KINDS[kind][2])
            torch.testing.assert_close(e.maps[b, 0, i], want)
    assert e.maps.abs().amax() > 0


def state(model: nn.Module) -> dict:
    "What an explanation must leave as it was: the config, the modes, the parameters' flags and grads, every hook."
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {"config": dict(vars(model.config)), "attn": model.config._attn_implementation,
            "training": [m.training for m in model.modules()],
            "params": [(p.requires_grad, p.grad is None) for p in model.parameters()],
            "hooks": [[dict(getattr(m, h)) for h in hooks] for m in model.modules()]}


@pytest.mark.parametrize("kind", ["vit", "deit_teacher"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hf_model_is_left_as_it_was_after_calls_that_succeed_and_raise(kind, implementation):
    model = hf_vit(kind).train()
    model.set_attn_implementation(implementation)
    layers(model)[0].requires_grad_(False)  # a frozen block stays frozen
    model(images(), output_attentions=True)  # Hugging Face installs its own capturing hooks: they must stay
    before = state(model)
    assert before["attn"] == implementation and any(before["training"]) and not all(r for r, _ in before["params"])
    methods = [ViTGradCAM(model)] + ([AttentionRollout(model)] if kind == "vit" else [])
    for method in methods:
        method(images(), torch.tensor([0, 1, 2]))
        assert state(model) == before
        with pytest.raises(ValueError, match=r"takes 32x32 images, got x of shape \(3, 3, 24, 24\)"):
            method(images()[..., :24, :24], 0)  # raised inside the forward, with the attention captured
        assert state(model) == before
        with pytest.raises(ValueError, match="class"):
            method(images(), 7)  # class 7 of 5: raised after the forward
        assert state(model) == before


def one_line_error(make, error: type, pattern: str) -> str:
    with pytest.raises(error, match=pattern) as info:
        make()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_hf_deit_with_teacher_refuses_rollout_and_its_last_block():
    teacher = hf_vit("deit_teacher")
    one_line_error(lambda: AttentionRollout(teacher), ValueError,
                   r"DeiTForImageClassificationWithTeacher averages the heads of its class token and its "
                   r"distillation token, so its logits do not come from the class token alone.*ViTGradCAM")
    one_line_error(lambda: ViTGradCAM(teacher, block=-1), ValueError,
                   r"block=-1 is the last encoder block.*class and distillation tokens only.*block=-2")
    for kind in ("vit", "deit"):
        one_line_error(lambda: ViTGradCAM(hf_vit(kind), block=-1), ValueError,
                       r"block=-1 is the last encoder block.*class token only.*block=-2")


def test_hf_vit_with_a_forward_of_its_own_is_refused_by_rollout_only():
    class OwnHead(ViTForImageClassification):
        def forward(self, pixel_values):
            return self.classifier(self.vit(pixel_values).last_hidden_state.mean(1))  # pools every token

    torch.manual_seed(0)
    model = OwnHead(hf_vit("vit").config).double().eval()
    one_line_error(lambda: AttentionRollout(model), ValueError, r"OwnHead replaces its library's forward.*ViTGradCAM")
    assert ViTGradCAM(model, block=-1)(images(), 1).maps.abs().amax() > 0  # the pooled head reads the last block


def test_a_wrapped_hf_vit_is_found():
    model = hf_vit("vit")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(pixel_values=x).logits  # the images by keyword

    x, t = images(), torch.tensor([2, 0, 1])
    for make in (lambda m, **kw: ViTGradCAM(m, **kw), lambda m, **kw: AttentionRollout(m, **kw)):
        method = make(Wrapper())
        assert method.vit is model and method.blocks == list(model.vit.layers)
        torch.testing.assert_close(method(x, t).maps, make(model)(x, t).maps)
        one_line_error(lambda: method(x[..., :16, :16], t), ValueError, r"takes 32x32 images.*Resize\(\(32, 32\)\)")


WINDOWED = r"windowed attention has no token-to-token attention over the whole image.*explain it with GradCAM\(model, "


def swins() -> list[tuple[nn.Module, str]]:
    "Windowed-attention classifiers from each library, random (small where that is a keyword away), and their last stage."
    small = dict(pretrained=False, img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1))
    hf = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=C)
    return [(torchvision.models.swin_t(weights=None), "features.7"),
            (timm.create_model("swin_tiny_patch4_window7_224", patch_size=4, **small), "layers.1"),
            (timm.create_model("swinv2_tiny_window8_256", **small), "layers.1"),
            (timm.create_model("swinv2_cr_tiny_224", **small), "stages.1"),
            (SwinForImageClassification(SwinConfig(**hf)), "swin.encoder.layers.1"),
            (Swinv2ForImageClassification(Swinv2Config(**hf)), "swinv2.encoder.layers.1")]


def test_windowed_and_gridded_attention_are_refused_with_the_reason_and_the_last_stage():
    models = swins()
    for model, stage in models:
        for method in (AttentionRollout, ViTGradCAM):
            one_line_error(lambda: method(model), TypeError,
                           rf"model is (torchvision|timm|Hugging Face)'s \w+: {WINDOWED}'{stage}'\)")
    one_line_error(lambda: AttentionRollout(nn.Sequential(nn.Identity(), models[0][0])), TypeError,
                   rf"model holds torchvision's SwinTransformer at '1': {WINDOWED}'1.features.7'\)")
    for model, stage in [(torchvision.models.maxvit_t(weights=None), "blocks.3"),
                         (timm.create_model("maxvit_nano_rw_256", pretrained=False), "stages.3")]:
        one_line_error(lambda: AttentionRollout(model), TypeError,
                       rf"MaxViT.*windowed or on a sparse grid.*GradCAM\(model, '{stage}'\)")


def test_no_vit_names_hugging_face():
    one_line_error(lambda: ViTGradCAM(torchvision.models.resnet18(weights=None)), TypeError,
                   r"contains no VisionTransformer.*Hugging Face ViTForImageClassification.*use GradCAM")
