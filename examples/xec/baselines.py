"""Classical fill-ins for masked XEC sensors: the average of visible neighbours and the face mean.

The inpainting heads (:mod:`xec.inpaint`) must beat both, per face, on the same masked sensors.

Neighbours (:func:`neighbour_graph`): on the image grids the network reads (inner 93 x 44, us and
ds 24 x 6, outer coarse 9 x 24 and outer centre 5 x 6), the up to 8 other sensors of the 3 x 3
window around a sensor's cell; on the hex faces (top, bottom) the sensors linked to it by
``Geometry.hex_edge_index`` (up to 6). The 12 outer PMTs that sit on both outer grids get the
neighbours of both. One directed edge list over the 4760 sensor ids holds all of it, so the
average is a pair of ``index_add`` calls for the whole batch.

Mask convention (house rule): **True = masked** (hidden or dead); ``visible`` arguments are the
opposite flag (True = readable).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .geometry import N_SENSORS, Geometry

__all__ = ["GRID_FACES", "Fill", "face_mean", "fill_in", "neighbour_average", "neighbour_graph"]

GRID_FACES = ("inner", "us", "ds", "outer_coarse", "outer_center")  # the network's image grids


def neighbour_graph(geometry: Geometry) -> torch.Tensor:
    """Directed edges ``(2, E)`` between sensor ids (row 0 = source neighbour, row 1 = target), unique,
    without self loops: 3 x 3 windows on the image grids, ``hex_edge_index`` on the hex faces."""
    edges = []
    for name in GRID_FACES:
        index_map = getattr(geometry, name).index_map.cpu()
        height, width = index_map.shape
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == dx == 0:
                    continue
                dst = index_map[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
                src = index_map[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)]
                edges.append(torch.stack([src.flatten(), dst.flatten()]))
    hex_src, hex_dst = geometry.hex_edge_index.cpu()
    for ids in (geometry.top_ids.cpu(), geometry.bottom_ids.cpu()):
        edges.append(torch.stack([ids[hex_src], ids[hex_dst]]))
    edges = torch.cat(edges, 1)
    edges = edges[:, edges[0] != edges[1]]
    return torch.unique(edges, dim=1).to(geometry.position.device)


def _check(values: torch.Tensor, visible: torch.Tensor) -> None:
    if values.dim() != 2 or values.shape[1] != N_SENSORS:
        raise ValueError(f"values: expected (B, {N_SENSORS}), got {tuple(values.shape)}")
    if visible.dtype != torch.bool or visible.shape != values.shape:
        raise ValueError(f"visible: expected bool {tuple(values.shape)}, got {visible.dtype} {tuple(visible.shape)}")


def neighbour_average(values: torch.Tensor, visible: torch.Tensor,
                      edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean of each sensor's visible neighbours: :math:`\bar v_i = \sum_{j \to i} m_j v_j / \sum_{j \to i} m_j`.

    Values at invisible sensors are never read (``where``, not a product: NaN there cannot leak).

    Args:
        values: per-sensor values, e.g. normalised npho or time.
        visible: bool, True = readable (not masked, and for time: a valid time).
        edges: from :func:`neighbour_graph`.

    Shapes:
        - values, visible: ``(B, 4760)``; edges: ``(2, E)``
        - output: ``(average (B, 4760)`` (0 where no neighbour is visible), ``found (B, 4760)`` bool)
    """
    _check(values, visible)
    src, dst = edges
    readable = visible[:, src]
    picked = torch.where(readable, values[:, src], torch.zeros((), dtype=values.dtype, device=values.device))
    total = values.new_zeros(values.shape).index_add_(1, dst, picked)
    count = values.new_zeros(values.shape).index_add_(1, dst, readable.to(values.dtype))
    return total / count.clamp_min(1), count > 0


def face_mean(values: torch.Tensor, visible: torch.Tensor, face: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the visible sensors of each sensor's face, in the same event, broadcast back to the sensors.

    Shapes: values, visible ``(B, 4760)``, face ``(4760,)`` face index; output ``(mean (B, 4760)``
    (0 where the face has no visible sensor), ``found (B, 4760)`` bool).
    """
    _check(values, visible)
    if face.shape != (N_SENSORS,):
        raise ValueError(f"face: expected ({N_SENSORS},), got {tuple(face.shape)}")
    faces = int(face.max()) + 1
    picked = torch.where(visible, values, torch.zeros((), dtype=values.dtype, device=values.device))
    total = values.new_zeros(values.shape[0], faces).index_add_(1, face, picked)
    count = values.new_zeros(values.shape[0], faces).index_add_(1, face, visible.to(values.dtype))
    return (total / count.clamp_min(1))[:, face], (count > 0)[:, face]


class Fill(NamedTuple):
    """Baseline predictions ``(B, 4760)`` each, in the units of the values given."""

    neighbours: torch.Tensor
    face_mean: torch.Tensor


def fill_in(values: torch.Tensor, visible: torch.Tensor, face: torch.Tensor, edges: torch.Tensor,
            default: float = 0.0) -> Fill:
    """Both baselines at every sensor. The neighbour average falls back to the face mean where no neighbour
    is visible, the face mean to ``default`` where the face has no visible sensor.

    Shapes: values, visible ``(B, 4760)`` (True = readable); face ``(4760,)`` (``Geometry.face``);
    edges from :func:`neighbour_graph`."""
    mean, has_mean = face_mean(values, visible, face)
    mean = torch.where(has_mean, mean, torch.full_like(mean, default))
    average, has_neighbour = neighbour_average(values, visible, edges)
    return Fill(torch.where(has_neighbour, average, mean), mean)
