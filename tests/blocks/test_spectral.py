import math

import numpy as np
import pytest
import torch

from blockyard.blocks import SpectralConv2d


def naive_spectral(layer, x):
    """Truncated DFT with explicit loops: forward sums over pixels, inverse sums over kept modes."""
    xs = x.double().numpy()
    w = torch.view_as_complex(layer.weight.detach().double()).numpy()
    batch, cin, height, width = xs.shape
    m1, m2 = layer.effective_modes(height, width)
    full = layer.modes[0]
    kys = [(k, k) for k in range(m1)] + [(-k, 2 * full - k) for k in range(m1, 0, -1)]  # (frequency, weight row)
    out = np.zeros((batch, layer.out_channels, height, width))
    for b in range(batch):
        for ky, row in kys:
            for kx in range(m2):
                coef = np.zeros(cin, dtype=complex)
                for y in range(height):
                    for xx in range(width):
                        coef += xs[b, :, y, xx] * np.exp(-2j * math.pi * (ky * y / height + kx * xx / width))
                coef /= height * width
                mixed = coef @ w[:, :, row, kx]
                weight = 1.0 if kx == 0 or 2 * kx == width else 2.0
                for y in range(height):
                    for xx in range(width):
                        phase = np.exp(2j * math.pi * (ky * y / height + kx * xx / width))
                        out[b, :, y, xx] += weight * (mixed * phase).real
    return torch.from_numpy(out)


@pytest.mark.parametrize("size, modes", [((8, 6), (2, 3)), ((7, 9), (3, 2)), ((6, 6), (5, 9))])
def test_matches_naive_truncated_dft(size, modes):
    layer = SpectralConv2d(2, 3, modes)
    x = torch.randn(2, 2, *size)
    torch.testing.assert_close(layer(x).double(), naive_spectral(layer, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size, modes", [((16, 16), (4, 9)), ((12, 9), (3, 5)), ((10, 20), (5, 4)), ((8, 7), (2, 1))])
def test_matmul_dft_path_matches_the_fft_path_values_and_gradients(size, modes):
    # default: the kept W columns by a matmul with their DFT basis; reference: rfft / irfft. The
    # cases keep the Nyquist column (16 -> 9 of 9), an odd width, all of a small width, only DC.
    fast = SpectralConv2d(3, 2, modes, bias=True)
    ref = SpectralConv2d(3, 2, modes, bias=True, matmul_dft=False)
    ref.load_state_dict(fast.state_dict())
    assert fast.matmul_dft and not ref.matmul_dft
    x = torch.randn(2, 3, *size, requires_grad=True)
    g = torch.randn(2, 2, *size)
    outs = []
    for layer in (fast, ref):
        y = layer(x)
        outs.append((y, *torch.autograd.grad(y, [x, layer.weight], g)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _wave(ky, kx, n):
    y = torch.arange(n, dtype=torch.float64)[:, None]
    x = torch.arange(n, dtype=torch.float64)[None]
    return torch.cos(2 * math.pi * (ky * y / n + kx * x / n)).float()[None, None]


def _identity_layer(modes):
    layer = SpectralConv2d(1, 1, modes)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[..., 0] = 1.0  # R = 1 on every kept mode
    return layer


@pytest.mark.parametrize("sign", [1, -1])
def test_kept_modes_pass_and_higher_modes_are_removed(sign):
    layer = _identity_layer((4, 4))
    kept = _wave(sign * 3, 2, 32)
    torch.testing.assert_close(layer(kept), kept, atol=1e-5, rtol=0)
    for ky, kx in ((sign * 5, 1), (sign * 1, 5), (sign * 6, 6)):
        assert layer(_wave(ky, kx, 32)).abs().max() < 1e-5


def test_same_function_at_two_resolutions():
    layer = SpectralConv2d(2, 2, (4, 4))
    y32, y64 = (torch.arange(n, dtype=torch.float64) / n for n in (32, 64))

    def field(grid):
        yy, xx = grid[:, None], grid[None]
        a = torch.sin(2 * math.pi * (2 * yy - xx)) + 0.5 * torch.cos(2 * math.pi * (yy + 3 * xx))
        return torch.stack([a, torch.cos(2 * math.pi * (-3 * yy + xx))]).float()[None]

    out32 = layer(field(y32))
    out64 = layer(field(y64))
    torch.testing.assert_close(out64[..., ::2, ::2], out32, atol=1e-5, rtol=1e-4)


def test_modes_are_clamped_to_the_input():
    layer = SpectralConv2d(1, 2, (16, 16))
    assert layer.effective_modes(8, 8) == (4, 5)
    assert layer(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_weights_are_real_and_get_gradient():
    layer = SpectralConv2d(3, 4, 4, bias=True)
    assert all(not p.is_complex() for p in layer.parameters())
    layer(torch.randn(2, 3, 16, 16)).square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0


def test_bf16_autocast_runs_fft_in_float32():
    layer = SpectralConv2d(2, 2, 4)
    x = torch.randn(2, 2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x))
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(2, 3, 8), (2, 2, 8, 8), (2, 3, 1, 8)])
def test_rejects_bad_input(shape):
    with pytest.raises(ValueError, match="x: expected"):
        SpectralConv2d(3, 3, 4)(torch.randn(*shape))


def test_rejects_bad_modes():
    with pytest.raises(ValueError, match="modes: expected"):
        SpectralConv2d(3, 3, (4, 0))
