import math

import pytest
import torch

from blockyard.blocks import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    coord_channels,
    sincos_2d,
    timestep_embedding,
)

# ---------------------------------------------------------------- timestep_embedding


def published_timestep_embedding(ts, dim, max_period=10000, flip=False, shift=1.0, scale=1.0):
    """diffusers' get_timestep_embedding, written element by element in float64."""
    half = dim // 2
    rows = []
    for t in ts:
        freqs = [math.exp(-math.log(max_period) * i / (half - shift)) for i in range(half)]
        args = [scale * t * f for f in freqs]
        sin, cos = [math.sin(a) for a in args], [math.cos(a) for a in args]
        row = cos + sin if flip else sin + cos
        rows.append(row + [0.0] * (dim % 2))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("dim", [16, 33])
def test_timestep_embedding_matches_published_formula(flip, shift, dim):
    ts = [0, 1, 7, 250, 999]
    out = timestep_embedding(torch.tensor(ts), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert out.shape == (5, dim) and out.dtype == torch.float32
    ref = published_timestep_embedding(ts, dim, flip=flip, shift=shift)
    # float32 rounding of arguments up to ~1000 rad
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)
    if dim % 2:
        assert torch.equal(out[:, -1], torch.zeros(5))


def test_timestep_embedding_other_keywords_and_fractional_t():
    ts = [0.25, 3.5, 40.0]
    out = timestep_embedding(torch.tensor(ts, dtype=torch.float64), 10, max_period=100, scale=2.5,
                             flip_sin_to_cos=True, downscale_freq_shift=0.5)
    ref = published_timestep_embedding(ts, 10, max_period=100, flip=True, shift=0.5, scale=2.5)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_timestep_embedding_default_is_lucidrains_sinusoidal():
    # lucidrains' SinusoidalPosEmb: emb = log(10000) / (half - 1); cat(sin, cos)
    t = torch.tensor([3.0, 500.0])
    half = 8
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    args = t[:, None] * freqs[None]
    torch.testing.assert_close(timestep_embedding(t, 16), torch.cat([args.sin(), args.cos()], -1))


def test_timestep_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match=r"t: expected \(B,\)"):
        timestep_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match=r"t: expected \(B,\)"):
        timestep_embedding(torch.tensor(3.0), 8)
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.zeros(2), 2)  # half - shift = 0 would divide by zero
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.zeros(2), 1, downscale_freq_shift=0.0)
    with pytest.raises(ValueError, match="max_period"):
        timestep_embedding(torch.zeros(2), 8, max_period=0)


# ---------------------------------------------------------------- sincos_2d


def test_sincos_2d_layout_matches_loop():
    h, w, dim, temp = 3, 5, 12, 100.0
    table = sincos_2d(h, w, dim, temperature=temp)
    assert table.shape == (h * w, dim) and table.dtype == torch.float32
    q = dim // 4
    for y in range(h):
        for x in range(w):
            row = table[y * w + x].tolist()
            for i in range(q):
                omega = temp ** (-i / q)
                expected = [math.sin(y * omega), math.sin(x * omega), math.cos(y * omega), math.cos(x * omega)]
                got = [row[i], row[q + i], row[2 * q + i], row[3 * q + i]]
                assert got == pytest.approx(expected, abs=1e-6)


def test_sincos_2d_rows_follow_flattened_map_order():
    # adding the table to x.flatten(2).transpose(1, 2) of a (B, C, H, W) map: token (y, x) at y*W+x
    table = sincos_2d(4, 6, 8)
    grid = table.view(4, 6, 8)
    torch.testing.assert_close(grid[:, 0, 0], torch.sin(torch.arange(4.0)))  # sin(y * omega_0)
    torch.testing.assert_close(grid[0, :, 2], torch.sin(torch.arange(6.0)))  # sin(x * omega_0)
    assert sincos_2d(4, 6, 8, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(("args", "name"), [((3, 3, 6), "dim"), ((3, 3, 0), "dim"), ((0, 3, 8), "height"),
                                            ((3, 0, 8), "width")])
def test_sincos_2d_rejects_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        sincos_2d(*args)


# ---------------------------------------------------------------- LearnedPositionalEmbedding


def test_learned_positional_embedding_adds_table_prefix():
    pe = LearnedPositionalEmbedding(10, 6)
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(pe(x), x + pe.weight[:7], rtol=0, atol=0)
    assert not torch.equal(pe(x), x)
    # an explicit (B, N) index picks rows per sample
    pos = torch.tensor([[9, 0, 3], [1, 1, 2]])
    y = pe(x[:, :3], pos)
    torch.testing.assert_close(y[0, 0], x[0, 0] + pe.weight[9], rtol=0, atol=0)
    torch.testing.assert_close(y[1, 2], x[1, 2] + pe.weight[2], rtol=0, atol=0)
    torch.testing.assert_close(pe(x[:, :3], torch.tensor([0, 1, 2])), pe(x[:, :3]), rtol=0, atol=0)


def test_learned_positional_embedding_init_is_truncated_normal_std_002():
    pe = LearnedPositionalEmbedding(512, 64)
    w = pe.weight.detach()
    assert w.abs().max() <= 0.04
    # std of N(0, 0.02^2) truncated at +-2 sigma is 0.02 * 0.8796
    assert abs(w.std().item() - 0.02 * 0.8796) < 5e-4
    assert abs(w.mean().item()) < 5e-4
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    pe.reset_parameters(generator=g1)
    first = pe.weight.detach().clone()
    pe.reset_parameters(generator=g2)
    torch.testing.assert_close(pe.weight.detach(), first, rtol=0, atol=0)


def test_learned_positional_embedding_grad_and_dtype():
    pe = LearnedPositionalEmbedding(5, 4)
    pe(torch.randn(3, 4, 4)).sum().backward()
    torch.testing.assert_close(pe.weight.grad[:4], torch.full((4, 4), 3.0))
    torch.testing.assert_close(pe.weight.grad[4], torch.zeros(4))
    assert pe(torch.randn(1, 2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_learned_positional_embedding_rejects_bad_input():
    pe = LearnedPositionalEmbedding(4, 6)
    with pytest.raises(ValueError, match=r"x: expected \(B, N <= 4, 6\), got \(2, 5, 6\)"):
        pe(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"x: expected \(B, N, 6\)"):
        pe(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"x: expected \(B, N, 6\)"):
        pe(torch.randn(3, 6))
    with pytest.raises(ValueError, match="positions: expected"):
        pe(torch.randn(2, 3, 6), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="positions: expected an integer"):
        pe(torch.randn(2, 3, 6), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="num_positions"):
        LearnedPositionalEmbedding(0, 6)
    with pytest.raises(ValueError, match="dim"):
        LearnedPositionalEmbedding(4, 0)


# ---------------------------------------------------------------- RotaryEmbedding


def rope_reference(x, positions, base=10000.0):
    """Rotate each channel pair (i, i + d/2) by p * base**(-2i/d) with an explicit 2x2 matrix."""
    d = x.shape[-1]
    out = torch.empty_like(x, dtype=torch.float64)
    for n, p in enumerate(positions.tolist()):
        for i in range(d // 2):
            a = p * base ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            u, v = x[..., n, i].double(), x[..., n, i + d // 2].double()
            out[..., n, i] = c * u - s * v
            out[..., n, i + d // 2] = s * u + c * v
    return out


def test_rope_matches_rotate_half_reference():
    rope = RotaryEmbedding(8, base=100.0)
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(rope(x).double(), rope_reference(x, torch.arange(5), base=100.0),
                               rtol=1e-5, atol=1e-5)
    pos = torch.tensor([0.5, 3.0, 7.0, 11.0, 2.0])
    torch.testing.assert_close(rope(x, pos).double(), rope_reference(x, pos, base=100.0), rtol=1e-5, atol=1e-5)


def test_rope_equals_interleaved_layout_after_permutation():
    # GPT-J / timm `rot` layout: pairs (2i, 2i+1). perm maps our channels onto it.
    d = 8
    x = torch.randn(2, 6, d)
    angles = torch.arange(6.0)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)  # (N, d/2)
    xi = x.view(2, 6, d // 2, 2)
    interleaved = torch.stack([xi[..., 0] * angles.cos() - xi[..., 1] * angles.sin(),
                               xi[..., 0] * angles.sin() + xi[..., 1] * angles.cos()], -1).flatten(-2)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # [0, 2, 4, 6, 1, 3, 5, 7]
    ours = RotaryEmbedding(d)(x[..., perm])
    torch.testing.assert_close(ours, interleaved[..., perm])
    assert not torch.allclose(RotaryEmbedding(d)(x), interleaved)  # the layouts do differ


def test_rope_dot_product_depends_only_on_relative_position():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 16, dtype=torch.float64)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()

    for m, n in [(0, 3), (5, 2), (7, 7), (100, 37)]:
        for shift in (1, 13, 250):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-9)
    assert score(0, 3) != pytest.approx(score(0, 4), abs=1e-6)  # but it does depend on m - n
    # the same q and k at every position of a sequence: logits q_m . k_n form a Toeplitz matrix
    qs = torch.randn(1, 2, 1, 16).expand(1, 2, 9, 16)
    ks = torch.randn(1, 2, 1, 16).expand(1, 2, 9, 16)
    logits = rope(qs) @ rope(ks).transpose(-1, -2)
    for off in range(-8, 9):
        diag = torch.diagonal(logits, offset=off, dim1=-2, dim2=-1)
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_is_identity_at_zero_and_keeps_dtype():
    rope = RotaryEmbedding(8)
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x, torch.zeros(7))[:, :], x, rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    yb = rope(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), rope(xb.float()), rtol=2**-8, atol=1e-2)


def test_rope_per_sample_positions_and_heads():
    rope = RotaryEmbedding(4)
    x = torch.randn(2, 3, 5, 4)
    pos = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])
    y = rope(x, pos)
    torch.testing.assert_close(y[0], rope(x[:1])[0])
    torch.testing.assert_close(y[1], rope(x[1:], pos[1])[0])
    x.requires_grad_(True)
    rope(x, pos).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rope_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="base"):
        RotaryEmbedding(8, base=0.0)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match=r"x: expected \(B, heads, N, 8\) or \(B, N, 8\), got \(2, 5, 6\)"):
        rope(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="x: expected"):
        rope(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"positions: expected \(5,\) or \(2, 5\)"):
        rope(torch.randn(2, 5, 8), torch.arange(4))


# ---------------------------------------------------------------- coord_channels


def test_coord_channels_values():
    c = coord_channels(3, 4, 5)
    assert c.shape == (3, 2, 4, 5) and c.dtype == torch.get_default_dtype() and c.is_contiguous()
    for y in range(4):
        for x in range(5):
            assert c[2, 0, y, x].item() == pytest.approx(y / 3)
            assert c[2, 1, y, x].item() == pytest.approx(x / 4)
    assert torch.equal(c[0], c[2])
    assert c[0, 0].min() == 0 and c[0, 0].max() == 1 and c[0, 1].max() == 1


def test_coord_channels_size_one_axis_is_zero_and_dtype():
    c = coord_channels(2, 1, 3, dtype=torch.float64)
    assert c.dtype == torch.float64
    assert torch.equal(c[:, 0], torch.zeros(2, 1, 3, dtype=torch.float64))
    assert c[0, 1, 0].tolist() == [0.0, 0.5, 1.0]
    assert torch.equal(coord_channels(1, 1, 1), torch.zeros(1, 2, 1, 1))


@pytest.mark.parametrize(("args", "name"), [((-1, 3, 3), "batch"), ((2, 0, 3), "height"), ((2, 3, 0), "width")])
def test_coord_channels_rejects_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        coord_channels(*args)
