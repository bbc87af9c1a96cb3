"""The 12 local rewiring operations of FusionNet and their lookup tables.

An operation rewires the Hamiltonian path inside a small window anchored at its top-left
cell ``(x, y)``: it applies only when the path edges *inside* the window are exactly its
``old`` set, and replaces them by its ``new`` set.

- 8 transposes (kind ``"T"``) on a 3-wide x 3-tall window: ``nl nr sl sr eb ea wa wb``;
- 4 flips (kind ``"F"``): ``w``/``e`` on a 3-wide x 2-tall window, ``n``/``s`` on a
  2-wide x 3-tall window.

Local cells are numbered row-major inside the window, ``index = row * window_width + col``.
The ``old``/``new`` edge lists are the facts of ``HamiltonianSTL.transpose_patterns`` and
``flip_patterns`` in ``operations.py`` of yasaminaali/AI-in-3D-Printing (the FusionNet seed),
written here as data; tests/examples/test_fusion_env.py checks their properties (each cell's
degree is kept, ``|old| == |new|``, flips are inverse pairs, the mirror maps below are the
geometric reflections of the tables).

Validity needs no graph search: in every table ``old`` and ``new`` are two strands with the
same end cells, paired the same way (``_verify_tables``, run at import), so a window that
matches ``old`` always yields one Hamiltonian path again. The seed's DFS after every op
(``validate_full_path``) could never fail.

Every window is encoded as a bitmask of its internal edges (horizontal edges row-major, then
vertical edges row-major), which turns matching into one table lookup per anchor and the
crossing delta into ``popcount(new & d) - popcount(old & d)`` with ``d`` the zone-difference
bitmask of the same window.
"""
from __future__ import annotations

from functools import cache
from typing import NamedTuple

import numpy as np

__all__ = [
    "FLIPS_X",
    "FLIPS_Y",
    "OPS",
    "SHAPES",
    "VARIANTS",
    "VARIANT_MAP",
    "Op",
    "OpSpec",
    "WindowShape",
    "match_tables",
    "mirror_op",
    "strand_ends",
]

VARIANTS: tuple[str, ...] = ("nl", "nr", "sl", "sr", "eb", "ea", "wa", "wb", "n", "s", "e", "w")
VARIANT_MAP: dict[str, int] = {name: i for i, name in enumerate(VARIANTS)}

# (old, new) local edge lists per variant.
_TABLES: dict[str, tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]] = {
    "nl": (((0, 1), (1, 2), (3, 4), (3, 6), (4, 5), (6, 7), (7, 8)),
           ((0, 3), (1, 2), (1, 4), (3, 6), (4, 7), (5, 8), (6, 7))),
    "nr": (((0, 1), (1, 2), (3, 4), (4, 5), (5, 8), (6, 7), (7, 8)),
           ((0, 1), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (7, 8))),
    "sl": (((0, 1), (0, 3), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8)),
           ((0, 1), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (7, 8))),
    "sr": (((0, 1), (1, 2), (2, 5), (3, 4), (4, 5), (6, 7), (7, 8)),
           ((0, 3), (1, 2), (1, 4), (2, 5), (4, 7), (5, 8), (6, 7))),
    "eb": (((0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 7)),
           ((0, 1), (2, 5), (3, 4), (3, 6), (4, 5), (6, 7), (7, 8))),
    "ea": (((0, 1), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8)),
           ((0, 1), (0, 3), (1, 2), (3, 4), (4, 5), (5, 8), (6, 7))),
    "wa": (((0, 3), (1, 2), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8)),
           ((0, 1), (1, 2), (2, 5), (3, 4), (3, 6), (4, 5), (7, 8))),
    "wb": (((0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (7, 8)),
           ((0, 3), (1, 2), (3, 4), (4, 5), (5, 8), (6, 7), (7, 8))),
    # flips w/e: 3 wide x 2 tall (cells 0 1 2 / 3 4 5); n/s: 2 wide x 3 tall (0 1 / 2 3 / 4 5)
    "n": (((0, 1), (2, 3), (2, 4), (3, 5)), ((0, 2), (1, 3), (2, 3), (4, 5))),
    "s": (((0, 2), (1, 3), (2, 3), (4, 5)), ((0, 1), (2, 3), (2, 4), (3, 5))),
    "e": (((0, 1), (1, 4), (2, 5), (3, 4)), ((0, 3), (1, 2), (1, 4), (4, 5))),
    "w": (((0, 3), (1, 2), (1, 4), (4, 5)), ((0, 1), (1, 4), (2, 5), (3, 4))),
}

# Mirror maps (whole-grid reflections). FLIPS_X: x -> w-1-x; FLIPS_Y: y -> h-1-y.
FLIPS_X: tuple[int, ...] = tuple(VARIANT_MAP[n] for n in ("nr", "nl", "sr", "sl", "wb", "wa", "ea", "eb",
                                                           "n", "s", "w", "e"))
FLIPS_Y: tuple[int, ...] = tuple(VARIANT_MAP[n] for n in ("sl", "sr", "nl", "nr", "ea", "eb", "wb", "wa",
                                                           "s", "n", "e", "w"))


class WindowShape(NamedTuple):
    """A window of ``width`` x ``height`` cells and the bit order of its internal edges.

    ``edges[b] = (i, j)`` is bit ``b``; ``h_bits``/``v_bits`` list ``(bit, row, col)`` of the
    horizontal edge ``(row, col)-(row, col+1)`` and the vertical edge ``(row, col)-(row+1, col)``.
    """

    width: int
    height: int
    edges: tuple[tuple[int, int], ...]
    h_bits: tuple[tuple[int, int, int], ...]
    v_bits: tuple[tuple[int, int, int], ...]

    @property
    def num_bits(self) -> int:
        return len(self.edges)


def _window_shape(width: int, height: int) -> WindowShape:
    edges, h_bits, v_bits = [], [], []
    for r in range(height):
        for c in range(width - 1):
            h_bits.append((len(edges), r, c))
            edges.append((r * width + c, r * width + c + 1))
    for r in range(height - 1):
        for c in range(width):
            v_bits.append((len(edges), r, c))
            edges.append((r * width + c, (r + 1) * width + c))
    return WindowShape(width, height, tuple(edges), tuple(h_bits), tuple(v_bits))


SHAPES: tuple[WindowShape, ...] = (_window_shape(3, 3), _window_shape(3, 2), _window_shape(2, 3))


class OpSpec(NamedTuple):
    """Everything known about one variant: tables, window, codes and the edge diff."""

    index: int
    name: str
    kind: str  # "T" (transpose) or "F" (flip)
    shape_index: int  # into SHAPES
    width: int
    height: int
    old: tuple[tuple[int, int], ...]
    new: tuple[tuple[int, int], ...]
    old_code: int
    new_code: int
    removed: tuple[tuple[int, int], ...]  # old - new
    added: tuple[tuple[int, int], ...]  # new - old


def _spec(index: int, name: str) -> OpSpec:
    old, new = _TABLES[name]
    shape_index = 0 if index < 8 else (2 if name in ("n", "s") else 1)
    shape = SHAPES[shape_index]
    bit = {e: b for b, e in enumerate(shape.edges)}
    old_code = sum(1 << bit[e] for e in old)
    new_code = sum(1 << bit[e] for e in new)
    removed = tuple(sorted(set(old) - set(new)))
    added = tuple(sorted(set(new) - set(old)))
    return OpSpec(index, name, "T" if index < 8 else "F", shape_index, shape.width, shape.height,
                  old, new, old_code, new_code, removed, added)


OPS: tuple[OpSpec, ...] = tuple(_spec(i, n) for i, n in enumerate(VARIANTS))


class Op(NamedTuple):
    """One operation: ``variant`` index (see ``VARIANT_MAP``) at top-left anchor ``(y, x)``."""

    variant: int
    y: int
    x: int

    @property
    def name(self) -> str:
        return VARIANTS[self.variant]

    @property
    def kind(self) -> str:
        return OPS[self.variant].kind

    def to_record(self) -> dict:
        """The seed's JSONL op format: ``{"kind", "x", "y", "variant"}``."""
        return {"kind": self.kind, "x": int(self.x), "y": int(self.y), "variant": self.name}

    @classmethod
    def from_record(cls, rec: dict) -> Op:
        name = rec["variant"]
        if name not in VARIANT_MAP:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {name!r}")
        op = cls(VARIANT_MAP[name], int(rec["y"]), int(rec["x"]))
        if rec.get("kind", op.kind) != op.kind:
            raise ValueError(f"kind: expected {op.kind!r} for variant {name!r}, got {rec['kind']!r}")
        return op


def mirror_op(op: Op, width: int, height: int, *, flip_x: bool = False, flip_y: bool = False) -> Op:
    """The same operation seen on the grid mirrored left-right (``flip_x``) and/or up-down.

    The anchor is the window's top-left cell, so it moves by the window size:
    ``x' = width - window_width - x`` (not ``width - 1 - x``, the seed's bug) and likewise
    ``y' = height - window_height - y``. The variant is remapped by ``FLIPS_X``/``FLIPS_Y``.
    Mirroring keeps each variant's window shape, so the order of the two flips is irrelevant.
    """
    v, y, x = op
    spec = OPS[v]
    if flip_x:
        v, x = FLIPS_X[v], width - spec.width - x
    if flip_y:
        v, y = FLIPS_Y[v], height - spec.height - y
    return Op(v, y, x)


def _popcount(a: np.ndarray) -> np.ndarray:
    return np.unpackbits(a.astype(">u2").view(np.uint8).reshape(-1, 2), axis=1).sum(1)


@cache
def match_tables() -> tuple[np.ndarray, np.ndarray]:
    """``variant_of_code (3, 4096) int8`` (-1 = no pattern) and ``delta (12, 4096) int8``.

    ``delta[v, d] = popcount(new_v & d) - popcount(old_v & d)``: the crossing change of variant
    ``v`` in a window whose zone-difference bitmask is ``d``.
    """
    codes = np.arange(4096, dtype=np.int64)
    variant_of_code = np.full((len(SHAPES), 4096), -1, dtype=np.int8)
    delta = np.zeros((len(OPS), 4096), dtype=np.int8)
    for spec in OPS:
        if variant_of_code[spec.shape_index, spec.old_code] != -1:
            raise AssertionError(f"two variants share the pattern of {spec.name}")
        variant_of_code[spec.shape_index, spec.old_code] = spec.index
        delta[spec.index] = _popcount(codes & spec.new_code) - _popcount(codes & spec.old_code)
    variant_of_code.setflags(write=False)
    delta.setflags(write=False)
    return variant_of_code, delta


def strand_ends(edges: tuple[tuple[int, int], ...], num_cells: int) -> frozenset[tuple[int, int]] | None:
    """End cells ``(a, b)`` of each strand (connected piece) the edges form inside a window, or
    ``None`` if they are not disjoint simple paths (a cycle, or a cell of degree 3+). A cell
    with no window edge is a strand ``(c, c)``."""
    parent = list(range(num_cells))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    degree = [0] * num_cells
    for i, j in edges:
        ri, rj = find(i), find(j)
        degree[i] += 1
        degree[j] += 1
        if ri == rj or degree[i] > 2 or degree[j] > 2:
            return None
        parent[ri] = rj
    ends: dict[int, list[int]] = {}
    for c in range(num_cells):
        if degree[c] <= 1:
            ends.setdefault(find(c), []).extend([c] * (2 - degree[c]))
    return frozenset((min(e), max(e)) for e in ends.values())


def _verify_tables() -> None:
    # Why a pattern match is enough (no graph search per op): in every table, old and new are
    # forests of strands with the same end cells, paired the same way, and every cell keeps its
    # degree. Outside the window nothing changes, so the path visits the same strand ends in the
    # same order; only which window cells lie on which strand changes. One Hamiltonian path in,
    # one Hamiltonian path out. Checked here so that an edited table fails at import.
    for spec in OPS:
        n = spec.width * spec.height
        deg_old, deg_new = [0] * n, [0] * n
        for (i, j), (k, m) in zip(spec.old, spec.new):
            deg_old[i] += 1
            deg_old[j] += 1
            deg_new[k] += 1
            deg_new[m] += 1
        if len(spec.old) != len(spec.new) or deg_old != deg_new:
            raise AssertionError(f"{spec.name}: old and new differ in some cell's degree")
        ends_old = strand_ends(spec.old, n)
        if ends_old is None or ends_old != strand_ends(spec.new, n):
            raise AssertionError(f"{spec.name}: old and new pair the strand ends differently")


_verify_tables()
