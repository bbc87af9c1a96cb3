import math

import pytest
import torch

from blockyard.losses import gaussian_heatmap, neighborhood_cross_entropy, wta_heatmap_loss


def naive_heatmap(center, h, w, sigma, mask):
    g = torch.zeros(h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            if mask is None or not mask[y, x] or (y, x) == tuple(center):
                g[y, x] = math.exp(-((y - center[0]) ** 2 + (x - center[1]) ** 2) / (2 * sigma**2))
    return g / g.sum()


def naive_wta(logits, centers, mask, sigma):
    per = torch.zeros(logits.shape[:2], dtype=torch.float64)
    for b in range(logits.shape[0]):
        c = centers[b].tolist()
        g = naive_heatmap(c, *logits.shape[2:], sigma, None if mask is None else mask[b])
        for k in range(logits.shape[1]):
            vals, targets = [], []
            for y in range(logits.shape[2]):
                for x in range(logits.shape[3]):
                    if mask is None or not mask[b, y, x] or [y, x] == c:
                        vals.append(float(logits[b, k, y, x]))
                        targets.append(float(g[y, x]))
            lse = math.log(sum(math.exp(v - max(vals)) for v in vals)) + max(vals)
            per[b, k] = -sum(t * (v - lse) for t, v in zip(targets, vals))
    return per.min(1).values.mean(), per


@pytest.mark.parametrize("with_mask", [False, True])
def test_gaussian_heatmap_matches_formula(with_mask):
    centers = torch.tensor([[0, 0], [3, 5], [6, 2]])
    mask = torch.rand(3, 7, 6) > 0.6 if with_mask else None
    g = gaussian_heatmap(centers, (7, 6), sigma=1.5, mask=mask)
    for b in range(3):
        ref = naive_heatmap(centers[b].tolist(), 7, 6, 1.5, None if mask is None else mask[b])
        torch.testing.assert_close(g[b].double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g.sum((1, 2)), torch.ones(3))


def test_gaussian_heatmap_fully_masked_is_one_hot():
    g = gaussian_heatmap(torch.tensor([[2, 3]]), (5, 5), mask=torch.ones(1, 5, 5, dtype=torch.bool))
    expected = torch.zeros(1, 5, 5)
    expected[0, 2, 3] = 1
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("with_mask", [False, True])
def test_wta_matches_naive_reference(with_mask):
    logits = torch.randn(3, 4, 6, 5) * 3
    centers = torch.tensor([[0, 4], [2, 2], [5, 0]])
    mask = torch.rand(3, 6, 5) > 0.5 if with_mask else None
    out = wta_heatmap_loss(logits, centers, mask=mask, sigma=2.0)
    ref_loss, ref_per = naive_wta(logits, centers, mask, 2.0)
    torch.testing.assert_close(out.per_hypothesis.double(), ref_per, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=1e-4, rtol=1e-5)
    assert torch.equal(out.best, ref_per.argmin(1))


def test_wta_only_winner_gets_gradient():
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = wta_heatmap_loss(logits, torch.tensor([[1, 1], [3, 3]]))
    out.loss.backward()
    for b in range(2):
        for k in range(3):
            nonzero = bool(logits.grad[b, k].abs().sum() > 0)
            assert nonzero == (k == int(out.best[b]))


def test_wta_all_masked_rows_and_bf16_are_finite():
    logits = (torch.randn(2, 4, 8, 8) * 50).bfloat16().requires_grad_()
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    out = wta_heatmap_loss(logits, torch.tensor([[0, 0], [7, 7]]), mask=mask)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad.float()).all()
    # Only the centre is legal, so the softmax puts all its mass there: zero loss.
    torch.testing.assert_close(out.loss, torch.tensor(0.0))


def test_wta_bf16_close_to_float32():
    logits = torch.randn(4, 4, 16, 16)
    centers = torch.randint(0, 16, (4, 2))
    full = wta_heatmap_loss(logits, centers).loss
    half = wta_heatmap_loss(logits.bfloat16(), centers).loss
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.02)


def test_diversity_is_zero_for_identical_hypotheses_usage():
    logits = torch.randn(1, 1, 4, 4).expand(2, 4, 4, 4)
    out = wta_heatmap_loss(logits, torch.tensor([[1, 1], [2, 2]]))
    torch.testing.assert_close(out.diversity, torch.tensor(0.0), atol=1e-6, rtol=0)


def naive_diversity(per):
    """``sum_k u_k log u_k + log K``, ``u`` the batch mean of each row's ``softmax(-per)``, float64."""
    batch, k = per.shape
    usage = [0.0] * k
    for b in range(batch):
        row = [-float(v) for v in per[b]]
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        for j in range(k):
            usage[j] += weights[j] / sum(weights) / batch
    return sum(u * math.log(u) for u in usage if u > 0) + math.log(k)


def test_diversity_matches_its_formula_on_uneven_usage():
    gen = torch.Generator().manual_seed(3)
    centers = torch.tensor([[1, 1], [4, 3], [0, 4], [5, 0]])
    logits = 2 * torch.randn(4, 3, 6, 5, generator=gen)
    target = gaussian_heatmap(centers, (6, 5), sigma=1.0)
    winners = [0, 0, 2, 0]  # hypothesis b's logits are log(target): the exact fit, so it wins that sample
    for b, k in enumerate(winners):
        logits[b, k] = target[b].log()
    out = wta_heatmap_loss(logits, centers, sigma=1.0)
    assert out.best.tolist() == winners
    _, per = naive_wta(logits, centers, None, 1.0)
    expected = naive_diversity(per)
    assert 0.05 < expected < math.log(3) - 0.05  # uneven, but not one-hot: both ends would hide a wrong formula
    torch.testing.assert_close(out.diversity.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)


def test_diversity_is_positive_when_one_hypothesis_wins_every_sample():
    centers = torch.tensor([[0, 0], [2, 3], [4, 1]])
    logits = torch.zeros(3, 4, 5, 5)
    logits[:, :, 4, 4] = 30.0  # every hypothesis but #2 bets everything on a pixel far from the targets
    logits[:, 2] = gaussian_heatmap(centers, (5, 5), sigma=1.0).log()
    out = wta_heatmap_loss(logits, centers, sigma=1.0)
    assert out.best.tolist() == [2, 2, 2]
    # usage ~ one-hot: diversity ~ log K (its maximum), far from the 0 of even usage
    assert out.diversity > 0.99 * math.log(4)
    _, per = naive_wta(logits, centers, None, 1.0)
    torch.testing.assert_close(out.diversity.double(), torch.tensor(naive_diversity(per), dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)


def naive_neighborhood(logits, centers, target, w, s, s_c, mask):
    total = 0.0
    for b in range(logits.shape[0]):
        y, x = centers[b].tolist()
        t = torch.tensor([int(target[b])])
        center = torch.nn.functional.cross_entropy(logits[b, :, y, x][None], t, label_smoothing=s_c)
        terms = []
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < logits.shape[2] and 0 <= nx < logits.shape[3]:
                if mask is None or not mask[b, ny, nx]:
                    terms.append(torch.nn.functional.cross_entropy(
                        logits[b, :, ny, nx][None], t, label_smoothing=s))
        nbr = sum(terms) / len(terms) if terms else 0.0
        total = total + center + w * nbr
    return total / logits.shape[0]


@pytest.mark.parametrize("with_mask", [False, True])
def test_neighborhood_cross_entropy_matches_naive(with_mask):
    logits = torch.randn(4, 12, 5, 6)
    centers = torch.tensor([[0, 0], [4, 5], [2, 3], [0, 5]])
    target = torch.tensor([0, 11, 5, 3])
    mask = torch.rand(4, 5, 6) > 0.5 if with_mask else None
    got = neighborhood_cross_entropy(logits, centers, target, mask=mask)
    ref = naive_neighborhood(logits, centers, target, 0.3, 0.2, 0.1, mask)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_neighborhood_weight_zero_is_plain_cross_entropy():
    logits = torch.randn(3, 12, 4, 4)
    centers = torch.tensor([[1, 1], [0, 3], [2, 0]])
    target = torch.tensor([4, 0, 7])
    got = neighborhood_cross_entropy(logits, centers, target, neighbor_weight=0.0, center_label_smoothing=0.0)
    ref = torch.nn.functional.cross_entropy(logits[torch.arange(3), :, centers[:, 0], centers[:, 1]], target)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: wta_heatmap_loss(torch.randn(2, 4, 5), torch.zeros(2, 2, dtype=torch.long)), "logits: expected"),
        (lambda: wta_heatmap_loss(torch.randn(2, 4, 5, 5), torch.zeros(3, 2, dtype=torch.long)), "centers: expected"),
        (lambda: wta_heatmap_loss(torch.randn(2, 4, 5, 5), torch.zeros(2, 2, dtype=torch.long),
                                  mask=torch.zeros(2, 4, 5, dtype=torch.bool)), "mask: expected"),
        (lambda: gaussian_heatmap(torch.zeros(2, 2), (4, 4)), "centers: expected an integer"),
        (lambda: neighborhood_cross_entropy(torch.randn(2, 12, 4, 4), torch.zeros(2, 2, dtype=torch.long),
                                            torch.zeros(3, dtype=torch.long)), "target: expected"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
