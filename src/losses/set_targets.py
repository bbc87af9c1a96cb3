"""Losses whose target is a weighted set of right answers, not one label drawn from it.

When a sample has several equally right answers (FusionNet: every operation that lowers the
crossings of a state) and the label is one of them, drawn by a teacher, a model trained on the
label learns to guess the draw, and no model can score above ``E[1 / |set|]`` top-1 against such
labels. These losses take the whole set, as non-negative weights, for the target distribution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_all
from .heatmap import MASK_FILL, WTAOutput

__all__ = ["set_cross_entropy", "wta_set_heatmap_loss"]


def _check_weights(weights: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(weights.shape) != shape:
        raise ValueError(f"weights: expected {shape}, got {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights: expected a floating tensor (non-negative weights), got {weights.dtype}")
    check_all(weights >= 0, "weights: expected non-negative values",
              lambda: f"minimum {weights.min().item():.4g}")


def wta_set_heatmap_loss(logits: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None,
                         max_loss: float = 100.0) -> WTAOutput:
    r"""Winner-takes-all cross-entropy of K spatial softmaxes against a weighted set of target pixels.

    .. math::
        t_b(y, x) = \frac{w_b(y, x)}{\sum_{y', x'} w_b(y', x')}, \qquad
        L_{b,k} = -\sum_{y, x} t_b(y, x) \log p_{b,k}(y, x), \qquad
        L = \frac{1}{|S|} \sum_{b \in S} \min_k L_{b,k}

    where :math:`p_{b,k}` is hypothesis :math:`k`'s softmax over the pixels that are not masked
    (a pixel with :math:`w > 0` always counts as unmasked) and :math:`S` the samples with some
    weight. A sample without any (all :math:`w_b = 0`) gives no loss, no gradient and no share of
    the mean; with none at all the loss is 0. With :math:`w` = :func:`gaussian_heatmap` of one
    centre this is :func:`wta_heatmap_loss` (Rupprecht et al., ICCV 2017,
    https://arxiv.org/abs/1612.00197); with the indicator of a set it is the set's uniform
    distribution, which a single softmax matches only by spreading over the whole set, while the
    argmax of any softmax that matches it lies in the set.

    Computed in float32 whatever the dtype of ``logits``; masked logits are a large finite negative,
    never ``-inf``; each :math:`L_{b,k}` is clamped at ``max_loss``.

    Args:
        logits: position logits of K hypotheses.
        weights: non-negative target weight of every pixel (any scale: each sample is normalised).
        mask: optional bool map, ``True`` = masked (not a legal prediction).
        max_loss: upper clamp of each per-hypothesis loss.

    Shapes:
        - logits: ``(B, K, H, W)``
        - weights: ``(B, H, W)``
        - mask: ``(B, H, W)``
        - output: :class:`WTAOutput` (``per_hypothesis (B, K)`` is 0 on samples without weight;
          ``diversity`` is taken over the samples with weight)
    """
    if logits.dim() != 4:
        raise ValueError(f"logits: expected (B, K, H, W), got {tuple(logits.shape)}")
    batch, k, height, width = logits.shape
    _check_weights(weights, (batch, height, width))
    if mask is not None and tuple(mask.shape) != (batch, height, width):
        raise ValueError(f"mask: expected {(batch, height, width)} (True = masked), got {tuple(mask.shape)}")
    w = weights.float().flatten(1)
    total = w.sum(1)
    has = total > 0
    target = w / total.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    flat = logits.float().flatten(2)
    if mask is not None:
        flat = flat.masked_fill((mask.flatten(1) & (w <= 0))[:, None], MASK_FILL)
    log_p = F.log_softmax(flat, dim=-1)
    per_hyp = -(target[:, None] * log_p).sum(-1).clamp(max=max_loss)  # 0 where the sample has no weight
    best_loss, best = per_hyp.min(dim=1)
    count = has.sum()
    loss = best_loss.sum() / count.clamp_min(1)
    usage = (torch.softmax(-per_hyp, dim=1) * has[:, None]).sum(0) / count.clamp_min(1)
    diversity = torch.where(count > 0, (usage * torch.log(usage.clamp_min(1e-12))).sum() + math.log(k),
                            torch.zeros((), device=usage.device))
    return WTAOutput(loss, best, per_hyp, diversity)


def set_cross_entropy(logits: torch.Tensor, weights: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    r"""Dense classification against a weighted set of (pixel, class) answers.

    .. math::
        L_b = \frac{\sum_{y, x} \sum_c w_{b,c}(y, x)\, \mathrm{CE}_s(\ell_b(y, x), c)}
                   {\sum_{y, x} \sum_c w_{b,c}(y, x)}, \qquad L = \frac{1}{|S|} \sum_{b \in S} L_b

    where :math:`\mathrm{CE}_s` is cross-entropy over the C classes with label smoothing
    :math:`s` and :math:`S` the samples with some weight (a sample with none gives no loss; with
    none at all the loss is 0). Each pixel with weight is trained towards its own answers in
    proportion to their weights (the soft label :math:`w_{b,\cdot}(y, x) / \sum_c w_{b,c}(y, x)`),
    and pixels count by their total weight. With one answer of weight 1 per sample it is plain
    cross-entropy at that pixel. Computed in float32.

    Args:
        logits: per-pixel class logits.
        weights: non-negative weight of every (class, pixel) answer; 0 = not an answer.
        label_smoothing: :math:`s` in ``[0, 1]``.

    Shapes:
        - logits: ``(B, C, H, W)``
        - weights: ``(B, C, H, W)``
        - output: scalar
    """
    if logits.dim() != 4:
        raise ValueError(f"logits: expected (B, C, H, W), got {tuple(logits.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    _check_weights(weights, tuple(logits.shape))
    classes = logits.shape[1]
    log_p = F.log_softmax(logits.float(), dim=1)
    w = weights.float()
    pixel = w.sum(1)  # (B, H, W)
    per_pixel = -(1.0 - label_smoothing) * (w * log_p).sum(1) - label_smoothing / classes * pixel * log_p.sum(1)
    total = pixel.flatten(1).sum(1)
    per_sample = per_pixel.flatten(1).sum(1) / total.clamp_min(torch.finfo(torch.float32).tiny)
    has = total > 0
    return (per_sample * has).sum() / has.sum().clamp_min(1)
