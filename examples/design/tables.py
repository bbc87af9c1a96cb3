"""The generator's conditional probability tables: how goal and format shape a design.

The generative story (every arrow is one table below; nothing else depends on goal or format):

    goal ~ GOAL_PRIOR                  format ~ FORMAT_PRIOR            (independent)
    tone | goal ~ U[TONE_RANGE[goal]]  layout | format ~ LAYOUT_GIVEN_FORMAT
    palette | tone ~ PALETTE_GIVEN_TONE_BIN[floor(TONE_BINS * tone)]
    has_subheadline | format ~ Bernoulli(SUBHEADLINE_GIVEN_FORMAT)
    has_cta | goal ~ Bernoulli(CTA_GIVEN_GOAL)
    num_body | goal ~ BODY_GIVEN_GOAL  (0..3)     num_images | goal ~ IMAGES_GIVEN_GOAL  (0..2)

Everything else (margins, sizes, positions, misalignment, texts, background jitter, element
order, motifs) is drawn independently of goal, format and tone. The six discrete latents
``LATENT_NAMES`` are revealed by the rendering (the palette by the colours, the layout by where
the headline sits, the counts by the distinct hierarchy values), so the Bayes-optimal accuracy of a
goal or format classifier from the image or from the structure map is the one ``ceiling.py``
computes from these tables by exact enumeration.

All formats share one square canvas (the seed rendered every format at 256x256): a format
shows through its layout and subheadline tendencies, not through an aspect ratio.

The numbers were chosen so that the ceilings are well above chance but clearly below 1
(goal about 0.59 of 10 classes, format about 0.91 of 4; ``ceiling.bayes_ceiling`` gives the
exact values). Rows are indexed in the order of ``vocab.GOALS``, ``vocab.FORMATS``,
``vocab.LAYOUTS`` and ``vocab.PALETTES``.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "BODY_GIVEN_GOAL",
    "CTA_GIVEN_GOAL",
    "FORMAT_PRIOR",
    "GOAL_PRIOR",
    "IMAGES_GIVEN_GOAL",
    "LAYOUT_GIVEN_FORMAT",
    "PALETTE_GIVEN_TONE_BIN",
    "SUBHEADLINE_GIVEN_FORMAT",
    "TONE_BINS",
    "TONE_RANGE",
    "tone_bin",
    "tone_bin_given_goal",
]


def _rows(values: list[list[float]]) -> np.ndarray:
    table = np.asarray(values, dtype=np.float64)
    return table / table.sum(axis=-1, keepdims=True)


GOAL_PRIOR = _rows([[1.2, 1.1, 1.0, 1.0, 0.9, 1.2, 0.8, 1.0, 0.9, 0.9]])[0]
FORMAT_PRIOR = np.array([0.3, 0.3, 0.2, 0.2])
# calm (0) .. energetic (1); action goals sit high, informational ones low
TONE_RANGE = np.array([[0.55, 0.90], [0.45, 0.80], [0.25, 0.60], [0.30, 0.75], [0.15, 0.50],
                       [0.65, 1.00], [0.70, 1.00], [0.00, 0.40], [0.60, 0.95], [0.35, 0.75]])
TONE_BINS = 5
# columns: monochrome, vibrant, pastel, corporate, warm, cool; rows: tone bins, calm first
PALETTE_GIVEN_TONE_BIN = _rows([[0.35, 0.00, 0.20, 0.20, 0.00, 0.25],
                                [0.20, 0.05, 0.30, 0.20, 0.05, 0.20],
                                [0.10, 0.10, 0.25, 0.25, 0.15, 0.15],
                                [0.05, 0.30, 0.10, 0.15, 0.30, 0.10],
                                [0.00, 0.50, 0.05, 0.05, 0.40, 0.00]])
# columns: left_aligned, center_aligned, right_aligned, split; rows: poster, social_post, flyer, banner
LAYOUT_GIVEN_FORMAT = _rows([[0.88, 0.06, 0.06, 0.00],
                             [0.05, 0.92, 0.03, 0.00],
                             [0.07, 0.03, 0.88, 0.02],
                             [0.02, 0.00, 0.03, 0.95]])
SUBHEADLINE_GIVEN_FORMAT = np.array([0.7, 0.3, 0.8, 0.2])
CTA_GIVEN_GOAL = np.array([0.92, 0.90, 0.10, 0.05, 0.25, 0.97, 0.15, 0.03, 0.60, 0.35])
BODY_GIVEN_GOAL = _rows([[0.15, 0.70, 0.10, 0.05], [0.05, 0.20, 0.65, 0.10], [0.03, 0.10, 0.60, 0.27],
                         [0.80, 0.15, 0.03, 0.02], [0.02, 0.05, 0.20, 0.73], [0.75, 0.20, 0.03, 0.02],
                         [0.60, 0.35, 0.03, 0.02], [0.02, 0.08, 0.25, 0.65], [0.55, 0.40, 0.03, 0.02],
                         [0.30, 0.55, 0.10, 0.05]])
IMAGES_GIVEN_GOAL = _rows([[0.15, 0.75, 0.10], [0.05, 0.20, 0.75], [0.20, 0.70, 0.10], [0.05, 0.70, 0.25],
                           [0.60, 0.35, 0.05], [0.05, 0.85, 0.10], [0.03, 0.17, 0.80], [0.85, 0.13, 0.02],
                           [0.75, 0.20, 0.05], [0.05, 0.15, 0.80]])


def tone_bin(tone: float) -> int:
    """Tone bin ``floor(TONE_BINS * tone)``, with tone 1.0 in the last bin."""
    return min(int(tone * TONE_BINS), TONE_BINS - 1)


def tone_bin_given_goal() -> np.ndarray:
    """``(G, TONE_BINS)``: P(tone bin | goal), the overlap of each bin with the goal's uniform range."""
    edges = np.arange(TONE_BINS + 1) / TONE_BINS
    lo, hi = TONE_RANGE[:, :1], TONE_RANGE[:, 1:]
    overlap = np.clip(np.minimum(hi, edges[None, 1:]) - np.maximum(lo, edges[None, :-1]), 0.0, None)
    return overlap / (hi - lo)
