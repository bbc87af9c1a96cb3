"""Zone layouts, initial Hamiltonian paths and crossing counts on a ``height x width`` grid.

A path is stored as two bool edge arrays: ``H (height, width - 1)`` with ``H[y, x]`` the edge
``(x, y)-(x+1, y)`` and ``V (height - 1, width)`` with ``V[y, x]`` the edge ``(x, y)-(x, y+1)``.
Zones are an int array ``(height, width)`` relabelled to ``0..K-1``. A *crossing* is a path edge
whose two cells lie in different zones:

    C = sum(H & (z[:, :-1] != z[:, 1:])) + sum(V & (z[:-1] != z[1:]))
"""
from __future__ import annotations

import itertools

import numpy as np

__all__ = [
    "INIT_PATTERNS",
    "ZONE_PATTERNS",
    "count_crossings",
    "degrees",
    "init_path",
    "is_hamiltonian_path",
    "make_zones",
    "path_order",
    "resolve_init_pattern",
    "zone_differences",
]

ZONE_PATTERNS = ("left_right", "stripes", "voronoi", "islands")
INIT_PATTERNS = ("zigzag", "vertical_zigzag", "stripes")


def _check_size(width: int, height: int) -> None:
    if width < 3 or height < 3:
        raise ValueError(f"grid: expected width, height >= 3, got width={width}, height={height}")


def make_zones(width: int, height: int, pattern: str, *, rng: np.random.Generator | None = None,
               num_zones: int = 3, stripe_direction: str = "v", num_islands: int = 3,
               island_size: int | None = None) -> np.ndarray:
    """Zone ids ``(height, width)`` int64, relabelled to ``0..K-1`` (in the order of the raw ids).

    - ``left_right``: ``x < width // 2`` vs the rest (K = 2).
    - ``stripes``: ``num_zones`` bands of float width ``max(1, width / k)`` along x (direction
      ``"v"``, vertical stripes) or along y (``"h"``).
    - ``voronoi``: ``num_zones`` distinct random seed cells, nearest seed in squared distance
      (ties to the lowest seed index).
    - ``islands``: background plus up to ``num_islands`` square islands of side ``island_size``
      (default ``max(2, min(width, height) // 4)``) that never touch each other (1-cell gap);
      all islands share one id (K = 2).
    """
    _check_size(width, height)
    if pattern not in ZONE_PATTERNS:
        raise ValueError(f"pattern: expected one of {ZONE_PATTERNS}, got {pattern!r}")
    rng = np.random.default_rng() if rng is None else rng
    ys, xs = np.mgrid[0:height, 0:width]
    if pattern == "left_right":
        z = (xs >= width // 2).astype(np.int64)
    elif pattern == "stripes":
        if stripe_direction not in ("v", "h"):
            raise ValueError(f"stripe_direction: expected 'v' or 'h', got {stripe_direction!r}")
        coord, extent = (xs, width) if stripe_direction == "v" else (ys, height)
        band = max(1.0, extent / num_zones)
        z = np.minimum((coord // band).astype(np.int64), num_zones - 1)
    elif pattern == "voronoi":
        seeds = rng.choice(width * height, size=min(num_zones, width * height), replace=False)
        sy, sx = np.divmod(seeds, width)
        d2 = (ys[None] - sy[:, None, None]) ** 2 + (xs[None] - sx[:, None, None]) ** 2
        z = np.argmin(d2, axis=0)  # argmin returns the first minimum: ties go to the lowest index
    else:
        size = max(2, min(width, height) // 4) if island_size is None else island_size
        z = np.zeros((height, width), dtype=np.int64)
        placed, tries = 0, 0
        while placed < num_islands and tries < 50_000 and size <= min(width, height):
            tries += 1
            y0 = int(rng.integers(0, height - size + 1))
            x0 = int(rng.integers(0, width - size + 1))
            if z[max(0, y0 - 1):y0 + size + 1, max(0, x0 - 1):x0 + size + 1].any():
                continue
            z[y0:y0 + size, x0:x0 + size] = 1
            placed += 1
    return np.unique(z, return_inverse=True)[1].reshape(height, width).astype(np.int64)


def resolve_init_pattern(init_pattern: str, zone_pattern: str, stripe_direction: str = "v") -> str:
    """Resolve ``"auto"``: ``vertical_zigzag`` for ``left_right`` and vertical stripes, else ``zigzag``.

    The resolved name is what gets recorded; nothing downstream ever guesses it again.
    """
    if init_pattern == "auto":
        vertical = zone_pattern == "left_right" or (zone_pattern == "stripes" and stripe_direction == "v")
        return "vertical_zigzag" if vertical else "zigzag"
    if init_pattern not in INIT_PATTERNS:
        raise ValueError(f"init_pattern: expected 'auto' or one of {INIT_PATTERNS}, got {init_pattern!r}")
    return init_pattern


def _banded_cells(width: int, height: int, band: int = 3) -> list[tuple[int, int]]:
    # Horizontal bands of `band` (odd) rows; each band is swept column by column (down, up, ...),
    # bands alternate left-to-right / right-to-left. With an even width the band's last two
    # columns are swept row by row instead, so that every band still exits at its bottom row in
    # its last column, right above the next band's first column.
    cells: list[tuple[int, int]] = []
    for i, r0 in enumerate(range(0, height, band)):
        r1 = min(r0 + band, height)
        cols = list(range(width)) if i % 2 == 0 else list(range(width - 1, -1, -1))
        snake = cols if width % 2 else cols[:-2]
        for j, c in enumerate(snake):
            rows = range(r0, r1) if j % 2 == 0 else range(r1 - 1, r0 - 1, -1)
            cells.extend((y, c) for y in rows)
        if width % 2 == 0:
            a, b = cols[-2], cols[-1]
            for k, y in enumerate(range(r0, r1)):
                cells.extend([(y, a), (y, b)] if k % 2 == 0 else [(y, b), (y, a)])
    return cells


def init_path(width: int, height: int, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """Edge arrays ``(H, V)`` of an initial Hamiltonian path.

    - ``zigzag``: every row, joined at alternating ends (``V[y, 0 if y odd else width-1]``).
    - ``vertical_zigzag``: every column, joined at alternating ends
      (``H[height-1 if x even else 0, x]``).
    - ``stripes``: horizontal bands of 3 rows (the last band takes the 1-3 rows left), each swept
      column by column, bands alternating direction; for an even width the band's last two
      columns are swept row by row so the band ends in its bottom row above the next band's start.
    """
    _check_size(width, height)
    H = np.zeros((height, width - 1), dtype=bool)
    V = np.zeros((height - 1, width), dtype=bool)
    if pattern == "zigzag":
        H[:] = True
        V[np.arange(height - 1), np.where(np.arange(height - 1) % 2 == 1, 0, width - 1)] = True
    elif pattern == "vertical_zigzag":
        V[:] = True
        H[np.where(np.arange(width - 1) % 2 == 0, height - 1, 0), np.arange(width - 1)] = True
    elif pattern == "stripes":
        cells = _banded_cells(width, height)
        for (y0, x0), (y1, x1) in itertools.pairwise(cells):
            if y0 == y1 and abs(x0 - x1) == 1:
                H[y0, min(x0, x1)] = True
            elif x0 == x1 and abs(y0 - y1) == 1:
                V[min(y0, y1), x0] = True
            else:
                raise AssertionError(f"banded path jumps from {(y0, x0)} to {(y1, x1)}")
    else:
        raise ValueError(f"pattern: expected one of {INIT_PATTERNS}, got {pattern!r}")
    return H, V


def zone_differences(zones: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bool masks ``(dh, dv)`` of the H/V edges whose two cells are in different zones."""
    return zones[:, :-1] != zones[:, 1:], zones[:-1] != zones[1:]


def count_crossings(H: np.ndarray, V: np.ndarray, zones: np.ndarray) -> int:
    """The number of path edges joining two different zones (full recount)."""
    dh, dv = zone_differences(zones)
    return int(np.count_nonzero(H & dh) + np.count_nonzero(V & dv))


def degrees(H: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Path degree of every cell, ``(height, width)`` int."""
    h, w = H.shape[0], V.shape[1]
    deg = np.zeros((h, w), dtype=np.int64)
    deg[:, :-1] += H
    deg[:, 1:] += H
    deg[:-1, :] += V
    deg[1:, :] += V
    return deg


def path_order(H: np.ndarray, V: np.ndarray) -> np.ndarray | None:
    """Position of every cell along the path ``(height, width)`` int64, or ``None`` if the edges
    are not one Hamiltonian path. The walk starts at the degree-1 cell with the smallest flat index.
    O(cells) Python walk: used at construction and in tests, never per operation.
    """
    h, w = H.shape[0], V.shape[1]
    deg = degrees(H, V)
    ends = np.flatnonzero(deg.ravel() == 1)
    if ends.size != 2 or np.count_nonzero(deg == 2) != h * w - 2:
        return None
    Hl, Vl = H.tolist(), V.tolist()
    order = np.full(h * w, -1, dtype=np.int64)
    prev, cur = -1, int(ends[0])
    for i in range(h * w):
        order[cur] = i
        y, x = divmod(cur, w)
        nxt = -1
        for cand, has in ((cur - 1, x > 0 and Hl[y][x - 1]), (cur + 1, x < w - 1 and Hl[y][x]),
                          (cur - w, y > 0 and Vl[y - 1][x]), (cur + w, y < h - 1 and Vl[y][x])):
            if has and cand != prev:
                nxt = cand
                break
        if nxt == -1:
            break
        if order[nxt] != -1:
            return None  # closed a loop before visiting every cell
        prev, cur = cur, nxt
    if (order < 0).any():
        return None
    return order.reshape(h, w)


def is_hamiltonian_path(H: np.ndarray, V: np.ndarray) -> bool:
    """True when the edges form one path through every cell."""
    return path_order(H, V) is not None
