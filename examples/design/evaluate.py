"""Scores of the design stages: structure maps (encoder) and metadata and grammar (abstractor).

Row-wise so that evaluation can be sharded over ranks (``blockyard.train.predict_rows`` gathers
rows) and then reduced once: :func:`structure_rows` gives per-design numbers of a predicted hard F
against the truth, :func:`structure_scores` reduces them to the reported metrics.
"""
from __future__ import annotations

import torch

from blockyard.losses import iou

__all__ = ["STRUCTURE_ROWS", "metadata_scores", "structure_rows", "structure_scores"]

#: Columns of :func:`structure_rows`.
STRUCTURE_ROWS = ("text_iou", "image_iou", "color_correct", "fg_correct", "fg_pixels", "hierarchy_se")


def structure_rows(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-design scores of a predicted hard F against the true one, columns :data:`STRUCTURE_ROWS`.

    ``text_iou``, ``image_iou``: :func:`blockyard.losses.iou` of the design's mask (two empty masks
    score 1); ``color_correct``: the fraction of its pixels with the right colour class;
    ``fg_correct`` and ``fg_pixels``: correct and total pixels whose true class is not the
    background; ``hierarchy_se``: the mean squared hierarchy error over its pixels.

    Shapes:
        - pred, target: ``(B, 4, H, W)`` hard F (text, image, colour id, hierarchy)
        - output: ``(B, 6)`` float32
    """
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 4:
        raise ValueError(f"pred: expected target's shape (B, 4, H, W) = {tuple(target.shape)}, got {tuple(pred.shape)}")
    masks_p, masks_t = pred[:, :2] > 0.5, target[:, :2] > 0.5
    ious = torch.stack([torch.stack([iou(masks_p[b:b + 1, c:c + 1], masks_t[b:b + 1, c:c + 1]) for c in range(2)])
                        for b in range(pred.shape[0])])
    correct = pred[:, 2].round() == target[:, 2].round()
    fg = target[:, 2].round() != 0
    return torch.stack([ious[:, 0], ious[:, 1], correct.float().mean((1, 2)), (correct & fg).float().sum((1, 2)),
                        fg.float().sum((1, 2)), (pred[:, 3].float() - target[:, 3].float()).square().mean((1, 2))],
                       dim=1)


def structure_scores(rows: torch.Tensor) -> dict[str, float]:
    """The reported metrics from :func:`structure_rows` of every held-out design.

    Means over designs, except ``color_accuracy_fg``: correct over all non-background pixels.
    """
    col = {name: rows[:, k].double() for k, name in enumerate(STRUCTURE_ROWS)}
    return {"text_iou": float(col["text_iou"].mean()), "image_iou": float(col["image_iou"].mean()),
            "color_accuracy": float(col["color_correct"].mean()),
            "color_accuracy_fg": float(col["fg_correct"].sum() / col["fg_pixels"].sum().clamp_min(1)),
            "hierarchy_mse": float(col["hierarchy_se"].mean())}



def metadata_scores(out, goal: torch.Tensor, format: torch.Tensor, tone: torch.Tensor, grammar: torch.Tensor) -> dict:
    """Goal and format accuracy (arg-max), tone MSE and per-dimension grammar MAE of ``out`` against the truth.

    Shapes:
        - out: an ``AbstractorOutput`` (``goal (N, 10)`` and ``format (N, 4)`` logits, ``tone (N,)``,
          ``grammar (N, 4)``)
        - goal, format: ``(N,)`` int; tone: ``(N,)``; grammar: ``(N, 4)``
    """
    if out.goal.shape[0] != goal.shape[0]:
        raise ValueError(f"out: expected {goal.shape[0]} designs, got {out.goal.shape[0]}")
    return {"goal_accuracy": float((out.goal.argmax(1).cpu() == goal).double().mean()),
            "format_accuracy": float((out.format.argmax(1).cpu() == format).double().mean()),
            "tone_mse": float((out.tone.double().cpu() - tone.double()).square().mean()),
            "grammar_mae": (out.grammar.double().cpu() - grammar.double()).abs().mean(0).tolist()}
