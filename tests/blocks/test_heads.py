import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import MLP, ConvHead, SideHead


def structure(head):
    return [(type(m).__name__, getattr(m, "kernel_size", None), getattr(m, "out_channels", None))
            for m in [*head.body, head.out]]


@pytest.mark.parametrize(("depth", "expected"), [
    (3, [("Conv2d", (3, 3), 48), ("GroupNorm", None, None), ("LeakyReLU", None, None),
         ("Conv2d", (3, 3), 24), ("GroupNorm", None, None), ("LeakyReLU", None, None),
         ("Conv2d", (1, 1), 4)]),
    (2, [("Conv2d", (3, 3), 48), ("GroupNorm", None, None), ("LeakyReLU", None, None),
         ("Conv2d", (1, 1), 4)]),
    (1, [("Conv2d", (1, 1), 4)]),
])
def test_conv_head_layer_structure_and_shape(depth, expected):
    head = ConvHead(48, 4, depth=depth)
    assert structure(head) == expected
    x = torch.randn(2, 48, 9, 7, requires_grad=True)
    y = head(x)
    assert y.shape == (2, 4, 9, 7)
    y.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_conv_head_parameter_counts_match_the_seed_heads():
    # seed_fusion.md §3: position head 48->48->24->4 has 31,348 parameters, action head 48->48->12
    # has 21,420 (3x3 convs without bias, GN(8), 1x1 conv with bias).
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(ConvHead(48, 4, depth=3)) == 31_348
    assert count(ConvHead(48, 12, depth=2)) == 21_420
    assert [m.num_groups for m in ConvHead(48, 4).body if isinstance(m, nn.GroupNorm)] == [8, 8]


def test_conv_head_matches_functional_reference():
    head = ConvHead(12, 3, hidden=(10, 6), depth=3)
    for m in head.body:
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    x = torch.randn(2, 12, 5, 6)
    c1, n1, _, c2, n2, _ = head.body
    assert (n1.num_groups, n2.num_groups) == (5, 6)  # group_norm: largest divisor <= 8
    h = F.leaky_relu(F.group_norm(F.conv2d(x, c1.weight, padding=1), 5, n1.weight, n1.bias), 0.01)
    h = F.leaky_relu(F.group_norm(F.conv2d(h, c2.weight, padding=1), 6, n2.weight, n2.bias), 0.01)
    expected = F.conv2d(h, head.out.weight, head.out.bias)
    torch.testing.assert_close(head(x), expected)


def test_conv_head_hidden_int_and_custom_layers():
    head = ConvHead(20, 2, hidden=16, depth=3, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d)
    assert [type(m).__name__ for m in head.body] == ["Conv2d", "BatchNorm2d", "GELU"] * 2
    assert [m.out_channels for m in head.body if isinstance(m, nn.Conv2d)] == [16, 16]
    assert ConvHead(20, 2).widths == [20, 10]  # default: in_channels, then halved


@pytest.mark.parametrize(("call", "match"), [
    (lambda: ConvHead(8, 2)(torch.randn(2, 6, 4, 4)), r"x: expected \(B, 8, H, W\), got \(2, 6, 4, 4\)"),
    (lambda: ConvHead(8, 2)(torch.randn(8, 4, 4)), r"x: expected \(B, 8, H, W\), got \(8, 4, 4\)"),
    (lambda: ConvHead(8, 2, hidden=(8, 8, 8), depth=3), r"hidden: expected 2 widths, got 3"),
    (lambda: ConvHead(8, 2, depth=0), r"depth: expected >= 1, got 0"),
    (lambda: MLP(10)(torch.randn(4, 9)), r"x: expected \(\.\.\., 10\), got \(4, 9\)"),
    (lambda: MLP(10, dropout=1.0), r"dropout"),
])
def test_heads_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mlp_shape_and_reference():
    mlp = MLP(10, hidden=(7, 5), out_dim=3)
    x = torch.randn(2, 4, 10)
    y = mlp(x)
    assert y.shape == (2, 4, 3)
    l1, _, l2, _ = mlp.body
    h = F.gelu(F.gelu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)
    torch.testing.assert_close(y, h @ mlp.out.weight.T + mlp.out.bias)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [7, 5, 3]
    assert MLP(10).widths == [512, 256, 128] and MLP(10)(torch.randn(3, 10)).shape == (3, 1)
    assert MLP(10, hidden=())(torch.randn(3, 10)).shape == (3, 1)


def test_mlp_norm_layer_follows_each_hidden_linear():
    mlp = MLP(6, hidden=(8, 4), norm_layer=nn.LayerNorm, act_layer=nn.ReLU)
    assert [type(m).__name__ for m in mlp.body] == ["Linear", "LayerNorm", "ReLU"] * 2


def test_mlp_dropout_active_in_train_only():
    mlp = MLP(16, hidden=(64,), out_dim=4, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in mlp.modules()) == 1
    assert not any(isinstance(m, nn.Dropout) for m in MLP(16, hidden=(64,)).modules())
    x = torch.randn(8, 16)
    mlp.train()
    assert not torch.allclose(mlp(x), mlp(x))
    hidden = mlp.body[:2](x)
    dropped = mlp.body(x)
    assert torch.all((dropped == 0) | torch.isclose(dropped, 2 * hidden))  # rescaled by 1/(1-p)
    assert (dropped == 0).float().mean() > 0.3
    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp.out(mlp.body[:2](x)))


def test_heads_bf16_autocast():
    head, mlp = ConvHead(16, 3), MLP(16, hidden=(32,), out_dim=2)
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, z = head(x), mlp(x.mean((2, 3)))
    assert y.dtype == z.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), head(x), atol=0.05, rtol=0.05)
    torch.testing.assert_close(z.float(), mlp(x.mean((2, 3))), atol=0.05, rtol=0.05)


def test_side_head_shape_grad_and_reference():
    head = SideHead(10, side_dim=3, out_dim=2, side_hidden=5, hidden=(7,))
    f, side = torch.randn(4, 10, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    y = head(f, side)
    assert y.shape == (4, 2)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert side.grad.abs().sum() > 0 and f.grad.abs().sum() > 0
    # independent reference: y = W_o ReLU(W_1 [f, ReLU(W_s side + b_s)] + b_1) + b_o
    (ls, _), (l1, _), lo = head.side, head.mlp.body, head.mlp.out
    s = F.relu(side @ ls.weight.T + ls.bias)
    h = F.relu(torch.cat([f, s], 1) @ l1.weight.T + l1.bias)
    torch.testing.assert_close(y, h @ lo.weight.T + lo.bias)
    assert [m.out_features for m in head.modules() if isinstance(m, nn.Linear)] == [5, 7, 2]


def test_side_head_uses_side():
    head = SideHead(6, side_dim=2, hidden=(8,)).eval()
    f, side = torch.randn(5, 6), torch.randn(5, 2)
    y = head(f, side)
    assert not torch.allclose(y, head(f, side + 1.0))
    # each row depends on its own side vector only
    other = side.clone()
    other[0] += 1.0
    y2 = head(f, other)
    assert not torch.allclose(y[0], y2[0]) and torch.equal(y[1:], y2[1:])
    assert head(f, side.double()).dtype == torch.float32  # side is cast to the features' dtype


def test_side_head_without_side_is_the_mlp():
    head = SideHead(6, out_dim=3, hidden=(4,))
    assert head.side is None and head.mlp.in_dim == 6
    f = torch.randn(2, 6)
    torch.testing.assert_close(head(f), head.mlp(f))
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in head.mlp.parameters())


def test_side_head_norm_layer_on_joined_features():
    head = SideHead(6, side_dim=2, side_hidden=3, hidden=(), norm_layer=nn.LayerNorm)
    nn.init.normal_(head.norm.weight)
    nn.init.normal_(head.norm.bias)
    assert head.norm.normalized_shape == (9,)
    f, side = torch.randn(4, 6), torch.randn(4, 2)
    joined = torch.cat([f, F.relu(F.linear(side, head.side[0].weight, head.side[0].bias))], 1)
    expected = F.linear(F.layer_norm(joined, (9,), head.norm.weight, head.norm.bias), head.mlp.out.weight,
                        head.mlp.out.bias)
    torch.testing.assert_close(head(f, side), expected)
    assert isinstance(SideHead(6).norm, nn.Identity)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: SideHead(6, side_dim=2)(torch.randn(3, 6)), r"side: expected \(3, 2\), got None"),
    (lambda: SideHead(6, side_dim=2)(torch.randn(3, 6), torch.randn(3, 3)), r"side: expected \(3, 2\), got \(3, 3\)"),
    (lambda: SideHead(6, side_dim=2)(torch.randn(3, 6), torch.randn(2, 2)), r"side: expected \(3, 2\), got \(2, 2\)"),
    (lambda: SideHead(6)(torch.randn(3, 6), torch.randn(3, 2)),
     r"side: this model was built with side_dim=0, got \(3, 2\)"),
    (lambda: SideHead(6, side_dim=2)(torch.randn(3, 5), torch.randn(3, 2)),
     r"features: expected \(B, 6\), got \(3, 5\)"),
    (lambda: SideHead(6)(torch.randn(2, 3, 6)), r"features: expected \(B, 6\), got \(2, 3, 6\)"),
    (lambda: SideHead(6, side_dim=-1), r"side_dim"),
])
def test_side_head_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_side_head_bf16_autocast():
    head = SideHead(8, side_dim=3, out_dim=2, hidden=(16,))
    f, side = torch.randn(4, 8), torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(f, side)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), head(f, side), atol=0.05, rtol=0.05)
