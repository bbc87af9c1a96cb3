"""FCMAE pretraining of the XEC encoder: decoders that reconstruct normalised npho at every sensor.

Woo et al., "ConvNeXt V2", CVPR 2023 (https://arxiv.org/abs/2301.00808), FCMAE decoder and loss
(§6 of the project's notes on the XEC system's original code, xec-ml-wl); the seed's XEC_MAE (§2.4)
decodes each face from its token alone, here the decoders also read the encoder's last feature
maps, as FCMAE does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import ConvNeXtV2Block, GraphAttention
from blockyard.losses import masked_mse

from .geometry import N_SENSORS, Geometry
from .model import HEX_FACES, IMAGE_GRIDS, FaceFeatures, XECEncoder

__all__ = ["XECMAE", "MAEOutput", "mae_loss"]


class MAEOutput(NamedTuple):
    """``recon (B, 4760)``: predicted normalised npho of every sensor; ``tokens (B, 7, D)``."""

    recon: torch.Tensor
    tokens: torch.Tensor


class _ImageDecoder(nn.Module):
    """FCMAE decoder (§6) at the encoder's output resolution, shared by the image faces: 1x1 proj,
    mask token at masked cells, + the face's fused token, one ConvNeXtV2Block, 1x1 conv to the 2 x 2
    children of each cell (FCMAE's patch prediction with patch 2), pixel shuffle, crop."""

    def __init__(self, in_dim: int, token_dim: int, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.from_token = nn.Linear(token_dim, dim)
        self.block = ConvNeXtV2Block(dim, kernel_size, mlp_ratio=2.0)
        self.pred = nn.Conv2d(dim, 4, 1)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, face: FaceFeatures, token: torch.Tensor, height: int, width: int) -> torch.Tensor:
        y = torch.where(face.mask.unsqueeze(1), self.mask_token.to(face.features.dtype), self.proj(face.features))
        y = self.block(y + self.from_token(token)[..., None, None])
        return F.pixel_shuffle(self.pred(y), 2)[:, 0, :height, :width]


class _HexDecoder(nn.Module):
    """Node decoder: proj, mask token, + fused token, one residual GAT layer, Linear to npho."""

    def __init__(self, in_dim: int, token_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.from_token = nn.Linear(token_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.gat = GraphAttention(dim, dim // heads, heads=heads)
        self.pred = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, nodes, mask, token, edge_index) -> torch.Tensor:
        h = torch.where(mask.unsqueeze(-1), self.mask_token.to(nodes.dtype), self.proj(nodes))
        h = h + self.from_token(token)[:, None]
        h = h + self.gat(self.norm(h), edge_index)
        return self.pred(h)[..., 0]


class XECMAE(nn.Module):
    """FCMAE-style masked autoencoder of the encoder: reconstruct normalised npho at every sensor.

    The decoders read the encoder's last feature maps / node features (masked cells replaced by a
    learned mask token) plus each face's fused token; predictions of the 12 outer ids held by both
    outer grids are averaged. Train with :func:`mae_loss` on the masked live sensors only.

    Shapes: x ``(B, 3, 4760)``, mask ``(B, 4760)`` bool (True = masked: hidden or dead), output
    :class:`MAEOutput`.
    """

    def __init__(self, encoder: XECEncoder, geometry: Geometry, decoder_dim: int = 32, kernel_size: int = 5,
                 heads: int = 4) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_decoder = _ImageDecoder(encoder.face.dim, encoder.token_dim, decoder_dim, kernel_size)
        self.hex_decoder = _HexDecoder(encoder.hex.mask_token.numel(), encoder.token_dim, decoder_dim, heads)
        ids, self.shapes = [], []
        for name in IMAGE_GRIDS:
            grid = getattr(geometry, name)
            self.register_buffer(f"cells_{name}", grid.sensor_cell.clone(), persistent=False)
            ids.append(grid.sensor_ids)
            self.shapes.append(grid.shape)
        flat = torch.cat([*ids, geometry.top_ids, geometry.bottom_ids])
        self.register_buffer("sensor_ids", flat, persistent=False)
        self.register_buffer("reads", torch.bincount(flat, minlength=N_SENSORS).float(), persistent=False)
        if (self.reads == 0).any():
            raise ValueError("geometry: every sensor must be on some face")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> MAEOutput:
        out = self.encoder(x, mask)
        preds = []
        for k, (name, (height, width)) in enumerate(zip(IMAGE_GRIDS, self.shapes)):
            image = self.image_decoder(out.faces[k], out.tokens[:, k], height, width)
            preds.append(image.flatten(1)[:, getattr(self, f"cells_{name}")])
        for k in range(len(HEX_FACES)):
            preds.append(self.hex_decoder(out.hex_nodes[k], out.hex_masks[k], out.tokens[:, len(IMAGE_GRIDS) + k],
                                          self.encoder.hex.edge_index))
        values = torch.cat(preds, 1).float()
        recon = values.new_zeros(values.shape[0], N_SENSORS).index_add(1, self.sensor_ids, values) / self.reads
        return MAEOutput(recon, out.tokens)


def mae_loss(recon: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE of the reconstruction over the sensors of ``loss_mask`` only (True = randomly masked
    and alive: dead sensors are never in it, visible ones never count). Shapes: ``(B, 4760)`` each."""
    return masked_mse(recon, target, loss_mask)
