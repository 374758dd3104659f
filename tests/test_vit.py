"""Token GradCAM and gradient-weighted attention rollout for torchvision ViTs (nbs/06_vit.ipynb): the contrast
identity, loop-based oracles, the two vit-explain defects, the captured attention, hygiene and bad input."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torchvision
import torchvision.transforms.v2 as T
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from contrastive_explanations.methods.targets import TARGETS, explicit_contrast, get_target
from contrastive_explanations.methods.vit import (AttentionRollout, ViTGradCAM, ViTMethod, attention_weights,
                                                 captured_attention, discard_lowest, encoder_blocks, grad_rollout,
                                                 score_gradient)

from conftest import tiny_vit


def images(seed: int, B: int, size: int, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# (a) Token GradCAM: the weighted target is the scaled explicit contrast (Eq. eq-vit-gradcam-contrast)

def block_output(vit, x, block):
    "The logits and block `block`'s output tokens (B, N, D), captured as a leaf that requires grad."
    out = []

    def hook(module, inputs, output):
        out.append(output.detach().requires_grad_(True))
        return out[0]

    handle = vit.encoder.layers[block].register_forward_hook(hook)
    try:
        return vit(x), out[0]
    finally:
        handle.remove()


def hand_gradcam(vit, x, block):
    "(B, C, h, w): Eq. eq-vit-gradcam from a hooked block output, one backward pass per class."
    y, A = block_output(vit, x, block)
    n = int(math.isqrt(A.shape[1] - 1))
    maps = []
    for s in range(y.shape[1]):
        (G,) = torch.autograd.grad(y[:, s].sum(), A, retain_graph=True)
        weights = G[:, 1:].mean(1)  # (B, D): the grid mean of the gradient, per channel
        maps.append(torch.einsum("bd,bnd->bn", weights, A[:, 1:].detach()).reshape(-1, n, n))
    return torch.stack(maps, 1)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([16, 32]), C=st.integers(2, 6), B=st.integers(1, 3),
       block=st.sampled_from([0, -2]), data=st.data())
def test_vit_gradcam_weighted_target_is_scaled_explicit_contrast(seed, size, C, B, block, data):
    "Eq. eq-vit-gradcam-contrast, for every target: one backward pass = scale * sum_s w_s M[y_s]."
    vit = tiny_vit(seed, size, C)
    x = images(seed, B, size)
    t = torch.tensor(data.draw(st.lists(st.integers(0, C - 1), min_size=B, max_size=B)))
    method = ViTGradCAM(vit, block=block)
    phi = method(x, torch.arange(C).expand(B, C), "original").maps[:, :, 0]  # (B, C, h, w)
    torch.testing.assert_close(phi, hand_gradcam(vit, x, block))  # the per-class maps themselves, by hand
    assert phi.abs().max() > 0
    e = method(x, t, list(TARGETS))
    for i, name in enumerate(e.targets):
        target = get_target(name)
        expected = target.scale(e.logits, t)[:, None, None] * explicit_contrast(phi, target.weights(e.logits, t))
        torch.testing.assert_close(e.maps[:, 0, i], expected)


def test_vit_gradcam_last_block_has_zero_patch_gradient_and_is_refused():
    "Eq. eq-vit-last-block: the head reads the class token only, so the last block's patch tokens get no gradient."
    vit, x = tiny_vit(0), images(0, 2, 16)
    y, Z_L = block_output(vit, x, -1)
    for s in range(4):
        (g,) = torch.autograd.grad(y[:, s].sum(), Z_L, retain_graph=True)
        assert g[:, 1:].abs().max() == 0 and g[:, 0].abs().max() > 0
    with pytest.raises(ValueError, match=r"block=-1 is the last encoder block.*block=-2"):
        ViTGradCAM(vit, block=-1)
    with pytest.raises(ValueError, match=r"block=1 is the last"):
        ViTGradCAM(vit, block=1)


def test_vit_gradcam_backpropagates_only_the_blocks_above():
    "The block output is the only leaf: nothing below it (patch embedding, earlier blocks) is back-propagated."
    vit, x = tiny_vit(1, num_layers=3), images(1, 2, 16)
    below = []
    for module in (vit.conv_proj, vit.encoder.layers[0]):
        module.register_full_backward_hook(lambda m, gi, go: below.append(m))
    above = []
    vit.encoder.layers[2].register_full_backward_hook(lambda m, gi, go: above.append(m))
    ViTGradCAM(vit, block=1)(x, 0, "weighted")
    assert below == [] and len(above) == 1


def test_vit_gradcam_wrapped_model_float32_and_batch_independence():
    "A ViT behind a normalisation layer gives the maps of the bare ViT on normalised images; samples are independent."
    vit = tiny_vit(2, 32, 5, dtype=torch.float32)
    norm = T.Normalize(mean=[0.5] * 3, std=[0.25] * 3)
    wrapped = nn.Sequential(norm, vit)
    x = images(2, 3, 32, torch.float32)
    e = ViTGradCAM(wrapped)(x, torch.tensor([[0, 1], [2, 3], [4, 0]]), ["original", "weighted"])
    bare = ViTGradCAM(vit)(norm(x), torch.tensor([[0, 1], [2, 3], [4, 0]]), ["original", "weighted"])
    assert e.maps.shape == (3, 2, 2, 4, 4) and e.maps.dtype == torch.float32
    torch.testing.assert_close(e.maps, bare.maps)
    single = ViTGradCAM(wrapped)(x[1:2], torch.tensor([[2, 3]]), ["original", "weighted"])
    torch.testing.assert_close(single.maps[0], e.maps[1], rtol=1e-4, atol=1e-6)
    up = e.upsampled((32, 32))
    assert up.shape == (3, 2, 2, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# (b) Rollout against a loop-based oracle with its own forward pass (Eqs. eq-rollout-fused, eq-rollout)

def manual_forward(vit, x, scores=None):
    "The ViT's forward with explicit loops over samples and heads; attentions[l][b][k] is an (N, N) graph tensor."
    scores = [] if scores is None else scores  # filled like attentions, with the scores S before the softmax
    z = vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, n, D), row-major patches
    z = torch.cat([vit.class_token.expand(len(x), -1, -1), z], 1) + vit.encoder.pos_embedding
    attentions = []
    for block in vit.encoder.layers:
        u, mha = block.ln_1(z), block.self_attention
        D, H = u.shape[-1], mha.num_heads
        d = D // H
        (Wq, Wk, Wv), (bq, bk, bv) = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)
        per_block, outputs = [], []
        scores.append([])
        for b in range(len(x)):
            heads, per_sample = [], []
            scores[-1].append([])
            for k in range(H):
                rows = slice(k * d, (k + 1) * d)
                q, key, v = (u[b] @ W[rows].T + c[rows] for W, c in ((Wq, bq), (Wk, bk), (Wv, bv)))
                S = q @ key.T / math.sqrt(d)
                scores[-1][-1].append(S)
                A = torch.softmax(S, dim=-1)
                per_sample.append(A)
                heads.append(A @ v)
            per_block.append(per_sample)
            outputs.append(torch.cat(heads, -1) @ mha.out_proj.weight.T + mha.out_proj.bias)
        attentions.append(per_block)
        z = z + torch.stack(outputs)
        z = z + block.mlp(block.ln_2(z))
    return vit.heads(vit.encoder.ln(z)[:, 0]), attentions


def loop_rollout(attentions, grads, head_fusion, variant, discard_ratio):
    "R for one sample and objective: lists over blocks of lists over heads of (N, N); loops everywhere."
    N = attentions[0][0].shape[-1]
    R = torch.eye(N, dtype=torch.float64)
    for heads_A, heads_G in zip(attentions, grads):  # block l with block l, first block first
        products = [heads_A[k] * heads_G[k] for k in range(len(heads_A))]
        fused = products[0].clone()
        for P in products[1:]:
            if head_fusion == "mean":
                fused = fused + P
            else:
                fused = torch.maximum(fused, P) if head_fusion == "max" else torch.minimum(fused, P)
        if head_fusion == "mean":
            fused = fused / len(products)
        if variant == "standard":
            fused = torch.where(fused > 0, fused, torch.zeros_like(fused))
        entries = sorted((abs(fused[i, j].item()), i, j) for i in range(N) for j in range(N) if (i, j) != (0, 0))
        for _, i, j in entries[:int(discard_ratio * (N * N - 1))]:
            fused[i, j] = 0.0
        a = torch.eye(N, dtype=torch.float64) + fused
        a = torch.stack([a[i] / sum(a[i, j] for j in range(N)) for i in range(N)])
        R = a @ R
    return R


@pytest.fixture(scope="module")
def rollout_problem():
    vit, x = tiny_vit(3, 16, 4), images(3, 2, 16)
    y, attentions = manual_forward(vit, x)
    torch.testing.assert_close(y, vit(x))  # the manual forward is the model's forward
    t = torch.tensor([1, 3])
    grads = {}
    for name in ("original", "weighted", "mean"):
        objective = get_target(name)(y, t)
        for b in range(2):
            flat = [attentions[l][b][k] for l in range(2) for k in range(2)]
            g = torch.autograd.grad(objective[b], flat, retain_graph=True)
            grads[name, b] = [[g[2 * l + k] for k in range(2)] for l in range(2)]
    detached = [[[A.detach() for A in heads] for heads in per_block] for per_block in attentions]
    return vit, x, t, detached, grads


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("variant", ["standard", "signed"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3])
def test_rollout_matches_loop_reference(rollout_problem, head_fusion, variant, discard_ratio):
    vit, x, t, attentions, grads = rollout_problem
    targets = ["original", "weighted", "mean"]
    e = AttentionRollout(vit, head_fusion, variant, discard_ratio)(x, t, targets)
    assert e.maps.shape == (2, 1, 3, 2, 2)
    for i, name in enumerate(targets):
        for b in range(2):
            R = loop_rollout([attentions[l][b] for l in range(2)], grads[name, b], head_fusion, variant,
                             discard_ratio)
            torch.testing.assert_close(e.maps[b, 0, i], R[0, 1:].reshape(2, 2))
            if variant == "standard":
                torch.testing.assert_close(R.sum(1), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["standard", "signed"])
def test_score_gradient_rollout_is_the_rollout_of_the_gradient_with_respect_to_the_scores(variant):
    "gradient='scores' (vit-explain's hook) equals the loop oracle fed dO/dS from autograd, and differs from dO/dA."
    vit, x, t = tiny_vit(3, 16, 4), images(3, 2, 16), torch.tensor([1, 3])
    scores = []
    y, attentions = manual_forward(vit, x, scores)
    objective = get_target("weighted")(y, t)
    e = AttentionRollout(vit, variant=variant, gradient="scores")(x, t, "weighted")
    by_weights = AttentionRollout(vit, variant=variant)(x, t, "weighted")
    for b in range(2):
        flat_S = [scores[l][b][k] for l in range(2) for k in range(2)]
        flat_A = [attentions[l][b][k] for l in range(2) for k in range(2)]
        g = torch.autograd.grad(objective[b], flat_S + flat_A, retain_graph=True)
        g_S, g_A = g[:4], g[4:]
        for A, gs, ga in zip(flat_A, g_S, g_A):  # Eq. eq-score-gradient, against autograd
            torch.testing.assert_close(score_gradient(A.detach(), ga), gs)
        per_block = [[g_S[2 * l + k] for k in range(2)] for l in range(2)]
        A_b = [[A.detach() for A in attentions[l][b]] for l in range(2)]
        R = loop_rollout(A_b, per_block, "mean", variant, 0.0)
        torch.testing.assert_close(e.maps[b, 0, 0], R[0, 1:].reshape(2, 2))
    assert not torch.allclose(e.maps, by_weights.maps, rtol=1e-3, atol=0)
    assert "gradient='scores'" in repr(AttentionRollout(vit, gradient="scores"))


# ---------------------------------------------------------------------------------------------------------------
# (c) The two vit-explain defects: gradients paired in reverse block order, rows normalised without keepdim

def exact_rollout(attentions, grads, *, reverse=False, keepdim=True):
    "Exact rational rollout of single-head (N, N) matrices, with vit-explain's defects as switches."
    N = len(attentions[0])
    R = [[Fraction(int(i == j)) for j in range(N)] for i in range(N)]
    for A, G in zip(attentions, grads[::-1] if reverse else grads):
        a = [[Fraction(int(i == j)) + max(A[i][j] * G[i][j], Fraction(0)) for j in range(N)] for i in range(N)]
        sums = [sum(row) for row in a]
        # keepdim: a[i][j] / sum(row i); without it: a[i][j] / sum(row j), as (N,) sums broadcast along the last axis
        a = [[a[i][j] / (sums[i] if keepdim else sums[j]) for j in range(N)] for i in range(N)]
        R = [[sum(a[i][m] * R[m][j] for m in range(N)) for j in range(N)] for i in range(N)]
    return R


def as_tensor(rows):
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


def test_rollout_defects_on_an_asymmetric_hand_example():
    "Exact values on two hand-set blocks (N = 3, one head): only the forward-order, keepdim rollout matches."
    F_ = Fraction
    A1 = [[F_(1, 2), F_(1, 4), F_(1, 4)], [F_(1, 5), F_(3, 5), F_(1, 5)], [F_(0), F_(1, 3), F_(2, 3)]]
    A2 = [[F_(1, 3), F_(1, 3), F_(1, 3)], [F_(1, 2), F_(1, 2), F_(0)], [F_(1, 4), F_(0), F_(3, 4)]]
    G1 = [[F_(2), F_(4), F_(0)], [F_(1), F_(-1), F_(3)], [F_(1), F_(2), F_(1)]]
    G2 = [[F_(1), F_(0), F_(6)], [F_(2), F_(2), F_(2)], [F_(0), F_(-3), F_(4)]]
    right = exact_rollout([A1, A2], [G1, G2])
    # block 1: A1*G1 = [[1, 1, 0], [1/5, -3/5, 3/5], [0, 2/3, 2/3]], positive part plus I =
    # [[2, 1, 0], [1/5, 1, 3/5], [0, 2/3, 5/3]], each row divided by its own sum (3, 9/5, 7/3)
    assert exact_rollout([A1], [G1]) == [[F_(2, 3), F_(1, 3), F_(0)], [F_(1, 9), F_(5, 9), F_(1, 3)],
                                         [F_(0), F_(2, 7), F_(5, 7)]]
    attn = [as_tensor(A)[None, None] for A in (A1, A2)]  # (B=1, heads=1, N, N)
    grads = [as_tensor(G)[None, None, None] for G in (G1, G2)]  # (B=1, J=1, heads=1, N, N)
    ours = grad_rollout(attn, grads)[0, 0]
    torch.testing.assert_close(ours, as_tensor(right))
    reversed_pairs = as_tensor(exact_rollout([A1, A2], [G1, G2], reverse=True))
    no_keepdim = as_tensor(exact_rollout([A1, A2], [G1, G2], keepdim=False))
    for wrong in (reversed_pairs, no_keepdim):
        assert (ours[0, 1:] - wrong[0, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(ours.sum(1), torch.ones(3, dtype=torch.float64))
    assert (no_keepdim.sum(1) - 1).abs().max() > 1e-3  # rows no longer sum to one


def vit_explain_grad_rollout(attentions, gradients, keepdim=False):
    "vit-explain's grad_rollout, batch of one, no discarding: zip of the two lists, a / a.sum(dim=-1)."
    result = torch.eye(attentions[0].size(-1), dtype=torch.float64)
    for attention, grad in zip(attentions, gradients):
        fused = (attention * grad).mean(axis=1)
        fused[fused < 0] = 0
        a = (fused + torch.eye(fused.size(-1), dtype=torch.float64)) / 2
        a = a / a.sum(dim=-1, keepdim=keepdim)
        result = torch.matmul(a, result)
    return result[0, 0, 1:]


def test_vit_explain_defects_change_the_map_of_a_real_vit(rollout_problem):
    "On a ViT: gradients arrive last block first from backward hooks; both defects give maps other than ours."
    vit, x, t, attentions, grads = rollout_problem
    ours = AttentionRollout(vit)(x[:1], t[:1], "original").maps[0, 0, 0].flatten()
    attn = [torch.stack(attentions[l][0])[None] for l in range(2)]  # (1, heads, N, N), forward order
    grad = [torch.stack(grads["original", 0][l])[None] for l in range(2)]
    hooks_order = grad[::-1]  # what vit-explain's backward hooks collect
    defective = vit_explain_grad_rollout(attn, hooks_order)
    assert (defective - ours).abs().max() > 1e-4
    # each defect alone also changes the map; with both fixed, vit-explain's code gives ours
    only_order = vit_explain_grad_rollout(attn, hooks_order, keepdim=True)
    only_keepdim = vit_explain_grad_rollout(attn, grad)
    assert (only_order - ours).abs().max() > 1e-4 and (only_keepdim - ours).abs().max() > 1e-4
    torch.testing.assert_close(vit_explain_grad_rollout(attn, grad, keepdim=True), ours)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(2, 7), L=st.integers(1, 4), H=st.integers(1, 3),
       ratio=st.floats(0, 0.95), fusion=st.sampled_from(["mean", "max", "min"]))
def test_standard_rollout_is_row_stochastic_and_discard_keeps_class_entry(seed, N, L, H, ratio, fusion):
    g = torch.Generator().manual_seed(seed)
    attn = [torch.randn(2, H, N, N, generator=g, dtype=torch.float64).softmax(-1) for _ in range(L)]
    grads = [torch.randn(2, 3, H, N, N, generator=g, dtype=torch.float64) for _ in range(L)]
    R = grad_rollout(attn, grads, fusion, "standard", ratio)
    assert R.shape == (2, 3, N, N) and (R >= 0).all()
    torch.testing.assert_close(R.sum(-1), torch.ones(2, 3, N, dtype=torch.float64))
    fused = torch.randn(2, 3, N, N, generator=g, dtype=torch.float64)
    kept = discard_lowest(fused, ratio)
    k = int(ratio * (N * N - 1))
    assert ((kept == 0) & (fused != 0)).flatten(-2).sum(-1).eq(k).all()
    assert torch.equal(kept[..., 0, 0], fused[..., 0, 0])
    smallest_kept = torch.where(kept != 0, kept.abs(), torch.inf).flatten(-2)[..., 1:].amin(-1)
    largest_dropped = torch.where((kept == 0) & (fused != 0), fused.abs(), 0).flatten(-2).amax(-1)
    assert (largest_dropped <= smallest_kept).all()


def test_rollout_is_not_the_contrast_of_rollouts(rollout_problem):
    "Eq. eq-rollout-contrast is a definition: rollout is not linear, nor invariant to the scale of the objective."
    vit, x, t, _, _ = rollout_problem
    method = AttentionRollout(vit, variant="signed")
    per_class = method(x, torch.arange(4).expand(2, 4), "original").maps[:, :, 0]
    e = method(x, t, ["weighted", "weighted_log"])
    target = get_target("weighted")
    explicit = target.scale(e.logits, t)[:, None, None] * explicit_contrast(per_class, target.weights(e.logits, t))
    assert not torch.allclose(e.map("weighted"), explicit, rtol=0.01, atol=0)
    w, wl = e.map("weighted").flatten(1), e.map("weighted_log").flatten(1)
    assert not torch.allclose(w / w.norm(dim=1, keepdim=True), wl / wl.norm(dim=1, keepdim=True), rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# (d) The captured attention is nn.MultiheadAttention's own, and the model computes what it computed before

def test_multihead_attention_returns_weights_outside_the_graph():
    "Why the attention is recomputed: the weights nn.MultiheadAttention returns have no gradient path to its output."
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    out, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(out.sum(), weights)
    A, out = attention_weights(mha, x)
    assert torch.autograd.grad(out.sum(), A)[0].abs().max() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_attention_weights_equal_multihead_attention(bias):
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(12, 3, bias=bias, batch_first=True).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    A, out = attention_weights(mha, x)
    ref_out, ref_A = mha(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(A, ref_A)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 3, 7, dtype=torch.float64))


def test_captured_attention_equals_need_weights_output_per_block():
    vit, x = tiny_vit(5, 32, 3, num_layers=3, num_heads=4), images(5, 2, 32)
    blocks = encoder_blocks(vit)
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks]
    with torch.no_grad():
        y = vit(x)
        inputs.clear()
        with captured_attention(blocks) as records:
            y_captured = vit(x)
            z = blocks[1].ln_1(inputs[1])
            _, mean_heads = blocks[1].self_attention(z, z, z)  # recorded too; weights averaged over heads
    for h in hooks:
        h.remove()
    torch.testing.assert_close(y_captured, y)
    assert [len(r) for r in records] == [1, 2, 1]
    torch.testing.assert_close(mean_heads, records[1][1].mean(1))
    for i, block in enumerate(blocks):
        z = block.ln_1(inputs[i])
        out, expected = block.self_attention(z, z, z, need_weights=True, average_attn_weights=False)
        assert records[i][0].shape == (2, 4, 17, 17)
        torch.testing.assert_close(records[i][0], expected)
    assert all("forward" not in vars(b.self_attention) for b in blocks)


# ---------------------------------------------------------------------------------------------------------------
# (e) Hygiene: no hooks, patches, gradients or mode changes left behind, also after calls that raise

def snapshot(model):
    return ([(p.requires_grad, p.grad) for p in model.parameters()], [m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), "forward" in vars(m))
             for m in model.modules()])


@pytest.mark.parametrize("make", [lambda m: ViTGradCAM(m), lambda m: AttentionRollout(m, discard_ratio=0.5)])
def test_model_is_left_as_it_was(make):
    vit, x = tiny_vit(6, 16, 3), images(6, 2, 16)
    vit.train()
    vit.encoder.layers[0].eval()  # mixed modes
    vit.conv_proj.weight.requires_grad_(False)  # mixed flags
    user_hook = vit.encoder.layers[1].register_forward_hook(lambda m, i, o: None)  # someone else's hook stays
    before = snapshot(vit)
    method = make(vit)
    with torch.no_grad():
        method(x, [0, 2], ["weighted", "original"])

    def fails_inside(module, args):
        raise RuntimeError("an error in the middle of the forward pass")

    raising = [lambda: method(x[..., :8], 0), lambda: method(x, 5), lambda: method(x, [0, 1], "nope")]
    for call in raising:
        with pytest.raises(ValueError):
            call()
    handle = vit.encoder.layers[1].mlp.register_forward_pre_hook(fails_inside)
    with pytest.raises(RuntimeError, match="middle"):
        method(x, 0)
    handle.remove()
    assert snapshot(vit) == before
    assert all(p.grad is None for p in vit.parameters())
    user_hook.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in vit.modules())


# ---------------------------------------------------------------------------------------------------------------
# (f) Bad input: clear errors that name the argument, the value and the fix

def test_not_a_vision_transformer():
    for model in (torchvision.models.resnet18(weights=None), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())):
        for Method in (ViTGradCAM, AttentionRollout):
            with pytest.raises(TypeError, match=r"contains no VisionTransformer: pass a torchvision VisionTransformer \(e.g. vit_b_16\(weights=None\)\), a timm one"):
                Method(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ViTGradCAM("vit_b_16")
    with pytest.raises(ValueError, match="contains 2 VisionTransformers"):
        AttentionRollout(nn.ModuleList([tiny_vit(0), tiny_vit(1)]))


def test_both_methods_find_the_wrapped_vit_once_and_lay_tokens_out_row_by_row():
    vit = tiny_vit(0, image_size=24)  # a 3 x 3 patch grid
    wrapped = nn.Sequential(nn.Identity(), vit)
    for method in (ViTGradCAM(wrapped), AttentionRollout(wrapped)):
        assert isinstance(method, ViTMethod) and method.vit is vit and method.grid == (3, 3)
        assert method.blocks == list(vit.encoder.layers)
        tokens = torch.arange(2 * 9.).reshape(1, 2, 9)  # token 1 + 3i + j is patch (i, j)
        assert method.on_grid(tokens)[0, 1, 2, 0] == 9 + 6 and method.on_grid(tokens).shape == (1, 2, 3, 3)


def test_no_encoder_blocks():
    vit = tiny_vit(0)
    vit.encoder.layers = nn.Sequential()
    for Method in (ViTGradCAM, AttentionRollout):
        with pytest.raises(ValueError, match=r"no encoder blocks \(vit.encoder.layers is Sequential with 0 modules\).*at least one block"):
            Method(vit)


def test_block_index():
    vit = tiny_vit(0, num_layers=3)
    for block in (3, -4, 100):
        with pytest.raises(ValueError, match=rf"block={block} is out of range .* 3 encoder blocks.*\[-3, 2\]"):
            ViTGradCAM(vit, block=block)
    for block in ("1", 1.0, True, None):
        with pytest.raises(TypeError, match="block must be an int"):
            ViTGradCAM(vit, block=block)
    assert ViTGradCAM(vit).block == 1 and ViTGradCAM(vit, block=-3).block == 0
    with pytest.raises(ValueError, match="out of range"):
        ViTGradCAM(tiny_vit(0, num_layers=1))  # the default -2 needs two blocks


def test_wrong_image_size():
    vit = tiny_vit(0, 32)
    for method in (ViTGradCAM(vit), AttentionRollout(vit)):
        for shape in ((1, 3, 16, 16), (1, 3, 32, 24), (1, 3, 224, 224)):
            with pytest.raises(ValueError, match=r"takes 32x32 images.*Resize\(\(32, 32\)\)"):
                method(torch.rand(shape, dtype=torch.float64))
        with pytest.raises(ValueError, match="channels"):
            method(torch.rand(1, 1, 32, 32, dtype=torch.float64))


def test_bad_rollout_options():
    vit = tiny_vit(0)
    with pytest.raises(ValueError, match=r"head_fusion='median' is not one of \('mean', 'max', 'min'\)"):
        AttentionRollout(vit, head_fusion="median")
    with pytest.raises(ValueError, match=r"variant='weighted'.*targets='weighted'"):
        AttentionRollout(vit, variant="weighted")
    for ratio in (1.0, -0.1, 2, "0.9", True):
        with pytest.raises(ValueError, match=r"discard_ratio=.* must be a number in \[0, 1\)"):
            AttentionRollout(vit, discard_ratio=ratio)
    with pytest.raises(ValueError, match=r"gradient='values' is not one of \('weights', 'scores'\)"):
        AttentionRollout(vit, gradient="values")
    with pytest.raises(ValueError, match="one gradient per attention"):
        grad_rollout([torch.rand(1, 1, 3, 3)] * 2, [torch.rand(1, 1, 1, 3, 3)])


def test_attention_that_cannot_be_captured():
    class OwnAttention(nn.Module):
        def forward(self, q, k, v, need_weights=False):
            return q, None

    vit = tiny_vit(0)
    vit.encoder.layers[1].self_attention = OwnAttention()
    with pytest.raises(TypeError, match=r"encoder block 1 .*no nn.MultiheadAttention.*ViTGradCAM"):
        AttentionRollout(vit)
    ViTGradCAM(vit, block=0)(images(0, 1, 16), 0)  # GradCAM needs no attention weights
    vit = tiny_vit(0)
    vit.encoder.layers[0].self_attention = nn.MultiheadAttention(16, 2, batch_first=False).double()
    with pytest.raises(ValueError, match=r"encoder block 0's self_attention has batch_first=False.*ViTGradCAM"):
        AttentionRollout(vit)
    vit = tiny_vit(0)
    vit.encoder.layers[0].self_attention.forward = lambda *args, **kwargs: None
    with pytest.raises(ValueError, match="already has a forward patched"):
        AttentionRollout(vit)


def test_a_vit_with_a_forward_of_its_own_is_refused_by_rollout_only():
    "What such a head reads is unknown: rollout, which reads the class token's row, is refused; GradCAM's last block is not."
    class MeanHead(VisionTransformer):
        def forward(self, x):
            tokens = self.encoder(torch.cat([self.class_token.expand(len(x), -1, -1), self._process_input(x)], 1))
            return self.heads(tokens.mean(1))  # every token, the last block's patch tokens included

    torch.manual_seed(0)
    vit = MeanHead(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                   num_classes=4).double().eval()
    nn.init.normal_(vit.heads.head.weight)
    with pytest.raises(ValueError, match=r"MeanHead replaces its library's forward, so its logits are not known to "
                                         r"come from the class token alone.*ViTGradCAM"):
        AttentionRollout(vit)
    assert ViTGradCAM(vit, block=-1)(images(0, 2, 16), 1).maps.abs().amax() > 0


def test_blocks_that_run_twice_or_share_attention_are_refused():
    class Twice(nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            return self.vit(x) + self.vit(x.flip(-1))

    x = images(0, 1, 16)
    with pytest.raises(ValueError, match="attention ran 2 times in one forward pass"):
        AttentionRollout(Twice(tiny_vit(0)))(x, 0)
    with pytest.raises(ValueError, match="runs more than once per forward pass"):
        ViTGradCAM(Twice(tiny_vit(0)))(x, 0)
    vit = tiny_vit(0)
    vit.encoder.layers = nn.Sequential(vit.encoder.layers[0], vit.encoder.layers[1], vit.encoder.layers[1])
    with pytest.raises(ValueError, match="share one attention module"):
        AttentionRollout(vit)(x, 0)


# ---------------------------------------------------------------------------------------------------------------
# (c') defects=True keeps both vit-explain defects: the review's code as it is, against a line-by-line transcription

def vit_explain_code(attentions, hooked, relu=True):
    "vit-explain's grad_rollout, one image, discard ratio 0, the ReLU line optional (the review comments it out)."
    result = torch.eye(attentions[0].size(-1), dtype=torch.float64)
    for attention, grad in zip(attentions, hooked):
        fused = (attention * grad).mean(axis=1)
        if relu:
            fused[fused < 0] = 0
        a = (fused + torch.eye(fused.size(-1), dtype=torch.float64)) / 2
        a = a / a.sum(dim=-1)
        result = torch.matmul(a, result)
    return result[0, 0, 1:]


@pytest.mark.parametrize("variant", ["standard", "signed"])
def test_defects_true_is_vit_explains_code_fed_its_hooks_gradients(variant):
    "defects=True equals vit-explain's code fed dO/dS from autograd, last block first (its hooks' order); False does not."
    vit, x, t = tiny_vit(3, 16, 4, num_layers=3), images(3, 2, 16), torch.tensor([1, 3])
    scores = []
    y, attentions = manual_forward(vit, x, scores)
    objective = get_target("weighted")(y, t)
    kept = AttentionRollout(vit, variant=variant, gradient="scores", defects=True)(x, t, "weighted").maps[:, 0, 0]
    fixed = AttentionRollout(vit, variant=variant, gradient="scores")(x, t, "weighted").maps[:, 0, 0]
    L = len(attentions)
    for b in range(2):
        flat_S = [scores[l][b][k] for l in range(L) for k in range(2)]
        g = torch.autograd.grad(objective[b], flat_S, retain_graph=True)
        per_block = [torch.stack(g[2 * l:2 * l + 2])[None] for l in range(L)]  # (1, heads, N, N), forward order
        A = [torch.stack([a.detach() for a in attentions[l][b]])[None] for l in range(L)]
        want = vit_explain_code(A, per_block[::-1], relu=variant == "standard")
        torch.testing.assert_close(kept[b].flatten(), want)
        assert not torch.allclose(fixed[b].flatten(), want, rtol=1e-2, atol=0)  # the defects change the map
    method = AttentionRollout(vit, defects=True)
    assert "defects=True" in repr(method) and "defects" not in repr(AttentionRollout(vit))


def test_defects_must_be_a_bool_and_the_contrastive_rollout_is_named_right():
    import contrastive_explanations.methods.vit as vit_module
    from contrastive_explanations.methods.vit import check_rollout_options

    vit = tiny_vit(3, 16, 4)
    with pytest.raises(ValueError, match=r"defects='yes' must be True .* or False"):
        AttentionRollout(vit, defects="yes")
    with pytest.raises(ValueError, match=r"the contrastive rollout is variant='signed' with targets='weighted'"):
        check_rollout_options("mean", "contrastive", 0.0)
    summary = vit_module.__doc__
    assert "signed rollout" in summary and "standard rollout of $p_t$, ReLU kept, is not contrastive" in summary
