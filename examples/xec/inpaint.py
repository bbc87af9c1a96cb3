"""Dead-channel inpainting heads on the XEC encoder: predict npho and time of masked sensors.

Seed: the XEC system's original code, xec-ml-wl, as §2.5 (``FaceInpaintingHead``,
``HexInpaintingHead``: the face values plus the face token, on the frozen MAE encoder) and §4 (the
vectorised masked gather) of the project's notes on it record it. Differences, each for a reason:

- The heads also read the encoder's last feature maps / node features (upsampled to the sensor
  grid), not the token alone, and an explicit visibility channel (the seed's in-band sentinel
  cannot be told from a valid value, notes §2.6).
- Each head's output is a *correction* to a calibrated classical fill-in: per face and channel a
  blend ``f = n + a (m - n)`` of the two fill-ins of :mod:`xec.baselines` (``n`` the average of
  the visible neighbours, the face mean where none is visible; ``m`` the face mean), with the
  weight ``a`` in [0, 1] fitted in closed form by least squares on training events
  (:meth:`XECInpainter.calibrate`; ``a = 0``, the neighbour average, until then). Both fill-ins
  are also input channels. The last layers are zero at init, so an untrained head is exactly
  that blend, on the training events at least as good as the better of the two baselines on each
  face and channel (the time of the inner face is closer to the face mean than to its
  neighbours' average, the npho the other way round), and training has to find what
  interpolation misses (the peak's curvature, the light pattern of the event, the
  npho-dependent time noise). Without it a CNN has to learn a normalised convolution (a division
  by the visible count) from scratch.
- Predictions are gathered at the requested sensors only with
  :func:`blockyard.blocks.gather_masked` (one cumulative sum and one scatter per face, no loop
  over the batch) into one padded batch over all faces.

Channels: 0 = normalised npho (``sqrt(npho / 1000)``), 1 = normalised time (``(t - 2 ns) / 2 ns``),
as in :func:`xec.model.sensor_inputs`. **True = masked** in every mask.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import ConvNeXtV2Block, GraphAttention, LearnedPositionalEmbedding, coord_channels, gather_masked

from .baselines import GRID_FACES, fill_in, neighbour_graph
from .geometry import N_SENSORS, Geometry
from .model import IN_CHANNELS, XECEncoder

__all__ = ["CONTEXT", "FaceInpaintingHead", "HexInpaintingHead", "InpaintBatch", "InpaintLoss", "InpaintOutput",
           "XECInpainter", "blend_sums", "blend_weights", "inpaint_loss", "masked_batch", "sensor_context",
           "to_sensors"]

CONTEXT = ("npho", "time", "time_valid", "visible", "fill_npho", "fill_time", "mean_npho", "mean_time")


def sensor_context(x: torch.Tensor, mask: torch.Tensor, face: torch.Tensor, edges: torch.Tensor,
                   blend: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-sensor head inputs ``(B, 8, 4760)`` (channels ``CONTEXT``) and the fill-in ``(B, 2, 4760)``.

    Every channel is a function of the visible sensors only: the inputs zeroed where ``mask`` (True =
    masked), the visibility flag, the neighbour-average fill-in ``n`` and the face mean ``m`` of npho and
    of the visible valid times. The fill-in is :math:`f_c = n_c + a_{\phi c} (m_c - n_c)` with
    :math:`\phi` the sensor's face.

    Args:
        x: inputs from :func:`xec.model.sensor_inputs`.
        mask: bool, True = masked.
        face: ``Geometry.face``; edges: from :func:`xec.baselines.neighbour_graph`.
        blend: weights :math:`a` of the face mean per face and channel (:func:`blend_weights`); None = 0
            (the neighbour average).

    Shapes:
        - x ``(B, 3, 4760)``; mask ``(B, 4760)``; face ``(4760,)``; blend ``(faces, 2)``
        - output: context ``(B, 8, 4760)``, fill ``(B, 2, 4760)``
    """
    visible = ~mask
    seen = x.masked_fill(mask.unsqueeze(1), 0.0)
    npho = fill_in(seen[:, 0], visible, face, edges)
    time = fill_in(seen[:, 1], visible & (seen[:, 2] > 0.5), face, edges)
    context = torch.stack([*seen.unbind(1), visible.to(x.dtype), npho.neighbours, time.neighbours,
                           npho.face_mean, time.face_mean], 1)
    neighbours, mean = context[:, 4:6], context[:, 6:8]
    if blend is None:
        return context, neighbours
    return context, neighbours + blend[face].T.to(x.dtype) * (mean - neighbours)


def blend_sums(x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, face: torch.Tensor, edges: torch.Tensor,
               faces: int) -> torch.Tensor:
    r"""Sufficient statistics of the blend fit on one batch, float64: per face and channel
    :math:`\sum d r` and :math:`\sum d^2` over the scored targets, with :math:`d = m - n` (face mean minus
    neighbour average, both from the visible sensors) and :math:`r = y - n` (truth minus neighbour average).

    Shapes: x ``(B, 3, 4760)`` full inputs (the truth at ``targets`` is read from it, as in
    :func:`masked_batch`); mask, targets ``(B, 4760)`` bool (True = masked / to score); output ``(faces, 2, 2)``
    (face, channel, [sum d r, sum d^2]).
    """
    batch = masked_batch(x, mask, targets)
    context, _ = sensor_context(batch.x, batch.mask, face, edges)
    neighbours, mean = context[:, 4:6].double(), context[:, 6:8].double()
    scored = batch.scored.transpose(1, 2)  # (B, 2, 4760)
    d = torch.where(scored, mean - neighbours, 0.0)
    r = torch.where(scored, batch.truth.transpose(1, 2).double() - neighbours, 0.0)
    per_sensor = torch.stack([(d * r).sum(0), d.square().sum(0)], -1)  # (2, 4760, 2)
    return per_sensor.new_zeros(faces, 2, 2).index_add_(0, face, per_sensor.transpose(0, 1))


def blend_weights(sums: torch.Tensor) -> torch.Tensor:
    r"""Least-squares weight of the face mean per face and channel, clipped to [0, 1]:
    :math:`a = \mathrm{clip}(\sum d r / \sum d^2, 0, 1)` minimises :math:`\sum (n + a d - y)^2`
    (:func:`blend_sums`); the squared error is convex in ``a``, so the clipped optimum is no worse than
    either end, the neighbour average (``a = 0``) or the face mean (``a = 1``). 0 where :math:`\sum d^2 = 0`.

    Shapes: sums ``(faces, 2, 2)``; output ``(faces, 2)`` float32.
    """
    if sums.dim() != 3 or sums.shape[1:] != (2, 2):
        raise ValueError(f"sums: expected (faces, 2, 2), got {tuple(sums.shape)}")
    cross, square = sums.unbind(-1)
    return torch.where(square > 0, cross / square.clamp_min(1e-300), 0.0).clamp(0.0, 1.0).float()


def _nonnegative_npho(pred: torch.Tensor, dim: int) -> torch.Tensor:
    """Clamp channel 0 (normalised npho, ``sqrt`` of a count: never negative) at 0 along ``dim``."""
    npho, time = pred.split(1, dim)
    return torch.cat([npho.clamp_min(0.0), time], dim)


class FaceInpaintingHead(nn.Module):
    r"""CNN on a face grid at sensor resolution: fill-in + correction for npho and time.

    .. math::
        y = f + S c + W_{out} * \mathrm{GELU}(W_{3\times3} * B^{d}(\mathrm{GELU}(\mathrm{GN}(
            W_{c} * [c, \text{coords}] + \mathrm{up}_2(W_e e) + W_t t))))

    with ``c`` the :data:`CONTEXT` maps, ``e`` the encoder's half-resolution features (nearest
    upsampling, cropped), ``t`` the face's fused token, ``B^d`` ``depth`` unmasked ConvNeXt-V2
    blocks, ``f`` the calibrated fill-in (:func:`sensor_context`: per face and channel a least-squares blend
    of the neighbour average and the face mean), ``S`` a 1 x 1 linear skip from the context (it can
    re-blend the two fill-ins per event pattern exactly, which the normalised path can only
    approximate) and ``S``, ``W_out`` zero at init: the untrained head returns ``f`` exactly. The npho
    channel is clamped at 0 (a square root of a count; ``f`` is a convex blend of two averages of
    non-negative values, never negative, so the head is still ``f`` at init).

    Shapes:
        - context: ``(B, 8, H, W)``; features: ``(B, feature_dim, ceil(H/2), ceil(W/2))``;
          token: ``(B, token_dim)``; fill: ``(B, 2, H, W)``
        - output: ``(B, 2, H, W)``
    """

    def __init__(self, feature_dim: int, token_dim: int, hidden: int = 32, depth: int = 1,
                 kernel_size: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(len(CONTEXT) + 2, hidden, 3, padding=1)
        self.from_features = nn.Conv2d(feature_dim, hidden, 1)
        self.from_token = nn.Linear(token_dim, hidden)
        self.norm = nn.GroupNorm(min(8, hidden), hidden)
        self.blocks = nn.ModuleList(ConvNeXtV2Block(hidden, kernel_size, mlp_ratio=2.0) for _ in range(depth))
        self.refine = nn.Conv2d(hidden, hidden // 2, 3, padding=1)
        self.out = nn.Conv2d(hidden // 2, 2, 1)
        self.skip = nn.Conv2d(len(CONTEXT), 2, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.out, self.skip):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, context: torch.Tensor, features: torch.Tensor, token: torch.Tensor,
                fill: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = context.shape
        if channels != len(CONTEXT) or fill.shape != (batch, 2, height, width):
            raise ValueError(f"context, fill: expected (B, {len(CONTEXT)}, H, W) and (B, 2, H, W), got "
                             f"{tuple(context.shape)} and {tuple(fill.shape)}")
        up = self.from_features(features).repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :height, :width]
        coords = coord_channels(batch, height, width, device=context.device, dtype=context.dtype)
        y = self.stem(torch.cat([context, coords], 1)) + up + self.from_token(token)[..., None, None]
        y = F.gelu(self.norm(y))
        for block in self.blocks:
            y = block(y)
        return _nonnegative_npho(fill + self.skip(context) + self.out(F.gelu(self.refine(y))), 1)


class HexInpaintingHead(nn.Module):
    r"""Graph head on a hex face: fill-in + correction, ``depth`` pre-norm residual GAT + MLP layers.

    .. math::
        h^0 = W_c c + W_n n + W_t t + p, \quad h \mathrel{+}= \mathrm{GAT}(\mathrm{LN}\,h), \quad
        h \mathrel{+}= \mathrm{MLP}(\mathrm{LN}\,h), \quad y = f + S c + W_{out}\,\mathrm{LN}(h)

    with ``c`` the :data:`CONTEXT` values of the nodes, ``n`` the encoder's node features, ``t`` the
    face's fused token, ``p`` a learned node embedding, ``f`` the calibrated fill-in (as in
    :class:`FaceInpaintingHead`), ``S`` a linear skip from the context; ``S`` and ``W_out`` are zero at
    init (the untrained head returns ``f`` exactly); npho clamped at 0 as in :class:`FaceInpaintingHead`.

    Shapes:
        - context: ``(B, V, 8)``; nodes: ``(B, V, node_dim)``; token: ``(B, token_dim)``;
          fill: ``(B, V, 2)``; edge_index: ``(2, E)`` (row 0 source, row 1 target)
        - output: ``(B, V, 2)``
    """

    def __init__(self, node_dim: int, token_dim: int, num_nodes: int, hidden: int = 32, depth: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.from_context = nn.Linear(len(CONTEXT), hidden)
        self.from_nodes = nn.Linear(node_dim, hidden)
        self.from_token = nn.Linear(token_dim, hidden)
        self.pos = LearnedPositionalEmbedding(num_nodes, hidden)
        self.norms1 = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.gats = nn.ModuleList(GraphAttention(hidden, hidden // heads, heads=heads) for _ in range(depth))
        self.norms2 = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
                                  for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 2)
        self.skip = nn.Linear(len(CONTEXT), 2, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.out, self.skip):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, context: torch.Tensor, nodes: torch.Tensor, token: torch.Tensor, fill: torch.Tensor,
                edge_index: torch.Tensor) -> torch.Tensor:
        if context.dim() != 3 or context.shape[-1] != len(CONTEXT) or fill.shape != (*context.shape[:2], 2):
            raise ValueError(f"context, fill: expected (B, V, {len(CONTEXT)}) and (B, V, 2), got "
                             f"{tuple(context.shape)} and {tuple(fill.shape)}")
        h = self.pos(self.from_context(context) + self.from_nodes(nodes) + self.from_token(token)[:, None])
        for norm1, gat, norm2, mlp in zip(self.norms1, self.gats, self.norms2, self.mlps):
            h = h + gat(norm1(h), edge_index)
            h = h + mlp(norm2(h))
        return _nonnegative_npho(fill + self.skip(context) + self.out(self.norm(h)), -1)


class InpaintOutput(NamedTuple):
    """Predictions at the requested sensors of every face, packed: ``values (B, M, 2)`` (npho, time,
    normalised), ``fill (B, M, 2)`` the calibrated fill-in (the untrained heads' output) at the same entries,
    ``sensor (B, M)`` sensor ids, ``valid (B, M)`` (True = a real entry, False = padding; values and fill are 0
    there). A sensor on two grids (12 outer PMTs) appears once per grid."""

    values: torch.Tensor
    fill: torch.Tensor
    sensor: torch.Tensor
    valid: torch.Tensor


class XECInpainter(nn.Module):
    """Encoder + one :class:`FaceInpaintingHead` per image grid (as in the seed: the faces differ, e.g. the face
    mean of the time beats the neighbour average on the inner face only) + one :class:`HexInpaintingHead`
    shared by the two hex faces (mirror images of each other).

    The encoder (the FCMAE-pretrained one) is frozen by default, as in the seed: no gradient, kept in
    eval mode. ``forward(x, mask, targets)``: the encoder and the heads see ``x`` with ``mask`` (True =
    masked: dead and hidden sensors) applied; predictions are gathered at ``targets`` (default
    ``mask``), e.g. the hidden live sensors whose truth is known.

    Every head corrects the calibrated fill-in of :func:`sensor_context` with the buffer ``blend``
    ``(faces, 2)``, the face mean's weight per face and channel: 0 (the neighbour average) at
    construction, set by :meth:`calibrate` on training events before training, saved in the state dict.

    Shapes: x ``(B, 3, 4760)``, mask and targets ``(B, 4760)`` bool, output :class:`InpaintOutput`.
    """

    def __init__(self, encoder: XECEncoder, geometry: Geometry, hidden: int = 32, depth: int = 1,
                 hex_depth: int = 2, heads: int = 4, freeze_encoder: bool = True) -> None:
        super().__init__()
        self.encoder, self.freeze_encoder = encoder, freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
        self.register_buffer("face", geometry.face.clone(), persistent=False)
        self.register_buffer("edges", neighbour_graph(geometry), persistent=False)
        self.register_buffer("blend", torch.zeros(int(geometry.face.max()) + 1, 2))
        for name in GRID_FACES:
            self.register_buffer(f"map_{name}", getattr(geometry, name).index_map.clone(), persistent=False)
        self.register_buffer("hex_ids", torch.stack([geometry.top_ids, geometry.bottom_ids]), persistent=False)
        self.face_heads = nn.ModuleList(FaceInpaintingHead(encoder.face.dim, encoder.token_dim, hidden, depth)
                                        for _ in GRID_FACES)
        self.hex_head = HexInpaintingHead(encoder.hex.mask_token.numel(), encoder.token_dim, encoder.hex.num_nodes,
                                          hidden, hex_depth, heads)

    def train(self, mode: bool = True) -> XECInpainter:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Fit ``blend`` (:func:`blend_weights`) on the events ``x`` with ``mask`` applied, scored at ``targets``
        (e.g. training events with the training's random masks), in chunks of ``chunk`` events; returns it.

        Shapes: x ``(N, 3, 4760)`` full inputs; mask, targets ``(N, 4760)`` bool, True = masked / to score.
        """
        sums = torch.zeros(*self.blend.shape, 2, dtype=torch.float64, device=self.blend.device)
        for i in range(0, x.shape[0], chunk):
            sums += blend_sums(x[i:i + chunk], mask[i:i + chunk], targets[i:i + chunk], self.face, self.edges,
                               self.blend.shape[0])
        self.blend.copy_(blend_weights(sums))
        return self.blend

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None) -> InpaintOutput:
        targets = mask if targets is None else targets
        if x.dim() != 3 or x.shape[1:] != (IN_CHANNELS, N_SENSORS):
            raise ValueError(f"x: expected (B, {IN_CHANNELS}, {N_SENSORS}), got {tuple(x.shape)}")
        for name, m in (("mask", mask), ("targets", targets)):
            if m.dtype != torch.bool or m.shape != (x.shape[0], N_SENSORS):
                raise ValueError(f"{name}: expected bool ({x.shape[0]}, {N_SENSORS}), got {m.dtype} {tuple(m.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            enc = self.encoder(x, mask)
        context, fill = sensor_context(x, mask, self.face, self.edges, self.blend)
        parts = []  # per face: (values, fill, sensor, valid), packed by gather_masked
        for k, name in enumerate(GRID_FACES):
            index = getattr(self, f"map_{name}")
            face_fill = fill[..., index]
            pred = self.face_heads[k](context[..., index], enc.faces[k].features, enc.tokens[:, k], face_fill)
            packed = gather_masked(torch.cat([pred, face_fill.to(pred.dtype)], 1), targets[:, index])  # (y, x) index
            parts.append((packed.values, index[packed.index[..., 0], packed.index[..., 1]], packed.valid))
        for k, ids in enumerate(self.hex_ids):
            face_fill = fill[..., ids].transpose(1, 2)
            token = enc.tokens[:, len(GRID_FACES) + k]
            pred = self.hex_head(context[..., ids].transpose(1, 2), enc.hex_nodes[k], token, face_fill,
                                 self.encoder.hex.edge_index)
            packed = gather_masked(torch.cat([pred, face_fill.to(pred.dtype)], -1), targets[:, ids])
            parts.append((packed.values, ids[packed.index], packed.valid))
        values, sensors, valid = (torch.cat(part, 1) for part in zip(*parts))
        return InpaintOutput(values[..., :2], values[..., 2:], sensors, valid)


def to_sensors(out: InpaintOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter packed predictions back to ``(B, 4760, 2)`` (a sensor predicted on two grids gets the mean;
    0 where none) and the number of predictions per sensor ``(B, 4760)``."""
    batch = out.values.shape[0]
    weight = out.valid.to(out.values.dtype)
    total = out.values.new_zeros(batch * N_SENSORS, 2)
    flat = (out.sensor + N_SENSORS * torch.arange(batch, device=out.sensor.device)[:, None]).flatten()
    total.index_add_(0, flat, (out.values * weight[..., None]).flatten(0, 1))
    count = weight.new_zeros(batch * N_SENSORS).index_add_(0, flat, weight.flatten())
    return (total / count.clamp_min(1)[:, None]).view(batch, N_SENSORS, 2), count.view(batch, N_SENSORS)


class InpaintBatch(NamedTuple):
    """What an inpainting step sees and is scored on. ``x (B, 3, 4760)``: the inputs with **every masked
    sensor zeroed** (the truth there cannot reach the model, whatever it does with ``mask``); ``mask``
    ``(B, 4760)`` True = masked (hidden and dead); ``targets (B, 4760)`` the masked sensors to predict;
    ``truth (B, 4760, 2)`` true normalised npho and time; ``scored (B, 4760, 2)`` True where a target's
    truth exists (npho: every target; time: targets with a valid true time)."""

    x: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    truth: torch.Tensor
    scored: torch.Tensor


def masked_batch(x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> InpaintBatch:
    """Build an :class:`InpaintBatch` from the full inputs ``x (B, 3, 4760)``, ``mask`` (True = masked) and
    ``targets`` (True = to predict; must be masked, and live: their truth must be in ``x``)."""
    if mask.dtype != torch.bool or targets.dtype != torch.bool or mask.shape != targets.shape:
        raise ValueError(f"mask, targets: expected bool tensors of one shape, got {mask.dtype} {tuple(mask.shape)} "
                         f"and {targets.dtype} {tuple(targets.shape)}")
    if (targets & ~mask).any():
        raise ValueError("targets: every target must also be masked (True in mask)")
    truth = x[:, :2].transpose(1, 2)
    scored = torch.stack([targets, targets & (x[:, 2] > 0.5)], -1)
    return InpaintBatch(x.masked_fill(mask.unsqueeze(1), 0.0), mask, targets, truth, scored)


class InpaintLoss(NamedTuple):
    """``total``: sum over the two channels of the model's masked MSE divided by the fill-in's (1 = as good
    as the baseline, detached denominator); ``npho``, ``time``: the model's masked MSEs (detached)."""

    total: torch.Tensor
    npho: torch.Tensor
    time: torch.Tensor


def inpaint_loss(out: InpaintOutput, truth: torch.Tensor, scored: torch.Tensor) -> InpaintLoss:
    r"""MSE of npho and time at the packed sensors, each relative to the fill-in's MSE on the same entries:
    :math:`\sum_c \mathrm{MSE}_c(\text{model}) / \mathrm{sg}(\mathrm{MSE}_c(\text{fill-in}))`.

    Args:
        out: the model's packed predictions (with the fill-in at the same entries).
        truth: true normalised ``(npho, time)`` per sensor, ``(B, 4760, 2)``.
        scored: ``(B, 4760, 2)`` bool, True where the truth exists (npho: a live sensor; time: a valid time).
    """
    index = out.sensor.unsqueeze(-1).expand(-1, -1, 2)
    weight = (scored.gather(1, index) & out.valid.unsqueeze(-1)).float()
    target = truth.gather(1, index)
    count = weight.sum((0, 1)).clamp_min(1)
    model = ((out.values.float() - target).square() * weight).sum((0, 1)) / count
    base = ((out.fill.float() - target).square() * weight).sum((0, 1)) / count
    total = (model / base.clamp_min(1e-12).detach()).sum()
    return InpaintLoss(total, model[0].detach(), model[1].detach())
