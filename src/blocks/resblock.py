"""Residual 3x3 conv block with GroupNorm, as in the seed's FusionNet U-Net.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. https://arxiv.org/abs/1512.03385
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ._checks import check_float_input, positive_int
from .film import FiLM
from .group_norm import group_norm

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

    With ``cond_dim`` set, a :class:`~blockyard.blocks.FiLM` of ``cond`` scales and shifts the first
    normalised map, :math:`\sigma(\mathrm{FiLM}(N_1(W_1 * x), c))` (ADM's "scale-shift norm", Dhariwal &
    Nichol 2021, inside the block); it starts as the identity.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out`` (default ``C_in``).
        cond_dim: size of the conditioning vector ``cond``, or ``None`` (no conditioning).
        act_layer: activation constructor, called with no arguments.
        norm_layer: norm constructor, called as ``norm_layer(channels, device=..., dtype=...)``.

    Shapes:
        - x: ``(B, C_in, H, W)``; cond: ``(B, cond_dim)``
        - output: ``(B, C_out, H, W)``
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, cond_dim: int | None = None,
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
        self.film = FiLM(cond_dim, out_channels, **dd) if cond_dim is not None else None
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False, **dd)
        self.norm2 = norm_layer(out_channels, **dd)
        self.act2 = act_layer()
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1, bias=False, **dd))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the two normalised convolutions and add the shortcut.

        Args:
            x: ``(B, C_in, H, W)``.
            cond: ``(B, cond_dim)`` FiLM vector after the first norm, required iff ``cond_dim`` is set.

        Returns:
            ``(B, C_out, H, W)``, after the final activation.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if (cond is None) != (self.film is None):
            raise ValueError(f"cond: expected {'a (B, cond_dim) tensor' if self.film is not None else 'None'} "
                             f"since cond_dim={None if self.film is None else self.film.cond_dim}, "
                             f"got {'None' if cond is None else tuple(cond.shape)}")
        check_float_input(x, "x", self.conv1.weight.dtype)
        h = self.norm1(self.conv1(x))
        h = self.act1(self.film(h, cond) if self.film is not None else h)
        h = self.norm2(self.conv2(h))
        return self.act2(self.skip(x) + h)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"
