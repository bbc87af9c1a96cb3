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


def test_bad_input():
    with pytest.raises(ValueError, match="scores: expected"):
        topk_accuracy(torch.randn(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="k: expected"):
        topk_accuracy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), k=5)
    with pytest.raises(ValueError, match="pred: expected"):
        iou(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 4))
