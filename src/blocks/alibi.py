"""ALiBi: attention with linear biases, a fixed per-head penalty proportional to the key's distance.

Press, Smith and Lewis, "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation", ICLR 2022. https://arxiv.org/abs/2108.12409 (reference code:
https://github.com/ofirpress/attention_with_linear_biases)
"""
from __future__ import annotations

import torch

from ._checks import positive_int

__all__ = ["alibi_bias", "alibi_slopes"]


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)  # the paper's 2 ** (-2 ** -(log2(n) - 3))
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(heads: int, device=None, dtype=None) -> torch.Tensor:
    r"""The head-specific ALiBi slopes ``m_h`` of Press et al. (2021).

    For a power of two ``H`` the slopes are the geometric sequence

    .. math::
        m_h = 2^{-8h/H}, \qquad h = 1, \dots, H

    (8 heads: 1/2, 1/4, ..., 1/256; 16 heads: :math:`2^{-1/2}, 2^{-1}, \dots, 2^{-8}`). Otherwise,
    as the paper's reference code does (``get_slopes``): the slopes of ``P``, the largest power of
    two below ``H``, followed by the first ``H - P`` of every other slope (indices 0, 2, 4, ...) of
    ``2P`` heads; for 12 heads that is :math:`2^{-1}, \dots, 2^{-8}` then
    :math:`2^{-1/2}, 2^{-3/2}, 2^{-5/2}, 2^{-7/2}`. Computed in float64, cast to ``dtype``.

    Args:
        heads: number of attention heads ``H``.

    Shapes:
        - output: ``(H,)`` (default dtype unless ``dtype`` is given)
    """
    heads = positive_int("heads", heads)
    closest = 1 << (heads.bit_length() - 1)  # largest power of two <= heads
    slopes = _power_of_two_slopes(closest)
    if closest != heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][:heads - closest]
    return torch.tensor(slopes, dtype=torch.float64, device=device).to(dtype or torch.get_default_dtype())


def alibi_bias(distances: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    r"""Additive attention logits ``-m_h * d_ij``: each head penalises keys linearly in their distance.

    .. math::
        A_{h,ij} = -\,m_h\, d_{ij}

    Pass the result as ``attn_bias`` to :class:`~blockyard.blocks.Attention` or
    :class:`~blockyard.blocks.TransformerBlock`. ``distances`` is any non-negative notion of how
    far key ``j`` is from query ``i``: for a token sequence ``(p[:, None] - p[None, :]).abs()``
    (the paper's causal bias ``-m (i - j)``, made symmetric for bidirectional attention), for
    points in space ``torch.cdist(x, x)``. Distances are not checked for sign (that would sync);
    ALiBi assumes ``d_ii = 0`` and ``d >= 0``. The paper's scale is 1 between neighbouring tokens.

    Args:
        distances: pairwise distances, floating.
        slopes: per-head slopes, e.g. :func:`alibi_slopes`.

    Shapes:
        - distances: ``(Nq, Nk)`` or ``(B, Nq, Nk)``
        - slopes: ``(H,)``
        - output: ``(H, Nq, Nk)`` or ``(B, H, Nq, Nk)``, dtype of ``distances`` and ``slopes`` promoted
    """
    if not distances.is_floating_point():
        raise TypeError(f"distances: expected a floating-point tensor, got {distances.dtype}")
    if distances.dim() not in (2, 3):
        raise ValueError(f"distances: expected (Nq, Nk) or (B, Nq, Nk), got {tuple(distances.shape)}")
    if slopes.dim() != 1 or slopes.numel() == 0 or not slopes.is_floating_point():
        raise ValueError(f"slopes: expected a floating (H,) tensor with H >= 1, got {slopes.dtype} "
                         f"{tuple(slopes.shape)}")
    return -slopes[:, None, None] * distances.unsqueeze(-3)
