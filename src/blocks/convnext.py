"""ConvNeXt-V2 block with FCMAE dense masking.

Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders", CVPR 2023.
https://arxiv.org/abs/2301.00808
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .drop import DropPath
from .masking import _check_spatial_mask
from .norm import GRN, LayerNorm2d

__all__ = ["ConvNeXtV2Block"]


class ConvNeXtV2Block(nn.Module):
    r"""ConvNeXt-V2 block whose masked positions never leak into visible ones.

    .. math::
        y = x + \operatorname{DropPath}\big(W_2\,\operatorname{GRN}(\operatorname{GELU}(
            W_1\,\operatorname{LN}(\operatorname{DWConv}_{k\times k}(x))))\big)

    with the Linear layers applied per position (channels-last), ``W_1: C -> mlp_ratio * C``.

    Masking (FCMAE, the dense equivalent of the official sparse encoder): with ``mask``
    (**True = masked**) the input is zeroed at masked positions before the depthwise conv, the
    conv output is zeroed there again, GRN takes its statistics over visible positions only, and
    the output is exactly 0 at masked positions. So values at masked positions never influence
    outputs at visible positions, even through a stack of blocks (the seed's block masked only
    after the conv and leaked from the second block on), and a visible region bordered by masked
    positions is computed as if it were zero-padded, like a sparse convolution.

    Initialisation: the depthwise conv and ``pwconv1`` get ``trunc_normal(std=0.02)`` and zero
    bias (the official network init), GRN ``gamma``/``beta`` are zero (official). The official
    ``pwconv2`` is not zero-init, so the official block is not the identity at init; here
    ``zero_init_last=True`` (default) zero-initialises ``pwconv2`` so the block is exactly the
    identity (``y = x``, or ``x`` with masked positions zeroed) at init. Only ``pwconv2`` then gets
    a gradient on the first step (every other branch gradient passes through ``W_2 = 0``); after
    that step all parameters train. ``zero_init_last=False`` gives the official init.

    Parameter names (``dwconv``, ``norm``, ``pwconv1``, ``grn.gamma``/``grn.beta``, ``pwconv2``)
    follow the official code; its GRN parameters are ``(1, 1, 1, 4C)`` where ours are ``(4C,)``.

    Args:
        dim: number of channels ``C``.
        kernel_size: odd size of the depthwise conv (same padding).
        mlp_ratio: hidden width is ``int(mlp_ratio * dim)``.
        drop_path: stochastic-depth probability of the residual branch.
        act_layer: activation after ``pwconv1``.
        eps: LayerNorm and GRN epsilon.
        zero_init_last: zero-initialise ``pwconv2`` (identity at init).

    Shapes:
        - x: ``(B, C, H, W)`` (any memory format)
        - mask: ``(B, H, W)`` or ``(B, 1, H, W)`` bool, **True = masked**
        - output: ``(B, C, H, W)``, zeros at masked positions
    """

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.GELU, eps: float = 1e-6, zero_init_last: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim: expected >= 1, got {dim}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size >= 1, got {kernel_size}")
        hidden = int(mlp_ratio * dim)
        if hidden < 1:
            raise ValueError(f"mlp_ratio: expected int(mlp_ratio * dim) >= 1, got {mlp_ratio} * {dim}")
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.kernel_size = kernel_size
        self.zero_init_last = zero_init_last
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **factory)
        self.norm = LayerNorm2d(dim, eps=eps, **factory)
        self.pwconv1 = nn.Linear(dim, hidden, **factory)
        self.act = act_layer()
        self.grn = GRN(hidden, eps=eps, channels_last=True, **factory)
        self.pwconv2 = nn.Linear(hidden, dim, **factory)
        self.drop_path = DropPath(drop_path)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.dwconv, self.pwconv1, self.pwconv2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        if self.zero_init_last:
            nn.init.zeros_(self.pwconv2.weight)
        self.norm.reset_parameters()
        self.grn.reset_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block, optionally FCMAE-masked.

        Args:
            x: ``(B, C, H, W)`` (any memory format).
            mask: optional ``(B, H, W)`` or ``(B, 1, H, W)`` bool, True = masked: masked values never
                reach visible outputs.

        Returns:
            ``(B, C, H, W)``, exactly 0 at masked positions.
        """
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected (B, {self.dim}, H, W), got {tuple(x.shape)}")
        batch, _, height, width = x.shape
        hidden_mask = None
        if mask is not None:
            hidden_mask = _check_spatial_mask(mask, batch, height, width)
            # masked_fill rather than * (1 - m): NaN/inf at masked positions must not leak either
            x = x.masked_fill(hidden_mask, 0.0)
        y = self.dwconv(x)
        if hidden_mask is not None:
            y = y.masked_fill(hidden_mask, 0.0)  # conv bias and neighbours reach masked positions
        y = self.norm(y).permute(0, 2, 3, 1)  # (B, H, W, C) for the per-position Linears
        y = self.grn(self.act(self.pwconv1(y)), mask)
        y = self.pwconv2(y).permute(0, 3, 1, 2)
        out = x + self.drop_path(y)
        if hidden_mask is not None:
            out = out.masked_fill(hidden_mask, 0.0)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, zero_init_last={self.zero_init_last}"
