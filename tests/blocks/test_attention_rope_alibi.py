"""RoPE and an additive bias (ALiBi) through Attention and TransformerBlock, on the fused and the manual path."""
import math

import pytest
import torch
from torch import nn

from blockyard.blocks import Attention, RotaryEmbedding, TransformerBlock, alibi_bias, alibi_slopes

B, N, C, H = 2, 6, 16, 4
D = C // H


def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def rotate_by_hand(t, positions, base=10000.0):
    """t (N, D) float64: channel pair (i, i + D/2) turned by p * base**(-2i/D), an explicit 2x2 rotation."""
    out = t.clone()
    for n, p in enumerate(positions.tolist()):
        for i in range(D // 2):
            a = p * base ** (-2 * i / D)
            u, v = t[n, i].item(), t[n, i + D // 2].item()
            out[n, i] = math.cos(a) * u - math.sin(a) * v
            out[n, i + D // 2] = math.sin(a) * u + math.cos(a) * v
    return out


def naive(attn, x, positions=None, bias=None, mask=None, base=10000.0):
    """float64 loop over batch, head and query: q, k rotated by hand, bias (B, H, N, N) added to the scores,
    mask (B, N) True = masked key; a query that sees no key outputs 0."""
    x = x.double()
    qkv = x @ attn.qkv.weight.double().T + (0 if attn.qkv.bias is None else attn.qkv.bias.double())
    q, k, v = qkv.chunk(3, dim=-1)
    out = torch.zeros(B, N, C, dtype=torch.float64)
    for b in range(B):
        pos = None if positions is None else (positions if positions.dim() == 1 else positions[b])
        keep = torch.ones(N, dtype=torch.bool) if mask is None else ~mask[b]
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            qh, kh = q[b, :, sl], k[b, :, sl]
            if pos is not None:
                qh, kh = rotate_by_hand(qh, pos, base), rotate_by_hand(kh, pos, base)
            for i in range(N):
                scores = kh @ qh[i] / math.sqrt(D)
                if bias is not None:
                    scores = scores + bias[b, h, i].double()
                out[b, i, sl] = torch.softmax(scores[keep], -1) @ v[b, keep, sl]
    y = out @ attn.proj.weight.double().T + attn.proj.bias.double()
    if mask is not None:
        y[mask.all(-1)] = 0.0
    return y


def positions_of(form):
    if form == "default":
        return None, torch.arange(N)
    if form == "shared":
        p = torch.tensor([0.0, 2.5, 1.0, 7.0, 3.0, 11.0])
        return p, p
    p = torch.stack([torch.tensor([0.0, 2.5, 1.0, 7.0, 3.0, 11.0]), torch.arange(N) * 0.5 + 3])
    return p, p


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("form", ["default", "shared", "per_sample"])
def test_rope_through_attention_equals_rotating_q_and_k_by_hand(fused, form):
    attn = randomize(Attention(C, H, qkv_bias=True, fused=fused, rope=RotaryEmbedding(D)))
    x = torch.randn(B, N, C)
    given, used = positions_of(form)
    torch.testing.assert_close(attn(x, positions=given).double(), naive(attn, x, used), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_alibi_through_attention_equals_adding_the_bias_by_hand(fused):
    attn = randomize(Attention(C, H, fused=fused))
    x = torch.randn(B, N, C)
    centres = torch.randn(B, N, 3)
    bias = alibi_bias(torch.cdist(centres, centres), alibi_slopes(H))  # (B, H, N, N)
    torch.testing.assert_close(attn(x, attn_bias=bias).double(), naive(attn, x, bias=bias), atol=1e-5, rtol=1e-5)
    plain = attn(x)
    assert (attn(x, attn_bias=bias) - plain).abs().max() > 1e-2  # the bias really changes the output


@pytest.mark.parametrize("fused", [True, False])
def test_rope_bias_and_key_mask_together_including_a_blind_sample(fused):
    attn = randomize(Attention(C, H, qkv_bias=True, fused=fused, rope=RotaryEmbedding(D, base=100.0)))
    x = torch.randn(B, N, C)
    mask = torch.rand(B, N) < 0.4
    mask[0, 0] = False
    mask[1] = True  # every query of sample 1 sees no key: output 0, not NaN
    p = torch.arange(N, dtype=torch.float32)
    bias = alibi_bias((p[:, None] - p[None, :]).abs(), alibi_slopes(H))  # (H, N, N)
    y = attn(x, mask, positions=p, attn_bias=bias)
    ref = naive(attn, x, p, bias.expand(B, -1, -1, -1), mask, base=100.0)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[1], torch.zeros(N, C))


@pytest.mark.parametrize("fused", [True, False])
def test_bias_forms_are_equivalent_and_zero_bias_changes_nothing(fused):
    attn = randomize(Attention(C, H, fused=fused))
    x, full = torch.randn(B, N, C), torch.randn(N, N)
    y = attn(x, attn_bias=full)
    torch.testing.assert_close(attn(x, attn_bias=full.expand(H, N, N)), y)
    torch.testing.assert_close(attn(x, attn_bias=full.expand(B, H, N, N)), y)
    torch.testing.assert_close(attn(x, attn_bias=torch.zeros(N, N)), attn(x), atol=1e-6, rtol=1e-6)


def test_rope_output_depends_only_on_relative_positions():
    # shifting every position by the same amount leaves q.k, hence the output, unchanged; rotating only q
    # (or only k) would not; positions scaled change it
    attn = randomize(Attention(C, H, rope=RotaryEmbedding(D)))
    x, p = torch.randn(B, N, C), torch.tensor([0.0, 1.0, 3.0, 4.0, 8.0, 9.0])
    torch.testing.assert_close(attn(x, positions=p + 17.0), attn(x, positions=p), atol=1e-5, rtol=1e-5)
    assert (attn(x, positions=2 * p) - attn(x, positions=p)).abs().max() > 1e-2


@pytest.mark.parametrize("fused", [True, False])
def test_rope_at_position_zero_is_plain_attention(fused):
    plain = randomize(Attention(C, H, fused=fused))
    rope = Attention(C, H, fused=fused, rope=RotaryEmbedding(D))
    rope.load_state_dict(plain.state_dict())
    x = torch.randn(B, N, C)
    torch.testing.assert_close(rope(x, positions=torch.zeros(N)), plain(x), atol=1e-6, rtol=1e-6)


def test_fused_and_manual_agree_forward_and_backward_with_rope_bias_and_mask():
    attn = randomize(Attention(C, H, rope=RotaryEmbedding(D)))
    mask = torch.rand(B, N) < 0.3
    outs, grads = [], []
    for fused in (True, False):
        attn.fused = fused
        x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(1), requires_grad=True)
        bias = torch.randn(H, N, N, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = attn(x, mask, attn_bias=bias)
        y.square().sum().backward()
        outs.append(y)
        grads.append((x.grad, bias.grad))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for g_fused, g_manual in zip(*grads):
        torch.testing.assert_close(g_fused, g_manual, atol=1e-5, rtol=1e-5)


def test_transformer_block_passes_rope_positions_and_bias_to_its_self_attention():
    rope = RotaryEmbedding(D)
    block = randomize(TransformerBlock(C, H, zero_init=False, rope=rope))
    x, p = torch.randn(B, N, C), torch.tensor([0.0, 1.0, 3.0, 4.0, 8.0, 9.0])
    bias = alibi_bias((p[:, None] - p[None, :]).abs(), alibi_slopes(H))
    h = x + block.attn(block.norm1(x), positions=p, attn_bias=bias)
    expected = h + block.mlp(block.norm3(h))
    torch.testing.assert_close(block(x, positions=p, attn_bias=bias), expected)
    assert block.attn.rope is rope
    assert (block(x, positions=p, attn_bias=bias) - block(x)).abs().max() > 1e-2


def test_transformer_block_with_rope_is_identity_at_init():
    x = torch.randn(B, N, C)
    block = TransformerBlock(C, H, rope=RotaryEmbedding(D))
    assert torch.equal(block(x, positions=torch.arange(N), attn_bias=torch.randn(H, N, N)), x)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_with_rope_and_bias_close_to_fp32(fused):
    attn = randomize(Attention(C, H, fused=fused, rope=RotaryEmbedding(D)))
    x, bias = torch.randn(B, N, C), alibi_bias(torch.rand(N, N) * 4, alibi_slopes(H))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, attn_bias=bias)
    assert y.dtype == torch.bfloat16
    ref = attn(x, attn_bias=bias)
    torch.testing.assert_close(y.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: Attention(C, H)(torch.randn(B, N, C), positions=torch.arange(N)), ValueError,
     r"positions: this Attention was built with rope=None, got positions"),
    (lambda: Attention(C, H, rope=RotaryEmbedding(C)), ValueError,
     r"rope: expected a rotary embedding over the head dim 4 \(dim // heads\), got dim=16"),
    (lambda: Attention(C, H, rope=RotaryEmbedding(D))(torch.randn(B, N, C), positions=torch.arange(N + 1)),
     ValueError, r"positions: expected \(6,\) or \(2, 6\), got \(7,\)"),
    (lambda: Attention(C, H)(torch.randn(B, N, C), attn_bias=torch.zeros(N, N, dtype=torch.long)), TypeError,
     r"attn_bias: expected a floating-point additive bias, got torch.int64"),
    (lambda: Attention(C, H)(torch.randn(B, N, C), attn_bias=torch.zeros(H + 1, N, N)), ValueError,
     r"attn_bias: expected \(6, 6\), \(4, 6, 6\) or \(2, 4, 6, 6\), got \(5, 6, 6\)"),
    (lambda: TransformerBlock(C, H)(torch.randn(B, N, C), attn_bias=torch.zeros(B, 1, N, N)), ValueError,
     r"attn_bias: expected .* got \(2, 1, 6, 6\)"),
])
def test_rejects_bad_input_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_torch_compile_fullgraph_with_rope_and_bias_matches_eager(fused):
    block = randomize(TransformerBlock(C, H, zero_init=False, fused=fused, rope=RotaryEmbedding(D)))
    x = torch.randn(B, N, C, requires_grad=True)
    p, mask = torch.arange(N, dtype=torch.float32), torch.rand(B, N) < 0.3
    bias = alibi_bias((p[:, None] - p[None, :]).abs(), alibi_slopes(H))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x, mask=mask, positions=p, attn_bias=bias)
    torch.testing.assert_close(y, block(x, mask=mask, positions=p, attn_bias=bias))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert isinstance(block.attn.rope, nn.Module)
