"""The XEC liquid-xenon calorimeter's 4760 photo-sensors, built parametrically.

Facts: from the XEC system's original code, xec-ml-wl ("the repo"), as the project's notes on it
record them (a § number is a section of those notes): §1.1 (id ranges, face shapes, physical layout
measured on the repo's ``sensor_directions.txt``), §1.2 (outer fine grid), §1.3 (hex rows), §1.4
(outer orientation bug) and §5 (the parametrisation). Cylinder axis ``z``, azimuth ``phi`` in degrees,
lengths in cm. Ids are the repo's, so its maps and ours agree sensor for sensor.

====================  ===========  ==============================================================
face (id constant)    sensor ids   layout
====================  ===========  ==============================================================
inner ``INNER``       0-4091       93 phi x 44 z SiPMs at r = 64.8, id = 44 * row + col
outer ``OUTER``       4092-4307    24 phi strips x 9 z PMTs at r = 106.2, id = 4092 + 9 k + l
                      4742-4759    centre patch, 5 z x 6 phi, sharing the patch with 12 coarse ids
us ``US``             4308-4451    24 phi x 6 r on the cone ``|z| = 35.1 + 0.35 (r - 69.5)``, z < 0
ds ``DS``             4452-4595    mirror of us at z > 0
top ``TOP``           4596-4668    hex rows [11, 12, 11, 12, 13, 14] in the plane phi = 117.2 deg
bottom ``BOTTOM``     4669-4741    same rows in the plane phi = 242.8 deg
====================  ===========  ==============================================================

Normals are the sensors' viewing directions, into the xenon: inner ``+r``, outer ``-r``, us
``0.33 r + 0.944 z`` and ds ``0.33 r - 0.944 z`` (the normals of the cone; §5 writes the z sign
as "-/+", but §1.1 and the cone itself give ``+z`` for the upstream face at z < 0), top and
bottom tangential, towards phi = 180 deg.

**Outer orientation fix (§1.4).** The repo maps the outer coarse PMTs with
``arange(4092, 4308).reshape(9, 24)``, but their ids run along z first (9 per phi strip), so
every row of that map jumps between strips and "neighbouring" cells can be 83 cm apart. We use
the physical (z x phi) map ``arange(4092, 4308).reshape(24, 9).T``: cell ``(l, k)`` holds id
``4092 + 9 k + l``. With it the repo's fine-grid paste offset (coarse cell (3, 10)) lands exactly
on the 12 central coarse ids, so the fine grid of §1.2 needs no other change.

**Hex neighbours (§1.3).** The repo's parity rule links 84 second neighbours and misses 92 true
ones. Ours reproduces the 3-D distance graph: in-row neighbours ``c - 1, c + 1``; in an adjacent
row ``rr``, ``(rr, c), (rr, c + 1)`` if row ``rr`` is longer than row ``r``, else
``(rr, c - 1), (rr, c)``. That gives 366 directed edges, both directions, no self loops, degree
2 to 6 (6 in the interior).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "BOTTOM", "DS", "FACE_NAMES", "HEX_ROW_LENGTHS", "IMAGE_FACES", "INNER", "N_SENSORS", "OUTER",
    "TOKEN_ORDER", "TOP", "US", "FaceGrid", "Geometry", "build_geometry", "hex_edges",
]

N_SENSORS = 4760
INNER, OUTER, US, DS, TOP, BOTTOM = range(6)  # the order of sensor_directions.txt and of the ids (§1.1)
FACE_NAMES = ("inner", "outer", "us", "ds", "top", "bottom")
TOKEN_ORDER = ("inner", "us", "ds", "outer", "top", "bottom")  # XECEncoder's token stack (§2.2)
IMAGE_FACES = ("inner", "us", "ds", "outer")  # the faces the shared CNN backbone reads (§2.2)
HEX_ROW_LENGTHS = (11, 12, 11, 12, 13, 14)

# §1.1 id ranges, half-open
_INNER0, _OUTER0, _US0, _DS0, _TOP0, _BOTTOM0, _CENTER0 = 0, 4092, 4308, 4452, 4596, 4669, 4742
# §1.1 / §5 layout, cm and degrees
_R_INNER, _R_OUTER = 64.8, 106.2
_INNER_PHI, _INNER_Z = (117.6, 242.6), (-32.6, 32.2)  # 93 and 44 evenly spaced centres
_STRIP_PHI0, _STRIP_DPHI = 119.8, 5.22  # outer coarse, us and ds phi strips
_OUTER_DZ = 10.35  # 9 z cells centred on z = 0
_CENTER_PHI0, _CENTER_DPHI, _CENTER_DZ = 171.3, 3.47, 6.2
_CENTER_COARSE_Z, _CENTER_COARSE_PHI = (0, 2, 4), (0, 2, 3, 5)  # patch cells holding coarse ids
_CAP_R0, _CAP_DR, _CAP_Z0, _CAP_SLOPE = 69.5, 6.68, 35.1, 0.35
_HEX_PHI, _HEX_R0, _HEX_DR, _HEX_DZ = 117.2, 68.2, 6.9, 6.12
_AREA_SIPM, _AREA_PMT = 1.39, 45.6  # cm^2: 2 x 2 MPPC chips; PMT cathode radius 3.81 cm
# §1.2 outer fine grid: coarse cells x (5, 3), centre cells x (3, 2), pasted at coarse cell (3, 10)
_FINE_COARSE, _FINE_CENTER, _FINE_START = (5, 3), (3, 2), (3, 10)


class FaceGrid(NamedTuple):
    """An image-like face: which sensor each grid cell shows, and the way back.

    A sensor may fill several cells (the outer fine grid); every sensor of the face fills at
    least one. Shapes: ``index_map (H, W)`` sensor ids; ``sensor_ids (n,)`` ascending;
    ``cell_sensor (H*W,)`` position in ``sensor_ids`` of each cell's sensor; ``sensor_cell (n,)``
    the first (row-major) flat cell of each sensor; ``cells_per_sensor (n,)``.
    """

    index_map: torch.Tensor
    sensor_ids: torch.Tensor
    cell_sensor: torch.Tensor
    sensor_cell: torch.Tensor
    cells_per_sensor: torch.Tensor

    @classmethod
    def from_index_map(cls, index_map: torch.Tensor) -> FaceGrid:
        flat = index_map.flatten()
        ids, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        cells = torch.arange(flat.numel(), device=flat.device)
        first = torch.full_like(ids, flat.numel()).scatter_reduce(0, inverse, cells, "amin")
        return cls(index_map, ids, inverse, first, torch.bincount(inverse, minlength=ids.numel()))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index_map.shape)

    def to_image(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sensor ``values (..., 4760)`` -> face image ``(..., H, W)`` (one gather).

        For ``(B, C, 4760)`` this gives ``(B, C, H, W)``, the house image layout.
        """
        if values.dim() < 1 or values.shape[-1] != N_SENSORS:
            raise ValueError(f"values: expected (..., {N_SENSORS}), got {tuple(values.shape)}")
        return values[..., self.index_map]

    def to_sensors(self, image: torch.Tensor, reduce: str = "first") -> torch.Tensor:
        """Face image ``(..., H, W)`` -> values of ``sensor_ids`` ``(..., n)``.

        ``reduce``: "first" reads each sensor's first cell (the exact inverse of
        :meth:`to_image`), "mean" averages its cells (for predictions on the fine grid), "sum"
        adds them (photon counts that were spread over the cells).
        """
        if image.dim() < 2 or tuple(image.shape[-2:]) != self.shape:
            raise ValueError(f"image: expected (..., {self.shape[0]}, {self.shape[1]}), got {tuple(image.shape)}")
        flat = image.flatten(-2)
        if reduce == "first":
            return flat[..., self.sensor_cell]
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce: expected 'first', 'mean' or 'sum', got {reduce!r}")
        out = flat.new_zeros(*flat.shape[:-1], self.sensor_ids.numel()).index_add_(-1, self.cell_sensor, flat)
        return out / self.cells_per_sensor.to(out.dtype) if reduce == "mean" else out

    def to(self, device) -> FaceGrid:
        return FaceGrid(*(t.to(device) for t in self))


class Geometry(NamedTuple):
    """Frozen detector description (build it with :func:`build_geometry`).

    Shapes (``N = 4760``): ``sensor_id (N,)`` = arange, ``face (N,)`` in ``INNER..BOTTOM``,
    ``position (N, 3)`` cm, ``normal (N, 3)`` unit viewing direction into the xenon,
    ``area (N,)`` cm^2; image-like faces as :class:`FaceGrid`: ``inner`` (93 phi, 44 z), ``us``
    and ``ds`` (24 phi, 6 r), ``outer`` (45 z, 72 phi fine grid, §1.2), and for the split mode
    ``outer_coarse`` (9 z, 24 phi) and ``outer_center`` (5 z, 6 phi); hex faces as graphs over
    73 nodes numbered row-major: ``top_ids``, ``bottom_ids (73,)`` sensor ids, ``hex_row``,
    ``hex_col (73,)``, one shared ``hex_edge_index (2, E)`` (row 0 source, row 1 target, the
    :class:`blockyard.blocks.GraphAttention` convention) and ``hex_edge_direction (E,)``: the
    sector ``round(angle / 60 deg) mod 6`` of the source's offset from the target in the face
    plane, with angle measured from ``+z`` towards larger ``r`` (0 = +z, 3 = -z).
    """

    sensor_id: torch.Tensor
    face: torch.Tensor
    position: torch.Tensor
    normal: torch.Tensor
    area: torch.Tensor
    inner: FaceGrid
    us: FaceGrid
    ds: FaceGrid
    outer: FaceGrid
    outer_coarse: FaceGrid
    outer_center: FaceGrid
    top_ids: torch.Tensor
    bottom_ids: torch.Tensor
    hex_row: torch.Tensor
    hex_col: torch.Tensor
    hex_edge_index: torch.Tensor
    hex_edge_direction: torch.Tensor

    def to(self, device) -> Geometry:
        return Geometry(*(t.to(device) for t in self))


def hex_edges(row_lengths: tuple[int, ...] = HEX_ROW_LENGTHS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column and neighbour edges of a hex face (rule in the module docstring).

    Adjacent rows must differ in length by one (true for ``HEX_ROW_LENGTHS``).

    Returns:
        ``row (V,)``, ``col (V,)`` and ``edge_index (2, E)`` (source, target), sorted by target.
    """
    starts = [sum(row_lengths[:r]) for r in range(len(row_lengths))]
    rows, cols, edges = [], [], []
    for r, length in enumerate(row_lengths):
        for c in range(length):
            rows.append(r)
            cols.append(c)
            neighbours = [(r, c - 1), (r, c + 1)]
            for rr in (r - 1, r + 1):
                if 0 <= rr < len(row_lengths):
                    shift = (0, 1) if row_lengths[rr] > length else (-1, 0)
                    neighbours += [(rr, c + s) for s in shift]
            edges += [(starts[rr] + cc, starts[r] + c) for rr, cc in neighbours if 0 <= cc < row_lengths[rr]]
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(edges, dtype=torch.long).T.contiguous()


def _cylinder(r: torch.Tensor, phi_deg: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    phi = torch.deg2rad(phi_deg)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)


def _radial(phi_deg: torch.Tensor, along_r: float, along_z: float) -> torch.Tensor:
    phi = torch.deg2rad(phi_deg)
    n = torch.stack([along_r * torch.cos(phi), along_r * torch.sin(phi), torch.full_like(phi, along_z)], -1)
    return n / n.norm(dim=-1, keepdim=True)


def _outer_center_map() -> torch.Tensor:
    """The (5 z, 6 phi) centre patch: 12 coarse ids on a 3 x 4 sub-lattice, new ids phi-major elsewhere.

    Reproduces the repo's literal ``OUTER_CENTER_INDEX_MAP`` (6 phi x 5 z, transposed).
    """
    patch = torch.empty(6, 5, dtype=torch.long)
    new_id = _CENTER0
    for m in range(6):
        for j in range(5):
            if m in _CENTER_COARSE_PHI and j in _CENTER_COARSE_Z:
                k = _FINE_START[1] + _CENTER_COARSE_PHI.index(m)
                patch[m, j] = _OUTER0 + 9 * k + _FINE_START[0] + _CENTER_COARSE_Z.index(j)
            else:
                patch[m, j] = new_id
                new_id += 1
    return patch.T.contiguous()


def _outer_fine_map(coarse: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    fine = coarse.repeat_interleave(_FINE_COARSE[0], 0).repeat_interleave(_FINE_COARSE[1], 1)
    patch = center.repeat_interleave(_FINE_CENTER[0], 0).repeat_interleave(_FINE_CENTER[1], 1)
    y0, x0 = _FINE_START[0] * _FINE_COARSE[0], _FINE_START[1] * _FINE_COARSE[1]
    fine[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch
    return fine


def build_geometry(device=None, dtype: torch.dtype = torch.float32) -> Geometry:
    """Build the 4760-sensor geometry from the §1.1 / §5 parameters (float64 math, cast to ``dtype``)."""
    f64 = torch.float64
    pos = torch.empty(N_SENSORS, 3, dtype=f64)
    normal = torch.empty(N_SENSORS, 3, dtype=f64)
    face = torch.empty(N_SENSORS, dtype=torch.long)
    area = torch.full((N_SENSORS,), _AREA_PMT, dtype=f64)

    # inner: id = 44 * phi_row + z_col
    phi = torch.linspace(*_INNER_PHI, 93, dtype=f64).repeat_interleave(44)
    z = torch.linspace(*_INNER_Z, 44, dtype=f64).repeat(93)
    ids = slice(_INNER0, _OUTER0)
    pos[ids], normal[ids], face[ids], area[ids] = _cylinder(torch.full_like(phi, _R_INNER), phi, z), \
        _radial(phi, 1.0, 0.0), INNER, _AREA_SIPM

    strip_phi = _STRIP_PHI0 + _STRIP_DPHI * torch.arange(24, dtype=f64)
    # outer coarse: id = 4092 + 9 * strip + z cell
    phi = strip_phi.repeat_interleave(9)
    z = ((torch.arange(9, dtype=f64) - 4) * _OUTER_DZ).repeat(24)
    ids = slice(_OUTER0, _US0)
    pos[ids], normal[ids], face[ids] = _cylinder(torch.full_like(phi, _R_OUTER), phi, z), _radial(phi, -1.0, 0.0), OUTER

    # us / ds: id = start + 6 * strip + radial cell, on the cone
    phi = strip_phi.repeat_interleave(6)
    r = (_CAP_R0 + _CAP_DR * torch.arange(6, dtype=f64)).repeat(24)
    cap_z = _CAP_Z0 + _CAP_SLOPE * (r - _CAP_R0)
    for start, sign, fid in ((_US0, -1.0, US), (_DS0, 1.0, DS)):
        ids = slice(start, start + 144)
        pos[ids], normal[ids], face[ids] = _cylinder(r, phi, sign * cap_z), _radial(phi, _CAP_SLOPE, -sign), fid

    # top / bottom hex planes: node (row, c) at r = r0 + row dr, z = (c - (L - 1) / 2) dz
    hex_row, hex_col, hex_edge_index = hex_edges()
    lengths = torch.tensor(HEX_ROW_LENGTHS, dtype=f64)[hex_row]
    r = _HEX_R0 + _HEX_DR * hex_row.to(f64)
    z = (hex_col.to(f64) - (lengths - 1) / 2) * _HEX_DZ
    for start, plane_phi, fid in ((_TOP0, _HEX_PHI, TOP), (_BOTTOM0, 360.0 - _HEX_PHI, BOTTOM)):
        ids = slice(start, start + 73)
        phi = torch.full_like(r, plane_phi)
        # tangential unit vector towards phi = 180 deg: +phi_hat on top, -phi_hat on the bottom
        sign = 1.0 if plane_phi < 180.0 else -1.0
        rad = torch.deg2rad(phi)
        tangent = torch.stack([-torch.sin(rad), torch.cos(rad), torch.zeros_like(rad)], -1) * sign
        pos[ids], normal[ids], face[ids] = _cylinder(r, phi, z), tangent, fid

    # outer centre patch: 18 new PMTs (the 12 shared coarse ids keep their coarse positions)
    center = _outer_center_map()
    zz, mm = torch.meshgrid(torch.arange(5, dtype=f64), torch.arange(6, dtype=f64), indexing="ij")
    new = center >= _CENTER0
    phi = _CENTER_PHI0 + _CENTER_DPHI * mm[new]
    ids = center[new]
    pos[ids] = _cylinder(torch.full_like(phi, _R_OUTER), phi, (zz[new] - 2) * _CENTER_DZ)
    normal[ids], face[ids] = _radial(phi, -1.0, 0.0), OUTER

    # hex edge direction: sector of the source's (dz, dr) offset from the target, in the face plane
    src, dst = hex_edge_index
    angle = torch.atan2(r[src] - r[dst], z[src] - z[dst])
    direction = torch.remainder(torch.round(angle / (math.pi / 3)), 6).long()

    coarse = torch.arange(_OUTER0, _US0).reshape(24, 9).T.contiguous()  # (z, phi): the §1.4 fix
    grids = [FaceGrid.from_index_map(m) for m in (
        torch.arange(_INNER0, _OUTER0).reshape(93, 44),
        torch.arange(_US0, _DS0).reshape(24, 6),
        torch.arange(_DS0, _TOP0).reshape(24, 6),
        _outer_fine_map(coarse, center),
        coarse,
        center,
    )]
    geometry = Geometry(
        torch.arange(N_SENSORS), face, pos.to(dtype), normal.to(dtype), area.to(dtype), *grids,
        torch.arange(_TOP0, _BOTTOM0), torch.arange(_BOTTOM0, _CENTER0), hex_row, hex_col, hex_edge_index, direction,
    )
    return geometry.to(device) if device is not None else geometry
