"""GroupNorm U-Net with optional FiLM, cross-attention and bottleneck self-attention.

Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015.
https://arxiv.org/abs/1505.04597. Levels follow the seed's FusionNet (1x1 projection, GroupNorm,
activation, residual block, FiLM after the level); cross-attention follows diffusers'
``UNet2DConditionModel`` (pre-norm, residual, at the lowest resolutions).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_float_input, positive_int
from .attention import BottleneckAttention
from .group_norm import group_norm
from .resblock import ResBlock
from .unet_levels import DecoderLevel, EncoderLevel, _check_cond, _check_context

__all__ = ["UNet"]


class UNet(nn.Module):
    r"""GroupNorm U-Net on any H x W, with optional FiLM, cross-attention and bottleneck attention.

    ``L = len(widths)`` levels; level ``i`` runs at ``1/2**i`` of the (padded) input resolution
    with ``widths[i]`` channels. Encoder level ``i`` is an :class:`EncoderLevel` (max-pool for
    ``i > 0``), the bottleneck is a :class:`~blockyard.blocks.ResBlock` (+ ``Dropout2d``) followed,
    when ``attention=True``, by :class:`~blockyard.blocks.BottleneckAttention`; decoder level
    ``i < L - 1`` is a :class:`DecoderLevel` from level ``i + 1`` with encoder level ``i`` as skip.
    A 1x1 convolution maps the last decoder map (``widths[0]`` channels) to ``out_channels``.

    - FiLM from ``cond`` ends every encoder and decoder level (``2L - 1`` of them), identity at init;
      with ``time_conditioning="scale_shift"`` it sits inside every residual block instead.
    - Cross-attention to ``context`` ends the levels at the ``context_levels`` lowest resolutions
      (encoder and decoder), pre-norm, residual, zero-initialised output projection.
    - H and W are zero-padded (bottom, right) to a multiple of ``2**(L - 1)`` and the output is
      cropped back, so any input size works. GroupNorm statistics include the padded zeros.

    Speed on CPU: ``model.to(memory_format=torch.channels_last)`` with a channels-last input under
    bfloat16 autocast is the fast path (every op here keeps the layout; see benchmarks/blocks.py).

    Own heads: :meth:`features` returns the last decoder map ``(B, widths[0], H, W)`` (cropped),
    and ``out_channels=None`` makes ``forward`` return it too (FusionNet puts two heads on it).

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``, or ``None`` for no output convolution.
        widths: channels of each level, finest first; ``len(widths) >= 1``.
        cond_dim: size of the FiLM vector ``cond``; ``None`` builds no FiLM (and rejects ``cond``).
        context_dim: feature size of ``context``; ``None`` builds no cross-attention.
        attention: self-attention over the bottleneck positions.
        heads: heads of the cross- and self-attention (must divide the widths they act on).
        context_levels: how many of the lowest resolutions get cross-attention.
        dropout: ``Dropout2d`` probability after the bottleneck residual block (FusionNet: 0.15).
        time_conditioning: where ``cond`` enters: ``"film"`` after each level's residual blocks, or
            ``"scale_shift"`` inside every residual block (the bottleneck's too), after its first norm.
        blocks_per_level: residual blocks in each encoder and decoder level.
        context_block: how ``context`` enters: ``"cross_attention"`` or ``"transformer"`` (see
            :class:`EncoderLevel`).
        stem: how the first level reads the input: ``"conv"`` (a 3x3 convolution with bias, no norm)
            or ``"projection"`` (1x1 convolution, GroupNorm, activation, as FusionNet's levels). A norm
            on the raw input divides out each sample's scale, which a denoiser needs: on the
            class-conditional digits benchmark (benchmarks/diffusion_peer.py) ``"projection"``
            generated the asked-for digit 0.876 of the time without guidance, ``"conv"`` 0.962.
        act_layer, norm_layer: as in :class:`~blockyard.blocks.ResBlock`.
        upsample_mode: as in :class:`DecoderLevel`.

    Shapes:
        - x: ``(B, C_in, H, W)``; cond: ``(B, cond_dim)``; context: ``(B, L_ctx, context_dim)``
        - context_mask: optional ``(B, L_ctx)`` bool, True = that context token is NOT attended
        - output: ``(B, C_out, H, W)``, or ``(B, widths[0], H, W)`` when ``out_channels`` is None

    ``x`` must be floating point and of the parameters' dtype (float32, bfloat16, float16 or
    float64), any floating dtype under ``torch.autocast``; otherwise a ``TypeError`` names it.
    """

    def __init__(self, in_channels: int, out_channels: int | None,
                 widths: tuple[int, ...] | list[int] = (32, 64, 128, 256), cond_dim: int | None = None,
                 context_dim: int | None = None, attention: bool = False, heads: int = 4, *,
                 context_levels: int = 2, dropout: float = 0.0, time_conditioning: str = "film",
                 blocks_per_level: int = 1, context_block: str = "cross_attention", stem: str = "conv",
                 act_layer: Callable[[], nn.Module] = nn.SiLU,
                 norm_layer: Callable[..., nn.Module] = group_norm, upsample_mode: str = "bilinear",
                 device=None, dtype=None) -> None:
        super().__init__()
        in_channels = positive_int("in_channels", in_channels)
        out_channels = positive_int("out_channels", out_channels, optional=True)
        widths = tuple(widths)
        if len(widths) < 1:
            raise ValueError(f"widths: expected at least one positive width, got {widths}")
        widths = tuple(positive_int(f"widths[{i}]", w) for i, w in enumerate(widths))
        cond_dim = positive_int("cond_dim", cond_dim, optional=True)
        context_dim = positive_int("context_dim", context_dim, optional=True)
        heads = positive_int("heads", heads)
        context_levels = positive_int("context_levels", context_levels, minimum=0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        if attention and widths[-1] % heads:
            raise ValueError(f"heads: expected a divisor of the bottleneck width {widths[-1]}, got {heads}")
        dd = {"device": device, "dtype": dtype}
        levels = len(widths)
        self.in_channels, self.out_channels, self.widths = in_channels, out_channels, widths
        self.cond_dim, self.context_dim = cond_dim, context_dim
        self.multiple = 2 ** (levels - 1)
        kw = {"cond_dim": cond_dim, "heads": heads, "act_layer": act_layer, "norm_layer": norm_layer,
              "time_conditioning": time_conditioning, "blocks": blocks_per_level, "context_block": context_block, **dd}

        def ctx(i: int) -> int | None:
            return context_dim if i >= levels - context_levels else None

        self.encoders = nn.ModuleList(
            EncoderLevel(in_channels if i == 0 else widths[i - 1], widths[i], downsample=i > 0,
                         context_dim=ctx(i), stem=stem if i == 0 else "projection", **kw) for i in range(levels))
        self.mid = ResBlock(widths[-1], cond_dim=cond_dim if time_conditioning == "scale_shift" else None,
                            act_layer=act_layer, norm_layer=norm_layer, **dd)
        self.mid_drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.mid_attn = BottleneckAttention(widths[-1], heads=heads, **dd) if attention else nn.Identity()
        self.decoders = nn.ModuleList(
            DecoderLevel(widths[i + 1], widths[i], widths[i], context_dim=ctx(i),
                         upsample_mode=upsample_mode, **kw) for i in reversed(range(levels - 1)))
        self.head = (nn.Conv2d(widths[0], out_channels, 1, **dd) if out_channels is not None
                     else nn.Identity())

    def _check(self, x: torch.Tensor, cond: torch.Tensor | None, context: torch.Tensor | None) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_float_input(x, "x", self.encoders[0].stem[0].weight.dtype)
        _check_cond(cond, self.cond_dim, x.shape[0])
        _check_context(context, self.context_dim, x.shape[0])

    def _padded_features(self, x: torch.Tensor, cond: torch.Tensor | None, context: torch.Tensor | None,
                         context_mask: torch.Tensor | None) -> torch.Tensor:
        pad_h, pad_w = -x.shape[2] % self.multiple, -x.shape[3] % self.multiple
        h = F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        skips = []
        for level in self.encoders:
            h = level(h, cond, *((context, context_mask) if level.context_dim is not None else ()))
            skips.append(h)
        h = self.mid(skips.pop(), cond if self.mid.film is not None else None)
        h = self.mid_attn(self.mid_drop(h))
        for level in self.decoders:
            h = level(h, skips.pop(), cond, *((context, context_mask) if level.context_dim is not None else ()))
        return h

    def features(self, x: torch.Tensor, cond: torch.Tensor | None = None, context: torch.Tensor | None = None,
                 context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last decoder map ``(B, widths[0], H, W)``, for users who attach their own heads."""
        self._check(x, cond, context)
        return self._padded_features(x, cond, context, context_mask)[..., : x.shape[2], : x.shape[3]]

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the U-Net on any ``H x W`` (padded inside, cropped back).

        Args:
            x: ``(B, C_in, H, W)``, floating, of the parameters' dtype (any floating dtype under autocast).
            cond: ``(B, cond_dim)`` FiLM vector, required iff ``cond_dim`` is set.
            context: ``(B, L_ctx, context_dim)`` cross-attention tokens, required iff ``context_dim`` is set.
            context_mask: optional ``(B, L_ctx)`` bool, True = that context token is NOT attended.

        Returns:
            ``(B, C_out, H, W)``, or the features ``(B, widths[0], H, W)`` when ``out_channels`` is None.
        """
        self._check(x, cond, context)
        # Crop after the head: its output usually has fewer channels than the features.
        h = self._padded_features(x, cond, context, context_mask)
        return self.head(h)[..., : x.shape[2], : x.shape[3]]

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, widths={self.widths}, "
                f"cond_dim={self.cond_dim}, context_dim={self.context_dim}")
