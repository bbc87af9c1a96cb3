"""Regression heads that keep the inner face's resolution, and the classical prior (``--head``, ``--prior``).

The seed's head (:class:`xec.model.XECRegressor`) reads only the seven fused tokens, and each image
face reaches its token through an 8 x 4 average pool: on the 93 x 44 inner face a pool bin is about
12 x 11 sensors (18 x 16 cm), so the position of the light spot survives only as a weighted mix of
bins. It measured 2.76 cm on v where the light centroid gets 0.37 cm.

:class:`MapRegressor` adds a soft-argmax read-out of the inner face's feature map (47 x 22 cells of
2 x 2 sensors, before any pooling; Nibali et al., "Numerical Coordinate Regression with
Convolutional Neural Networks", 2018, https://arxiv.org/abs/1801.07372). ``K`` attention maps over
the visible cells,

.. math::
    a_k(c) = \\mathrm{softmax}_c\\big(g_k \\log(\\bar q_c + \\epsilon) + \\mathrm{conv}_{1\\times1}(f)_k(c)\\big),
    \\qquad \\hat p_k = \\sum_c a_k(c)\\, p_c, \\qquad \\hat f_k = \\sum_c a_k(c)\\, f_c,

with ``q`` the sqrt-normalised npho (``q^2 ~ npho``) averaged over a cell's visible sensors, ``p_c``
the cell's mean sensor coordinate (u = z, v = R (phi - pi)), standardised like the targets, and the
gains ``g_k`` starting at 1, 2, ... (``g = 2``: the light-weighted centroid at cell resolution; the
conv starts at zero). The MLP reads the tokens, the ``\\hat f_k``, the ``\\hat p_k`` and the log
total light of each face's visible sensors. A linear skip
from the ``\\hat p_k`` starts as their mean on (u, v). So the untrained head already predicts (u, v)
as a light centroid, and training corrects it.

The prior (``prior=True`` on either head): the calibrated classical estimates (light centroid, total
light, flight-time-corrected mean time; :class:`xec.batches.Classical`), standardised, are an extra
input and the base of the output: ``z = prior + head(...)`` with the last layer at zero, so the
untrained model IS the classical estimator and the network learns a correction. w has no classical
estimate; its prior is the training mean (0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import MLP

from .events import R_INNER
from .geometry import INNER, Geometry
from .model import TOKENS, XECEncoder

__all__ = ["HEADS", "MapRegressor", "TokenRegressor", "inner_cell_coordinates", "soft_argmax"]

HEADS = ("tokens", "maps")
_EPS = 1e-3  # in units of q = sqrt(npho / 1000): 1e-3 is 0.001 photons


def inner_cell_coordinates(geometry: Geometry) -> torch.Tensor:
    """Mean (u, v) in cm of the sensors of each 2 x 2 cell of the inner face, the FaceEncoder's stride-2 grid.

    Shapes: output ``(h, w, 2)`` with ``h = ceil(93 / 2)``, ``w = ceil(44 / 2)``; a padded half-cell
    averages its real sensors only.
    """
    pos = geometry.position.float().cpu()
    phi = torch.atan2(pos[:, 1], pos[:, 0]) % (2 * math.pi)
    uv = torch.stack([pos[:, 2], R_INNER * (phi - math.pi)], 0)  # (2, 4760)
    if not bool((geometry.face.cpu()[geometry.inner.index_map.cpu()] == INNER).all()):
        raise ValueError("geometry: the inner index map holds sensors of another face")
    image = uv[:, geometry.inner.index_map.cpu()]  # (2, 93, 44)
    height, width = image.shape[1:]
    pad = (0, width % 2, 0, height % 2)
    ones = F.pad(torch.ones(1, height, width), pad)
    total = F.avg_pool2d(F.pad(image, pad).unsqueeze(0), 2)[0]
    count = F.avg_pool2d(ones.unsqueeze(0), 2)[0]
    return (total / count).permute(1, 2, 0)


def soft_argmax(logits: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor,
                features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected coordinate and feature under ``softmax`` of ``logits`` over the visible cells.

    Masked cells (True) get zero weight; their values are never read (``where``).

    Shapes: logits ``(B, K, h, w)``, mask ``(B, h, w)`` bool, coords ``(h, w, 2)``, features ``(B, C, h, w)``;
    output ``(positions (B, K, 2), pooled (B, K, C))``.
    """
    if logits.dim() != 4 or mask.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits, mask: expected (B, K, h, w) and (B, h, w), got {tuple(logits.shape)}, "
                         f"{tuple(mask.shape)}")
    m = mask.unsqueeze(1).flatten(2)
    scores = torch.where(m, torch.full((), -torch.inf, dtype=logits.dtype, device=logits.device), logits.flatten(2))
    weights = torch.softmax(scores.float(), -1).nan_to_num(0.0)  # an all-masked face gives 0 weights
    feats = torch.where(m, torch.zeros((), dtype=features.dtype, device=features.device), features.flatten(2))
    positions = weights @ coords.flatten(0, 1).to(weights.dtype)
    return positions, weights @ feats.transpose(1, 2).float()


class TokenRegressor(nn.Module):
    """The seed's head (an MLP on the flattened fused tokens), optionally on the classical prior.

    Shapes: x ``(B, 3, 4760)``, mask ``(B, 4760)`` (True = masked), prior ``(B, 5)`` standardised (only with
    ``prior=True``); output ``(B, 5)`` standardised (u, v, w, energy, t0).
    """

    def __init__(self, encoder: XECEncoder, num_outputs: int = 5, hidden: int = 128, prior: bool = False) -> None:
        super().__init__()
        self.encoder, self.prior = encoder, prior
        extra = num_outputs if prior else 0
        self.head = MLP(len(TOKENS) * encoder.token_dim + extra, hidden=(hidden,), out_dim=num_outputs,
                        norm_layer=nn.LayerNorm)
        if prior:  # the untrained model is the classical estimator
            nn.init.zeros_(self.head.out.weight)
            nn.init.zeros_(self.head.out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.encoder(x, mask).tokens.flatten(1)
        if not self.prior:
            return self.head(feats)
        _check_prior(prior, x.shape[0], self.head.out.out_features)
        return prior + self.head(torch.cat([feats, prior.to(feats.dtype)], 1))


def _check_prior(prior: torch.Tensor | None, batch: int, outputs: int) -> None:
    if prior is None or prior.shape != (batch, outputs):
        raise ValueError(f"prior: expected ({batch}, {outputs}) standardised classical estimates, got "
                         f"{None if prior is None else tuple(prior.shape)}")


class MapRegressor(nn.Module):
    """Tokens + a soft-argmax read-out of the inner face's feature map (module docstring).

    Args:
        encoder: the (pretrained) :class:`XECEncoder`.
        geometry: for the inner cells' coordinates and the face of each sensor.
        uv_mean, uv_std: ``(2,)`` training mean and std of (u, v) in cm, to standardise the coordinates.
        maps: number ``K`` of attention maps.
        hidden: MLP width.
        prior: read the classical estimates and predict a correction to them.

    Shapes: as :class:`TokenRegressor`.
    """

    def __init__(self, encoder: XECEncoder, geometry: Geometry, uv_mean: torch.Tensor, uv_std: torch.Tensor,
                 num_outputs: int = 5, maps: int = 4, hidden: int = 128, prior: bool = False) -> None:
        super().__init__()
        if uv_mean.shape != (2,) or uv_std.shape != (2,):
            raise ValueError(f"uv_mean, uv_std: expected (2,) each, got {tuple(uv_mean.shape)}, {tuple(uv_std.shape)}")
        self.encoder, self.prior, self.maps = encoder, prior, maps
        coords = (inner_cell_coordinates(geometry) - uv_mean.float().cpu()) / uv_std.float().cpu()
        self.register_buffer("coords", coords, persistent=False)
        self.register_buffer("face", geometry.face.clone(), persistent=False)
        dim = encoder.face.dim
        self.logits = nn.Conv2d(dim, maps, 1)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)
        self.gain = nn.Parameter(torch.arange(1, maps + 1, dtype=torch.float32))
        self.faces = faces = int(geometry.face.max()) + 1
        width = len(TOKENS) * encoder.token_dim + maps * (dim + 2) + faces + (num_outputs if prior else 0)
        self.head = MLP(width, hidden=(hidden,), out_dim=num_outputs, norm_layer=nn.LayerNorm)
        nn.init.zeros_(self.head.out.weight)
        nn.init.zeros_(self.head.out.bias)
        self.skip = nn.Linear(2 * maps, num_outputs)  # (u, v) from the map centroids
        with torch.no_grad():
            self.skip.weight.zero_()
            self.skip.bias.zero_()
            if not prior:  # start as the mean of the K centroids
                self.skip.weight[0, 0::2] = 1.0 / maps
                self.skip.weight[1, 1::2] = 1.0 / maps

    def forward(self, x: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        out = self.encoder(x, mask)
        inner = out.faces[0]  # IMAGE_GRIDS[0] = "inner": (B, C, 47, 22) at stride 2
        index = self.encoder.map_inner
        visible = ~mask[:, index]
        # q averaged over the visible sensors of each 2 x 2 cell (the stride of inner.features)
        q = torch.where(visible, x[:, 0, index], torch.zeros((), dtype=x.dtype, device=x.device))
        pad = (0, q.shape[2] % 2, 0, q.shape[1] % 2)
        seen = F.avg_pool2d(F.pad(visible.to(x.dtype), pad).unsqueeze(1), 2).clamp_min(1e-6)
        cell_q = F.avg_pool2d(F.pad(q, pad).unsqueeze(1), 2) / seen  # (B, 1, 47, 22)
        logits = self.gain.view(1, -1, 1, 1) * torch.log(cell_q.float() + _EPS)
        logits = logits + self.logits(inner.features).float()
        positions, pooled = soft_argmax(logits, inner.mask, self.coords, inner.features)
        light = torch.where(~mask, x[:, 0].square(), torch.zeros((), dtype=x.dtype, device=x.device))
        per_face = light.new_zeros(x.shape[0], self.faces).index_add(1, self.face, light)
        per_face = torch.log1p(per_face.float())  # log total light (npho / 1000) of each face's visible sensors
        feats = [out.tokens.flatten(1).float(), pooled.flatten(1), positions.flatten(1), per_face]
        if self.prior:
            _check_prior(prior, x.shape[0], self.skip.out_features)
            feats.append(prior.float())
        z = self.head(torch.cat(feats, 1)) + self.skip(positions.flatten(1))
        return z + prior if self.prior else z
