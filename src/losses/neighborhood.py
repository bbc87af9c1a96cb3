"""Per-pixel classification supervised at a target pixel and, more weakly, at its 4 neighbours."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .heatmap import _check_centers

__all__ = ["neighborhood_cross_entropy"]

_OFFSETS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


def neighborhood_cross_entropy(logits: torch.Tensor, centers: torch.Tensor, target: torch.Tensor,
                               neighbor_weight: float = 0.3, label_smoothing: float = 0.2,
                               center_label_smoothing: float = 0.1,
                               mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Cross-entropy of a dense classifier at the target pixel plus its in-bounds 4-neighbours.

    .. math::
        L = \frac1B \sum_b \Big[\mathrm{CE}_{s_c}(\ell_b(c_b), t_b)
            + w\, \frac{1}{|N_b|} \sum_{n \in N_b} \mathrm{CE}_{s}(\ell_b(n), t_b)\Big]

    where :math:`N_b` are the 4-neighbours of :math:`c_b` inside the map and not masked (a sample
    with none contributes only its centre term), :math:`w` is ``neighbor_weight`` and
    :math:`\mathrm{CE}_s` is cross-entropy with label smoothing :math:`s`. The FusionNet v2 seed
    uses :math:`s_c = 0.1`, :math:`s = 0.2`, :math:`w = 0.3`, so that the action predicted one
    pixel off the target is still trained. Computed in float32.

    Args:
        logits: per-pixel class logits.
        centers: integer ``(y, x)`` of the target pixel.
        target: integer class at the target pixel.
        neighbor_weight: weight ``w`` of the neighbour term.
        label_smoothing: label smoothing of the neighbour terms.
        center_label_smoothing: label smoothing of the centre term.
        mask: optional bool map, ``True`` = masked: masked neighbours are not supervised.

    Shapes:
        - logits: ``(B, A, H, W)``
        - centers: ``(B, 2)``
        - target: ``(B,)``
        - mask: ``(B, H, W)``
        - output: scalar
    """
    if logits.dim() != 4:
        raise ValueError(f"logits: expected (B, A, H, W), got {tuple(logits.shape)}")
    batch, classes, height, width = logits.shape
    _check_centers(centers, batch)
    if target.shape != (batch,):
        raise ValueError(f"target: expected ({batch},), got {tuple(target.shape)}")
    if mask is not None and tuple(mask.shape) != (batch, height, width):
        raise ValueError(f"mask: expected ({batch}, {height}, {width}), got {tuple(mask.shape)}")
    offsets = torch.tensor(_OFFSETS, device=centers.device)
    pos = centers.long()[:, None, :] + offsets[None]  # (B, 5, 2)
    ys, xs = pos[..., 0], pos[..., 1]
    inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    ys, xs = ys.clamp(0, height - 1), xs.clamp(0, width - 1)
    if mask is not None:
        rows = torch.arange(batch, device=mask.device)[:, None]
        inside[:, 1:] &= ~mask[rows, ys, xs][:, 1:]
    flat = (ys * width + xs)[:, None, :].expand(batch, classes, len(_OFFSETS))
    picked = logits.flatten(2).float().gather(2, flat)  # (B, A, 5)
    tgt = target.long()[:, None].expand(batch, len(_OFFSETS))
    center = F.cross_entropy(picked[:, :, 0], tgt[:, 0], label_smoothing=center_label_smoothing)
    nbr = F.cross_entropy(picked[:, :, 1:], tgt[:, 1:], label_smoothing=label_smoothing, reduction="none")
    valid = inside[:, 1:].float()
    per_sample = (nbr * valid).sum(1) / valid.sum(1).clamp_min(1.0)
    return center + neighbor_weight * per_sample.mean()
