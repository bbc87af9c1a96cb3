import pytest
import torch

from blockyard.blocks import Gathered, downsample_mask, gather_masked, random_mask, scatter_masked

# ---------------------------------------------------------------- random_mask


@pytest.mark.parametrize(("n", "ratio"), [(49, 0.6), (10, 0.25), (7, 0.5), (16, 0.0), (16, 1.0), (1, 0.5)])
def test_random_mask_exact_count_per_row(n, ratio):
    mask = random_mask(6, n, ratio, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (6, n)
    assert (mask.sum(1) == round(ratio * n)).all()
    assert len({tuple(row.tolist()) for row in mask}) > 1 or round(ratio * n) in (0, n) or n == 1


def test_random_mask_respects_valid_and_counts_valid_only():
    gen = torch.Generator().manual_seed(0)
    valid = torch.rand(32, 40, generator=gen) < torch.linspace(0.05, 1.0, 32)[:, None]
    valid[0] = False  # a row with nothing alive
    for ratio in (0.0, 0.3, 0.75, 1.0):
        mask = random_mask(32, 40, ratio, valid=valid, generator=gen)
        assert not (mask & ~valid).any()
        expected = [round(ratio * int(v)) for v in valid.sum(1)]
        assert mask.sum(1).tolist() == expected


def test_random_mask_is_reproducible_with_generator():
    a = random_mask(4, 30, 0.5, generator=torch.Generator().manual_seed(7))
    b = random_mask(4, 30, 0.5, generator=torch.Generator().manual_seed(7))
    c = random_mask(4, 30, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _chi_square(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


def test_random_mask_is_uniform_over_positions_and_rows():
    # 19 degrees of freedom: P(chi2 > 45) ~ 7e-4; a "mask the first k" or biased sort gives thousands
    draws, n, ratio = 4000, 20, 0.3
    mask = random_mask(draws, n, ratio, generator=torch.Generator().manual_seed(3))
    freq = mask.sum(0).double()
    assert _chi_square(freq, draws * round(ratio * n) / n) < 45
    # pairs are unbiased too: P(i and j both masked) = k(k-1) / (n(n-1)) for every pair
    k = round(ratio * n)
    pair = (mask[:, 0] & mask[:, 1]).double().mean()
    assert abs(float(pair) - k * (k - 1) / (n * (n - 1))) < 0.02


def test_random_mask_is_uniform_among_valid_positions():
    draws, n = 4000, 12
    valid = torch.zeros(draws, n, dtype=torch.bool)
    valid[:, ::2] = True  # 6 alive, 3 masked per row
    mask = random_mask(draws, n, 0.5, valid=valid, generator=torch.Generator().manual_seed(4))
    freq = mask[:, ::2].sum(0).double()
    assert mask[:, 1::2].sum() == 0
    assert _chi_square(freq, draws * 3 / 6) < 20.5  # 5 dof, p ~ 1e-3


def test_random_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        random_mask(2, 5, 1.5)
    with pytest.raises(ValueError, match=r"valid: expected \(2, 5\), got \(2, 4\)"):
        random_mask(2, 5, 0.5, valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid: expected a bool"):
        random_mask(2, 5, 0.5, valid=torch.ones(2, 5))


# ---------------------------------------------------------------- downsample_mask


def _naive_downsample(mask, f):
    b, h, w = mask.shape
    out = torch.zeros(b, h // f, w // f, dtype=torch.bool)
    for i in range(b):
        for y in range(h // f):
            for x in range(w // f):
                out[i, y, x] = bool(mask[i, y * f:(y + 1) * f, x * f:(x + 1) * f].all())
    return out


@pytest.mark.parametrize(("shape", "factor", "p"), [((3, 8, 12), 2, 0.8), ((2, 9, 6), 3, 0.9), ((2, 4, 4), 1, 0.5),
                                                     ((2, 8, 8), 4, 0.97)])
def test_downsample_mask_matches_naive_all_rule(shape, factor, p):
    mask = torch.rand(*shape) < p
    mask[0, :factor, :factor] = True  # at least one fully masked cell
    expected = _naive_downsample(mask, factor)
    assert expected.any() and not expected.all()
    torch.testing.assert_close(downsample_mask(mask, factor), expected)
    torch.testing.assert_close(downsample_mask(mask[:, None], factor), expected[:, None])
    # it is 1 - maxpool(1 - mask)
    pooled = 1 - torch.nn.functional.max_pool2d(1 - mask[:, None].float(), factor)
    torch.testing.assert_close(downsample_mask(mask, factor), pooled[:, 0].bool())


def test_downsample_mask_rejects_bad_input():
    with pytest.raises(ValueError, match=r"divisible by factor=2, got \(1, 5, 4\)"):
        downsample_mask(torch.zeros(1, 5, 4, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="mask: expected a bool"):
        downsample_mask(torch.zeros(1, 4, 4), 2)
    with pytest.raises(ValueError, match=r"mask: expected \(B, H, W\)"):
        downsample_mask(torch.zeros(1, 2, 4, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="factor"):
        downsample_mask(torch.zeros(1, 4, 4, dtype=torch.bool), 0)


# ---------------------------------------------------------------- gather_masked / scatter_masked


def _naive_gather_tokens(values, mask):
    b, _, c = values.shape
    m = int(mask.sum(1).max())
    out, idx, valid = torch.zeros(b, m, c), torch.zeros(b, m, dtype=torch.long), torch.zeros(b, m, dtype=torch.bool)
    for i in range(b):
        pos = mask[i].nonzero()[:, 0]
        out[i, : len(pos)] = values[i, pos]
        idx[i, : len(pos)] = pos
        valid[i, : len(pos)] = True
    return out, idx, valid


def _naive_gather_map(values, mask):
    b, c = values.shape[:2]
    m = int(mask.flatten(1).sum(1).max())
    out, idx, valid = torch.zeros(b, m, c), torch.zeros(b, m, 2, dtype=torch.long), torch.zeros(b, m, dtype=torch.bool)
    for i in range(b):
        for j, (y, x) in enumerate(mask[i].nonzero().tolist()):  # nonzero is row-major = ascending position
            out[i, j] = values[i, :, y, x]
            idx[i, j] = torch.tensor([y, x])
            valid[i, j] = True
    return out, idx, valid


def _token_case():
    values = torch.randn(4, 11, 3)
    mask = torch.rand(4, 11) < 0.4
    mask[1] = False  # a row with nothing masked
    mask[2] = True  # a full row sets M = N
    return values, mask


def test_gather_tokens_matches_naive_loop():
    values, mask = _token_case()
    g = gather_masked(values, mask)
    assert isinstance(g, Gathered) and g.values.shape == (4, 11, 3)
    for got, want in zip(g, _naive_gather_tokens(values, mask)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not g.valid[1].any() and (g.values[1] == 0).all()


def test_gather_map_matches_naive_loop_for_both_mask_forms():
    values = torch.randn(3, 5, 6, 7)
    mask = torch.rand(3, 6, 7) < 0.3
    mask[0] = False
    want = _naive_gather_map(values, mask)
    for m in (mask, mask[:, None]):
        g = gather_masked(values, m)
        assert g.index.shape == (3, want[0].shape[1], 2)
        for got, ref in zip(g, want):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_gather_with_nothing_masked_returns_empty():
    g = gather_masked(torch.randn(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool))
    assert g.values.shape == (2, 0, 4) and g.index.shape == (2, 0, 2) and g.valid.shape == (2, 0)
    values = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(scatter_masked(values, g.values, g), values)


def test_gather_max_count_pads_and_matches():
    values, mask = _token_case()
    mask[2, 0] = False  # M = 10 now
    loose = gather_masked(values, mask, max_count=13)
    tight = gather_masked(values, mask)
    assert loose.values.shape == (4, 13, 3) and tight.values.shape == (4, 10, 3)
    for a, b in zip(loose, tight):
        torch.testing.assert_close(a[:, :10], b, rtol=0, atol=0)
    assert not loose.valid[:, 10:].any() and (loose.values[:, 10:] == 0).all()
    with pytest.raises(RuntimeError, match="max_count"):
        gather_masked(values, mask, max_count=5)  # never silently truncates


def test_scatter_round_trip_and_naive_write():
    values = torch.randn(3, 4, 5, 6)
    mask = torch.rand(3, 5, 6) < 0.5
    mask[1] = False
    g = gather_masked(values, mask)
    torch.testing.assert_close(scatter_masked(torch.zeros_like(values), g.values, g),
                               values * mask[:, None], rtol=0, atol=0)
    new = torch.randn_like(g.values)
    out = scatter_masked(values, new, g)
    expected = values.clone()
    for i in range(3):
        for j in range(g.valid.shape[1]):
            if g.valid[i, j]:
                y, x = g.index[i, j].tolist()
                expected[i, :, y, x] = new[i, j]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(out, values)  # out of place: values kept
    tokens, tmask = _token_case()
    gt = gather_masked(tokens, tmask)
    torch.testing.assert_close(scatter_masked(tokens * 0, gt.values, gt), tokens * tmask[..., None], rtol=0, atol=0)


def test_gradients_flow_through_gather_and_scatter():
    values = torch.randn(2, 9, 4, requires_grad=True)
    mask = torch.rand(2, 9) < 0.5
    mask[0, 0], mask[1] = True, False
    g = gather_masked(values, mask)
    (g.values * 3).sum().backward()
    torch.testing.assert_close(values.grad, 3.0 * mask[..., None].expand(-1, -1, 4).float())

    base = torch.randn(2, 4, 3, 3, requires_grad=True)
    mmask = torch.rand(2, 3, 3) < 0.5
    mmask[0, 1, 1] = True
    gm = gather_masked(base.detach(), mmask)
    src = torch.randn_like(gm.values, requires_grad=True)
    weight = torch.randn(2, 4, 3, 3)
    (scatter_masked(base, src, gm) * weight).sum().backward()
    torch.testing.assert_close(base.grad, weight * ~mmask[:, None])  # overwritten positions get no gradient
    torch.testing.assert_close(src.grad, gather_masked(weight, mmask).values)  # zero at padding
    assert src.grad[gm.valid].abs().sum() > 0


def test_scatter_casts_to_values_dtype():
    values = torch.randn(2, 6, 3)
    mask = torch.rand(2, 6) < 0.5
    g = gather_masked(values, mask)
    out = scatter_masked(values, g.values.bfloat16(), g)
    assert out.dtype == torch.float32


def test_gather_scatter_compile_fullgraph_with_max_count():
    def roundtrip(values, mask):
        g = gather_masked(values, mask, max_count=6)
        return scatter_masked(values, g.values * 2, g), g.values

    values = torch.randn(3, 4, 4, 4)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :6] = True
    mask = mask[:, torch.randperm(16)].reshape(3, 4, 4)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(values, mask), roundtrip(values, mask)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled(values, mask)[0], torch.where(mask[:, None], 2 * values, values))


def test_gather_scatter_reject_bad_input():
    with pytest.raises(TypeError, match="mask: expected a bool"):
        gather_masked(torch.randn(2, 5, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"mask: expected \(2, 5\), got \(2, 4\)"):
        gather_masked(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: expected \(2, 4, 4\) or \(2, 1, 4, 4\), got \(2, 3, 4\)"):
        gather_masked(torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="values: expected"):
        gather_masked(torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    values = torch.randn(2, 5, 3)
    g = gather_masked(values, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"gathered_values: expected \(2, 5, 3\), got \(2, 5, 4\)"):
        scatter_masked(values, torch.randn(2, 5, 4), g)
    with pytest.raises(ValueError, match=r"gathered.index: expected \(2, 5, 2\)"):
        scatter_masked(torch.randn(2, 3, 5, 1), torch.randn(2, 5, 3), g)
