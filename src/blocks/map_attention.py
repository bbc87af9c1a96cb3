"""A feature map's positions attending to a context sequence: the U-Net levels' context blocks.

Both read ``(B, C, H, W)`` as ``H*W`` tokens and write them back, residually, and both are the
identity at init. ``CONTEXT_BLOCKS`` maps :class:`~blockyard.blocks.UNet`'s ``context_block`` names
to them.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention
from .transformer import TransformerBlock

__all__ = ["CONTEXT_BLOCKS"]


class _MapCrossAttention(nn.Module):
    """Pre-norm residual cross-attention of a feature map's positions to a context sequence.

    ``x + CrossAttention(LayerNorm(tokens(x)), context)`` with the output projection zero-initialised,
    so it is the identity at init. For a channels-last ``x`` the token view is free (no copy).
    """

    def __init__(self, channels: int, context_dim: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads: expected a divisor of the level width {channels}, got {heads}")
        self.norm = nn.LayerNorm(channels, device=device, dtype=dtype)
        self.attn = CrossAttention(channels, context_dim, heads=heads, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.attn.proj.weight)
        if self.attn.proj.bias is not None:
            nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = self.attn(self.norm(tokens), context, context_mask)
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class _MapTransformer(nn.Module):
    """A :class:`~blockyard.blocks.TransformerBlock` (self-attention, cross-attention to the context,
    MLP; identity at init) over a feature map's positions, as diffusers' ``Transformer2DModel``."""

    def __init__(self, channels: int, context_dim: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads: expected a divisor of the level width {channels}, got {heads}")
        self.block = TransformerBlock(channels, heads=heads, context_dim=context_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.block(x.permute(0, 2, 3, 1).reshape(b, h * w, c), context, context_mask=context_mask)
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


CONTEXT_BLOCKS = {"cross_attention": _MapCrossAttention, "transformer": _MapTransformer}
