r"""Bayes ceilings of goal, format and tone prediction, exact, from the generator's own tables.

The rendering reveals exactly the discrete latents ``z = (palette, layout, has_subheadline,
has_cta, num_body, num_images)`` (``vocab.LATENT_NAMES``; ``layout.py`` says how), and every
other random choice is independent of goal, format and tone. So the posterior of the metadata
given an image (or its structure map F) is the posterior given ``z``, and the best possible
accuracy of any classifier is

.. math:: \mathrm{acc}^*_{goal} = \sum_z \max_g P(g, z), \qquad
          \mathrm{acc}^*_{format} = \sum_z \max_f P(f, z),

with :math:`P(g, f, z) = P(g) P(f) \sum_b P(b \mid g) P(palette \mid b)\, P(layout \mid f)
P(sub \mid f) P(cta \mid g) P(body \mid g) P(images \mid g)` enumerated over all
``10 * 4 * 6 * 4 * 2 * 2 * 4 * 3`` cells (``b`` is the tone bin, which is not revealed). Tone
``t`` is continuous: given ``(g, b)`` it is uniform on ``TONE_RANGE[g]`` intersected with bin
``b``, so ``E[t | z]`` and ``Var(t | z)`` are exact sums too, and the smallest mean squared
error of any tone regressor is :math:`E_z[\mathrm{Var}(t \mid z)]`.

Baselines: chance (``1 / classes``), majority (the largest prior) and, for tone, the variance of
``t`` (the error of predicting its mean).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import tables

__all__ = ["BayesPrediction", "Ceiling", "bayes_ceiling", "bayes_predict", "joint_table"]


def _goal_side() -> np.ndarray:
    """``(G, B, palette, cta, body, images)``: P(g) P(b|g) P(palette|b) P(cta|g) P(body|g) P(images|g)."""
    cta = np.stack([1.0 - tables.CTA_GIVEN_GOAL, tables.CTA_GIVEN_GOAL], axis=1)
    g = (tables.GOAL_PRIOR[:, None] * tables.tone_bin_given_goal())[:, :, None] * tables.PALETTE_GIVEN_TONE_BIN[None]
    body = tables.BODY_GIVEN_GOAL[:, None, None, None, :, None]
    images = tables.IMAGES_GIVEN_GOAL[:, None, None, None, None, :]
    return g[..., None, None, None] * cta[:, None, None, :, None, None] * body * images


def _format_side() -> np.ndarray:
    """``(F, layout, sub)``: P(f) P(layout|f) P(sub|f)."""
    sub = np.stack([1.0 - tables.SUBHEADLINE_GIVEN_FORMAT, tables.SUBHEADLINE_GIVEN_FORMAT], axis=1)
    return tables.FORMAT_PRIOR[:, None, None] * tables.LAYOUT_GIVEN_FORMAT[:, :, None] * sub[:, None, :]


def joint_table() -> np.ndarray:
    """P(goal, format, z): shape ``(G, F, palette, layout, sub, cta, body, images)``, summing to 1.

    The tone bin is summed out; the axes after the first two follow ``vocab.LATENT_NAMES``.
    """
    g = _goal_side().sum(axis=1)  # (G, palette, cta, body, images)
    f = _format_side()  # (F, layout, sub)
    joint = g[:, None, :, None, None, :, :, :] * f[None, :, None, :, :, None, None, None]
    return joint  # (G, F, palette, layout, sub, cta, body, images)


class Ceiling(NamedTuple):
    """Best achievable scores from an image (or F) and the trivial baselines."""

    goal_accuracy: float
    format_accuracy: float
    goal_chance: float
    goal_majority: float
    format_chance: float
    format_majority: float
    tone_mse: float  # E_z Var(tone | z): the smallest mean squared error of a tone regressor
    tone_variance: float  # Var(tone): the error of always predicting its mean


def _tone_moments() -> tuple[np.ndarray, np.ndarray]:
    """``(G, B)`` first and second moments of tone given goal and bin (0 where the bin is empty)."""
    edges = np.arange(tables.TONE_BINS + 1) / tables.TONE_BINS
    lo = np.maximum(tables.TONE_RANGE[:, :1], edges[None, :-1])
    hi = np.minimum(tables.TONE_RANGE[:, 1:], edges[None, 1:])
    ok = hi > lo
    return np.where(ok, (lo + hi) / 2, 0.0), np.where(ok, (lo * lo + lo * hi + hi * hi) / 3, 0.0)


def bayes_ceiling() -> Ceiling:
    """Exact ceilings and baselines (see the module docstring)."""
    joint = joint_table()
    goal_z = joint.sum(axis=1).reshape(joint.shape[0], -1)  # (G, z)
    format_z = joint.sum(axis=0).reshape(joint.shape[1], -1)  # (F, z)
    p_z = _goal_side().sum(axis=(0, 1))  # P(z_g), z_g = the goal-side latents
    mean, second = _tone_given_goal_side()
    tone_mse = float((p_z * (second - mean ** 2)).sum())  # the format-side latents carry no tone information
    prior_mean = float((tables.GOAL_PRIOR * tables.TONE_RANGE.mean(axis=1)).sum())
    prior_second = float((tables.GOAL_PRIOR * (tables.TONE_RANGE ** 2).sum(axis=1)
                          + tables.GOAL_PRIOR * tables.TONE_RANGE.prod(axis=1)).sum() / 3)
    return Ceiling(goal_accuracy=float(goal_z.max(axis=0).sum()), format_accuracy=float(format_z.max(axis=0).sum()),
                   goal_chance=1.0 / joint.shape[0], goal_majority=float(tables.GOAL_PRIOR.max()),
                   format_chance=1.0 / joint.shape[1], format_majority=float(tables.FORMAT_PRIOR.max()),
                   tone_mse=tone_mse, tone_variance=prior_second - prior_mean ** 2)


class BayesPrediction(NamedTuple):
    """The Bayes-optimal predictions from revealed latents: arg-max goal and format, posterior-mean tone."""

    goal: np.ndarray
    format: np.ndarray
    tone: np.ndarray


def _tone_given_goal_side() -> tuple[np.ndarray, np.ndarray]:
    """``E[t | z_g]`` and ``E[t^2 | z_g]`` for every goal-side cell ``(palette, cta, body, images)``."""
    side = _goal_side()  # (G, B, palette, cta, body, images): tone depends on g and b only
    m1, m2 = _tone_moments()
    weight = side.reshape(*side.shape[:2], -1)
    p_z = weight.sum(axis=(0, 1))
    shape = side.shape[2:]
    return ((np.einsum("gbz,gb->z", weight, m1) / p_z).reshape(shape),
            (np.einsum("gbz,gb->z", weight, m2) / p_z).reshape(shape))


def bayes_predict(latents: np.ndarray) -> BayesPrediction:
    """The Bayes predictor of each row of revealed latents.

    Args:
        latents: ``(N, 6)`` integers in the order of ``vocab.LATENT_NAMES`` (the dataset's
            ``latents`` field, or ``Latents.revealed()``).

    Returns:
        :class:`BayesPrediction` of ``(N,)`` arrays: the arg-maxima of ``P(goal | z)`` and
        ``P(format | z)`` (int64) and ``E[tone | z]`` (float64).
    """
    joint = joint_table()
    z = np.asarray(latents)
    if z.ndim != 2 or z.shape[1] != joint.ndim - 2 or z.dtype.kind not in "iu":
        raise ValueError(f"latents: expected (N, {joint.ndim - 2}) integers, got {z.shape} {z.dtype}")
    if (z < 0).any() or (z >= np.array(joint.shape[2:])).any():
        raise ValueError(f"latents: expected each column below {joint.shape[2:]}, got max {z.max(axis=0).tolist()}")
    index = tuple(z.T)
    goal = joint.sum(axis=1)[(slice(None), *index)]  # (G, N)
    fmt = joint.sum(axis=0)[(slice(None), *index)]  # (F, N)
    mean, _ = _tone_given_goal_side()
    palette, _, _, cta, body, images = index
    return BayesPrediction(goal.argmax(axis=0), fmt.argmax(axis=0), mean[palette, cta, body, images])
