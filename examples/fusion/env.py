"""The FusionNet grid world: a Hamiltonian path over zoned cells, rewired by 12 local operations.

State: zones ``(h, w)``, the path as edge arrays ``H (h, w-1)`` / ``V (h-1, w)`` (see
``grid.py``) and the crossing count, kept incrementally. An op applies when its window's
internal edges equal its ``old`` set; that alone guarantees one Hamiltonian path afterwards
(every table keeps degrees and the pairing of strand ends, ``ops._verify_tables``), so checking
an op is O(window) and enumerating all of them is a few whole-grid array operations:

- each window's internal edges as a bitmask: one gather of its edge bits and a product with
  the bit weights (``ops.SHAPES`` fixes the bit order);
- ``variant_of_code[code]`` gives the matching variant (or -1) of every window at once;
- ``delta[variant, d]`` gives its crossing change from the zone-difference bitmask ``d``.

The per-anchor variant map is kept up to date: an op only changes edges inside its window,
so only the 5 x 5 anchors around it are recoded after ``apply``, and ``candidates()`` is a
``flatnonzero`` over the map plus two lookups.
"""
from __future__ import annotations

from enum import Enum
from functools import cache
from typing import NamedTuple

import numpy as np

from fusion.grid import count_crossings, init_path, make_zones, path_order, resolve_init_pattern, zone_differences
from fusion.ops import OPS, SHAPES, Op, match_tables, mirror_op

__all__ = ["ApplyResult", "Candidates", "FusionEnv", "Status"]


class Status(Enum):
    """Outcome of checking or applying one operation."""

    OK = "ok"
    OUT_OF_BOUNDS = "out_of_bounds"  # the window does not fit in the grid
    PATTERN_MISMATCH = "pattern_mismatch"  # the window's edges are not the op's `old` set


class ApplyResult(NamedTuple):
    status: Status
    delta: int  # change of the crossing count (0 unless status is OK)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


class Candidates(NamedTuple):
    """Every applicable operation, one entry each; all arrays are ``(n,)``."""

    variant: np.ndarray  # int64 index into VARIANTS
    y: np.ndarray  # int64 anchor row (top-left)
    x: np.ndarray  # int64 anchor column (top-left)
    delta: np.ndarray  # int64 crossing change if applied

    @property
    def size(self) -> int:
        return int(self.variant.shape[0])

    def op(self, i: int) -> Op:
        return Op(int(self.variant[i]), int(self.y[i]), int(self.x[i]))


def _local_arrays() -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]:
    # (old_h, old_v, new_h, new_v) window slices per variant
    out = []
    for spec in OPS:
        shape = SHAPES[spec.shape_index]
        arrays = []
        for code in (spec.old_code, spec.new_code):
            lh = np.zeros((shape.height, shape.width - 1), dtype=bool)
            lv = np.zeros((shape.height - 1, shape.width), dtype=bool)
            for b, r, c in shape.h_bits:
                lh[r, c] = bool(code >> b & 1)
            for b, r, c in shape.v_bits:
                lv[r, c] = bool(code >> b & 1)
            arrays += [lh, lv]
        out.append((arrays[0], arrays[1], arrays[2], arrays[3]))
    return tuple(out)


_LOCAL = _local_arrays()
_PAD = 4  # border of False edges around the grid, so that recoding near the border never wraps


@cache
def _layout(hp: int, wp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat offsets for a padded ``(hp, wp)`` grid: ``bit_off (26,)`` of every edge bit of the
    three window shapes (shape-major, bit order of ``WindowShape.edges``) into the stacked
    ``[H; V]`` array, ``map_off (3,)`` of the shape maps, ``near (25,)`` of the anchors whose
    window can meet a window anchored at the origin."""
    area = hp * wp
    bit_off = []
    for shape in SHAPES:
        for b, r, c in shape.h_bits + shape.v_bits:
            bit_off.append((area if b >= len(shape.h_bits) else 0) + r * wp + c)
    near = (np.arange(-2, 3)[:, None] * wp + np.arange(-2, 3)[None, :]).ravel()
    return np.array(bit_off), np.arange(len(SHAPES)) * area, near


def _bit_weights() -> np.ndarray:
    # (26, 3): gathered bit k -> its value 1 << b in the code of its own shape
    weights = np.zeros((sum(s.num_bits for s in SHAPES), len(SHAPES)), dtype=np.float32)
    k = 0
    for s, shape in enumerate(SHAPES):
        for b in range(shape.num_bits):
            weights[k, s] = 1 << b
            k += 1
    return weights


def _code_table() -> np.ndarray:
    # variant of (shape, fits, code) at s * 8192 + 4096 * (not fits) + code; -1 = no match
    variant_of_code = match_tables()[0]
    table = np.full((len(SHAPES), 2, 4096), -1, dtype=np.int8)
    table[:, 0] = variant_of_code
    return table.ravel()


_WEIGHTS = _bit_weights()
_CODE_TABLE = _code_table()
_DELTA = match_tables()[1].astype(np.int64).ravel()  # delta of variant v, zone code d at v * 4096 + d


class FusionEnv:
    """Zoned grid with one Hamiltonian path, rewired in place by safe operations.

    Args:
        zones: ``(h, w)`` int zone ids (``0..K-1``), ``h, w >= 3``.
        H: ``(h, w-1)`` bool horizontal path edges; V: ``(h-1, w)`` bool vertical path edges.
        zone_pattern, init_pattern: recorded names (``init_pattern`` is the resolved one).
        check: verify once (O(cells) walk) that the edges form one Hamiltonian path.

    ``env.H``/``env.V`` are read-only views of the state: it changes only through ``apply``.
    Raises ``ValueError`` if the shapes disagree or (with ``check``) the edges are not one path.
    """

    def __init__(self, zones: np.ndarray, H: np.ndarray, V: np.ndarray, *, zone_pattern: str = "custom",
                 init_pattern: str = "custom", check: bool = True) -> None:
        zones = np.asarray(zones)
        if zones.ndim != 2 or min(zones.shape) < 3:
            raise ValueError(f"zones: expected (h, w) with h, w >= 3, got {zones.shape}")
        h, w = zones.shape
        if np.shape(H) != (h, w - 1) or np.shape(V) != (h - 1, w):
            raise ValueError(f"H, V: expected ({h}, {w - 1}) and ({h - 1}, {w}), got {np.shape(H)} and {np.shape(V)}")
        P, hp, wp = _PAD, h + 2 * _PAD, w + 2 * _PAD
        self.zones = zones.astype(np.int64, copy=True)
        self.zone_pattern, self.init_pattern = zone_pattern, init_pattern
        self._area = hp * wp
        self._bit_off, self._map_off, self._near = _layout(hp, wp)
        self._edges = np.zeros((2, hp, wp), dtype=bool)  # padded [H; V], gathered flat
        self.H = self._edges[0, P:P + h, P:P + w - 1]
        self.V = self._edges[1, P:P + h - 1, P:P + w]
        self.H[:] = H
        self.V[:] = V
        self.H.flags.writeable = self.V.flags.writeable = False  # the maps below must stay in sync
        if check and path_order(self.H, self.V) is None:
            raise ValueError("H, V: the edges are not one Hamiltonian path")
        self.crossings = count_crossings(self.H, self.V, self.zones)
        # flat per (shape, padded anchor): real coordinates, table offset (shape, fits), zone code
        ys, xs = np.mgrid[-P:h + P, -P:w + P]
        widths = np.array([s.width for s in SHAPES])[:, None, None]
        heights = np.array([s.height for s in SHAPES])[:, None, None]
        fits = (ys >= 0) & (xs >= 0) & (ys <= h - heights) & (xs <= w - widths)
        self._y = np.broadcast_to(ys, fits.shape).ravel()
        self._x = np.broadcast_to(xs, fits.shape).ravel()
        self._table_off = (np.arange(len(SHAPES))[:, None, None] * 8192 + 4096 * ~fits).ravel()
        anchors = ((P + ys[P:P + h, P:P + w]) * wp + P + xs[P:P + h, P:P + w]).ravel()
        zone_edges = np.zeros_like(self._edges)
        zone_edges[0, P:P + h, P:P + w - 1], zone_edges[1, P:P + h - 1, P:P + w] = zone_differences(self.zones)
        self._dcode = np.zeros(fits.size, dtype=np.int64)
        self._dcode[anchors[:, None] + self._map_off] = self._codes(zone_edges, anchors)
        self._variant = np.full(fits.size, -1, dtype=np.int8)
        self._recode(anchors)

    def _codes(self, edges: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        # (n, 3) int64 window bitmasks at flat padded anchors, one column per shape; the float32
        # product runs on BLAS and is exact (codes < 2**12)
        bits = edges.ravel().take(anchors[:, None] + self._bit_off)
        return (bits.astype(np.float32) @ _WEIGHTS).astype(np.int64)

    def _recode(self, anchors: np.ndarray) -> None:
        at = anchors[:, None] + self._map_off
        self._variant[at] = _CODE_TABLE.take(self._codes(self._edges, anchors) + self._table_off.take(at))

    @classmethod
    def create(cls, width: int, height: int, zone_pattern: str, *, init_pattern: str = "auto",
               rng: np.random.Generator | None = None, stripe_direction: str = "v", **zone_kwargs) -> FusionEnv:
        """Fresh zones (``grid.make_zones``) and the initial path; ``"auto"`` is resolved here."""
        zones = make_zones(width, height, zone_pattern, rng=rng, stripe_direction=stripe_direction, **zone_kwargs)
        resolved = resolve_init_pattern(init_pattern, zone_pattern, stripe_direction)
        H, V = init_path(width, height, resolved)
        return cls(zones, H, V, zone_pattern=zone_pattern, init_pattern=resolved, check=False)

    @property
    def height(self) -> int:
        return self.zones.shape[0]

    @property
    def width(self) -> int:
        return self.zones.shape[1]

    def copy(self) -> FusionEnv:
        return FusionEnv(self.zones, self.H, self.V, zone_pattern=self.zone_pattern,
                         init_pattern=self.init_pattern, check=False)

    def mirrored(self, *, flip_x: bool = False, flip_y: bool = False) -> FusionEnv:
        """The whole world mirrored left-right (``flip_x``) and/or up-down; see ``ops.mirror_op``."""
        sx = slice(None, None, -1) if flip_x else slice(None)
        sy = slice(None, None, -1) if flip_y else slice(None)
        return FusionEnv(self.zones[sy, sx], self.H[sy, sx], self.V[sy, sx], zone_pattern=self.zone_pattern,
                         init_pattern=self.init_pattern, check=False)

    def mirror_op(self, op: Op, *, flip_x: bool = False, flip_y: bool = False) -> Op:
        return mirror_op(op, self.width, self.height, flip_x=flip_x, flip_y=flip_y)

    # -- one operation -------------------------------------------------------------------------
    def _flat(self, spec, y: int, x: int) -> int:
        return spec.shape_index * self._area + (_PAD + y) * (self.width + 2 * _PAD) + _PAD + x

    def evaluate(self, op: Op) -> ApplyResult:
        """Would ``op`` apply, and with which crossing change? Leaves the state untouched. O(1)."""
        v, y, x = op
        if not 0 <= v < len(OPS):
            raise ValueError(f"op.variant: expected 0..{len(OPS) - 1}, got {v}")
        spec = OPS[v]
        if not (0 <= y <= self.height - spec.height and 0 <= x <= self.width - spec.width):
            return ApplyResult(Status.OUT_OF_BOUNDS, 0)
        at = self._flat(spec, y, x)
        if self._variant[at] != v:
            return ApplyResult(Status.PATTERN_MISMATCH, 0)
        return ApplyResult(Status.OK, int(_DELTA[v * 4096 + self._dcode[at]]))

    def apply(self, op: Op) -> ApplyResult:
        """Apply ``op`` if its window matches (the result is then one Hamiltonian path again);
        otherwise change nothing and say why. O(window): only the 5 x 5 anchors around it are recoded."""
        result = self.evaluate(op)
        if result.ok:
            v, y, x = op
            spec = OPS[v]
            Y, X = _PAD + y, _PAD + x
            self._edges[0, Y:Y + spec.height, X:X + spec.width - 1] = _LOCAL[v][2]
            self._edges[1, Y:Y + spec.height - 1, X:X + spec.width] = _LOCAL[v][3]
            self.crossings += result.delta
            self._recode(self._flat(spec, y, x) - spec.shape_index * self._area + self._near)
        return result

    # -- all operations at once ----------------------------------------------------------------
    def candidates(self) -> Candidates:
        """Every applicable op with its crossing delta, read off the maintained variant map.

        Ordered by window shape (transposes, w/e, n/s), then row-major by anchor.
        """
        at = np.flatnonzero(self._variant >= 0)
        v = self._variant[at].astype(np.int64)
        return Candidates(v, self._y[at], self._x[at], _DELTA[v * 4096 + self._dcode[at]])
