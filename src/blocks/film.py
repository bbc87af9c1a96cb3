"""Feature-wise linear modulation.

Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018.
https://arxiv.org/abs/1709.07871
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_float_input, positive_int

__all__ = ["FiLM"]


class FiLM(nn.Module):
    r"""Per-channel affine modulation from a conditioning vector, the identity at init.

    .. math::
        y = x \odot (1 + \gamma(c)) + \beta(c), \qquad [\gamma, \beta] = W c + b

    ``W`` and ``b`` are zero-initialised, so ``y == x`` exactly until the projection is trained
    (the seed's ``weight=0, bias=1`` parametrisation of ``gamma`` is the same function).

    Args:
        cond_dim: size of the conditioning vector ``c``.
        channels: number of channels ``C`` of ``x`` (dim 1).
        bias: learn ``b``. With ``bias=False`` a zero ``c`` is the identity at any point of
            training (FusionNet zeroes ``c`` for an empty history so that it stays "no context").

    Shapes:
        - x: ``(B, C, *spatial)`` with any number (0 included) of trailing dims
        - cond: ``(B, cond_dim)``, floating, the projection's dtype (any float dtype under autocast)
        - output: same as ``x``
    """

    def __init__(self, cond_dim: int, channels: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.cond_dim = positive_int("cond_dim", cond_dim)
        self.channels = positive_int("channels", channels)
        self.proj = nn.Linear(cond_dim, 2 * channels, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Scale and shift the channels of ``x`` by ``cond``.

        Args:
            x: ``(B, C, *spatial)``, any number (0 included) of trailing dims.
            cond: ``(B, cond_dim)`` conditioning vector, floating.

        Returns:
            ``x * (1 + gamma) + beta``, same shape as ``x``.
        """
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected (B, {self.channels}, *spatial), got {tuple(x.shape)}")
        if cond.dim() != 2 or cond.shape != (x.shape[0], self.cond_dim):
            raise ValueError(f"cond: expected ({x.shape[0]}, {self.cond_dim}), got {tuple(cond.shape)}")
        check_float_input(cond, "cond", self.proj.weight.dtype)
        gamma, beta = self.proj(cond).chunk(2, dim=-1)
        view = (*gamma.shape, *([1] * (x.dim() - 2)))
        return x * (1 + gamma.view(view)) + beta.view(view)

    def extra_repr(self) -> str:
        return f"cond_dim={self.cond_dim}, channels={self.channels}"
