"""Properties of the contrastive targets (nbs/01_targets.ipynb), on random networks and logits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive_explanations.methods.targets import (TARGETS, MaxTarget, MeanTarget, OriginalTarget, Target,
                                                      WeightedLogTarget, WeightedTarget, as_classes, check_later,
                                                      deferred_checks, explicit_contrast, get_target,
                                                      other_class_weights)


def per_class_gradients(net, x, C):
    "phi[b, s] = d y_s / d x_b: the explicit side of every identity, one backward pass per class."
    y = net(x)
    return y.detach(), torch.stack([torch.autograd.grad(y[:, s].sum(), x, retain_graph=True)[0] for s in range(C)], 1)


@st.composite
def problems(draw):
    "A random float64 MLP, a batch of inputs and one random class per sample."
    C, B, D = draw(st.integers(2, 12)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    net = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)).double()
    x = (3 * torch.randn(B, D, dtype=torch.float64)).requires_grad_(True)
    t = torch.tensor(draw(st.lists(st.integers(0, C - 1), min_size=B, max_size=B)))
    return net, x, t, C


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(list(TARGETS)))
def test_one_backward_equals_scaled_explicit_contrast(problem, name):
    "Eq. eq-target-identity: grad target = scale * sum_s w_s grad y_s, for every target."
    net, x, t, C = problem
    target = TARGETS[name]
    y, phi = per_class_gradients(net, x, C)
    (grad,) = torch.autograd.grad(target(net(x), t).sum(), x)
    expected = target.scale(y, t)[:, None] * explicit_contrast(phi, target.weights(y, t))
    torch.testing.assert_close(grad, expected)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_softmax_gradient_is_the_weighted_contrast(problem):
    "Eqs. eq-grad-pt and eq-grad-logpt with alpha, p_t and the scale factors computed here, not by the library."
    net, x, t, C = problem
    y, phi = per_class_gradients(net, x, C)
    rows = torch.arange(len(t))
    p_t = y.softmax(1)[rows, t][:, None]
    others = torch.ones_like(y, dtype=torch.bool)
    others[rows, t] = False
    alpha = torch.where(others, y.exp(), 0) / torch.where(others, y.exp(), 0).sum(1, keepdim=True)
    contrast = phi[rows, t] - (alpha[:, :, None] * phi).sum(1)
    (g_p,) = torch.autograd.grad(WeightedTarget()(net(x), t).sum(), x)
    (g_log,) = torch.autograd.grad(WeightedLogTarget()(net(x), t).sum(), x)
    torch.testing.assert_close(g_p, p_t * (1 - p_t) * contrast)
    torch.testing.assert_close(g_log, (1 - p_t) * contrast)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 50), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(0.1, 30))
def test_contrast_weights(C, B, seed, spread):
    "Contrast weights sum to 0 (original: 1); alpha is a distribution over the other classes, p_s / (1 - p_t)."
    g = torch.Generator().manual_seed(seed)
    y = spread * torch.randn(B, C, generator=g, dtype=torch.float64)
    t = torch.randint(C, (B,), generator=g)
    rows = torch.arange(B)
    for name, target in TARGETS.items():
        w = target.weights(y, t)
        assert w.shape == (B, C) and not w.requires_grad
        torch.testing.assert_close(w.sum(1), torch.full((B,), float(name == "original"), dtype=y.dtype))
        assert torch.all(w[rows, t] == 1)
    alpha = other_class_weights(y, t)
    assert torch.all(alpha[rows, t] == 0) and torch.all(alpha >= 0)
    p = y.softmax(1)
    mask = torch.ones_like(alpha, dtype=torch.bool)
    mask[rows, t] = False
    rest = torch.where(mask, p, 0).sum(1, keepdim=True)  # 1 - p_t, without the cancellation when p_t ~ 1
    torch.testing.assert_close(alpha[mask], (p / rest)[mask])
    mean = MeanTarget().weights(y, t)
    torch.testing.assert_close(mean[mask], torch.full_like(mean[mask], -1 / (C - 1)))
    rival = MaxTarget().weights(y, t).argmin(1)
    assert torch.all(y[rows, rival] == torch.where(mask, y, -torch.inf).max(1).values)


def test_targets_on_a_hand_computed_example():
    "Exact values for y = (log 1, log 2, log 1): p = (1/4, 1/2, 1/4)."
    y = torch.log(torch.tensor([[1.0, 2.0, 1.0]], dtype=torch.float64))
    t = torch.tensor([0])
    assert WeightedTarget()(y, t).item() == pytest.approx(0.25)
    assert WeightedLogTarget()(y, t).item() == pytest.approx(torch.log(torch.tensor(0.25)).item())
    assert WeightedTarget().scale(y, t).item() == pytest.approx(0.25 * 0.75)
    assert WeightedLogTarget().scale(y, t).item() == pytest.approx(0.75)
    assert WeightedTarget().weights(y, t)[0].tolist() == pytest.approx([1, -2 / 3, -1 / 3])
    assert MeanTarget().weights(y, t)[0].tolist() == pytest.approx([1, -0.5, -0.5])
    assert MaxTarget().weights(y, t).tolist() == [[1, -1, 0]]
    assert OriginalTarget()(y, t).item() == 0
    assert MeanTarget()(y, t).item() == pytest.approx(-0.5 * torch.log(torch.tensor(2.0)).item())


def test_per_sample_classes_match_separate_calls():
    "A batch with a different class per sample gives what one call per sample gives."
    y = torch.randn(4, 6)
    t = torch.tensor([5, 0, 2, 2])
    for target in TARGETS.values():
        batched = target(y, t)
        single = torch.cat([target(y[i : i + 1], int(t[i])) for i in range(4)])
        torch.testing.assert_close(batched, single)


def test_saturated_softmax_stays_finite_and_signed():
    "Near p_t = 1 in float32 the gradients underflow towards zero but never become NaN or flip sign."
    y = torch.tensor([[40.0, 0.0, -5.0], [0.0, 1.0, 0.5]], requires_grad=True)
    for target in (WeightedTarget(), WeightedLogTarget()):
        (g,) = torch.autograd.grad(target(y, torch.tensor([0, 1])).sum(), y)
        assert torch.isfinite(g).all()
        assert torch.all(g[:, [0, 1]].diagonal() >= 0)


def test_get_target():
    assert isinstance(get_target("weighted"), WeightedTarget)
    custom = MaxTarget()
    assert get_target(custom) is custom
    with pytest.raises(ValueError, match="unknown target 'softmax'.*original, mean, max, weighted, weighted_log"):
        get_target("softmax")


@pytest.mark.parametrize("logits, t, error, message", [
    (torch.randn(2, 5), torch.tensor([0.0, 1.0]), TypeError, "class indices must be integers"),
    (torch.randn(2, 5), torch.tensor([0, 5]), ValueError, r"must lie in \[0, 5\)"),
    (torch.randn(2, 5), torch.tensor([-1, 0]), ValueError, r"must lie in \[0, 5\)"),
    (torch.randn(2, 5), torch.tensor([0, 1, 2]), ValueError, r"one class per sample, shape \(2,\)"),
    (torch.randn(2, 5), torch.tensor([[0, 1]]), ValueError, r"one class per sample"),
    (torch.randn(2, 5, 1), torch.tensor([0, 1]), ValueError, r"shape \(batch, classes\)"),
    (torch.randint(5, (2, 5)), torch.tensor([0, 1]), ValueError, r"floating tensor"),
    ([[0.1, 0.2]], 0, ValueError, r"floating tensor.*got list"),
    (torch.randn(2, 1), torch.tensor([0, 0]), ValueError, "at least 2 classes"),
    (torch.randn(2, 5), torch.tensor([True, False]), TypeError, "integers"),
])
def test_bad_input_is_refused_with_a_clear_message(logits, t, error, message):
    for target in TARGETS.values():
        for call in (target, target.weights, target.scale):
            with pytest.raises(error, match=message):
                call(logits, t)


def test_explicit_contrast_checks_shapes():
    with pytest.raises(ValueError, match=r"phi must start with the weights' shape \(batch, classes\) = \(2, 3\)"):
        explicit_contrast(torch.randn(2, 4, 7), torch.randn(2, 3))
    phi, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3)
    torch.testing.assert_close(explicit_contrast(phi, w), (w[:, :, None, None] * phi).sum(1))


def test_as_classes_broadcasts_an_int():
    assert as_classes(3, torch.randn(4, 5)).tolist() == [3, 3, 3, 3]
    assert isinstance(TARGETS["max"], Target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_logit_gap_of_100_keeps_the_target_class_in_the_contrast(dtype):
    "1 - p_t ~ 5e-44 rounds to 0 as 1 - softmax; the margin form keeps it, so grad y_t stays in the contrast."
    y = torch.tensor([[100.0, 0.0, -1.0]], dtype=dtype, requires_grad=True)
    rest = torch.tensor([0.0, -1.0], dtype=torch.float64).sub(100).exp()  # exp(y_s - y_t), s != t
    one_minus_p = (rest.sum() / (1 + rest.sum())).item()
    assert 1 - y.detach().double().softmax(1)[0, 0].item() == 0  # the cancellation this guards against
    (g,) = torch.autograd.grad(WeightedLogTarget()(y, 0).sum(), y)
    assert torch.isfinite(g).all()
    rel = 0.05 if dtype == torch.float32 else 1e-9  # float32 holds 5e-44 only as a subnormal, with few bits
    assert g[0, 0].item() == pytest.approx(one_minus_p, rel=rel, abs=0)
    assert g[0, 1:].double().tolist() == pytest.approx((-rest / (1 + rest.sum())).tolist(), rel=rel, abs=0)
    assert WeightedLogTarget().scale(y.detach(), 0).item() == pytest.approx(one_minus_p, rel=rel, abs=0)


# ---- value checks read later (the GPU path, exercised on the CPU with include_cpu=True) ----------------------------

def test_check_later_reads_at_once_outside_a_block():
    with pytest.raises(ValueError, match="bad"):
        check_later(torch.tensor(False), lambda: ValueError("bad"))
    assert check_later(torch.tensor(True), lambda: ValueError("bad")) is False


def test_a_cpu_verdict_is_read_at_once_even_inside_a_block():
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\), got values from 1 to 7"):
        with deferred_checks():
            as_classes(torch.tensor([1, 7]), torch.randn(2, 5))
            pytest.fail("a CPU verdict should have been read at once")


def test_a_deferred_class_check_clamps_until_the_end_of_the_block():
    reached = []
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\), got values from -2 to 7"):  # the values as given
        with deferred_checks(include_cpu=True):
            t = as_classes(torch.tensor([-2, 7, 3]), torch.randn(3, 5))
            reached.append(t.tolist())
    assert reached == [[0, 4, 3]]  # in bounds for the computation, and the block ran to its end


def test_deferred_checks_raise_the_first_failure_and_only_once_per_block():
    with pytest.raises(ValueError, match="first"):
        with deferred_checks(include_cpu=True):
            assert check_later(torch.tensor(True), lambda: ValueError("passed"))
            check_later(torch.tensor(False), lambda: ValueError("first"))
            with deferred_checks():  # nested blocks join the outermost
                check_later(torch.tensor(False), lambda: ValueError("second"))
    with deferred_checks(include_cpu=True):  # all pass: nothing raised, and the queue does not leak into the next
        check_later(torch.tensor(True), lambda: ValueError("never"))
    assert check_later(torch.tensor(True), lambda: ValueError("never")) is False


def test_a_failed_check_explains_an_error_it_caused():
    with pytest.raises(ValueError, match="the real cause") as info:
        with deferred_checks(include_cpu=True):
            check_later(torch.tensor(False), lambda: ValueError("the real cause"))
            raise RuntimeError("a consequence")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="unrelated"):  # with every check passing, the block's own error stands
        with deferred_checks(include_cpu=True):
            check_later(torch.tensor(True), lambda: ValueError("never"))
            raise RuntimeError("unrelated")


def test_the_reviews_softmax_target_loses_the_class_term_where_p_t_rounds_to_one():
    from contrastive_explanations.methods.targets import REVIEW_TARGETS, TARGETS

    review = REVIEW_TARGETS["weighted_softmax"]
    assert "weighted_softmax" not in TARGETS  # named for the comparisons, not offered in the menus
    y = torch.tensor([[25.0, 1.0, -2.0, 0.0], [1.0, 0.8, -0.5, 0.2]], requires_grad=True)
    t = torch.tensor([0, 0])
    grad = torch.autograd.grad(review(y, t).sum(), y)[0]
    assert torch.equal(grad, review.weights(y, t) * review.scale(y, t)[:, None])
    ours = TARGETS["weighted"]
    exact = ours.weights(y.double(), t) * ours.scale(y.double(), t)[:, None]
    assert grad[0, 0] == 0 and exact[0, 0] > 0  # saturated: the review's keeps the rivals only
    assert torch.allclose(grad[1].double(), exact[1], rtol=1e-5)  # unsaturated: the same gradient
