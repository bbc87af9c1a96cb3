"""FNO residual blocks and the hybrid U-shaped neural operator built from them.

Li et al., "Fourier Neural Operator for Parametric Partial Differential Equations", ICLR 2021;
Rahman et al., "U-NO: U-shaped Neural Operators", TMLR 2023. The norm-last zero-gamma and
LayerScale variants follow the PtychoPINN FNO-stability study and Touvron et al., "Going deeper
with Image Transformers" (LayerScale), ICCV 2021.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .spectral import SpectralConv2d

__all__ = ["FNOBlock", "StableFNOBlock"]


class _SpectralBranch(nn.Module):
    """``act(spectral(x) + conv3x3(x))``: the update shared by both FNO blocks."""

    def __init__(self, channels: int, modes, act_layer: Callable[[], nn.Module], dd: dict) -> None:
        super().__init__()
        self.spectral = SpectralConv2d(channels, channels, modes, **dd)
        self.local_conv = nn.Conv2d(channels, channels, 3, padding=1, **dd)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.spectral(x) + self.local_conv(x))


class FNOBlock(nn.Module):
    r"""FNO block with an outer residual.

    .. math:: y = x + \sigma\big(\mathcal{K}x + W x\big)

    with :math:`\mathcal{K}` a :class:`SpectralConv2d` and :math:`W` a 3x3 convolution. The
    update is post-activation, so with GELU its mean is positive: deep stacks drift (the FNO
    stability seed's hypothesis, measurable with ``blockyard.train.ActivationMonitor``).

    Args:
        channels: channels ``C`` (in = out).
        modes: ``m`` or ``(m1, m2)`` of the spectral convolution.
        act_layer: activation.

    Shapes:
        - x: ``(B, C, H, W)``
        - output: ``(B, C, H, W)``
    """

    def __init__(self, channels: int, modes: int | tuple[int, int] = 12,
                 act_layer: Callable[[], nn.Module] = nn.GELU, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = channels
        self.branch = _SpectralBranch(channels, modes, act_layer, {"device": device, "dtype": dtype})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the activated spectral + 3x3 convolution update to ``x``.

        Args:
            x: ``(B, C, H, W)``, any ``H, W``.

        Returns:
            ``(B, C, H, W)``.
        """
        return x + self.branch(x)


class StableFNOBlock(nn.Module):
    r"""Norm-last FNO block whose residual update starts at (or near) zero.

    .. math:: y = x + s \odot \mathrm{IN}\big(\sigma(\mathcal{K}x + W x)\big)

    - ``scale="zero_gamma"``: :math:`s = 1` and the InstanceNorm's affine weight and bias start
      at zero, so the block is exactly the identity at init. The branch's own weights get zero
      gradient until the affine weight moves (and AGC, which clips relative to the parameter
      norm, keeps a zero-initialised weight frozen: combine them knowingly).
    - ``scale="layerscale"``: the InstanceNorm's affine starts at (1, 0) and a per-channel gate
      :math:`s` starts at ``layerscale_init``: near-identity, with gradient everywhere.

    Args:
        channels: channels ``C``.
        modes: ``m`` or ``(m1, m2)`` of the spectral convolution.
        scale: ``"zero_gamma"`` or ``"layerscale"``.
        layerscale_init: initial gate value for ``"layerscale"``.
        act_layer: activation.
        eps: InstanceNorm epsilon.

    Shapes:
        - x: ``(B, C, H, W)`` with ``H * W > 1`` (InstanceNorm of one pixel is undefined)
        - output: ``(B, C, H, W)``
    """

    def __init__(self, channels: int, modes: int | tuple[int, int] = 12,
                 scale: Literal["zero_gamma", "layerscale"] = "zero_gamma", layerscale_init: float = 1e-3,
                 act_layer: Callable[[], nn.Module] = nn.GELU, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        if scale not in ("zero_gamma", "layerscale"):
            raise ValueError(f"scale: expected 'zero_gamma' or 'layerscale', got {scale!r}")
        dd = {"device": device, "dtype": dtype}
        self.channels, self.scale, self.layerscale_init = channels, scale, layerscale_init
        self.branch = _SpectralBranch(channels, modes, act_layer, dd)
        self.norm = nn.InstanceNorm2d(channels, eps=eps, affine=True, **dd)
        self.gamma = nn.Parameter(torch.empty(channels, **dd)) if scale == "layerscale" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.gamma is None:
            nn.init.zeros_(self.norm.weight)
        else:
            nn.init.ones_(self.norm.weight)
            nn.init.constant_(self.gamma, self.layerscale_init)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the scaled, instance-normalised FNO update to ``x``.

        Args:
            x: ``(B, C, H, W)`` with ``H * W > 1``.

        Returns:
            ``(B, C, H, W)``; exactly ``x`` at init with ``scale="zero_gamma"``.
        """
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"x: expected (B, {self.channels}, H, W) with H * W > 1, got {tuple(x.shape)}")
        h = self.branch(x)
        # Statistics in float32 for half inputs (under autocast too), float64 kept; the affine in the same dtype.
        compute = torch.promote_types(h.dtype, torch.float32)
        norm = self.norm
        update = F.instance_norm(h.to(compute), weight=norm.weight.to(compute), bias=norm.bias.to(compute),
                                 eps=norm.eps).to(h.dtype)
        if self.gamma is not None:
            update = update * self.gamma.view(1, -1, 1, 1)
        return x + update

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale!r}"
