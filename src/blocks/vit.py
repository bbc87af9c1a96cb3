"""Vision transformer on small matrices, with side parameters joined to the pooled tokens.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. https://arxiv.org/abs/2010.11929
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .heads import SideHead
from .posenc import LearnedPositionalEmbedding, sincos_2d
from .transformer import TransformerBlock

__all__ = ["ViT2d"]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name}: expected an int or (h, w) >= 1, got {value}")
    return pair


class ViT2d(nn.Module):
    r"""Patch transformer for ``(B, C, H, W)`` inputs with side parameters concatenated before the head.

    System A's ``ViT2DWithParams`` (seed research A5) built from blockyard blocks:

    .. math::
        z &= \mathrm{PatchEmbed}(\mathrm{pad}(x)) + E_{pos} \\
        f &= \mathrm{mean}_n\, \mathrm{LN}(\mathrm{Block}^{depth}(z))_n \\
        s &= \mathrm{ReLU}(W_s\, \mathrm{side} + b_s) \\
        y &= \mathrm{MLP}(\mathrm{LN}([f, s]))

    The patch embedding is a ``patch_size``-strided conv (the same map as the seed's Linear on
    flattened patches). Side parameters follow the seed: projected to ``side_hidden`` (default
    ``dim``) and concatenated with the mean-pooled tokens, not fed as a token. The head, a
    :class:`SideHead`, is ``LayerNorm -> Linear -> ReLU -> [Dropout] -> Linear`` (hidden 256 in
    the seed).

    Padding rule: an ``H`` or ``W`` that is not a multiple of ``patch_size`` is zero-padded at
    the bottom / right up to the next multiple (System A's matrices are zero-padded the same
    way); ``pad=False`` raises instead. Padded patches take part in attention and pooling.

    Positions: with ``img_size`` set, a learned table for the ``ceil(img_size / patch_size)``
    grid (the seed: 6x6 inputs, patch 3, 4 positions); a smaller input uses the table's top-left
    sub-grid, a larger one raises. With ``img_size=None`` a fixed 2-D sin-cos table
    (:func:`sincos_2d`, needs ``dim % 4 == 0``) is built for whatever grid the input has.

    Deviations from the seed (``nn.TransformerEncoder``, post-norm, dropout 0.1): the blocks are
    blockyard's pre-norm :class:`TransformerBlock` (identity at init, ``drop_path`` instead of
    dropout) followed by a final LayerNorm. The seed's setting is ``patch_size=3, dim=128,
    depth=4, heads=8, mlp_ratio=2.0, act_layer=nn.ReLU, img_size=6``.

    Args:
        in_channels: input channels ``C``.
        patch_size: side of the square patches.
        dim: token width (divisible by ``heads``).
        depth: number of transformer blocks.
        heads: attention heads.
        side_dim: size of the side-parameter vector; 0 = none.
        out_dim: output features.
        img_size: largest input ``H, W`` for a learned position table, or None for sin-cos.
        mlp_ratio: transformer MLP width over ``dim``.
        side_hidden: width of the side projection (default ``dim``).
        head_hidden: hidden widths of the head MLP.
        dropout: dropout after each hidden activation of the head.
        drop_path: stochastic depth of every transformer branch.
        pad: zero-pad to a multiple of ``patch_size`` (else raise).
        act_layer: transformer MLP activation.
        head_act_layer: activation of the side projection and the head.

    Shapes:
        - x: ``(B, C, H, W)``
        - side: ``(B, side_dim)``, required iff ``side_dim > 0``
        - output: ``(B, out_dim)``
    """

    def __init__(self, in_channels: int, patch_size: int, dim: int, depth: int, heads: int, side_dim: int = 0,
                 out_dim: int = 1, img_size: int | tuple[int, int] | None = None, mlp_ratio: float = 4.0,
                 side_hidden: int | None = None, head_hidden: int | Sequence[int] = (256,), dropout: float = 0.0,
                 drop_path: float = 0.0, pad: bool = True, act_layer: Callable[[], nn.Module] = nn.GELU,
                 head_act_layer: Callable[[], nn.Module] = nn.ReLU, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("patch_size", patch_size), ("dim", dim),
                            ("heads", heads), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if depth < 0 or side_dim < 0:
            raise ValueError(f"depth, side_dim: expected >= 0, got {depth}, {side_dim}")
        if dim % heads != 0:
            raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
        if img_size is None and dim % 4 != 0:
            raise ValueError(f"dim: the sin-cos positions (img_size=None) need a multiple of 4, got {dim}")
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.dim = dim
        self.side_dim = side_dim
        self.pad = pad
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, **dd)
        self.grid: tuple[int, int] | None = None
        self.pos_embed: LearnedPositionalEmbedding | None = None
        if img_size is not None:
            size = _pair(img_size, "img_size")
            self.grid = (-(-size[0] // patch_size), -(-size[1] // patch_size))
            self.pos_embed = LearnedPositionalEmbedding(self.grid[0] * self.grid[1], dim, **dd)
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, drop_path=drop_path,
                                                      act_layer=act_layer, **dd) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, **dd)
        side_hidden = dim if side_hidden is None else side_hidden
        self.head = SideHead(dim, side_dim=side_dim, out_dim=out_dim, side_hidden=side_hidden, hidden=head_hidden,
                             dropout=dropout, act_layer=head_act_layer, norm_layer=nn.LayerNorm, **dd)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for block in self.blocks:  # re-zero the residual branches after their Linears were reset
            block.reset_parameters()

    def _check(self, x: torch.Tensor, side: torch.Tensor | None) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        p = self.patch_size
        if not self.pad and (x.shape[2] % p or x.shape[3] % p):
            raise ValueError(f"x: expected H and W multiples of patch_size={p} (pad=False), got {tuple(x.shape)}")
        if self.grid is not None:
            gh, gw = -(-x.shape[2] // p), -(-x.shape[3] // p)
            if gh > self.grid[0] or gw > self.grid[1]:
                limit = (self.grid[0] * p, self.grid[1] * p)
                raise ValueError(f"x: expected H <= {limit[0]} and W <= {limit[1]} (img_size), "
                                 f"got {tuple(x.shape)}")
        self.head.check_side(side, x.shape[0])

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ``out_dim`` values from the mean-pooled patch tokens and the side parameters.

        Args:
            x: ``(B, C, H, W)``, zero-padded to a multiple of ``patch_size`` when ``pad``.
            side: ``(B, side_dim)``, required iff ``side_dim > 0`` (else None).

        Returns:
            ``(B, out_dim)``.
        """
        self._check(x, side)
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))
        z = self.patch_embed(x)
        gh, gw = z.shape[2], z.shape[3]
        z = rearrange(z, "b c h w -> b (h w) c")
        if self.pos_embed is not None:
            rows = torch.arange(gh, device=z.device)[:, None] * self.grid[1]
            z = self.pos_embed(z, (rows + torch.arange(gw, device=z.device)).flatten())
        else:
            z = z + sincos_2d(gh, gw, self.dim, device=z.device, dtype=z.dtype)
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z).mean(dim=1), side)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, dim={self.dim}, side_dim={self.side_dim}, grid={self.grid}"
