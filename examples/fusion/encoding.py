"""The one encoder of FusionNet's inputs, used by the dataset builder, training and inference.

The seed copied its 9-channel encoder into four files and the copies drifted; here every
consumer calls these functions.

Stored state (natural resolution, 4 channels, float16 on disk):
    0 zone id / max zone id, 1 H edges (zero last column), 2 V edges (zero last row),
    3 zone boundary (1 where a 4-neighbour lies in another zone).

Model input (9 channels, built on the fly, zero outside the grid):
    0 zones, 1 H edges, 2 V edges, 3 grid validity, 4 zone boundary,
    5 per-cell crossing count / its max, 6 progress = crossings / initial crossings,
    7 y from 0 to 1, 8 x from 0 to 1.

History entries are ``(action, y, x, crossings before, crossings after)`` of previous effective
ops, oldest first, zero-padded to 32.

Stored op set (``ops (3, h, w) uint8``, the exact set of applicable ops of the state, improving
or not): channel ``s`` is window shape ``ops.SHAPES[s]`` (3x3 transposes, 3x2 flips e/w, 2x3
flips n/s); at most one variant of a shape matches a window, so at most one op per channel and
anchor. Value 0 = no op of that shape applies at anchor ``(y, x)``, else ``16 * variant + delta + 8``
with ``delta`` in ``[-4, 4]`` its crossing change (low nibble 4..12, never 0). Improving ops are the
ones with ``delta < 0``. 3 bytes per cell, against 8 for the state.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .ops import FLIPS_X, FLIPS_Y, OPS, SHAPES

__all__ = [
    "HISTORY",
    "IN_CHANNELS",
    "OpMaps",
    "crossing_map",
    "decode_ops",
    "encode",
    "encode_ops",
    "flip_ops",
    "flip_sample",
    "legal_anchor_mask",
    "op_maps",
    "state_channels",
]

IN_CHANNELS = 9
HISTORY = 32
_WIDTHS = np.array([s.width for s in OPS])
_HEIGHTS = np.array([s.height for s in OPS])
_SHAPE_OF = np.array([s.shape_index for s in OPS])
N_ACTIONS = len(OPS)


def state_channels(zones: np.ndarray, H: np.ndarray, V: np.ndarray) -> np.ndarray:
    """The 4 stored channels ``(4, h, w)`` float16 of one grid state."""
    h, w = zones.shape
    out = np.zeros((4, h, w), dtype=np.float32)
    out[0] = zones / max(int(zones.max()), 1)
    out[1, :, : w - 1] = H
    out[2, : h - 1, :] = V
    diff_h = zones[:, 1:] != zones[:, :-1]
    diff_v = zones[1:, :] != zones[:-1, :]
    boundary = np.zeros((h, w), dtype=bool)
    boundary[:, 1:] |= diff_h
    boundary[:, :-1] |= diff_h
    boundary[1:, :] |= diff_v
    boundary[:-1, :] |= diff_v
    out[3] = boundary
    return out.astype(np.float16)


def crossing_map(state: torch.Tensor) -> torch.Tensor:
    """Per-cell crossing count ``(B, H, W)`` of stored states ``(B, 4, H, W)``.

    A crossing is a path edge between cells of different zones; it adds 1 to both its cells, so
    the map sums to twice the crossing count. Padding has no edges, so it never counts.
    """
    z, h_edge, v_edge = state[:, 0].float(), state[:, 1].float(), state[:, 2].float()
    hc = h_edge[:, :, :-1] * (z[:, :, 1:] != z[:, :, :-1])
    vc = v_edge[:, :-1, :] * (z[:, 1:, :] != z[:, :-1, :])
    count = torch.zeros_like(z)
    count[:, :, :-1] += hc
    count[:, :, 1:] += hc
    count[:, :-1, :] += vc
    count[:, 1:, :] += vc
    return count


def encode(state: torch.Tensor, initial_crossings: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The 9 model input channels from stored states, batched and on their device.

    Args:
        state: ``(B, 4, H, W)`` stored channels (any float dtype), zero-padded.
        initial_crossings: ``(B,)`` crossings of each trajectory's initial path.
        pad_mask: ``(B, H, W)`` bool, True on padding; None = no padding.

    Returns:
        ``(B, 9, H, W)`` float32.
    """
    if state.dim() != 4 or state.shape[1] != 4:
        raise ValueError(f"state: expected (B, 4, H, W), got {tuple(state.shape)}")
    batch, _, height, width = state.shape
    valid = torch.ones(batch, height, width, dtype=torch.bool, device=state.device) if pad_mask is None \
        else ~pad_mask
    s = state.float()
    count = crossing_map(s)
    crossings = count.sum((1, 2)) / 2
    progress = (crossings / initial_crossings.float().clamp_min(1)).clamp(max=1.0)
    rows = valid[:, :, 0].sum(1).clamp_min(2).float()
    cols = valid[:, 0, :].sum(1).clamp_min(2).float()
    ys = torch.arange(height, device=state.device, dtype=torch.float32)[None, :, None] / (rows - 1)[:, None, None]
    xs = torch.arange(width, device=state.device, dtype=torch.float32)[None, None, :] / (cols - 1)[:, None, None]
    v = valid.float()
    return torch.stack([
        s[:, 0], s[:, 1], s[:, 2], v, s[:, 3],
        count / count.amax((1, 2), keepdim=True).clamp_min(1),
        progress[:, None, None] * v, ys * v, xs * v,
    ], dim=1)


def legal_anchor_mask(state: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, W)`` bool, True = masked: no operation anchored here can change crossings.

    An op changes crossings only through zone-boundary edges inside its window (at most 3x3,
    anchored top-left), so an anchor is legal when the 3x3 window starting at it contains a
    boundary cell. This covers every improving op exactly; the seed's dilation-1 mask hid 56%
    of valid anchors.
    """
    boundary = state[:, 3:4].float()
    window = F.max_pool2d(F.pad(boundary, (0, 2, 0, 2)), kernel_size=3, stride=1)[:, 0]
    masked = window < 0.5
    return masked if pad_mask is None else masked | pad_mask


def flip_sample(state: np.ndarray, target: np.ndarray, history: np.ndarray, history_len: int,
                flip_x: bool, flip_y: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror one stored sample (natural resolution) left-right and/or up-down.

    Edge channels move with their edges (H edges of a row reverse among the first ``w-1``
    columns), and every op (target and history) is remapped by its window size:
    ``x' = w - window_width - x`` (the seed's ``w - 1 - x`` shifted 75% of its targets) with the
    variant mapped through ``FLIPS_X`` / ``FLIPS_Y``.
    """
    _, h, w = state.shape
    state, target, history = state.copy(), target.copy(), history.copy()
    ops = np.concatenate([target[None, [2, 0, 1]], history[:history_len, :3]]).astype(np.int64)  # (v, y, x)
    if flip_x:
        state[[0, 2, 3]] = state[[0, 2, 3], :, ::-1]
        state[1, :, : w - 1] = state[1, :, w - 2::-1]
        ops[:, 2] = w - _WIDTHS[ops[:, 0]] - ops[:, 2]
        ops[:, 0] = np.asarray(FLIPS_X)[ops[:, 0]]
    if flip_y:
        state[[0, 1, 3]] = state[[0, 1, 3], ::-1, :]
        state[2, : h - 1, :] = state[2, h - 2::-1, :]
        ops[:, 1] = h - _HEIGHTS[ops[:, 0]] - ops[:, 1]
        ops[:, 0] = np.asarray(FLIPS_Y)[ops[:, 0]]
    target[:] = ops[0, [1, 2, 0]]
    history[:history_len, :3] = ops[1:]
    return np.ascontiguousarray(state), target, history


def encode_ops(variant: np.ndarray, y: np.ndarray, x: np.ndarray, delta: np.ndarray, height: int,
               width: int) -> np.ndarray:
    """The stored op set ``(3, h, w) uint8`` (see the module docstring) of ops ``(variant, y, x, delta)``.

    Takes ``FusionEnv.candidates()`` field by field. Raises ``ValueError`` if two ops share a
    shape and an anchor or a delta lies outside ``[-4, 4]`` (neither happens for a real state).
    """
    variant, y, x, delta = (np.asarray(a, dtype=np.int64) for a in (variant, y, x, delta))
    if delta.size and (delta.min() < -4 or delta.max() > 4):
        raise ValueError(f"delta: expected values in [-4, 4], got {delta.min()}..{delta.max()}")
    out = np.zeros((len(SHAPES), height, width), dtype=np.uint8)
    channel = _SHAPE_OF[variant]
    out[channel, y, x] = 16 * variant + delta + 8
    if np.count_nonzero(out) != variant.size:
        raise ValueError("variant, y, x: expected at most one op per window shape and anchor, got duplicates")
    return out


def decode_ops(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(variant, y, x, delta)`` int64 arrays of a stored op set ``(3, h, w)``, by channel then row-major."""
    _, y, x = np.nonzero(codes)
    values = codes[codes != 0].astype(np.int64)
    return values // 16, y.astype(np.int64), x.astype(np.int64), values % 16 - 8


def flip_ops(codes: np.ndarray, flip_x: bool, flip_y: bool) -> np.ndarray:
    """The stored op set of the mirrored state: every op through ``ops.mirror_op`` (same shape, same delta)."""
    variant, y, x, delta = decode_ops(codes)
    _, h, w = codes.shape
    if flip_x:
        x = w - _WIDTHS[variant] - x
        variant = np.asarray(FLIPS_X)[variant]
    if flip_y:
        y = h - _HEIGHTS[variant] - y
        variant = np.asarray(FLIPS_Y)[variant]
    return encode_ops(variant, y, x, delta, h, w)


class OpMaps(NamedTuple):
    """Dense per-(action, anchor) views of stored op sets, on their device.

    - applies: ``(B, 12, H, W)`` bool, the op ``(action, y, x)`` applies
    - delta: ``(B, 12, H, W)`` int64 crossing change (0 where it does not apply)
    """

    applies: torch.Tensor
    delta: torch.Tensor

    @property
    def gain(self) -> torch.Tensor:
        """``(B, 12, H, W)`` float32 crossing reduction: ``-delta`` of the improving ops, else 0."""
        return (-self.delta).clamp_min(0).float()

    @property
    def improving(self) -> torch.Tensor:
        return self.delta < 0


def op_maps(codes: torch.Tensor) -> OpMaps:
    """Decode stored op sets ``(B, 3, H, W)`` uint8 (zero padding = no op) into :class:`OpMaps`."""
    if codes.dim() != 4 or codes.shape[1] != len(SHAPES):
        raise ValueError(f"codes: expected (B, {len(SHAPES)}, H, W), got {tuple(codes.shape)}")
    c = codes.long()
    present = c > 0
    onehot = F.one_hot(c // 16, N_ACTIONS).bool() & present[..., None]  # (B, 3, H, W, 12)
    applies = onehot.any(1).permute(0, 3, 1, 2)
    delta = (onehot * (c % 16 - 8)[..., None]).sum(1).permute(0, 3, 1, 2)
    return OpMaps(applies.contiguous(), delta.contiguous())
