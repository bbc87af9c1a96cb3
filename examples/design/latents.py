"""Draw a design's metadata and discrete latents from the conditional tables (``tables.py``).

The draw order is fixed (goal, format, tone, palette, layout, subheadline, CTA, body count,
image count), one uniform from the numpy ``Generator`` each, so a design's latents depend only
on its generator's state.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import tables
from .vocab import LATENT_NAMES

__all__ = ["Latents", "sample_latents"]


class Latents(NamedTuple):
    """Metadata (goal, format, tone) and the revealed discrete latents of one design.

    Integers index ``vocab.GOALS``, ``vocab.FORMATS``, ``vocab.PALETTES`` and ``vocab.LAYOUTS``;
    ``tone`` is in [0, 1].
    """

    goal: int
    format: int
    tone: float
    palette: int
    layout: int
    has_subheadline: int
    has_cta: int
    num_body: int
    num_images: int

    def revealed(self) -> tuple[int, ...]:
        """The latents a rendering reveals, in the order of ``vocab.LATENT_NAMES``."""
        return tuple(int(getattr(self, name)) for name in LATENT_NAMES)


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> int:
    """Inverse-CDF draw of one category (one uniform; ``Generator.choice`` is 10x slower per call)."""
    return min(int(np.searchsorted(np.cumsum(probs), rng.random(), side="right")), len(probs) - 1)


def sample_latents(rng: np.random.Generator) -> Latents:
    """One draw of the generative story in ``tables.py``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy Generator, got {type(rng).__name__}")
    goal = _categorical(rng, tables.GOAL_PRIOR)
    fmt = _categorical(rng, tables.FORMAT_PRIOR)
    lo, hi = tables.TONE_RANGE[goal]
    tone = float(rng.uniform(lo, hi))
    palette = _categorical(rng, tables.PALETTE_GIVEN_TONE_BIN[tables.tone_bin(tone)])
    layout = _categorical(rng, tables.LAYOUT_GIVEN_FORMAT[fmt])
    has_sub = int(rng.random() < tables.SUBHEADLINE_GIVEN_FORMAT[fmt])
    has_cta = int(rng.random() < tables.CTA_GIVEN_GOAL[goal])
    num_body = _categorical(rng, tables.BODY_GIVEN_GOAL[goal])
    num_images = _categorical(rng, tables.IMAGES_GIVEN_GOAL[goal])
    return Latents(goal, fmt, tone, palette, layout, has_sub, has_cta, num_body, num_images)
