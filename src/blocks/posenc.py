"""Positional encodings: diffusion timesteps, 2-D sin-cos tables, learned tables, RoPE, coordinates."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "coord_channels",
    "sincos_2d",
    "timestep_embedding",
]


def _check_size(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    r"""Sinusoidal embedding of (possibly fractional) diffusion timesteps.

    Same numerics, operation order and keywords as diffusers' ``get_timestep_embedding``
    (Ho et al., DDPM, 2020; Vaswani et al., 2017). With ``h = dim // 2`` and ``s`` the shift:

    .. math::
        f_i = \exp\!\Big(-\ln(P)\,\frac{i}{h - s}\Big),\ i < h, \qquad
        e = [\sin(\text{scale}\, t f),\ \cos(\text{scale}\, t f)]

    ``flip_sin_to_cos`` puts the cosines first; an odd ``dim`` gets one trailing zero column.
    ``(flip_sin_to_cos=False, downscale_freq_shift=1)`` is lucidrains' ``SinusoidalPosEmb``;
    diffusers' ``UNet2DModel`` defaults are ``(True, 0)``. Unlike diffusers, a frequency grid
    that would divide by zero (``h <= s``) raises instead of returning NaN.

    Args:
        t: timesteps, one per sample.
        dim: embedding size.
        max_period: ``P``, the longest period is about ``2*pi*P``.
        flip_sin_to_cos: order ``[cos, sin]`` instead of ``[sin, cos]``.
        downscale_freq_shift: ``s`` in the exponent's denominator ``h - s``.
        scale: multiplies the arguments of sin and cos.

    Shapes:
        - t: ``(B,)`` of any real or integer dtype
        - output: ``(B, dim)`` float32
    """
    if t.dim() != 1:
        raise ValueError(f"t: expected (B,), got {tuple(t.shape)}")
    half = dim // 2
    if dim < 2 or half - downscale_freq_shift <= 0:
        raise ValueError(f"dim: expected dim // 2 > downscale_freq_shift ({downscale_freq_shift}), got dim={dim}")
    if max_period <= 0:
        raise ValueError(f"max_period: expected > 0, got {max_period}")
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - downscale_freq_shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0,
              device=None, dtype=None) -> torch.Tensor:
    r"""Fixed 2-D sin-cos position table for an ``height x width`` grid of tokens.

    Same layout as timm's ``build_sincos2d_pos_embed`` (defaults). With ``q = dim // 4`` bands
    ``\omega_i = T^{-i/q}``, the row of grid cell ``(y, x)`` is row index ``y * width + x``
    (row-major, matching ``x.flatten(2).transpose(1, 2)`` of a ``(B, C, H, W)`` map) and reads

    .. math::
        [\sin(y\,\omega),\ \sin(x\,\omega),\ \cos(y\,\omega),\ \cos(x\,\omega)]

    each block ``q`` wide, with integer coordinates ``y in [0, H)``, ``x in [0, W)``.

    Args:
        height: ``H``, number of token rows.
        width: ``W``, number of token columns.
        dim: embedding size, a multiple of 4.
        temperature: ``T``, the base of the geometric frequency ladder.

    Shapes:
        - output: ``(H * W, dim)``, no batch dim (broadcasts when added to ``(B, H*W, dim)``)
    """
    if dim < 4 or dim % 4 != 0:
        raise ValueError(f"dim: expected a positive multiple of 4, got {dim}")
    _check_size(height=height, width=width)
    q = dim // 4
    bands = 1.0 / temperature ** (torch.arange(q, device=device, dtype=torch.float32) / q)
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).flatten(1).transpose(0, 1)  # (HW, 2): y, x
    angles = grid[:, :, None] * bands  # (HW, 2, q)
    table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=1).flatten(1)  # sin y, sin x, cos y, cos x
    return table.to(dtype or torch.float32)


class LearnedPositionalEmbedding(nn.Module):
    r"""A learned table of position vectors added to a token sequence.

    .. math::
        y_{b,n} = x_{b,n} + E_{p_n}, \qquad E \sim \mathcal{TN}(0, 0.02^2, [-0.04, 0.04])

    (truncated at two standard deviations, so the table's empirical std is about 0.0176).
    By default token ``n`` gets row ``n``; ``positions`` picks other rows (e.g. the visible
    patches of a masked autoencoder). Rows of ``positions`` are not range-checked on the host
    (that would sync); out-of-range indices fail in the indexing kernel.

    Args:
        num_positions: number of rows ``P`` of the table (longest sequence).
        dim: embedding size.

    Shapes:
        - x: ``(B, N, dim)`` with ``N <= P`` when ``positions`` is None
        - positions: ``(N,)`` or ``(B, N)`` integer row indices, optional
        - output: same as ``x``, same dtype
    """

    def __init__(self, num_positions: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        _check_size(num_positions=num_positions, dim=dim)
        self.num_positions = num_positions
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(num_positions, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02, a=-0.04, b=0.04, generator=generator)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Add table rows to the tokens.

        Args:
            x: ``(B, N, dim)`` tokens.
            positions: optional ``(N,)`` or ``(B, N)`` integer rows of the table (default ``0 .. N-1``).

        Returns:
            ``x + E[positions]``, same shape and dtype as ``x``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, N, {self.dim}), got {tuple(x.shape)}")
        n = x.shape[1]
        if positions is None:
            if n > self.num_positions:
                raise ValueError(f"x: expected (B, N <= {self.num_positions}, {self.dim}), got {tuple(x.shape)}")
            return x + self.weight[:n].to(x.dtype)
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"positions: expected an integer tensor, got {positions.dtype}")
        if positions.shape not in ((n,), (x.shape[0], n)):
            raise ValueError(f"positions: expected ({n},) or ({x.shape[0]}, {n}), got {tuple(positions.shape)}")
        return x + self.weight[positions].to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_positions={self.num_positions}, dim={self.dim}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding (RoPE) in the rotate-half (GPT-NeoX / HF-LLaMA) layout.

    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    https://arxiv.org/abs/2104.09864

    Layout: channel ``i`` is paired with channel ``i + dim/2`` (not with ``i + 1`` as in the
    interleaved GPT-J / timm ``rot`` / x-transformers layout), and the pair is rotated by the angle
    ``p * theta_i`` with ``theta_i = base ** (-2i / dim)``:

    .. math::
        y = x \odot \cos(p\,\Theta) + \operatorname{rot}(x) \odot \sin(p\,\Theta),\qquad
        \operatorname{rot}([x_1, x_2]) = [-x_2, x_1],\qquad \Theta = [\theta, \theta]

    Applying it to queries and keys makes ``<rope(q, m), rope(k, n)>`` depend on ``m - n`` only.
    To use weights trained with the interleaved layout, permute the head channels of q and k by
    ``[0, 2, 4, ..., 1, 3, 5, ...]``. Angles and the rotation are computed in float32 and cast
    back to the input dtype (float64 stays float64); there are no buffers, so ``module.to(bfloat16)`` loses nothing.

    Args:
        dim: head dimension (even); every channel is rotated.
        base: ``theta`` base of the frequency ladder.

    Shapes:
        - x: ``(B, heads, N, dim)`` or ``(B, N, dim)`` (queries or keys)
        - positions: ``(N,)`` or ``(B, N)``, integer or fractional; default ``0..N-1``
        - output: same as ``x``, same dtype
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2 != 0:
            raise ValueError(f"dim: expected a positive even number, got {dim}")
        if base <= 0:
            raise ValueError(f"base: expected > 0, got {base}")
        self.dim = dim
        self.base = base

    def angles(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rotation angles ``(..., dim)`` (each frequency twice, rotate-half layout) for ``positions (...)``."""
        inv_freq = self.base ** (-torch.arange(0, self.dim, 2, device=positions.device, dtype=dtype) / self.dim)
        freqs = positions.to(dtype)[..., None] * inv_freq
        return torch.cat([freqs, freqs], dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate the channel pairs ``(i, i + dim/2)`` of ``x`` by ``positions * theta_i``.

        Args:
            x: ``(B, heads, N, dim)`` or ``(B, N, dim)`` queries or keys.
            positions: optional ``(N,)`` or ``(B, N)`` positions, integer or fractional (default ``0 .. N-1``).

        Returns:
            Same shape and dtype as ``x`` (angles computed in float32).
        """
        if x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, heads, N, {self.dim}) or (B, N, {self.dim}), got {tuple(x.shape)}")
        batch, n = x.shape[0], x.shape[-2]
        if positions is None:
            positions = torch.arange(n, device=x.device)
        elif positions.shape not in ((n,), (batch, n)):
            raise ValueError(f"positions: expected ({n},) or ({batch}, {n}), got {tuple(positions.shape)}")
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        theta = self.angles(positions, xf.dtype)
        if theta.dim() == 3 and x.dim() == 4:
            theta = theta[:, None]  # (B, 1, N, dim): same positions for every head
        return (xf * theta.cos() + _rotate_half(xf) * theta.sin()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


def coord_channels(batch: int, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Coordinate maps (CoordConv): channel 0 is the row ``y``, channel 1 the column ``x``.

    Liu et al., "An Intriguing Failing of Convolutional Neural Networks and the CoordConv
    Solution", NeurIPS 2018. https://arxiv.org/abs/1807.03247

    Each coordinate runs linearly from 0 (first row / column) to 1 (last); an axis of size 1
    is all 0. Concatenate with a ``(B, C, H, W)`` input along dim 1.

    Args:
        batch: ``B``.
        height: ``H``.
        width: ``W``.

    Shapes:
        - output: ``(B, 2, H, W)``, contiguous (default dtype unless ``dtype`` is given)
    """
    if batch < 0:
        raise ValueError(f"batch: expected >= 0, got {batch}")
    _check_size(height=height, width=width)
    ys = torch.linspace(0.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(0.0, 1.0, width, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W)
    return grid.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
