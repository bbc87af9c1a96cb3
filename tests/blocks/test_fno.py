import copy
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


def instance_norm_by_hand(h, weight, bias, eps):
    """Per sample and channel: (h - mean) / sqrt(biased variance + eps), then the affine."""
    mean = h.mean((2, 3), keepdim=True)
    var = (h - mean).square().mean((2, 3), keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_stable_block_layerscale_matches_formula_and_trains_its_gate():
    init = 1e-3
    block = StableFNOBlock(4, modes=3, scale="layerscale", layerscale_init=init)
    assert torch.equal(block.gamma.detach(), torch.full((4,), init))  # the gate starts at layerscale_init exactly
    norm = block.norm
    assert torch.equal(norm.weight.detach(), torch.ones(4)) and torch.equal(norm.bias.detach(), torch.zeros(4))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    block.double()
    y = block(x)
    b = block.branch
    h = torch.nn.functional.gelu(b.spectral(x) + b.local_conv(x))  # norm last: after the activation
    expected = x + block.gamma.view(1, -1, 1, 1) * instance_norm_by_hand(h, block.norm.weight, block.norm.bias,
                                                                         block.norm.eps)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)
    # The update is init * InstanceNorm(...): per channel, zero mean and unit variance before the gate
    # (variance var / (var + eps), 1 to about eps / var ~ 1e-4 here).
    normed = (y - x) / init
    torch.testing.assert_close(normed.mean((2, 3)), torch.zeros(2, 4, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(normed.var((2, 3), correction=0), torch.ones(2, 4, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    y.square().sum().backward()
    assert block.gamma.grad.abs().sum() > 0 and block.branch.spectral.weight.grad.abs().sum() > 0


def test_stable_block_bf16_autocast_matches_float32_and_bad_input():
    torch.manual_seed(0)
    # Gate 1: the update is O(1), so the comparison sees it (at 1e-3 the residual x would hide it).
    block = StableFNOBlock(4, modes=3, scale="layerscale", layerscale_init=1.0)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = block(x) - x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            update = block(x) - x
    # bf16 keeps 8 significant bits: unit roundoff u = 2**-8. Only the 3x3 conv runs in bf16 (its
    # input and weights each rounded once, the FFT and the InstanceNorm statistics in float32), so
    # the update is within a few u of float32 (measured: 0.6 u, relative norm). 2 u = 2**-7 still
    # fails any wrong op (a missing norm, activation or branch is an O(1) error).
    assert torch.isfinite(update).all()
    assert (update - ref).norm() <= 2**-7 * ref.norm()
    torch.testing.assert_close(update, ref, rtol=0, atol=2**-6 * ref.abs().max().item())
    # bf16 parameters and input (no autocast): x, the weights and the output are rounded too
    # (measured 1.1 u); the InstanceNorm still runs in float32.
    with torch.no_grad():
        y16 = copy.deepcopy(block).bfloat16()(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - (ref + x)).norm() <= 2**-6 * (ref + x).norm()
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


def uno_by_hand(model, x):
    """HybridUNO with levels=3 written out op by op (the blocks are tested above on their own)."""
    F = torch.nn.functional

    def conv(m, h, **kw):
        return F.conv2d(h, m.weight, m.bias, padding=m.padding, **kw)

    def decode(stage, h, skip):
        up = F.conv_transpose2d(h, stage.up.weight, stage.up.bias, stride=2)
        h = conv(stage.fuse[0], torch.cat([up, skip], dim=1))  # upsampled first, then the skip
        return conv(stage.fuse[2], F.gelu(h))

    h = conv(model.lifter[2], F.gelu(conv(model.lifter[0], x)))
    skip0 = model.encoder[0](h)
    skip1 = model.encoder[1](conv(model.down[0], skip0, stride=2))
    h = model.bottleneck(model.encoder[2](conv(model.down[1], skip1, stride=2)))
    h = decode(model.decoder[1], h, skip1)  # coarsest decoder stage meets the deepest skip
    h = decode(model.decoder[0], h, skip0)
    return conv(model.head, h)


def test_uno_forward_matches_its_composition_by_hand():
    torch.manual_seed(0)
    # Equal widths (max_channels = hidden), so swapped skips or stages would still run: only the values tell.
    model = HybridUNO(2, 3, hidden=4, levels=3, modes=2, max_channels=4).double()
    x = torch.randn(2, 2, 8, 12, dtype=torch.float64)  # H != W: a transposed axis would show
    out = model(x)
    assert out.shape == (2, 3, 8, 12)
    torch.testing.assert_close(out, uno_by_hand(model, x), rtol=1e-10, atol=1e-12)


def test_zero_gamma_blocks_are_an_identity_path_with_gradients_at_init():
    torch.manual_seed(0)
    model = HybridUNO(1, 2, hidden=8, levels=3, modes=4,
                      block=functools.partial(StableFNOBlock, scale="zero_gamma"))
    # The same network with every FNO block replaced by the identity, sharing all other weights.
    plain = HybridUNO(1, 2, hidden=8, levels=3, modes=4, block=lambda c, m: torch.nn.Identity())
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(("encoder.", "bottleneck.")) for k in unexpected)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 2, 32, 32)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)  # exactly: the updates are 0 * IN(...) + 0
    out.square().mean().backward()
    assert model.lifter[0].weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    for block in [*(stage[0] for stage in model.encoder), model.bottleneck]:
        assert block.norm.weight.grad.abs().sum() > 0  # the zero gamma learns first ...
        assert block.branch.local_conv.weight.grad.abs().sum() == 0  # ... the branch only once it moved


def test_depth_beyond_the_resolution_is_a_clear_error_before_allocation():
    with pytest.raises(ValueError, match=r"input_size: levels=8 .* at most levels=6"):
        HybridUNO(1, 2, hidden=32, levels=8, modes=12, input_size=64)
    model = HybridUNO(1, 2, hidden=4, levels=4, modes=2)
    with pytest.raises(ValueError, match=r"x: levels=4 .* got 20x20"):
        model(torch.randn(1, 1, 20, 20))
    with pytest.raises(ValueError, match="x: expected"):
        model(torch.randn(1, 3, 32, 32))
