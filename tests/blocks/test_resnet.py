import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import BasicBlock, ResNet2d, resnet18


def count(m):
    return sum(p.numel() for p in m.parameters())


def randomise_norms(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g)
            m.running_mean = torch.randn(m.running_mean.shape, generator=g) * 0.1
            m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model


def torchvision_resnet18_keys():
    """torchvision resnet18 state_dict keys and shapes, written out from the architecture."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    keys = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys[f"{p}.conv1.weight"] = (c, cin if block == 0 else c, 3, 3)
            keys.update(bn(f"{p}.bn1", c))
            keys[f"{p}.conv2.weight"] = (c, c, 3, 3)
            keys.update(bn(f"{p}.bn2", c))
            if block == 0 and stage > 1:
                keys[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                keys.update(bn(f"{p}.downsample.1", c))
        cin = c
    keys["fc.weight"], keys["fc.bias"] = (1000, 512), (1000,)
    return keys


# ---- BasicBlock ---------------------------------------------------------------------------
@pytest.mark.parametrize(("cin", "cout", "stride"), [(8, 8, 1), (8, 16, 2), (8, 16, 1)])
def test_basic_block_matches_functional_reference(cin, cout, stride):
    block = randomise_norms(BasicBlock(cin, cout, stride)).eval()
    x = torch.randn(2, cin, 7, 6)

    def bn(h, m):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
    h = bn(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    skip = x if (cin, stride) == (cout, 1) else bn(F.conv2d(x, block.downsample[0].weight, stride=stride),
                                                   block.downsample[1])
    assert (block.downsample is None) == ((cin, stride) == (cout, 1))
    torch.testing.assert_close(block(x), F.relu(h + skip))
    assert block(x).shape == (2, cout, -(-7 // stride), -(-6 // stride))


# ---- ResNet2d -----------------------------------------------------------------------------
def test_resnet2d_shape_grad_and_seed_parameter_count():
    model = ResNet2d(side_dim=3)  # System A's best: 64 channels, 5 blocks, side Linear(3, 64), head 256
    x, side = torch.randn(4, 1, 6, 6, requires_grad=True), torch.randn(4, 3)
    y = model(x, side)
    assert y.shape == (4, 1)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    # seed research A5 (~0.98M for C=64, 5 blocks with a flattened 6x6 map); our convs are bias-free
    seed = ResNet2d(side_dim=3, pool_size=6)
    expected = (1 * 64 * 9 + 2 * 64) + 5 * (2 * 64 * 64 * 9 + 4 * 64) + (3 * 64 + 64) + \
        (64 * 36 + 64) * 256 + 256 + 256 + 1
    assert count(seed) == expected == 977_601
    assert count(ResNet2d(side_dim=3, base_channels=32, num_blocks=3, out_dim=2)) == \
        (9 * 32 + 64) + 3 * (2 * 32 * 32 * 9 + 4 * 32) + (3 * 64 + 64) + (32 + 64) * 256 + 256 + 257 * 2


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (3, 5), (6, 6), (9, 4)])
def test_resnet2d_any_size(size):
    model = ResNet2d(base_channels=8, num_blocks=2, side_dim=2, out_dim=3)
    y = model(torch.randn(2, 1, *size), torch.randn(2, 2))
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    assert ResNet2d(base_channels=8, num_blocks=1, pool_size=6).eval()(torch.randn(1, 1, *size)).shape == (1, 1)


def test_resnet2d_pool6_is_the_seeds_flatten_and_side_is_used():
    model = randomise_norms(ResNet2d(base_channels=8, num_blocks=2, side_dim=3, pool_size=6)).eval()
    x, side = torch.randn(3, 1, 6, 6), torch.randn(3, 3)
    feat = model.blocks(model.stem(x)).flatten(1)  # the seed: flatten the whole 6x6 map
    p = F.relu(F.linear(side, model.head.side[0].weight, model.head.side[0].bias))
    torch.testing.assert_close(model(x, side), model.head.mlp(torch.cat([feat, p], 1)))
    assert not torch.allclose(model(x, side), model(x, side + 1.0))


def test_resnet2d_zero_init_residual_blocks_are_identity():
    model = ResNet2d(base_channels=8, num_blocks=3, zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 for b in model.blocks)
    x = torch.randn(2, 1, 5, 4)
    stem = model.stem(x)
    torch.testing.assert_close(model.blocks(stem), stem)  # ReLU(stem) = stem: post-ReLU inputs
    assert ResNet2d(base_channels=8, num_blocks=1).blocks[0].bn2.weight.abs().sum() > 0


SIDE = torch.randn(2, 3)
XMSG = r"x: expected \(B, 1, H >= 1, W >= 1\), got "


@pytest.mark.parametrize(("call", "match"), [
    (lambda: ResNet2d(side_dim=3)(torch.randn(2, 2, 6, 6), SIDE), XMSG + r"\(2, 2, 6, 6\)"),
    (lambda: ResNet2d(side_dim=3)(torch.randn(2, 6, 6), SIDE), XMSG + r"\(2, 6, 6\)"),
    (lambda: ResNet2d(side_dim=3)(torch.randn(2, 1, 0, 6), SIDE), XMSG + r"\(2, 1, 0, 6\)"),
    (lambda: ResNet2d(side_dim=3)(torch.randn(2, 1, 6, 6), SIDE[:, :2]), r"side: expected \(2, 3\), got \(2, 2\)"),
    (lambda: ResNet2d(side_dim=3)(torch.randn(2, 1, 6, 6)), r"side: expected \(2, 3\), got None"),
    (lambda: ResNet2d()(torch.randn(2, 1, 6, 6), SIDE), r"side: this model was built with side_dim=0"),
    (lambda: BasicBlock(8, 8)(torch.randn(2, 4, 5, 5)), r"x: expected \(B, 8, H, W\), got \(2, 4, 5, 5\)"),
])
def test_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- resnet18 -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rn18():
    return resnet18()  # built once: 11M parameters take a while to initialise


def test_resnet18_parameter_count_and_torchvision_names(rn18):
    assert count(rn18) == 11_176_512  # torchvision 11,689,512 minus fc (512 * 1000 + 1000)
    expected = torchvision_resnet18_keys()
    got = {k: tuple(v.shape) for k, v in rn18.state_dict().items()}
    assert got == {k: v for k, v in expected.items() if not k.startswith("fc.")}
    classifier = resnet18(num_features=1000)
    assert count(classifier) == 11_689_512
    assert {k: tuple(v.shape) for k, v in classifier.state_dict().items()} == expected
    # a torchvision-layout state_dict loads strictly, and the weights are the ones used
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) if s else torch.tensor(0)) for k, s in expected.items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    classifier.load_state_dict(state, strict=True)
    torch.testing.assert_close(classifier.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    x = torch.randn(1, 3, 16, 16)
    classifier.eval()
    h = classifier.maxpool(classifier.relu(classifier.bn1(classifier.conv1(x))))
    for i in range(1, 5):
        h = classifier.get_submodule(f"layer{i}")(h)
    expected_logits = F.linear(h.mean(dim=(2, 3)), state["fc.weight"], state["fc.bias"])
    torch.testing.assert_close(classifier(x), expected_logits)


def test_resnet18_forward_shape_grad_and_stem_layout(rn18):
    model = resnet18(in_channels=4)
    x = torch.randn(2, 4, 16, 12, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 512)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    conv, pool = model.conv1, model.maxpool
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((7, 7), (2, 2), (3, 3), None)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert [model.get_submodule(f"layer{i}")[0].conv1.stride for i in range(1, 5)] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert isinstance(rn18.fc, nn.Identity)
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, H, W\), got \(2, 4, 32, 32\)"):
        rn18(torch.randn(2, 4, 32, 32))
    with torch.no_grad():
        assert rn18.eval()(torch.randn(1, 3, 1, 1)).shape == (1, 512)  # the stem rounds up: any size
    rn18.train()


def test_resnet18_init_and_zero_init_residual(rn18):
    w = rn18.layer4[1].conv2.weight
    # torchvision: kaiming_normal_(fan_out, relu): std = sqrt(2 / (512 * 9))
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)
    blocks = [b for b in rn18.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 8 and all(b.bn2.weight.min() == 1 for b in blocks)
    zeroed = resnet18(zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 and b.bn1.weight.min() == 1
               for b in zeroed.modules() if isinstance(b, BasicBlock))


def test_bf16_autocast(rn18):
    torch.manual_seed(0)
    small = randomise_norms(ResNet2d(base_channels=16, num_blocks=2, side_dim=3))
    for model, args in [(small, (torch.randn(2, 1, 6, 6), torch.randn(2, 3))), (rn18, (torch.randn(2, 3, 16, 16),))]:
        model.eval()
        with torch.no_grad():
            ref = model(*args)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(*args)
        model.train()
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        # bf16 keeps 8 significant bits (unit roundoff u = 2**-8); every conv rounds its input,
        # weights and output, and ~20 of them in a row add up like a random walk: measured 1.6 u
        # (relative norm) and 2.1 u (max, relative to the peak) for ResNet-18. 4 u = 2**-6 leaves a
        # margin of 2 and still fails any wrong op (a missing norm, residual or activation is O(1)).
        err = y.float() - ref
        assert err.norm() <= 2**-6 * ref.norm()
        torch.testing.assert_close(y.float(), ref, rtol=0, atol=2**-6 * ref.abs().max().item())


def test_resnet2d_compiles():
    model = ResNet2d(base_channels=8, num_blocks=1, side_dim=3).eval()
    x, side = torch.randn(2, 1, 5, 6), torch.randn(2, 3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, side), model(x, side))
