
import pytest
import torch
import torch.nn.functional as F

from blockyard.blocks import group_norm

# ---------------------------------------------------------------- group_norm


@pytest.mark.parametrize(("channels", "groups"), [(12, 6), (20, 5), (7, 7), (11, 1), (8, 8), (16, 8),
                                                  (1, 1), (6, 6), (9, 3), (64, 8)])
def test_group_norm_picks_largest_divisor(channels, groups):
    assert group_norm(channels).num_groups == groups


def test_group_norm_never_crashes_and_is_largest_divisor_for_1_to_64():
    for channels in range(1, 65):
        norm = group_norm(channels)
        g = norm.num_groups
        assert channels % g == 0 and 1 <= g <= 8
        assert not any(channels % h == 0 for h in range(g + 1, 9)), channels
        y = norm(torch.randn(2, channels, 3, 3))
        assert y.shape == (2, channels, 3, 3) and torch.isfinite(y).all()


def test_group_norm_respects_max_groups():
    assert group_norm(64, max_groups=32).num_groups == 32
    assert group_norm(12, max_groups=4).num_groups == 4


@pytest.mark.parametrize(("channels", "max_groups"), [(0, 8), (4, 0)])
def test_group_norm_rejects_bad_sizes(channels, max_groups):
    with pytest.raises(ValueError, match="channels"):
        group_norm(channels, max_groups=max_groups)


def _randomise_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


# ---------------------------------------------------------------- GroupNorm (fast channels-last half path)


def _group_norm_reference(x, groups, weight, bias, eps):
    """The formula in float64, written out: per sample and group, biased variance."""
    b, c = x.shape[:2]
    xg = x.double().reshape(b, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


def _values_and_grads(fn, x, params, dy):
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    y = fn(x)
    y.backward(dy.to(y.dtype))
    return y, x.grad, [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_group_norm_module_matches_float64_formula(dtype, channels_last, offset):
    torch.manual_seed(0)
    norm = group_norm(12, eps=0.25)  # 6 groups of 2; a large eps so a dropped eps shows
    assert isinstance(norm, torch.nn.GroupNorm)
    _randomise_(norm)
    x = (torch.randn(3, 12, 64, 66) * 2 + offset).to(dtype)  # 64 x 66: the fast path's size for bf16
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape).to(dtype).contiguous(memory_format=torch.channels_last if channels_last else
                                                   torch.contiguous_format)
    y, dx, (dw, db) = _values_and_grads(norm, x, [norm.weight, norm.bias], dy)
    ref_w = norm.weight.detach().double().requires_grad_()
    ref_b = norm.bias.detach().double().requires_grad_()
    ref_y, ref_dx, (ref_dw, ref_db) = _values_and_grads(
        lambda t: _group_norm_reference(t, 6, ref_w, ref_b, 0.25), x.double(), [ref_w, ref_b], dy.double())
    assert y.dtype == dtype and dx.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y.double(), ref_y, **tol)
    torch.testing.assert_close(dx.double(), ref_dx, **tol)
    # parameter gradients are float32 sums over the batch and every position
    torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-3, atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    torch.testing.assert_close(db.double(), ref_db, rtol=1e-5, atol=1e-3)


def test_group_norm_fast_path_is_taken_and_agrees_with_torch_kernels():
    torch.manual_seed(1)
    norm = _randomise_(group_norm(16, eps=0.25))
    x = (torch.randn(2, 16, 64, 64) + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape).bfloat16().contiguous(memory_format=torch.channels_last)
    ours = _values_and_grads(norm, x, [norm.weight, norm.bias], dy)
    y = norm(x.requires_grad_())
    assert "GroupNormChannelsLastHalf" in type(y.grad_fn).__name__
    # the gradient goes on channels-last (a leaf's .grad is re-strided by autograd, so ask for it raw)
    assert torch.autograd.grad(y, x, dy)[0].is_contiguous(memory_format=torch.channels_last)
    x.requires_grad_(False)
    theirs = _values_and_grads(lambda t: F.group_norm(t, 8, norm.weight, norm.bias, 0.25),
                               x, [norm.weight, norm.bias], dy)
    # same forward kernel; the backward kernels differ only in summation order
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1].float(), theirs[1].float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_fast_path_under_autocast_and_without_affine():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 8, 1).to(memory_format=torch.channels_last)
    norm = torch.nn.Sequential(conv, group_norm(8, max_groups=4, affine=False))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and "GroupNormChannelsLastHalf" in type(y.grad_fn).__name__
    (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
    h = conv(x).detach().double().requires_grad_()
    ref = _group_norm_reference(h, 4, None, None, 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    conv_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = F.group_norm(conv(x), 4, None, None, 1e-5)
    (y2.float() * torch.linspace(-1, 1, 64)).sum().backward()
    torch.testing.assert_close(conv_grad, conv.weight.grad, rtol=2e-2, atol=2e-2)


def test_group_norm_module_compiles_fullgraph_and_checks_channels():
    norm = _randomise_(group_norm(8))
    x = torch.randn(2, 8, 64, 64).bfloat16().contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), norm(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x: expected"):
        norm(torch.randn(2, 6, 4, 4))
