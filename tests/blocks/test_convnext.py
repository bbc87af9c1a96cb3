import pytest
import torch
import torch.nn.functional as F

from blockyard.blocks import ConvNeXtV2Block


def _randomise_(block):
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block


def reference(block, x, mask=None):
    """Official block math in NHWC (FCMAE dense-masking recipe), with a naive GRN."""
    b, c, h, w = x.shape
    m = torch.zeros(b, h, w, dtype=x.dtype) if mask is None else mask.reshape(b, h, w).to(x.dtype)
    keep = (1 - m)[..., None]  # (B, H, W, 1)
    inputs = x * keep.permute(0, 3, 1, 2)
    y = F.conv2d(inputs, block.dwconv.weight, block.dwconv.bias, padding=block.kernel_size // 2, groups=c)
    y = y.permute(0, 2, 3, 1) * keep
    y = F.layer_norm(y, (c,), block.norm.weight, block.norm.bias, 1e-6)
    y = F.gelu(y @ block.pwconv1.weight.T + block.pwconv1.bias)
    # GRN, written out: L2 over visible positions per (sample, channel), divided by the channel mean
    hidden = y.shape[-1]
    gx = torch.zeros(b, 1, 1, hidden, dtype=x.dtype)
    for i in range(b):
        gx[i, 0, 0] = ((y[i] * keep[i]) ** 2).sum(dim=(0, 1)).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    y = block.grn.gamma * (y * nx) + block.grn.beta + y
    y = y @ block.pwconv2.weight.T + block.pwconv2.bias
    return (inputs + y.permute(0, 3, 1, 2)) * keep.permute(0, 3, 1, 2)


def _mask(b=2, h=9, w=10, p=0.4, seed=0):
    mask = torch.rand(b, h, w, generator=torch.Generator().manual_seed(seed)) < p
    mask[0, 0, 0], mask[0, 0, 1] = True, False
    return mask


def test_shape_and_grad_smoke():
    block = ConvNeXtV2Block(8)
    x = torch.randn(2, 8, 9, 10, requires_grad=True)
    y = block(x, _mask())
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert block.pwconv2.weight.grad.abs().sum() > 0


def test_identity_at_init_with_and_without_mask():
    block = ConvNeXtV2Block(8)
    x = torch.randn(2, 8, 9, 10)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    mask = _mask()
    torch.testing.assert_close(block(x, mask), x.masked_fill(mask[:, None], 0), rtol=0, atol=0)
    official = ConvNeXtV2Block(8, zero_init_last=False)
    assert not torch.allclose(official(x), x)


def test_every_parameter_gets_gradient_after_one_step():
    block = ConvNeXtV2Block(6, kernel_size=3)
    x, target = torch.randn(2, 6, 7, 7), torch.randn(2, 6, 7, 7)
    mask = _mask(2, 7, 7)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    F.mse_loss(block(x, mask), target).backward()
    # at init only pwconv2 can move: everything else feeds the branch through W2 = 0
    assert block.pwconv2.weight.grad.abs().sum() > 0
    assert block.pwconv1.weight.grad.abs().sum() == 0
    opt.step()
    opt.zero_grad()
    F.mse_loss(block(x, mask), target).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("masked", [False, True])
def test_matches_official_math_reference(masked):
    block = _randomise_(ConvNeXtV2Block(6, kernel_size=5, mlp_ratio=2.0)).double()
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    mask = _mask() if masked else None
    y = block(x, mask)
    torch.testing.assert_close(y, reference(block, x, mask))
    assert not torch.allclose(y, x)
    block32 = block.float()
    torch.testing.assert_close(block32(x.float(), mask), reference(block32, x.float(), mask), rtol=1e-4, atol=1e-4)


def test_masked_values_never_reach_visible_outputs_through_a_stack():
    blocks = torch.nn.Sequential(*[_randomise_(ConvNeXtV2Block(4, kernel_size=3)) for _ in range(3)])
    mask = _mask(2, 8, 8, p=0.5)

    def run(x):
        for blk in blocks:
            x = blk(x, mask)
        return x

    x = torch.randn(2, 4, 8, 8)
    perturbed = torch.where(mask[:, None], torch.randn_like(x) * 100, x)
    perturbed[0, :, 0, 0] = float("nan")  # even NaN at a masked position stays there
    y, y2 = run(x), run(perturbed)
    assert torch.equal(y, y2)  # bitwise
    assert (y.masked_select(mask[:, None]) == 0).all()
    # d(visible outputs) / d(masked inputs) == 0, and visible inputs do matter
    x = x.requires_grad_()
    out = run(x)
    (out * ~mask[:, None]).sum().backward()
    assert (x.grad.masked_select(mask[:, None]) == 0).all()
    assert x.grad.masked_select(~mask[:, None]).abs().sum() > 0


def test_leaky_seed_style_masking_would_fail_the_perturbation_test():
    # the property above is not trivial: masking only after the conv leaks from the second block on
    blocks = [_randomise_(ConvNeXtV2Block(4, kernel_size=3)) for _ in range(2)]
    mask = _mask(1, 8, 8, p=0.5)
    m = mask[:, None].float()

    def seed_style(x):
        for blk in blocks:
            y = blk.dwconv(x) * (1 - m)
            y = blk.pwconv2(blk.grn(blk.act(blk.pwconv1(blk.norm(y).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
            x = x * (1 - m) + y
        return x

    x = torch.randn(1, 4, 8, 8)
    perturbed = torch.where(mask[:, None], torch.randn_like(x), x)
    assert not torch.allclose(seed_style(x) * (1 - m), seed_style(perturbed) * (1 - m))


def test_masked_half_equals_zero_padded_crop():
    # sparse-conv equivalence: masking the right half computes the left half as if it were cropped
    block = _randomise_(ConvNeXtV2Block(5, kernel_size=7)).double()
    x = torch.randn(2, 5, 8, 12, dtype=torch.float64)
    mask = torch.zeros(2, 8, 12, dtype=torch.bool)
    mask[..., 5:] = True
    torch.testing.assert_close(block(x, mask)[..., :5], block(x[..., :5]))


def test_mask_forms_agree_and_empty_or_full_masks():
    block = _randomise_(ConvNeXtV2Block(4))
    x, mask = torch.randn(2, 4, 9, 10), _mask()
    assert torch.equal(block(x, mask), block(x, mask[:, None]))
    torch.testing.assert_close(block(x, torch.zeros_like(mask)), block(x), rtol=0, atol=0)
    assert (block(x, torch.ones_like(mask)) == 0).all()


def test_channels_last_input_matches_contiguous():
    block = _randomise_(ConvNeXtV2Block(8))
    x, mask = torch.randn(2, 8, 9, 10), _mask()
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(block(xc, mask), block(x, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(xc), block(x), rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_samples_in_training_only():
    block = _randomise_(ConvNeXtV2Block(4, drop_path=1.0))
    x, mask = torch.randn(2, 4, 6, 6), _mask(2, 6, 6)
    assert not torch.allclose(block.eval()(x), x)
    torch.testing.assert_close(block.train()(x, mask), x.masked_fill(mask[:, None], 0), rtol=0, atol=0)


def test_bf16_autocast_close_to_fp32_and_masked_zeros():
    block = _randomise_(ConvNeXtV2Block(8))
    x, mask = torch.randn(2, 8, 9, 10), _mask()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x, mask)
    assert torch.isfinite(y).all()
    assert (y.masked_select(mask[:, None]) == 0).all()
    ref = block(x, mask)
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize(("shape", "match"), [((2, 7, 9, 10), r"x: expected \(B, 8, H, W\), got \(2, 7, 9, 10\)"),
                                               ((8, 9, 10), r"x: expected \(B, 8, H, W\), got \(8, 9, 10\)")])
def test_rejects_bad_x(shape, match):
    with pytest.raises(ValueError, match=match):
        ConvNeXtV2Block(8)(torch.randn(*shape))


def test_rejects_bad_mask_and_bad_config():
    block, x = ConvNeXtV2Block(8), torch.randn(2, 8, 9, 10)
    with pytest.raises(ValueError, match=r"mask: expected \(2, 9, 10\) or \(2, 1, 9, 10\), got \(2, 9, 9\)"):
        block(x, torch.zeros(2, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: expected .* got \(2, 2, 9, 10\)"):
        block(x, torch.zeros(2, 2, 9, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        block(x, torch.zeros(2, 9, 10))
    with pytest.raises(ValueError, match="kernel_size"):
        ConvNeXtV2Block(8, kernel_size=4)
    with pytest.raises(ValueError, match="dim"):
        ConvNeXtV2Block(0)


def test_official_parameter_names():
    names = {n for n, _ in ConvNeXtV2Block(4).named_parameters()}
    assert names == {"dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight", "pwconv1.bias",
                     "grn.gamma", "grn.beta", "pwconv2.weight", "pwconv2.bias"}


def test_compile_fullgraph_aot_eager_with_mask():
    block = _randomise_(ConvNeXtV2Block(8)).eval()
    x, mask = torch.randn(2, 8, 9, 10), _mask()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), block(x, mask))
