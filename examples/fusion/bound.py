"""A lower bound on the crossings of any Hamiltonian path over a zone grid, and the share of the gap
to it that a search closes.

A crossing is a path edge between two cells of different zones (``grid.count_crossings``). Path
edges join 4-neighbours, so a maximal run of consecutive path cells inside one zone is
4-connected and lies in one *region* (a 4-connected component of equal zone ids). The path
visits every cell, hence every region, so it has at least ``R`` runs and at least ``R - 1``
crossings:

    bound = R - 1,    gap closed = (initial - final) / (initial - bound)

The bound is attained on ``left_right`` zones (R = 2: a vertical zigzag has 1 crossing); on other
layouts it may not be. Regions are counted by a vectorised union-find (min-label hooking and
pointer jumping over the equal-zone 4-neighbour edges), for one grid or a batch of equal-sized
grids at once.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["crossing_bound", "gap_closed", "region_labels", "zone_regions"]


def _check_zones(zones: np.ndarray) -> np.ndarray:
    zones = np.asarray(zones)
    if zones.ndim not in (2, 3) or zones.shape[-1] < 1 or zones.shape[-2] < 1:
        raise ValueError(f"zones: expected (h, w) or (B, h, w) with h, w >= 1, got shape {zones.shape}")
    if not np.issubdtype(zones.dtype, np.integer):
        raise TypeError(f"zones: expected integer zone ids, got dtype {zones.dtype}")
    return zones


def region_labels(zones: np.ndarray) -> np.ndarray:
    """Label every cell with the smallest flat index (within its grid) of its 4-connected region
    of equal zone id.

    Args:
        zones: integer zone ids.

    Shapes:
        - zones: ``(h, w)`` or ``(B, h, w)``
        - output: same as ``zones``, int64; two cells share a label iff a 4-neighbour walk through
          cells of their zone joins them.
    """
    zones = _check_zones(zones)
    batch = zones.reshape(-1, *zones.shape[-2:])
    b, h, w = batch.shape
    idx = np.arange(b * h * w).reshape(b, h, w)
    same_h = batch[:, :, :-1] == batch[:, :, 1:]
    same_v = batch[:, :-1, :] == batch[:, 1:, :]
    a = np.concatenate([idx[:, :, :-1][same_h], idx[:, :-1, :][same_v]])
    c = np.concatenate([idx[:, :, 1:][same_h], idx[:, 1:, :][same_v]])
    parent = np.arange(b * h * w)
    while True:
        # every parent pointer goes to a smaller index: a forest whose roots are its fixed points
        ra, rc = parent[a], parent[c]
        lo, hi = np.minimum(ra, rc), np.maximum(ra, rc)
        split = lo != hi
        if not split.any():
            break
        np.minimum.at(parent, hi[split], lo[split])  # hook each root under the smallest root it touches
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    labels = parent.reshape(b, h, w) - (np.arange(b) * h * w)[:, None, None]
    return labels.reshape(zones.shape)


def zone_regions(zones: np.ndarray) -> np.ndarray | int:
    """The number ``R`` of 4-connected regions of equal zone id: an int for ``(h, w)``, ``(B,)`` int64
    for ``(B, h, w)``."""
    labels = region_labels(zones)
    flat = labels.reshape(-1, labels.shape[-2] * labels.shape[-1])
    roots = (flat == np.arange(flat.shape[1])).sum(1)
    return int(roots[0]) if labels.ndim == 2 else roots


def crossing_bound(zones: np.ndarray) -> np.ndarray | int:
    """``R - 1``: no Hamiltonian path over ``zones`` has fewer crossings (see the module docstring).

    Shapes:
        - zones: ``(h, w)`` (returns an int) or ``(B, h, w)`` (returns ``(B,)`` int64)
    """
    return zone_regions(zones) - 1


def gap_closed(initial: Sequence[float] | np.ndarray, final: Sequence[float] | np.ndarray,
               bound: Sequence[float] | np.ndarray) -> float | None:
    """The share of the gap to the bound closed over a set of searches, as a ratio of sums:

        sum(initial - final) / sum(initial - bound)

    (over one search: ``(initial - final) / (initial - bound)``). 1 = every search reached its bound,
    0 = no change, negative = worse than where it started; ``None`` when there is no gap to close.
    """
    initial, final, bound = (np.asarray(v, dtype=np.float64) for v in (initial, final, bound))
    if not initial.shape == final.shape == bound.shape:
        raise ValueError(f"initial, final, bound: expected equal shapes, got {initial.shape}, {final.shape}, "
                         f"{bound.shape}")
    if (initial < bound).any() or (final < bound).any():
        raise ValueError("initial, final: expected every count >= its bound (a count below it is a bug)")
    gap = float((initial - bound).sum())
    return None if gap <= 0 else float((initial - final).sum()) / gap
