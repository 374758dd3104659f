"""The zoo sweep: every method on one small random model of every torchvision, timm and Hugging Face family
(tests/zoo_models.py) either equals an oracle written here from autograd alone, or refuses in one line that names
what to pass.

The oracle shares no code with the package: a plain forward hook keeps (a clone of) the layer's output and puts a
tensor hook on it for its gradient (a tensor hook registered before a later in-place operation still receives the
gradient of the value before it: see the first test), the tensor is laid out by hand (NCHW, NHWC, tokens minus the
prefix tokens into the grid), and there is one backward pass per class. The weighted target is explicit Eq. 1:
p_t (1 - p_t) (phi_t - sum_{s != t} alpha_s phi_s), alpha the softmax of the other logits. Everything runs in float64.

The table of outcomes goes to test-artifacts/zoo.txt and is printed by the last test (visible under pytest's
capture); run everything with `pytest -q tests/test_zoo.py`."""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo_models import CLASSES, ZOO, Zoo

from contrastive_explanations.methods import (AttentionRollout, FullGrad, GradCAM, Gradient, LinearApproximation,
                                              ViTGradCAM, XGradCAM)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("original", "weighted")
EXPLAINED = torch.tensor([1, 3])  # the class explained for each of the two images
ACTIVATION = {"gradcam": GradCAM, "linear_approximation": LinearApproximation, "xgradcam": XGradCAM}
METHOD_NAMES = ("GradCAM", "LinearApproximation", "XGradCAM", "ViTGradCAM", "AttentionRollout", "FullGrad",
                "Gradient")
RESULTS: dict[str, tuple[str, str, str, str]] = {}  # case id -> (model, method, outcome, detail)


# ------------------------------------------------------------------------------------------------ models and images
@functools.cache
def model_of(name: str) -> nn.Module:
    "The zoo's model `name` in float64 and eval mode, batch-norm statistics drawn at random, parameters frozen."
    entry = next(z for z in ZOO if z.name == name)
    torch.manual_seed(0)
    model = entry.build().double().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:  # else FullGrad's BN biases are all zero
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.6 - 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.cache
def images(size: int) -> Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def logits_of(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    return next(v for v in values if isinstance(v, Tensor))


def name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


# ------------------------------------------------------------------------------------------------------ the oracle
def class_gradients(model: nn.Module, x: Tensor, modules: list[nn.Module], pre: list[nn.Module] = ()):
    """One forward pass, then one backward pass per class. Returns the logits, x's gradient per class (C, B, ...),
    and for every call of every module: the module, its output's value and its gradient per class (C, B, ...). For
    the modules of `pre`, the input is captured instead (an activation's input: a pre-activation value)."""
    owners: list[nn.Module] = []
    values: list[Tensor] = []
    current: dict[int, Tensor] = {}

    def keep(module: nn.Module, t: Tensor) -> None:
        i = len(values)
        owners.append(module)
        values.append(t.detach().clone())  # the value before any later in-place operation changes it
        t.register_hook(lambda g, i=i: current.__setitem__(i, g.detach().clone()))

    handles = [m.register_forward_hook(lambda m, args, out: keep(m, first_tensor(out))) for m in modules]
    handles += [m.register_forward_pre_hook(lambda m, args: keep(m, args[0])) for m in pre]
    try:
        x = x.clone().requires_grad_(True)
        logits = logits_of(model(x))
    finally:
        for h in handles:
            h.remove()
    xgrads, grads = [], []
    for c in range(logits.shape[1]):
        current.clear()
        (gx,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)
        xgrads.append(gx)
        grads.append([current.get(i, torch.zeros_like(v)) for i, v in enumerate(values)])
    stack = [torch.stack([g[i] for g in grads]) for i in range(len(values))]
    return logits.detach(), torch.stack(xgrads), list(zip(owners, values, stack))


def grid(t: Tensor, layout: str, prefix: int = 0) -> Tensor:
    "(..., C, h, w) from a layer's output laid out as `layout`, by hand."
    if layout == "BCHW":
        return t
    if layout == "BHWC":
        return t.movedim(-1, -3)
    assert layout == "BLC", layout
    patches = t[..., prefix:, :]
    side = math.isqrt(patches.shape[-2])
    assert side * side == patches.shape[-2], f"{patches.shape[-2]} patch tokens are not a square grid"
    return patches.unflatten(-2, (side, side)).movedim(-1, -3)


def cam(method: str, A: Tensor, G: Tensor) -> Tensor:
    "(C, B, h, w): per-class maps from the activations A (B, K, h, w) and the gradients G (C, B, K, h, w)."
    if method in ("gradcam", "vit_gradcam"):
        return (G.mean((-2, -1), keepdim=True) * A).sum(-3)
    if method == "linear_approximation":
        return (G * A).sum(-3)
    assert method == "xgradcam"
    norm = A.abs().sum((-2, -1), keepdim=True)
    share = torch.where(norm > 0, A / torch.where(norm > 0, norm, 1), 0)
    return ((G * share).sum((-2, -1), keepdim=True) * A).sum(-3)


def eq1(phi: Tensor, logits: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(B, ...) maps for the targets original (phi_t) and weighted (explicit Eq. 1) from per-class maps phi (C, B, ...),
    class by class, for the classes t (B,)."""
    original, weighted = [], []
    for b, tb in enumerate(t.tolist()):
        p = logits[b].softmax(0)[tb]
        others = [s for s in range(logits.shape[1]) if s != tb]
        alpha = logits[b, others].softmax(0)
        contrast = phi[tb, b] - sum(a * phi[s, b] for a, s in zip(alpha, others))
        original.append(phi[tb, b])
        weighted.append(p * (1 - p) * contrast)
    return torch.stack(original), torch.stack(weighted)


def implicit_bias(m: nn.Module) -> Tensor | None:
    "The bias a Conv2d adds, or an eval-mode BatchNorm2d's: beta - gamma mu / sqrt(var + eps)."
    if isinstance(m, nn.Conv2d):
        return m.bias
    gamma = m.weight if m.affine else torch.ones_like(m.running_mean)
    beta = m.bias if m.affine else torch.zeros_like(m.running_mean)
    return beta - gamma * m.running_mean / torch.sqrt(m.running_var + m.eps)


def fullgrad_maps(model: nn.Module, x: Tensor):
    "(logits, (C, B, H, W)) FullGrad without normalisation, from one backward pass per class."
    layers = [m for m in model.modules()
              if isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.Conv2d) and m.bias is not None)]
    # timm's BatchNormAct2d applies its activation inside: its bias enters before it, so take the activation's input
    fused = {m.act: m for m in layers if isinstance(m, nn.BatchNorm2d) and isinstance(getattr(m, "act", None), nn.Module)}
    plain = [m for m in layers if m not in fused.values()]
    logits, gx, calls = class_gradients(model, x, plain, pre=list(fused))
    maps = (gx * x).sum(2)
    for module, _, g in calls:
        term = torch.einsum("cbkhw,k->cbhw", g, implicit_bias(fused.get(module, module)))
        maps = maps + F.interpolate(term, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits, maps


def explicit_attention(kind: str, module: nn.Module, tokens: Tensor, record: list[Tensor]):
    "The module's self-attention output recomputed from its weights, the per-head weights (B, heads, N, N) recorded."
    B, N, D = tokens.shape
    if kind == "torchvision":
        H = module.num_heads
        q, k, v = F.linear(tokens, module.in_proj_weight, module.in_proj_bias).chunk(3, -1)
        out_proj = lambda o: F.linear(o, module.out_proj.weight, module.out_proj.bias)  # noqa: E731
    elif kind == "timm":
        H = module.num_heads
        q, k, v = module.qkv(tokens).chunk(3, -1)
        out_proj = module.proj
    else:
        H = module.config.num_attention_heads if hasattr(module, "config") else module.num_heads
        q, k, v = module.q_proj(tokens), module.k_proj(tokens), module.v_proj(tokens)
        out_proj = module.o_proj
    q, k, v = (t.unflatten(-1, (H, D // H)).transpose(1, 2) for t in (q, k, v))
    if kind == "timm":
        q, k = module.q_norm(q), module.k_norm(k)
    A = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).softmax(-1)
    record.append(A)
    return out_proj((A @ v).transpose(1, 2).flatten(-2))


def attention_modules(entry: Zoo, model: nn.Module) -> list[nn.Module]:
    blocks = model.get_submodule(entry.blocks)
    name = {"torchvision": "self_attention", "timm": "attn", "hf": "attention"}[entry.attention]
    return [getattr(b, name) for b in blocks]


def rollout_oracle(entry: Zoo, model: nn.Module, x: Tensor):
    "(logits, (B, h, w) per target): gradient-weighted rollout from attention recomputed here, one backward per class."
    record: list[Tensor] = []

    def replace(m, args, out):
        new = explicit_attention(entry.attention, m, args[0], record)
        return (new, None) if isinstance(out, tuple) else new

    handles = [m.register_forward_hook(replace) for m in attention_modules(entry, model)]
    try:
        logits = logits_of(model(x.clone().requires_grad_(True)))
    finally:
        for h in handles:
            h.remove()
    G = [torch.stack(g) for g in zip(*[torch.autograd.grad(logits[:, c].sum(), record, retain_graph=True)
                                       for c in range(logits.shape[1])])]  # per block: (C, B, heads, N, N)
    t = EXPLAINED
    out = []
    for target in TARGETS:
        per_block = [eq1(g, logits.detach(), t)[TARGETS.index(target)] for g in G]  # (B, heads, N, N) each
        R = None
        for A, g in zip(record, per_block):
            fused = (A.detach() * g).mean(1).clamp(min=0)
            a = torch.eye(fused.shape[-1], dtype=fused.dtype) + fused
            a = a / a.sum(-1, keepdim=True)
            R = a if R is None else a @ R
        row = R[:, 0, entry.prefix:]
        side = math.isqrt(row.shape[-1])
        out.append(row.reshape(-1, side, side))
    return logits.detach(), out


@functools.cache
def captures(name: str, layer: str | None):
    "One forward and one backward per class of model `name`, capturing `layer` ('fullgrad': FullGrad's layers)."
    model, x = model_of(name), images(next(z for z in ZOO if z.name == name).size)
    if layer == "fullgrad":
        return fullgrad_maps(model, x)
    return class_gradients(model, x, [] if layer is None else [model.get_submodule(layer)])


@functools.cache
def oracle(name: str, method: str, layer: str | None, layout: str) -> tuple[Tensor, Tensor, float]:
    """(original, weighted, bound), maps (B, h, w) of `method` at `layer` of model `name`, from autograd alone; `bound`
    is the largest map made of absolute values (|A|, |G|): the size of the terms the map sums, for the tolerance."""
    entry = next(z for z in ZOO if z.name == name)
    if method == "attention_rollout":
        original, weighted = rollout_oracle(entry, model_of(name), images(entry.size))[1]
        return original, weighted, 1.0
    if method == "fullgrad":
        logits, phi = captures(name, "fullgrad")
        return (*eq1(phi, logits, EXPLAINED), phi.abs().max().item())
    logits, gx, calls = captures(name, None if method == "gradient" else layer)
    if method == "gradient":
        return (*eq1(gx.sum(2), logits, EXPLAINED), gx.abs().sum(2).max().item())
    assert len(calls) == 1, f"{layer} ran {len(calls)} times"
    _, A, G = calls[0]
    A, G = grid(A, layout, entry.prefix), grid(G, layout, entry.prefix)
    phi = cam(method, A, G)
    return (*eq1(phi, logits, EXPLAINED), cam(method, A.abs(), G.abs()).max().item())


# ------------------------------------------------------------------------------------------------------ the sweep
def cases() -> list[tuple[str, str]]:
    out = []
    for z in ZOO:
        methods = ["gradient", *ACTIVATION]
        if z.fullgrad:
            methods.append("fullgrad")
        if z.blocks:
            methods.append("vit_gradcam")
        if z.attention:
            methods.append("attention_rollout")
        out += [(z.name, m) for m in methods]
    return out


def build_method(method: str, model: nn.Module, layer: str | None):
    if method == "gradient":
        return Gradient(model)
    if method == "fullgrad":
        return FullGrad(model, normalise=False)
    if method == "vit_gradcam":
        return ViTGradCAM(model)
    if method == "attention_rollout":
        return AttentionRollout(model)
    return ACTIVATION[method](model, layer)


def refusal(err: Exception) -> str:
    "The error's message, if it is a one-line refusal that names what to pass; else the test fails (a crash)."
    msg = str(err)
    assert isinstance(err, (ValueError, TypeError)), f"crash, not a refusal: {type(err).__name__}: {msg}"
    assert "\n" not in msg.strip(), f"a refusal is one line, got: {msg}"
    names = re.search(r"\b[a-z_]+=", msg) or any(re.search(rf"\b{m}\b", msg) for m in METHOD_NAMES)
    assert names, f"the refusal does not name what to pass (an argument= or a method): {msg}"
    return msg


def compare(ours: Tensor, expected: Tensor, bound: float, what: str, rtol: float = 1e-9) -> None:
    """Equal to the oracle up to rounding: within `rtol` of the size of the terms the map sums (`bound`), so that a
    map that cancels to rounding noise is compared as what it is."""
    assert ours.shape == expected.shape, f"{what}: maps of shape {tuple(ours.shape)}, oracle {tuple(expected.shape)}"
    torch.testing.assert_close(ours, expected, rtol=0, atol=rtol * bound + 1e-300, msg=lambda m: f"{what}: {m}")


def check_case(entry: Zoo, method: str) -> tuple[str, str]:
    "Run `method` on the entry's model (default layer, then the table's layer if refused): (outcome, detail)."
    model, x = model_of(entry.name), images(entry.size)
    layers = [None] + ([entry.layer] if method in ACTIVATION and entry.layer else [])
    refused = []
    for layer in layers:
        try:
            explainer = build_method(method, model, layer)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                e = explainer(x, EXPLAINED, list(TARGETS))
        except (AssertionError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - judged by refusal(): a one-line error naming what to pass
            refused.append(f"{'default' if layer is None else layer}: {refusal(err)}")
            continue
        where = name_of(model, explainer.layer) if method in ACTIVATION or method == "vit_gradcam" else None
        if method == "vit_gradcam":  # the block the package reads: its default, block=-2
            assert explainer.layer is list(model.get_submodule(entry.blocks))[-2], f"ViTGradCAM reads {where}"
        *expected, bound = oracle(entry.name, method, where, "BLC" if method == "vit_gradcam" else entry.layout)
        # Hugging Face's eager attention, the one that returns its weights, takes its softmax in float32
        rtol = 1e-6 if method == "attention_rollout" and entry.source == "hf" else 1e-9
        for k, target in enumerate(TARGETS):
            compare(e.maps[:, 0, k], expected[k], bound, f"{entry.name} {method} at {where or 'input'} ({target})", rtol)
        zero = [t for k, t in enumerate(TARGETS) if (e.maps[:, 0, k] == 0).all()]
        detail = f"layer {where}" if where else ""
        if max(m.abs().max().item() for m in expected) < 1e-6 * bound:  # the terms cancel: exactly zero in theory
            detail += f"; NEAR-ZERO maps (largest {max(m.abs().max().item() for m in expected):.1e}, terms {bound:.1e})"
        if layer is not None:
            detail += f" (default refused: {refused[0]})"
        if zero:
            warned = [str(w.message) for w in caught if "zero" in str(w.message).lower()]
            detail += f"; ALL-ZERO maps for {zero}" + ("" if warned else ", no warning")
            assert warned, f"{entry.name} {method}: all-zero maps for {zero} at {where} and no warning says so"
        return "covered", detail
    return "refused", " | ".join(refused)


def test_tensor_hook_receives_the_gradient_before_a_later_inplace_op():
    "The oracle's capture: a tensor hook registered before relu_() gets d out / d (the value before relu_)."
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    seen = []
    y = x * 3
    y.register_hook(seen.append)
    out = (y.relu_() * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()
    out.backward()
    assert torch.equal(seen[0], torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64))  # relu's mask: before in-place
    assert torch.equal(x.grad, 3 * seen[0])


def test_the_zoo_has_40_architectures_of_every_source():
    assert len(ZOO) >= 40 and len({z.name for z in ZOO}) == len(ZOO)
    assert {z.source for z in ZOO} == {"torchvision", "timm", "hf"}


@pytest.mark.parametrize("name,method", cases(), ids=[f"{n}-{m}" for n, m in cases()])
def test_zoo(name, method):
    entry = next(z for z in ZOO if z.name == name)
    try:
        outcome, detail = check_case(entry, method)
    except AssertionError as err:
        RESULTS[f"{name}-{method}"] = (name, method, "FAILED", str(err).splitlines()[0][:200])
        raise
    RESULTS[f"{name}-{method}"] = (name, method, outcome, detail)


def test_reading_swin_channels_last_as_nchw_is_caught():
    "Mutation: the same check with Swin's NHWC output read as NCHW fails, so a package misreading it cannot pass."
    for name in ("torchvision:swin", "timm:swin"):
        entry = next(z for z in ZOO if z.name == name)
        check_case(entry, "gradcam")  # the right layout passes
        with pytest.raises(AssertionError, match="maps|Tensor-likes"):
            check_case(dataclasses.replace(entry, layout="BCHW"), "gradcam")
        model, x = model_of(name), images(entry.size)  # and the package told to read NCHW (the old misreading) fails
        misread = GradCAM(model, entry.layer, layout="BCHW")(x, EXPLAINED, list(TARGETS)).maps[:, 0, 0]
        *expected, bound = oracle(name, "gradcam", entry.layer, "BHWC")
        with pytest.raises(AssertionError, match="maps|Tensor-likes"):
            compare(misread, expected[0], bound, f"{name} read as NCHW")


def test_zoo_summary(capsys):
    "The table of outcomes (also test-artifacts/zoo.txt) and the counts; run last, after the sweep."
    expected = {f"{n}-{m}" for n, m in cases()}
    if not expected <= RESULTS.keys():
        pytest.skip("the sweep did not run in full in this session")
    rows = [RESULTS[k] for k in sorted(expected)]
    lines = [f"{'model':34s} {'method':22s} outcome", *(f"{m:34s} {meth:22s} {o}  {d}" for m, meth, o, d in rows)]
    counts = {o: sum(r[2] == o for r in rows) for o in ("covered", "refused", "FAILED")}
    models = len({r[0] for r in rows})
    lines.append(f"{models} architectures, {len(rows)} cases: {counts['covered']} covered, {counts['refused']} "
                 f"refused, {counts['FAILED']} failed")
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "zoo.txt").write_text("\n".join(lines) + "\n")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert models >= 40 and counts["FAILED"] == 0
