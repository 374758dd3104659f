"""timm's Vision Transformers under the ViT methods (nbs/06_vit.ipynb): register tokens, the captured attention,
the pooling and distillation rules, the model left as it was; and output= on the ViT methods and FullGrad. The chapter checks that
a timm ViT holding a torchvision ViT's weights gets the same maps from every method."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from contrastive_explanations.methods import FullGrad
from contrastive_explanations.methods.targets import TARGETS, explicit_contrast, get_target
from contrastive_explanations.methods.vit import (AttentionRollout, ViTGradCAM, captured_attention, encoder_blocks,
                                                 find_vit, grad_rollout, leaf_input)

from conftest import tiny_vit

C = 5


def timm_vit(seed: int = 0, **kw) -> TimmViT:
    "A small random timm ViT in double precision: 32 x 32 images, a 4 x 4 grid of 8-pixel patches, 2 blocks of 2 heads."
    torch.manual_seed(seed)
    vit = TimmViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=C, **kw)
    nn.init.normal_(vit.head.weight)
    nn.init.normal_(vit.pos_embed, std=0.5)
    return vit.double().eval()


def images(seed: int = 0, B: int = 3) -> torch.Tensor:
    return torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hooked_tokens(vit: TimmViT, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    "The logits and block `block`'s output tokens, as a leaf that requires grad."
    out = []

    def hook(module, inputs, output):
        out.append(output.detach().requires_grad_(True))
        return out[0]

    with vit.blocks[block].register_forward_hook(hook):
        return vit(x), out[0]


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_timm_gradcam_is_hand_gradcam_on_the_patch_tokens_and_the_scaled_contrast(reg_tokens):
    vit, x, t = timm_vit(reg_tokens=reg_tokens), images(), torch.tensor([0, 2, 4])
    y, tokens = hooked_tokens(vit, x, 0)
    prefix = 1 + reg_tokens
    grads = torch.stack([torch.autograd.grad(y[:, s].sum(), tokens, retain_graph=True)[0] for s in range(C)], 1)
    phi = (grads[:, :, prefix:].mean(2, keepdim=True) * tokens[:, None, prefix:]).sum(-1).reshape(3, C, 4, 4)
    method = ViTGradCAM(vit, block=0)
    assert method.prefix == prefix and method.grid == (4, 4) and method.blocks == list(vit.blocks)
    every = method(x, torch.arange(C).expand(3, C), "original").maps[:, :, 0]
    torch.testing.assert_close(every, phi.detach())
    e = method(x, t, list(TARGETS))
    for i, name in enumerate(e.targets):
        target = get_target(name)
        want = target.scale(e.logits, t)[:, None, None] * explicit_contrast(phi.detach(), target.weights(e.logits, t))
        torch.testing.assert_close(e.maps[:, 0, i], want, msg=name)


def test_timm_captured_attention_is_the_softmax_of_the_scores_and_leaves_the_output_unchanged():
    vit, x = timm_vit(reg_tokens=1), images()
    blocks = encoder_blocks(vit)
    inputs = []
    pre = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks]
    with torch.no_grad():
        plain = vit(x)
        with captured_attention(blocks) as records:
            captured = vit(x)
    for h in pre:
        h.remove()
    torch.testing.assert_close(captured, plain)
    for block, z, record in zip(blocks, inputs[len(blocks):], records):
        q, k, _ = block.attn.qkv(z).reshape(3, 18, 3, 2, 8).permute(2, 0, 3, 1, 4)
        want = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
        assert len(record) == 1 and record[0].shape == (3, 2, 18, 18)
        torch.testing.assert_close(record[0], want)
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in blocks)
    assert not any(m._forward_pre_hooks for m in vit.modules())


def test_timm_rollout_is_the_rollout_of_each_blocks_own_attention_gradient():
    vit, x, t = timm_vit(reg_tokens=2), images(1), torch.tensor([1, 3, 0])
    blocks = encoder_blocks(vit)
    with captured_attention(blocks) as records, leaf_input(blocks[0]):
        y = vit(x)
    attentions = [r[0] for r in records]
    grads = torch.autograd.grad(y[torch.arange(3), t].sum(), attentions)
    for variant, gradient in [("standard", "weights"), ("signed", "scores")]:
        R = grad_rollout([A.detach() for A in attentions], [g[:, None] for g in grads], variant=variant,
                         gradient=gradient)
        got = AttentionRollout(vit, variant=variant, gradient=gradient)(x, t, "original").maps[:, 0, 0]
        torch.testing.assert_close(got, R[:, 0, 0, 3:].reshape(3, 4, 4))  # 3 prefix tokens: class + 2 registers


def test_timm_pooling_decides_the_last_block_and_the_rollout():
    x, t = images(), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="block=-1 is the last encoder block.*choose an earlier block"):
        ViTGradCAM(timm_vit(), block=-1)
    pooled = timm_vit(global_pool="avg")
    assert ViTGradCAM(pooled, block=-1)(x, t).maps.abs().amax() > 0  # the head averages the patch tokens
    with pytest.raises(ValueError, match=r"pools its tokens with global_pool='avg', so its logits do not come from the "
                                         r"class token alone.*ViTGradCAM.*or build it with global_pool='token'"):
        AttentionRollout(pooled)
    with pytest.raises(ValueError, match="dynamic_img_size=True.*build it with dynamic_img_size=False"):
        ViTGradCAM(timm_vit(dynamic_img_size=True))
    with pytest.raises(ValueError, match=r"takes 32x32 images, got x of shape \(3, 3, 24, 24\).*Resize\(\(32, 32\)\)"):
        AttentionRollout(timm_vit())(x[..., :24, :24], t)


def test_timm_distilled_deit_is_refused_for_its_distillation_head_not_for_global_pool():
    "Its head averages the class and distillation tokens' heads: not the class token alone, and never a patch token."
    deit = timm.models.deit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                                       num_classes=C)
    assert deit.global_pool == "token" and ViTGradCAM(deit).prefix == 2
    with pytest.raises(ValueError, match=r"VisionTransformerDistilled averages the heads of its class token and its "
                                         r"distillation token.*ViTGradCAM") as info:
        AttentionRollout(deit)
    assert "global_pool" not in str(info.value)
    with pytest.raises(ValueError, match=r"block=-1 is the last encoder block.*class and distillation tokens only"):
        ViTGradCAM(deit, block=-1)


def test_timm_model_is_left_as_it_was_after_a_call_that_raises():
    vit = timm_vit().train()
    fused = [b.attn.fused_attn for b in vit.blocks]
    for method in (AttentionRollout(vit), ViTGradCAM(vit)):
        method(images(), torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError):
            method(images(), 7)  # class 7 of 5
    assert [b.attn.fused_attn for b in vit.blocks] == fused
    assert all(m.training for m in vit.modules())
    assert all(p.requires_grad and p.grad is None for p in vit.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in vit.modules())


def test_find_vit_finds_a_wrapped_timm_vit_and_names_timm_when_there_is_none():
    vit = timm_vit()
    assert find_vit(nn.Sequential(nn.Identity(), vit)) is vit
    with pytest.raises(TypeError, match=r"contains no VisionTransformer.*timm.create_model.*Hugging Face"):
        find_vit(torchvision.models.resnet18(weights=None))


class Hub(nn.Module):
    "A model that returns its logits in a dict under a name of its own ('logits' would be read without output=)."

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"scores": self.net(x)}


@pytest.mark.parametrize("make", [lambda m, **kw: ViTGradCAM(m, **kw), lambda m, **kw: AttentionRollout(m, **kw),
                                  lambda m, **kw: AttentionRollout(m, variant="signed", gradient="scores", **kw)])
@pytest.mark.parametrize("vit", [tiny_vit(image_size=32, classes=C), timm_vit()], ids=["torchvision", "timm"])
def test_vit_methods_take_output(make, vit):
    x, t = images(), torch.tensor([0, 4, 2])
    want = make(vit)(x, t, ["original", "weighted"]).maps
    torch.testing.assert_close(make(Hub(vit), output=lambda out: out["scores"])(x, t, ["original", "weighted"]).maps,
                               want)
    with pytest.raises(TypeError, match=r"returned a dict with keys \['scores'\].*pass output="):
        make(Hub(vit))(x, t)


def test_fullgrad_takes_output():
    net = torchvision.models.resnet18(weights=None, num_classes=C).double().eval()
    x = images(2, B=2)
    want = FullGrad(net)(x, [1, 3], ["original", "weighted"]).maps
    got = FullGrad(Hub(net), output=lambda out: out["scores"])(x, [1, 3], ["original", "weighted"]).maps
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match=r"returned a dict with keys \['scores'\].*pass output="):
        FullGrad(Hub(net))(x, 1)
