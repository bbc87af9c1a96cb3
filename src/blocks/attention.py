"""Multi-head attention: self-attention, cross-attention and a residual self-attention over the
positions of a feature map (the pre-norm transformer block is in ``transformer.py``).

Vaswani et al., "Attention Is All You Need", NeurIPS 2017. https://arxiv.org/abs/1706.03762

Mask polarity everywhere in this file: ``True`` (or a nonzero integer) means *masked*, i.e. that
key is NOT attended. This is the opposite of the boolean ``attn_mask`` of
``F.scaled_dot_product_attention`` (where True means "take part"); the conversion happens in
:func:`masked_attention` only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._attention_args import attn_bias_4d, check_tokens, head_dim, key_mask, zero_blind_queries
from ._checks import check_float_input, positive_int

__all__ = ["Attention", "BottleneckAttention", "CrossAttention", "masked_attention"]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, fused: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""Scaled dot-product attention with a True-means-masked boolean mask and defined empty rows.

    .. math::
        \mathrm{out} = \mathrm{softmax}\big(q k^\top / \sqrt{D} + A + M\big)\, v,
        \qquad M_{ij} = -\infty \text{ where } \mathrm{mask}_{ij} \text{ else } 0

    with ``A`` the optional additive ``bias`` (e.g. ALiBi, :func:`~blockyard.blocks.alibi_bias`;
    0 when None). A query row whose keys are all masked has an empty softmax; its output is defined
    as 0 (the empty weighted sum) in both paths, forward and backward stay finite (no NaN).

    Args:
        q, k, v: queries, keys and values, heads already split.
        mask: bool, ``True`` = this key is NOT attended; broadcastable to ``(B, H, Nq, Nk)``.
        dropout_p: dropout on the attention weights (pass 0 in eval).
        fused: ``F.scaled_dot_product_attention`` if True, else the softmax written out (the
            reference path; both agree to float32 rounding).
        bias: finite additive logits (cast to the scores' dtype); exclusions go in ``mask``, not as
            ``-inf`` here (an all ``-inf`` row would be NaN).

    Shapes:
        - q: ``(B, H, Nq, D)``; k: ``(B, H, Nk, D)``; v: ``(B, H, Nk, Dv)``
        - mask: broadcastable to ``(B, H, Nq, Nk)``, e.g. ``(B, 1, 1, Nk)``
        - bias: floating, broadcastable to ``(B, H, Nq, Nk)``, e.g. ``(1, H, Nq, Nk)``
        - output: ``(B, H, Nq, Dv)``
    """
    scale = q.shape[-1] ** -0.5
    empty = None
    if mask is not None:
        empty = mask.all(dim=-1, keepdim=True)
        # Empty rows attend to every key instead (finite softmax, finite gradients) and are zeroed
        # below, so no -inf row ever reaches the softmax.
        mask = mask & ~empty
    if fused:
        attn_mask = None if mask is None else ~mask
        if bias is not None:  # SDPA adds a float mask to the scores: bias, -inf where masked
            bias = bias.to(q.dtype)
            attn_mask = bias if mask is None else torch.where(mask, float("-inf"), bias)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    else:
        scores = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        # softmax in float32: half-precision exponent sums lose the small weights.
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        if dropout_p > 0.0:
            weights = F.dropout(weights, dropout_p, training=True)
        out = weights @ v
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out


class Attention(nn.Module):
    r"""Multi-head self-attention over tokens, with a fused (SDPA) and a written-out path.

    .. math::
        [q, k, v] = x W_{qkv}, \quad
        y = \mathrm{concat}_h\big(\mathrm{softmax}(q_h k_h^\top / \sqrt{D} + M)\, v_h\big) W_{proj}

    with ``D = dim // heads`` and :math:`M = -\infty` where ``mask`` is True. ``qkv`` is laid out
    ``(3, heads, D)`` along its output features (timm's layout, so weights can be copied).

    Relative positions, both optional and usable together: a ``rope`` module (e.g.
    ``RotaryEmbedding(dim // heads)``) rotates every head's ``q`` and ``k`` by ``positions`` before
    the scores (RoFormer, Su et al. 2021), and ``attn_bias`` is added to the scores of every query
    (e.g. ALiBi, :func:`~blockyard.blocks.alibi_bias`, Press et al. 2021). Without them the forward is
    exactly the plain one.

    Mask: ``True`` = this key is NOT attended (masked), ``False`` = attended. A query that sees no
    key (every key masked for it in every head) outputs exactly 0, never NaN; within one head a
    query with no visible key contributes a zero mix.

    Args:
        dim: token width ``C``; must be divisible by ``heads``.
        heads: number of heads.
        qkv_bias: bias in the ``qkv`` projection.
        proj_bias: bias in the output projection ``proj``.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        fused: use ``F.scaled_dot_product_attention``; ``False`` runs the reference softmax path.
            A plain attribute, may be flipped after construction.
        rope: called as ``rope(t, positions)`` on ``q`` and ``k`` of shape ``(B, heads, N, D)``,
            e.g. :class:`~blockyard.blocks.RotaryEmbedding` with ``dim = D``; None for no rotation.

    Shapes:
        - x: ``(B, N, C)``, floating, of the parameters' dtype (any floating dtype under
          ``torch.autocast``); an integer or mismatched ``x`` raises a ``TypeError``
        - mask: ``(B, N)`` key padding, ``(B, N, N)`` or ``(B, heads, N, N)``, bool
        - positions: for ``rope``, ``(N,)`` or ``(B, N)``; None = ``0 .. N-1``
        - attn_bias: ``(N, N)``, ``(heads, N, N)`` or ``(B, heads, N, N)``, floating and finite
        - output: ``(B, N, C)``
    """

    def __init__(self, dim: int, heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True,
                 rope: nn.Module | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.head_dim = head_dim(dim, heads)
        if rope is not None and getattr(rope, "dim", self.head_dim) != self.head_dim:
            raise ValueError(f"rope: expected a rotary embedding over the head dim {self.head_dim} "
                             f"(dim // heads), got dim={rope.dim}")
        self.rope = rope
        self.dim = dim
        self.heads = heads
        self.attn_drop = attn_drop
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        self.proj.reset_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attend over the tokens of ``x``.

        Args:
            x: ``(B, N, C)`` tokens, floating, of the parameters' dtype (any floating dtype under autocast).
            mask: optional bool, True = that key is NOT attended: ``(B, N)`` key padding, ``(B, N, N)`` or
                ``(B, heads, N, N)``.
            positions: optional ``rope`` positions ``(N,)`` or ``(B, N)`` (default ``0 .. N-1``); only
                with a ``rope`` module.
            attn_bias: optional additive score bias ``(N, N)``, ``(heads, N, N)`` or ``(B, heads, N, N)``.

        Returns:
            ``(B, N, C)``; exactly 0 for a query that sees no key.
        """
        check_tokens(x, "x", self.dim)
        check_float_input(x, "x", self.qkv.weight.dtype)
        b, n, _ = x.shape
        mask = key_mask(mask, "mask", b, self.heads, n, n)
        attn_bias = attn_bias_4d(attn_bias, "attn_bias", b, self.heads, n, n)
        if positions is not None and self.rope is None:
            raise ValueError("positions: this Attention was built with rope=None, got positions")
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        out = masked_attention(q, k, v, mask, self.attn_drop if self.training else 0.0, self.fused, attn_bias)
        out = self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
        return zero_blind_queries(out, mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, fused={self.fused}"


class CrossAttention(nn.Module):
    r"""Multi-head attention from tokens ``x`` to a context sequence (plain op, no residual).

    .. math::
        q = x W_q, \quad [k, v] = c W_{kv}, \quad
        y = \mathrm{concat}_h\big(\mathrm{softmax}(q_h k_h^\top / \sqrt{D} + M)\, v_h\big) W_{proj}

    Mask: ``context_mask`` True = that context token is NOT attended. A query that sees no context
    token outputs exactly 0 (e.g. a sample whose whole context is padding), never NaN.

    Args:
        dim: query/output width; must be divisible by ``heads``.
        context_dim: width of the context tokens.
        heads: number of heads.
        qkv_bias: bias in the ``q`` and ``kv`` projections.
        proj_bias: bias in the output projection ``proj``.
        attn_drop, proj_drop: dropout on the weights and after ``proj`` (training only).
        fused: use ``F.scaled_dot_product_attention``; ``False`` runs the reference path.

    Shapes:
        - x: ``(B, N, dim)``
        - context: ``(B, L, context_dim)``
        - context_mask: ``(B, L)``, ``(B, N, L)`` or ``(B, heads, N, L)``, bool
        - output: ``(B, N, dim)``
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, qkv_bias: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 fused: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.head_dim = head_dim(dim, heads)
        self.dim = dim
        self.context_dim = positive_int("context_dim", context_dim)
        self.heads = heads
        self.attn_drop = attn_drop
        self.fused = fused
        self.q = nn.Linear(dim, dim, bias=qkv_bias, device=device, dtype=dtype)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def reset_parameters(self) -> None:
        for layer in (self.q, self.kv, self.proj):
            layer.reset_parameters()

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from the tokens ``x`` to ``context``.

        Args:
            x: ``(B, N, dim)`` query tokens.
            context: ``(B, L, context_dim)`` key/value tokens.
            context_mask: optional bool, True = that context token is NOT attended: ``(B, L)``,
                ``(B, N, L)`` or ``(B, heads, N, L)``.

        Returns:
            ``(B, N, dim)`` (no residual); exactly 0 for a query that sees no context token.
        """
        check_tokens(x, "x", self.dim)
        b, n, _ = x.shape
        check_tokens(context, "context", self.context_dim, batch=b)
        check_float_input(x, "x", self.q.weight.dtype)
        check_float_input(context, "context", self.kv.weight.dtype)
        mask = key_mask(context_mask, "context_mask", b, self.heads, n, context.shape[1])
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        out = masked_attention(q, k, v, mask, self.attn_drop if self.training else 0.0, self.fused)
        out = self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
        return zero_blind_queries(out, mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}, heads={self.heads}, fused={self.fused}"


class BottleneckAttention(nn.Module):
    r"""Residual pre-norm self-attention over the ``H*W`` positions of a feature map; identity at init.

    .. math::
        t = \mathrm{tokens}(x) \in \mathbb{R}^{B \times HW \times C}, \qquad
        y = x + \mathrm{map}\big(\mathrm{Attn}(\mathrm{LN}(t))\big)

    LayerNorm over ``C`` sits inside the residual branch (the seed's post-norm
    ``LN(t + MHA(t))`` is not the identity at init); ``attn.proj`` is zero-initialised, so
    ``y == x`` exactly until it is trained. No positional encoding (as in the seed).

    Args:
        channels: ``C``; must be divisible by ``heads``.
        heads: number of heads.
        qkv_bias: bias in the ``qkv`` projection.
        fused: attention path, see :class:`Attention`.

    Shapes:
        - x: ``(B, C, H, W)``
        - mask: optional ``(B, H, W)`` bool, True = that position is NOT attended as a key
          (e.g. padding); masked positions still receive an update
        - output: ``(B, C, H, W)``
    """

    def __init__(self, channels: int, heads: int = 4, qkv_bias: bool = False, fused: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.channels = positive_int("channels", channels)
        self.norm = nn.LayerNorm(channels, device=device, dtype=dtype)
        self.attn = Attention(channels, heads, qkv_bias=qkv_bias, fused=fused, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.attn.reset_parameters()
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Add self-attention over the ``H*W`` positions to ``x``.

        Args:
            x: ``(B, C, H, W)`` feature map.
            mask: optional ``(B, H, W)`` bool, True = that position is NOT attended as a key.

        Returns:
            ``(B, C, H, W)``: ``x`` plus the attention update (``x`` itself at init).
        """
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected (B, {self.channels}, H, W), got {tuple(x.shape)}")
        check_float_input(x, "x", self.attn.qkv.weight.dtype)
        b, _, h, w = x.shape
        if mask is not None:
            if tuple(mask.shape) != (b, h, w):
                raise ValueError(f"mask: expected ({b}, {h}, {w}), got {tuple(mask.shape)}")
            mask = mask.reshape(b, h * w)
        tokens = rearrange(x, "b c h w -> b (h w) c")
        update = self.attn(self.norm(tokens), mask)
        return x + rearrange(update, "b (h w) c -> b c h w", h=h, w=w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
