import functools
import itertools

import pytest
import torch

from blockyard.blocks import FNOBlock, HybridUNO, StableFNOBlock, count_parameters


def test_fno_block_formula():
    block = FNOBlock(4, modes=3)
    x = torch.randn(2, 4, 12, 12)
    b = block.branch
    expected = x + torch.nn.functional.gelu(b.spectral(x) + b.local_conv(x))
    torch.testing.assert_close(block(x), expected)


def test_stable_block_zero_gamma_is_exactly_identity_at_init():
    block = StableFNOBlock(4, modes=3, scale="zero_gamma")
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_stable_block_layerscale_is_near_identity_and_trains_its_gate():
    block = StableFNOBlock(4, modes=3, scale="layerscale", layerscale_init=1e-3)
    x = torch.randn(2, 4, 8, 8)
    y = block(x)
    delta = (y - x).abs().max()
    assert 1e-6 < delta < 1e-2
    # The update is 1e-3 * InstanceNorm(...): per channel, zero mean and unit variance before the gate.
    normed = (y - x) / 1e-3
    torch.testing.assert_close(normed.mean((2, 3)), torch.zeros(2, 4), atol=1e-4, rtol=0)
    y.square().sum().backward()
    assert block.gamma.grad.abs().sum() > 0 and block.branch.spectral.weight.grad.abs().sum() > 0


def test_stable_block_bf16_and_bad_input():
    block = StableFNOBlock(4, modes=3, scale="layerscale")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(block(torch.randn(2, 4, 8, 8))).all()
    with pytest.raises(ValueError, match="x: expected"):
        block(torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match="scale: expected"):
        StableFNOBlock(4, scale="rezero")


def hand_count(cin, cout, hidden, levels, modes, max_channels=None, stable=False):
    """HybridUNO's parameter count from its formula (real scalars; complex weights count 2)."""
    widths = [min(hidden * 2**i, max_channels or 10**9) for i in range(levels)]

    def block(c, m):
        spectral = c * c * (2 * m) * m * 2
        local = c * c * 9 + c
        extra = (3 * c if stable else 0)  # InstanceNorm affine (2C) + LayerScale gate (C)
        return spectral + local + extra

    total = (cin * hidden * 9 + hidden) + (hidden * hidden * 9 + hidden)  # lifter
    total += sum(block(c, modes) for c in widths)
    total += sum(a * b * 4 + b for a, b in itertools.pairwise(widths))  # stride-2 downsampling
    total += block(widths[-1], modes // 2)
    for a, b in itertools.pairwise(widths):  # decoder: transposed conv, then two 3x3 convs
        total += b * a * 4 + a + (2 * a * a * 9 + a) + (a * a * 9 + a)
    total += hidden * cout + cout
    return total


@pytest.mark.parametrize("max_channels", [None, 24])
def test_parameter_count_matches_hand_formula(max_channels):
    model = HybridUNO(2, 3, hidden=8, levels=4, modes=4, max_channels=max_channels)
    assert count_parameters(model) == hand_count(2, 3, 8, 4, 4, max_channels)
    stable = HybridUNO(2, 3, hidden=8, levels=3, modes=4,
                       block=functools.partial(StableFNOBlock, scale="layerscale"))
    assert count_parameters(stable) == hand_count(2, 3, 8, 3, 4, stable=True)


def test_max_channels_is_honoured_everywhere():
    model = HybridUNO(1, 2, hidden=8, levels=4, modes=4, max_channels=16)
    assert model.widths == [8, 16, 16, 16]
    widths = {m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert max(widths) <= 16


def test_shapes_gradients_and_stable_identity_path():
    model = HybridUNO(1, 2, hidden=8, levels=3, modes=4,
                      block=functools.partial(StableFNOBlock, scale="zero_gamma"))
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 2, 32, 32)
    out.square().mean().backward()
    assert model.lifter[0].weight.grad.abs().sum() > 0


def test_depth_beyond_the_resolution_is_a_clear_error_before_allocation():
    with pytest.raises(ValueError, match=r"input_size: levels=8 .* at most levels=6"):
        HybridUNO(1, 2, hidden=32, levels=8, modes=12, input_size=64)
    model = HybridUNO(1, 2, hidden=4, levels=4, modes=2)
    with pytest.raises(ValueError, match=r"x: levels=4 .* got 20x20"):
        model(torch.randn(1, 1, 20, 20))
    with pytest.raises(ValueError, match="x: expected"):
        model(torch.randn(1, 3, 32, 32))
