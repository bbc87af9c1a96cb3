"""The four grammar scores (V_Grammar) of design decomposition, batched and differentiable.

The seed's formulas (OpenCV + NumPy on one design), rewritten on ``(B, H, W)`` tensors with no
loop over the batch. Every score is in [0, 1], higher is better. Inputs may be soft (values in
[0, 1], e.g. sigmoid masks of an encoder): alignment, contrast and hierarchy are differentiable
almost everywhere, whitespace through which pixels count as empty (see its docstring).

Content: the seed's content map was ``max(text mask, image mask)`` with text masks covering
whole text boxes. Our text mask is the glyph ink (``render.py``), whose glyph edges would swamp
any edge statistic, so layout scores take the element boxes instead: ``layout_content`` reads
them from the hierarchy channel, ``clamp(hierarchy / MIN_LEVEL, 0, 1)``, which is exactly the
union of the element boxes on ground truth and differentiable on predicted maps.

Changes from the seed, each on purpose:

- alignment: the seed histogrammed the columns of all content pixels and scored
  ``sigmoid(2 (1 - nv) - 1)``, which rewards spread-out columns, the opposite of alignment. Here
  the histogram is of the blocks' left edges, right edges and row centres (the three axes a
  layout aligns to), and the score is ``sigmoid(2 nv - 1)``; see :func:`alignment_score`;
- resolution: the seed's constants were for 256 px; the blur's sigma and radius scale with H;
- degenerate maps (no content, no text, no empty pixel) score 0 instead of dividing by zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .filters import distance_transform, gaussian_blur
from .vocab import HIERARCHY_LEVELS, HIERARCHY_SCALE, MAX_BODY

__all__ = [
    "MIN_LEVEL",
    "alignment_score",
    "contrast_score",
    "grammar_scores",
    "hierarchy_score",
    "layout_content",
    "relative_luminance",
    "whitespace_score",
]

MIN_LEVEL = (HIERARCHY_LEVELS["body"] - (MAX_BODY - 1)) / HIERARCHY_SCALE  # the smallest element value, 0.4
_EPS = 1e-8


def _maps(name: str, x: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or (shape is not None and tuple(x.shape) != shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected (B, H, W){'' if shape is None else f' = {shape}'}, got {got}")
    return x if x.is_floating_point() else x.float()


def layout_content(hierarchy: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` element boxes from the hierarchy map: ``clamp(hierarchy / MIN_LEVEL, 0, 1)``."""
    return (_maps("hierarchy", hierarchy) / MIN_LEVEL).clamp(0.0, 1.0)


def _concentration(weights: torch.Tensor) -> torch.Tensor:
    """``sum_x h(x)^2`` of the histogram ``h`` of ``weights (B, H, W)`` summed over rows: ``(B,)``."""
    hist = weights.sum(dim=1)
    return (hist ** 2).sum(dim=1) / (hist.sum(dim=1) ** 2).clamp_min(_EPS)


def alignment_score(content: torch.Tensor) -> torch.Tensor:
    r"""How well blocks line up: ``sigmoid(2 nv - 1)``, ``nv = max(kappa) - 1/W`` clipped to [0, 1].

    Three weighted point sets on the x axis, each with concentration
    :math:`\kappa = \sum_{i,j} w_i w_j \max(0, 1 - |x_i - x_j|) / (\sum_i w_i)^2`
    (the chance that two random points fall in the same pixel column; for points on integer
    columns this is :math:`\sum_x h(x)^2`, the seed's ``var(hist) * W + 1/W``):

    - left edges: ``relu(c[y, x] - c[y, x-1])`` at column ``x`` (``c[y, -1] = 0``),
    - right edges: ``relu(c[y, x] - c[y, x+1])`` (``c[y, W] = 0``),
    - row centres: :math:`\bar x_y = \sum_x x\,c[y, x] / \sum_x c[y, x]` with weight :math:`\sum_x c[y, x]`.

    Left-, right- and centre-aligned stacks have one of the three near 1; scattered blocks
    have all three near ``1 / #blocks``. Range ``[sigmoid(-1), sigmoid(1)] = [0.269, 0.731]``
    as the seed's.

    Shapes:
        - content: ``(B, H, W)`` in [0, 1]
        - output: ``(B,)``
    """
    c = _maps("content", content)
    w = c.shape[2]
    padded = F.pad(c, (1, 1))
    left = _concentration(F.relu(padded[..., 1:-1] - padded[..., :-2]))
    right = _concentration(F.relu(padded[..., 1:-1] - padded[..., 2:]))
    mass = c.sum(dim=2)  # (B, H)
    centre = (c * torch.arange(w, dtype=c.dtype, device=c.device)).sum(dim=2) / mass.clamp_min(_EPS)
    near = F.relu(1.0 - (centre[:, :, None] - centre[:, None, :]).abs())
    rows = (mass[:, :, None] * mass[:, None, :] * near).sum(dim=(1, 2)) / (mass.sum(dim=1) ** 2).clamp_min(_EPS)
    kappa = torch.stack([left, right, rows], dim=1).amax(dim=1)
    nv = (kappa - 1.0 / w).clamp(0.0, 1.0)
    return torch.sigmoid(2.0 * nv - 1.0)


def relative_luminance(rgb: torch.Tensor) -> torch.Tensor:
    r"""WCAG 2 relative luminance of sRGB colours in [0, 1]: ``(..., 3) -> (...)``.

    :math:`c_{lin} = c / 12.92` if :math:`c \le 0.03928` else :math:`((c + 0.055) / 1.055)^{2.4}`;
    :math:`L = 0.2126 R + 0.7152 G + 0.0722 B`.
    """
    lin = torch.where(rgb <= 0.03928, rgb / 12.92, ((rgb.clamp_min(0.0) + 0.055) / 1.055) ** 2.4)
    return lin @ torch.tensor([0.2126, 0.7152, 0.0722], dtype=lin.dtype, device=lin.device)


def _dilate(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over the ``(2r+1) x (2r+1)`` square around each pixel (separable, borders ignored)."""
    rows = F.pad(x, (0, 0, radius, radius))
    x = torch.stack([rows[:, i:i + x.shape[1]] for i in range(2 * radius + 1)]).amax(dim=0)
    cols = F.pad(x, (radius, radius))
    return torch.stack([cols[..., i:i + x.shape[2]] for i in range(2 * radius + 1)]).amax(dim=0)


def contrast_score(image: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    r"""Text against its surroundings: ``clip((ratio - 1) / 6, 0, 1)`` of the WCAG contrast ratio.

    The ring is ``dilate_5x5(t) - t`` for the text mask ``t``; the mean colours of the text
    and of the ring (weighted by ``t`` and by the ring) give luminances :math:`L_{hi} \ge L_{lo}`
    and :math:`\text{ratio} = (L_{hi} + 0.05) / (L_{lo} + 0.05)`. The 5x5 square dilation
    (2 px) is the seed's at any size. No text: 0.

    Shapes:
        - image: ``(B, 3, H, W)`` float RGB in [0, 1] (uint8 is divided by 255)
        - text_mask: ``(B, H, W)`` in [0, 1]
        - output: ``(B,)``
    """
    t = _maps("text_mask", text_mask)
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != (t.shape[0], 3, *t.shape[1:]):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected (B, 3, H, W) = {(t.shape[0], 3, *t.shape[1:])}, got {got}")
    rgb = image.to(t.dtype) / 255.0 if image.dtype == torch.uint8 else image.to(t.dtype)
    ring = _dilate(t, 2) - t

    weights = torch.stack([t, ring], dim=1).flatten(2)  # (B, 2, HW)
    sums = torch.bmm(rgb.flatten(2), weights.transpose(1, 2))  # (B, 3, 2): one product, no (B, 3, H, W) temporaries
    means = sums / weights.sum(dim=2)[:, None, :].clamp_min(_EPS)
    lum = relative_luminance(means.transpose(1, 2))  # (B, 2): text, ring
    ratio = (lum.amax(dim=1) + 0.05) / (lum.amin(dim=1) + 0.05)
    score = ((ratio - 1.0) / 6.0).clamp(0.0, 1.0)
    return torch.where((t.sum(dim=(1, 2)) > 0) & (ring.sum(dim=(1, 2)) > 0), score, torch.zeros_like(score))


def whitespace_score(content: torch.Tensor) -> torch.Tensor:
    r"""Evenness of the empty space: ``1 - Gini`` of the empty pixels' distances to the content.

    Distances ``d`` are the exact Euclidean distance transform of the content (``content > 0.5``);
    the Gini coefficient is weighted by emptiness ``w = 1 - content``:

    .. math:: G = \frac{\sum_{i,j} w_i w_j |d_i - d_j|}{2 (\sum_i w_i)(\sum_i w_i d_i)}
              = \frac{\sum_i w_i d_{(i)} (2 S_{<i} + w_i - S)}{S \sum_i w_i d_i}

    over pixels sorted by distance, :math:`S_{<i}` the weight before pixel :math:`i` and
    :math:`S` the total. On a binary map this is the seed's
    ``2 sum_i i d_(i) / (n sum d) - (n + 1) / n`` over the empty pixels. The gradient flows
    through ``w`` (which pixels count as empty); the distances are constants. No content or no
    empty pixel: 0.

    Shapes:
        - content: ``(B, H, W)`` in [0, 1]
        - output: ``(B,)``
    """
    c = _maps("content", content)
    hard = c.detach() > 0.5
    d = distance_transform(hard).flatten(1)
    w = (1.0 - c).flatten(1)
    valid = hard.flatten(1).any(dim=1) & (~hard).flatten(1).any(dim=1)
    d = torch.where(valid[:, None], d, torch.zeros_like(d))  # inf distances of empty maps
    order = d.argsort(dim=1)
    d, w = d.gather(1, order), w.gather(1, order)
    total = w.sum(dim=1, keepdim=True)
    before = w.cumsum(dim=1) - w
    gini = (w * d * (2.0 * before + w - total)).sum(dim=1) / (total[:, 0] * (w * d).sum(dim=1)).clamp_min(_EPS)
    return torch.where(valid, 1.0 - gini.clamp(0.0, 1.0), torch.zeros_like(gini))


def hierarchy_score(content: torch.Tensor, hierarchy: torch.Tensor) -> torch.Tensor:
    r"""Does visual weight follow the intended hierarchy: ``(cos(target, visual) + 1) / 2``.

    ``target`` is the hierarchy map, ``visual = 0.7 blur(content) + 0.3 (1 - y / H)`` (blocks,
    and the top of the canvas, draw the eye), each divided by its maximum, compared by cosine
    similarity over all pixels. The blur is the seed's 15x15, sigma 2.6 at 256 px, scaled to H:
    ``sigma = 2.6 H / 256``, ``radius = max(1, round(7 H / 256))``. No content: 0.

    Shapes:
        - content, hierarchy: ``(B, H, W)`` in [0, 1]
        - output: ``(B,)``
    """
    c = _maps("content", content)
    target = _maps("hierarchy", hierarchy, tuple(c.shape))
    h = c.shape[1]
    blur = gaussian_blur(c, sigma=2.6 * h / 256, radius=max(1, round(7 * h / 256)))
    top = 1.0 - torch.arange(h, dtype=c.dtype, device=c.device) / h
    visual = 0.7 * blur + 0.3 * top[:, None]
    target = target / target.flatten(1).amax(dim=1).clamp_min(_EPS)[:, None, None]
    visual = visual / visual.flatten(1).amax(dim=1).clamp_min(_EPS)[:, None, None]
    score = (F.cosine_similarity(target.flatten(1), visual.flatten(1), dim=1, eps=_EPS) + 1.0) / 2.0
    return torch.where(c.flatten(1).sum(dim=1) > 0, score, torch.zeros_like(score))


def grammar_scores(image: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` scores in the order of ``vocab.GRAMMAR_NAMES``: alignment, contrast, whitespace, hierarchy.

    ``structure`` is F (``render.Rendering.structure``): the text mask (channel 0) goes to the
    contrast, the hierarchy (channel 3) to the hierarchy score and, through
    :func:`layout_content`, to the three layout scores.

    Shapes:
        - image: ``(B, 3, H, W)`` float in [0, 1] or uint8
        - structure: ``(B, 4, H, W)``
        - output: ``(B, 4)`` float32
    """
    if not isinstance(structure, torch.Tensor) or structure.dim() != 4 or structure.shape[1] != 4:
        got = tuple(structure.shape) if isinstance(structure, torch.Tensor) else type(structure).__name__
        raise ValueError(f"structure: expected (B, 4, H, W), got {got}")
    content = layout_content(structure[:, 3])
    return torch.stack([alignment_score(content), contrast_score(image, structure[:, 0]),
                        whitespace_score(content), hierarchy_score(content, structure[:, 3])], dim=1)
