"""Heatmap targets and the winner-takes-all multi-hypothesis heatmap loss.

Rupprecht et al., "Learning in an Uncertain World: Representing Ambiguity Through Multiple
Hypotheses", ICCV 2017 (winner-takes-all training). https://arxiv.org/abs/1612.00197
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_all

__all__ = ["MASK_FILL", "WTAOutput", "gaussian_heatmap", "wta_heatmap_loss"]

# Large finite negative used instead of -inf for masked logits: -inf turns into NaN through
# (-inf) - (-inf) and 0 * (-inf) when a whole row is masked (the FusionNet seed's bf16 NaNs).
MASK_FILL = -1e9


def _check_centers(centers: torch.Tensor, batch: int | None = None) -> None:
    if centers.dim() != 2 or centers.shape[1] != 2 or (batch is not None and centers.shape[0] != batch):
        b = "B" if batch is None else batch
        raise ValueError(f"centers: expected ({b}, 2) integer (y, x), got {tuple(centers.shape)}")
    if centers.is_floating_point() or centers.is_complex():
        raise TypeError(f"centers: expected an integer tensor, got {centers.dtype}")


def _check_inside(centers: torch.Tensor, height: int, width: int) -> None:
    # An outside centre is never "the target pixel": its Gaussian is truncated (or underflows to
    # 0/0 = NaN far away) and, with a mask, a negative index wraps around to the other edge.
    y, x = centers[:, 0], centers[:, 1]
    inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)

    def got() -> str:
        rows = torch.nonzero(~inside).flatten()[:4]
        return f"{centers[rows].tolist()} at rows {rows.tolist()}"

    check_all(inside, f"centers: expected (y, x) inside the {height}x{width} image "
                      f"(0 <= y < {height}, 0 <= x < {width})", got)


def _check_mask(mask: torch.Tensor | None, shape: tuple[int, int, int]) -> None:
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"mask: expected {shape} (True = masked), got {tuple(mask.shape)}")


def gaussian_heatmap(centers: torch.Tensor, size: tuple[int, int], sigma: float = 2.0,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Normalised Gaussian target maps, one per sample.

    .. math::
        g_b(y, x) \propto \exp\!\left(-\frac{(y - c_{b,y})^2 + (x - c_{b,x})^2}{2\sigma^2}\right)
        \,[\text{not masked}_b(y, x) \lor (y, x) = c_b]

    renormalised so each map sums to 1. The centre pixel is never masked, so the map is always a
    proper distribution (a fully masked sample degenerates to a one-hot at its centre).

    Args:
        centers: integer ``(y, x)`` of each sample's target pixel, inside the map (range check:
            see :func:`wta_heatmap_loss`).
        size: ``(H, W)`` of the maps.
        sigma: standard deviation in pixels.
        mask: optional bool map, ``True`` = masked (probability 0 there).

    Shapes:
        - centers: ``(B, 2)``
        - mask: ``(B, H, W)``
        - output: ``(B, H, W)`` float32
    """
    _check_centers(centers)
    height, width = size
    _check_mask(mask, (centers.shape[0], height, width))
    _check_sigma(sigma)
    _check_inside(centers, height, width)
    return _gaussian(centers, height, width, sigma, mask)


def _check_sigma(sigma: float) -> None:
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")


def _gaussian(centers: torch.Tensor, height: int, width: int, sigma: float,
              mask: torch.Tensor | None) -> torch.Tensor:
    ys = torch.arange(height, device=centers.device, dtype=torch.float32)
    xs = torch.arange(width, device=centers.device, dtype=torch.float32)
    cy = centers[:, 0].float()[:, None, None]
    cx = centers[:, 1].float()[:, None, None]
    g = torch.exp(-((ys[None, :, None] - cy) ** 2 + (xs[None, None, :] - cx) ** 2) / (2 * sigma**2))
    if mask is not None:
        is_center = (ys[None, :, None] == cy) & (xs[None, None, :] == cx)
        g = g.masked_fill(mask & ~is_center, 0.0)
    return g / g.sum(dim=(1, 2), keepdim=True)


class WTAOutput(NamedTuple):
    """Result of :func:`wta_heatmap_loss`.

    - loss: scalar, mean over the batch of the best hypothesis' cross-entropy.
    - best: ``(B,)`` index of the winning hypothesis per sample.
    - per_hypothesis: ``(B, K)`` cross-entropy of every hypothesis (float32, clamped).
    - diversity: scalar ``>= 0``, ``sum_k p_k log p_k + log K`` of the batch-averaged soft
      assignment ``p = softmax(-per_hypothesis)``; 0 when the hypotheses are used evenly.
    """

    loss: torch.Tensor
    best: torch.Tensor
    per_hypothesis: torch.Tensor
    diversity: torch.Tensor


def wta_heatmap_loss(logits: torch.Tensor, centers: torch.Tensor, mask: torch.Tensor | None = None,
                     sigma: float = 2.0, max_loss: float = 100.0) -> WTAOutput:
    r"""Winner-takes-all cross-entropy between K spatial softmaxes and a Gaussian target.

    For each hypothesis :math:`k`, :math:`p_k = \mathrm{softmax}_{y,x}(\ell_k)` over the unmasked
    pixels and :math:`L_{b,k} = -\sum_{y,x} g_b \log p_{b,k}` with :math:`g` from
    :func:`gaussian_heatmap` (cross-entropy; KL divergence plus the target's entropy). The loss is
    :math:`\frac1B \sum_b \min_k L_{b,k}`: only the winning hypothesis of each sample gets gradient.

    Computed in float32 whatever the dtype of ``logits`` (bf16 autocast included). Masked logits
    are replaced by a large finite negative, never ``-inf``, so fully masked rows stay finite. The
    target pixel is always treated as unmasked. ``L`` is clamped at ``max_loss``.

    ``centers`` must lie inside the image (``0 <= y < H``, ``0 <= x < W``). On the CPU an
    outside centre raises a ``ValueError`` naming it; on other devices and under
    ``torch.compile`` the range check is a ``torch._assert_async`` (no host sync, no graph
    break; a failure is a ``RuntimeError`` / device-side assert).

    Args:
        logits: position logits of K hypotheses.
        centers: integer ``(y, x)`` target of each sample, inside the image.
        mask: optional bool map, ``True`` = masked (not a legal prediction).
        sigma: Gaussian target's standard deviation in pixels.
        max_loss: upper clamp of each per-hypothesis loss.

    Shapes:
        - logits: ``(B, K, H, W)``
        - centers: ``(B, 2)``
        - mask: ``(B, H, W)``
        - output: :class:`WTAOutput`
    """
    if logits.dim() != 4:
        raise ValueError(f"logits: expected (B, K, H, W), got {tuple(logits.shape)}")
    batch, k, height, width = logits.shape
    _check_centers(centers, batch)
    _check_mask(mask, (batch, height, width))
    _check_sigma(sigma)
    _check_inside(centers, height, width)
    target = _gaussian(centers, height, width, sigma, mask)
    logits = logits.float()
    if mask is not None:
        rows = torch.arange(batch, device=logits.device)
        legal = ~mask
        legal = legal.index_put((rows, centers[:, 0].long(), centers[:, 1].long()),
                                torch.ones(batch, dtype=torch.bool, device=legal.device))
        logits = logits.masked_fill(~legal[:, None], MASK_FILL)
    log_p = F.log_softmax(logits.flatten(2), dim=-1)
    per_hyp = -(target.flatten(1)[:, None] * log_p).sum(-1).clamp(max=max_loss)
    best_loss, best = per_hyp.min(dim=1)
    usage = torch.softmax(-per_hyp, dim=1).mean(0)
    diversity = (usage * torch.log(usage.clamp_min(1e-12))).sum() + math.log(k)
    return WTAOutput(best_loss.mean(), best, per_hyp, diversity)
