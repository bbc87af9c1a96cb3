"""Regression and segmentation losses: masked MSE, log2 MSE, soft Dice, and a composite of terms."""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._checks import check_all

__all__ = ["CompositeLoss", "LossOutput", "dice_loss", "log2_mse", "masked_mse"]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked positions only (``True`` = masked = the positions scored).

    In masked auto-encoding the loss is taken where the input was hidden. ``mask`` broadcasts
    against ``pred`` (e.g. ``(B, 1, H, W)`` or ``(B, N, 1)``). No masked position gives 0, not NaN.
    Computed in float32.

    Shapes:
        - pred, target: any shape, equal
        - mask: broadcastable to ``pred``
        - output: scalar
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected target's shape {tuple(target.shape)}, got {tuple(pred.shape)}")
    try:
        weight = torch.broadcast_to(mask, pred.shape).float()
    except RuntimeError:
        raise ValueError(f"mask: expected a shape broadcastable to {tuple(pred.shape)}, "
                         f"got {tuple(mask.shape)}") from None
    err = (pred.float() - target.float()).square() * weight
    return err.sum() / weight.sum().clamp_min(1.0)


def log2_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Mean squared error in log2 space, :math:`\frac1N \sum (\log_2 \hat y - \log_2 y)^2`.

    Both ``pred`` and ``target`` must be positive (m-heights are >= 1). Computed in float32.

    Shapes:
        - pred, target: any shape, equal
        - output: scalar
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected target's shape {tuple(target.shape)}, got {tuple(pred.shape)}")
    return (torch.log2(pred.float()) - torch.log2(target.float())).square().mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    r"""Soft Dice loss on sigmoid probabilities, per sample and channel, then averaged.

    .. math:: 1 - \frac{2 \sum p t + \epsilon}{\sum p + \sum t + \epsilon}

    ``target`` holds (soft) labels in ``[0, 1]``: a value outside (e.g. class indices, or 0/255
    masks) raises a ``ValueError`` on the CPU; on other devices and under ``torch.compile`` the
    range check is a ``torch._assert_async`` (no host sync; a failure is a ``RuntimeError``).

    Shapes:
        - logits, target: ``(B, C, *spatial)``
        - output: scalar
    """
    if logits.shape != target.shape or logits.dim() < 2:
        raise ValueError(f"logits: expected target's shape {tuple(target.shape)} with rank >= 2, "
                         f"got {tuple(logits.shape)}")
    t = target.float().flatten(2)
    if t.numel():
        lo, hi = torch.aminmax(t)
        check_all((lo >= 0) & (hi <= 1), "target: expected values in [0, 1]",
                  lambda: f"values in [{lo.item()}, {hi.item()}]")
    p = torch.sigmoid(logits.float()).flatten(2)
    dice = (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)
    return 1 - dice.mean()


class LossOutput(NamedTuple):
    """``total``: the weighted sum (with gradient); ``terms``: each unweighted term, detached for logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class CompositeLoss:
    """A weighted sum of named loss terms that reports each term.

    ``CompositeLoss(pos=(5.0, pos_fn), act=(1.0, act_fn))(*args, **kwargs)`` calls every ``fn``
    with the same arguments and returns :class:`LossOutput` with ``total = sum(w * fn(...))``.
    A term whose weight is 0 is not evaluated.

    Args:
        **terms: ``name=(weight, fn)``; ``fn`` returns a scalar tensor.
    """

    def __init__(self, **terms: tuple[float, Callable[..., torch.Tensor]]) -> None:
        if not terms:
            raise ValueError("terms: expected at least one name=(weight, fn)")
        for name, term in terms.items():
            if not (isinstance(term, tuple) and len(term) == 2 and callable(term[1])):
                raise TypeError(f"{name}: expected (weight, fn), got {term!r}")
        self.terms = terms

    def __call__(self, *args, **kwargs) -> LossOutput:
        total, logged = None, {}
        for name, (weight, fn) in self.terms.items():
            if weight == 0:
                continue
            value = fn(*args, **kwargs)
            logged[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        if total is None:
            raise ValueError("terms: every weight is 0, nothing to optimise")
        return LossOutput(total, logged)
