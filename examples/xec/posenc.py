"""Where the seven face tokens are: the positional encodings of the seed's table, for the fusion transformer.

The seed (XEC "ML Techniques" §6) uses a learned vector per face and lists sinusoidal, RoPE and ALiBi as
alternatives, with a geometric encoding of each face's 3-D centre as future work. The face tokens have no
natural 1-D order, so each encoding needs a notion of position; ours (``--pos-enc``):

- ``learned``: a trunc-normal (std 0.02) vector per token, added (the seed's choice).
- ``sinusoidal``: the Transformer's fixed table, interleaved as the seed writes it,
  ``PE(p, 2i) = sin(p / 10000^(2i/d))``, ``PE(p, 2i+1) = cos(p / 10000^(2i/d))``, at the token index
  ``p`` (order :data:`xec.model.TOKENS`), added.
- ``geometric``: the same interleaved sin/cos of each coordinate (x, y, z in cm) of the token's centre,
  the mean position of the sensors it reads (:func:`token_centres`), ``d // 6`` frequencies per
  coordinate, zero-padded to ``d``, added.
- ``rope``: rotary embedding of q and k in every fusion block at the token index (a relative offset of
  token indices, which only says "a different face"; the token order is arbitrary).
- ``alibi``: each head's bias ``-m_h d_ij`` with the Press et al. slopes and ``d_ij`` the 3-D distance
  between the two tokens' centres in units of the closest pair (outer coarse to outer centre, 19.4 cm),
  so distances run from 1 to 7.9, about the range token indices 0-6 would give.
"""
from __future__ import annotations

import torch
from einops import rearrange

from blockyard.blocks import alibi_bias, alibi_slopes, timestep_embedding

from .geometry import Geometry

__all__ = ["POS_ENCODINGS", "face_alibi_bias", "geometric_table", "sinusoidal_table", "token_centres"]

POS_ENCODINGS = ("learned", "sinusoidal", "geometric", "rope", "alibi")


def token_centres(geometry: Geometry, grids: tuple[str, ...]) -> torch.Tensor:
    """``(len(grids) + 2, 3)`` cm: the mean sensor position of each image grid (``Geometry`` attribute
    names), then of the top and bottom hex faces (the token order of :class:`xec.model.XECEncoder`)."""
    ids = [getattr(geometry, name).sensor_ids for name in grids] + [geometry.top_ids, geometry.bottom_ids]
    return torch.stack([geometry.position[i].double().mean(0) for i in ids]).to(geometry.position.dtype)


def sinusoidal_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The seed's interleaved sinusoid ``(N, dim)`` at ``positions (N,)``: sin in even, cos in odd channels."""
    if dim < 2 or dim % 2:
        raise ValueError(f"dim: expected a positive even number, got {dim}")
    # timestep_embedding with shift 0 has frequencies base ** (-2i / dim) and lays out [sin..., cos...]
    table = timestep_embedding(positions, dim, max_period=base, downscale_freq_shift=0.0)
    return rearrange(table, "n (two half) -> n (half two)", two=2)


def geometric_table(centres: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """``(N, dim)``: :func:`sinusoidal_table` of x, y and z of ``centres (N, 3)`` (cm), ``2 (dim // 6)``
    channels each, then zeros up to ``dim``."""
    if centres.dim() != 2 or centres.shape[1] != 3:
        raise ValueError(f"centres: expected (N, 3), got {tuple(centres.shape)}")
    width = 2 * (dim // 6)
    if width < 2:
        raise ValueError(f"dim: expected >= 6, got {dim}")
    table = torch.cat([sinusoidal_table(centres[:, k], width, base) for k in range(3)], 1)
    return torch.nn.functional.pad(table, (0, dim - 3 * width))


def face_alibi_bias(centres: torch.Tensor, heads: int) -> torch.Tensor:
    """``(heads, N, N)`` ALiBi bias over the centres' 3-D distances, in units of the closest pair."""
    distances = torch.cdist(centres.double(), centres.double())
    unit = distances[~torch.eye(len(centres), dtype=torch.bool)].min()
    return alibi_bias(distances / unit, alibi_slopes(heads, dtype=torch.float64)).to(centres.dtype)
