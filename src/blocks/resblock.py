"""Residual 3x3 conv block with GroupNorm, as in the seed's FusionNet U-Net.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. https://arxiv.org/abs/1512.03385
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ._checks import check_float_input, positive_int
from .norm import group_norm

__all__ = ["ResBlock"]


class ResBlock(nn.Module):
    r"""Two 3x3 convolutions with normalisation and a residual connection (post-activation).

    .. math::
        y = \sigma\big(s(x) + N_2(W_2 * \sigma(N_1(W_1 * x)))\big)

    where :math:`s` is the identity when ``in_channels == out_channels`` and a bias-free 1x1
    convolution otherwise, :math:`N_i` are ``norm_layer`` (GroupNorm by default, safe for any
    channel count via :func:`~blockyard.blocks.group_norm`) and :math:`\sigma` is ``act_layer``.
    The convolutions carry no bias because a norm follows each. With the defaults and
    ``act_layer=partial(nn.LeakyReLU, 0.01)`` this is FusionNet's ``ResBlock``.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out`` (default ``C_in``).
        act_layer: activation constructor, called with no arguments.
        norm_layer: norm constructor, called as ``norm_layer(channels, device=..., dtype=...)``.

    Shapes:
        - x: ``(B, C_in, H, W)``
        - output: ``(B, C_out, H, W)``
    """

    def __init__(self, in_channels: int, out_channels: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.SiLU,
                 norm_layer: Callable[..., nn.Module] = group_norm,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        in_channels = positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else positive_int("out_channels", out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False, **dd)
        self.norm1 = norm_layer(out_channels, **dd)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False, **dd)
        self.norm2 = norm_layer(out_channels, **dd)
        self.act2 = act_layer()
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1, bias=False, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_float_input(x, "x", self.conv1.weight.dtype)
        h = self.act1(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return self.act2(self.skip(x) + h)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"
