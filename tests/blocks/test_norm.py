import math

import pytest
import torch
import torch.nn.functional as F

from blockyard.blocks import GRN, LayerNorm2d, LayerScale

# ---------------------------------------------------------------- LayerNorm2d


def _randomise_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def test_layernorm2d_matches_layer_norm_on_permuted_input():
    norm = _randomise_(LayerNorm2d(6))
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=0)


def test_layernorm2d_matches_manual_formula_and_default_eps():
    norm = _randomise_(LayerNorm2d(5))
    assert norm.eps == 1e-6
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    norm = norm.double()
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)  # biased, over C only
    ref = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(1, 5, 1, 1) + norm.bias.view(1, 5, 1, 1)
    torch.testing.assert_close(norm(x), ref)
    # over C only: it is not GroupNorm(1, C), which also pools over H, W
    gn = torch.nn.GroupNorm(1, 5, eps=1e-6).double()
    assert not torch.allclose(LayerNorm2d(5).double()(x), gn(x), atol=1e-3)


def test_layernorm2d_without_affine_and_grad():
    norm = LayerNorm2d(4, affine=False)
    assert norm.weight is None
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = norm(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 3), rtol=0, atol=1e-6)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    norm = LayerNorm2d(4)
    norm(x).square().sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None


def test_layernorm2d_bf16_autocast_uses_float32_statistics():
    norm = _randomise_(LayerNorm2d(8))
    # A large common offset: statistics in bf16 would cancel catastrophically.
    x = (torch.randn(2, 8, 4, 4) + 100.0).to(torch.bfloat16)
    ref = LayerNorm2d(8)
    ref.load_state_dict(norm.state_dict())
    expected = ref(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = norm(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, norm(x.float()), rtol=0, atol=0)  # autocast does not lower it


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_layernorm2d_values_and_gradients_match_layer_norm_in_both_memory_formats(memory_format):
    # the forward copies x to channels-last itself (a no-op for channels_last input)
    norm = _randomise_(LayerNorm2d(6))
    x = (torch.randn(2, 6, 5, 7) * 3 + 1).contiguous(memory_format=memory_format).requires_grad_()
    g = torch.randn(2, 6, 5, 7)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    y = norm(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    got = torch.autograd.grad(y, [x, norm.weight, norm.bias], g)
    want = torch.autograd.grad(ref, [x, norm.weight, norm.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 5, 4, 4), (2, 6, 3, 3, 3)])
def test_layernorm2d_rejects_bad_input(shape):
    with pytest.raises(ValueError, match=r"x: expected \(B, 6, H, W\)"):
        LayerNorm2d(6)(torch.randn(*shape))


def test_layernorm2d_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels"):
        LayerNorm2d(0)


# ---------------------------------------------------------------- GRN


def grn_reference(x, gamma, beta, eps=1e-6, mask=None):
    """Naive loop over samples and channels, (B, C, H, W); mask (B, H, W), True = masked."""
    x = x.double()
    out = torch.empty_like(x)
    batch, channels = x.shape[:2]
    for b in range(batch):
        visible = torch.ones(x.shape[2:], dtype=torch.bool) if mask is None else ~mask[b]
        g = [math.sqrt(sum(v * v for v in x[b, c][visible].tolist())) for c in range(channels)]
        mean = sum(g) / channels
        for c in range(channels):
            n = g[c] / (mean + eps)
            out[b, c] = x[b, c] + beta[c].item() + gamma[c].item() * x[b, c] * n
    return out


def _random_grn(channels, channels_last=False, eps=1e-6):
    grn = GRN(channels, eps=eps, channels_last=channels_last)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    return grn


@pytest.mark.parametrize("channels_last", [False, True])
def test_grn_matches_naive_reference(channels_last):
    grn = _random_grn(5, channels_last)
    x = torch.randn(3, 5, 4, 6)
    ref = grn_reference(x, grn.gamma, grn.beta)
    inp = x.permute(0, 2, 3, 1) if channels_last else x
    out = grn(inp)
    if channels_last:
        out = out.permute(0, 3, 1, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_grn_fused_path_matches_reference_path_values_and_gradients(channels_last, masked):
    # fused: x * (1 + gamma * N) + beta in one addcmul; reference: x + beta + gamma * (x * N)
    fused = _random_grn(5, channels_last)
    assert fused.fused
    ref = GRN(5, channels_last=channels_last, fused=False)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 4, 6) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5]).view(1, 5, 1, 1)  # N from ~0 to ~3
    mask = _mask(3, 4, 6) if masked else None
    if masked:
        mask[2] = True  # a fully masked sample: N = 0, gradients must stay finite
    x = (x.permute(0, 2, 3, 1).contiguous() if channels_last else x).requires_grad_()
    g = torch.randn_like(x)
    outs = []
    for grn in (fused, ref):
        y = grn(x, mask)
        outs.append((y, *torch.autograd.grad(y, [x, grn.gamma, grn.beta], g)))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the gradient of gamma goes through N: a fused path that detached N would differ here
    assert outs[0][2].abs().sum() > 0


def test_grn_eps_is_added_to_the_channel_mean():
    grn = _random_grn(3, eps=0.5)
    x = torch.randn(2, 3, 4, 4)
    ref = grn_reference(x, grn.gamma, grn.beta, eps=0.5)
    torch.testing.assert_close(grn(x).double(), ref, rtol=1e-5, atol=1e-5)
    # eps matters at this size, so the match above pins where it is added
    assert not torch.allclose(ref, grn_reference(x, grn.gamma, grn.beta, eps=1e-6), atol=1e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grn_is_identity_at_init(channels_last):
    x = torch.randn(2, 4, 5, 3) * 10
    torch.testing.assert_close(GRN(3 if channels_last else 4, channels_last=channels_last)(x), x, rtol=0, atol=0)


def test_grn_grad_smoke():
    grn = GRN(4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    grn(x).pow(2).sum().backward()
    # at init the output does not depend on gamma's statistics path, but gamma still gets a gradient
    assert grn.gamma.grad.abs().sum() > 0 and grn.beta.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def _mask(batch, h, w, generator=None):
    m = torch.rand(batch, h, w, generator=generator) < 0.5
    m[:, 0, 0] = False  # at least one visible position per sample
    m[:, -1, -1] = True  # and one masked
    return m


@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_grn_ignores_values_at_masked_positions(channels_last):
    grn = _random_grn(4, channels_last)
    x = torch.randn(3, 4, 5, 6)
    mask = _mask(3, 5, 6)
    x2 = x.clone()
    x2.masked_scatter_(mask[:, None].expand_as(x), torch.randn(x.shape) * 100)
    assert not torch.equal(x, x2)
    to = (lambda t: t.permute(0, 2, 3, 1)) if channels_last else (lambda t: t)
    back = (lambda t: t.permute(0, 3, 1, 2)) if channels_last else (lambda t: t)
    y1, y2 = back(grn(to(x), mask)), back(grn(to(x2), mask))
    visible = ~mask[:, None].expand_as(x)
    torch.testing.assert_close(y1[visible], y2[visible], rtol=0, atol=0)
    # without the mask the masked values do leak into the visible outputs
    assert not torch.allclose(back(grn(to(x)))[visible], back(grn(to(x2)))[visible])


@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_grn_matches_reference_on_visible_positions(channels_last):
    grn = _random_grn(4, channels_last)
    x = torch.randn(3, 4, 5, 6)
    mask = _mask(3, 5, 6)
    ref = grn_reference(x, grn.gamma, grn.beta, mask=mask)
    if channels_last:
        out = grn(x.permute(0, 2, 3, 1), mask).permute(0, 3, 1, 2)
    else:
        out = grn(x, mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_masked_grn_mask_layouts_agree_and_empty_mask_is_unmasked():
    grn = _random_grn(4)
    x = torch.randn(2, 4, 3, 5)
    mask = _mask(2, 3, 5)
    torch.testing.assert_close(grn(x, mask), grn(x, mask[:, None]), rtol=0, atol=0)
    torch.testing.assert_close(grn(x, torch.zeros(2, 3, 5, dtype=torch.bool)), grn(x))


def test_masked_grn_fully_masked_sample_is_finite():
    grn = _random_grn(4)
    x = torch.randn(2, 4, 3, 3)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[1] = True
    y = grn(x, mask)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1], x[1] + grn.beta.detach().view(4, 1, 1))  # N = 0 -> y = x + beta


def test_grn_float16_large_values_do_not_overflow():
    # ||x|| over 32x32 positions of values ~3000 is ~1e5 > float16 max: naive fp16 GRN gives NaN.
    grn = GRN(4)
    with torch.no_grad():
        grn.gamma.fill_(0.1)
        grn.beta.fill_(0.5)
    x = (3000 + 100 * torch.randn(1, 4, 32, 32)).half()
    naive_g = x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    assert torch.isinf(naive_g).all()  # what an un-upcast implementation would see
    y = grn(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), grn_reference(x.float(), grn.gamma, grn.beta), rtol=2e-3, atol=0)


def test_grn_bf16_autocast_float32_statistics():
    grn = _random_grn(6)
    x = torch.randn(2, 6, 8, 8).to(torch.bfloat16)
    mask = _mask(2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grn(x, mask)
    assert y.dtype == torch.bfloat16
    ref = grn_reference(x.float(), grn.gamma, grn.beta, mask=mask)
    # only the final cast to bf16 is lossy: relative error within bf16 rounding (2**-8)
    torch.testing.assert_close(y.double(), ref, rtol=2**-8, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = grn(x.float(), mask)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, grn(x.float(), mask), rtol=0, atol=0)


@pytest.mark.slow  # first inductor compile of a process (cold cache: ~20 s CPU)
def test_grn_compiles_fullgraph():
    grn = _random_grn(4)
    x = torch.randn(2, 4, 5, 5)
    mask = _mask(2, 5, 5)
    compiled = torch.compile(grn, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), grn(x, mask))


@pytest.mark.parametrize(("channels_last", "shape"), [
    (False, (2, 5, 4, 4)), (False, (2, 4, 4)), (True, (2, 4, 4, 5)), (True, (2, 4, 4, 4, 4)),
])
def test_grn_rejects_bad_input(channels_last, shape):
    with pytest.raises(ValueError, match="x: expected"):
        GRN(4, channels_last=channels_last)(torch.randn(*shape))


def test_grn_rejects_bad_mask():
    grn = GRN(4)
    x = torch.randn(2, 4, 3, 5)
    with pytest.raises(TypeError, match="mask: expected a bool"):
        grn(x, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"mask: expected \(2, 3, 5\)"):
        grn(x, torch.zeros(2, 5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: expected"):
        grn(x, torch.zeros(1, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels"):
        GRN(0)


# ---------------------------------------------------------------- LayerScale


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 2, 2)])
def test_layerscale_scales_channel_dim(shape):
    ls = LayerScale(3, init=1e-5)
    torch.testing.assert_close(ls.gamma.detach(), torch.full((3,), 1e-5))
    with torch.no_grad():
        ls.gamma.copy_(torch.tensor([1.0, -2.0, 3.0]))
    x = torch.randn(*shape)
    y = ls(x)
    for c, s in enumerate([1.0, -2.0, 3.0]):
        torch.testing.assert_close(y[:, c], s * x[:, c], rtol=0, atol=0)


def test_layerscale_grad_dtype_and_reset():
    ls = LayerScale(4, init=0.5)
    x = torch.randn(2, 4, 3, requires_grad=True)
    ls(x).sum().backward()
    torch.testing.assert_close(ls.gamma.grad, x.detach().sum(dim=(0, 2)))
    assert ls(x.detach().to(torch.bfloat16)).dtype == torch.bfloat16
    with torch.no_grad():
        ls.gamma.zero_()
    ls.reset_parameters()
    torch.testing.assert_close(ls.gamma.detach(), torch.full((4,), 0.5))


@pytest.mark.parametrize("shape", [(2,), (2, 4, 3), (2, 5, 3, 3)])
def test_layerscale_rejects_bad_input(shape):
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, \*\)"):
        LayerScale(3)(torch.randn(*shape))
