"""U-Net levels: an encoder level (stem, residual blocks, FiLM, cross-attention) and a decoder level.

Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015.
https://arxiv.org/abs/1505.04597. Levels follow the seed's FusionNet (1x1 projection, GroupNorm,
activation, residual block, FiLM after the level); cross-attention follows diffusers'
``UNet2DConditionModel`` (pre-norm, residual, at the lowest resolutions). ``UNet`` (``unet.py``)
wires them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_float_input, positive_int
from .film import FiLM
from .group_norm import group_norm
from .map_attention import CONTEXT_BLOCKS
from .resblock import ResBlock

__all__ = ["DecoderLevel", "EncoderLevel"]


def _check_cond(cond: torch.Tensor | None, cond_dim: int | None, batch: int) -> None:
    if cond_dim is None:
        if cond is not None:
            raise ValueError("cond: this module was built with cond_dim=None; pass cond_dim to use cond")
    elif cond is None:
        raise ValueError(f"cond: expected ({batch}, {cond_dim}) since cond_dim={cond_dim}, got None")
    elif cond.dim() != 2 or cond.shape != (batch, cond_dim):
        raise ValueError(f"cond: expected ({batch}, {cond_dim}), got {tuple(cond.shape)}")


def _check_context(context: torch.Tensor | None, context_dim: int | None, batch: int) -> None:
    if context_dim is None:
        if context is not None:
            raise ValueError("context: this module was built with context_dim=None; "
                             "pass context_dim to use context")
    elif context is None:
        raise ValueError(f"context: expected ({batch}, L, {context_dim}) since context_dim={context_dim}, "
                         "got None")
    elif context.dim() != 3 or context.shape[0] != batch or context.shape[2] != context_dim \
            or context.shape[1] < 1:
        raise ValueError(f"context: expected ({batch}, L, {context_dim}), got {tuple(context.shape)}")


_STEMS = ("projection", "conv")


def _stem(kind: str, in_channels: int, out_channels: int, act_layer, norm_layer, dd) -> nn.Sequential:
    """The start of a level: ``"projection"`` is FusionNet's 1x1 conv (no bias) -> norm -> act;
    ``"conv"`` a 3x3 conv with bias alone, which keeps the input's absolute scale (no norm)."""
    if kind not in _STEMS:
        raise ValueError(f"stem: expected one of {_STEMS}, got {kind!r}")
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, **dd))
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False, **dd),
                         norm_layer(out_channels, **dd), act_layer())


_TIME_CONDITIONING = ("film", "scale_shift")


class _Level(nn.Module):
    """What every level ends with: residual block(s), then FiLM(cond), then cross-attention(context).

    ``time_conditioning="scale_shift"`` moves ``cond`` inside every residual block (no FiLM after).
    """

    def _init_tail(self, channels: int, cond_dim: int | None, context_dim: int | None, heads: int,
                   act_layer, norm_layer, dd, film_bias: bool = True, time_conditioning: str = "film",
                   blocks: int = 1, context_block: str = "cross_attention") -> None:
        if context_block not in CONTEXT_BLOCKS:
            raise ValueError(f"context_block: expected one of {tuple(CONTEXT_BLOCKS)}, got {context_block!r}")
        if time_conditioning not in _TIME_CONDITIONING:
            raise ValueError(f"time_conditioning: expected one of {_TIME_CONDITIONING}, got {time_conditioning!r}")
        blocks = positive_int("blocks_per_level", blocks)
        self.cond_dim = cond_dim
        self.context_dim = context_dim
        inner = cond_dim if time_conditioning == "scale_shift" else None
        kw = {"cond_dim": inner, "act_layer": act_layer, "norm_layer": norm_layer, **dd}
        self.block = ResBlock(channels, **kw)
        # more blocks in their own list, so a one-block level keeps its state-dict names
        self.more_blocks = nn.ModuleList(ResBlock(channels, **kw) for _ in range(blocks - 1))
        self.film = (FiLM(cond_dim, channels, bias=film_bias, **dd)
                     if cond_dim is not None and inner is None else None)
        self.cross_attn = (CONTEXT_BLOCKS[context_block](channels, context_dim, heads, **dd)
                           if context_dim is not None else None)

    def _tail(self, h: torch.Tensor, cond: torch.Tensor | None, context: torch.Tensor | None,
              context_mask: torch.Tensor | None) -> torch.Tensor:
        inner = cond if self.block.film is not None else None
        h = self.block(h, inner)
        for block in self.more_blocks:
            h = block(h, inner)
        if self.film is not None:
            h = self.film(h, cond)
        if self.cross_attn is not None:
            h = self.cross_attn(h, context, context_mask)
        return h


class EncoderLevel(_Level):
    r"""One encoder level: optional 2x2 max-pool, 1x1 projection, residual block, FiLM, cross-attention.

    .. math::
        y = \mathrm{XAttn}\big(\mathrm{FiLM}(\mathrm{Res}(\sigma(N(W_{1\times1} * \mathrm{pool}(x)))), c),
        \text{ctx}\big)

    FiLM (when ``cond_dim`` is set) and cross-attention (when ``context_dim`` is set) both start as
    the identity.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        downsample: halve H and W with a 2x2 max-pool first (H and W must then be even).
        cond_dim: size of the FiLM conditioning vector, or ``None`` for no FiLM.
        film_bias: give FiLM a bias; ``False`` keeps a zero ``cond`` the identity throughout training.
        time_conditioning: ``"film"`` (a FiLM of ``cond`` after the residual blocks) or
            ``"scale_shift"`` (a FiLM of ``cond`` inside every residual block, after its first norm,
            as ADM and diffusers do with the timestep).
        blocks: residual blocks in the level.
        context_dim: feature size of the cross-attention context, or ``None`` for none.
        context_block: ``"cross_attention"`` (pre-norm residual cross-attention) or ``"transformer"``
            (a :class:`~blockyard.blocks.TransformerBlock`: self-attention, cross-attention and an MLP
            over the positions, as diffusers' ``Transformer2DModel``); both identity at init.
        heads: cross-attention heads (must divide ``C_out``).
        stem: how the level starts: ``"projection"`` (1x1 convolution, norm, activation, as
            FusionNet) or ``"conv"`` (one 3x3 convolution with bias and nothing after it, as the input
            convolution of ADM and diffusers; no norm, so the input's absolute scale survives).
        act_layer, norm_layer: as in :class:`~blockyard.blocks.ResBlock`.

    Shapes:
        - x: ``(B, C_in, H, W)``; cond: ``(B, cond_dim)``; context: ``(B, L, context_dim)``
        - context_mask: optional ``(B, L)`` bool, True = that context token is NOT attended
        - output: ``(B, C_out, H // 2, W // 2)`` if ``downsample`` else ``(B, C_out, H, W)``
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = True,
                 cond_dim: int | None = None, context_dim: int | None = None, heads: int = 4,
                 film_bias: bool = True, time_conditioning: str = "film", blocks: int = 1,
                 context_block: str = "cross_attention", stem: str = "projection",
                 act_layer: Callable[[], nn.Module] = nn.SiLU,
                 norm_layer: Callable[..., nn.Module] = group_norm, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        in_channels, out_channels = positive_int("in_channels", in_channels), positive_int("out_channels", out_channels)
        self.in_channels, self.out_channels, self.downsample = in_channels, out_channels, downsample
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.stem = _stem(stem, in_channels, out_channels, act_layer, norm_layer, dd)
        self._init_tail(out_channels, cond_dim, context_dim, heads, act_layer, norm_layer, dd, film_bias,
                        time_conditioning, blocks, context_block)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run one encoder level.

        Args:
            x: ``(B, C_in, H, W)`` (H and W even when ``downsample``).
            cond: ``(B, cond_dim)`` FiLM vector, required iff ``cond_dim`` is set.
            context: ``(B, L, context_dim)`` cross-attention tokens, required iff ``context_dim`` is set.
            context_mask: optional ``(B, L)`` bool, True = that context token is NOT attended.

        Returns:
            ``(B, C_out, H // 2, W // 2)`` if ``downsample`` else ``(B, C_out, H, W)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.downsample and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(f"x: expected even H and W to downsample, got {tuple(x.shape)}")
        check_float_input(x, "x", self.stem[0].weight.dtype)
        _check_cond(cond, self.cond_dim, x.shape[0])
        _check_context(context, self.context_dim, x.shape[0])
        return self._tail(self.stem(self.pool(x)), cond, context, context_mask)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, downsample={self.downsample}"


class DecoderLevel(_Level):
    r"""One decoder level: 2x upsample, merge the skip, residual block, FiLM, cross-attention.

    .. math::
        h = \sigma(N(W_{1\times1} * [\mathrm{up}(x), s])), \qquad
        y = \mathrm{XAttn}(\mathrm{FiLM}(\mathrm{Res}(h), c), \text{ctx})

    The 1x1 convolution of the concatenation is computed as ``up(W_x * x) + W_s * s``: equal
    because a bias-free 1x1 convolution commutes with (bilinear or nearest) upsampling, and cheaper
    because ``W_x`` runs at the low resolution and no concatenated map is materialised.

    Args:
        in_channels: channels ``C_in`` of the coarser input ``x``.
        skip_channels: channels ``C_s`` of the skip connection.
        out_channels: output channels ``C_out``.
        cond_dim, context_dim, heads, film_bias, time_conditioning, blocks, context_block, act_layer,
            norm_layer: as in :class:`EncoderLevel`.
        upsample_mode: ``F.interpolate`` mode; ``"bilinear"`` uses ``align_corners=True`` as FusionNet.

    Shapes:
        - x: ``(B, C_in, h, w)``; skip: ``(B, C_s, H, W)`` with ``H = 2h, W = 2w``
        - cond: ``(B, cond_dim)``; context: ``(B, L, context_dim)``; context_mask: as in :class:`EncoderLevel`
        - output: ``(B, C_out, H, W)``
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int,
                 cond_dim: int | None = None, context_dim: int | None = None, heads: int = 4,
                 film_bias: bool = True, time_conditioning: str = "film", blocks: int = 1,
                 context_block: str = "cross_attention",
                 act_layer: Callable[[], nn.Module] = nn.SiLU,
                 norm_layer: Callable[..., nn.Module] = group_norm, upsample_mode: str = "bilinear",
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        in_channels, skip_channels, out_channels = (positive_int(n, v) for n, v in (
            ("in_channels", in_channels), ("skip_channels", skip_channels), ("out_channels", out_channels)))
        self.in_channels, self.skip_channels, self.out_channels = in_channels, skip_channels, out_channels
        self.upsample_mode = upsample_mode
        self.proj_x = nn.Conv2d(in_channels, out_channels, 1, bias=False, **dd)
        self.proj_skip = nn.Conv2d(skip_channels, out_channels, 1, bias=False, **dd)
        self.norm = norm_layer(out_channels, **dd)
        self.act = act_layer()
        self._init_tail(out_channels, cond_dim, context_dim, heads, act_layer, norm_layer, dd, film_bias,
                        time_conditioning, blocks, context_block)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Upsample ``x``, merge ``skip`` and run one decoder level.

        Args:
            x: ``(B, C_in, h, w)`` coarser map.
            skip: ``(B, C_s, 2h, 2w)`` encoder map at the output resolution.
            cond: ``(B, cond_dim)`` FiLM vector, required iff ``cond_dim`` is set.
            context: ``(B, L, context_dim)`` cross-attention tokens, required iff ``context_dim`` is set.
            context_mask: optional ``(B, L)`` bool, True = that context token is NOT attended.

        Returns:
            ``(B, C_out, 2h, 2w)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        expected = (x.shape[0], self.skip_channels, 2 * x.shape[2], 2 * x.shape[3])
        if skip.shape != expected:
            raise ValueError(f"skip: expected {expected}, got {tuple(skip.shape)}")
        check_float_input(x, "x", self.proj_x.weight.dtype)
        check_float_input(skip, "skip", self.proj_skip.weight.dtype)
        _check_cond(cond, self.cond_dim, x.shape[0])
        _check_context(context, self.context_dim, x.shape[0])
        align = True if self.upsample_mode in ("bilinear", "bicubic") else None
        up = F.interpolate(self.proj_x(x), scale_factor=2.0, mode=self.upsample_mode, align_corners=align)
        h = self.act(self.norm(up + self.proj_skip(skip)))
        return self._tail(h, cond, context, context_mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, skip={self.skip_channels}, {self.out_channels}, "
                f"upsample_mode={self.upsample_mode!r}")
