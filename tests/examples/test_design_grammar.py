"""Design decomposition: the grammar scores and their filters against naive float64 references."""
import itertools
import math

import pytest
import torch
from design.filters import distance_transform, gaussian_blur, gaussian_kernel
from design.grammar import (
    MIN_LEVEL,
    alignment_score,
    contrast_score,
    grammar_scores,
    hierarchy_score,
    layout_content,
    whitespace_score,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- filters

def naive_distance(mask):
    """Every pixel against every True pixel (float64 broadcast, no separability)."""
    h, w = mask.shape
    points = mask.nonzero().double()
    if len(points) == 0:
        return torch.full((h, w), math.inf, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return ((ys[..., None] - points[:, 0]) ** 2 + (xs[..., None] - points[:, 1]) ** 2).amin(-1).sqrt()


def test_distance_transform_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 11, 17, generator=gen) < torch.tensor([0.3, 0.05, 0.01, 0.0, 1.0, 0.0]).view(6, 1, 1)
    masks[2, 10, 0] = True  # one far corner pixel
    masks[5, 0, :] = masks[5, 10, 8] = True  # (10, 2): its own column's top pixel is beaten by (10, 8)
    out = distance_transform(masks)
    assert out.shape == masks.shape and out.dtype == torch.float32
    alone = distance_transform(masks[5])  # no empty map in the chunk: the shift loop may stop early
    assert alone[10, 2] == 6.0
    torch.testing.assert_close(alone, out[5])
    for b in (0, 1, 2, 4, 5):
        torch.testing.assert_close(out[b], naive_distance(masks[b]).float(), rtol=0, atol=1e-5)
    assert torch.isinf(out[3]).all() and (out[4] == 0).all()


def test_distance_transform_keeps_leading_dims_and_rejects_a_vector():
    masks = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(1)) < 0.2
    torch.testing.assert_close(distance_transform(masks), distance_transform(masks.view(6, 6, 5)).view(2, 3, 6, 5))
    with pytest.raises(ValueError, match=r"mask: expected a tensor of shape \(\.\.\., H, W\)"):
        distance_transform(torch.ones(5, dtype=torch.bool))


def reflect101(i, n):
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def test_gaussian_blur_matches_naive_convolution_with_reflected_borders():
    x = torch.rand(2, 9, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma, r = 1.3, 3
    k = [math.exp(-i * i / (2 * sigma * sigma)) for i in range(-r, r + 1)]
    k = [v / sum(k) for v in k]
    ref = torch.zeros_like(x)
    for b, y, xx in itertools.product(range(2), range(9), range(12)):
        ref[b, y, xx] = sum(k[i + r] * k[j + r] * x[b, reflect101(y + i, 9), reflect101(xx + j, 12)]
                            for i in range(-r, r + 1) for j in range(-r, r + 1))
    torch.testing.assert_close(gaussian_blur(x, sigma, r), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gaussian_kernel(sigma, r).double(), torch.tensor(k, dtype=torch.float64), rtol=1e-6,
                               atol=0)


def test_gaussian_blur_rejects_a_radius_the_border_cannot_reflect():
    with pytest.raises(ValueError, match="radius: expected < min"):
        gaussian_blur(torch.zeros(1, 4, 9), sigma=1.0, radius=4)
    with pytest.raises(ValueError, match="sigma: expected a positive"):
        gaussian_kernel(0.0, 2)


# ----------------------------------------------------------------------------- alignment

def naive_alignment(c):
    """Loops: three weighted point sets, the pairwise kernel sum, the sigmoid."""
    h, w = c.shape
    at = lambda y, x: c[y, x].item() if 0 <= x < w else 0.0  # noqa: E731
    left = [(x, max(0.0, at(y, x) - at(y, x - 1))) for y in range(h) for x in range(w)]
    right = [(x, max(0.0, at(y, x) - at(y, x + 1))) for y in range(h) for x in range(w)]
    rows = []
    for y in range(h):
        mass = sum(at(y, x) for x in range(w))
        if mass > 0:
            rows.append((sum(x * at(y, x) for x in range(w)) / mass, mass))
    def kappa(points):
        total = sum(p[1] for p in points)
        return sum(wi * wj * max(0.0, 1 - abs(xi - xj)) for xi, wi in points for xj, wj in points) / total ** 2
    nv = min(max(max(kappa(left), kappa(right), kappa(rows)) - 1 / w, 0.0), 1.0)
    return sigmoid(2 * nv - 1)


def bars(spans, h=9, w=16):
    """Horizontal bars ``(row0, row1, col0, col1)`` on an empty canvas."""
    c = torch.zeros(h, w, dtype=torch.float64)
    for r0, r1, c0, c1 in spans:
        c[r0:r1, c0:c1] = 1.0
    return c


LEFT = bars([(0, 2, 2, 12), (3, 5, 2, 8), (6, 8, 2, 5)])
CENTRED = bars([(0, 2, 2, 14), (3, 5, 5, 11), (6, 8, 6, 10)])
SCATTERED = bars([(0, 2, 1, 5), (3, 5, 6, 10), (6, 8, 11, 15)])  # equal widths: every set in thirds


def test_alignment_matches_naive_reference_on_soft_maps():
    gen = torch.Generator().manual_seed(3)
    soft = torch.rand(3, 7, 10, generator=gen, dtype=torch.float64) * (torch.rand(3, 7, 10, generator=gen) < 0.5)
    out = alignment_score(soft)
    torch.testing.assert_close(out, torch.tensor([naive_alignment(m) for m in soft], dtype=torch.float64))


def test_alignment_rewards_aligned_layouts_with_known_values():
    out = alignment_score(torch.stack([LEFT, CENTRED, SCATTERED]))
    w = 16
    # all left edges in one column (kappa = 1); centres all at 7.5 (kappa = 1); every set spread in thirds
    expected = [sigmoid(2 * (1 - 1 / w) - 1), sigmoid(2 * (1 - 1 / w) - 1), sigmoid(2 * (1 / 3 - 1 / w) - 1)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    assert out[0] > out[2] and out[1] > out[2]


def test_seed_alignment_formula_ranks_the_scattered_layout_higher():
    """Negative control: the seed's column histogram with sigmoid(2 (1 - nv) - 1) gets the sign wrong."""
    def seed(c):
        hist = c.sum(0) / c.sum()
        nv = min(hist.var(unbiased=False).item() / (1 / c.shape[1]), 1.0)
        return sigmoid(2 * (1 - nv) - 1)

    assert seed(SCATTERED) > seed(LEFT) and seed(SCATTERED) > seed(CENTRED)


# ----------------------------------------------------------------------------- contrast

def luminance(rgb):
    lin = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def naive_contrast(image, t):
    _, h, w = image.shape
    dil = torch.zeros_like(t)
    for y, x in itertools.product(range(h), range(w)):
        dil[y, x] = max(t[yy, xx] for yy in range(max(0, y - 2), min(h, y + 3))
                        for xx in range(max(0, x - 2), min(w, x + 3)))
    ring = dil - t
    if t.sum() == 0 or ring.sum() == 0:
        return 0.0
    text = [(image[c] * t).sum().item() / t.sum().item() for c in range(3)]
    around = [(image[c] * ring).sum().item() / ring.sum().item() for c in range(3)]
    hi, lo = sorted([luminance(text), luminance(around)], reverse=True)
    return min(max(((hi + 0.05) / (lo + 0.05) - 1) / 6, 0.0), 1.0)


def test_contrast_matches_naive_reference_hard_and_soft():
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(3, 3, 8, 11, generator=gen, dtype=torch.float64)
    hard = (torch.rand(3, 8, 11, generator=gen) < 0.2).double()
    hard[2] = 0  # no text: 0
    soft = torch.rand(3, 8, 11, generator=gen, dtype=torch.float64) * hard.roll(1, dims=0)
    for t in (hard, soft):
        expected = torch.tensor([naive_contrast(image[b], t[b]) for b in range(3)], dtype=torch.float64)
        torch.testing.assert_close(contrast_score(image, t), expected)


def test_contrast_hand_values_and_uint8_input():
    t = torch.zeros(2, 8, 8)
    t[:, 3:5, 2:6] = 1
    image = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)  # white
    image[0, :, 3:5, 2:6] = 0  # black text: WCAG ratio 21 -> clipped to 1
    image[1, :, 3:5, 2:6] = 119  # grey text: L = ((119/255 + .055)/1.055)^2.4
    grey = ((119 / 255 + 0.055) / 1.055) ** 2.4
    expected = torch.tensor([1.0, (1.05 / (grey + 0.05) - 1) / 6])
    torch.testing.assert_close(contrast_score(image, t), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- whitespace

def seed_gini(values):
    """The seed's formula on the sorted values: 2 sum i x_(i) / (n sum x) - (n + 1) / n."""
    x = sorted(values)
    n = len(x)
    return 2 * sum((i + 1) * v for i, v in enumerate(x)) / (n * sum(x)) - (n + 1) / n


def test_whitespace_matches_seed_formula_on_binary_maps():
    gen = torch.Generator().manual_seed(5)
    masks = (torch.rand(3, 9, 12, generator=gen) < torch.tensor([0.05, 0.2, 0.5]).view(3, 1, 1)).double()
    out = whitespace_score(masks)
    for b in range(3):
        d = naive_distance(masks[b] > 0.5)
        empty = [d[y, x].item() for y in range(9) for x in range(12) if masks[b, y, x] == 0]
        assert out[b].item() == pytest.approx(1 - seed_gini(empty), abs=1e-6)


def test_whitespace_soft_weights_match_the_weighted_gini():
    gen = torch.Generator().manual_seed(6)
    hard = torch.rand(2, 7, 9, generator=gen) < 0.2
    soft = torch.where(hard, 0.6 + 0.4 * torch.rand(2, 7, 9, generator=gen), 0.4 * torch.rand(2, 7, 9, generator=gen))
    soft = soft.double()
    out = whitespace_score(soft)
    for b in range(2):
        d = naive_distance(hard[b]).flatten().tolist()
        w = (1 - soft[b]).flatten().tolist()
        num = sum(wi * wj * abs(di - dj) for di, wi in zip(d, w) for dj, wj in zip(d, w))
        gini = num / (2 * sum(w) * sum(wi * di for di, wi in zip(d, w)))
        assert out[b].item() == pytest.approx(1 - gini, abs=1e-6)  # float32 distances


def test_whitespace_degenerate_maps_score_zero():
    maps = torch.stack([torch.zeros(6, 6), torch.ones(6, 6)])
    assert whitespace_score(maps).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- hierarchy

def naive_hierarchy(content, target):
    h, w = content.shape
    sigma, r = 2.6 * h / 256, max(1, round(7 * h / 256))
    k = [math.exp(-i * i / (2 * sigma * sigma)) for i in range(-r, r + 1)]
    k = [v / sum(k) for v in k]
    rows, blur = torch.zeros_like(content), torch.zeros_like(content)
    for y, x in itertools.product(range(h), range(w)):  # separable: along x, then along y
        rows[y, x] = sum(k[j + r] * content[y, reflect101(x + j, w)] for j in range(-r, r + 1))
    for y, x in itertools.product(range(h), range(w)):
        blur[y, x] = sum(k[i + r] * rows[reflect101(y + i, h), x] for i in range(-r, r + 1))
    visual = 0.7 * blur + 0.3 * (1 - torch.arange(h, dtype=content.dtype) / h)[:, None]
    a, v = (target / target.max()).flatten(), (visual / visual.max()).flatten()
    return ((a @ v) / (a.norm() * v.norm()) + 1).item() / 2


@pytest.mark.parametrize("size", [(12, 10), (100, 24)])  # radius 1 (sigma 0.12) and radius 3 (sigma 1.0)
def test_hierarchy_matches_naive_reference(size):
    gen = torch.Generator().manual_seed(7)
    content = (torch.rand(2, *size, generator=gen) < 0.3).double()
    target = content * torch.rand(2, *size, generator=gen, dtype=torch.float64)
    out = hierarchy_score(content, target)
    torch.testing.assert_close(out, torch.tensor([naive_hierarchy(content[b], target[b]) for b in range(2)],
                                                 dtype=torch.float64))


# ----------------------------------------------------------------------------- together

def test_grammar_scores_stack_the_four_scores_on_f_and_are_per_sample():
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(3, 3, 16, 16, generator=gen)
    text = (torch.rand(3, 16, 16, generator=gen) < 0.2).float()
    level = 0.4 + 0.6 * torch.rand(3, 16, 16, generator=gen)
    hierarchy = torch.where(torch.rand(3, 16, 16, generator=gen) < 0.4, level, torch.zeros(3, 16, 16))
    f = torch.stack([text, torch.zeros_like(text), torch.zeros_like(text), hierarchy], dim=1)
    out = grammar_scores(image, f)
    content = (hierarchy > 0).float()
    torch.testing.assert_close(layout_content(hierarchy), content)
    expected = torch.stack([alignment_score(content), contrast_score(image, text), whitespace_score(content),
                            hierarchy_score(content, hierarchy)], dim=1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.cat([grammar_scores(image[i:i + 1], f[i:i + 1]) for i in range(3)]), out)
    assert MIN_LEVEL == pytest.approx(0.4)


def test_scores_have_finite_difference_gradients():
    gen = torch.Generator().manual_seed(9)
    content = (0.05 + 0.9 * torch.rand(2, 6, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    image = torch.rand(2, 3, 6, 7, generator=gen, dtype=torch.float64).requires_grad_()
    target = torch.rand(2, 6, 7, generator=gen, dtype=torch.float64).requires_grad_()
    for fn, args in [(alignment_score, (content,)), (contrast_score, (image, content)),
                     (whitespace_score, (content,)), (hierarchy_score, (content, target))]:
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5), fn.__name__


@pytest.mark.parametrize("fn, args, match", [
    (alignment_score, (torch.zeros(4, 4),), r"content: expected \(B, H, W\)"),
    (contrast_score, (torch.zeros(1, 3, 4, 5), torch.zeros(1, 4, 4)), r"image: expected \(B, 3, H, W\)"),
    (hierarchy_score, (torch.zeros(1, 4, 4), torch.zeros(1, 4, 5)), r"hierarchy: expected \(B, H, W\) = \(1, 4, 4\)"),
    (grammar_scores, (torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)), r"structure: expected \(B, 4, H, W\)"),
])
def test_scores_reject_bad_shapes(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
