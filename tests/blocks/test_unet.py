import pytest
import torch
import torch.nn.functional as F

from blockyard.blocks import DecoderLevel, EncoderLevel, ResBlock, UNet


def perturb_(module, std=0.3):
    """Give every parameter of ``module`` random values (zero-init gates become active)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def ref_norm(norm, x):  # GroupNorm written out: statistics per (sample, group), then per-channel affine
    b = x.shape[0]
    g = x.reshape(b, norm.num_groups, -1)
    xn = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return xn.reshape(x.shape) * norm.weight[:, None, None] + norm.bias[:, None, None]


def ref_film(film, h, cond):
    gamma, beta = (cond @ film.proj.weight.T + film.proj.bias).chunk(2, dim=-1)
    return h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


def ref_resblock(blk, x, cond=None):
    h = ref_norm(blk.norm1, F.conv2d(x, blk.conv1.weight, padding=1))
    h = F.silu(ref_film(blk.film, h, cond) if cond is not None else h)
    h = ref_norm(blk.norm2, F.conv2d(h, blk.conv2.weight, padding=1))
    skip = x if blk.in_channels == blk.out_channels else F.conv2d(x, blk.skip.weight)
    return F.silu(skip + h)


def ref_tail(level, h, cond, context):
    inner = cond if level.block.film is not None else None
    for block in (level.block, *level.more_blocks):
        h = ref_resblock(block, h, inner)
    if level.film is not None:
        h = ref_film(level.film, h, cond)
    if level.cross_attn is not None:  # softmax attention by hand, heads split along channels
        xa, b, c, hh, ww = level.cross_attn, *h.shape
        t = F.layer_norm(h.flatten(2).transpose(1, 2), (c,), xa.norm.weight, xa.norm.bias, xa.norm.eps)
        q = t @ xa.attn.q.weight.T
        k, v = (context @ xa.attn.kv.weight.T).chunk(2, dim=-1)
        n = xa.attn.heads
        q, k, v = (z.reshape(b, z.shape[1], n, c // n).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / (c // n) ** 0.5, dim=-1)
        o = (w @ v).transpose(1, 2).reshape(b, hh * ww, c) @ xa.attn.proj.weight.T + xa.attn.proj.bias
        h = h + o.transpose(1, 2).reshape(b, c, hh, ww)
    return h


def small(**kw):
    return UNet(3, 2, widths=(8, 16, 16), **kw)


@pytest.mark.parametrize("widths, size", [((8,), (17, 23)), ((8, 16, 16, 32), (17, 23)),
                                          ((12, 20), (5, 7)), ((8, 16, 16, 32), (1, 1))])
def test_output_has_input_spatial_size(widths, size):
    model = UNet(3, 5, widths=widths)
    assert model(torch.randn(2, 3, *size)).shape == (2, 5, *size)
    assert model.features(torch.randn(2, 3, *size)).shape == (2, widths[0], *size)
    assert UNet(3, None, widths=widths)(torch.randn(2, 3, *size)).shape == (2, widths[0], *size)


def test_odd_size_is_the_zero_padded_output_cropped():
    model = perturb_(small(cond_dim=4), std=0.2)
    x, cond = torch.randn(2, 3, 17, 23), torch.randn(2, 4)
    padded = F.pad(x, (0, 1, 0, 3))  # to a multiple of 2**(3-1) = 4: 20 x 24
    torch.testing.assert_close(model(x, cond), model(padded, cond)[..., :17, :23])


def test_widths_without_a_divisor_of_8_get_safe_groups():
    model = UNet(3, 2, widths=(12, 20))
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {12: 6, 20: 5}
    model(torch.randn(1, 3, 6, 6)).sum().backward()


def test_gradients_flow_to_input_and_are_finite():
    model = small(cond_dim=4, context_dim=6, attention=True)
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    model(x, torch.randn(2, 4), torch.randn(2, 5, 6)).square().mean().backward()
    assert x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # zero-init gates still learn: their own gradient is nonzero
    assert model.encoders[0].film.proj.weight.grad.abs().sum() > 0
    assert model.encoders[-1].cross_attn.attn.proj.weight.grad.abs().sum() > 0
    assert model.mid_attn.attn.proj.weight.grad.abs().sum() > 0


def same_weights_without(model, **kw):
    """The same U-Net built without the optional parts, sharing every other weight."""
    plain = small(**kw)
    missing, _ = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return plain


def test_film_is_identity_at_init_then_conditions_the_output():
    model = small(cond_dim=4)
    plain = same_weights_without(model)
    x, c1, c2 = torch.randn(2, 3, 8, 8), torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(model(x, c1), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x, c2), plain(x), rtol=0, atol=0)
    for film in (m for m in model.modules() if type(m).__name__ == "FiLM"):
        perturb_(film, std=0.1)
    assert (model(x, c1) - model(x, c2)).abs().max() > 1e-3


def test_cross_attention_is_identity_at_init_then_reads_the_context():
    model = small(context_dim=6)
    plain = same_weights_without(model)
    x, k1, k2 = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 6), torch.randn(2, 3, 6)
    torch.testing.assert_close(model(x, context=k1), plain(x), rtol=0, atol=0)
    xattn = [m for m in model.modules() if type(m).__name__ == "_MapCrossAttention"]
    assert len(xattn) == 3  # encoders 1, 2 and decoder 1: the 2 lowest resolutions, not the finest
    assert all(m.cross_attn is None for m in (model.encoders[0], model.decoders[-1]))
    for m in xattn:
        perturb_(m.attn.proj, std=0.2)
    assert (model(x, context=k1) - model(x, context=k2)).abs().max() > 1e-3


def test_context_mask_equals_dropping_the_masked_tokens():
    model = perturb_(small(context_dim=6), std=0.2)
    x, ctx = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 6)
    mask = torch.tensor([[False, False, True, False, True]] * 2)
    torch.testing.assert_close(model(x, context=ctx, context_mask=mask), model(x, context=ctx[:, [0, 1, 3]]))


def test_bottleneck_attention_is_identity_at_init_then_mixes_positions():
    model = small(attention=True)
    plain = same_weights_without(model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    perturb_(model.mid_attn.attn.proj, std=0.2)
    assert (model(x) - plain(x)).abs().max() > 1e-3


def test_resblock_matches_reference():
    for cin, cout in ((8, 8), (6, 12)):
        blk = perturb_(ResBlock(cin, cout), std=0.2)
        x = torch.randn(2, cin, 7, 5)
        torch.testing.assert_close(blk(x), ref_resblock(blk, x))


def test_encoder_level_matches_explicit_composition():
    level = perturb_(EncoderLevel(6, 12, downsample=True, cond_dim=4, context_dim=10, heads=3), std=0.2)
    x, cond, ctx = torch.randn(2, 6, 10, 8), torch.randn(2, 4), torch.randn(2, 7, 10)
    h = F.max_pool2d(x, 2)
    stem_conv, stem_norm = level.stem[0], level.stem[1]
    h = F.silu(ref_norm(stem_norm, F.conv2d(h, stem_conv.weight)))
    torch.testing.assert_close(level(x, cond, ctx), ref_tail(level, h, cond, ctx))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_decoder_level_matches_conv_of_concatenation(mode):
    level = perturb_(DecoderLevel(16, 8, 12, cond_dim=4, upsample_mode=mode), std=0.2)
    x, skip, cond = torch.randn(2, 16, 5, 4), torch.randn(2, 8, 10, 8), torch.randn(2, 4)
    up = F.interpolate(x, scale_factor=2, mode=mode, align_corners=True if mode == "bilinear" else None)
    weight = torch.cat([level.proj_x.weight, level.proj_skip.weight], dim=1)  # the FusionNet 1x1 on cat
    h = F.silu(ref_norm(level.norm, F.conv2d(torch.cat([up, skip], dim=1), weight)))
    torch.testing.assert_close(level(x, skip, cond), ref_tail(level, h, cond, None))


def test_unet_equals_its_levels_wired_by_hand():
    model = perturb_(small(cond_dim=4, attention=True), std=0.15)
    x, cond = torch.randn(2, 3, 8, 12), torch.randn(2, 4)
    e0 = model.encoders[0](x, cond)
    e1 = model.encoders[1](e0, cond)
    e2 = model.encoders[2](e1, cond)
    d1 = model.decoders[0](model.mid_attn(model.mid(e2)), e1, cond)
    d0 = model.decoders[1](d1, e0, cond)
    torch.testing.assert_close(model(x, cond), F.conv2d(d0, model.head.weight, model.head.bias))
    torch.testing.assert_close(model.features(x, cond), d0)


def test_rejects_bad_input():
    model = small(cond_dim=4, context_dim=6)
    x, cond, ctx = torch.randn(2, 3, 8, 8), torch.randn(2, 4), torch.randn(2, 5, 6)
    cases = [((torch.randn(3, 8, 8), cond, ctx), "x: expected"),
             ((torch.randn(2, 4, 8, 8), cond, ctx), r"x: expected \(B, 3, H, W\), got \(2, 4, 8, 8\)"),
             ((x, None, ctx), "cond: expected"),
             ((x, torch.randn(2, 5), ctx), r"cond: expected \(2, 4\), got \(2, 5\)"),
             ((x, torch.randn(3, 4), ctx), "cond: expected"),
             ((x, cond, None), "context: expected"),
             ((x, cond, torch.randn(2, 5, 7)), r"context: expected \(2, L, 6\), got \(2, 5, 7\)"),
             ((x, cond, torch.randn(2, 6)), "context: expected")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model(*args)
    with pytest.raises(ValueError, match=r"cond: .*cond_dim=None"):
        small()(x, cond)
    with pytest.raises(ValueError, match=r"context: .*context_dim=None"):
        small()(x, context=ctx)
    with pytest.raises(ValueError, match="widths"):
        UNet(3, 2, widths=())
    with pytest.raises(ValueError, match="heads"):
        UNet(3, 2, widths=(8, 10), attention=True, heads=4)
    with pytest.raises(ValueError, match="skip: expected"):
        DecoderLevel(8, 4, 4)(torch.randn(1, 8, 3, 3), torch.randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match="x: expected even"):
        EncoderLevel(3, 4)(torch.randn(1, 3, 5, 6))


def test_bf16_autocast_and_channels_last_agree_with_float32():
    model = perturb_(small(cond_dim=4, context_dim=6, attention=True), std=0.1)
    for p in model.parameters():  # keep the perturbed net's activations at unit scale
        p.data.mul_(3.0 / max(1.0, p[0].numel() ** 0.5))
    x, cond, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 4), torch.randn(2, 5, 6)
    ref = model(x, cond, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, cond, ctx)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    feats = model_cl.features(x_cl, cond, ctx)
    assert feats.is_contiguous(memory_format=torch.channels_last)  # no silent fall-back to NCHW
    torch.testing.assert_close(model_cl(x_cl, cond, ctx), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # dynamo + AOTAutograd tracing of forward and backward: ~12 s CPU
def test_compiles_fullgraph_without_graph_breaks():
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward without the
    # inductor C++ build (the inductor numerics are checked by the slow test below).
    model = perturb_(UNet(3, 2, widths=(8, 16), cond_dim=4, context_dim=6, attention=True), std=0.1)
    x, cond, ctx = torch.randn(2, 3, 7, 9, requires_grad=True), torch.randn(2, 4), torch.randn(2, 3, 6)
    mask = torch.tensor([[False, True, False]] * 2)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, cond, ctx, mask)
    torch.testing.assert_close(out, model(x, cond, ctx, mask))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.slow  # inductor's C++ build of every kernel: ~15 s on 2 idle cores
def test_inductor_compile_matches_eager():
    model = perturb_(UNet(3, 2, widths=(4, 8), cond_dim=4), std=0.1)
    x, cond = torch.randn(2, 3, 7, 9), torch.randn(2, 4)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, cond), model(x, cond), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("time_conditioning, blocks", [("scale_shift", 1), ("film", 2), ("scale_shift", 3)])
def test_time_conditioning_and_blocks_per_level_options(time_conditioning, blocks):
    """Shapes; identity in cond at init; the exact wiring (levels by hand); cond moves the output
    after one optimizer step; the options reach every level and the bottleneck."""
    torch.manual_seed(0)
    model = small(cond_dim=4, context_dim=6, time_conditioning=time_conditioning, blocks_per_level=blocks)
    x, c1, c2, ctx = torch.randn(2, 3, 9, 7), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 1, 6)
    assert model(x, c1, ctx).shape == (2, 2, 9, 7)
    torch.testing.assert_close(model(x, c1, ctx), model(x, c2, ctx), rtol=0, atol=0)  # FiLMs start at zero
    inner = time_conditioning == "scale_shift"
    levels = [*model.encoders, *model.decoders]
    assert all(len(level.more_blocks) == blocks - 1 for level in levels)
    assert all((level.film is None) == inner and (level.block.film is not None) == inner for level in levels)
    assert (model.mid.film is not None) == inner
    perturb_(model, std=0.2)
    h = F.pad(x, (0, 1, 0, 3))
    skips = []
    for level in model.encoders:
        h = ref_tail(level, level.stem(level.pool(h)), c1, ctx if level.cross_attn is not None else None)
        skips.append(h)
    h = ref_resblock(model.mid, skips.pop(), c1 if inner else None)
    for level in model.decoders:
        up = F.interpolate(F.conv2d(h, level.proj_x.weight), scale_factor=2.0, mode="bilinear", align_corners=True)
        hd = F.silu(ref_norm(level.norm, up + F.conv2d(skips.pop(), level.proj_skip.weight)))
        h = ref_tail(level, hd, c1, ctx if level.cross_attn is not None else None)
    want = F.conv2d(h, model.head.weight, model.head.bias)[..., :9, :7]
    torch.testing.assert_close(model(x, c1, ctx), want, rtol=1e-4, atol=1e-5)


def test_scale_shift_timestep_changes_the_output_after_one_step():
    torch.manual_seed(0)
    model = small(cond_dim=4, time_conditioning="scale_shift")
    x, c1, c2 = torch.randn(4, 3, 8, 8), torch.randn(4, 4), torch.randn(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(x, c1) - torch.randn(4, 2, 8, 8)).square().mean().backward()
    assert all(f.proj.weight.grad.abs().sum() > 0 for f in (m for m in model.modules() if type(m).__name__ == "FiLM"))
    opt.step()
    assert (model(x, c1) - model(x, c2)).abs().max() > 1e-4


def test_new_options_reject_bad_values():
    with pytest.raises(ValueError, match="time_conditioning: expected one of"):
        small(cond_dim=4, time_conditioning="adagn")
    with pytest.raises(ValueError, match="blocks_per_level"):
        small(cond_dim=4, blocks_per_level=0)
    blk = ResBlock(8, cond_dim=4)
    with pytest.raises(ValueError, match="cond: expected a"):
        blk(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="cond: expected None"):
        ResBlock(8)(torch.randn(2, 8, 4, 4), torch.randn(2, 4))


def test_scale_shift_compiles_fullgraph():
    model = perturb_(UNet(3, 2, widths=(8, 16), cond_dim=4, time_conditioning="scale_shift", blocks_per_level=2),
                     std=0.1)
    x, cond = torch.randn(2, 3, 7, 9), torch.randn(2, 4)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, cond)
    torch.testing.assert_close(out, model(x, cond))


def test_transformer_context_block_is_identity_at_init_then_reads_the_context():
    from blockyard.blocks import TransformerBlock

    torch.manual_seed(0)
    model = small(cond_dim=4, context_dim=6, context_block="transformer")
    x, cond = torch.randn(2, 3, 8, 8), torch.randn(2, 4)
    ctx1, ctx2 = torch.randn(2, 1, 6), torch.randn(2, 1, 6)
    torch.testing.assert_close(model(x, cond, ctx1), model(x, cond, ctx2), rtol=0, atol=0)
    blocks = [level.cross_attn for level in (*model.encoders, *model.decoders) if level.cross_attn is not None]
    assert len(blocks) == 3 and all(isinstance(b.block, TransformerBlock) for b in blocks)
    perturb_(model, std=0.2)
    assert (model(x, cond, ctx1) - model(x, cond, ctx2)).abs().max() > 1e-3
    # the map is read as (B, H*W, C) tokens, row-major, and written back the same way
    level = model.encoders[-1]
    h = torch.randn(2, 16, 2, 2)
    tokens = h.permute(0, 2, 3, 1).reshape(2, 4, 16)
    want = level.cross_attn.block(tokens, ctx1).reshape(2, 2, 2, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(level.cross_attn(h, ctx1), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="context_block: expected one of"):
        small(context_dim=6, context_block="perceiver")


def test_stem_conv_is_one_biased_3x3_conv_and_projection_is_fusionnets():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 6)
    conv = perturb_(EncoderLevel(3, 8, downsample=False, stem="conv"))
    torch.testing.assert_close(conv.stem(x), F.conv2d(x, conv.stem[0].weight, conv.stem[0].bias, padding=1))
    proj = perturb_(EncoderLevel(3, 8, downsample=False))
    torch.testing.assert_close(proj.stem(x), F.silu(ref_norm(proj.stem[1], F.conv2d(x, proj.stem[0].weight))))
    assert small().encoders[0].stem[0].kernel_size == (3, 3)  # UNet's default reads the raw input by a 3x3 conv
    assert all(len(level.stem) == 3 for level in small().encoders[1:])  # deeper levels keep the projection


def test_projection_stem_cannot_see_each_samples_input_scale_and_conv_stem_can():
    """Why ``UNet`` defaults to ``stem="conv"``: a bias-free 1x1 projection followed by GroupNorm
    divides out each sample's scale, so a denoiser built on it cannot tell x from 3x."""
    torch.manual_seed(0)
    x, cond = torch.randn(2, 3, 8, 8), torch.randn(2, 4)
    scale = torch.tensor([3.0, 0.5])[:, None, None, None]
    proj = perturb_(small(cond_dim=4, stem="projection"), std=0.2)
    torch.testing.assert_close(proj(scale * x, cond), proj(x, cond), rtol=1e-3, atol=1e-3)
    conv = perturb_(small(cond_dim=4, stem="conv"), std=0.2)
    assert (conv(scale * x, cond) - conv(x, cond)).abs().amax() > 1e-2


def test_stem_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="stem: expected one of \\('projection', 'conv'\\), got 'norm'"):
        small(stem="norm")
    with pytest.raises(ValueError, match="stem: expected one of"):
        EncoderLevel(3, 8, stem="")
