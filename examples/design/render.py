"""Render designs to RGB and to the ground-truth structure map F, vectorised over designs.

A pixel ``(i, j)`` of an ``H x W`` rendering samples the canvas at its centre
``((j + 0.5) / W, (i + 0.5) / H)``; a box covers the pixels whose centre lies in
``[x0, x1) x [y0, y1)``. No anti-aliasing, so every pixel has exactly one colour class and
the RGB image is a function of the colour map (background pixels take the design's jittered
background, the others their palette colour). Painting order within an element: fill (image,
CTA button), then the image's motif disc (clipped to the image), then text ink. Elements do not
overlap, and neither do glyphs, so each map is one batched matrix product of row and column
indicators (``rows^T @ (value * cols)``) instead of a loop over shapes; glyphs are painted per
band (one line's glyphs of one height class share their rows, ``glyphs.glyph_bands``).

Structure map ``F`` (the seed's F_Tensor, channel order kept):

- 0, text mask: the glyph ink of headline, subheadline, body and CTA text (the seed marked the
  whole text box, so its contrast score compared the background with itself);
- 1, image mask: the image boxes (fill and motif);
- 2, colour class: ``0`` background, ``1 + 3 * palette + slot`` otherwise (``vocab.NUM_COLORS`` = 19);
- 3, hierarchy: the element's ``hierarchy / HIERARCHY_SCALE`` over its whole box, 0 elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .glyphs import glyph_bands
from .vocab import HIERARCHY_SCALE, MAX_IMAGES, NUM_COLORS, PALETTE_RGB

__all__ = ["Rendering", "render", "structure_tensor"]

_LUT = torch.tensor([[0, 0, 0], *[rgb for palette in PALETTE_RGB for rgb in palette]], dtype=torch.uint8)


class Rendering(NamedTuple):
    """Rendered designs. Masks: True = the pixel belongs to that kind of element.

    Shapes:
        - image: ``(B, 3, H, W)`` uint8 RGB
        - text_mask, image_mask: ``(B, H, W)`` bool
        - color: ``(B, H, W)`` int64 colour class in ``0 .. NUM_COLORS - 1``
        - hierarchy: ``(B, H, W)`` float32 in [0, 1]
    """

    image: torch.Tensor
    text_mask: torch.Tensor
    image_mask: torch.Tensor
    color: torch.Tensor
    hierarchy: torch.Tensor

    def structure(self) -> torch.Tensor:
        """``(B, 4, H, W)`` float32 F: text mask, image mask, colour class, hierarchy."""
        return structure_tensor(self.text_mask, self.image_mask, self.color, self.hierarchy)


def structure_tensor(text_mask: torch.Tensor, image_mask: torch.Tensor, color: torch.Tensor,
                     hierarchy: torch.Tensor) -> torch.Tensor:
    """Stack the four ``(B, H, W)`` maps into the float32 F of shape ``(B, 4, H, W)``."""
    return torch.stack([text_mask.float(), image_mask.float(), color.float(), hierarchy.float()], dim=1)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 8 for v in hw):
        raise ValueError(f"size: expected an int >= 8 or (height, width), got {size!r}")
    return int(hw[0]), int(hw[1])


def _first_last(low: np.ndarray | torch.Tensor, high: np.ndarray | torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Pixel range ``[first, stop)`` whose centres ``(i + 0.5) / n`` lie in ``[low, high)`` (float64)."""
    low, high = torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
    return torch.ceil(low * n - 0.5).clamp(0, n).long(), torch.ceil(high * n - 0.5).clamp(0, n).long()


def _span(low: np.ndarray, high: np.ndarray, n: int) -> torch.Tensor:
    """``(..., n)`` float indicator of the pixels whose centre lies in ``[low, high)``."""
    first, stop = _first_last(low, high, n)
    i = torch.arange(n)
    return ((i >= first[..., None]) & (i < stop[..., None])).float()


class _Packed(NamedTuple):
    background: np.ndarray  # (B, 3) uint8
    boxes: np.ndarray  # (B, E, 4) element boxes, zero-padded
    values: np.ndarray  # (B, E, 3) fill colour, hierarchy level, is-image
    motifs: np.ndarray  # (B, M, 3) disc cx, cy, r of image m (r = 0: none)
    motif_boxes: np.ndarray  # (B, M, 4) its image's box
    motif_color: np.ndarray  # (B, M) colour class, 0 = no image
    bands: np.ndarray  # (B, K, 3) y0, y1, ink colour of each glyph band (colour 0: padding)
    spans: np.ndarray  # (S, 3) band index b * K + k, x0, x1 of every glyph


def _pack(designs: Sequence[dict]) -> _Packed:
    """Gather every design's boxes, motifs and glyph bands into padded arrays (one Python pass)."""
    count = len(designs)
    n_el = max(len(d["elements"]) for d in designs)
    boxes = np.zeros((count, n_el, 4))
    values = np.zeros((count, n_el, 3), np.float32)
    motifs, motif_boxes = np.zeros((count, MAX_IMAGES, 3)), np.zeros((count, MAX_IMAGES, 4))
    motif_color = np.zeros((count, MAX_IMAGES), np.int64)
    bands: list[list[tuple[float, float, int]]] = []
    spans: list[tuple[int, int, float, float]] = []
    for b, design in enumerate(designs):
        mine: list[tuple[float, float, int]] = []
        images = 0
        for e, el in enumerate(design["elements"]):
            boxes[b, e] = el["box"]
            values[b, e] = (el.get("fill", 0), el["hierarchy"], el["type"] == "image")
            if el["type"] == "image":
                motifs[b, images], motif_boxes[b, images] = el["motif"], el["box"]
                motif_color[b, images] = el["motif_color"]
                images += 1
            if "text" in el:
                for y0, y1, xs in glyph_bands(el):
                    spans.extend((b, len(mine), x0, x1) for x0, x1 in xs)
                    mine.append((y0, y1, el["ink"]))
        bands.append(mine)
    n_bands = max(1, max(len(m) for m in bands))
    band_array = np.zeros((count, n_bands, 3))
    for b, mine in enumerate(bands):
        if mine:
            band_array[b, :len(mine)] = mine
    flat = np.asarray(spans, dtype=np.float64).reshape(-1, 4)
    span_array = np.stack([flat[:, 0] * n_bands + flat[:, 1], flat[:, 2], flat[:, 3]], axis=1)
    background = np.asarray([d["background"] for d in designs], dtype=np.uint8)
    return _Packed(background, boxes, values, motifs, motif_boxes, motif_color, band_array, span_array)


def _band_columns(spans: np.ndarray, count: int, n_bands: int, width: int) -> torch.Tensor:
    """``(B, K, W)`` float: columns covered by each band's glyph spans (a 1-D difference array)."""
    first, stop = _first_last(spans[:, 1], spans[:, 2], width)
    row = torch.as_tensor(spans[:, 0], dtype=torch.long) * (width + 1)
    diff = torch.zeros(count * n_bands * (width + 1))
    keep = (stop > first).float()  # a span narrower than a pixel covers nothing
    diff.index_add_(0, row + first, keep).index_add_(0, row + stop, -keep)
    return diff.view(count, n_bands, width + 1).cumsum(-1)[..., :width]


def _discs(p: _Packed, height: int, width: int) -> torch.Tensor:
    """``(B, H, W)`` uint8 colour of the motif discs (0 outside), each clipped to its image box."""
    motifs = torch.as_tensor(p.motifs, dtype=torch.float32)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    room = motifs[..., 2:3] ** 2 - (ys - motifs[..., 1:2]) ** 2  # (B, M, H): r^2 - dy^2
    dx2 = (xs - motifs[..., 0:1]) ** 2  # (B, M, W)
    rows = _span(p.motif_boxes[..., 1], p.motif_boxes[..., 3], height) > 0
    cols = _span(p.motif_boxes[..., 0], p.motif_boxes[..., 2], width) > 0
    inside = (dx2[..., None, :] < room[..., :, None]) & rows[..., :, None] & cols[..., None, :]
    out = torch.zeros(len(motifs), height, width, dtype=torch.uint8)
    for m, cid in enumerate(torch.as_tensor(p.motif_color, dtype=torch.uint8).unbind(1)):  # images never overlap
        out = torch.where(inside[:, m], cid[:, None, None], out)
    return out


def render(designs: Sequence[dict], size: int | Sequence[int] = 64) -> Rendering:
    """Render design dicts (``generator.sample_designs``) at ``size`` (int or ``(H, W)``).

    The canvas is square; a non-square ``size`` stretches it. 64 is the CPU default, 256 the
    seed's size. Memory grows as ``B * H * W``: render large batches in chunks.

    Shapes:
        - output: :class:`Rendering` with ``B = len(designs)``
    """
    height, width = _size(size)
    if len(designs) == 0:
        raise ValueError("designs: expected at least one design, got 0")
    p = _pack(designs)
    count = p.boxes.shape[0]
    # elements: fill colour, hierarchy level and is-image in one product
    rows = _span(p.boxes[..., 1], p.boxes[..., 3], height)  # (B, E, H)
    cols = _span(p.boxes[..., 0], p.boxes[..., 2], width)  # (B, E, W)
    values = torch.as_tensor(p.values)
    layers = torch.bmm(rows.transpose(1, 2), (cols[:, :, None, :] * values[..., None]).flatten(2))
    # exact: sums of small integers in float32
    fill, level, is_image = layers.view(count, height, 3, width).to(torch.uint8).unbind(2)
    # glyphs: coverage and ink colour per band
    n_bands = p.bands.shape[1]
    band_rows = _span(p.bands[..., 0], p.bands[..., 1], height)
    band_cols = _band_columns(p.spans, count, n_bands, width)
    ink_color = torch.as_tensor(p.bands[..., 2], dtype=torch.float32)
    glyphs = torch.cat([band_cols, band_cols * ink_color[..., None]], dim=2)
    ink = torch.bmm(band_rows.transpose(1, 2), glyphs).to(torch.uint8)
    covered, ink = ink[..., :width], ink[..., width:]
    text_mask = covered > 0
    motif = _discs(p, height, width)
    color = torch.where(text_mask, ink, torch.where(motif > 0, motif, fill))
    lut = _LUT.expand(count, NUM_COLORS, 3).clone()
    lut[:, 0] = torch.as_tensor(p.background)
    color = color.long()
    image = torch.gather(lut, 1, color.flatten(1)[..., None].expand(-1, -1, 3))
    image = image.view(count, height, width, 3).permute(0, 3, 1, 2).contiguous()
    return Rendering(image, text_mask, is_image > 0, color, level.float() / HIERARCHY_SCALE)
