"""Pre-norm transformer block built from :mod:`blockyard.blocks.attention`.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017; pre-norm as in Xiong et al., "On
Layer Normalization in the Transformer Architecture", ICML 2020. Masks: ``True`` = masked.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._attention_args import check_tokens
from .attention import Attention, CrossAttention
from .drop import DropPath
from .heads import MLP

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    r"""Pre-norm transformer block: self-attention, optional cross-attention, MLP; identity at init.

    .. math::
        x &\leftarrow x + \mathrm{DropPath}(\mathrm{Attn}(\mathrm{LN}_1 x)) \\
        x &\leftarrow x + \mathrm{DropPath}(\mathrm{CrossAttn}(\mathrm{LN}_2 x, c))
            \quad\text{(only when context\_dim is set)} \\
        x &\leftarrow x + \mathrm{DropPath}(\mathrm{MLP}(\mathrm{LN}_3 x))

    With ``zero_init=True`` (default) the last layer of every branch (``attn.proj``,
    ``cross.proj``, ``mlp.out``) starts at zero, so the block is exactly the identity at init.

    Args:
        dim: token width; must be divisible by ``heads``.
        heads: number of attention heads.
        mlp_ratio: MLP hidden width is ``int(dim * mlp_ratio)``.
        context_dim: width of the context tokens; ``None`` builds no cross-attention.
        drop_path: stochastic-depth probability of each residual branch.
        act_layer: MLP activation.
        norm_layer: called as ``norm_layer(dim)`` for each pre-norm.
        qkv_bias: bias in the attention input projections.
        zero_init: zero the last layer of each branch (identity at init).
        fused: attention path, see :class:`Attention`.
        rope: rotary embedding of the self-attention's ``q`` and ``k`` (e.g.
            ``RotaryEmbedding(dim // heads)``), see :class:`Attention`; None for none.

    Shapes:
        - x: ``(B, N, dim)``
        - context: ``(B, L, context_dim)``, required iff ``context_dim`` is set
        - mask: self-attention key mask, see :class:`Attention` (True = masked)
        - context_mask: context key mask, see :class:`CrossAttention` (True = masked)
        - positions: self-attention ``rope`` positions ``(N,)`` or ``(B, N)``, see :class:`Attention`
        - attn_bias: additive self-attention bias ``(N, N)``, ``(heads, N, N)`` or ``(B, heads, N, N)``
          (e.g. ALiBi), see :class:`Attention`
        - output: ``(B, N, dim)``
    """

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 drop_path: float = 0.0, act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, qkv_bias: bool = False,
                 zero_init: bool = True, fused: bool = True, rope: nn.Module | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.context_dim = context_dim
        self.zero_init = zero_init
        kw = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim).to(**kw)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, fused=fused, rope=rope, **kw)
        self.drop_path1 = DropPath(drop_path)
        if context_dim is not None:
            self.norm2 = norm_layer(dim).to(**kw)
            self.cross = CrossAttention(dim, context_dim, heads, qkv_bias=qkv_bias, fused=fused, **kw)
            self.drop_path2 = DropPath(drop_path)
        self.norm3 = norm_layer(dim).to(**kw)
        self.mlp = MLP(dim, hidden=(int(dim * mlp_ratio),), out_dim=dim, act_layer=act_layer, **kw)
        self.drop_path3 = DropPath(drop_path)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.zero_init:
            return
        lasts = [self.attn.proj, self.mlp.out] + ([self.cross.proj] if self.context_dim is not None else [])
        for layer in lasts:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the self-attention, cross-attention (if built) and MLP branches.

        Args:
            x: ``(B, N, dim)`` tokens.
            context: ``(B, L, context_dim)``, required iff ``context_dim`` is set.
            mask: optional self-attention key mask, True = masked (see :class:`Attention`).
            context_mask: optional context key mask, True = masked (see :class:`CrossAttention`).
            positions: optional ``rope`` positions ``(N,)`` or ``(B, N)``.
            attn_bias: optional additive self-attention bias ``(N, N)``, ``(heads, N, N)`` or
                ``(B, heads, N, N)`` (e.g. ALiBi).

        Returns:
            ``(B, N, dim)``; exactly ``x`` at init with ``zero_init``.
        """
        check_tokens(x, "x", self.dim)
        if self.context_dim is None and (context is not None or context_mask is not None):
            raise ValueError("context: this block was built with context_dim=None, got a context")
        if self.context_dim is not None and context is None:
            raise ValueError(f"context: expected ({x.shape[0]}, L, {self.context_dim}), got None")
        x = x + self.drop_path1(self.attn(self.norm1(x), mask, positions, attn_bias))
        if self.context_dim is not None:
            x = x + self.drop_path2(self.cross(self.norm2(x), context, context_mask))
        return x + self.drop_path3(self.mlp(self.norm3(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"
