import math

import pytest
import torch

from blockyard.losses import CompositeLoss, dice_loss, log2_mse, masked_mse, ssim


def naive_ssim(x, y, size=7, sigma=1.5, k1=0.01, k2=0.03, L=1.0):
    g = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    s = sum(g)
    w = [[g[i] * g[j] / s**2 for j in range(size)] for i in range(size)]
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    vals = []
    H, W = x.shape
    for i in range(H - size + 1):
        for j in range(W - size + 1):
            mx = sum(w[a][b] * float(x[i + a, j + b]) for a in range(size) for b in range(size))
            my = sum(w[a][b] * float(y[i + a, j + b]) for a in range(size) for b in range(size))
            vx = sum(w[a][b] * (float(x[i + a, j + b]) - mx) ** 2 for a in range(size) for b in range(size))
            vy = sum(w[a][b] * (float(y[i + a, j + b]) - my) ** 2 for a in range(size) for b in range(size))
            cxy = sum(w[a][b] * (float(x[i + a, j + b]) - mx) * (float(y[i + a, j + b]) - my)
                      for a in range(size) for b in range(size))
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return sum(vals) / len(vals)


def test_ssim_matches_naive_windowed_formula():
    x = torch.rand(1, 1, 10, 9)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    got = ssim(x, y, data_range=1.0, window_size=7)
    torch.testing.assert_close(got, torch.tensor(naive_ssim(x[0, 0], y[0, 0])), atol=1e-5, rtol=1e-5)


def full_window_ssim(x, y, size, sigma, data_range, k1=0.01, k2=0.03):
    """Per-sample SSIM with the 2-D Gaussian window as one k x k convolution, in float64."""
    x, y = x.double(), y.double()
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return smap.mean(dim=(1, 2, 3))


@pytest.mark.parametrize(("size", "sigma"), [(7, 1.5), (11, 1.5), (5, 0.8)])
def test_ssim_separable_window_matches_the_full_2d_window_per_sample_with_gradients(size, sigma):
    # three samples, two channels of different contrast, a non-square image
    x = torch.rand(3, 2, 13, 17, dtype=torch.float64) * torch.tensor([1.0, 0.3], dtype=torch.float64).view(1, 2, 1, 1)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    x32 = x.float().requires_grad_()
    got = ssim(x32, y.float(), data_range=1.0, window_size=size, sigma=sigma, reduction="none")
    xr = x.clone().requires_grad_()
    want = full_window_ssim(xr, y, size, sigma, 1.0)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), x32)
    (g_want,) = torch.autograd.grad(want.sum(), xr)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-6)


def test_ssim_identity_and_ordering():
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(ssim(x, x), torch.tensor(1.0))
    noisy = ssim(x + 0.05 * torch.randn_like(x), x, reduction="none")
    noisier = ssim(x + 0.3 * torch.randn_like(x), x, reduction="none")
    assert noisy.shape == (2,) and (noisier < noisy).all() and (noisy < 1).all()


def test_masked_mse_uses_masked_positions_only():
    pred, target = torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    target[:, :, 0, 0] = 5.0
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    mask[:, :, 1:, :] = True
    torch.testing.assert_close(masked_mse(pred, target, mask), torch.tensor(1.0))
    torch.testing.assert_close(masked_mse(pred, target, torch.zeros_like(mask)), torch.tensor(0.0))
    with pytest.raises(ValueError, match="mask: expected"):
        masked_mse(pred, target, torch.ones(3, 1, 1, 1, dtype=torch.bool))


def test_log2_mse_and_dice_values():
    torch.testing.assert_close(log2_mse(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 2.0])), torch.tensor(2.5))
    # sigmoid(+-100) is 1 and 0 to float32 precision: the Dice values are exact fractions (eps = 1).
    logits = torch.tensor([[[100.0, -100.0, 100.0, -100.0]]])
    target = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    torch.testing.assert_close(dice_loss(logits, target), torch.tensor(0.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(dice_loss(-logits, target), torch.tensor(0.8), atol=1e-7, rtol=0)  # 1 - 1/5
    # sigmoid(+-10) is not: 1 - (2 * 2 s + 1) / (2 + 2 + 1) with s = sigmoid(10), in float64
    s = 1 / (1 + math.exp(-10))
    expected = 1 - (4 * s + 1) / (2 * s + 2 * (1 - s) + 2 + 1)
    torch.testing.assert_close(dice_loss(logits / 10, target).double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-7, rtol=0)


def naive_dice(logits, target, eps=1.0):
    """1 - mean over (sample, channel) of (2 sum p t + eps) / (sum p + sum t + eps), float64 loops."""
    ratios = []
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            p = [1 / (1 + math.exp(-float(v))) for v in logits[b, c].flatten()]
            t = [float(v) for v in target[b, c].flatten()]
            ratios.append((2 * sum(a * b for a, b in zip(p, t)) + eps) / (sum(p) + sum(t) + eps))
    return 1 - sum(ratios) / len(ratios)


def test_dice_is_per_sample_and_channel_then_averaged():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 2, 5, 4, generator=gen)
    target = torch.zeros(2, 2, 5, 4)
    target[0, 0, :1, :2] = 1.0  # a small object, predicted well
    logits[0, 0] = torch.where(target[0, 0] > 0, 4.0, -4.0)
    logits[0, 1] = -3.0  # an empty slice, predicted empty
    target[1, 0] = (torch.rand(5, 4, generator=gen) > 0.3).float()  # a large object, random logits
    target[1, 1, :, :2] = 0.5  # soft labels
    got = dice_loss(logits, target)
    expected = naive_dice(logits, target)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    pooled = naive_dice(logits.transpose(0, 1).reshape(1, 1, -1), target.transpose(0, 1).reshape(1, 1, -1))
    per_channel_pooled = naive_dice(logits.transpose(0, 1).reshape(1, 2, -1), target.transpose(0, 1).reshape(1, 2, -1))
    # pooling over the batch (or over everything) weights the large slices more: a clearly different value
    assert abs(expected - pooled) > 0.05 and abs(expected - per_channel_pooled) > 0.05


def test_composite_loss_sums_weighted_terms_and_detaches_logs():
    x = torch.tensor(2.0, requires_grad=True)
    loss = CompositeLoss(a=(3.0, lambda v: v**2), b=(0.5, lambda v: v), c=(0.0, lambda v: 1 / 0))
    out = loss(x)
    torch.testing.assert_close(out.total, torch.tensor(13.0))
    assert set(out.terms) == {"a", "b"} and not out.terms["a"].requires_grad
    out.total.backward()
    torch.testing.assert_close(x.grad, torch.tensor(12.5))
    with pytest.raises(TypeError, match="a: expected"):
        CompositeLoss(a=lambda v: v)
