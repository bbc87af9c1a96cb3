"""GroupNorm with a safe group count and a faster CPU backward for large half-precision channels-last maps.

Reference: Wu & He, "Group Normalization", ECCV 2018, https://arxiv.org/abs/1803.08494.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupNorm", "group_norm"]


# Below this many positions (H * W) PyTorch's channels-last kernel is as fast or faster than the
# transposing copies (measured on an AMX CPU, batch 8: 128x128 and 64x64 maps gain, 32x32 loses).
_NCHW_BACKWARD_MIN_POSITIONS = 64 * 64


class _GroupNormChannelsLastHalf(torch.autograd.Function):
    """GroupNorm of a channels-last half-precision map: the forward on it, the backward on NCHW copies.

    PyTorch's CPU GroupNorm backward for a channels-last bfloat16/float16 input (with float32
    weights, as under autocast) is several times slower on large maps than its NCHW kernel for the
    same dtypes; one transposing copy each of ``x`` and ``dy`` in and of ``dx`` out costs less.
    Both kernels accumulate in float32 and take the float32 ``mean``/``rstd`` the forward saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                groups: int, eps: float) -> torch.Tensor:
        batch, channels = x.shape[0], x.shape[1]
        positions = x.shape[2] * x.shape[3]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, batch, channels, positions, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.sizes = (batch, channels, positions, groups)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        batch, channels, positions, groups = ctx.sizes
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy.contiguous(), x.contiguous(), mean, rstd, weight, batch, channels, positions, groups, mask)
        if dx is not None:
            dx = dx.contiguous(memory_format=torch.channels_last)
        return dx, dw, db, None, None


class GroupNorm(nn.GroupNorm):
    r"""``nn.GroupNorm`` (same parameters, state dict and numerics) with a faster CPU path.

    .. math::
        y = \frac{x - \mu_{b,g}}{\sqrt{\sigma^2_{b,g} + \epsilon}} \odot w + b

    with the mean and biased variance over the channels of group ``g`` and all positions of sample
    ``b``. A half-precision (bfloat16/float16) channels-last map of at least 64 x 64 positions on
    the CPU runs PyTorch's own forward kernel and, in the backward, its NCHW kernel on transposed
    copies (PyTorch's channels-last backward kernel for these dtypes is several times slower on
    large maps); both kernels accumulate the statistics and reductions in float32. Every other
    input, and any input under ``torch.compile`` (which fuses the norm itself), calls
    ``F.group_norm``.

    Args:
        num_groups: groups ``G`` (must divide ``num_channels``).
        num_channels: channels ``C``.
        eps: added to the variance.
        affine: learn a per-channel scale ``weight`` (ones) and shift ``bias`` (zeros).

    Shapes:
        - x: ``(B, C, *)``
        - output: same as ``x``, same dtype and memory format
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each group of channels over its channels and all positions.

        Args:
            x: ``(B, C, *)``.

        Returns:
            same shape, dtype and memory format as ``x``.
        """
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"x: expected (B, {self.num_channels}, *), got {tuple(x.shape)}")
        if (x.dim() == 4 and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
                and x.shape[2] * x.shape[3] >= _NCHW_BACKWARD_MIN_POSITIONS and x.shape[1] > 1
                and x.is_contiguous(memory_format=torch.channels_last)
                and not torch.compiler.is_compiling()):
            return _GroupNormChannelsLastHalf.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, max_groups: int = 8, eps: float = 1e-5, affine: bool = True,
               device=None, dtype=None) -> GroupNorm:
    """:class:`GroupNorm` (an ``nn.GroupNorm``) with the largest divisor of ``channels`` that is
    ``<= max_groups``.

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
    return GroupNorm(groups, channels, eps=eps, affine=affine, device=device, dtype=dtype)
