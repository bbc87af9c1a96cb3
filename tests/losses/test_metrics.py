import pytest
import torch

from blockyard.losses import accuracy, iou, topk_accuracy


def test_topk_accuracy_matches_naive_count():
    scores = torch.randn(50, 10)
    target = torch.randint(0, 10, (50,))
    for k in (1, 3, 10):
        hits = 0
        for b in range(50):
            order = sorted(range(10), key=lambda c: -float(scores[b, c]))
            hits += int(target[b]) in order[:k]
        torch.testing.assert_close(topk_accuracy(scores, target, k=k), torch.tensor(hits / 50))
    assert topk_accuracy(scores, target, k=10) == 1.0
    assert torch.equal(accuracy(scores, target, reduction="none"), (scores.argmax(1) == target).float())


def test_iou_values():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    a[..., :2, :] = True  # 8 pixels
    b[..., 1:3, :] = True  # 8 pixels, 4 shared
    torch.testing.assert_close(iou(a, b), torch.tensor(4 / 12), atol=1e-6, rtol=0)
    torch.testing.assert_close(iou(a & False, b & False), torch.tensor(1.0))



def naive_iou(pred, target, eps=1e-6):
    """Mean over (sample, channel) of (|P & T| + eps) / (|P | T| + eps), counted pixel by pixel."""
    ratios = []
    for b in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            p, t = pred[b, c].flatten().tolist(), target[b, c].flatten().tolist()
            inter = sum(1 for u, v in zip(p, t) if u and v)
            union = sum(1 for u, v in zip(p, t) if u or v)
            ratios.append((inter + eps) / (union + eps))
    return sum(ratios) / len(ratios)


def test_iou_is_per_sample_and_channel_then_averaged():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 2, 6, 5, generator=gen) > 0.5
    target = torch.rand(2, 2, 6, 5, generator=gen) > 0.5
    pred[0, 0], target[0, 0] = False, False  # an empty slice scores 1
    target[1, 1] = pred[1, 1]  # a perfect slice, 1 as well
    pred[0, 1, :, 1:], target[0, 1, :, :4] = False, True  # a small prediction in a large target
    got = iou(pred, target)
    expected = naive_iou(pred, target)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    # the value pooled over the batch (per channel, or over everything) is clearly another one
    per_channel_pooled = naive_iou(pred.transpose(0, 1).reshape(1, 2, -1), target.transpose(0, 1).reshape(1, 2, -1))
    pooled = naive_iou(pred.reshape(1, 1, -1), target.reshape(1, 1, -1))
    assert abs(expected - per_channel_pooled) > 0.05 and abs(expected - pooled) > 0.05
    # with 0/1 floats instead of bools: the same
    torch.testing.assert_close(iou(pred.float(), target.float()), got)


def test_bad_input():
    with pytest.raises(ValueError, match="scores: expected"):
        topk_accuracy(torch.randn(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="k: expected"):
        topk_accuracy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), k=5)
    with pytest.raises(ValueError, match="pred: expected"):
        iou(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 4))
