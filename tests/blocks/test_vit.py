import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockyard.blocks import ViT2d, sincos_2d


def randomise_blocks(model):
    g = torch.Generator().manual_seed(0)
    for block in model.blocks:
        for layer in (block.attn.proj, block.mlp.out):
            layer.weight.data = torch.randn(layer.weight.shape, generator=g) * 0.2
    return model


def reference(model, x, side=None, positions=None):
    """The seed's recipe written out: Linear on flattened row-major patches, positions, blocks,
    mean pool, concat with ReLU(Linear(side)), LayerNorm, MLP head."""
    p = model.patch_size
    x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
    z = patches @ model.patch_embed.weight.reshape(model.dim, -1).T + model.patch_embed.bias
    if positions is None:
        z = z + sincos_2d(h // p, w // p, model.dim)
    else:
        z = z + model.pos_embed.weight[positions]
    for block in model.blocks:
        z = block(z)
    f = F.layer_norm(z, (model.dim,), model.norm.weight, model.norm.bias).mean(1)
    if side is not None:
        f = torch.cat([f, F.relu(F.linear(side, model.head.side[0].weight, model.head.side[0].bias))], 1)
    return model.head.mlp(F.layer_norm(f, (f.shape[1],), model.head.norm.weight, model.head.norm.bias))


def test_shape_grad_and_seed_configuration():
    # System A's ViT: patch 3, dim 128, 4 layers, 8 heads, ff 256, ReLU, learned positions for 6x6 inputs
    model = ViT2d(1, 3, 128, 4, 8, side_dim=3, img_size=6, mlp_ratio=2.0, act_layer=nn.ReLU)
    assert model.pos_embed.weight.shape == (4, 128)
    assert model.blocks[0].mlp.body[0].out_features == 256
    x, side = torch.randn(4, 1, 6, 6, requires_grad=True), torch.randn(4, 3)
    y = model(x, side)
    assert y.shape == (4, 1)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_matches_reference_learned_positions():
    model = randomise_blocks(ViT2d(2, 3, 16, 2, 4, side_dim=3, out_dim=2, img_size=6)).eval()
    x, side = torch.randn(3, 2, 6, 6), torch.randn(3, 3)
    torch.testing.assert_close(model(x, side), reference(model, x, side, positions=torch.arange(4)))
    assert not torch.allclose(model(x, side), model(x, side + 1.0))  # the side input is used


def test_smaller_input_uses_top_left_positions():
    model = ViT2d(1, 2, 16, 1, 2, img_size=(6, 6)).eval()  # 3x3 table
    x = torch.randn(2, 1, 4, 3)  # grid 2x2 after padding W to 4
    torch.testing.assert_close(model(x), reference(model, x, positions=torch.tensor([0, 1, 3, 4])))
    with pytest.raises(ValueError, match=r"x: expected H <= 6 and W <= 6 \(img_size\), got \(2, 1, 7, 6\)"):
        model(torch.randn(2, 1, 7, 6))


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (6, 6), (10, 3)])
def test_any_size_with_sincos_and_padding_rule(size):
    model = randomise_blocks(ViT2d(1, 3, 16, 2, 4, side_dim=2)).eval()
    x, side = torch.randn(2, 1, *size), torch.randn(2, 2)
    y = model(x, side)
    assert y.shape == (2, 1)
    torch.testing.assert_close(y, reference(model, x, side))
    # the documented rule: zero-pad bottom/right to the next multiple of patch_size
    padded = torch.zeros(2, 1, -(-size[0] // 3) * 3, -(-size[1] // 3) * 3)
    padded[:, :, : size[0], : size[1]] = x
    torch.testing.assert_close(y, model(padded, side))


def test_blocks_are_identity_at_init():
    model = ViT2d(1, 3, 16, 3, 4).eval()
    x = torch.randn(2, 1, 6, 6)
    shallow = ViT2d(1, 3, 16, 0, 4).eval()
    shallow.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")})
    torch.testing.assert_close(model(x), shallow(x))
    assert not torch.allclose(randomise_blocks(model)(x), shallow(x))


X, SIDE = torch.randn(2, 1, 6, 6), torch.randn(2, 3)


def vit(**kw):
    return ViT2d(1, 3, 16, 1, 4, **kw)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: vit(side_dim=3)(torch.randn(2, 2, 6, 6), SIDE), r"x: expected \(B, 1, H, W\), got \(2, 2, 6, 6\)"),
    (lambda: vit(side_dim=3)(torch.randn(2, 6, 6), SIDE), r"x: expected \(B, 1, H, W\), got \(2, 6, 6\)"),
    (lambda: vit(side_dim=3)(X, torch.randn(3, 3)), r"side: expected \(2, 3\), got \(3, 3\)"),
    (lambda: vit(side_dim=3)(X), r"side: expected \(2, 3\), got None"),
    (lambda: vit()(X, SIDE), r"side: this model was built with side_dim=0"),
    (lambda: vit(pad=False)(torch.randn(2, 1, 5, 6)),
     r"x: expected H and W multiples of patch_size=3 \(pad=False\), got \(2, 1, 5, 6\)"),
    (lambda: ViT2d(1, 3, 18, 1, 4), r"dim: expected a multiple of heads=4, got 18"),
    (lambda: ViT2d(1, 3, 6, 1, 2), r"dim: the sin-cos positions \(img_size=None\) need a multiple of 4, got 6"),
    (lambda: ViT2d(1, 0, 16, 1, 4), r"patch_size: expected >= 1, got 0"),
])
def test_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bf16_autocast():
    model = randomise_blocks(ViT2d(1, 3, 32, 2, 4, side_dim=3, img_size=6)).eval()
    x, side = torch.randn(2, 1, 6, 6), torch.randn(2, 3)
    ref = model(x, side)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, side)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_compiles():
    model = randomise_blocks(ViT2d(1, 3, 16, 1, 4, side_dim=3, img_size=6)).eval()
    x, side = torch.randn(2, 1, 5, 6), torch.randn(2, 3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, side), model(x, side))
