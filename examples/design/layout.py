"""Place a design's elements: latents plus independent jitter -> the design dict.

Coordinates are fractions of a square canvas, ``x`` to the right and ``y`` down; a box is
``[x0, y0, x1, y1]``. Elements never overlap. The layout is decided by the headline alone,
which is never misaligned:

- ``left_aligned``: headline at ``x0 = m`` (margin ``m ~ U[0.05, 0.09]``);
- ``center_aligned``: headline centred, width in [0.5, 0.7], so ``x0 >= 0.15`` and ``x1 <= 0.85``;
- ``right_aligned``: headline ending at ``x1 = 1 - m >= 0.91``, starting at ``x0 <= 0.45``;
- ``split``: images in a left column, texts in a right column starting at ``x0 in [0.52, 0.58]``.

So ``x0 < 0.12`` -> left, ``x0 > 0.485`` -> split, else ``x1 > 0.88`` -> right, else centre: the
rendering reveals the layout with at least 0.03 of the canvas (2 px at 64 px) to spare.

The other blocks follow the layout's axis, shifted by a misalignment ``U[-s, s]`` where
``s = 0`` for half the designs and ``s ~ U[0, 0.06]`` otherwise (in ``split``, only to the right,
so that texts never cover the image column). Stacked layouts put the image row above or below
the texts (a fair coin); everything is scaled down together when the column overflows. None of
these draws depends on goal, format or tone.
"""
from __future__ import annotations

import numpy as np

from .latents import Latents
from .vocab import (
    BACKGROUND_JITTER,
    FORMATS,
    GOALS,
    HIERARCHY_LEVELS,
    LAYOUTS,
    PALETTE_BACKGROUNDS,
    PALETTES,
    WORDS,
    color_id,
)

__all__ = ["compose"]

_WORDS_PER_LINE = {"headline": (2, 4), "subheadline": (3, 6), "body": (4, 7), "cta": (1, 2)}


def _text(rng: np.random.Generator, kind: str, lines: int) -> str:
    lo, hi = _WORDS_PER_LINE[kind]
    count = int(rng.integers(lo, hi + 1)) * (lines if kind == "body" else 1)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=count))


def _texts(rng: np.random.Generator, lat: Latents, stacked: bool, column: float) -> list[dict]:
    """Text blocks in reading order with width, height and lines (positions come later)."""
    width = (lambda lo, hi: float(rng.uniform(lo, hi))) if stacked else (
        lambda lo, hi: column * float(rng.uniform(max(lo, 0.6), 1.0)))
    blocks = [{"type": "headline", "w": width(0.5, 0.7), "h": float(rng.uniform(0.09, 0.14)), "lines": 1}]
    if lat.has_subheadline:
        blocks.append({"type": "subheadline", "w": width(0.35, 0.65), "h": float(rng.uniform(0.05, 0.07)), "lines": 1})
    for _ in range(lat.num_body):
        lines = int(rng.integers(1, 4))
        blocks.append({"type": "body", "w": width(0.4, 0.75), "h": lines * float(rng.uniform(0.035, 0.045)),
                       "lines": lines})
    if lat.has_cta:
        blocks.append({"type": "cta", "w": min(float(rng.uniform(0.2, 0.32)), column),
                       "h": float(rng.uniform(0.07, 0.10)), "lines": 1})
    for block in blocks:
        block["text"] = _text(rng, block["type"], block["lines"])
    return blocks


def _stack(rng: np.random.Generator, heights: list[float], margin: float) -> list[tuple[float, float]]:
    """Vertical spans of blocks stacked top to bottom with random gaps, scaled to fit, placed at random."""
    gaps = rng.uniform(0.02, 0.045, size=max(len(heights) - 1, 0)).tolist()
    total = sum(heights) + sum(gaps)
    room = 1.0 - 2.0 * margin
    scale = min(1.0, room / total)
    y = margin + float(rng.random()) * (room - total * scale)
    spans = []
    for i, h in enumerate(heights):
        spans.append((y, y + h * scale))
        y += h * scale + (gaps[i] * scale if i < len(gaps) else 0.0)
    return spans


def _x(layout: str, w: float, margin: float, shift: float, start: float) -> float:
    if layout == "left_aligned":
        x0 = margin + shift
    elif layout == "center_aligned":
        x0 = 0.5 - w / 2 + shift
    elif layout == "right_aligned":
        x0 = 1.0 - margin - w + shift
    else:  # split: the text column starts at `start`
        x0 = start + abs(shift)
    return min(max(x0, 0.02), 0.98 - w)


def compose(lat: Latents, rng: np.random.Generator) -> dict:
    """The design dict of latents ``lat``, with every remaining choice drawn from ``rng``."""
    layout = LAYOUTS[lat.layout]
    stacked = layout != "split"
    margin = float(rng.uniform(0.05, 0.09))
    sloppiness = float(rng.uniform(0.0, 0.06)) if rng.random() < 0.5 else 0.0
    start = float(rng.uniform(0.52, 0.58))
    column = 1.0 - margin - start
    texts = _texts(rng, lat, stacked, column)
    shifts = [0.0, *rng.uniform(-sloppiness, sloppiness, size=len(texts)).tolist()]  # headline: never shifted
    ink, fill, accent = (color_id(lat.palette, slot) for slot in range(3))
    elements = []
    images = []
    if stacked:
        row_h = float(rng.uniform(0.18, 0.3))
        row_w = float(rng.uniform(0.45, 0.85))
        images_first = bool(rng.random() < 0.5)
        heights = [b["h"] for b in texts]
        if lat.num_images:
            heights = [row_h, *heights] if images_first else [*heights, row_h]
        spans = _stack(rng, heights, margin)
        if lat.num_images:
            row_span = spans.pop(0) if images_first else spans.pop()
            gap = float(rng.uniform(0.02, 0.04))
            x = _x(layout, row_w, margin, shifts[-1], start)
            each = (row_w - gap * (lat.num_images - 1)) / lat.num_images
            images = [[x + i * (each + gap), row_span[0], x + i * (each + gap) + each, row_span[1]]
                      for i in range(lat.num_images)]
    else:
        spans = _stack(rng, [b["h"] for b in texts], margin)
        if lat.num_images:
            heights = rng.uniform(0.45, 0.8, size=1) if lat.num_images == 1 else rng.uniform(0.3, 0.42, size=2)
            right = start - float(rng.uniform(0.02, 0.04))
            images = [[margin, y0, right, y1] for y0, y1 in _stack(rng, heights.tolist(), margin)]
    align = {"left_aligned": "left", "center_aligned": "center", "right_aligned": "right", "split": "left"}[layout]
    body_seen = 0
    for block, (y0, y1), shift in zip(texts, spans, shifts):
        kind = block["type"]
        x0 = _x(layout, block["w"], margin, shift, start)
        if not stacked:
            block["w"] = min(block["w"], 1.0 - margin / 2 - x0)
        level = HIERARCHY_LEVELS[kind] - (body_seen if kind == "body" else 0)
        body_seen += kind == "body"
        element = {"type": kind, "box": [x0, y0, x0 + block["w"], y1], "hierarchy": level, "text": block["text"],
                   "lines": block["lines"], "align": "center" if kind == "cta" else align,
                   "ink": accent if kind == "cta" else (fill if kind == "subheadline" else ink)}
        if kind == "cta":
            element["fill"] = ink
        elements.append(element)
    for i, (x0, y0, x1, y1) in enumerate(images):
        w, h = x1 - x0, y1 - y0
        motif = [x0 + w * float(rng.uniform(0.2, 0.8)), y0 + h * float(rng.uniform(0.2, 0.6)),
                 min(w, h) * float(rng.uniform(0.15, 0.3))]
        elements.append({"type": "image", "box": [x0, y0, x1, y1], "hierarchy": HIERARCHY_LEVELS["image"] - i,
                         "fill": fill, "motif": motif, "motif_color": accent})
    base = np.asarray(PALETTE_BACKGROUNDS[lat.palette])
    background = np.clip(base + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3), 0, 255)
    return {"goal": GOALS[lat.goal], "format": FORMATS[lat.format], "tone": lat.tone,
            "palette": PALETTES[lat.palette], "layout": layout, "background": [int(v) for v in background],
            "misalignment": sloppiness, "elements": elements}
