"""Hybrid U-shaped neural operator: FNO-block encoder, convolutional U-Net decoder.

Rahman et al., "U-NO: U-shaped Neural Operators", TMLR 2023; the hybrid layout follows the
PtychoPINN ``HybridUNOGenerator`` (see the FNO stability seed).
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from ._checks import positive_int
from .fno import FNOBlock

__all__ = ["HybridUNO"]


def _check_depth(levels: int, height: int, width: int, name: str) -> None:
    factor = 2 ** (levels - 1)
    if height % factor or width % factor or min(height, width) // factor < 2:
        allowed = 1
        while height % 2**allowed == 0 and width % 2**allowed == 0 and min(height, width) // 2**allowed >= 2:
            allowed += 1
        raise ValueError(f"{name}: levels={levels} needs H and W divisible by {factor} with a coarsest level of "
                         f"at least 2x2, got {height}x{width} (this size allows at most levels={allowed})")


class _DecoderStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, act_layer, dd: dict) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, **dd)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * out_channels, out_channels, 3, padding=1, **dd), act_layer(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **dd),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class HybridUNO(nn.Module):
    r"""U-shaped operator: FNO blocks at every encoder level, a plain convolutional decoder.

    Level ``i`` has width :math:`c_i = \min(2^i \cdot \text{hidden}, \text{max\_channels})`:

    - lifter: 3x3 conv ``in -> hidden``, act, 3x3 conv;
    - encoder level ``i``: ``blocks_per_level`` x ``block(c_i, modes)``, its output kept as a
      skip, then a stride-2 2x2 conv ``c_i -> c_{i+1}`` (for all but the last level);
    - bottleneck: ``block(c_last, modes // 2)``;
    - decoder level ``i`` (coarse to fine): 2x2 transposed conv ``c_{i+1} -> c_i``, concatenate the
      skip, 3x3 conv ``2 c_i -> c_i``, act, 3x3 conv;
    - head: 1x1 conv ``hidden -> out``.

    ``max_channels`` caps every level (the seed's cap never reached its model). The input's H and
    W must be divisible by ``2 ** (levels - 1)`` and the coarsest level at least 2x2; otherwise a
    ``ValueError`` says which depth the input allows (the seed went out of memory building a
    depth its 64-pixel input could not hold). Spectral weights for modes beyond what a coarse
    level's resolution holds are allocated but unused there (they get no gradient).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        hidden: width of the first level.
        levels: number of resolution levels (``levels - 1`` halvings).
        modes: spectral modes of the encoder blocks (the bottleneck uses ``modes // 2``).
        max_channels: optional cap on every level's width.
        block: callable ``(channels, modes) -> nn.Module`` for encoder and bottleneck blocks,
            e.g. ``FNOBlock`` or ``functools.partial(StableFNOBlock, scale="layerscale")``.
        blocks_per_level: encoder blocks per level: depth without more halvings (``levels``
            is bounded by the resolution, this is not).
        act_layer: activation of the lifter and decoder.
        input_size: optional ``H`` or ``(H, W)`` the model will see: checked against ``levels``
            before any weight is allocated.

    Shapes:
        - x: ``(B, in_channels, H, W)``
        - output: ``(B, out_channels, H, W)``
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 32, levels: int = 4,
                 modes: int = 12, max_channels: int | None = None,
                 block: Callable[[int, int], nn.Module] = FNOBlock, blocks_per_level: int = 1,
                 act_layer: Callable[[], nn.Module] = nn.GELU, input_size: int | tuple[int, int] | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        in_channels, out_channels = positive_int("in_channels", in_channels), positive_int("out_channels", out_channels)
        hidden, modes = positive_int("hidden", hidden), positive_int("modes", modes)
        max_channels = positive_int("max_channels", max_channels, optional=True)
        levels, blocks_per_level = positive_int("levels", levels), positive_int("blocks_per_level", blocks_per_level)
        if input_size is not None:
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            _check_depth(levels, *size, name="input_size")
        if max_channels is not None and max_channels < hidden:
            raise ValueError(f"max_channels: expected >= hidden={hidden}, got {max_channels}")
        dd = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.levels = in_channels, out_channels, levels
        cap = max_channels if max_channels is not None else float("inf")
        self.widths = [int(min(hidden * 2**i, cap)) for i in range(levels)]
        self.lifter = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1, **dd), act_layer(),
                                    nn.Conv2d(hidden, hidden, 3, padding=1, **dd))
        self.encoder = nn.ModuleList(
            nn.Sequential(*(block(c, modes) for _ in range(blocks_per_level))) for c in self.widths)
        self.down = nn.ModuleList(nn.Conv2d(a, b, 2, stride=2, **dd)
                                  for a, b in pairwise(self.widths))
        self.bottleneck = block(self.widths[-1], max(1, modes // 2))
        self.decoder = nn.ModuleList(_DecoderStage(b, a, act_layer, dd)
                                     for a, b in pairwise(self.widths))
        self.head = nn.Conv2d(hidden, out_channels, 1, **dd)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` if ``x`` cannot pass through this depth."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        _check_depth(self.levels, *x.shape[-2:], name="x")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map the input field to the output field at the same resolution.

        Args:
            x: ``(B, in_channels, H, W)``, H and W divisible by ``2 ** (levels - 1)``.

        Returns:
            ``(B, out_channels, H, W)``.
        """
        self.check_input(x)
        h = self.lifter(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h)
            if i < self.levels - 1:
                skips.append(h)
                h = self.down[i](h)
        h = self.bottleneck(h)
        for stage, skip in zip(reversed(self.decoder), reversed(skips)):
            h = stage(h, skip)
        return self.head(h)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, widths={self.widths}"
