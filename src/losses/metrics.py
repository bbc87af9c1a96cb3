"""Batched evaluation metrics, computed in float32 and returned as tensors (no host syncs)."""
from __future__ import annotations

import torch

__all__ = ["accuracy", "iou", "topk_accuracy"]


def topk_accuracy(scores: torch.Tensor, target: torch.Tensor, k: int = 1,
                  reduction: str = "mean") -> torch.Tensor:
    """Fraction of rows whose target is among the ``k`` highest scores.

    Ties are broken by :func:`torch.topk`. Flatten spatial maps first to rank pixels
    (``scores.flatten(1)`` with ``target = y * W + x``).

    Args:
        scores: per-class scores (logits or probabilities).
        target: integer class of each row.
        k: number of top classes that count as a hit.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (a float per row, 1.0 for a hit).

    Shapes:
        - scores: ``(B, C)``
        - target: ``(B,)``
        - output: scalar, or ``(B,)`` with ``reduction="none"``
    """
    if scores.dim() != 2:
        raise ValueError(f"scores: expected (B, C), got {tuple(scores.shape)}")
    if target.shape != scores.shape[:1]:
        raise ValueError(f"target: expected ({scores.shape[0]},), got {tuple(target.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= {scores.shape[1]}, got {k}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    top = scores.topk(k, dim=1).indices
    hit = (top == target[:, None].long()).any(dim=1).float()
    return hit.mean() if reduction == "mean" else hit


def accuracy(scores: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Top-1 accuracy: :func:`topk_accuracy` with ``k=1``. Shapes as there."""
    return topk_accuracy(scores, target, k=1, reduction=reduction)


def iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Intersection over union of binary maps, per sample and channel, averaged.

    .. math:: \mathrm{IoU} = \frac{|P \cap T| + \epsilon}{|P \cup T| + \epsilon}

    so two empty maps score 1.

    Args:
        pred: bool (or 0/1) prediction.
        target: bool (or 0/1) ground truth.
        eps: smoothing of both terms.

    Shapes:
        - pred, target: ``(B, C, *spatial)``
        - output: scalar
    """
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)} with rank >= 2, "
                         f"got {tuple(pred.shape)}")
    p, t = pred.bool().flatten(2), target.bool().flatten(2)
    inter = (p & t).sum(-1).float()
    union = (p | t).sum(-1).float()
    return ((inter + eps) / (union + eps)).mean()
