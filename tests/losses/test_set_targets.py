import math

import pytest
import torch

from blockyard.losses import gaussian_heatmap, set_cross_entropy, wta_heatmap_loss, wta_set_heatmap_loss


def naive_wta_set(logits, weights, mask):
    """Float64 loops over sample, hypothesis and pixel; returns (loss, per_hypothesis)."""
    b_n, k_n, h, w = logits.shape
    per = torch.zeros(b_n, k_n, dtype=torch.float64)
    best, used = [], 0
    for b in range(b_n):
        total = float(weights[b].double().sum())
        if total == 0:
            continue
        used += 1
        for k in range(k_n):
            vals, targets = [], []
            for y in range(h):
                for x in range(w):
                    if mask is None or not mask[b, y, x] or weights[b, y, x] > 0:
                        vals.append(float(logits[b, k, y, x]))
                        targets.append(float(weights[b, y, x]) / total)
            top = max(vals)
            lse = math.log(sum(math.exp(v - top) for v in vals)) + top
            per[b, k] = -sum(t * (v - lse) for t, v in zip(targets, vals))
        best.append(float(per[b].min()))
    return (sum(best) / used if used else 0.0), per


def naive_set_ce(logits, weights, s):
    b_n, c_n, h, w = logits.shape
    losses = []
    for b in range(b_n):
        num = den = 0.0
        for y in range(h):
            for x in range(w):
                row = [float(v) for v in logits[b, :, y, x]]
                top = max(row)
                lse = math.log(sum(math.exp(v - top) for v in row)) + top
                for c in range(c_n):
                    wt = float(weights[b, c, y, x])
                    if wt == 0:
                        continue
                    ce = -(1 - s) * (row[c] - lse) - s / c_n * sum(v - lse for v in row)
                    num += wt * ce
                    den += wt
        if den > 0:
            losses.append(num / den)
    return sum(losses) / len(losses) if losses else 0.0


def sparse_weights(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(1, 5, shape, generator=g).float() * (torch.rand(shape, generator=g) < density)
    w[-1] = 0  # the last sample has no answer at all
    return w


@pytest.mark.parametrize("with_mask", [False, True])
def test_wta_set_matches_naive_loop(with_mask):
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, 6) * 3
    weights = sparse_weights((4, 5, 6), 0.2, 1)
    mask = (torch.rand(4, 5, 6) > 0.5) if with_mask else None
    out = wta_set_heatmap_loss(logits, weights, mask)
    ref_loss, ref_per = naive_wta_set(logits, weights, mask)
    torch.testing.assert_close(out.per_hypothesis.double(), ref_per, atol=1e-4, rtol=1e-5)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert out.best[:3].tolist() == ref_per[:3].argmin(1).tolist()


def test_wta_set_equals_wta_heatmap_loss_on_a_gaussian_target():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 7, 6)
    centers = torch.tensor([[0, 5], [3, 2], [6, 0]])
    mask = torch.rand(3, 7, 6) > 0.5
    ref = wta_heatmap_loss(logits, centers, mask, sigma=1.5)
    out = wta_set_heatmap_loss(logits, gaussian_heatmap(centers, (7, 6), 1.5, mask), mask)
    torch.testing.assert_close(out.per_hypothesis, ref.per_hypothesis)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.diversity, ref.diversity)


def test_wta_set_scale_of_weights_is_irrelevant_and_empty_samples_get_no_gradient():
    logits = torch.randn(3, 2, 4, 4, requires_grad=True)
    weights = sparse_weights((3, 4, 4), 0.4, 2)
    a = wta_set_heatmap_loss(logits, weights)
    b = wta_set_heatmap_loss(logits, 7.5 * weights)
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    assert logits.grad[-1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    only = wta_set_heatmap_loss(logits[:2], weights[:2])  # the empty sample does not dilute the mean
    torch.testing.assert_close(only.loss, a.loss)
    torch.testing.assert_close(only.diversity, a.diversity)  # nor the hypotheses' usage
    none = wta_set_heatmap_loss(logits, torch.zeros(3, 4, 4))
    assert none.loss.item() == 0.0 and none.diversity.item() == 0.0 and none.loss.requires_grad


def test_wta_set_is_minimised_by_the_set_distribution():
    """The loss of a softmax equal to the normalised weights is the entropy of the target, the minimum."""
    weights = torch.zeros(1, 3, 3)
    weights[0, 0, 0], weights[0, 2, 1] = 1.0, 3.0
    target = weights / weights.sum()
    logits = torch.where(target > 0, target.clamp_min(1e-30).log(), torch.full_like(target, -60.0))[:, None]
    out = wta_set_heatmap_loss(logits, weights)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert out.loss.item() == pytest.approx(entropy, abs=1e-5)
    one_hot = torch.full((1, 1, 3, 3), -60.0)
    one_hot[0, 0, 2, 1] = 0.0  # all mass on the heavier answer: worse
    assert wta_set_heatmap_loss(one_hot, weights).loss.item() > entropy + 1.0


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_set_cross_entropy_matches_naive_loop(smoothing):
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 4, 3) * 2
    weights = sparse_weights((3, 5, 4, 3), 0.15, 4)
    out = set_cross_entropy(logits, weights, label_smoothing=smoothing)
    assert out.item() == pytest.approx(naive_set_ce(logits, weights, smoothing), rel=1e-5)


def test_set_cross_entropy_with_one_answer_is_plain_cross_entropy_and_bf16_is_float32():
    torch.manual_seed(4)
    logits = torch.randn(4, 6, 5, 5)
    cls, ys, xs = torch.tensor([0, 5, 2, 3]), torch.tensor([0, 4, 2, 1]), torch.tensor([4, 0, 2, 3])
    weights = torch.zeros(4, 6, 5, 5)
    weights[torch.arange(4), cls, ys, xs] = 1.0
    ref = torch.nn.functional.cross_entropy(logits[torch.arange(4), :, ys, xs], cls, label_smoothing=0.1)
    torch.testing.assert_close(set_cross_entropy(logits, weights, label_smoothing=0.1), ref)
    half = set_cross_entropy(logits.bfloat16(), weights.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(set_cross_entropy(logits.bfloat16().float(), weights).item(), rel=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda: wta_set_heatmap_loss(torch.randn(2, 3, 4, 4), torch.ones(2, 4, 5)), ValueError,
     r"weights: expected \(2, 4, 4\)"),
    (lambda: wta_set_heatmap_loss(torch.randn(2, 3, 4), torch.ones(2, 4, 4)), ValueError, "logits: expected"),
    (lambda: wta_set_heatmap_loss(torch.randn(2, 3, 4, 4), -torch.ones(2, 4, 4)), ValueError, "non-negative"),
    (lambda: wta_set_heatmap_loss(torch.randn(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.long)), TypeError,
     "weights: expected a floating"),
    (lambda: wta_set_heatmap_loss(torch.randn(2, 3, 4, 4), torch.ones(2, 4, 4), torch.ones(2, 4, 3).bool()),
     ValueError, "mask: expected"),
    (lambda: set_cross_entropy(torch.randn(2, 3, 4, 4), torch.ones(2, 3, 4)), ValueError, "weights: expected"),
    (lambda: set_cross_entropy(torch.randn(2, 3, 4, 4), torch.ones(2, 3, 4, 4), 1.5), ValueError, "label_smoothing"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
