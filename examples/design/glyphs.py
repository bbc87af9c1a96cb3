"""Text as glyph blocks: a text element's string -> one rectangle of ink per character.

No font files: a character is a block one advance ``a`` wide (ink ``0.8 a``, the rest is the
gap). Its height follows its shape class in a line of height ``lh`` (line top ``t``):

- x-height letters ``[t + 0.25 lh, t + 0.85 lh]``,
- ascenders (``bdfhklt``) ``[t + 0.05 lh, t + 0.85 lh]``,
- descenders (``gjpqy``) ``[t + 0.25 lh, t + lh]``.

The advance is ``0.45 lh`` for headlines and ``0.55 lh`` otherwise; a space is ``0.5 a``. Words
fill the element's lines greedily; a word that does not fit moves to the next line, and text
beyond the last line is dropped (a first word wider than the line is cut). Lines are aligned
left, centre or right in the box; a CTA's text sits centred on a band of 0.55 of the button's
height, 0.1 of its width in from each side. Every glyph lies inside its element's box and no two
glyphs overlap, which the renderer relies on.
"""
from __future__ import annotations

__all__ = ["glyph_bands", "glyph_boxes"]

_ASCENDERS, _DESCENDERS = frozenset("bdfhklt"), frozenset("gjpqy")
# vertical extent of each shape class, in line heights from the line top
_HEIGHTS = {"x": (0.25, 0.85), "ascender": (0.05, 0.85), "descender": (0.25, 1.0)}


def _lines(words: list[str], advance: float, width: float, count: int) -> list[list[str]]:
    lines: list[list[str]] = [[]]
    used = 0.0
    for word in words:
        need = len(word) * advance + (0.5 * advance if lines[-1] else 0.0)
        if lines[-1] and used + need > width:
            if len(lines) == count:
                break
            lines.append([])
            used, need = 0.0, len(word) * advance
        if not lines[-1] and need > width:  # a word longer than the line: cut it
            word = word[:max(int(width / advance), 1)]
            need = len(word) * advance
        lines[-1].append(word)
        used += need
    return lines


def glyph_bands(element: dict) -> list[tuple[float, float, list[tuple[float, float]]]]:
    """A text element's ink as bands ``(y0, y1, [(x0, x1), ...])``: the glyphs of one shape class in one line.

    Canvas fractions. The renderer paints a band as one row span times the union of its column
    spans, so a text costs a few bands instead of one rectangle per character.
    """
    x0, y0, x1, y1 = element["box"]
    if element["type"] == "cta":
        pad_x, band = 0.1 * (x1 - x0), 0.55 * (y1 - y0)
        x0, x1 = x0 + pad_x, x1 - pad_x
        y0 = y0 + (y1 - y0 - band) / 2
        y1 = y0 + band
    count = int(element["lines"])
    lh = (y1 - y0) / count
    advance = (0.45 if element["type"] == "headline" else 0.55) * lh
    bands = []
    for row, words in enumerate(_lines(element["text"].split(), advance, x1 - x0, count)):
        line = " ".join(words)
        width = len(line) * advance - (0.5 * advance * line.count(" "))
        x = {"left": x0, "center": (x0 + x1 - width) / 2, "right": x1 - width}[element["align"]]
        top = y0 + row * lh
        spans: dict[str, list[tuple[float, float]]] = {"x": [], "ascender": [], "descender": []}
        for char in line:
            if char == " ":
                x += 0.5 * advance
                continue
            kind = "ascender" if char in _ASCENDERS else "descender" if char in _DESCENDERS else "x"
            spans[kind].append((x, x + 0.8 * advance))
            x += advance
        for kind, (low, high) in _HEIGHTS.items():
            if spans[kind]:
                bands.append((top + low * lh, top + high * lh, spans[kind]))
    return bands


def glyph_boxes(element: dict) -> list[list[float]]:
    """Ink rectangles ``[x0, y0, x1, y1]`` (canvas fractions), one per character."""
    return [[a, y0, b, y1] for y0, y1, spans in glyph_bands(element) for a, b in spans]
