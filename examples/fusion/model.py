"""FusionNet v2 assembled from blockyard blocks.

A 4-level GroupNorm U-Net over the 9-channel grid encoding, FiLM after every decoder level from
a GRU over the history of previous effective ops, bottleneck self-attention, and two heads on
the finest decoder map: K position hypotheses (winner-takes-all) and 12 action classes per pixel.
The seed's widths are 48/96/192/192 at 128x128 on GPUs; the CPU default is 16/32/64/64.

``levels`` is the number of 2x2 poolings. The seed's v2 (its Change 2) pools after each of its 4
encoder levels, 128 -> 64 -> 32 -> 16 -> 8, runs the bottleneck at 8x8 and has 4 FiLM-conditioned
decoder levels (``levels=4``); ``levels=3`` skips the last pooling: bottleneck at 16x16 on a 128
canvas, 3 decoder levels.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import BottleneckAttention, ConvHead, DecoderLevel, EncoderLevel, ResBlock

from .encoding import IN_CHANNELS

__all__ = ["FusionNet", "FusionOutput", "HistoryEncoder"]

N_ACTIONS = 12


class FusionOutput(NamedTuple):
    """``position``: ``(B, K, H, W)`` logits per hypothesis; ``action``: ``(B, 12, H, W)`` logits."""

    position: torch.Tensor
    action: torch.Tensor


class HistoryEncoder(nn.Module):
    """GRU over previous effective ops; a zero vector for an empty history.

    Each entry ``(action, y, x, crossings before, crossings after)`` embeds action, y and x with
    lookup tables and the two crossing counts (divided by the initial crossings) with a linear
    layer each; the GRU reads the entries oldest first and the context is its last layer's
    output at the last real entry (gathered, so no host sync for packing). ``y`` and ``x`` must
    be below ``max_grid`` (the tables' size); they are anchors on the grid, and :class:`FusionNet`
    refuses a grid larger than ``max_grid`` before any work. Nothing is clamped (the first
    version clamped coordinates above 127 silently).

    Shapes:
        - history: ``(B, T, 5)``; length: ``(B,)``; initial_crossings: ``(B,)``
        - output: ``(B, hidden)``
    """

    def __init__(self, hidden: int = 64, embed: int = 16, layers: int = 2, dropout: float = 0.15,
                 max_grid: int = 128) -> None:
        super().__init__()
        self.max_grid = max_grid
        self.action = nn.Embedding(N_ACTIONS, embed)
        self.y = nn.Embedding(max_grid, embed)
        self.x = nn.Embedding(max_grid, embed)
        self.before = nn.Sequential(nn.Linear(1, embed), nn.ReLU())
        self.after = nn.Sequential(nn.Linear(1, embed), nn.ReLU())
        self.gru = nn.GRU(5 * embed, hidden, num_layers=layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)

    def forward(self, history: torch.Tensor, length: torch.Tensor, initial_crossings: torch.Tensor) -> torch.Tensor:
        if history.dim() != 3 or history.shape[-1] != 5:
            raise ValueError(f"history: expected (B, T, 5), got {tuple(history.shape)}")
        ints = history[..., :3].long()  # never clamped: an index past a table fails loudly
        scale = initial_crossings.float().clamp_min(1)[:, None, None]
        crossings = history[..., 3:].float() / scale
        feats = torch.cat([self.action(ints[..., 0]), self.y(ints[..., 1]), self.x(ints[..., 2]),
                           self.before(crossings[..., :1]), self.after(crossings[..., 1:])], dim=-1)
        out, _ = self.gru(feats)
        last = (length.long() - 1).clamp_min(0)
        context = out.gather(1, last[:, None, None].expand(-1, 1, out.shape[-1]))[:, 0]
        return context * (length > 0)[:, None].to(context.dtype)


class FusionNet(nn.Module):
    """U-Net + history-FiLM + bottleneck attention + WTA position and action heads.

    Encoder level ``i`` (``widths[i]`` channels) runs at ``1/2**i`` of the padded input. With
    ``levels = len(widths)`` (the seed's v2) the last level is pooled once more and the bottleneck
    (ResBlock, Dropout2d, self-attention) runs at ``1/2**levels``; decoder level ``i`` merges encoder
    level ``i`` and outputs ``widths[max(i - 1, 0)]`` channels (48,96,192,192: 192, 96, 48, 48 as in
    the seed). With ``levels = len(widths) - 1`` the bottleneck runs on the last encoder level and
    decoder level ``i`` outputs ``widths[i]``. Every decoder level ends with a FiLM of the history
    context (``levels`` of them).

    Args:
        widths: channels per encoder level, finest first (4 levels in the seed).
        levels: 2x2 poolings, ``len(widths)`` (the seed's; fusion_ddp.py's default on CUDA) or
            ``len(widths) - 1`` (``None``, the default: fusion_ddp.py's CPU model, measured in the README).
        hypotheses: ``K`` position hypotheses.
        rnn_hidden, rnn_layers, embed, rnn_dropout: history encoder.
        heads: bottleneck attention heads.
        dropout: ``Dropout2d`` after the bottleneck residual block.
        max_grid: largest grid side the history's y/x embeddings accept; a larger input is refused.

    Shapes:
        - x: ``(B, 9, H, W)`` from :func:`encoding.encode`, ``H, W <= max_grid``; any H, W (padded to
          a multiple of ``2 ** levels`` inside and cropped back)
        - history: ``(B, 32, 5)``; history_len, initial_crossings: ``(B,)``
        - output: :class:`FusionOutput`
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64), levels: int | None = None, hypotheses: int = 4,
                 rnn_hidden: int = 64, rnn_layers: int = 2, embed: int = 16, rnn_dropout: float = 0.15,
                 heads: int = 4, dropout: float = 0.15, max_grid: int = 128) -> None:
        super().__init__()
        act = partial(nn.LeakyReLU, 0.01)
        n = len(widths)
        levels = n - 1 if levels is None else int(levels)
        if levels not in (n - 1, n) or levels < 0:
            raise ValueError(f"levels: expected {n} or {n - 1} poolings for {n} widths {tuple(widths)}, got {levels}")
        self.widths, self.levels, self.hypotheses, self.max_grid = tuple(widths), levels, hypotheses, max_grid
        self.multiple = 2 ** levels
        self.history = HistoryEncoder(rnn_hidden, embed, rnn_layers, rnn_dropout, max_grid)
        self.encoders = nn.ModuleList(
            EncoderLevel(IN_CHANNELS if i == 0 else widths[i - 1], w, downsample=i > 0, act_layer=act)
            for i, w in enumerate(widths))
        self.mid_pool = nn.MaxPool2d(2) if levels == n else None
        self.mid = ResBlock(widths[-1], act_layer=act)
        self.mid_drop = nn.Dropout2d(dropout)
        self.mid_attn = BottleneckAttention(widths[-1], heads=heads)
        shift = levels - (n - 1)  # 1: each decoder level outputs the next finer width (the seed's)
        decoders, width = [], widths[-1]
        for i in reversed(range(levels)):
            out = widths[max(i - shift, 0)]
            decoders.append(DecoderLevel(width, widths[i], out, cond_dim=rnn_hidden, film_bias=False, act_layer=act))
            width = out
        self.decoders = nn.ModuleList(decoders)
        self.position_head = ConvHead(width, hypotheses, depth=3, act_layer=act)
        self.action_head = ConvHead(width, N_ACTIONS, depth=2, act_layer=act)

    def forward(self, x: torch.Tensor, history: torch.Tensor, history_len: torch.Tensor,
                initial_crossings: torch.Tensor) -> FusionOutput:
        if x.dim() != 4 or x.shape[1] != IN_CHANNELS:
            raise ValueError(f"x: expected (B, {IN_CHANNELS}, H, W), got {tuple(x.shape)}")
        if history.shape[0] != x.shape[0]:
            raise ValueError(f"history: expected ({x.shape[0]}, T, 5), got {tuple(history.shape)}")
        height, width = x.shape[-2:]
        if max(height, width) > self.max_grid:
            raise ValueError(f"x: expected a grid of at most {self.max_grid}x{self.max_grid} (max_grid, the size of "
                             f"the history's y/x embeddings), got {height}x{width}; build FusionNet with a larger "
                             f"max_grid (fusion_ddp.py --max-grid)")
        cond = self.history(history, history_len, initial_crossings)
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        cells = (height + pad_h) // self.multiple * ((width + pad_w) // self.multiple)
        if cells * self.widths[-1] // self.mid.norm1.num_groups < 2:
            raise ValueError(f"x: a {height}x{width} grid pools to {cells} cell at levels={self.levels}, where each "
                             f"GroupNorm group of the {self.widths[-1]}-channel bottleneck would hold one value "
                             f"(always normalised to 0); use fewer levels, a larger grid or a wider bottleneck")
        h = F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        skips = []
        for level in self.encoders:
            h = level(h)
            skips.append(h)
        h = self.mid_pool(h) if self.mid_pool is not None else skips.pop()
        h = self.mid_attn(self.mid_drop(self.mid(h)))
        for level in self.decoders:
            h = level(h, skips.pop(), cond)
        h = h[..., :height, :width]
        return FusionOutput(self.position_head(h), self.action_head(h))
