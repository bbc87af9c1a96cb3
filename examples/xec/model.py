"""The XEC encoder and its regression head, assembled from blocks (the FCMAE decoders: :mod:`xec.mae`).

System: the Detector (XEC) training techniques document and its original code, xec-ml-wl ("the
seed": its XECEncoder, heads and MAE; FCMAE). A § number is a section of the project's notes on
that code (§2 the encoder, heads and MAE, §6 FCMAE). Sized for a CPU: one stage of two ConvNeXt-V2 blocks of
width 32 at half resolution (seed: 2 blocks of 32 at full, 3 of 64 at half resolution), MLP ratio
2, 5 x 5 depthwise kernels, token width 64 instead of 1024, fusion transformer of 2 blocks of width
64 (seed: 2 of 1024): 253k parameters for the regressor instead of about 27 M.

Faces (seed §2.2, "split" outer mode): the image faces inner (93 x 44), us, ds (24 x 6), outer
coarse (9 z x 24 phi, the §1.4-fixed map) and outer centre (5 x 6) go through ONE shared CNN
(:class:`FaceEncoder`); top and bottom (73-node hex graphs) through one shared graph-attention
encoder (:class:`HexEncoder`). The split outer mode is used rather than the 45 x 72 fine grid: it
holds every one of the 234 outer PMTs in its own cell (the 12 ids shared by both grids are read
twice) at 246 cells instead of 3240, 13x less convolution for the same sensors. Seven tokens go
through a small pre-norm transformer (seed: 2 post-norm layers), told which face is which by one of
the seed's positional encodings (:mod:`xec.posenc`; default a learned face embedding, the seed's).

Inputs per sensor (``sensor_inputs``): normalised npho (sqrt scheme), normalised time and a time
validity channel, with the time zeroed where it is invalid (explicit validity flag, no in-band
sentinel: research §2.6's recommendation).

Masking contract (**True = masked**). ``XECEncoder(x, mask)`` replaces every input at a masked
sensor by zero before anything else reads it (image faces: the stem reads zeros there plus a 0 in a
visibility channel, cells whose four sensors are all masked stay 0 through ``ConvNeXtV2Block``'s
FCMAE masking, pooling averages visible cells only; hex faces: a learned mask token replaces masked
nodes). Hence the encoder output, and everything computed from it (fused tokens, the regression
head, the whole MAE reconstruction), is a function of the visible sensors' values and of the mask
pattern only: changing inputs at masked sensors changes nothing, bit for bit. On the image faces,
cells with at least one visible sensor are moreover computed as a sparse convolution over such cells
would compute them (fully masked cells count as absent, not as a learned filler).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import (
    MLP,
    ConvNeXtV2Block,
    GraphAttention,
    LayerNorm2d,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    TransformerBlock,
    downsample_mask,
    sincos_2d,
)

from .events import normalize_npho
from .geometry import N_SENSORS, Geometry
from .posenc import POS_ENCODINGS, face_alibi_bias, geometric_table, sinusoidal_table, token_centres

__all__ = [
    "HEX_FACES",
    "IMAGE_GRIDS",
    "TIME_SCALE",
    "TIME_SHIFT",
    "TOKENS",
    "EncoderOutput",
    "FaceEncoder",
    "FaceFeatures",
    "HexEncoder",
    "XECEncoder",
    "XECRegressor",
    "sensor_inputs",
]

IMAGE_GRIDS = ("inner", "us", "ds", "outer_coarse", "outer_center")  # Geometry attributes, token order
HEX_FACES = ("top", "bottom")
TOKENS = IMAGE_GRIDS + HEX_FACES
TIME_SHIFT, TIME_SCALE = 2.0, 2.0  # ns: t0 in [-2, 2] plus flight times of 0-6 ns -> about [-2, 2]
IN_CHANNELS = 3


def sensor_inputs(npho: torch.Tensor, time: torch.Tensor, time_mask: torch.Tensor) -> torch.Tensor:
    """Per-sensor network inputs ``(B, 3, 4760)``: sqrt-normalised npho, normalised time (0 where
    ``time_mask``, True = invalid), time validity (1 = valid)."""
    if npho.dim() != 2 or npho.shape[1] != N_SENSORS or time.shape != npho.shape or time_mask.shape != npho.shape:
        raise ValueError(f"npho, time, time_mask: expected (B, {N_SENSORS}) each, got {tuple(npho.shape)}, "
                         f"{tuple(time.shape)}, {tuple(time_mask.shape)}")
    t = ((time - TIME_SHIFT) / TIME_SCALE).masked_fill(time_mask, 0.0)
    return torch.stack([normalize_npho(npho), t, (~time_mask).to(npho.dtype)], 1)


class FaceFeatures(NamedTuple):
    """:class:`FaceEncoder` output: ``features (B, C, h, w)`` (0 at masked cells), ``mask (B, h, w)``
    (True = masked) at that resolution, ``token (B, D)``."""

    features: torch.Tensor
    mask: torch.Tensor
    token: torch.Tensor


class FaceEncoder(nn.Module):
    r"""Masked ConvNeXt-V2 backbone shared by every image face (seed §2.2 FaceBackbone, FCMAE §6).

    A 2 x 2 / 2 patchify stem (ConvNeXt's stem, FCMAE's patch) + LayerNorm2d + fixed sin-cos cell
    positions, ``depth`` ConvNeXtV2Blocks, then a masked average pool to a ``pool`` grid (the seed
    resizes to 4 x 4; the grid keeps where on the face the light is; 8 x 4 here because the inner face
    has twice as many phi rows as z columns), flattened to a token. The seed's
    stem keeps full resolution and downsamples once after its first stage; one stride-2 stem is 4x
    cheaper on the 93 x 44 inner face and leaves the same number of stages at half resolution. Odd sizes
    are padded with masked cells. The mask is pooled with :func:`downsample_mask` (a cell is masked only
    if all four sensors are), and the stem reads masked sensors as zeros, so a cell's features depend
    on its visible sensors only. The stem gets one more input channel, 1 at every visible sensor and
    0 at masked ones: without it a hidden sensor would look exactly like a visible dark one (npho 0,
    no valid time), and the decoder could not know which of a cell's four sensors to fill in.

    Args:
        in_channels: per-sensor input channels.
        dim: width of the stage.
        depth: number of blocks.
        kernel_size: depthwise kernel of the blocks.
        mlp_ratio: hidden width of the blocks' MLP (ConvNeXt: 4; 2 halves the memory traffic on a CPU).
        token_dim: output token width ``D``.
        pool: grid of the pooled token.

    Shapes:
        - x: ``(B, in_channels, H, W)``; mask: ``(B, H, W)`` bool, **True = masked**
        - output: :class:`FaceFeatures` with ``h = ceil(H / 2)``, ``w = ceil(W / 2)``
    """

    def __init__(self, in_channels: int = IN_CHANNELS, dim: int = 32, depth: int = 2, kernel_size: int = 5,
                 mlp_ratio: float = 2.0, token_dim: int = 64, pool: tuple[int, int] = (8, 4)) -> None:
        super().__init__()
        self.in_channels, self.dim, self.pool = in_channels, dim, pool
        self.stem = nn.Conv2d(in_channels + 1, dim, 2, stride=2)  # + the visibility channel
        self.stem_norm = LayerNorm2d(dim)
        self.blocks = nn.ModuleList(ConvNeXtV2Block(dim, kernel_size, mlp_ratio) for _ in range(depth))
        self.token_norm = nn.LayerNorm(dim * pool[0] * pool[1])
        self.token = nn.Linear(dim * pool[0] * pool[1], token_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> FaceFeatures:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if mask.dtype != torch.bool or mask.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"mask: expected bool {(x.shape[0], *x.shape[2:])}, got {mask.dtype} {tuple(mask.shape)}")
        height, width = x.shape[2:]
        pad = (0, width % 2, 0, height % 2)
        mask = F.pad(mask, pad, value=True)
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        x = F.pad(x, pad).masked_fill(mask.unsqueeze(1), 0.0)  # nothing reads a masked input; visibility 1/0
        mask = downsample_mask(mask, 2)
        m = mask.unsqueeze(1)
        h, w = mask.shape[1:]
        pos = sincos_2d(h, w, self.dim, device=x.device, dtype=x.dtype).T.reshape(1, self.dim, h, w)
        y = (self.stem_norm(self.stem(x)) + pos).masked_fill(m, 0.0)  # LN's bias and pos reach masked cells
        for block in self.blocks:
            y = block(y, mask)
        # average over the visible cells of each pool bin (masked cells are 0); an all-masked bin gives 0
        visible = F.adaptive_avg_pool2d((~m).to(y.dtype), self.pool)
        pooled = F.adaptive_avg_pool2d(y, self.pool) / visible.clamp_min(1e-6)
        return FaceFeatures(y, mask, self.token(self.token_norm(pooled.flatten(1))))


class HexEncoder(nn.Module):
    r"""Graph-attention encoder shared by the two hex faces (seed §2.2 DeepHexEncoder, with real GAT).

    Linear stem + LayerNorm, a learned mask token at masked nodes, learned node embeddings, then
    ``depth`` pre-norm residual layers ``h += GAT(LN h); h += MLP(LN h)`` over the shared
    ``edge_index``; mean over the nodes, LayerNorm, Linear to the token.

    Shapes:
        - x: ``(B, V, in_channels)``; mask: ``(B, V)`` bool, **True = masked**
        - output: node features ``(B, V, dim)`` and token ``(B, token_dim)``
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int, in_channels: int = IN_CHANNELS, dim: int = 32,
                 depth: int = 2, heads: int = 4, token_dim: int = 64) -> None:
        super().__init__()
        self.register_buffer("edge_index", edge_index.clone(), persistent=False)
        self.in_channels, self.num_nodes = in_channels, num_nodes
        self.stem = nn.Sequential(nn.Linear(in_channels, dim), nn.LayerNorm(dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.pos = LearnedPositionalEmbedding(num_nodes, dim)
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.gats = nn.ModuleList(GraphAttention(dim, dim // heads, heads=heads) for _ in range(depth))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(MLP(dim, hidden=(2 * dim,), out_dim=dim) for _ in range(depth))
        self.token = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, token_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[1:] != (self.num_nodes, self.in_channels):
            raise ValueError(f"x: expected (B, {self.num_nodes}, {self.in_channels}), got {tuple(x.shape)}")
        m = mask.unsqueeze(-1)
        h = self.stem(x.masked_fill(m, 0.0))
        h = self.pos(torch.where(m, self.mask_token.to(h.dtype), h))
        for norm1, gat, norm2, mlp in zip(self.norms1, self.gats, self.norms2, self.mlps):
            h = h + gat(norm1(h), self.edge_index)
            h = h + mlp(norm2(h))
        return h, self.token(h.mean(1))


class EncoderOutput(NamedTuple):
    """``tokens (B, 7, D)`` fused, order ``TOKENS``; ``faces``: :class:`FaceFeatures` per image grid;
    ``hex_nodes``: ``(B, 73, dim)`` per hex face; ``hex_masks``: ``(B, 73)`` per hex face."""

    tokens: torch.Tensor
    faces: tuple[FaceFeatures, ...]
    hex_nodes: tuple[torch.Tensor, ...]
    hex_masks: tuple[torch.Tensor, ...]


class XECEncoder(nn.Module):
    """Seven face tokens (five image grids, two hex faces) fused by a transformer (seed §2.2).

    Args:
        geometry: from :func:`xec.geometry.build_geometry` (index maps become non-persistent buffers).
        dim, depth, kernel_size: of the shared :class:`FaceEncoder`.
        hex_dim, hex_depth: of the shared :class:`HexEncoder`.
        token_dim: token width ``D``.
        fusion_depth, heads: transformer blocks over the tokens and their heads.
        pos_enc: how the fusion tells the tokens apart, one of :data:`xec.posenc.POS_ENCODINGS`:
            an added ``learned``, ``sinusoidal`` (token index) or ``geometric`` (face centre) table,
            ``rope`` (token index) or ``alibi`` (face-centre distances) inside the attention.

    Shapes:
        - x: ``(B, 3, 4760)`` from :func:`sensor_inputs`; mask: ``(B, 4760)`` bool, **True = masked**
          (dead and, for the MAE, randomly hidden sensors)
        - output: :class:`EncoderOutput`
    """

    def __init__(self, geometry: Geometry, dim: int = 32, depth: int = 2, kernel_size: int = 5, hex_dim: int = 32,
                 hex_depth: int = 2, token_dim: int = 64,
                 fusion_depth: int = 2, heads: int = 4, pos_enc: str = "learned") -> None:
        super().__init__()
        if pos_enc not in POS_ENCODINGS:
            raise ValueError(f"pos_enc: expected one of {POS_ENCODINGS}, got {pos_enc!r}")
        for name in IMAGE_GRIDS:
            self.register_buffer(f"map_{name}", getattr(geometry, name).index_map.clone(), persistent=False)
        self.register_buffer("hex_ids", torch.stack([geometry.top_ids, geometry.bottom_ids]), persistent=False)
        self.token_dim = token_dim
        self.face = FaceEncoder(IN_CHANNELS, dim, depth, kernel_size, token_dim=token_dim)
        self.hex = HexEncoder(geometry.hex_edge_index, geometry.top_ids.numel(), IN_CHANNELS, hex_dim, hex_depth,
                              token_dim=token_dim)
        self.pos_enc = pos_enc
        centres = token_centres(geometry, IMAGE_GRIDS).cpu()
        tables = {"sinusoidal": lambda: sinusoidal_table(torch.arange(len(TOKENS)), token_dim),
                  "geometric": lambda: geometric_table(centres, token_dim)}
        if pos_enc == "learned":
            self.face_embed = LearnedPositionalEmbedding(len(TOKENS), token_dim)
        elif pos_enc in tables:
            self.register_buffer("face_table", tables[pos_enc]().float(), persistent=False)
        elif pos_enc == "alibi":
            self.register_buffer("face_bias", face_alibi_bias(centres, heads).float(), persistent=False)
        rope = RotaryEmbedding(token_dim // heads) if pos_enc == "rope" else None  # default positions 0..6
        self.fusion = nn.ModuleList(TransformerBlock(token_dim, heads, rope=rope) for _ in range(fusion_depth))
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> EncoderOutput:
        if x.dim() != 3 or x.shape[1:] != (IN_CHANNELS, N_SENSORS):
            raise ValueError(f"x: expected (B, {IN_CHANNELS}, {N_SENSORS}), got {tuple(x.shape)}")
        if mask.dtype != torch.bool or mask.shape != (x.shape[0], N_SENSORS):
            raise ValueError(f"mask: expected bool ({x.shape[0]}, {N_SENSORS}), got {mask.dtype} {tuple(mask.shape)}")
        faces = []
        for name in IMAGE_GRIDS:
            index = getattr(self, f"map_{name}")
            faces.append(self.face(x[..., index], mask[:, index]))
        hex_nodes, hex_masks, hex_tokens = [], [], []
        for ids in self.hex_ids:
            nodes, token = self.hex(x[..., ids].transpose(1, 2), mask[:, ids])
            hex_nodes.append(nodes)
            hex_masks.append(mask[:, ids])
            hex_tokens.append(token)
        tokens = self.fuse(torch.stack([f.token for f in faces] + hex_tokens, 1))
        return EncoderOutput(tokens, tuple(faces), tuple(hex_nodes), tuple(hex_masks))

    def fuse(self, tokens: torch.Tensor) -> torch.Tensor:
        """The face tokens ``(B, 7, D)`` (order ``TOKENS``) -> fused and normalised, with ``pos_enc``."""
        if self.pos_enc == "learned":
            tokens = self.face_embed(tokens)
        elif self.pos_enc in ("sinusoidal", "geometric"):
            tokens = tokens + self.face_table.to(tokens.dtype)
        bias = self.face_bias if self.pos_enc == "alibi" else None
        for block in self.fusion:
            tokens = block(tokens, attn_bias=bias)
        return self.norm(tokens)


class XECRegressor(nn.Module):
    """Encoder + one MLP on the flattened tokens -> ``(B, 5)`` standardised (u, v, w, energy, t0) (seed §2.3).

    Shapes: x ``(B, 3, 4760)``, mask ``(B, 4760)`` (True = masked, e.g. dead), output ``(B, 5)``.
    """

    def __init__(self, encoder: XECEncoder, num_outputs: int = 5, hidden: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = MLP(len(TOKENS) * encoder.token_dim, hidden=(hidden,), out_dim=num_outputs,
                        norm_layer=nn.LayerNorm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, mask).tokens.flatten(1))
