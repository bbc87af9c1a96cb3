"""The synthetic design generator: a design is a JSON-serialisable dict, the source of truth.

Design ``index`` of seed ``seed`` is drawn from ``numpy.random.default_rng([seed, index])``
alone, so any design can be regenerated on its own and a dataset does not depend on how it was
chunked. First the latents (``latents.sample_latents``: goal, format, tone and the discrete
latents, from the tables in ``tables.py``), then the placement (``layout.compose``: margins,
sizes, positions, misalignment, texts, background jitter), all from the same generator.

A design dict::

    {"seed": 0, "index": 17, "goal": "inspire", "format": "poster", "tone": 0.41,
     "palette": "pastel", "layout": "left_aligned", "background": [244, 236, 250],
     "misalignment": 0.0,
     "elements": [
        {"type": "headline", "box": [x0, y0, x1, y1], "hierarchy": 20, "text": "...",
         "lines": 1, "align": "left", "ink": 7},
        {"type": "cta", ..., "fill": 7, "ink": 9},      # a button: filled box, centred text
        {"type": "image", "box": [...], "hierarchy": 12, "fill": 8,
         "motif": [cx, cy, r], "motif_color": 9}, ...]}

Boxes are fractions of a square canvas (``x`` right, ``y`` down); ``hierarchy`` is an integer out
of ``vocab.HIERARCHY_SCALE``; ``ink``, ``fill`` and ``motif_color`` are colour classes
(``vocab.color_id``). The seed's generator had one fixed template per layout (18 distinct
images in all); here every position, size, count, text and the background vary.
"""
from __future__ import annotations

import numpy as np

from .latents import Latents, sample_latents
from .layout import compose
from .vocab import FORMATS, GOALS, LAYOUTS, PALETTES

__all__ = ["design_latents", "sample_design", "sample_designs"]


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def sample_design(seed: int, index: int) -> dict:
    """Design ``index`` of seed ``seed`` (see the module docstring)."""
    _check_int("seed", seed, 0)
    _check_int("index", index, 0)
    rng = np.random.default_rng([int(seed), int(index)])
    design = compose(sample_latents(rng), rng)
    return {"seed": int(seed), "index": int(index), **design}


def sample_designs(count: int, seed: int = 0, start: int = 0) -> list[dict]:
    """Designs ``start .. start + count - 1`` of seed ``seed``."""
    _check_int("count", count, 0)
    _check_int("start", start, 0)
    return [sample_design(seed, i) for i in range(start, start + count)]


def design_latents(design: dict) -> Latents:
    """Read the metadata and discrete latents back from a design dict (the counts from its elements)."""
    kinds = [e["type"] for e in design["elements"]]
    return Latents(goal=GOALS.index(design["goal"]), format=FORMATS.index(design["format"]), tone=float(design["tone"]),
                   palette=PALETTES.index(design["palette"]), layout=LAYOUTS.index(design["layout"]),
                   has_subheadline=int("subheadline" in kinds), has_cta=int("cta" in kinds),
                   num_body=kinds.count("body"), num_images=kinds.count("image"))
